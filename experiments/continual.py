"""Continual finetuning: LoRA-Muon-OGD vs LoRA-Muon vs AdamW-on-factors on synthetic tasks.

Setting (known interference, exact losses). A frozen random base ``W0 (m×n)`` plus one
LoRA adapter ``W = W0 + A Bᵀ`` (``lora_a = A (m×r)``, ``lora_b = Bᵀ``, B = 0 at init)
learns ``T`` regression tasks in sequence. Task t has its own *input* subspace ``X_t``
(``d_in`` orthonormal directions, disjoint across tasks) and a target
``W*_t = W0 + D_t`` with ``D_t = X_t C_t Y_tᵀ``, where the output bases ``Y_t`` share
``shared_out`` directions across tasks plus ``private_out`` of their own. Inputs are
``x = X_t z + noise·ε`` (z, ε standard normal), the loss is the MSE of ``x W`` against
``x W*_t``. ``W0 + Σ_t D_t`` fits every task (up to the noise floor), so forgetting
is interference from the optimizer, not a conflict between tasks: LoRA's ``A ΔBᵀ``
half moves W along A's span, which after task 1 holds task 1's inputs, and the
shared outputs put that move inside task 1's ``Uᵀ W V`` block — what the OGD
constraint protects. Evaluation uses the exact population loss
``tr(Δᵀ Σ_t Δ) / n`` (``Σ_t = X_t X_tᵀ + noise² I``), so it carries no sampling noise.

Protocol. Each method keeps one optimizer state across all tasks; every task runs
``steps`` minibatch steps with the learning rate decaying linearly from its peak to 0
(restarted per task); weight decay is 0 for all. After each task, LoRA-Muon-OGD appends
the top-``k_task`` singular directions of that task's ``ΔW = A Bᵀ − A₀B₀ᵀ``
(``ogd_bases_from_delta`` + ``update_ogd_bases``) with ``num_bases = k_task (T − 1)``
and J = 2 dual steps; ``lora_muon_ogd`` uses the library's primal averaging,
``lora_muon_ogd_last`` the blog post's last iterate, ``lora_muon_ogd_j1`` one dual step
(at ``lora_muon_ogd``'s selected point, not tuned on its own); σ is tuned with the lr.
Learning rates: each method's grid is run on the *tuning* seeds and the peak with the
lowest final average loss is kept; the *report* seeds (different problems and batches)
are then run at it.

Metrics (report seeds, mean ± std): the final average loss over all tasks after the
last one; forgetting = mean over earlier tasks of (final loss − loss right after
learning it); plasticity = mean loss on each task right after learning it; the OGD
constraint residual ``‖Uᵀ ΔW V‖_F / η`` at the end of each task. Cost: the optimizer
update of each method is timed interleaved in the same process (median of rounds),
at the experiment's shape and at 1024×1024 rank 16, as ratios to ``lora_muon``.

Resumable: every run is one JSON under ``OUT/runs/``, the timing ``OUT/timing.json``;
a piece whose file exists is skipped. Outputs: ``OUT/summary.csv``, ``OUT/grid.csv``,
``OUT/timing.csv``, ``OUT/summary.json``, ``OUT/continual.png`` and the printed table.

Commands (measured numbers: docs/lora_muon_ogd.md):

    .venv/bin/python experiments/continual.py                # ~9 min on 2 CPU cores
    .venv/bin/python experiments/continual.py --quick --out /tmp/continual_quick

Hardware: CPU (2 cores); float32; JAX on whatever device it finds.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lora_muon_jax
from lora_muon_jax import (
    ScaleByLoRAMuonOGDState,
    lora_muon,
    lora_muon_ogd,
    ogd_bases_from_delta,
    update_ogd_bases,
)

METHODS = ("lora_muon_ogd", "lora_muon_ogd_last", "lora_muon", "adamw")
# Reported at LoRA-Muon-OGD's selected point only (no tuning of its own): one dual step.
VARIANTS = {"lora_muon_ogd_j1": "lora_muon_ogd"}
DEFAULT_SIGMA = 0.5
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "continual"


@dataclasses.dataclass(frozen=True)
class Config:
    m: int = 64
    n: int = 32
    rank: int = 16
    tasks: int = 3
    d_in: int = 6
    shared_out: int = 3
    private_out: int = 1
    delta_scale: float = 1.0
    noise: float = 0.05
    steps: int = 300
    batch: int = 64
    k_task: int = 4
    muon_grid: tuple[float, ...] = (0.003, 0.005, 0.01, 0.02, 0.05, 0.1)
    sigma_grid: tuple[float, ...] = (0.001, 0.003, 0.01, 0.05)
    adamw_grid: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
    tune_seeds: tuple[int, ...] = (100, 101)
    report_seeds: tuple[int, ...] = (0, 1, 2)
    timing_rounds: int = 15


QUICK = Config(
    m=24,
    n=16,
    rank=4,
    tasks=3,
    d_in=3,
    shared_out=2,
    private_out=1,
    steps=30,
    batch=16,
    k_task=2,
    muon_grid=(0.05, 0.1),
    sigma_grid=(0.01,),
    adamw_grid=(1e-2,),
    tune_seeds=(100,),
    report_seeds=(0,),
    timing_rounds=3,
)


# ---------------------------------------------------------------- the problem


def make_problem(cfg: Config, seed: int) -> dict[str, np.ndarray]:
    """Base, input subspaces X_t, output bases Y_t and targets W*_t (float32 numbers)."""
    rng = np.random.default_rng(seed)
    w0 = rng.standard_normal((cfg.m, cfg.n)) / np.sqrt(cfg.m)
    x_all = np.linalg.qr(rng.standard_normal((cfg.m, cfg.tasks * cfg.d_in)))[0]
    y_all = np.linalg.qr(
        rng.standard_normal((cfg.n, cfg.shared_out + cfg.tasks * cfg.private_out))
    )[0]
    xs, targets = [], []
    out_dim = cfg.shared_out + cfg.private_out
    for t in range(cfg.tasks):
        x_t = x_all[:, t * cfg.d_in : (t + 1) * cfg.d_in]
        private = y_all[
            :, cfg.shared_out + t * cfg.private_out : cfg.shared_out + (t + 1) * cfg.private_out
        ]
        y_t = np.concatenate([y_all[:, : cfg.shared_out], private], axis=1)
        c_t = rng.standard_normal((cfg.d_in, out_dim)) * cfg.delta_scale / np.sqrt(out_dim)
        xs.append(x_t)
        targets.append(w0 + x_t @ c_t @ y_t.T)
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    return {"w0": f32(w0), "x": f32(np.stack(xs)), "target": f32(np.stack(targets))}


def population_losses(w: jax.Array, x: jax.Array, target: jax.Array, noise: float) -> jax.Array:
    """Exact ``E‖x(W − W*_t)‖² / n`` for every task t: (T,)."""
    delta = w[None] - target  # (T, m, n)
    proj = jnp.einsum("tmd,tmn->tdn", x, delta)
    n = w.shape[-1]
    return (jnp.sum(proj * proj, axis=(1, 2)) + noise**2 * jnp.sum(delta * delta, axis=(1, 2))) / n


def build_optimizer(method: str, cfg: Config) -> optax.GradientTransformation:
    if method == "lora_muon":
        return optax.inject_hyperparams(lora_muon)(learning_rate=0.0, weight_decay=0.0)
    if method.startswith("lora_muon_ogd"):
        static = ("num_bases", "dual_steps", "primal_average")
        return optax.inject_hyperparams(lora_muon_ogd, static_args=static)(
            learning_rate=0.0,
            num_bases=cfg.k_task * max(cfg.tasks - 1, 1),
            dual_steps=1 if method.endswith("_j1") else 2,
            primal_average=not method.endswith("_last"),  # _last: the post's last iterate
            weight_decay=0.0,
        )
    if method == "adamw":
        return optax.inject_hyperparams(optax.adamw)(learning_rate=0.0, weight_decay=0.0)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def ogd_residual(state: Any) -> jax.Array:
    """Mean over pairs of the OGD state's last residual ‖UᵀΔWV‖_F/η (0 without OGD state)."""
    is_ogd = lambda x: isinstance(x, ScaleByLoRAMuonOGDState)  # noqa: E731
    found = [x for x in jax.tree.leaves(state, is_leaf=is_ogd) if is_ogd(x)]
    if not found:
        return jnp.zeros([], jnp.float32)
    return jnp.mean(jnp.stack([jnp.mean(r) for r in found[0].residual.values()]))


_TRAINERS: dict[tuple[str, Config], Any] = {}


def trainer(method: str, cfg: Config) -> tuple[optax.GradientTransformation, Any]:
    """The optimizer and one jitted task of training (compiled once per method)."""
    if (method, cfg) in _TRAINERS:
        return _TRAINERS[method, cfg]
    opt = build_optimizer(method, cfg)

    @jax.jit
    def train_task(params, state, key, t, lr, sigma, w0, xs, targets):
        x_t, target_t = xs[t], targets[t]

        def weight(p):
            return w0 + p["lora_a"] @ p["lora_b"]

        def loss_fn(p, batch_key):
            kz, ke = jax.random.split(batch_key)
            z = jax.random.normal(kz, (cfg.batch, cfg.d_in), jnp.float32)
            eps = jax.random.normal(ke, (cfg.batch, cfg.m), jnp.float32)
            inputs = z @ x_t.T + cfg.noise * eps
            return jnp.mean((inputs @ weight(p) - inputs @ target_t) ** 2)

        def body(carry, i):
            p, s = carry
            frac = 1.0 - i.astype(jnp.float32) / cfg.steps
            s.hyperparams["learning_rate"] = lr * frac
            if "dual_step_size" in s.hyperparams:
                s.hyperparams["dual_step_size"] = sigma
            grads = jax.grad(loss_fn)(p, jax.random.fold_in(key, i))
            updates, s = opt.update(grads, s, p)
            p = optax.apply_updates(p, updates)
            losses = population_losses(weight(p), xs, targets, cfg.noise)
            return (p, s), (losses, ogd_residual(s))

        (params, state), (curve, residual) = jax.lax.scan(
            body, (params, state), jnp.arange(cfg.steps)
        )
        return params, state, curve, residual

    _TRAINERS[method, cfg] = (opt, train_task)
    return opt, train_task


def run(
    method: str, lr: float, seed: int, cfg: Config, sigma: float = DEFAULT_SIGMA
) -> dict[str, Any]:
    """One method at one peak learning rate (and OGD dual step size) on one seed's tasks."""
    prob = make_problem(cfg, seed)
    w0, xs, targets = (jnp.asarray(prob[k]) for k in ("w0", "x", "target"))
    key = jax.random.key(seed)
    key, ka, kb = jax.random.split(key, 3)
    # Both factors random and well conditioned, their product folded into the frozen
    # base so that W = W0 at the start (B = 0 makes LoRA-Muon unstable here: see the
    # module docstring).
    params = {
        "lora_a": jax.random.normal(ka, (cfg.m, cfg.rank), jnp.float32) / np.sqrt(cfg.m),
        "lora_b": jax.random.normal(kb, (cfg.rank, cfg.n), jnp.float32) / np.sqrt(cfg.n),
    }
    w_base = w0
    w0 = w0 - params["lora_a"] @ params["lora_b"]
    opt, train_task = trainer(method, cfg)
    state = opt.init(params)

    def weight(p: dict[str, jax.Array]) -> jax.Array:
        return w0 + p["lora_a"] @ p["lora_b"]

    lr_, sigma_ = jnp.asarray(lr, jnp.float32), jnp.asarray(sigma, jnp.float32)
    pre = np.asarray(population_losses(weight(params), xs, targets, cfg.noise)).tolist()
    matrix, curves, residual_end, residual_mean = [], [], [], []
    drift: list[list[float]] = []
    task_bases: list[Any] = []
    t0 = time.perf_counter()
    for t in range(cfg.tasks):
        start = params
        key, kt = jax.random.split(key)
        params, state, curve, residual = train_task(
            params, state, kt, t, lr_, sigma_, w0, xs, targets
        )
        curve = np.asarray(curve)
        matrix.append(curve[-1].tolist())
        curves.append(curve[:: max(cfg.steps // 50, 1)].tolist())
        residual_end.append(float(residual[-1]))
        residual_mean.append(float(jnp.mean(residual)))
        # Drift of every earlier task's protected block ‖U_iᵀ ΔW V_i‖_F during this task,
        # for every method (the bases are computed for all, used by OGD only).
        delta_w = weight(params) - weight(start)
        drift.append([float(jnp.linalg.norm(b.u[0].T @ delta_w @ b.v[0])) for b in task_bases])
        bases = ogd_bases_from_delta(params, start, cfg.k_task)
        task_bases.append(next(iter(bases.values())))
        if method.startswith("lora_muon_ogd") and t < cfg.tasks - 1:
            state = update_ogd_bases(state, bases)
    seconds = time.perf_counter() - t0
    joint = population_losses(
        w_base + jnp.sum(targets - w_base[None], axis=0), xs, targets, cfg.noise
    )  # W0 + Σ D_t: fits every task up to the noise floor
    return {
        "method": method,
        "lr": lr,
        "sigma": sigma if method.startswith("lora_muon_ogd") else None,
        "seed": seed,
        "pre": pre,
        "matrix": matrix,  # matrix[t][i]: loss on task i after learning task t
        "curves": curves,  # per task: subsampled (steps/50) losses on every task
        "residual_end": residual_end,
        "residual_mean": residual_mean,
        "block_drift": drift,  # block_drift[t][i]: ‖U_iᵀ ΔW V_i‖_F over task t, i < t
        "joint_reference": np.asarray(joint).tolist(),
        "seconds": seconds,
    }


def metrics(result: dict[str, Any]) -> dict[str, float]:
    mat = np.asarray(result["matrix"])
    t_last = mat.shape[0] - 1
    final = mat[t_last]
    diag = np.diag(mat)
    forgetting = float(np.mean(final[:t_last] - diag[:t_last])) if t_last else 0.0
    return {
        "final_avg": float(np.mean(final)),
        "forgetting": forgetting,
        "plasticity": float(np.mean(diag)),
        "last_task": float(final[t_last]),
        "first_task_final": float(final[0]),
        "block_drift": float(np.mean([x for row in result["block_drift"] for x in row])),
    }


# ---------------------------------------------------------------- timing


def time_updates(cfg: Config, shapes: list[tuple[int, int, int, int]]) -> list[dict[str, Any]]:
    """Median seconds per optimizer update, methods interleaved per round."""
    rows = []
    for m, n, r, k in shapes:
        rng = np.random.default_rng(0)
        params = {
            "lora_a": jnp.asarray(rng.standard_normal((m, r)), jnp.float32),
            "lora_b": jnp.asarray(rng.standard_normal((r, n)), jnp.float32),
        }
        grads = {
            "lora_a": jnp.asarray(rng.standard_normal((m, r)), jnp.float32),
            "lora_b": jnp.asarray(rng.standard_normal((r, n)), jnp.float32),
        }
        opts = {
            "lora_muon": lora_muon(0.05, weight_decay=0.0),
            "lora_muon_ogd": lora_muon_ogd(0.05, num_bases=k),
            "lora_muon_ogd_j1": lora_muon_ogd(0.05, num_bases=k, dual_steps=1),
            "adamw": optax.adamw(1e-3, weight_decay=0.0),
        }
        states = {name: o.init(params) for name, o in opts.items()}
        u = jnp.linalg.qr(jnp.asarray(rng.standard_normal((m, k)), jnp.float32))[0]
        v = jnp.linalg.qr(jnp.asarray(rng.standard_normal((n, k)), jnp.float32))[0]
        for name in ("lora_muon_ogd", "lora_muon_ogd_j1"):
            states[name] = update_ogd_bases(
                states[name], {"['lora_{a,b}']": (u, v)}, mode="replace"
            )
        steps = {name: jax.jit(o.update) for name, o in opts.items()}
        inner = max(2, int(2e5 // (m * r + n * r)))  # enough calls per sample to beat dispatch
        for name in opts:
            jax.block_until_ready(steps[name](grads, states[name], params))
        samples: dict[str, list[float]] = {name: [] for name in opts}
        for _ in range(cfg.timing_rounds):
            for name in opts:
                t0 = time.perf_counter()
                for _ in range(inner):
                    out = steps[name](grads, states[name], params)
                jax.block_until_ready(out)
                samples[name].append((time.perf_counter() - t0) / inner)
        base = statistics.median(samples["lora_muon"])
        for name in opts:
            med = statistics.median(samples[name])
            rows.append(
                {
                    "shape": f"{m}x{n} r={r} k={k}",
                    "method": name,
                    "median_us": med * 1e6,
                    "ratio_to_lora_muon": med / base,
                }
            )
    return rows


# ---------------------------------------------------------------- driver


def _run_path(out: Path, phase: str, method: str, point: tuple[float, float], seed: int) -> Path:
    lr, sigma = point
    tag = f"_sigma{sigma:g}" if method.startswith("lora_muon_ogd") else ""
    return out / "runs" / f"{phase}_{method}_lr{lr:g}{tag}_seed{seed}.json"


def _cached(path: Path, make: Any) -> dict[str, Any]:
    if path.exists():
        return json.loads(path.read_text())
    result = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(path)
    return result


def grid_of(method: str, cfg: Config) -> list[tuple[float, float]]:
    """(peak learning rate, OGD dual step size σ) points; σ is unused by the others."""
    if method == "adamw":
        return [(lr, DEFAULT_SIGMA) for lr in cfg.adamw_grid]
    if method == "lora_muon":
        return [(lr, DEFAULT_SIGMA) for lr in cfg.muon_grid]
    return [(lr, sigma) for lr in cfg.muon_grid for sigma in cfg.sigma_grid]


def plot(out: Path, report: dict[str, list[dict[str, Any]]], cfg: Config) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(19, 4.2))
    colors = {
        "lora_muon_ogd": "C0",
        "lora_muon": "C1",
        "adamw": "C2",
        "lora_muon_ogd_j1": "C3",
        "lora_muon_ogd_last": "C4",
    }
    for method, results in report.items():
        curves = np.mean(
            [np.concatenate([np.asarray(c) for c in r["curves"]], axis=0) for r in results], axis=0
        )  # (points, T)
        x = np.arange(curves.shape[0]) / (curves.shape[0] / cfg.tasks)
        for t in range(cfg.tasks):
            axes[0].plot(
                x,
                curves[:, t],
                color=colors[method],
                ls=["-", "--", ":", "-."][t % 4],
                label=f"{method} task {t + 1}" if t == 0 else None,
            )
        axes[0].set_yscale("log")
    axes[0].set_xlabel("task (training progress)")
    axes[0].set_ylabel("population loss (solid: task 1, dashed: 2, dotted: 3)")
    axes[0].set_title("loss on every task during the sequence (mean of seeds)")
    axes[0].legend(fontsize=8)
    names = ["final_avg", "forgetting", "plasticity"]
    titles = [
        "final average loss (all tasks)",
        "forgetting (↑ = worse)",
        "plasticity: loss right after",
    ]
    for ax, name, title in zip(axes[1:], names, titles, strict=True):
        for i, (method, results) in enumerate(report.items()):
            vals = [metrics(r)[name] for r in results]
            ax.bar(i, np.mean(vals), yerr=np.std(vals), color=colors[method], capsize=4)
            ax.scatter([i] * len(vals), vals, color="k", s=8, zorder=3)
        ax.set_xticks(range(len(report)))
        ax.set_xticklabels(list(report), fontsize=7, rotation=20, ha="right")
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(out / "continual.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny settings (smoke test)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else Config()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(
        json.dumps(
            {
                "config": dataclasses.asdict(cfg),
                "versions": {
                    "python": platform.python_version(),
                    "jax": jax.__version__,
                    "optax": optax.__version__,
                    "lora_muon_jax": lora_muon_jax.__version__,
                },
                "devices": [str(d) for d in jax.devices()],
            },
            indent=1,
        )
    )
    t_start = time.perf_counter()

    grid_rows, best = [], {}
    for method in METHODS:
        scores = {}
        for point in grid_of(method, cfg):
            runs = [
                _cached(
                    _run_path(out, "tune", method, point, s),
                    lambda s=s, point=point, method=method: run(
                        method, *point[:1], s, cfg, point[1]
                    ),
                )
                for s in cfg.tune_seeds
            ]
            scores[point] = float(np.mean([metrics(r)["final_avg"] for r in runs]))
            grid_rows.append(
                {
                    "method": method,
                    "lr": point[0],
                    "sigma": point[1],
                    "tune_final_avg": scores[point],
                }
            )
            print(f"tune {method:14s} {point} final avg loss {scores[point]:.4f}", flush=True)
        best[method] = min(scores, key=scores.__getitem__)
        lrs = sorted({p[0] for p in scores})
        if len(lrs) > 1 and best[method][0] in (lrs[0], lrs[-1]):
            print(
                f"  note: {method}'s best lr {best[method][0]:g} is at the grid's edge", flush=True
            )

    for variant, base in VARIANTS.items():
        best[variant] = best[base]
    report = {
        method: [
            _cached(
                _run_path(out, "report", method, best[method], s),
                lambda s=s, method=method: run(method, best[method][0], s, cfg, best[method][1]),
            )
            for s in cfg.report_seeds
        ]
        for method in (*METHODS, *VARIANTS)
    }

    timing_path = out / "timing.json"
    shapes = [(cfg.m, cfg.n, cfg.rank, cfg.k_task * (cfg.tasks - 1))]
    if not args.quick:
        shapes.append((1024, 1024, 16, 16))
    timing = _cached(timing_path, lambda: {"rows": time_updates(cfg, shapes)})["rows"]

    summary = []
    for method, results in report.items():
        ms = [metrics(r) for r in results]
        row: dict[str, Any] = {
            "method": method,
            "lr": best[method][0],
            "sigma": best[method][1] if method.startswith("lora_muon_ogd") else "",
            "seeds": len(ms),
        }
        names = ("final_avg", "forgetting", "plasticity", "last_task", "first_task_final")
        for name in (*names, "block_drift"):
            vals = [m_[name] for m_ in ms]
            row[f"{name}_mean"] = float(np.mean(vals))
            row[f"{name}_std"] = float(np.std(vals))
        row["residual_end"] = float(np.mean([r["residual_end"][-1] for r in results]))
        row["pre_avg"] = float(np.mean([np.mean(r["pre"]) for r in results]))
        row["joint_reference_avg"] = float(
            np.mean([np.mean(r["joint_reference"]) for r in results])
        )
        summary.append(row)

    for name, rows in (("summary", summary), ("grid", grid_rows), ("timing", timing)):
        with (out / f"{name}.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    best_json = {m_: list(p) for m_, p in best.items()}
    result = {"summary": summary, "grid": grid_rows, "timing": timing, "best": best_json}
    (out / "summary.json").write_text(json.dumps(result, indent=1))
    if not args.no_plot:
        plot(out, report, cfg)

    print(
        f"\n{'method':16s} {'lr':>6s} {'final avg':>16s} {'forgetting':>16s} "
        f"{'plasticity':>16s} {'block drift':>11s} {'OGD residual':>12s}"
    )
    for row in summary:
        print(
            f"{row['method']:16s} {row['lr']:6g} "
            f"{row['final_avg_mean']:8.4f}±{row['final_avg_std']:.4f} "
            f"{row['forgetting_mean']:8.4f}±{row['forgetting_std']:.4f} "
            f"{row['plasticity_mean']:8.4f}±{row['plasticity_std']:.4f} "
            f"{row['block_drift_mean']:11.3f} {row['residual_end']:12.2e}"
        )
    ref = summary[0]
    print(f"(loss of W0: {ref['pre_avg']:.4f}; of W0 + ΣD_t: {ref['joint_reference_avg']:.5f})")
    for row in timing:
        print(
            f"time {row['shape']:22s} {row['method']:14s} {row['median_us']:9.1f} µs "
            f"x{row['ratio_to_lora_muon']:.2f}"
        )
    print(f"wall time this invocation: {time.perf_counter() - t_start:.0f} s")
    return result


if __name__ == "__main__":
    main()
