"""Plots and claim checks for the TinyShakespeare study (reads experiments/results/*.csv).

Run (CPU, ~5 s, after the sweeps of experiments/shakespeare.py):

    .venv/bin/python experiments/plots.py

Writes ``experiments/results/lr_transfer.png`` (validation loss vs learning rate, one
curve per rank, dense Muon dashed; ``lr_transfer_1000.png`` the same for the 1000-step
``long1000*`` runs), ``width_depth.png`` (the same per width and per
depth), ``rescale.png`` (validation curves under factor rescaling ×1, ×3, ×9, ×27 for
LoRA-Muon and Spectron), and prints the issue's claims measured on the CSVs (best
learning rate per rank, rank-32 vs dense, rescaling deltas) as markdown; see
docs/reproduction.md for the measured output. Where ``results/claims/`` exists (the
claims study, ``claims_pieces.py``) it also runs ``claims_analysis.py`` on it.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import math
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import matplotlib.ticker

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent


def _load_analysis():
    spec = importlib.util.spec_from_file_location(
        "claims_analysis", Path(__file__).resolve().parent / "claims_analysis.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


analysis = _load_analysis()  # the claims study's verdicts; also its rank key and order
_key_rank, _rank_order = analysis.rank_of, analysis.rank_order


def read_rows(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def read_sweep(results: Path, sweep: str) -> list[dict[str, str]]:
    """All ``<sweep>*_final.csv`` files (a sweep may be split over several runs)."""
    rows: list[dict[str, str]] = []
    for path in sorted(results.glob(f"{sweep}*_final.csv")):
        rows += read_rows(path)
    return rows


def seed_mean(rows: Iterable[dict[str, str]], keys: tuple[str, ...]) -> dict[tuple, float]:
    """Mean final validation loss over seeds, grouped by ``keys`` (+ "rank_or_dense")."""
    groups: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        k = tuple(_key_rank(r) if k == "rank" else r[k] for k in keys)
        groups[k].append(float(r["final_val_loss"]))
    return {k: sum(v) / len(v) for k, v in groups.items()}


def lr_curves(
    rows: list[dict[str, str]], optimizers: tuple[str, ...]
) -> dict[tuple[str, str], list[tuple[float, float]]]:
    """(optimizer, rank) -> sorted [(lr, seed-mean final val loss)]."""
    means = seed_mean(
        [r for r in rows if r["optimizer"] in optimizers], ("optimizer", "rank", "lr")
    )
    curves: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
    for (opt, rank, lr), v in means.items():
        curves[(opt, rank)].append((float(lr), v))
    return {k: sorted(v) for k, v in curves.items()}


def best_lr(curve: list[tuple[float, float]]) -> tuple[float, float]:
    finite = [(lr, v) for lr, v in curve if math.isfinite(v)]
    return min(finite, key=lambda t: t[1])


def _plot_lr(ax: plt.Axes, rows: list[dict[str, str]], title: str) -> None:
    curves = lr_curves(rows, ("lora_muon", "muon", "spectron", "adamw_factors"))
    ranks = sorted({rank for _, rank in curves}, key=_rank_order)
    cmap = plt.get_cmap("viridis")
    for i, rank in enumerate(ranks):
        for opt, style in (("lora_muon", "-o"), ("muon", "--s")):
            if (opt, rank) not in curves:
                continue
            lrs, vals = zip(*curves[(opt, rank)], strict=True)
            color = "black" if rank == "dense" else cmap(i / max(1, len(ranks) - 1))
            label = "dense Muon" if rank == "dense" else f"LoRA-Muon r={rank}"
            ax.plot(lrs, vals, style, color=color, label=label, markersize=4)
    ax.set_xscale("log")
    ticks = sorted({lr for c in curves.values() for lr, _ in c})
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("learning rate η (spectral radius on W)")
    ax.set_ylabel("final validation loss (nats/char)")
    ax.set_title(title)
    finite = [v for c in curves.values() for _, v in c if math.isfinite(v)]
    if finite:
        lo = min(finite)
        ax.set_ylim(lo - 0.05, min(max(finite), lo + 1.2))
    ax.axvline(0.1, color="gray", lw=0.5, ls=":")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


# Sweeps drawn as LR-transfer figures: (CSV prefix, figure name, title). The
# 1000-step runs are kept apart from the 200-step study (different budgets).
LR_SWEEPS = (
    ("lr_rank", "lr_transfer.png", "TinyShakespeare: LR transfer across ranks (w128, d2)"),
    ("long1000", "lr_transfer_1000.png", "TinyShakespeare, 1000 steps, 1 seed (w128, d2)"),
)


def plot_lr_transfer(results: Path, sweep: str, name: str, title: str) -> Path | None:
    rows = read_sweep(results, sweep)
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6, 4.5))
    _plot_lr(ax, rows, title)
    out = results / name
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_width_depth(results: Path) -> Path | None:
    base = [r for r in read_sweep(results, "lr_rank") if r["optimizer"] != "spectron"]
    panels: list[tuple[str, list[dict[str, str]]]] = []
    for sweep, field in (("width", "width"), ("depth", "depth")):
        rows = read_sweep(results, sweep)
        for value in sorted({r[field] for r in rows}, key=int):
            panels.append((f"{field} {value}", [r for r in rows if r[field] == value]))
    if base:
        panels.append(("width 128, depth 2 (main sweep)", base))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4), squeeze=False)
    for ax, (title, rows) in zip(axes[0], panels, strict=True):
        _plot_lr(ax, rows, title)
    out = results / "width_depth.png"
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def rescale_curves(rows: list[dict[str, str]]) -> dict[tuple[str, float], list[tuple[int, float]]]:
    groups: dict[tuple[str, float, int], list[float]] = defaultdict(list)
    for r in rows:
        groups[(r["optimizer"], float(r["rescale"]), int(r["step"]))].append(float(r["val_loss"]))
    curves: dict[tuple[str, float], list[tuple[int, float]]] = defaultdict(list)
    for (opt, c, step), v in groups.items():
        curves[(opt, c)].append((step, sum(v) / len(v)))
    return {k: sorted(v) for k, v in curves.items()}


def plot_rescale(results: Path) -> Path | None:
    rows = read_rows(results / "rescale_curves.csv")
    if not rows:
        return None
    curves = rescale_curves(rows)
    opts = [o for o in ("lora_muon", "spectron") if any(k[0] == o for k in curves)]
    fig, axes = plt.subplots(1, len(opts), figsize=(5 * len(opts), 4), squeeze=False, sharey=True)
    for ax, opt in zip(axes[0], opts, strict=True):
        for c in sorted({k[1] for k in curves if k[0] == opt}):
            steps, vals = zip(*curves[(opt, c)], strict=True)
            ax.plot(steps, vals, "-o", markersize=3, label=f"×{c:g}")
        ax.set_title({"lora_muon": "LoRA-Muon", "spectron": "Spectron"}[opt] + " under A→cA, B→B/c")
        ax.set_xlabel("step")
        ax.set_ylabel("validation loss (nats/char)")
        ax.grid(alpha=0.3)
        ax.legend(title="c")
    out = results / "rescale.png"
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def claims(results: Path) -> str:
    """The issue's claims, measured on the CSVs, as markdown lines."""
    lines = []
    for sweep, _, title in LR_SWEEPS:
        rows = read_sweep(results, sweep)
        if rows:
            lines.append(f"\n{title} (`{sweep}*_final.csv`):\n")
            lines += _lr_claims(rows)
    lines += _rescale_claims(results)
    return "\n".join(lines).lstrip("\n")


def _lr_claims(rows: list[dict[str, str]]) -> list[str]:
    """Best η per rank, its agreement with dense Muon's, rank 32 vs dense (paired)."""
    lines = []
    if rows:
        curves = lr_curves(rows, ("lora_muon", "muon"))
        dense = curves.get(("muon", "dense"))
        dense_best = best_lr(dense) if dense else None
        lines.append("| model | optimizer | best η | seed-mean val loss at best η |")
        lines.append("|---|---|---|---|")
        for (opt, rank), curve in sorted(curves.items(), key=lambda kv: _rank_order(kv[0][1])):
            lr, v = best_lr(curve)
            lines.append(f"| {rank} | {opt} | {lr:g} | {v:.4f} |")
        if dense_best:
            same = [
                rank
                for (opt, rank), c in curves.items()
                if opt == "lora_muon" and rank != "dense" and int(rank) >= 2
            ]
            agree = [
                rank for rank in same if best_lr(curves[("lora_muon", rank)])[0] == dense_best[0]
            ]
            lines.append(
                f"\nBest η equal to dense Muon's ({dense_best[0]:g}) at ranks ≥ 2: "
                f"{sorted(agree, key=int)} of {sorted(same, key=int)}."
            )
            if ("lora_muon", "32") in curves:
                r32 = best_lr(curves[("lora_muon", "32")])[1]
                lines.append(
                    f"Rank-32 LoRA-Muon {r32:.4f} vs dense Muon {dense_best[1]:.4f} "
                    f"(difference {r32 - dense_best[1]:+.4f}; claim: ≤ 0)."
                )
                lr32 = best_lr(curves[("lora_muon", "32")])[0]
                per_seed = {
                    (r["optimizer"], r["seed"]): float(r["final_val_loss"])
                    for r in rows
                    if (r["optimizer"], _key_rank(r), float(r["lr"]))
                    in (("lora_muon", "32", lr32), ("muon", "dense", dense_best[0]))
                }
                seeds = sorted(
                    {s for o, s in per_seed if o == "lora_muon"}
                    & {s for o, s in per_seed if o == "muon"}
                )
                if seeds:
                    diffs = [per_seed[("lora_muon", s)] - per_seed[("muon", s)] for s in seeds]
                    lines.append(
                        f"Paired over the {len(seeds)} seeds run for both at their best η: "
                        f"mean difference {sum(diffs) / len(diffs):+.4f}, "
                        f"rank 32 lower on {sum(d <= 0 for d in diffs)} of {len(seeds)}."
                    )
    return lines


def _rescale_claims(results: Path) -> list[str]:
    """Final-loss change under factor rescaling, paired by seed against c = 1."""
    lines = []
    rs = read_sweep(results, "rescale")
    if rs:
        # Paired by seed: each seed's change against its own c = 1 run, then the mean.
        base = {
            (r["optimizer"], r["seed"]): float(r["final_val_loss"])
            for r in rs
            if float(r["rescale"]) == 1.0
        }
        groups: dict[tuple[str, float], list[tuple[float, float]]] = defaultdict(list)
        for r in rs:
            key = (r["optimizer"], r["seed"])
            if key in base:
                v = float(r["final_val_loss"])
                groups[(r["optimizer"], float(r["rescale"]))].append((v, v - base[key]))
        lines.append(
            "\n| optimizer | c | seeds | seed-mean final val loss | paired change vs c = 1 |"
        )
        lines.append("|---|---|---|---|---|")
        for (opt, c), vals in sorted(groups.items()):
            mean_v = sum(v for v, _ in vals) / len(vals)
            mean_d = sum(d for _, d in vals) / len(vals)
            lines.append(f"| {opt} | {c:g} | {len(vals)} | {mean_v:.5f} | {mean_d:+.2e} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="plots for experiments/shakespeare.py")
    p.add_argument("--results", default=str(RESULTS))
    args = p.parse_args(argv)
    results = Path(args.results)
    figures = [plot_lr_transfer(results, *sweep) for sweep in LR_SWEEPS]
    for out in (*figures, plot_width_depth(results), plot_rescale(results)):
        if out is not None:
            print(f"wrote {out}")
    print(claims(results))
    if (results / "claims").is_dir():  # the claims study (experiments/claims_pieces.py)
        # The committed results also rewrite the claims table in README.md and the docs.
        docs = [str(ROOT / "README.md"), str(ROOT / "docs" / "reproduction.md")]
        committed = results.resolve() == RESULTS.resolve()
        analysis.main(
            ["--results", str(results / "claims"), "--docs", *(docs if committed else [])]
        )


if __name__ == "__main__":
    main()
