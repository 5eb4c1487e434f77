"""The claims study's verdicts from its CSVs (``experiments/results/claims/*_final.csv``).

Run (after pieces of ``experiments/claims_pieces.py``; also called by ``plots.py``):

    .venv/bin/python experiments/claims_analysis.py

Writes ``experiments/results/claims/claims_study.md`` (the tables below) and
``attention.png`` (largest attention logit, attention entropy, largest ‖W_q‖₂ and ‖W_k‖₂
vs η, dense Muon against LoRA-Muon per rank, one column per arm), from whatever
pieces exist.

* **Claim 1, LR transfer** (per arm): each rank's seed-mean final validation loss vs η,
  its best grid η and the *interpolated* optimum η* (a parabola in log η through the
  best grid point and its neighbours; at a grid edge the edge, marked), and η* over
  dense Muon's. Tolerance: the ratio within ×10^±0.25 (one step of the ×1.78 grid)
  counts as "transfers".
* **Claim 2, rank 32 vs dense** (per arm, per definition of compute matching): the
  difference rank 32 − dense of final validation loss paired by seed, each model at its
  own best seed-mean η, with a 95 % Student-t interval. Verdict: "rank 32 better" when
  the interval lies below 0, "dense better" above 0, "tie" when it holds 0. The η are
  chosen on the same seeds the interval uses, so it is somewhat optimistic for both
  models; an η at the edge of its run's η set is marked (the optimum may lie outside).
  Only η values run for every seed of their model count (a half-finished set cannot win).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import math
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "claims"
TRANSFER_TOLERANCE_DECADES = 0.25  # |log10(η*_rank / η*_dense)| within one ×1.78 grid step


def read_all(results: Path) -> list[dict[str, str]]:
    """Every finished piece's rows, each run once per family (``lrrank``, ``claim2``, ``panel``).

    A run (arm, model, η, seed, steps, width, depth) held by two pieces of one family (a
    re-planned grid) counts once: the first piece in name order.
    """
    rows: list[dict[str, str]] = []
    seen: set[tuple[str, ...]] = set()
    for path in sorted(results.glob("*_final.csv")):
        piece = path.name[: -len("_final.csv")]
        with path.open(newline="") as f:
            for row in csv.DictReader(f):
                fields = ("arch", "model", "lr", "seed", "steps", "width", "depth")
                key = (piece.split("-")[0], *(row[k] for k in fields))
                if key not in seen:
                    seen.add(key)
                    rows.append({**row, "piece": piece})
    return rows


# ------------------------------------------------------------------ statistics


def _t_pdf(t: float, df: float) -> float:
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return math.exp(log_c - (df + 1) / 2 * math.log1p(t * t / df))


def _t_cdf(x: float, df: float, n: int = 4000) -> float:
    """P(T <= x) for x >= 0 by Simpson's rule on the density (n even)."""
    h = x / n
    inner = sum((4 if i % 2 else 2) * _t_pdf(i * h, df) for i in range(1, n))
    return 0.5 + h / 3 * (_t_pdf(0.0, df) + inner + _t_pdf(x, df))


def t_quantile(p: float, df: float) -> float:
    """The p-quantile (p > 1/2) of Student's t with ``df`` degrees of freedom (bisection)."""
    if not 0.5 < p < 1:
        raise ValueError(f"p must lie in (0.5, 1), got {p}")
    lo, hi = 0.0, 1.0
    while _t_cdf(hi, df) < p:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


def paired_interval(diffs: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high) of the mean of ``diffs`` with a Student-t interval (n >= 2)."""
    n = len(diffs)
    if n < 2:
        raise ValueError(f"a paired interval needs >= 2 differences, got {n}")
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = t_quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def interpolated_optimum(curve: Sequence[tuple[float, float]]) -> tuple[float, float, bool]:
    """(η*, loss*, interior) from a parabola in log η through the best point and neighbours."""
    finite = sorted((lr, v) for lr, v in curve if math.isfinite(v))
    i = min(range(len(finite)), key=lambda k: finite[k][1])
    if i == 0 or i == len(finite) - 1:
        return finite[i][0], finite[i][1], False
    (x0, y0), (x1, y1), (x2, y2) = ((math.log(lr), v) for lr, v in finite[i - 1 : i + 2])
    denom = (x0 - x1) * (x0 - x2) * (x1 - x2)
    a = (x2 * (y1 - y0) + x1 * (y0 - y2) + x0 * (y2 - y1)) / denom
    b = (x2 * x2 * (y0 - y1) + x1 * x1 * (y2 - y0) + x0 * x0 * (y1 - y2)) / denom
    if not a > 0:  # three equal (or concave) points: no parabola minimum, keep the grid point
        return finite[i][0], finite[i][1], False
    c = y1 - a * x1 * x1 - b * x1
    x = -b / (2 * a)
    return math.exp(x), a * x * x + b * x + c, True


# ---------------------------------------------------------------------- claims


def rank_of(row: dict[str, str]) -> str:
    """A run's rank as a string, ``"dense"`` for the dense model (the tables' key)."""
    return "dense" if row["model"] == "dense" else row["rank"]


def rank_order(rank: str) -> float:
    """Sort key of ``rank_of``: ranks ascending, dense last."""
    return math.inf if rank == "dense" else float(rank)


def _common_seeds(rows: list[dict[str, str]]) -> dict[str, set[str]]:
    """Per rank, the seeds run at every one of its η (a curve compares equal seed sets)."""
    seeds: dict[tuple[str, float], set[str]] = defaultdict(set)
    for r in rows:
        seeds[rank_of(r), float(r["lr"])].add(r["seed"])
    common: dict[str, set[str]] = {}
    for (rank, _), s in seeds.items():
        common[rank] = common[rank] & s if rank in common else set(s)
    return common


def _curves(
    rows: list[dict[str, str]], common: dict[str, set[str]] | None = None
) -> dict[str, list[tuple[float, float]]]:
    """Per rank, the mean final validation loss per η over the rank's common seeds."""
    common = _common_seeds(rows) if common is None else common
    groups: dict[tuple[str, float], list[float]] = defaultdict(list)
    for r in rows:
        if r["seed"] in common[rank_of(r)]:
            groups[rank_of(r), float(r["lr"])].append(float(r["final_val_loss"]))
    curves: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for (rank, lr), values in groups.items():
        curves[rank].append((lr, sum(values) / len(values)))
    return {k: sorted(v) for k, v in curves.items()}


def lr_transfer_table(rows: list[dict[str, str]], arch: str) -> list[str]:
    grid = [r for r in rows if r["piece"].startswith(f"lrrank-{arch}-")]
    return transfer_table(grid, f"Claim 1, arm `{arch}`")


def panel_runs(rows: list[dict[str, str]]) -> dict[tuple[int, int], list[dict[str, str]]]:
    """Runs per (width, depth) on the panel arm: the panel pieces, and the LR × rank grid's
    runs of the panel ranks and η as the (128, 2) panel. Empty until a panel piece exists."""
    arch = "qknorm"
    ranks = {"dense" if k is None else str(k) for k in _PIECES.PANEL_RANKS}
    panels: dict[tuple[int, int], list[dict[str, str]]] = defaultdict(list)
    for r in rows:
        in_grid = (
            r["piece"].startswith(f"lrrank-{arch}-")
            and rank_of(r) in ranks
            and _is_one_of(r["lr"], _PIECES.PANEL_LRS)
        )
        if in_grid or r["piece"].startswith(f"panel-{arch}-"):
            panels[int(r.get("width", 128)), int(r.get("depth", 2))].append(r)
    return dict(panels) if len(panels) > 1 else {}


def panel_tables(rows: list[dict[str, str]]) -> list[str]:
    """Claim 1 per width × depth (``panel_runs``), one ``transfer_table`` each."""
    panels = panel_runs(rows)
    lines = []
    for width, depth in sorted(panels):
        lines += transfer_table(panels[width, depth], f"Panel width {width}, depth {depth}")
    return lines


def transfer_results(grid: list[dict[str, str]]) -> list[dict[str, object]]:
    """Per rank (dense last): seeds, η points, best grid η, η*, loss at η*, ratio, verdict.

    The verdict is "yes"/"no" (ratio within the tolerance or not) only where both the
    rank's and dense's optimum are interior; at a grid edge it is "undecided (edge)".
    """
    common = _common_seeds(grid)
    curves = _curves(grid, common)
    dense = interpolated_optimum(curves["dense"]) if "dense" in curves else None
    out: list[dict[str, object]] = []
    for rank in sorted(curves, key=rank_order):
        curve = curves[rank]
        eta, loss, interior = interpolated_optimum(curve)
        ratio, verdict = None, ""
        if dense is not None and rank != "dense":
            ratio = eta / dense[0]
            ok = abs(math.log10(ratio)) <= TRANSFER_TOLERANCE_DECADES
            verdict = ("yes" if ok else "no") if interior and dense[2] else "undecided (edge)"
        out.append({
            "rank": rank, "seeds": len(common[rank]),
            "points": len(curve), "best": min((v, lr) for lr, v in curve if math.isfinite(v))[1],
            "eta": eta, "loss": loss, "interior": interior, "ratio": ratio, "verdict": verdict,
        })  # fmt: skip
    return out


def transfer_table(grid: list[dict[str, str]], title: str) -> list[str]:
    """``transfer_results`` as a markdown table under ``title``."""
    results = transfer_results(grid)
    if not results:
        return []
    steps = sorted({int(r["steps"]) for r in grid})
    lines = [
        f"\n**{title}** ({'/'.join(map(str, steps))} steps; η* interpolated; tolerance ×10^±"
        f"{TRANSFER_TOLERANCE_DECADES}):\n",
        "| rank | seeds | η points | best grid η | η* | loss at η* | η* / dense η* | transfers |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for t in results:
        mark = "" if t["interior"] else " (edge)"
        ratio = "" if t["ratio"] is None else f"{t['ratio']:.2f}"
        lines.append(
            f"| {t['rank']} | {t['seeds']} | {t['points']} | {t['best']:g} | "
            f"{t['eta']:.3g}{mark} | {t['loss']:.4f} | {ratio} | {t['verdict']} |"
        )
    return lines


def _pieces_module():
    spec = importlib.util.spec_from_file_location(
        "claims_analysis_pieces", Path(__file__).resolve().parent / "claims_pieces.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


_PIECES = _pieces_module()


def _is_one_of(lr: str, values: Sequence[float]) -> bool:
    return any(math.isclose(float(lr), v, rel_tol=1e-9) for v in values)


def claim2_runs(
    rows: list[dict[str, str]], arch: str
) -> dict[tuple[str, int], list[dict[str, str]]]:
    """Claim 2's runs per (model, steps): its own pieces, and at equal steps the LR × rank
    grid's rank-32 and dense runs at the claim's η (seeds 0-2 run there, not twice)."""
    runs: dict[tuple[str, int], list[dict[str, str]]] = defaultdict(list)
    seen: set[tuple[str, ...]] = set()
    grid = [
        r
        for r in rows
        if r["piece"].startswith(f"lrrank-{arch}-")
        and rank_of(r) in ("32", "dense")
        and int(r["steps"]) == _PIECES.STEPS
        and _is_one_of(r["lr"], _PIECES.CLAIM2_LRS)
    ]
    for r in [r for r in rows if r["piece"].startswith(f"claim2-{arch}-")] + grid:
        key = (rank_of(r), f"{float(r['lr']):g}", r["seed"], r["steps"])
        if key not in seen:
            seen.add(key)
            runs[rank_of(r), int(r["steps"])].append(r)
    return runs


def claim2_results(rows: list[dict[str, str]], arch: str) -> list[dict[str, object]]:
    """Per dense run length: the definition, shared seeds, each model's mean and η, the
    paired difference rank 32 − dense with its 95 % interval, and the verdict."""
    runs = claim2_runs(rows, arch)
    low = [k for k in runs if k[0] == "32"]
    if not low:
        return []
    low_key = low[0]

    def best(rs: list[dict[str, str]]) -> tuple[str, dict[str, float]]:
        by_lr: dict[float, dict[str, float]] = defaultdict(dict)
        for r in rs:
            by_lr[float(r["lr"])][r["seed"]] = float(r["final_val_loss"])
        most = max(len(v) for v in by_lr.values())
        full = [lr for lr, v in by_lr.items() if len(v) == most]
        lr = min(full, key=lambda k: sum(by_lr[k].values()) / len(by_lr[k]))
        edge = " at edge" if len(by_lr) > 1 and lr in (min(by_lr), max(by_lr)) else ""
        return f"{lr:g}{edge}", by_lr[lr]

    lr_low, low_seeds = best(runs[low_key])
    out: list[dict[str, object]] = []
    for rank, steps in sorted(k for k in runs if k[0] == "dense"):
        lr_dense, dense_seeds = best(runs[rank, steps])
        names = {r["piece"] for r in runs[rank, steps]}
        if steps == low_key[1]:
            label = "equal steps"
        elif any("-flops-ns-" in n for n in names):
            label = "equal FLOPs, optimizers' counted"
        else:
            label = "equal FLOPs, model only"
        shared = sorted(set(low_seeds) & set(dense_seeds), key=int)
        if len(shared) < 2:
            continue
        mean, lo, hi = paired_interval([low_seeds[s] - dense_seeds[s] for s in shared])
        out.append({
            "low_steps": low_key[1], "steps": steps, "label": label, "seeds": len(shared),
            "low": sum(low_seeds[s] for s in shared) / len(shared), "lr_low": lr_low,
            "dense": sum(dense_seeds[s] for s in shared) / len(shared), "lr_dense": lr_dense,
            "mean": mean, "lo": lo, "hi": hi,
            "verdict": "rank 32 better" if hi < 0 else "dense better" if lo > 0 else "tie",
        })  # fmt: skip
    return out


def claim2_table(rows: list[dict[str, str]], arch: str) -> list[str]:
    """``claim2_results`` as a markdown table."""
    results = claim2_results(rows, arch)
    if not results:
        return []
    lines = [
        f"\n**Claim 2, arm `{arch}`** (rank-32 LoRA-Muon at {results[0]['low_steps']} steps − "
        "dense Muon; paired by seed, each at its best seed-mean η, 95 % t interval):\n",
        "| dense steps (definition) | seeds | rank 32 | dense | difference [95 % CI] | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for c in results:
        lines.append(
            f"| {c['steps']} ({c['label']}) | {c['seeds']} | {c['low']:.4f} (η {c['lr_low']}) | "
            f"{c['dense']:.4f} (η {c['lr_dense']}) | "
            f"{c['mean']:+.4f} [{c['lo']:+.4f}, {c['hi']:+.4f}] | {c['verdict']} |"
        )
    return lines


def _by_verdict(results: list[dict[str, object]]) -> str:
    """ "transfers at ranks 2, 8; not at 32; undecided at 1" (empty parts left out; the
    first part says "rank" or "ranks")."""
    parts = []
    for verdict, label in (
        ("yes", "transfers at"),
        ("no", "not at"),
        ("undecided (edge)", "undecided at"),
    ):
        ranks = [str(t["rank"]) for t in results if t["verdict"] == verdict]
        if ranks:
            noun = "" if parts else ("ranks " if len(ranks) > 1 else "rank ")
            parts.append(f"{label} {noun}{', '.join(ranks)}")
    return "; ".join(parts)


def summary(rows: list[dict[str, str]], results: Path) -> list[str]:
    """One markdown table: each claim's verdict per arm and definition, with how many of
    the pieces its runs come from (``claims_pieces.plan()``) are done, so a partial study
    reads as partial."""
    plan = _PIECES.plan()

    def done(pieces: list) -> str:
        return f"{sum(_PIECES.is_done(p, results) for p in pieces)} of {len(pieces)}"

    def named(prefix: str) -> list:
        return [p for p in plan if p.name.startswith(prefix)]

    lines = [
        "| claim | arm | compute matched by | verdict | measured | pieces done |",
        "|---|---|---|---|---|---|",
    ]
    for arch in ("qknorm", "base"):
        grid = [r for r in rows if r["piece"].startswith(f"lrrank-{arch}-")]
        everyone = transfer_results(grid)
        ranks = [t for t in everyone if t["rank"] != "dense"]
        decided = any(t["verdict"] in ("yes", "no") for t in ranks)
        verdict = _by_verdict(ranks) if decided else ("undecided" if ranks else "not run")
        measured = "; ".join(
            ("dense" if t["rank"] == "dense" else f"r{t['rank']}")
            + f" η* {t['eta']:.3g}"
            + ("" if t["interior"] else " (edge)")
            + ("" if t["ratio"] is None else f" = {t['ratio']:.2f}× dense")
            for t in everyone
        )
        lines.append(
            f"| 1: best η equal across ranks and dense | {arch} | steps (1000) | {verdict} | "
            f"{measured or '—'} | {done(named(f'lrrank-{arch}-'))} |"
        )
        if arch == "qknorm":
            panels = {k: transfer_results(v) for k, v in panel_runs(rows).items()}
            measured = "; ".join(
                f"w{w} d{d}: " + (_by_verdict(panels[w, d]) or "no rank decided")
                for w, d in sorted(panels)
            )
            lines.append(
                f"| 1: the same across width 64/128, depth 1/2/4 | {arch} | steps (1000) | "
                f"{'see panels' if panels else 'not run'} | {measured or '—'} | "
                f"{done(named(f'panel-{arch}-'))} |"
            )
        claim2 = {c["label"]: c for c in claim2_results(rows, arch)}
        # Rank 32 at 1000 steps (its claim-2 pieces and the grid's pieces at claim-2 η) is
        # one side of every definition; the dense side differs.
        grid_pieces = [
            p
            for p in named(f"lrrank-{arch}-")
            if p.rank in (32, None)
            and any(_is_one_of(f"{lr:g}", _PIECES.CLAIM2_LRS) for lr in p.lrs)
        ]
        low = [p for p in grid_pieces if p.rank == 32] + named(f"claim2-{arch}-r32-")
        dense_sides = {
            "equal steps": [p for p in grid_pieces if p.rank is None]
            + [p for p in named(f"claim2-{arch}-dense-") if p.steps == _PIECES.STEPS],
            "equal FLOPs, model only": [
                p for p in named(f"claim2-{arch}-dense-flops-") if "-flops-ns-" not in p.name
            ],
            "equal FLOPs, optimizers' counted": named(f"claim2-{arch}-dense-flops-ns-"),
        }
        for label, dense_pieces in dense_sides.items():
            c = claim2.get(label)
            measured = (
                "—"
                if c is None
                else f"{c['mean']:+.4f} [{c['lo']:+.4f}, {c['hi']:+.4f}], {c['seeds']} seeds, "
                f"dense {c['steps']} steps"
            )
            lines.append(
                f"| 2: rank-32 LoRA-Muon ≤ dense Muon | {arch} | {label} | "
                f"{'not run' if c is None else c['verdict']} | {measured} | "
                f"{done(low + dense_pieces)} |"
            )
    return lines


BLOCK_START = "<!-- claims-study table: written by experiments/plots.py from the CSVs -->"
BLOCK_END = "<!-- /claims-study table -->"


def _block_span(text: str) -> tuple[int, int]:
    """Where the block's lines start and end in ``text`` (between the two markers)."""
    return text.index(BLOCK_START) + len(BLOCK_START), text.index(BLOCK_END)


def write_block(path: Path, table: Sequence[str]) -> bool:
    """Replace the lines between ``BLOCK_START`` and ``BLOCK_END`` in ``path``; True if changed."""
    text = path.read_text(encoding="utf-8")
    start, end = _block_span(text)
    new = text[:start] + "\n" + "\n".join(table) + "\n" + text[end:]
    if new != text:
        path.write_text(new, encoding="utf-8")
    return new != text


def read_block(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    start, end = _block_span(text)
    return text[start:end].strip("\n").splitlines()


def report(results: Path) -> str:
    rows = read_all(results)
    if not rows:
        return f"no claims-study CSVs under {results} yet"
    lines = [f"Claims study: {len({r['piece'] for r in rows})} finished pieces ({results})."]
    for arch in ("qknorm", "base"):
        lines += lr_transfer_table(rows, arch) + claim2_table(rows, arch)
    return "\n".join(lines + panel_tables(rows))


def plot_attention(results: Path) -> Path | None:
    """Largest attention logit and entropy vs η (seed means), dense vs each rank, per arm."""
    rows = [r for r in read_all(results) if r["piece"].startswith("lrrank-") and r.get("max_logit")]
    arches = [a for a in ("qknorm", "base") if any(r["arch"] == a for r in rows)]
    if not arches:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (
        ("max_logit", "largest attention logit"),
        ("attn_entropy", "attention entropy (nats)"),
        ("wq_norm", "largest ‖W_q‖₂"),
        ("wk_norm", "largest ‖W_k‖₂"),
    )
    fig, axes = plt.subplots(
        len(panels), len(arches), figsize=(5 * len(arches), 3.2 * len(panels)), squeeze=False
    )
    for col, arch in enumerate(arches):
        sub = [r for r in rows if r["arch"] == arch]
        for row_i, (field, label) in enumerate(panels):
            ax = axes[row_i][col]
            groups: dict[tuple[str, float], list[float]] = defaultdict(list)
            for r in sub:
                groups[rank_of(r), float(r["lr"])].append(float(r[field]))
            for rank in sorted({k[0] for k in groups}, key=rank_order):
                pts = sorted((lr, sum(v) / len(v)) for (rk, lr), v in groups.items() if rk == rank)
                xs, ys = zip(*pts, strict=True)
                style = "k--s" if rank == "dense" else "-o"
                ax.plot(
                    xs,
                    ys,
                    style,
                    markersize=4,
                    label="dense Muon" if rank == "dense" else f"r={rank}",
                )
            ax.set_xscale("log")
            ax.set_xlabel("learning rate η")
            ax.set_ylabel(label)
            ax.set_title(f"arm {arch}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    out = results / "attention.png"
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument(
        "--docs", nargs="*", default=[], help="markdown files whose claims-study block to rewrite"
    )
    args = p.parse_args(argv)
    results = Path(args.results)
    table = summary(read_all(results), results) if args.docs else []
    for doc in args.docs:
        if write_block(Path(doc), table):
            print(f"wrote the claims-study table in {doc}")
    text = report(results)
    print(text)
    if results.exists():
        (results / "claims_study.md").write_text(text + "\n", encoding="utf-8")
        figure = plot_attention(results)
        if figure is not None:
            print(f"wrote {figure}")


if __name__ == "__main__":
    main()
