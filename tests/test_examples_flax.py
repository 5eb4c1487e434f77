"""Smoke tests of the Flax finetuning examples at ``--tiny`` size (so they cannot silently rot).

Each example runs in-process (under conftest's strict JAX) and returns its results
table. Checked, independently of the printed text: LoRA-Muon lowers the task-B training
loss and beats the pretrained model on task-B eval data; the merged (exported) model
scores what the adapted model scores (merge correctness end to end).
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import jax
import numpy as np
import pytest

pytest.importorskip("flax")
pytest.importorskip("tqdm")

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"

QWIX_WARNINGS = (
    r"ignore:The 'm\.iter_modules\(\)' method is deprecated:DeprecationWarning",
    r"ignore:'\.value' access is now deprecated:DeprecationWarning",
    r"ignore:'VariableState' was removed:DeprecationWarning",
)


def _run(name: str) -> dict[str, dict[str, float]]:
    spec = importlib.util.spec_from_file_location(f"_example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        # optax 0.2.8's schedules (cosine_decay_schedule) multiply Python floats by the int32
        # step count, which conftest's strict promotion rejects; the examples run under JAX's
        # default (standard) promotion, as users run them. This package's layers are checked
        # under strict promotion in test_flax_modules.py / test_surgery.py.
        with jax.numpy_dtype_promotion("standard"):
            return module.main(["--tiny"])
    finally:
        sys.modules.pop(spec.name, None)


def _check(results: dict[str, dict[str, float]]) -> None:
    assert set(results) == {"lora_muon", "adamw", "pretrained"}
    for name in ("lora_muon", "adamw"):
        run = results[name]
        assert all(np.isfinite(v) for v in run.values()), (name, run)
        # Merging s·A⋅B into the kernels must not change what the model computes
        # (float32 reassociation only: 1e-4 relative on a mean of squares).
        np.testing.assert_allclose(run["eval_b_merged"], run["eval_b"], rtol=1e-4, err_msg=name)
    muon = results["lora_muon"]
    assert muon["train_last"] < muon["train_first"], muon
    assert muon["eval_b"] < results["pretrained"]["eval_b"], (muon, results["pretrained"])


def test_nnx_finetune_tiny(capsys: pytest.CaptureFixture[str]) -> None:
    _check(_run("nnx_finetune"))
    assert "| lora_muon |" in capsys.readouterr().out


def test_linen_finetune_tiny(capsys: pytest.CaptureFixture[str]) -> None:
    _check(_run("linen_finetune"))
    assert "| lora_muon |" in capsys.readouterr().out


@pytest.mark.filterwarnings(QWIX_WARNINGS[0])
@pytest.mark.filterwarnings(QWIX_WARNINGS[1])
@pytest.mark.filterwarnings(QWIX_WARNINGS[2])
def test_qwix_finetune_tiny(capsys: pytest.CaptureFixture[str]) -> None:
    _check(_run("qwix_finetune"))
    out = capsys.readouterr().out
    assert "qwix pair ['split']['kernel_lora_{a,b}']" in out and "| lora_muon |" in out
