"""The multi-host entry point ``tpu/train.py`` without a TPU: 2 processes × 4 CPU devices.

The model is a real HF checkpoint (a tiny random 2-layer ``LlamaForCausalLM`` saved by
``transformers``, read by ``lora_muon_jax.hf.load_pretrained`` in every process), LoRA'd on
q/k/v/o/gate/up/down and trained with LoRA-Muon. Three runs of the same program and config
(``tpu/configs/cpu8.toml``, 6 steps, checkpoints at steps 2, 4, 6):

* A: 1 process × 8 CPU devices, uninterrupted;
* B: 2 processes × 4 CPU devices (``jax.distributed.initialize`` on localhost),
  hard-killed (``os._exit``) right after step 5 — step 5's state is lost (and
  step 4's checkpoint too if its asynchronous write had not finished);
* C: B's command again: resumes from B's latest finished checkpoint and finishes.

Oracles: A's losses (B and C must reproduce them: same global batches, same
math, only the process layout differs) and A's final checkpoint (C's must hold
the same adapters and optimizer state), and the real ``peft`` loading the adapter
that the 2-process run wrote at the end onto the base (logits equal to the merged
checkpoint it wrote too). Runs share a persistent compilation
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

from tests import hf_fixtures as fx

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
CONFIG = ROOT / "tpu" / "configs" / "cpu8.toml"
STEPS = 6
# A vs B/C: the same program partitioned over 8 devices, in 1 vs 2 processes;
# cross-process reductions go through gloo, whose summation order differs:
# float32 rounding. Measured: losses agree to 9e-8 relative; final adapters and
# optimizer state to 7e-6 of each leaf's largest entry. Runs on the same topology
# resume bit-identically (tests/test_checkpoint_nnx.py).
LOSS_RTOL = 1e-5
PARAM_ATOL_OF_MAX = 2e-5

pytestmark = pytest.mark.skipif(not DATA.exists(), reason=f"needs the data file {DATA}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def command(model: Path, ckpt: Path, metrics: Path, devices: int, extra: list[str]) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "tpu" / "train.py"),
        "--config",
        str(CONFIG),
        "--model",
        str(model),
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
    env = fx.fast_compile_env(cache)
    return [
        subprocess.Popen(c, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for c in cmds
    ]


def finish(procs: list[subprocess.Popen], expected_rc: int) -> None:
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == expected_rc, out.decode()[-3000:]


def two_process_cmds(model: Path, ckpt: Path, metrics: Path, extra: list[str]) -> list[list[str]]:
    port = free_port()
    return [
        command(
            model,
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


def read_checkpoint(model_dir: Path, directory: Path, step: int) -> list[tuple[str, np.ndarray]]:
    """Restore a checkpoint written on any topology onto one local device: adapters + opt state."""
    import jax
    from flax import nnx

    from lora_muon_jax import checkpoint

    train = load_train_module()
    model, optimizer = train.build(str(model_dir), train.load_config(str(CONFIG)), STEPS, None)
    manager = checkpoint.checkpoint_manager(directory)
    assert checkpoint.restore_nnx(manager, model, optimizer) == step
    manager.close()
    state = {
        "model": nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam)),
        "optimizer": nnx.to_pure_dict(nnx.state(optimizer, nnx.optimizer.OptState)),
    }
    return [
        (jax.tree_util.keystr(p), np.asarray(x))
        for p, x in jax.tree_util.tree_leaves_with_path(state)
    ]


def test_two_processes_match_one_and_resume_after_kill(tmp_path: Path) -> None:

    model = fx.make_checkpoint(tmp_path / "hf", "llama")
    cache = tmp_path / "jax_cache"
    a_ckpt, a_metrics = tmp_path / "a", tmp_path / "a.jsonl"
    b_ckpt, b_metrics = tmp_path / "b", tmp_path / "b.jsonl"
    c_metrics, out = tmp_path / "c.jsonl", tmp_path / "out"

    run_a = launch([command(model, a_ckpt, a_metrics, 8, [])], cache)
    run_b = launch(two_process_cmds(model, b_ckpt, b_metrics, ["--crash_after_step", "5"]), cache)
    finish(run_a, 0)
    finish(run_b, 42)
    # The kill lost step 5 (not a save step) and maybe step 4, whose asynchronous
    # write can still be in flight when the process dies: then only a
    # "4.orbax-checkpoint-tmp*" directory is left and step 2 is the latest.
    finished = sorted(int(n) for n in os.listdir(b_ckpt) if n.isdigit())
    resume_from = finished[-1]
    assert resume_from in (2, 4), os.listdir(b_ckpt)

    extra = ["--out", str(out), "--merged"]
    finish(launch(two_process_cmds(model, b_ckpt, c_metrics, extra), cache), 0)

    expected = losses(a_metrics)
    assert sorted(expected) == list(range(1, STEPS + 1))
    assert expected[STEPS] < expected[1] - 0.2  # it learns
    got_b, got_c = losses(b_metrics), losses(c_metrics)
    assert sorted(got_b) == [1, 2, 3, 4, 5]
    assert sorted(got_c) == list(range(resume_from + 1, STEPS + 1))  # redone after the resume
    for step, loss in [*got_b.items(), *got_c.items()]:
        np.testing.assert_allclose(loss, expected[step], rtol=LOSS_RTOL, err_msg=f"step {step}")
    # Final adapters and optimizer state: the resumed 2-process run == the 1-process run.
    got, want = read_checkpoint(model, b_ckpt, STEPS), read_checkpoint(model, a_ckpt, STEPS)
    assert [k for k, _ in got] == [k for k, _ in want]
    for (key, g), (_, w) in zip(got, want, strict=True):
        np.testing.assert_allclose(
            g, w, rtol=0, atol=PARAM_ATOL_OF_MAX * np.abs(w).max(), err_msg=key
        )
    # What the 2-process run wrote, through the real peft and transformers.
    tokens = fx.tokens()
    with_adapter = fx.torch_logits(model, tokens, adapter=out / "adapter")
    merged = fx.torch_logits(out / "merged", tokens)
    base = fx.torch_logits(model, tokens)
    np.testing.assert_allclose(with_adapter, merged, rtol=0, atol=2e-5)
    assert np.abs(with_adapter - base).max() > 1e-2  # the adapter changed the model
