"""tunix ``PeftTrainer`` trains ``lora_muon`` on a LoRA'd HF checkpoint, and resumes it exactly.

Each run is a separate process (``tests/tunix_run.py``) on 8 CPU devices (a (1, 4, 2)
(data, fsdp, tp) mesh), so a run can be hard-killed (SIGKILL) mid-training and resumed
by a new process from tunix's own orbax checkpoints. Oracle: the same run uninterrupted;
the resumed factors must be bit-identical.
"""

from __future__ import annotations

import json
import pathlib
import signal
import subprocess
import sys

import numpy as np
import pytest

from tests import hf_fixtures as fx

ROOT = pathlib.Path(__file__).resolve().parents[1]
RUNNER = ROOT / "tests" / "tunix_run.py"
STEPS = 6


def _run(ckpt: pathlib.Path, root: pathlib.Path, *extra: str, kill_after: int | None = None) -> str:
    cmd = [sys.executable, str(RUNNER), str(ckpt), str(root), str(STEPS), *extra]
    out = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT) as proc:
        assert proc.stdout is not None
        for raw in iter(proc.stdout.readline, b""):
            line = raw.decode(errors="replace")
            out.append(line)
            if kill_after is not None and line.strip() == f"STEP {kill_after}":
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait(timeout=600)
    text = "".join(out)
    if kill_after is None:
        assert proc.returncode == 0, text[-3000:]
    else:
        assert proc.returncode == -signal.SIGKILL, text[-3000:]
    return text


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return fx.make_checkpoint(tmp_path_factory.mktemp("hf") / "llama", "llama", seed=7)


def _factors(root: pathlib.Path) -> dict[str, np.ndarray]:
    with np.load(root / "result.npz") as data:
        return {k: data[k] for k in data.files}


def test_peft_trainer_resumes_bit_identically_after_a_hard_kill(
    ckpt: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    _run(ckpt, tmp_path / "full")
    _run(ckpt, tmp_path / "killed", kill_after=5)
    saved = sorted(
        int(p.name) for p in (tmp_path / "killed" / "ckpt").iterdir() if p.name.isdigit()
    )
    assert saved and max(saved) in (2, 4), saved  # an async save in flight may not count
    resumed = _run(ckpt, tmp_path / "killed")
    assert f"STEP {max(saved) + 1}" in resumed and "STEP 1\n" not in resumed
    full, again = _factors(tmp_path / "full"), _factors(tmp_path / "killed")
    assert full.keys() == again.keys() and len(full) == 2 * 2 * 2  # q, v adapters in 2 layers
    for key in full:
        np.testing.assert_array_equal(again[key], full[key], err_msg=key)
    # tunix logged the loss and inject_hyperparams' learning rate every step.
    metrics = json.loads((tmp_path / "full" / "metrics.json").read_text())
    assert len(metrics["loss"]) >= STEPS and np.all(np.isfinite(metrics["loss"]))
    np.testing.assert_allclose(metrics["learning_rate"][:2], [0.025, 0.05], rtol=1e-6)


def test_peft_trainer_gradient_accumulation(ckpt: pathlib.Path, tmp_path: pathlib.Path) -> None:
    out = _run(ckpt, tmp_path / "acc", "--accumulate", "2")
    assert "DONE" in out
    first = _factors(tmp_path / "acc")
    assert all(np.all(np.isfinite(v)) for v in first.values())
    # 6 optimizer steps of 2 micro-batches each differ from 6 steps of one.
    _run(ckpt, tmp_path / "plain")
    plain = _factors(tmp_path / "plain")
    assert any(not np.array_equal(first[k], plain[k]) for k in first)


def test_tunix_model_input_matches_tunix_own_mask_and_positions() -> None:
    from tunix.sft import peft_trainer
    from tunix.sft import utils as sft_utils

    from lora_muon_jax.hf import tunix_model_input

    tokens = np.arange(2 * 5, dtype=np.int32).reshape(2, 5)
    mask = np.array([[True] * 5, [True, True, True, False, False]])  # row 1 right-padded
    got = tunix_model_input(peft_trainer.TrainingInput(input_tokens=tokens, input_mask=mask))
    np.testing.assert_array_equal(got["attention_mask"], sft_utils.make_causal_attn_mask(mask))
    np.testing.assert_array_equal(got["positions"], np.broadcast_to(np.arange(5), (2, 5)))
    np.testing.assert_array_equal(got["input_tokens"], tokens)
    np.testing.assert_array_equal(got["input_mask"], mask)
