"""The claims study (docs/reproduction.md, "The claims study") as resumable pieces.

Each piece is one ``experiments/shakespeare.py`` run with its own CSV prefix under
``experiments/results/claims/``; a piece whose ``<prefix>_final.csv`` exists is done and
skipped (the CSV is renamed into place only when the piece finishes). Pieces are sized
to at most ``--budget-min`` minutes (default 60) on the 2-core CPU this project runs on,
from a measured cost per token and configuration; on a GPU they run unchanged and far
faster (``--run all``).

    python experiments/claims_pieces.py --list                 # pieces, estimates, done or not
    python experiments/claims_pieces.py --run lrrank-qknorm-r8-lr0.1   # one piece
    python experiments/claims_pieces.py --run next --count 2 --commit  # the next 2 not done

``--commit`` commits each finished piece's CSVs (``git add`` + ``git commit``), so a
session that ends mid-study loses at most the piece it was running.

The grid (issue "Decide the paper's two open claims"):

* arms: ``base`` (the study's model, 32×64 = 2,048 tokens per step) and ``qknorm``
  (QK-norm, RoPE, tied embedding/head; 128×64 = 8,192 tokens per step);
* LR × rank: 1,000 steps, η on a ×1.78 grid from 0.01 to 0.316, ranks 1…32 with
  ``lora_muon`` and dense with ``muon``, seeds 0–2, both arms;
* claim 2: rank-32 ``lora_muon`` vs dense ``muon``, seeds 0–5, η in {0.0316, 0.0562, 0.1, 0.178}
  (around both arms' optima), the dense model at equal steps (1,000) and at the
  FLOP-matched steps of ``experiments/compute.py`` (without and with the optimizers' FLOPs);
  at equal steps seeds 0–2 are the LR × rank grid's runs, so those pieces run seeds 3–5;
* panels: width 64/128 and depth 1/2/4 at 1,000 steps, seeds 0–2, on the ``qknorm`` arm,
  ranks 2, 8, 32 and dense, η from 0.0178 to 0.178 (the grid without its ends).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "claims"

LRS = (0.01, 0.0178, 0.0316, 0.0562, 0.1, 0.178, 0.316)  # ×1.78 (10^0.25) steps
RANKS = (1, 2, 4, 8, 16, 32, None)
GRID_SEEDS = (0, 1, 2)
CLAIM2_LRS = (0.0316, 0.0562, 0.1, 0.178)  # around both arms' optima (dense qknorm: >= 0.178)
CLAIM2_SEEDS = (0, 1, 2, 3, 4, 5)
PANEL_RANKS = (2, 8, 32, None)
PANEL_LRS = LRS[1:-1]  # 0.0178 … 0.178
ARM_BATCH = {"base": 32, "qknorm": 128}  # × seq_len 64: 2,048 and 8,192 tokens per step
SEQ_LEN = 64
STEPS = 1000
# Measured seconds per (configuration × token) of a training step on the 2-core CPU VM
# (experiments/results/long1000_final.csv: rank 32 435.6 s and dense 649.3 s for
# 2 configurations × 1,000 steps × 2,048 tokens), rounded up.
SECONDS_PER_TOKEN = {"low_rank": 1.1e-4, "dense": 1.6e-4}


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"claims_{name}", HERE / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@dataclasses.dataclass(frozen=True)
class Piece:
    """One shakespeare.py run: ``name`` is also its CSV prefix under the results folder."""

    name: str
    arch: str
    rank: int | None
    lrs: tuple[float, ...]
    seeds: tuple[int, ...]
    steps: int
    batch: int
    width: int = 128
    depth: int = 2

    @property
    def configs(self) -> int:
        return len(self.lrs) * len(self.seeds)

    def minutes(self) -> float:
        """Estimated minutes on the 2-core CPU (``SECONDS_PER_TOKEN``, width 128, depth 2)."""
        per = SECONDS_PER_TOKEN["dense" if self.rank is None else "low_rank"]
        size = (self.width / 128) * (self.depth / 2)  # rough: matrix work ∝ width, depth
        return self.configs * self.steps * self.batch * SEQ_LEN * per * max(size, 0.5) / 60

    def argv(self, out: Path) -> list[str]:
        optimizer = "muon" if self.rank is None else "lora_muon"
        return [
            "--sweep=lr_rank",
            f"--arch={self.arch}",
            f"--ranks={'dense' if self.rank is None else self.rank}",
            f"--optimizers={optimizer}",
            "--lrs=" + ",".join(f"{lr:g}" for lr in self.lrs),
            "--seeds=" + ",".join(str(s) for s in self.seeds),
            f"--steps={self.steps}",
            f"--batch={self.batch}",
            f"--seq-len={SEQ_LEN}",
            f"--width={self.width}",
            f"--depth={self.depth}",
            "--eval-every=100",
            f"--out={out / self.name}",
            "--skip-existing",
            "--no-progress",
        ]


def _rank_name(rank: int | None) -> str:
    return "dense" if rank is None else f"r{rank}"


def _chunked(
    prefix: str,
    arch: str,
    rank: int | None,
    lrs: Sequence[float],
    seeds: tuple[int, ...],
    steps: int,
    budget_min: float,
    **model: int,
) -> list[Piece]:
    """As few pieces as keep each under ``budget_min``: whole, groups of η, groups of seeds."""
    batch = ARM_BATCH[arch]
    whole = Piece(prefix, arch, rank, tuple(lrs), seeds, steps, batch, **model)
    fit = max(1, int(budget_min / (whole.minutes() / whole.configs)))  # configs per piece
    if whole.configs <= fit:
        return [whole]
    if len(seeds) <= fit:
        per = fit // len(seeds)
        groups = [tuple(lrs[i : i + per]) for i in range(0, len(lrs), per)]
        return [
            Piece(
                f"{prefix}-lr{g[0]:g}" + (f"-{g[-1]:g}" if len(g) > 1 else ""),
                arch,
                rank,
                g,
                seeds,
                steps,
                batch,
                **model,
            )
            for g in groups
        ]
    return [
        Piece(
            f"{prefix}-lr{lr:g}-s{chunk[0]}" + (f"-{chunk[-1]}" if len(chunk) > 1 else ""),
            arch,
            rank,
            (lr,),
            chunk,
            steps,
            batch,
            **model,
        )
        for lr in lrs
        for chunk in (seeds[i : i + fit] for i in range(0, len(seeds), fit))
    ]


def plan(budget_min: float = 60.0) -> list[Piece]:
    """Every piece of the claims study, in the order to run them."""
    compute = _load("compute")
    pieces: list[Piece] = []
    for arch in ("qknorm", "base"):
        for rank in RANKS:
            pieces += _chunked(
                f"lrrank-{arch}-{_rank_name(rank)}", arch, rank, LRS, GRID_SEEDS, STEPS, budget_min
            )
    for arch in ("qknorm", "base"):
        dims = {"width": 128, "depth": 2, "seq_len": SEQ_LEN, "vocab": 65}
        matched = {
            ns: compute.flop_matched_steps(
                STEPS, 32, batch=ARM_BATCH[arch], newton_schulz=ns, **dims
            )
            for ns in (False, True)
        }
        # At equal steps, seeds 0-2 of these η are LR × rank grid runs (the same
        # configurations): claims_analysis takes them from there, so only 3-5 run here.
        runs = [
            ("r32", 32, STEPS, CLAIM2_SEEDS[len(GRID_SEEDS) :]),
            ("dense", None, STEPS, CLAIM2_SEEDS[len(GRID_SEEDS) :]),
            ("dense-flops", None, matched[False], CLAIM2_SEEDS),
            ("dense-flops-ns", None, matched[True], CLAIM2_SEEDS),
        ]
        for label, rank, steps, seeds in runs:
            pieces += _chunked(
                f"claim2-{arch}-{label}-{steps}steps",
                arch,
                rank,
                CLAIM2_LRS,
                seeds,
                steps,
                budget_min,
            )
    for width, depth in ((64, 2), (128, 1), (128, 4)):  # (128, 2) is the LR × rank grid
        for rank in PANEL_RANKS:
            pieces += _chunked(
                f"panel-qknorm-w{width}-d{depth}-{_rank_name(rank)}",
                "qknorm",
                rank,
                PANEL_LRS,
                GRID_SEEDS,
                STEPS,
                budget_min,
                width=width,
                depth=depth,
            )
    return pieces


def is_done(piece: Piece, out: Path) -> bool:
    return (out / f"{piece.name}_final.csv").exists()


def run_piece(
    piece: Piece, out: Path, *, data: str | None, extra: Sequence[str] = (), commit: bool = False
) -> bool:
    """Run ``piece`` unless done; with ``commit``, commit its CSVs. True if it ran."""
    if is_done(piece, out):
        return False
    shakespeare = _load("shakespeare")
    argv = piece.argv(out) + ([f"--data={data}"] if data else []) + list(extra)
    t0 = time.perf_counter()
    shakespeare.main(argv)
    print(f"# piece {piece.name}: {time.perf_counter() - t0:.0f} s", flush=True)
    if commit:
        files = [str(out / f"{piece.name}_{kind}.csv") for kind in ("final", "curves")]
        if out.resolve() == RESULTS.resolve():
            # The verdict tables in README.md and docs/reproduction.md follow the CSVs.
            docs = [HERE.parent / "README.md", HERE.parent / "docs" / "reproduction.md"]
            _load("claims_analysis").main(["--results", str(out), "--docs", *map(str, docs)])
            files += [*map(str, docs), str(out / "claims_study.md"), str(out / "attention.png")]
        subprocess.run(["git", "add", *files], check=True)
        subprocess.run(
            ["git", "commit", "-q", "-m", f"claims study: piece {piece.name}"], check=True
        )
    return True


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--list", action="store_true", help="list the pieces")
    p.add_argument("--run", nargs="*", default=None, help="piece names, 'next' or 'all'")
    p.add_argument("--count", type=int, default=1, help="with --run next: how many")
    p.add_argument("--budget-min", type=float, default=60.0)
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--data", default=None, help="path to tinyshakespeare.txt")
    p.add_argument("--commit", action="store_true", help="git-commit each finished piece")
    args = p.parse_args(argv)
    out = Path(args.out)
    pieces = plan(args.budget_min)
    if args.list or args.run is None:
        total = sum(x.minutes() for x in pieces)
        left = sum(x.minutes() for x in pieces if not is_done(x, out))
        for x in pieces:
            state = "done" if is_done(x, out) else "todo"
            print(f"{state}  {x.minutes():6.1f} min  {x.configs:3d} configs  {x.name}")
        print(f"# {len(pieces)} pieces, {total / 60:.1f} CPU-hours in all, {left / 60:.1f} left")
        return
    by_name = {x.name: x for x in pieces}
    if args.run == ["all"]:
        chosen = pieces
    elif args.run == ["next"]:
        chosen = [x for x in pieces if not is_done(x, out)][: args.count]
    else:
        unknown = [n for n in args.run if n not in by_name]
        if unknown:
            p.error(f"unknown pieces {unknown}; see --list")
        chosen = [by_name[n] for n in args.run]
    for piece in chosen:
        run_piece(piece, out, data=args.data, commit=args.commit)


if __name__ == "__main__":
    main()
