"""The claims study's machinery: the QK-norm arm, its parameter arithmetic, the FLOP
accounting of ``experiments/compute.py`` and the resumable pieces of
``experiments/claims_pieces.py``.

Oracles: closed-form parameter counts; the FLOPs of every ``dot_general`` in the
traced training step's jaxpr (what the model code really multiplies, independent of
``compute.py``'s formulas); attention of a zero query (uniform over the causal
prefix: entropy ``log(i + 1)`` at query i, every logit 0); float64 SVD norms.
"""

from __future__ import annotations

import csv
import importlib.util
import math
import sys
from pathlib import Path

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

_EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(
        f"claims_test_{name}", _EXPERIMENTS / f"{name}.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def sh():
    return _load("shakespeare")


@pytest.fixture(scope="module")
def compute():
    return _load("compute")


def _params(sh, cfg, seed: int = 0):
    with sh._standard_numpy():
        return sh.init_params(jax.random.key(seed), cfg)


def test_parameter_arithmetic_of_the_tied_rope_arm(sh) -> None:
    """Rank 2 has 4.37 % of the dense parameters counting one 65×128 table and the
    hidden matrices (the paper's ~4.3 %), 4.55 % with the norms' gains; the base arm
    8.28 % (its position table and untied head are dense in both)."""
    d, depth, vocab, heads = 128, 2, 65, 4
    counts = {}
    for arch in ("base", "qknorm"):
        for rank in (None, 2):
            cfg = sh.ModelConfig(vocab_size=vocab, width=d, depth=depth, rank=rank, arch=arch)
            params = _params(sh, cfg)
            counts[arch, rank] = (sh.count_params(params), sh.count_params(params, True))
    dense_matrices = depth * (4 * d * d + 2 * 4 * d * d)
    rank2_matrices = depth * (4 * 2 * (d + d) + 2 * 2 * (d + 4 * d))
    gains = (2 * depth + 1) * d  # norm1, norm2 per block, norm_f
    qk_gains = 2 * depth * (d // heads)
    table = vocab * d
    assert counts["qknorm", None] == (dense_matrices + table + gains + qk_gains, dense_matrices)
    assert counts["qknorm", 2] == (rank2_matrices + table + gains + qk_gains, rank2_matrices)
    base_extra = 64 * d + d * vocab  # position table (seq_len 64) and untied head
    assert counts["base", 2][0] == rank2_matrices + table + gains + base_extra
    share = (rank2_matrices + table) / (dense_matrices + table)
    assert round(100 * share, 2) == 4.37
    assert round(100 * counts["qknorm", 2][0] / counts["qknorm", None][0], 2) == 4.55
    assert round(100 * counts["base", 2][0] / counts["base", None][0], 2) == 8.28


def _dot_flops(jaxpr) -> int:
    """2 × batch × contracted × free sizes of every dot_general, sub-jaxprs included."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (lc, rc), (lb, _) = eqn.params["dimension_numbers"]
            lhs, rhs = (v.aval.shape for v in eqn.invars)
            contracted = math.prod(lhs[i] for i in lc)
            batch = math.prod(lhs[i] for i in lb)
            free_l = math.prod(s for i, s in enumerate(lhs) if i not in (*lc, *lb))
            free_r = math.prod(
                s
                for i, s in enumerate(rhs)
                if i not in (*rc, *eqn.params["dimension_numbers"][1][1])
            )
            total += 2 * batch * contracted * free_l * free_r
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else (value,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    total += _dot_flops(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    total += _dot_flops(sub)
    return total


@pytest.mark.parametrize("arch", ["base", "qknorm"])
@pytest.mark.parametrize("rank", [None, 3])
def test_flop_accounting_matches_the_traced_training_step(sh, compute, arch, rank) -> None:
    """Forward FLOPs per token × tokens, and training = 3 × forward, as the jaxpr multiplies."""
    width, depth, seq_len, vocab, batch = 16, 2, 8, 11, 3
    cfg = sh.ModelConfig(
        vocab_size=vocab, width=width, depth=depth, heads=2, seq_len=seq_len, rank=rank, arch=arch
    )
    params = _params(sh, cfg)
    window = jnp.zeros((batch, seq_len + 1), jnp.int32)
    with sh._standard_numpy():
        fwd = jax.make_jaxpr(lambda p: sh.forward(p, window[:, :-1], cfg))(params)
        train = jax.make_jaxpr(jax.grad(lambda p: sh.loss_fn(p, window, cfg)))(params)
    per_token = compute.forward_flops_per_token(width, depth, seq_len, vocab, rank)
    assert _dot_flops(fwd.jaxpr) == per_token * batch * seq_len
    assert _dot_flops(train.jaxpr) == compute.train_flops_per_step(
        width, depth, seq_len, vocab, rank, batch, newton_schulz=False
    )


def test_flop_matched_steps_of_the_study(compute) -> None:
    """Rank 32 at width 128: 43.4 % of dense's forward FLOPs, so 1000 steps match 434 dense
    steps; with the optimizers' FLOPs (dense Muon's 8 Newton–Schulz steps) 319."""
    kw = {"width": 128, "depth": 2, "seq_len": 64, "vocab": 65}
    ratio = compute.forward_flops_per_token(rank=32, **kw) / compute.forward_flops_per_token(
        rank=None, **kw
    )
    assert round(100 * ratio, 1) == 43.4
    assert compute.flop_matched_steps(1000, 32, batch=32, newton_schulz=False, **kw) == 434
    assert compute.flop_matched_steps(1000, 32, batch=32, newton_schulz=True, **kw) == 319
    # Newton–Schulz per step by hand: q, k, v, o (128×128) and up, down (128×512), 8 steps.
    ns = 8 * (4 * 6 * 128**3 + 2 * (4 * 128**2 * 512 + 2 * 128**3))
    assert compute.optimizer_flops_per_step(128, 1, None) == ns


@pytest.mark.parametrize("arch", ["base", "qknorm"])
def test_attention_stats_of_a_zero_query_and_known_norms(sh, arch) -> None:
    cfg = sh.ModelConfig(vocab_size=13, width=16, depth=2, heads=2, seq_len=8, rank=None, arch=arch)
    params = _params(sh, cfg)
    for blk in params["blocks"]:
        blk["attn"]["q"]["kernel"] = jnp.zeros_like(blk["attn"]["q"]["kernel"])
    tokens = jax.random.randint(jax.random.key(1), (3, 8), 0, 13)
    with sh._standard_numpy():
        stats = {k: float(v) for k, v in sh.attention_stats(params, tokens, cfg).items()}
    assert stats["max_logit"] == 0.0
    want_entropy = float(np.mean(np.log(np.arange(1, 9))))
    assert stats["attn_entropy"] == pytest.approx(want_entropy, rel=1e-5)
    assert stats["wq_norm"] == 0.0
    k_norms = [
        np.linalg.norm(np.asarray(b["attn"]["k"]["kernel"], np.float64), 2)
        for b in params["blocks"]
    ]
    assert stats["wk_norm"] == pytest.approx(max(k_norms), rel=1e-5)


def test_qknorm_bounds_the_logits_where_the_base_arm_does_not(sh) -> None:
    """Scaling W_q and W_k by 10 multiplies the base arm's largest logit by ~100; the
    QK-norm arm's logits are bounded by √d_head × the gains, whatever the weights."""
    tokens = jax.random.randint(jax.random.key(2), (2, 16), 0, 13)
    out = {}
    for arch in ("base", "qknorm"):
        cfg = sh.ModelConfig(vocab_size=13, width=32, depth=1, heads=2, seq_len=16, arch=arch)
        params = _params(sh, cfg)
        big = jax.tree.map(lambda x: x, params)
        for blk in big["blocks"]:
            for name in ("q", "k"):
                blk["attn"][name]["kernel"] = 10 * blk["attn"][name]["kernel"]
        with sh._standard_numpy():
            out[arch] = [
                float(sh.attention_stats(p, tokens, cfg)["max_logit"]) for p in (params, big)
            ]
    assert out["base"][1] > 50 * out["base"][0]
    assert out["qknorm"][1] <= math.sqrt(16) * (1 + 1e-5)  # unit gains, d_head 16
    assert out["qknorm"][1] == pytest.approx(out["qknorm"][0], rel=0.5)


def test_plan_covers_the_grid_within_the_budget(sh) -> None:
    pieces = _load("claims_pieces")
    plan = pieces.plan(60.0)
    assert len({p.name for p in plan}) == len(plan)
    assert max(p.minutes() for p in plan) <= 60.0
    grid = {
        (p.arch, p.rank, lr, seed)
        for p in plan
        if p.name.startswith("lrrank-")
        for lr in p.lrs
        for seed in p.seeds
    }
    want = {
        (arch, rank, lr, seed)
        for arch in ("base", "qknorm")
        for rank in (1, 2, 4, 8, 16, 32, None)
        for lr in pieces.LRS
        for seed in (0, 1, 2)
    }
    assert grid == want
    assert np.allclose(np.diff(np.log(pieces.LRS)), np.log(10) / 4, rtol=0.01)
    assert {p.batch * 64 for p in plan if p.arch == "qknorm"} == {8192}
    claim = {(p.arch, p.rank, p.steps) for p in plan if p.name.startswith("claim2-")}
    assert ("qknorm", None, 434) in claim and ("base", None, 319) in claim
    runs = [
        (p.arch, p.rank, lr, seed, p.steps, p.width, p.depth)
        for p in plan
        for lr in p.lrs
        for seed in p.seeds
    ]
    assert len(runs) == len(set(runs)), "a configuration runs twice"
    # Claim 2 at equal steps: seeds 3-5 in its pieces, 0-2 from the grid; 6 seeds in all.
    for arch in ("base", "qknorm"):
        for rank in (32, None):
            for lr in pieces.CLAIM2_LRS:
                seeds = {
                    s
                    for a, k, l_, s, steps, *_ in runs
                    if (a, k, l_, steps) == (arch, rank, lr, 1000)
                }
                assert seeds == set(range(6)), (arch, rank, lr, seeds)


def test_a_piece_runs_once_and_is_skipped_when_its_csv_exists(tmp_path: Path) -> None:
    pieces = _load("claims_pieces")
    data = tmp_path / "tiny.txt"
    data.write_text("to be or not to be that is the question\n" * 80, encoding="utf-8")
    piece = pieces.Piece("tiny-qknorm-r2", "qknorm", 2, (0.1,), (0,), 6, 4, width=16, depth=1)
    small = ["--seq-len=16", "--eval-every=3"]
    assert pieces.run_piece(piece, tmp_path, data=str(data), extra=small)
    final = tmp_path / "tiny-qknorm-r2_final.csv"
    assert final.exists() and not (tmp_path / "tiny-qknorm-r2_final.csv.partial").exists()
    with final.open() as f:
        rows = list(csv.DictReader(f))
    assert [r["arch"] for r in rows] == ["qknorm"]
    assert all(math.isfinite(float(rows[0][k])) for k in ("max_logit", "attn_entropy"))
    before = final.read_bytes()
    assert not pieces.run_piece(piece, tmp_path, data=str(data), extra=small)
    assert final.read_bytes() == before


# ------------------------------------------------------------------ the verdicts


@pytest.fixture(scope="module")
def analysis():
    return _load("claims_analysis")


def test_t_quantiles_match_closed_forms(analysis) -> None:
    """df = 1 is Cauchy (quantile tan(π(p − ½))); df = 2 has F⁻¹(p) = (2p−1)/√(2p(1−p));
    large df tends to the normal's."""
    for p in (0.9, 0.975):
        assert analysis.t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-4)
        want = (2 * p - 1) / math.sqrt(2 * p * (1 - p))
        assert analysis.t_quantile(p, 2) == pytest.approx(want, rel=1e-5)
    from statistics import NormalDist

    assert analysis.t_quantile(0.975, 4000) == pytest.approx(NormalDist().inv_cdf(0.975), rel=1e-3)


def test_interpolated_optimum_recovers_a_parabola_in_log_lr(analysis) -> None:
    lrs = [0.01 * 1.78**k for k in range(7)]
    star = 0.047
    curve = [(lr, 1.9 + 0.3 * (math.log(lr) - math.log(star)) ** 2) for lr in lrs]
    eta, loss, interior = analysis.interpolated_optimum(curve)
    assert interior and eta == pytest.approx(star, rel=1e-9) and loss == pytest.approx(1.9)
    edge = analysis.interpolated_optimum([(lr, -math.log(lr)) for lr in lrs])
    assert edge == (lrs[-1], -math.log(lrs[-1]), False)


def _row(piece, arch, rank, lr, seed, loss, steps=1000):
    return {
        "piece": piece, "arch": arch, "model": "dense" if rank is None else f"rank{rank}",
        "rank": "" if rank is None else str(rank), "lr": str(lr), "seed": str(seed),
        "steps": str(steps), "final_val_loss": str(loss),
    }  # fmt: skip


def test_claim_tables_from_synthetic_results(analysis, tmp_path: Path) -> None:
    """Known optima give the transfer verdicts; known paired differences give the intervals.

    Oracle for the interval: mean ± t₀.₉₇₅,₅ s/√6 with the tabulated t₀.₉₇₅,₅ = 2.5706.
    """
    lrs = [0.01 * 1.78**k for k in range(7)]
    rows = []
    for rank, star in ((2, 0.1), (32, 0.02), (None, 0.1)):
        for lr in lrs:
            for seed in (0, 1, 2):
                loss = 2.0 + 0.2 * (math.log(lr / star)) ** 2 + 0.001 * seed
                rows.append(_row("lrrank-qknorm-x", "qknorm", rank, lr, seed, loss))
    offsets = [-0.02, -0.03, -0.025, -0.015, -0.02, -0.03]  # rank 32 below dense every seed
    for seed, d in enumerate(offsets):
        for lr, extra in ((0.0316, 0.05), (0.0562, 0.0), (0.1, 0.04)):  # best η: 0.0562
            rows.append(
                _row("claim2-qknorm-r32-1000steps", "qknorm", 32, lr, seed, 1.8 + d + extra)
            )
            rows.append(
                _row("claim2-qknorm-dense-1000steps", "qknorm", None, lr, seed, 1.8 + extra)
            )
        rows.append(_row("claim2-qknorm-dense-flops-434steps", "qknorm", None, 0.1, seed, 1.8, 434))
        wobble = 1.8 + d + 0.02 * (-1) ** seed  # rank 32 − dense: ∓0.02, mean 0
        rows.append(
            _row("claim2-qknorm-dense-flops-ns-398steps", "qknorm", None, 0.1, seed, wobble, 398)
        )
    # A half-finished η (one seed, very low loss) must not win.
    rows.append(_row("claim2-qknorm-r32-1000steps", "qknorm", 32, 0.178, 0, 0.5))
    table = "\n".join(analysis.lr_transfer_table(rows, "qknorm"))
    assert "| 2 | 3 | 7 |" in table and table.count("| yes |") == 1 and table.count("| no |") == 1
    claim = analysis.claim2_table(rows, "qknorm")
    equal = next(line for line in claim if "(equal steps)" in line)
    model_only = next(line for line in claim if "model only" in line)
    with_ns = next(line for line in claim if "optimizers' counted" in line)
    mean = float(np.mean(offsets))
    half = 2.5706 * float(np.std(offsets, ddof=1)) / math.sqrt(6)
    assert f"{mean:+.4f} [{mean - half:+.4f}, {mean + half:+.4f}] | rank 32 better" in equal
    assert "(η 0.0562)" in equal and equal.count("at edge") == 0
    assert model_only.startswith("| 434 ") and "(η 0.1 at edge)" not in model_only
    assert with_ns.startswith("| 398 ") and with_ns.endswith("| tie |")


def test_interpolation_of_a_flat_curve_and_duplicate_runs(analysis, tmp_path: Path) -> None:
    flat = [(0.01, 2.0), (0.0316, 2.0), (0.1, 2.0), (0.316, 2.0)]
    assert analysis.interpolated_optimum(flat) == (0.01, 2.0, False)
    fields = ["arch", "model", "rank", "lr", "seed", "steps", "width", "depth", "final_val_loss"]
    row = {"arch": "qknorm", "model": "rank8", "rank": "8", "lr": "0.1", "seed": "0",
           "steps": "1000", "width": "128", "depth": "2", "final_val_loss": "1.9"}  # fmt: skip
    for name in ("lrrank-qknorm-r8-lr0.1", "lrrank-qknorm-r8-lr0.01-0.1", "claim2-qknorm-r8"):
        with (tmp_path / f"{name}_final.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerow(row)
    pieces = sorted(r["piece"] for r in analysis.read_all(tmp_path))
    assert pieces == ["claim2-qknorm-r8", "lrrank-qknorm-r8-lr0.01-0.1"]


def test_attention_plot_from_a_finished_piece(analysis, tmp_path: Path) -> None:
    fields = ["arch", "model", "rank", "lr", "seed", "steps", "width", "depth", "final_val_loss",
              "wq_norm", "wk_norm", "max_logit", "attn_entropy"]  # fmt: skip
    with (tmp_path / "lrrank-qknorm-x_final.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for model, rank in (("dense", ""), ("rank8", "8")):
            for lr in (0.0316, 0.1):
                values = ["qknorm", model, rank, lr, 0, 1000, 128, 2, 2.0, 5.0, 6.0, 12.0, 1.0]
                writer.writerow(dict(zip(fields, values, strict=True)))
    out = analysis.plot_attention(tmp_path)
    assert out == tmp_path / "attention.png" and out.stat().st_size > 10_000


def _write_piece(folder: Path, name: str, rows: list[dict[str, str]]) -> None:
    fields = ["arch", "model", "rank", "lr", "seed", "steps", "width", "depth", "final_val_loss"]
    with (folder / f"{name}_final.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({"width": "128", "depth": "2", **r})


def test_claim2_takes_equal_step_seeds_from_the_grid_once(analysis) -> None:
    """Seeds 0-2 from the LR × rank grid and 3-5 from claim 2's pieces pair into 6; a
    duplicate of a grid run in a claim-2 piece counts once; grid η outside the claim's
    set and other ranks are not taken."""
    diffs = [-0.01, -0.02, -0.015, -0.03, -0.005, -0.02]
    rows = []
    for seed, d in enumerate(diffs):
        family = "lrrank-qknorm-x" if seed < 3 else "claim2-qknorm-x"
        for lr in (0.0316, 0.0562, 0.1):
            extra = 0.0 if lr == 0.0562 else 0.05
            rows.append(_row(family, "qknorm", 32, lr, seed, 1.8 + d + extra))
            rows.append(_row(family, "qknorm", None, lr, seed, 1.8 + extra))
    rows.append(_row("claim2-qknorm-y", "qknorm", 32, 0.0562, 0, 1.8 + diffs[0]))  # seed 0 again
    rows.append(_row("lrrank-qknorm-x", "qknorm", 32, 0.01, 0, 0.1))  # not a claim-2 η
    rows.append(_row("lrrank-qknorm-x", "qknorm", 16, 0.0562, 0, 0.1))  # not rank 32
    runs = analysis.claim2_runs(rows, "qknorm")
    assert sorted(runs) == [("32", 1000), ("dense", 1000)]
    assert len(runs["32", 1000]) == len(runs["dense", 1000]) == 18
    (result,) = analysis.claim2_results(rows, "qknorm")
    assert result["seeds"] == 6 and result["lr_low"] == "0.0562"
    assert result["mean"] == pytest.approx(float(np.mean(diffs)))


def test_panels_and_the_summary_table(analysis, tmp_path: Path) -> None:
    """Panel tables per (width, depth) with the grid as (128, 2); the summary's verdicts,
    measured values and pieces-done counts (against claims_pieces.plan) from synthetic CSVs;
    write_block rewrites only the marked block."""
    lrs = [0.0178, 0.0316, 0.0562, 0.1, 0.178]
    for name, width, depth, star_low in (("lrrank-qknorm-r8-x", 128, 2, 0.0562),
                                          ("panel-qknorm-w64-d2-x", 64, 2, 0.178)):  # fmt: skip
        rows = []
        for rank, star in ((8, star_low), (None, 0.0562)):
            for lr in lrs:
                loss = 2.0 + 0.2 * math.log(lr / star) ** 2
                row = _row(name, "qknorm", rank, lr, 0, loss)
                rows.append({**row, "width": str(width), "depth": str(depth)})
        _write_piece(tmp_path, name, rows)
    rows = analysis.read_all(tmp_path)
    panels = analysis.panel_runs(rows)
    assert sorted(panels) == [(64, 2), (128, 2)]
    tables = "\n".join(analysis.panel_tables(rows))
    assert "**Panel width 64, depth 2**" in tables and "**Panel width 128, depth 2**" in tables
    assert "| 8 | 1 | 5 | 0.0562 | 0.0562 | 2.0000 | 1.00 | yes |" in tables
    assert "| 8 | 1 | 5 | 0.178 | 0.178 (edge) |" in tables and "undecided (edge)" in tables
    summary = analysis.summary(rows, tmp_path)
    claim1 = next(line for line in summary if line.startswith("| 1: best η") and "qknorm" in line)
    assert "| transfers at rank 8 |" in claim1 and "r8 η* 0.0562 = 1.00× dense" in claim1
    n_grid = sum(p.name.startswith("lrrank-qknorm-") for p in analysis._PIECES.plan())
    assert claim1.endswith(f"| 0 of {n_grid} |")  # the synthetic piece is not a planned one
    panel = next(line for line in summary if "width 64/128" in line)
    assert "w64 d2: undecided at rank 8; w128 d2: transfers at rank 8" in panel
    several = [{"rank": k, "verdict": v} for k, v in ((2, "yes"), (8, "yes"), (32, "no"))]
    assert analysis._by_verdict(several) == "transfers at ranks 2, 8; not at 32"
    assert sum("| not run |" in line for line in summary) == 7  # claim 2 x 6, base claim 1
    doc = tmp_path / "doc.md"
    doc.write_text(f"intro\n{analysis.BLOCK_START}\nold\n{analysis.BLOCK_END}\nafter\n")
    assert analysis.write_block(doc, summary) and not analysis.write_block(doc, summary)
    assert analysis.read_block(doc) == summary
    assert doc.read_text().startswith("intro\n") and doc.read_text().endswith("\nafter\n")


@pytest.mark.parametrize("doc", ["README.md", "docs/reproduction.md"])
def test_the_docs_claims_table_is_the_committed_csvs(analysis, doc: str) -> None:
    """The table in README.md and docs/reproduction.md is what ``plots.py`` writes from
    the committed results (rerun it after committing pieces)."""
    results = analysis.RESULTS
    want = analysis.summary(analysis.read_all(results), results)
    assert analysis.read_block(_EXPERIMENTS.parent / doc) == want


def test_a_curve_averages_the_seeds_common_to_all_its_points(analysis) -> None:
    """A third seed finished at one η only must not move that point against the others."""
    rows = [
        _row("lrrank-qknorm-x", "qknorm", 8, lr, seed, 2.0 + 0.1 * seed + (lr == 0.1) * 0.01)
        for lr in (0.0316, 0.0562, 0.1)
        for seed in (0, 1)
    ]
    rows.append(_row("lrrank-qknorm-x", "qknorm", 8, 0.1, 2, 1.0))  # seed 2 only at η = 0.1
    (result,) = analysis.transfer_results(rows)
    assert result["seeds"] == 2 and result["best"] != 0.1  # without the guard 0.1 would win
    assert analysis._curves(rows)["8"][2] == (0.1, pytest.approx(2.06))
