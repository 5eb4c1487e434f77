"""Smoke test of the TinyShakespeare study (experiments/shakespeare.py) at a tiny size.

A synthetic, learnable corpus is written to ``tmp_path`` (no network, no shared data);
the study runs end to end through its CLI (LoRA-Muon and AdamW-on-factors on the
native low-rank model, two learning rates vmapped in one program; dense Muon is
covered by tests/test_baselines.py) and must write well-formed CSVs whose losses are
finite and decrease.
"""

from __future__ import annotations

import csv
import importlib.util
import math
import sys
from pathlib import Path

import pytest

_SCRIPT = Path(__file__).resolve().parent.parent / "experiments" / "shakespeare.py"


@pytest.fixture(scope="module")
def shakespeare():
    spec = importlib.util.spec_from_file_location("shakespeare_study", _SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["shakespeare_study"] = module
    spec.loader.exec_module(module)
    return module


def _corpus(path: Path) -> Path:
    lines = [
        "to be or not to be that is the question\n",
        "whether tis nobler in the mind to suffer\n",
        "the slings and arrows of outrageous fortune\n",
    ]
    path.write_text("".join(lines[i % 3] for i in range(120)), encoding="utf-8")
    return path


def test_tiny_study_writes_table_and_csv(shakespeare, tmp_path: Path, capsys) -> None:
    data = _corpus(tmp_path / "tiny.txt")
    out = tmp_path / "results" / "smoke"
    steps, lrs = 30, (0.1, 0.3)
    results = shakespeare.main(
        [
            "--data", str(data),
            "--sweep", "lr_rank",
            "--ranks", "2,dense",
            "--optimizers", "lora_muon,adamw_factors",
            "--lrs", ",".join(map(str, lrs)),
            "--adamw-lrs", "0.01",
            "--steps", str(steps),
            "--batch", "8",
            "--seq-len", "16",
            "--width", "16",
            "--depth", "1",
            "--seeds", "0",
            "--eval-every", "10",
            "--out", str(out),
            "--no-progress",
        ]
    )  # fmt: skip
    printed = capsys.readouterr().out
    for name in ("lora_muon", "adamw_factors", "best lr"):
        assert name in printed

    with (tmp_path / "results" / "smoke_final.csv").open(newline="") as f:
        final = list(csv.DictReader(f))
    assert list(final[0].keys()) == shakespeare.FINAL_FIELDS
    # lora_muon: 2 learning rates in one program; adamw_factors: 1; the dense model
    # gets no run (neither optimizer is a dense one).
    assert sorted((r["optimizer"], r["model"], r["lr"]) for r in final) == sorted(
        [("lora_muon", "rank2", str(lr)) for lr in lrs] + [("adamw_factors", "rank2", "0.01")]
    )
    for r in final:
        assert int(r["tokens"]) == steps * 8 * 16
        assert math.isfinite(float(r["final_val_loss"]))

    with (tmp_path / "results" / "smoke_curves.csv").open(newline="") as f:
        curves = list(csv.DictReader(f))
    assert {int(r["step"]) for r in curves} == {10, 20, 30}

    # Losses decrease: from ln(vocab) at init to well below it, for every run.
    for res in results:
        vocab = res.spec.model.vocab_size
        train = res.train_curves
        assert train.shape[-1] == steps
        assert (train[..., 0] > 0.8 * math.log(vocab)).all()
        assert (train[..., -5:].mean(axis=-1) < train[..., :5].mean(axis=-1) - 0.3).all()
        assert (res.val_curves[..., -1] < res.val_curves[..., 0]).all()


def test_sweep_specs_cover_the_grid(shakespeare) -> None:
    study = shakespeare.StudyConfig(steps=10, seeds=(0, 1, 2))
    specs = shakespeare.sweep_specs(
        "rescale", study, 65, ranks=[8], optimizers=["lora_muon", "spectron"], lrs=None
    )
    assert [s.optimizer for s in specs] == ["lora_muon", "spectron"]
    assert specs[0].rescales == (1.0, 3.0, 9.0, 27.0)
    assert len(specs[0].members) == 12  # 4 rescalings × 3 seeds, one compiled program
    lr_rank = shakespeare.sweep_specs(
        "lr_rank", study, 65, ranks=[1, None], optimizers=["lora_muon", "muon"], lrs=None
    )
    assert [(s.optimizer, s.model.kind) for s in lr_rank] == [
        ("lora_muon", "rank1"),
        ("muon", "dense"),
    ]
    assert lr_rank[0].lrs == shakespeare.SPECTRAL_LRS


def test_rescaled_init_has_the_same_weights(shakespeare) -> None:
    import jax
    import numpy as np

    cfg = shakespeare.ModelConfig(vocab_size=11, width=16, depth=1, seq_len=8, rank=4)
    p1 = shakespeare.init_params(jax.random.key(0), cfg, 1.0)
    p9 = shakespeare.init_params(jax.random.key(0), cfg, 9.0)
    for name in ("q", "k", "v", "o"):
        w1 = p1["blocks"][0]["attn"][name]
        w9 = p9["blocks"][0]["attn"][name]
        np.testing.assert_allclose(
            np.asarray(w9["lora_a"] @ w9["lora_b"]),
            np.asarray(w1["lora_a"] @ w1["lora_b"]),
            rtol=1e-5,
            atol=1e-6,
        )
        np.testing.assert_allclose(np.asarray(w9["lora_a"]), 9 * np.asarray(w1["lora_a"]), 1e-6)
