"""The multi-host entry point ``tpu/train.py`` without a TPU: 2 processes × 4 CPU devices.

Three runs of the same program and config (``tpu/configs/cpu8.toml``, 6 steps,
checkpoints at steps 1, 2, 4, 6):

* A: 1 process × 8 CPU devices, uninterrupted;
* B: 2 processes × 4 CPU devices (``jax.distributed.initialize`` on localhost),
  hard-killed (``os._exit``) right after step 5 — step 5's state is lost (and
  step 4's checkpoint too if its asynchronous write had not finished);
* C: B's command again: resumes from B's latest finished checkpoint and finishes.

Oracles: A's losses (B and C must reproduce them: same global batches, same
math, only the process layout differs) and A's final checkpoint (C's must hold
the same parameters and optimizer state). Runs share a persistent compilation
cache, so C does not recompile, and use unoptimised XLA CPU code generation
(compiles faster; all three runs use the same flags).
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
CONFIG = ROOT / "tpu" / "configs" / "cpu8.toml"
STEPS = 6
# A vs B/C: the same program partitioned over 8 devices, in 1 vs 2 processes;
# cross-process reductions go through gloo, whose summation order differs:
# float32 rounding. Measured: losses agree to ~1e-7 relative; final parameters
# to 5.4e-7 absolute = 5.6e-6 of the largest entry (the step's r×r inverse
# roots amplify rounding while lora_b is still near its zero init). Runs on
# the same topology resume bit-identically (tests/test_checkpoint.py).
LOSS_RTOL = 1e-5
PARAM_ATOL_OF_MAX = 2e-5

pytestmark = pytest.mark.skipif(not DATA.exists(), reason=f"needs the data file {DATA}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def command(ckpt: Path, metrics: Path, devices: int, extra: list[str]) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "tpu" / "train.py"),
        "--config",
        str(CONFIG),
        "--data",
        str(DATA),
        "--ckpt_dir",
        str(ckpt),
        "--steps",
        str(STEPS),
        "--metrics",
        str(metrics),
        "--cpu_devices",
        str(devices),
        *extra,
    ]


def launch(cmds: list[list[str]], cache: Path) -> list[subprocess.Popen]:
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "JAX_COMPILATION_CACHE_DIR": str(cache),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
        # CPU compilation is most of this test's time; unoptimised XLA CPU code
        # compiles ~2.5x faster (27 s → 11 s CPU per run). A, B and C share it.
        "XLA_FLAGS": " ".join(
            [
                os.environ.get("XLA_FLAGS", ""),
                "--xla_backend_optimization_level=0",
                "--xla_llvm_disable_expensive_passes=true",
            ]
        ).strip(),
    }
    return [
        subprocess.Popen(c, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for c in cmds
    ]


def finish(procs: list[subprocess.Popen], expected_rc: int) -> None:
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == expected_rc, out.decode()[-3000:]


def two_process_cmds(ckpt: Path, metrics: Path, extra: list[str]) -> list[list[str]]:
    port = free_port()
    return [
        command(
            ckpt,
            metrics,
            4,
            [
                "--coordinator",
                f"localhost:{port}",
                "--num_processes",
                "2",
                "--process_id",
                str(i),
                *extra,
            ],
        )
        for i in range(2)
    ]


def losses(metrics: Path) -> dict[int, float]:
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def load_train_module():
    spec = importlib.util.spec_from_file_location("tpu_train", ROOT / "tpu" / "train.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_checkpoint(directory: Path, step: int) -> list[np.ndarray]:
    """Restore a checkpoint written on any topology onto one local device."""
    import jax

    from lora_muon_jax import checkpoint

    train = load_train_module()
    config = train.load_config(str(CONFIG))
    _, trainable_shapes = train.shapes(config["model"])
    abstract = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s, np.float32), trainable_shapes, is_leaf=train._is_shape
    )
    single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    tx = train.make_optimizer(config["train"], STEPS)
    target = checkpoint.abstract_train_state(tx, abstract, jax.tree.map(lambda _: single, abstract))
    manager = checkpoint.checkpoint_manager(directory)
    restored = checkpoint.restore(manager, target)
    manager.close()
    assert restored is not None and restored[0] == step
    return [np.asarray(x) for x in jax.tree.leaves(restored[1])]


def test_two_processes_match_one_and_resume_after_kill(tmp_path: Path) -> None:
    cache = tmp_path / "jax_cache"
    a_ckpt, a_metrics = tmp_path / "a", tmp_path / "a.jsonl"
    b_ckpt, b_metrics = tmp_path / "b", tmp_path / "b.jsonl"
    c_metrics = tmp_path / "c.jsonl"

    run_a = launch([command(a_ckpt, a_metrics, 8, [])], cache)
    run_b = launch(two_process_cmds(b_ckpt, b_metrics, ["--crash_after_step", "5"]), cache)
    finish(run_a, 0)
    finish(run_b, 42)
    # The kill lost step 5 (not a save step) and maybe step 4, whose asynchronous
    # write can still be in flight when the process dies: then only a
    # "4.orbax-checkpoint-tmp*" directory is left and step 2 is the latest.
    finished = sorted(int(n) for n in os.listdir(b_ckpt) if n.isdigit())
    resume_from = finished[-1]
    assert resume_from in (2, 4), os.listdir(b_ckpt)

    finish(launch(two_process_cmds(b_ckpt, c_metrics, []), cache), 0)

    expected = losses(a_metrics)
    assert sorted(expected) == list(range(1, STEPS + 1))
    assert expected[STEPS] < expected[1] - 0.5  # it learns
    got_b, got_c = losses(b_metrics), losses(c_metrics)
    assert sorted(got_b) == [1, 2, 3, 4, 5]
    assert sorted(got_c) == list(range(resume_from + 1, STEPS + 1))  # redone after the resume
    for step, loss in [*got_b.items(), *got_c.items()]:
        np.testing.assert_allclose(loss, expected[step], rtol=LOSS_RTOL, err_msg=f"step {step}")
    # Final parameters and optimizer state: the resumed 2-process run == the 1-process run.
    for got, want in zip(
        read_checkpoint(b_ckpt, STEPS), read_checkpoint(a_ckpt, STEPS), strict=True
    ):
        np.testing.assert_allclose(got, want, rtol=0, atol=PARAM_ATOL_OF_MAX * np.abs(want).max())
