"""``experiments/finetune_study.py`` end to end at ``--tiny`` size: the pretrained base is a real
HF checkpoint (``transformers`` loads it with our logits), every optimizer's learning rate is
bracketed by its grid, the outputs exist, and a second run of the same command resumes
(reruns nothing, same summary)."""

from __future__ import annotations

import csv
import json
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from tests import hf_fixtures as fx

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
pytestmark = pytest.mark.skipif(not DATA.exists(), reason=f"needs {DATA}")


def _study(out: pathlib.Path) -> str:
    result = subprocess.run(
        [
            *(sys.executable, "experiments/finetune_study.py", "--tiny", "--data", str(DATA)),
            *("--out", str(out), "--timing-rounds", "3"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=900,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_tiny_study_runs_brackets_and_resumes(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "study"
    first = _study(out)
    for name in ("summary.csv", "curves.csv", "grid.csv", "timing.csv", "study.png"):
        assert (out / name).stat().st_size > 0, name
    rows = list(csv.DictReader((out / "summary.csv").read_text().splitlines()))
    assert [r["optimizer"] for r in rows] == ["lora_muon", "adamw", "loraplus"]
    grid = list(csv.DictReader((out / "grid.csv").read_text().splitlines()))
    for row in rows:
        lrs = sorted(float(g["lr"]) for g in grid if g["optimizer"] == row["optimizer"])
        best = float(row["lr"])
        # bracketed: a grid point on each side of the optimum, or the grid grew 3 times
        assert lrs[0] < best < lrs[-1] or len(lrs) >= 7, (row["optimizer"], lrs, best)
        assert np.isfinite(float(row["test_mean"]))
    ratios = {r["optimizer"]: float(r["step_time_ratio_vs_adamw"]) for r in rows}
    assert ratios["adamw"] == 1.0 and all(v > 0 for v in ratios.values())

    # The base is an HF checkpoint: transformers computes our logits from it.
    from lora_muon_jax.hf import load_pretrained

    tokens = fx.tokens(length=16) % 256
    ours = np.asarray(load_pretrained(out / "base")(jnp.asarray(tokens))[0])
    np.testing.assert_allclose(fx.torch_logits(out / "base", tokens), ours, rtol=0, atol=2e-5)

    runs = sorted(p.name for p in (out / "runs").iterdir())
    summary = (out / "summary.csv").read_text()
    second = _study(out)
    assert "pretraining" in first and "pretraining" not in second
    assert " seed=" in first and " seed=" not in second  # every run read back, none redone
    assert sorted(p.name for p in (out / "runs").iterdir()) == runs
    assert (out / "summary.csv").read_text() == summary
    record = json.loads(next((out / "runs").glob("r4_lora_muon_*_s0.json")).read_text())
    assert record["finite"] and len(record["curve"]) >= 2
