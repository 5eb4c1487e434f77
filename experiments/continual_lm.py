"""Continual LM finetuning on a pretrained base: LoRA-Muon-OGD vs LoRA-Muon vs AdamW.

The language-model curriculum of the LoRA-Muon-OGD experiment (docs/lora_muon_ogd.md;
the synthetic one is ``experiments/continual.py``). The base is the finetune study's
pretrained Llama-shaped byte-level decoder (``experiments/finetune_study.py --quick``:
hidden 64, 2 layers, pretrained on the standard library's Python source; regenerated
here when absent), loaded from its HF checkpoint as a user's would be. One rank-``r``
LoRA adapter on q/k/v/o/gate/up/down (α = 2r) then learns three domains in sequence,
all offline on every machine that has this interpreter:

1. ``shakespeare`` — TinyShakespeare (``--data``);
2. ``docs`` — the Python reference manual's prose (``pydoc_data.topics``, English text
   about Python, with code examples);
3. ``dectest`` — the decimal arithmetic test vectors of ``test/decimaltestdata``
   (``*.decTest``: a terse line format of operations, operands and results).

Protocol. Each method keeps one optimizer state through the sequence; every task runs
``steps`` steps with the finetune study's schedule (5 % warmup, cosine to 10 %) restarted
per task, weight decay 0. After tasks 1 and 2, LoRA-Muon-OGD appends the top-``k``
singular directions of that task's ``ΔW = A Bᵀ − A₀B₀ᵀ`` of every adapted projection
(``ogd_bases_from_delta`` + ``update_ogd_bases``; capacity ``num_bases = 2k``), with the
library's defaults otherwise (J = 2 dual steps, σ = 0.01, primal averaging). Learning
rates: each method's half-decade grid (extended while the optimum sits at its edge, up to
five times) runs on tuning seed 100 and is scored on the *validation* windows; the peak with
the lowest final average loss over the three tasks is then run on report seeds 0…S−1
(other adapter inits and batches) and scored on the *test* windows.

Metrics (report seeds, mean ± std over seeds): final average loss over the tasks after the
last one; forgetting = mean over tasks 1–2 of (final loss − loss right after learning it);
plasticity = mean loss on each task right after learning it; the loss on held-out Python
source (the base's own domain) at the end; the wall time of a training step (forward,
backward, update) of each method at its chosen rate, medians of 15 interleaved rounds in
one process (``OUT/timing.json``), as a ratio to LoRA-Muon's.

Resumable: each run is one JSON under ``OUT/runs/`` and is skipped when present (for the
same base weights and settings). Outputs: ``OUT/summary.csv``, ``OUT/grid.csv``,
``OUT/summary.txt``, ``OUT/continual_lm.png``.

Commands (measured numbers: docs/lora_muon_ogd.md):

    .venv/bin/python experiments/continual_lm.py --data ../shared/data/tinyshakespeare.txt
    .venv/bin/python experiments/continual_lm.py --tiny --out /tmp/continual_lm_tiny  # seconds

Hardware: CPU (~25 min on 2 cores); JAX on whatever device it finds.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import pathlib
import platform
import sys
import sysconfig
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import continual  # the synthetic curriculum: its OGD-residual reader
import finetune_study as fs  # the base and its data helpers

from lora_muon_jax import (
    lora_muon,
    lora_muon_ogd,
    ogd_bases_from_delta,
    update_ogd_bases,
)
from lora_muon_jax.finetune import adapt, eval_loss, learning_rate_schedule, loss_fn
from lora_muon_jax.hf import load_pretrained
from lora_muon_jax.hf import text as text_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
METHODS = ("lora_muon_ogd", "lora_muon", "adamw")
TASKS = ("shakespeare", "docs", "dectest")
# Peak learning rates as quarter-decade exponents e, lr = 10^(e/4): half-decade grids.
GRIDS = {"lora_muon_ogd": [-7, -5, -3], "lora_muon": [-7, -5, -3], "adamw": [-10, -8, -6]}
TUNE_SEED = 100


@dataclasses.dataclass(frozen=True)
class Settings:
    rank: int = 8
    steps: int = 200  # per task
    batch: int = 16
    seq_len: int = 64
    k: int = 4  # OGD directions kept per task and adapted projection
    seeds: int = 3
    eval_every: int = 50
    eval_windows: int = 64
    task_bytes: int = 1_000_000


TINY = Settings(rank=4, steps=6, batch=4, seq_len=16, k=2, seeds=1, eval_every=3, eval_windows=4)


def task_texts(shakespeare: pathlib.Path, max_bytes: int) -> dict[str, str]:
    """The three domains' texts (each cut to ``max_bytes``)."""
    from pydoc_data import topics

    dec = pathlib.Path(sysconfig.get_paths()["stdlib"]) / "test" / "decimaltestdata"
    files = sorted(dec.glob("*.decTest"))
    if not files:
        raise FileNotFoundError(
            f"{dec}: no *.decTest files (this interpreter's standard library has no test "
            "package); the third task needs them"
        )
    texts = {
        "shakespeare": shakespeare.read_text(encoding="utf-8"),
        "docs": "\n\n".join(topics.topics[key] for key in sorted(topics.topics)),
        "dectest": "\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files),
    }
    return {name: text[:max_bytes] for name, text in texts.items()}


@dataclasses.dataclass
class Domain:
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def make_domains(ids: dict[str, np.ndarray], s: Settings) -> dict[str, Domain]:
    out = {}
    for name, x in ids.items():
        train, held = text_lib.split_ids(x, 0.1)
        half = len(held) // 2
        out[name] = Domain(
            train,
            text_lib.eval_windows(held[:half], s.seq_len, s.eval_windows),
            text_lib.eval_windows(held[half:], s.seq_len, s.eval_windows),
        )
    return out


def make_tx(method: str, s: Settings) -> optax.GradientTransformation:
    """The factors' optimizer; its peak learning rate a hyperparameter set every step."""
    if method == "lora_muon":
        return optax.inject_hyperparams(lora_muon, static_args=("lora_scale",))(
            learning_rate=0.0, weight_decay=0.0, lora_scale=2.0
        )
    if method == "lora_muon_ogd":
        static = ("lora_scale", "num_bases", "dual_steps")
        return optax.inject_hyperparams(lora_muon_ogd, static_args=static)(
            learning_rate=0.0, num_bases=s.k * (len(TASKS) - 1), weight_decay=0.0, lora_scale=2.0
        )
    if method == "adamw":
        return optax.inject_hyperparams(optax.adamw)(learning_rate=0.0, weight_decay=0.0)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


_STEPS: dict[tuple[str, Settings], Any] = {}


def step_fns(method: str, s: Settings, graphdef: Any) -> tuple[optax.GradientTransformation, Any]:
    """The optimizer, a jitted training step and a jitted loss (compiled once per method)."""
    if (method, s) not in _STEPS:
        tx = make_tx(method, s)

        def merged(lora: Any, rest: Any) -> Any:
            return nnx.merge(graphdef, lora, rest)

        @jax.jit
        def train(lora, rest, opt_state, batch, lr):  # type: ignore[no-untyped-def]
            opt_state.hyperparams["learning_rate"] = lr
            loss, grads = jax.value_and_grad(lambda p: loss_fn(merged(p, rest), batch))(lora)
            updates, opt_state = tx.update(grads, opt_state, lora)
            return optax.apply_updates(lora, updates), opt_state, loss

        @jax.jit
        def evaluate(lora, rest, batch):  # type: ignore[no-untyped-def]
            return eval_loss(merged(lora, rest), batch)

        _STEPS[method, s] = (tx, train, evaluate)
    return _STEPS[method, s]


def run(
    base: pathlib.Path, domains: dict[str, Domain], s: Settings, method: str, lr: float, seed: int
) -> dict[str, Any]:
    """One method at one peak learning rate through the three tasks."""
    model = load_pretrained(base)
    adapt(model, rank=s.rank, alpha=2.0 * s.rank, seed=seed)
    graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
    tx, train, evaluate = step_fns(method, s, graphdef)
    opt_state = tx.init(lora)
    split = "val" if seed == TUNE_SEED else "test"
    held = {name: getattr(d, split) for name, d in domains.items()}
    held["python"] = domains["python"].test

    def losses(lora: Any) -> dict[str, float]:
        return {
            name: float(np.mean([float(evaluate(lora, rest, jnp.asarray(b))) for b in w]))
            for name, w in ((n, np.array_split(x, 4)) for n, x in held.items())
        }

    schedule = learning_rate_schedule(lr, s.steps)
    pre = losses(lora)
    curve, matrix, times, finite = [(0, pre)], [], [], True
    residual: list[float] = []
    for t, task in enumerate(TASKS):
        start = lora
        for i in range(s.steps):
            batch = jnp.asarray(
                fs.batch_at(domains[task].train, seed, t * s.steps + i, s.batch, s.seq_len)
            )
            t0 = time.perf_counter()
            lora, opt_state, loss = train(lora, rest, opt_state, batch, jnp.float32(schedule(i)))
            loss = float(loss)
            times.append(time.perf_counter() - t0)
            finite = finite and math.isfinite(loss)
            if (i + 1) % s.eval_every == 0 and i + 1 < s.steps:
                curve.append((t * s.steps + i + 1, losses(lora)))
        after = losses(lora)
        curve.append(((t + 1) * s.steps, after))
        matrix.append(after)
        residual.append(float(continual.ogd_residual(opt_state)))
        if method == "lora_muon_ogd" and t < len(TASKS) - 1:
            bases = ogd_bases_from_delta(lora, start, s.k)
            opt_state = update_ogd_bases(opt_state, bases)
    return {
        "method": method,
        "lr": lr,
        "seed": seed,
        "split": split,
        "pre": pre,
        "matrix": matrix,  # matrix[t][domain]: loss after learning task t
        "curve": curve,
        "ogd_residual_end": residual,  # per task, at its last step (0 before any bases)
        "median_step_s": float(np.median(times[1:])) if len(times) > 1 else float("nan"),
        "finite": finite,
    }


def metrics(record: dict[str, Any]) -> dict[str, float]:
    """Final average, forgetting, plasticity (over the tasks) and the base domain's loss."""
    if not record["finite"]:
        return {
            "final_avg": math.inf,
            "forgetting": math.inf,
            "plasticity": math.inf,
            "python": math.inf,
        }
    mat, last = record["matrix"], record["matrix"][-1]
    return {
        "final_avg": float(np.mean([last[t] for t in TASKS])),
        "forgetting": float(np.mean([last[t] - mat[i][t] for i, t in enumerate(TASKS[:-1])])),
        "plasticity": float(np.mean([mat[i][t] for i, t in enumerate(TASKS)])),
        "python": float(last["python"]),
    }


class Study:
    def __init__(
        self, out: pathlib.Path, base: pathlib.Path, domains: dict[str, Domain], s: Settings
    ):
        self.out, self.base, self.domains, self.s = out, base, domains, s
        self.key = {"base": fs.fingerprint(base), "settings": dataclasses.asdict(s)}
        (out / "runs").mkdir(parents=True, exist_ok=True)

    def get(self, method: str, lr: float, seed: int) -> dict[str, Any]:
        file = self.out / "runs" / f"{method}_lr{lr:.4g}_s{seed}.json"
        if file.exists():
            record = json.loads(file.read_text())
            if record.get("key") == self.key:
                return record
        t0 = time.perf_counter()
        record = run(self.base, self.domains, self.s, method, lr, seed)
        record["key"], record["wall_s"] = self.key, time.perf_counter() - t0
        file.write_text(json.dumps(record))
        m = metrics(record)
        print(
            f"  {method:14s} lr={lr:<8.4g} seed={seed:3d}: final avg {m['final_avg']:.4f} "
            f"forgetting {m['forgetting']:+.4f} plasticity {m['plasticity']:.4f} "
            f"python {m['python']:.4f} ({record['wall_s']:.0f} s)",
            flush=True,
        )
        return record

    def best_lr(self, method: str) -> tuple[float, list[dict[str, Any]]]:
        """Tuning seed, validation windows; the grid extends while its optimum is at an edge."""
        grid = list(GRIDS[method])
        for _ in range(6):
            records = [self.get(method, fs.lr_of(e), TUNE_SEED) for e in grid]
            best = int(np.argmin([metrics(r)["final_avg"] for r in records]))
            if 0 < best < len(grid) - 1 or len(grid) >= len(GRIDS[method]) + 5:
                break
            grid = [grid[0] - 2, *grid] if best == 0 else [*grid, grid[-1] + 2]
        records = [self.get(method, fs.lr_of(e), TUNE_SEED) for e in grid]
        best = int(np.argmin([metrics(r)["final_avg"] for r in records]))
        return fs.lr_of(grid[best]), records


def time_steps(study: Study, chosen: dict[str, float], rounds: int = 15) -> dict[str, float]:
    """Median seconds per training step of each method, interleaved in this process.

    Each round runs 10 steps of every method in turn on the same batches (task 1, the
    chosen learning rates), so load on the machine hits all methods alike.
    """
    s, runs = study.s, {}
    batches = [
        jnp.asarray(fs.batch_at(study.domains[TASKS[0]].train, 0, i, s.batch, s.seq_len))
        for i in range(10)
    ]
    for method in METHODS:
        model = load_pretrained(study.base)
        adapt(model, rank=s.rank, alpha=2.0 * s.rank, seed=0)
        graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
        tx, train, _ = step_fns(method, s, graphdef)
        runs[method] = [lora, rest, tx.init(lora), train]
    samples: dict[str, list[float]] = {m: [] for m in METHODS}
    for r in range(rounds + 1):  # round 0 compiles and warms up
        for method in METHODS:
            lora, rest, opt_state, train = runs[method]
            lr = jnp.float32(chosen[method])
            t0 = time.perf_counter()
            for batch in batches:
                lora, opt_state, loss = train(lora, rest, opt_state, batch, lr)
            jax.block_until_ready((lora, opt_state, loss))
            if r:
                samples[method].append((time.perf_counter() - t0) / len(batches))
            runs[method][0], runs[method][2] = lora, opt_state
    return {m: float(np.median(v)) for m, v in samples.items()}


def _mean_sd(values: list[float]) -> str:
    sd = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return f"{np.mean(values):.4f} ± {sd:.4f}"


def report(
    out: pathlib.Path,
    step: dict[str, float],
    chosen: dict[str, float],
    runs: dict[str, list[dict[str, Any]]],
    grids: dict[str, list[dict[str, Any]]],
    base_losses: dict[str, float],
) -> str:
    rows = []
    for method, records in runs.items():
        ms = [metrics(r) for r in records]
        rows.append(
            {
                "method": method,
                "lr": chosen[method],
                "seeds": len(records),
                **{k: float(np.mean([m[k] for m in ms])) for k in ms[0]},
                **{
                    f"{k}_sd": float(np.std([m[k] for m in ms], ddof=1)) if len(ms) > 1 else 0.0
                    for k in ms[0]
                },
                **{
                    f"final_{t}": float(np.mean([r["matrix"][-1][t] for r in records]))
                    for t in TASKS
                },
                "step_s": step[method],
                "step_ratio_vs_lora_muon": step[method] / step["lora_muon"],
            }
        )
    with (out / "summary.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with (out / "grid.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "lr", "final_avg_val", "forgetting_val", "plasticity_val"])
        for method, records in grids.items():
            for r in sorted(records, key=lambda r: r["lr"]):
                m = metrics(r)
                w.writerow([method, r["lr"], m["final_avg"], m["forgetting"], m["plasticity"]])
    lines = [
        "method          best lr   final avg (3 tasks)   forgetting         plasticity        "
        "python (base domain)  step time",
        "-" * 118,
    ]
    for row, (method, records) in zip(rows, runs.items(), strict=True):
        ms = [metrics(r) for r in records]
        lines.append(
            f"{method:14s} {row['lr']:<9.4g} {_mean_sd([m['final_avg'] for m in ms]):19s} "
            f"{_mean_sd([m['forgetting'] for m in ms]):18s} "
            f"{_mean_sd([m['plasticity'] for m in ms]):17s} "
            f"{_mean_sd([m['python'] for m in ms]):21s} {row['step_ratio_vs_lora_muon']:.2f}×"
        )
    lines.append(
        "base model (no adapter): "
        + ", ".join(f"{k} {v:.4f}" for k, v in base_losses.items())
        + " nats/byte; means ± sd over seeds, test windows; step time: whole training step,"
        " interleaved medians (timing.json), as a ratio to lora_muon's"
    )
    return "\n".join(lines)


def plot(out: pathlib.Path, runs: dict[str, list[dict[str, Any]]], s: Settings) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(TASKS) + 1, figsize=(18, 4), sharex=True)
    colors = {"lora_muon_ogd": "C0", "lora_muon": "C1", "adamw": "C2"}
    for method, records in runs.items():
        steps = [c[0] for c in records[0]["curve"]]
        for ax, domain in zip(axes, (*TASKS, "python"), strict=True):
            ys = np.mean([[c[1][domain] for c in r["curve"]] for r in records], axis=0)
            ax.plot(steps, ys, color=colors[method], label=method)
            ax.set_title(f"held-out loss: {domain}")
    for ax in axes:
        for t in range(1, len(TASKS)):
            ax.axvline(t * s.steps, color="0.7", lw=0.8)
        ax.set_xlabel("training step (tasks in order: " + " → ".join(TASKS) + ")")
    axes[0].set_ylabel("nats per byte (mean of seeds)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out / "continual_lm.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"))
    p.add_argument(
        "--base",
        default=None,
        help="HF checkpoint dir (default: the finetune "
        "study's quick base, pretrained here if absent)",
    )
    p.add_argument("--out", default=None)
    p.add_argument("--tiny", action="store_true", help="seconds; for tests")
    p.add_argument("--seeds", type=int, default=None)
    args = p.parse_args(argv)
    s = TINY if args.tiny else Settings()
    if args.seeds is not None:
        s = dataclasses.replace(s, seeds=args.seeds)
    out = pathlib.Path(args.out or ROOT / "experiments" / "results" / "continual_lm")
    out.mkdir(parents=True, exist_ok=True)
    print(
        f"continual LM study: jax {jax.__version__}, {jax.devices()[0].device_kind}, "
        f"python {platform.python_version()}, out {out}",
        flush=True,
    )
    texts = task_texts(pathlib.Path(args.data), 20_000 if args.tiny else s.task_bytes)
    tokenizer = text_lib.ByteTokenizer()
    python_text = fs.python_source(200_000 if args.tiny else 3_000_000)
    ids = {name: tokenizer.encode(text) for name, text in texts.items()}
    ids["python"] = tokenizer.encode(python_text)
    domains = make_domains(ids, s)
    scale = fs.SCALES["tiny" if args.tiny else "quick"]
    default_base = (
        out if args.tiny else ROOT / "experiments/results/finetune_study/quick"
    ) / "base"
    base = pathlib.Path(args.base) if args.base else default_base
    if not (base / "model.safetensors").exists():
        print(f"pretraining the base on Python source into {base} ...", flush=True)
        fs.pretrain(base, scale, ids["python"])
    study = Study(out, base, domains, s)
    chosen, grids, runs = {}, {}, {}
    for method in METHODS:
        chosen[method], grids[method] = study.best_lr(method)
        runs[method] = [study.get(method, chosen[method], seed) for seed in range(s.seeds)]
    probe = load_pretrained(base)
    base_losses = {
        name: float(
            np.mean([float(eval_loss(probe, jnp.asarray(b))) for b in np.array_split(d.test, 4)])
        )
        for name, d in domains.items()
    }
    timing_file = out / "timing.json"
    stored = json.loads(timing_file.read_text()) if timing_file.exists() else {}
    if stored.get("key") == study.key and stored.get("chosen") == chosen:
        step = stored["seconds"]
    else:
        step = time_steps(study, chosen, rounds=3 if args.tiny else 15)
        timing_file.write_text(json.dumps({"key": study.key, "chosen": chosen, "seconds": step}))
    table = report(out, step, chosen, runs, grids, base_losses)
    (out / "summary.txt").write_text(table + "\n")
    plot(out, runs, s)
    print(table)
    return {"chosen": chosen, "runs": runs, "table": table}


if __name__ == "__main__":
    main()
