"""Finetuning study: LoRA-Muon vs AdamW vs LoRA+ on a pretrained Llama-shaped checkpoint.

What a user would do, end to end, on data every machine has offline:

1. **Pretrain** a small Llama-shaped decoder (byte-level, vocabulary 256) on domain A,
   Python source (the standard library's ``*.py`` files, read from this interpreter);
   **save it as an HF checkpoint** (``config.json`` + ``model.safetensors``) and
   **load it back** with ``lora_muon_jax.hf.load_pretrained``, as a user's would be.
   ``--model PATH`` skips this and uses your checkpoint (its ``tokenizer.json``, if any).
2. **LoRA-finetune** q/k/v/o/gate/up/down (α = 2r) on domain B, TinyShakespeare
   (``--data``), with three optimizers on the factors — ``lora_muon``, AdamW, and LoRA+
   (AdamW, B's learning rate ×16) — each over a learning-rate grid that must bracket
   its optimum (an optimum at the grid's edge extends the grid by one point, up to
   3 times), refined to quarter decades, for the first rank in ``--ranks``; later ranks
   start from a half-decade grid centred on the first rank's optimum, extended by the
   same rule (refined too with ``--refine-all``). All runs of a seed see the same batches;
   the peak learning rate follows linear warmup (5 %) and cosine decay to 10 %.
3. **Select** each optimizer's learning rate on the *validation* half of the held-out
   Shakespeare (seed 0), then run ``--seeds`` seeds at it and report the *test* half:
   held-out loss against steps, and the loss on held-out Python source (forgetting;
   the base model's is the reference).
4. **Time** the whole training step (forward, backward, optimizer) of the three
   optimizers interleaved in the same process, on the same batches, as ratios to AdamW.

Every run is one JSON file under ``OUT/runs/`` and is skipped when present, so an
interrupted study resumes where it stopped (run the same command again). Outputs:
``OUT/summary.csv``, ``OUT/curves.csv``, ``OUT/grid.csv``, ``OUT/timing.csv``,
``OUT/study.png`` and the printed table; ``OUT/base/`` holds the pretrained checkpoint
(regenerated, not committed).

Commands (measured numbers: docs/finetune_study.md):

    python experiments/finetune_study.py --quick --data ../shared/data/tinyshakespeare.txt
    python experiments/finetune_study.py --data ../shared/data/tinyshakespeare.txt
    python experiments/finetune_study.py --model /path/to/Llama-3.2-1B --data FILE \\
        --steps 500 --batch 16 --seq-len 512 --out experiments/results/finetune_study/llama

Hardware: CPU is enough for ``--quick`` (~6 min on 2 cores) and the default study; a
real checkpoint wants a GPU/TPU (the devices JAX sees are used; no sharding is set up
here: ``python -m lora_muon_jax.finetune --mesh`` shows how).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import hashlib
import json
import math
import pathlib
import platform
import sys
import sysconfig
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from lora_muon_jax import (
    finetune,
    lora_muon,
)
from lora_muon_jax.finetune import adapt, eval_loss, learning_rate_schedule, loss_fn
from lora_muon_jax.hf import load_pretrained
from lora_muon_jax.hf import text as text_lib
from lora_muon_jax.hf.checkpoint import hf_tensors, save_pretrained
from lora_muon_jax.hf.config import DecoderConfig
from lora_muon_jax.hf.model import CausalLM

ROOT = pathlib.Path(__file__).resolve().parents[1]
OPTIMIZERS = ("lora_muon", "adamw", "loraplus")
LORAPLUS_RATIO = 16.0
# Peak learning rates as exponents e in quarter decades, lr = 10^(e/4) (LoRA+: A's learning
# rate; B gets 16×). A half-decade grid first; an optimum at its edge extends it by half a
# decade (≤ 3 times); then the quarter decades either side of the optimum refine it.
GRIDS = {
    "lora_muon": [-8, -6, -4],  # 0.01, 0.0316, 0.1
    "adamw": [-14, -12, -10],  # 3.16e-4, 1e-3, 3.16e-3
    "loraplus": [-16, -14, -12],  # 1e-4, 3.16e-4, 1e-3
}


def lr_of(exponent: int) -> float:
    return float(10.0 ** (exponent / 4))


@dataclasses.dataclass(frozen=True)
class Scale:
    """Model and budget of one study size."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    pretrain_steps: int
    pretrain_lr: float
    steps: int
    batch: int
    seq_len: int
    ranks: tuple[int, ...]
    seeds: int
    eval_every: int
    eval_windows: int


SCALES = {
    "quick": Scale(64, 2, 4, 2, 192, 1000, 3e-3, 200, 16, 64, (8,), 3, 25, 64),
    "default": Scale(128, 4, 4, 2, 384, 1500, 2e-3, 200, 16, 128, (8, 32), 3, 40, 64),
    "tiny": Scale(32, 2, 2, 1, 64, 20, 3e-3, 8, 4, 16, (4,), 1, 4, 4),  # the test's
}


# ------------------------------------------------------------------------------- data


def python_source(max_bytes: int) -> str:
    """Domain A: this interpreter's standard-library ``*.py`` files (sorted; no tests)."""
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    chunks, size = [], 0
    for file in sorted(stdlib.rglob("*.py")):
        parts = file.relative_to(stdlib).parts
        if parts[0] in ("site-packages", "dist-packages", "test", "idlelib") or "tests" in parts:
            continue
        try:
            text = file.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        chunks.append(text)
        size += len(text.encode("utf-8"))
        if size >= max_bytes:
            break
    return "\n".join(chunks)


@dataclasses.dataclass
class Data:
    train: np.ndarray  # domain B training ids
    val: np.ndarray  # domain B held-out windows (LR selection)
    test: np.ndarray  # domain B held-out windows (reported)
    old: np.ndarray  # domain A held-out windows (forgetting)


def make_data(new_ids: np.ndarray, old_ids: np.ndarray, seq_len: int, windows: int) -> Data:
    train, held = text_lib.split_ids(new_ids, 0.1)
    half = len(held) // 2
    _, old_held = text_lib.split_ids(old_ids, 0.1)
    return Data(
        train=train,
        val=text_lib.eval_windows(held[:half], seq_len, windows),
        test=text_lib.eval_windows(held[half:], seq_len, windows),
        old=text_lib.eval_windows(old_held, seq_len, windows),
    )


def batch_at(ids: np.ndarray, seed: int, step: int, batch: int, seq_len: int) -> np.ndarray:
    """The batch of ``step`` for ``seed``: the same for every optimizer."""
    return text_lib.windows(ids, batch, seq_len, np.random.default_rng([seed, step]))


# ------------------------------------------------------------------------------- base


def pretrain(out: pathlib.Path, scale: Scale, old_ids: np.ndarray) -> pathlib.Path:
    """Pretrain on domain A with AdamW (all parameters) and save an HF checkpoint."""
    hf = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 256,
        "hidden_size": scale.hidden,
        "intermediate_size": scale.intermediate,
        "num_hidden_layers": scale.layers,
        "num_attention_heads": scale.heads,
        "num_key_value_heads": scale.kv_heads,
        "head_dim": scale.hidden // scale.heads,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 1024,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }
    config = DecoderConfig.from_hf(hf)
    model = CausalLM(config, rngs=nnx.Rngs(0))
    schedule = learning_rate_schedule(scale.pretrain_lr, scale.pretrain_steps)
    optimizer = nnx.Optimizer(model, optax.adamw(schedule, weight_decay=0.01), wrt=nnx.Param)

    @nnx.jit
    def step(model: CausalLM, optimizer: nnx.Optimizer, batch: jax.Array) -> jax.Array:
        loss, grads = nnx.value_and_grad(loss_fn)(model, batch)
        optimizer.update(model, grads)
        return loss

    train, _ = text_lib.split_ids(old_ids, 0.1)
    t0 = time.perf_counter()
    for t in range(scale.pretrain_steps):
        loss = step(model, optimizer, jnp.asarray(batch_at(train, 10_000, t, 32, scale.seq_len)))
        if (t + 1) % max(1, scale.pretrain_steps // 10) == 0:
            print(
                f"  pretrain step {t + 1}: loss {float(loss):.3f} "
                f"({time.perf_counter() - t0:.0f} s)"
            )
    tensors = hf_tensors(nnx.to_pure_dict(nnx.state(model, nnx.Param)), config, stacked=False)
    with tempfile.TemporaryDirectory() as staging:
        (pathlib.Path(staging) / "config.json").write_text(json.dumps(hf, indent=2))
        save_pretrained(tensors, staging, out)
    return out


# ------------------------------------------------------------------------------- runs


@functools.cache  # one object per optimizer: nnx.jit compiles each step function once
def make_tx(name: str, scale_ab: float) -> optax.GradientTransformation:
    """The factors' optimizer, its peak learning rate a hyperparameter set every step."""

    def loraplus(learning_rate: float) -> optax.GradientTransformation:
        return finetune.loraplus(learning_rate, ratio=LORAPLUS_RATIO)

    if name == "lora_muon":
        return optax.inject_hyperparams(lora_muon, static_args=("lora_scale",))(
            learning_rate=0.0, weight_decay=0.0, lora_scale=scale_ab
        )
    if name == "adamw":
        return optax.inject_hyperparams(optax.adamw)(learning_rate=0.0, weight_decay=0.0)
    if name == "loraplus":
        return optax.inject_hyperparams(loraplus)(learning_rate=0.0)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")


@nnx.jit
def train_step(
    model: CausalLM, optimizer: nnx.Optimizer, batch: jax.Array, lr: jax.Array
) -> jax.Array:
    optimizer.opt_state.hyperparams["learning_rate"][...] = lr
    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model, batch)
    optimizer.update(model, grads)
    return loss


def evaluate(model: CausalLM, windows: np.ndarray) -> float:
    return float(np.mean([float(eval_loss(model, jnp.asarray(w))) for w in np.split(windows, 4)]))


def build(base: pathlib.Path, name: str, rank: int, seed: int) -> tuple[CausalLM, nnx.Optimizer]:
    model = load_pretrained(base)
    adapt(model, rank=rank, alpha=2.0 * rank, seed=seed)
    return model, nnx.Optimizer(model, make_tx(name, 2.0), wrt=nnx.LoRAParam)


def run(
    base: pathlib.Path, data: Data, scale: Scale, name: str, rank: int, lr: float, seed: int
) -> dict[str, Any]:
    model, optimizer = build(base, name, rank, seed)
    schedule = learning_rate_schedule(lr, scale.steps)
    curve = [(0, evaluate(model, data.val), evaluate(model, data.test))]
    times, losses = [], []
    for t in range(scale.steps):
        batch = jnp.asarray(batch_at(data.train, seed, t, scale.batch, scale.seq_len))
        start = time.perf_counter()
        loss = float(train_step(model, optimizer, batch, jnp.float32(schedule(t))))
        times.append(time.perf_counter() - start)
        losses.append(loss)
        if not math.isfinite(loss):
            break
        if (t + 1) % scale.eval_every == 0 or t + 1 == scale.steps:
            curve.append((t + 1, evaluate(model, data.val), evaluate(model, data.test)))
    return {
        "optimizer": name,
        "rank": rank,
        "lr": lr,
        "seed": seed,
        "curve": curve,
        "train_loss": losses,
        "old_loss": evaluate(model, data.old),
        "median_step_s": float(np.median(times[1:])) if len(times) > 1 else float("nan"),
        "finite": all(math.isfinite(v) for v in losses),
    }


def final(record: dict[str, Any], which: int) -> float:
    """Final held-out loss (``which`` 1: validation, 2: test); ∞ for a diverged run."""
    value = record["curve"][-1][which] if record["finite"] else float("inf")
    return value if math.isfinite(value) else float("inf")


def fingerprint(base: pathlib.Path) -> str:
    """SHA-256 of the base's weights: a stored run is reused only for the same base."""
    digest = hashlib.sha256()
    for file in sorted(base.glob("*.safetensors")):
        with file.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def run_settings(scale: dict[str, Any]) -> dict[str, Any]:
    """What one run's result depends on: the scale without the study's ranks and seeds."""
    return {k: v for k, v in json.loads(json.dumps(scale)).items() if k not in ("ranks", "seeds")}


class Study:
    def __init__(self, out: pathlib.Path, base: pathlib.Path, data: Data, scale: Scale):
        self.out, self.base, self.data, self.scale = out, base, data, scale
        self.refine_all = False
        self.base_id = fingerprint(base)
        self.scale_id = run_settings(dataclasses.asdict(scale))
        (out / "runs").mkdir(parents=True, exist_ok=True)

    def get(self, name: str, rank: int, lr: float, seed: int) -> dict[str, Any]:
        file = self.out / "runs" / f"r{rank}_{name}_lr{lr:.4g}_s{seed}.json"
        if file.exists():
            record = json.loads(file.read_text())
            stored = run_settings(record.get("scale", {}))
            if record.get("base") == self.base_id and stored == self.scale_id:
                return record
        t0 = time.perf_counter()
        record = run(self.base, self.data, self.scale, name, rank, lr, seed)
        record.update(base=self.base_id, scale=self.scale_id)
        record["wall_s"] = time.perf_counter() - t0
        file.write_text(json.dumps(record))
        print(
            f"  r={rank} {name:9s} lr={lr:<8.4g} seed={seed}: val {final(record, 1):.4f} "
            f"test {final(record, 2):.4f} old {record['old_loss']:.4f} "
            f"({record['wall_s']:.0f} s)",
            flush=True,
        )
        return record

    def best_lr(
        self, name: str, rank: int, centre: float | None = None
    ) -> tuple[float, list[dict[str, Any]]]:
        """Seed 0: the grid, extended while the optimum is at its edge, then refined.

        ``centre``: another rank's optimum; the half-decade grid is then centred on it,
        extended by the same rule, and refined only with ``--refine-all`` (the optimum
        is then bracketed at half-decade resolution).
        """
        grid = list(GRIDS[name])
        if centre is not None:
            e = round(4 * math.log10(centre))
            grid = [e - 2, e, e + 2]
        for _ in range(4):
            records = [self.get(name, rank, lr_of(e), 0) for e in grid]
            best = int(np.argmin([final(r, 1) for r in records]))
            if 0 < best < len(grid) - 1 or len(grid) >= len(GRIDS[name]) + 3:
                break
            grid = [grid[0] - 2, *grid] if best == 0 else [*grid, grid[-1] + 2]
        if centre is None or self.refine_all:
            grid = sorted({*grid, grid[best] - 1, grid[best] + 1})
            records = [self.get(name, rank, lr_of(e), 0) for e in grid]
            best = int(np.argmin([final(r, 1) for r in records]))
        return lr_of(grid[best]), records


# ------------------------------------------------------------------------------- timing


def time_steps(study: Study, rank: int, lrs: dict[str, float], rounds: int) -> dict[str, float]:
    """Median whole-step time of each optimizer, interleaved on the same batches."""
    runs = {name: build(study.base, name, rank, 0) for name in OPTIMIZERS}
    times: dict[str, list[float]] = {name: [] for name in OPTIMIZERS}
    scale = study.scale
    for t in range(rounds + 2):
        batch = jnp.asarray(batch_at(study.data.train, 0, t, scale.batch, scale.seq_len))
        order = OPTIMIZERS[t % 3 :] + OPTIMIZERS[: t % 3]
        for name in order:
            model, optimizer = runs[name]
            lr = jnp.float32(lrs[name])
            start = time.perf_counter()
            jax.block_until_ready(train_step(model, optimizer, batch, lr))
            if t >= 2:  # the first two: compilation and warm-up
                times[name].append(time.perf_counter() - start)
    return {name: float(np.median(v)) for name, v in times.items()}


# ------------------------------------------------------------------------------- report


def paired_difference(test: np.ndarray, reference: Sequence[float]) -> tuple[float, float]:
    """Mean of ``test − reference`` paired by seed, and its 95 % confidence half-width (t)."""
    import scipy.stats  # jax's own dependency

    d = np.asarray(test) - np.asarray(reference)
    if len(d) < 2 or not d.any():
        return float(d.mean()), float("nan") if len(d) < 2 else 0.0
    half = scipy.stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
    return float(d.mean()), float(half)


def write_reports(study: Study, results: dict[int, dict[str, Any]], base_old: float) -> str:
    out = study.out
    lines = []
    with open(out / "summary.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "rank",
                "optimizer",
                "lr",
                "seeds",
                "test_mean",
                "test_std",
                "val_mean",
                "old_mean",
                "forgetting_mean",
                "test_minus_adamw_mean",
                "test_minus_adamw_ci95",
                "step_time_ratio_vs_adamw",
            ]
        )
        header = (
            f"{'rank':>4} {'optimizer':10} {'best lr':>8} {'test loss (mean ± sd)':>22} "
            f"{'old-domain loss':>15} {'Δ test vs adamw (95% CI)':>25} {'step time':>10}"
        )
        lines += [header, "-" * len(header)]
        for rank, res in results.items():
            for name in OPTIMIZERS:
                rec = res["seeds"][name]
                test = np.array([final(r, 2) for r in rec])
                val = np.array([final(r, 1) for r in rec])
                old = np.array([r["old_loss"] for r in rec])
                ratio = res["timing"][name] / res["timing"]["adamw"]
                sd = float(test.std(ddof=1)) if len(test) > 1 else float("nan")
                delta, ci = paired_difference(test, [final(r, 2) for r in res["seeds"]["adamw"]])
                w.writerow(
                    [
                        rank,
                        name,
                        res["lr"][name],
                        len(rec),
                        f"{test.mean():.5f}",
                        f"{sd:.5f}",
                        f"{val.mean():.5f}",
                        f"{old.mean():.5f}",
                        f"{old.mean() - base_old:.5f}",
                        f"{delta:.5f}",
                        f"{ci:.5f}",
                        f"{ratio:.3f}",
                    ]
                )
                lines.append(
                    f"{rank:>4} {name:10} {res['lr'][name]:>8.4g} "
                    f"{test.mean():>13.4f} ± {sd:<6.4f} {old.mean():>15.4f} "
                    + (
                        f"{'(reference)':>25}"
                        if name == "adamw"
                        else f"{delta:>+15.4f} ± {ci:<7.4f}"
                    )
                    + f" {ratio:>9.2f}×"
                )
    lines.append(
        f"base model: old-domain (Python) loss {base_old:.4f}, new-domain (Shakespeare) test "
        f"loss {results[next(iter(results))]['base_test']:.4f} nats/token"
    )
    with open(out / "curves.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["rank", "optimizer", "lr", "seed", "step", "val_loss", "test_loss"])
        for rank, res in results.items():
            for name in OPTIMIZERS:
                for r in res["seeds"][name]:
                    for step, val, test in r["curve"]:
                        w.writerow([rank, name, r["lr"], r["seed"], step, val, test])
    with open(out / "grid.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["rank", "optimizer", "lr", "val_loss", "test_loss", "old_loss"])
        for rank, res in results.items():
            for name in OPTIMIZERS:
                for r in sorted(res["grid"][name], key=lambda r: r["lr"]):
                    w.writerow([rank, name, r["lr"], final(r, 1), final(r, 2), r["old_loss"]])
    with open(out / "timing.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["rank", "optimizer", "median_step_s", "ratio_vs_adamw", "device"])
        for rank, res in results.items():
            for name in OPTIMIZERS:
                t = res["timing"][name]
                w.writerow(
                    [
                        rank,
                        name,
                        f"{t:.6f}",
                        f"{t / res['timing']['adamw']:.3f}",
                        jax.devices()[0].device_kind,
                    ]
                )
    plot(study, results)
    return "\n".join(lines)


def plot(study: Study, results: dict[int, dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"lora_muon": "C3", "adamw": "C0", "loraplus": "C2"}
    ranks = list(results)
    fig, axes = plt.subplots(3, len(ranks), figsize=(5.5 * len(ranks), 11), squeeze=False)
    for j, rank in enumerate(ranks):
        res = results[rank]
        ax = axes[0, j]
        for name in OPTIMIZERS:
            curves = np.array([[c[2] for c in r["curve"]] for r in res["seeds"][name]])
            steps = [c[0] for c in res["seeds"][name][0]["curve"]]
            mean = curves.mean(axis=0)
            ax.plot(steps, mean, color=colors[name], label=f"{name} (lr {res['lr'][name]:.3g})")
            if len(curves) > 1:
                ax.fill_between(
                    steps, curves.min(axis=0), curves.max(axis=0), color=colors[name], alpha=0.2
                )
        ax.set(
            title=f"rank {rank}: held-out Shakespeare (test)",
            xlabel="step",
            ylabel="loss (nats/token)",
        )
        ax.legend()
        ax = axes[1, j]
        for name in OPTIMIZERS:
            grid = sorted(res["grid"][name], key=lambda r: r["lr"])
            lrs = np.array([r["lr"] for r in grid])
            rel = lrs / res["lr"][name]
            ax.plot(rel, [final(r, 1) for r in grid], "o-", color=colors[name], label=name)
        ax.set_xscale("log")
        ax.set(title=f"rank {rank}: LR grid (seed 0, validation)", xlabel="lr / best lr")
        ax.set_ylabel("final loss")
        ax.legend()
        ax = axes[2, j]
        old = [[r["old_loss"] for r in res["seeds"][name]] for name in OPTIMIZERS]
        ax.bar(
            range(3),
            [np.mean(o) for o in old],
            yerr=[np.std(o) for o in old],
            color=[colors[n] for n in OPTIMIZERS],
        )
        ax.axhline(res["base_old"], color="k", ls="--", label="base model")
        ax.set_xticks(range(3), list(OPTIMIZERS))
        ax.set(title=f"rank {rank}: loss on held-out Python (forgetting)", ylabel="loss")
        ax.legend()
    fig.tight_layout()
    fig.savefig(study.out / "study.png", dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument(
        "--data",
        default=str(ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"),
        help="domain B text file (TinyShakespeare)",
    )
    p.add_argument("--model", default=None, help="an HF checkpoint directory: skip pretraining")
    p.add_argument("--old-data", default=None, help="domain A text file (default: Python stdlib)")
    p.add_argument("--out", default=None, help="results directory")
    p.add_argument("--quick", action="store_true", help="the README's short version")
    p.add_argument("--tiny", action="store_true", help="seconds; for tests")
    p.add_argument("--ranks", default=None, help="comma-separated, e.g. 8,32")
    p.add_argument("--seeds", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--timing-rounds", type=int, default=20)
    p.add_argument(
        "--refine-all",
        action="store_true",
        help="refine every rank's LR to quarter decades (default: the first rank's only)",
    )
    args = p.parse_args(argv)

    mode = "tiny" if args.tiny else "quick" if args.quick else "default"
    scale = SCALES[mode]
    overrides = {
        "ranks": tuple(int(r) for r in args.ranks.split(",")) if args.ranks else None,
        "seeds": args.seeds,
        "steps": args.steps,
        "batch": args.batch,
        "seq_len": args.seq_len,
    }
    scale = dataclasses.replace(scale, **{k: v for k, v in overrides.items() if v is not None})
    name = "custom" if args.model else mode
    out = pathlib.Path(args.out or ROOT / "experiments" / "results" / "finetune_study" / name)
    out.mkdir(parents=True, exist_ok=True)
    print(
        f"finetune study ({mode}): jax {jax.__version__}, {jax.device_count()} × "
        f"{jax.devices()[0].device_kind}, python {platform.python_version()}, out {out}",
        flush=True,
    )

    max_bytes = {"tiny": 200_000, "quick": 3_000_000, "default": 6_000_000}[mode]
    old_text = (
        pathlib.Path(args.old_data).read_text(encoding="utf-8")
        if args.old_data
        else python_source(max_bytes)
    )
    new_text = pathlib.Path(args.data).read_text(encoding="utf-8")
    if args.model:
        base = pathlib.Path(args.model)
        tokenizer = text_lib.load_tokenizer(base, DecoderConfig.from_dir(base).vocab_size)
    else:
        base = out / "base"
        tokenizer = text_lib.ByteTokenizer()
    old_ids, new_ids = tokenizer.encode(old_text), tokenizer.encode(new_text)
    if not args.model and not (base / "model.safetensors").exists():
        print(f"pretraining the base on Python source ({len(old_ids):,} bytes) ...", flush=True)
        pretrain(base, scale, old_ids)
    data = make_data(new_ids, old_ids, scale.seq_len, scale.eval_windows)
    probe = load_pretrained(base)  # exactly as a user's checkpoint is loaded
    base_old, base_test = evaluate(probe, data.old), evaluate(probe, data.test)
    del probe
    print(f"base ({base}): old-domain loss {base_old:.4f}, new-domain test {base_test:.4f}")

    study = Study(out, base, data, scale)
    study.refine_all = args.refine_all
    results: dict[int, dict[str, Any]] = {}
    for rank in scale.ranks:
        res: dict[str, Any] = {"lr": {}, "grid": {}, "seeds": {}}
        res.update(base_test=base_test, base_old=base_old)
        for opt in OPTIMIZERS:
            centre = results[scale.ranks[0]]["lr"][opt] if results else None
            res["lr"][opt], res["grid"][opt] = study.best_lr(opt, rank, centre)
            res["seeds"][opt] = [
                study.get(opt, rank, res["lr"][opt], s) for s in range(scale.seeds)
            ]
        timing_file = out / "runs" / f"timing_r{rank}.json"
        stored = json.loads(timing_file.read_text()) if timing_file.exists() else {}
        if stored.get("lr") == res["lr"] and stored.get("base") == study.base_id:
            res["timing"] = stored["seconds"]
        else:
            res["timing"] = time_steps(study, rank, res["lr"], args.timing_rounds)
            timing_file.write_text(
                json.dumps({"seconds": res["timing"], "lr": res["lr"], "base": study.base_id})
            )
        results[rank] = res
    table = write_reports(study, results, base_old)
    (out / "summary.txt").write_text(table + "\n")
    print(table)
    print(f"wrote {out / 'summary.csv'}, {out / 'study.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
