"""experiments/plots.py on hand-made CSVs whose answers are known.

The claim checks in docs/reproduction.md come from ``plots.claims``; here it reads
results written by hand (best η, paired differences and rescaling deltas computed
below from the same numbers), and ``main`` draws the figures without a display.
"""

from __future__ import annotations

import csv
import importlib.util
import re
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

_SCRIPT = Path(__file__).resolve().parent.parent / "experiments" / "plots.py"
_FIELDS = ["sweep", "optimizer", "model", "rank", "width", "depth", "rescale", "lr", "seed"]


@pytest.fixture(scope="module")
def plots():
    spec = importlib.util.spec_from_file_location("shakespeare_plots", _SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["shakespeare_plots"] = module
    spec.loader.exec_module(module)
    return module


def _write(path: Path, rows: list[dict[str, object]], extra: list[str]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=_FIELDS + extra)
        writer.writeheader()
        writer.writerows(rows)


def _row(sweep: str, opt: str, rank: int | None, lr: float, seed: int, **kw: object) -> dict:
    return {
        "sweep": sweep,
        "optimizer": opt,
        "model": "dense" if rank is None else f"rank{rank}",
        "rank": "" if rank is None else rank,
        "width": 128,
        "depth": 2,
        "rescale": kw.pop("rescale", 1.0),
        "lr": lr,
        "seed": seed,
        **kw,
    }


# (optimizer, rank, lr) -> loss per seed. Best η: rank 2 at 0.1; rank 32 and dense
# at 0.0316. Rank 32 vs dense at their best: +0.10 (seed 0), +0.07 (seed 1).
_LOSSES = {
    ("lora_muon", 2, 0.0316): (2.50, 2.52),
    ("lora_muon", 2, 0.1): (2.40, 2.42),
    ("lora_muon", 2, 0.316): (2.60, 2.61),
    ("lora_muon", 32, 0.0316): (2.30, 2.32),
    ("lora_muon", 32, 0.1): (2.35, 2.36),
    ("muon", None, 0.0316): (2.20, 2.25),
    ("muon", None, 0.1): (2.40, 2.41),
}
# (optimizer, c) -> final loss per seed.
_RESCALE = {
    ("lora_muon", 1.0): (2.4000, 2.4100),
    ("lora_muon", 9.0): (2.4001, 2.4099),
    ("spectron", 1.0): (2.4000, 2.4100),
    ("spectron", 9.0): (2.4300, 2.4200),
}


def _results(tmp_path: Path) -> Path:
    results = tmp_path / "results"
    results.mkdir()
    final = [
        _row("lr_rank", opt, rank, lr, seed, final_val_loss=v)
        for (opt, rank, lr), vals in _LOSSES.items()
        for seed, v in enumerate(vals)
    ]
    # Split over two files, as sweeps run in parts are: both must be read.
    _write(results / "lr_rank_final.csv", final[:6], ["final_val_loss"])
    _write(results / "lr_rank_b_final.csv", final[6:], ["final_val_loss"])
    rescale = [
        _row("rescale", opt, 8, 0.1, seed, rescale=c, final_val_loss=v)
        for (opt, c), vals in _RESCALE.items()
        for seed, v in enumerate(vals)
    ]
    _write(results / "rescale_final.csv", rescale, ["final_val_loss"])
    curves = [
        _row("rescale", opt, 8, 0.1, seed, rescale=c, step=step, val_loss=v + 1.0 / step)
        for (opt, c), vals in _RESCALE.items()
        for seed, v in enumerate(vals)
        for step in (50, 100)
    ]
    _write(results / "rescale_curves.csv", curves, ["step", "val_loss"])
    return results


def test_claims_match_hand_computed_answers(plots, tmp_path: Path) -> None:
    text = plots.claims(_results(tmp_path))
    best = dict(re.findall(r"^\| (\w+) \| (?:lora_muon|muon) \| ([\d.]+) \|", text, re.M))
    assert best == {"2": "0.1", "32": "0.0316", "dense": "0.0316"}
    assert "at ranks ≥ 2: ['32'] of ['2', '32']" in text
    seed_mean_32 = (2.30 + 2.32) / 2
    seed_mean_dense = (2.20 + 2.25) / 2
    assert f"Rank-32 LoRA-Muon {seed_mean_32:.4f} vs dense Muon {seed_mean_dense:.4f}" in text
    paired = ((2.30 - 2.20) + (2.32 - 2.25)) / 2
    assert f"mean difference {paired:+.4f}, rank 32 lower on 0 of 2" in text
    for opt in ("lora_muon", "spectron"):
        (b0, b1), (c0, c1) = _RESCALE[(opt, 1.0)], _RESCALE[(opt, 9.0)]
        change = ((c0 - b0) + (c1 - b1)) / 2
        assert f"| {opt} | 9 | 2 | {(c0 + c1) / 2:.5f} | {change:+.2e} |" in text
    # No 1000-step runs here: no section for them.
    assert "1000 steps" not in text


def test_main_draws_the_figures(plots, tmp_path: Path, capsys) -> None:
    results = _results(tmp_path)
    plots.main(["--results", str(results)])
    printed = capsys.readouterr().out
    for name in ("lr_transfer.png", "width_depth.png", "rescale.png"):
        assert (results / name).stat().st_size > 10_000
        assert f"wrote {results / name}" in printed
    assert not (results / "lr_transfer_1000.png").exists()
