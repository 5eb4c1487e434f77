"""TinyShakespeare study: LoRA-Muon vs Spectron, AdamW-on-factors and dense Muon.

Reproduces, at reduced scale, the study of Cesista, Crowson, Simal, Biderman,
"LoRA-Muon: Spectral Steepest Descent on the Low-Rank Manifold" (arXiv:2606.12921):
a character-level transformer trained from scratch, either dense or *native
low-rank* (every hidden matrix is ``A Bᵀ`` with both factors random), every
optimizer given the same steps, batches and tokens. All learning rates × seeds of
one (model, optimizer) run in one compiled program (``jax.vmap``).

Run (the README's main job; 200 steps, 1 seed, 3 learning rates per optimizer):

    .venv/bin/python experiments/shakespeare.py --quick --data ../shared/data/tinyshakespeare.txt

Hardware: 2-vCPU AMD EPYC VM, no GPU. Measured: 377 s of CPU time; 9.6 min wall while
sharing the 2 cores with other jobs (so ~6.5 min on one free core, from the CPU time).
Expected output (measured; final validation loss in nats/char, condensed):

    optimizer       model   η: val loss                            best
    lora_muon       rank8   0.0316: 2.432  0.1: 2.414  0.316: 2.518   0.1
    adamw_factors   rank8   0.001: 2.455   0.003: 2.449  0.01: 2.514  0.003
    muon            dense   0.0316: 2.211  0.1: 2.459  0.316: 2.526   0.0316

The full sweeps (``--sweep lr_rank|width|depth|rescale``) write CSVs under
``experiments/results/``; ``experiments/plots.py`` draws them; docs/reproduction.md has
the commands that were run and the numbers.

``--data`` defaults to ``../shared/data/tinyshakespeare.txt`` when it exists, else
the standard file is downloaded (needs a network; the tests never do this).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import math
import os
import platform
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lora_muon_jax import lora_muon, lora_param_labels
from lora_muon_jax.baselines import dense_muon, spectron

DATA_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
DEFAULT_DATA = Path(__file__).resolve().parent.parent.parent / "shared/data/tinyshakespeare.txt"
RESULTS = Path(__file__).resolve().parent / "results"

# Learning-rate grids (log-spaced). Spectral optimizers: η is a spectral-norm radius
# on W, the paper sweeps 0.01–1.0. AdamW's η is a per-entry step: its own grid.
SPECTRAL_LRS = (0.01, 0.0316, 0.1, 0.316, 1.0)
ADAMW_LRS = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
# Embeddings, positions, norms and the output head: AdamW at this fixed learning rate
# for every optimizer (they are not matrices the spectral optimizers step).
FALLBACK_LR = 3e-3
WEIGHT_DECAY = 0.01  # the paper's λ for every optimizer
MOMENTUM = 0.9  # the paper's β (EMA, no Nesterov)
COOLDOWN_FRACTION = 0.3  # constant η, then linear decay to 0 over the last 30% of steps

OPTIMIZERS = ("lora_muon", "spectron", "adamw_factors", "muon", "adamw")
LOW_RANK_OPTIMIZERS = ("lora_muon", "spectron", "adamw_factors")
DENSE_OPTIMIZERS = ("muon", "adamw")


# ----------------------------------------------------------------------------- data


def load_text(path: str | os.PathLike[str] | None) -> str:
    """The corpus: ``path``, else the shared copy, else a download (network)."""
    if path is None:
        if DEFAULT_DATA.exists():
            path = DEFAULT_DATA
        else:
            target = RESULTS.parent / "data" / "tinyshakespeare.txt"
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                print(f"downloading {DATA_URL} -> {target}", file=sys.stderr)
                urllib.request.urlretrieve(DATA_URL, target)
            path = target
    return Path(path).read_text(encoding="utf-8")


@dataclasses.dataclass(frozen=True)
class Corpus:
    train: np.ndarray  # int32 (n_train,)
    val: np.ndarray  # int32 (n_val,)
    vocab_size: int


def make_corpus(text: str, val_fraction: float = 0.1) -> Corpus:
    """Character vocabulary (sorted), first 90% train, last 10% validation."""
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    ids = np.fromiter((index[c] for c in text), dtype=np.int32, count=len(text))
    split = int(len(ids) * (1.0 - val_fraction))
    return Corpus(ids[:split], ids[split:], len(chars))


def val_windows(val: np.ndarray, seq_len: int, count: int) -> np.ndarray:
    """``count`` evenly spaced windows of ``seq_len + 1`` tokens, int32 (count, seq_len+1)."""
    span = len(val) - seq_len - 1
    if span <= 0:
        raise ValueError(f"validation split too short: {len(val)=} for {seq_len=}")
    starts = np.linspace(0, span, num=count).astype(np.int64)
    return np.stack([val[s : s + seq_len + 1] for s in starts])


# ---------------------------------------------------------------------------- model


# The two architecture arms (one registry: validates ``--arch`` and documents each).
ARCHS: dict[str, str] = {
    "base": "learned position table, untied output head (the study's original model)",
    "qknorm": (
        "QK-norm (RMSNorm on q and k per head, learned gains), RoPE (no position table), "
        "output head tied to the embedding (logits = h Eᵀ, E ~ N(0, 1/width) at init)"
    ),
}
ROPE_THETA = 10000.0


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    width: int = 128
    depth: int = 2
    heads: int = 4
    seq_len: int = 64
    rank: int | None = None  # None: dense; else every hidden matrix is A Bᵀ of this rank
    rescale: float = 1.0  # low rank only: A → cA, B → B/c at init (same W)
    arch: str = "base"  # a key of ARCHS

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {sorted(ARCHS)}, got {self.arch!r}")

    @property
    def kind(self) -> str:
        return "dense" if self.rank is None else f"rank{self.rank}"


def _normal(key: jax.Array, shape: tuple[int, ...], std: float) -> jax.Array:
    return std * jax.random.normal(key, shape, jnp.float32)


def init_matrix(
    key: jax.Array, fan_in: int, fan_out: int, cfg: ModelConfig, rescale: jax.Array
) -> dict[str, Any]:
    """A hidden matrix: dense ``kernel (in, out)`` or ``lora_a (in, r)``, ``lora_b (r, out)``.

    Both give entries of W with variance 1/fan_in: ``A ~ N(0, 1/in)``, ``B ~ N(0, 1/r)``;
    then ``A → cA``, ``B → B/c`` with ``c = rescale`` (the same W).
    """
    if cfg.rank is None:
        return {"kernel": _normal(key, (fan_in, fan_out), fan_in**-0.5)}
    k_a, k_b = jax.random.split(key)
    return {
        "lora_a": rescale * _normal(k_a, (fan_in, cfg.rank), fan_in**-0.5),
        "lora_b": _normal(k_b, (cfg.rank, fan_out), cfg.rank**-0.5) / rescale,
    }


def init_params(
    key: jax.Array, cfg: ModelConfig, rescale: jax.Array | float | None = None
) -> dict[str, Any]:
    """Parameters of ``cfg``; ``rescale`` (default ``cfg.rescale``) may be traced."""
    c = jnp.asarray(cfg.rescale if rescale is None else rescale, jnp.float32)
    d = cfg.width
    keys = iter(jax.random.split(key, 3 + 6 * cfg.depth))
    blocks = []
    for _ in range(cfg.depth):
        block = {
            "norm1": jnp.ones((d,), jnp.float32),
            "norm2": jnp.ones((d,), jnp.float32),
            "attn": {n: init_matrix(next(keys), d, d, cfg, c) for n in ("q", "k", "v", "o")},
            "mlp": {
                "up": init_matrix(next(keys), d, 4 * d, cfg, c),
                "down": init_matrix(next(keys), 4 * d, d, cfg, c),
            },
        }
        if cfg.arch == "qknorm":
            block["q_norm"] = jnp.ones((d // cfg.heads,), jnp.float32)
            block["k_norm"] = jnp.ones((d // cfg.heads,), jnp.float32)
        blocks.append(block)
    # Tied (qknorm arm): E ~ N(0, 1/width), the untied head's init, so logits h Eᵀ start
    # at that head's scale; an N(0, 1) table would make each token predict itself.
    params: dict[str, Any] = {
        "embed": _normal(next(keys), (cfg.vocab_size, d), 1.0 if cfg.arch == "base" else d**-0.5),
        "blocks": blocks,
        "norm_f": jnp.ones((d,), jnp.float32),
    }
    pos_key, head_key = next(keys), next(keys)
    if cfg.arch == "base":
        params["pos"] = _normal(pos_key, (cfg.seq_len, d), 0.1)
        params["head"] = _normal(head_key, (d, cfg.vocab_size), d**-0.5)
    return params


def _apply_matrix(p: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    if "kernel" in p:
        return x @ p["kernel"]
    return (x @ p["lora_a"]) @ p["lora_b"]


def _rms_norm(x: jax.Array, scale: jax.Array) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6) * scale


def _rope(x: jax.Array) -> jax.Array:
    """Rotary position embedding of (B, T, H, Dh) along T (half-split pairs, θ = 10⁴)."""
    t, dh = x.shape[1], x.shape[-1]
    inv_freq = ROPE_THETA ** (-jnp.arange(0, dh, 2, dtype=jnp.float32) / dh)
    angles = jnp.arange(t, dtype=jnp.float32)[:, None] * inv_freq[None, :]  # (T, Dh/2)
    cos, sin = jnp.cos(angles)[None, :, None, :], jnp.sin(angles)[None, :, None, :]
    x1, x2 = x[..., : dh // 2], x[..., dh // 2 :]
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


def _attention_scores(blk: dict[str, Any], y: jax.Array, cfg: ModelConfig) -> tuple[Any, ...]:
    """(scores (B, H, T, T) before the mask, v (B, T, H, Dh)) of one block's attention."""
    b, t, _ = y.shape
    h, dh = cfg.heads, cfg.width // cfg.heads
    q, k, v = (_apply_matrix(blk["attn"][n], y).reshape(b, t, h, dh) for n in "qkv")
    if cfg.arch == "qknorm":
        q, k = _rope(_rms_norm(q, blk["q_norm"])), _rope(_rms_norm(k, blk["k_norm"]))
    return jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(dh), v


def _blocks(
    params: dict[str, Any], tokens: jax.Array, cfg: ModelConfig
) -> tuple[jax.Array, list[jax.Array]]:
    """The final hidden states (B, T, width) and each block's attention scores (B, H, T, T)."""
    b, t = tokens.shape
    x = params["embed"][tokens]
    if cfg.arch == "base":
        x = x + params["pos"][None, :t]
    mask = jnp.tril(jnp.ones((t, t), jnp.bool_))
    all_scores = []
    for blk in params["blocks"]:
        scores, v = _attention_scores(blk, _rms_norm(x, blk["norm1"]), cfg)
        all_scores.append(scores)
        probs = jax.nn.softmax(jnp.where(mask, scores, -1e30), axis=-1)
        att = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
        x = x + _apply_matrix(blk["attn"]["o"], att.reshape(b, t, cfg.width))
        y = _rms_norm(x, blk["norm2"])
        x = x + _apply_matrix(blk["mlp"]["down"], jax.nn.gelu(_apply_matrix(blk["mlp"]["up"], y)))
    return _rms_norm(x, params["norm_f"]), all_scores


def forward(params: dict[str, Any], tokens: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Logits (B, T, vocab) of a pre-norm causal transformer (RMSNorm, GELU MLP).

    ``arch="qknorm"``: q and k RMS-normalised per head (learned gains) and rotated
    (RoPE), and the head tied to the embedding E: logits = h Eᵀ (E is initialised
    N(0, 1/width), as the untied head is).
    """
    h, _ = _blocks(params, tokens, cfg)
    if cfg.arch == "qknorm":
        return h @ params["embed"].T
    return h @ params["head"]


def _matrix(p: dict[str, jax.Array]) -> jax.Array:
    return p["kernel"] if "kernel" in p else p["lora_a"] @ p["lora_b"]


def attention_stats(
    params: dict[str, Any], tokens: jax.Array, cfg: ModelConfig
) -> dict[str, jax.Array]:
    """What explains a learning-rate failure, on ``tokens`` (B, T) (issue: claims study).

    ``wq_norm``/``wk_norm``: the largest spectral norm over blocks of W_q and W_k
    (``A B`` for low-rank); ``max_logit``: the largest attention logit over blocks,
    heads and causal (query, key) pairs; ``attn_entropy``: the mean over blocks,
    heads and queries of the attention distribution's entropy (nats).
    """
    _, all_scores = _blocks(params, tokens, cfg)
    t = tokens.shape[1]
    mask = jnp.tril(jnp.ones((t, t), jnp.bool_))
    max_logit = jnp.max(jnp.stack([jnp.max(jnp.where(mask, s, -jnp.inf)) for s in all_scores]))
    entropies = []
    for scores in all_scores:
        logp = jax.nn.log_softmax(jnp.where(mask, scores, -1e30), axis=-1)
        entropies.append(-jnp.sum(jnp.where(mask, jnp.exp(logp) * logp, 0.0), axis=-1).mean())

    def largest_norm(name: str) -> jax.Array:
        norms = [jnp.linalg.norm(_matrix(b["attn"][name]), ord=2) for b in params["blocks"]]
        return jnp.max(jnp.stack(norms))

    return {
        "wq_norm": largest_norm("q"),
        "wk_norm": largest_norm("k"),
        "max_logit": max_logit,
        "attn_entropy": jnp.mean(jnp.stack(entropies)),
    }


def loss_fn(params: dict[str, Any], window: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Mean next-character cross-entropy (nats) of windows (B, T+1)."""
    logits = forward(params, window[:, :-1], cfg)
    return optax.softmax_cross_entropy_with_integer_labels(logits, window[:, 1:]).mean()


def count_params(params: Any, matrices_only: bool = False) -> int:
    leaves = jax.tree_util.tree_leaves_with_path(params)
    return sum(
        int(np.prod(x.shape))
        for path, x in leaves
        if not matrices_only or ("blocks" in jax.tree_util.keystr(path) and x.ndim == 2)
    )


# ------------------------------------------------------------------------ optimizers


def schedule(peak: jax.Array, steps: int) -> Callable[[jax.Array], jax.Array]:
    """Constant ``peak``, then linear decay to 0 over the last ``COOLDOWN_FRACTION`` of steps."""
    cooldown = max(1.0, COOLDOWN_FRACTION * steps)

    def fn(count: jax.Array) -> jax.Array:
        left = jnp.asarray(steps, jnp.float32) - jnp.asarray(count, jnp.float32)
        return peak * jnp.clip(left / cooldown, 0.0, 1.0)

    return fn


def _is_hidden_kernel(path: tuple[str, ...], leaf: Any) -> bool:
    del leaf
    return path[-1] == "kernel"


def make_optimizer(name: str, lr: jax.Array, steps: int) -> optax.GradientTransformation:
    """``name`` at peak learning rate ``lr`` (may be traced); other leaves: fixed AdamW."""
    eta = schedule(lr, steps)
    fallback_lr = schedule(jnp.asarray(FALLBACK_LR, jnp.float32), steps)
    if name == "lora_muon":
        return lora_muon(
            eta, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, fallback_learning_rate=fallback_lr
        )
    if name == "spectron":
        return spectron(
            eta, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, fallback_learning_rate=fallback_lr
        )
    if name == "muon":
        return dense_muon(
            eta,
            momentum=MOMENTUM,
            weight_decay=WEIGHT_DECAY,
            is_matrix=_is_hidden_kernel,
            fallback_learning_rate=fallback_lr,
        )
    if name == "adamw_factors":
        return optax.partition(
            {
                "lora": optax.adamw(eta, b1=MOMENTUM, weight_decay=WEIGHT_DECAY),
                "fallback": optax.adamw(fallback_lr),
            },
            lora_param_labels,
        )
    if name == "adamw":
        return optax.multi_transform(
            {
                "matrix": optax.adamw(eta, b1=MOMENTUM, weight_decay=WEIGHT_DECAY),
                "fallback": optax.adamw(fallback_lr),
            },
            lambda p: jax.tree_util.tree_map_with_path(
                lambda path, _: (
                    "matrix" if jax.tree_util.keystr(path).endswith("['kernel']") else "fallback"
                ),
                p,
            ),
        )
    raise ValueError(f"unknown optimizer {name!r}; choose from {OPTIMIZERS}")


# -------------------------------------------------------------------------- training


@contextlib.contextmanager
def _standard_numpy() -> Iterator[None]:
    """Trace the model under standard promotion (optax's adamw needs it; tests are strict)."""
    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        yield


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One compiled program: a model and an optimizer over a grid of (lr, rescale, seed)."""

    sweep: str
    model: ModelConfig
    optimizer: str
    lrs: tuple[float, ...]
    seeds: tuple[int, ...]
    steps: int
    batch: int
    rescales: tuple[float, ...] = (1.0,)  # factor rescalings c (low rank only)

    @property
    def members(self) -> list[tuple[float, int]]:
        """The inner grid axis: (rescale, seed) pairs, rescale-major."""
        return [(c, seed) for c in self.rescales for seed in self.seeds]


@dataclasses.dataclass
class RunResult:
    spec: RunSpec
    eval_steps: list[int]
    val_curves: np.ndarray  # (n_lr, n_members, n_evals); members = spec.members
    train_curves: np.ndarray  # (n_lr, n_members, steps)
    final_val: np.ndarray  # (n_lr, n_members), on the larger final validation set
    wall_s: float
    n_params: int
    n_matrix_params: int
    # attention_stats of the final parameters on the evaluation windows, each (n_lr, n_members)
    stats: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


def train_grid(
    spec: RunSpec,
    corpus: Corpus,
    *,
    eval_every: int,
    eval_windows: int = 64,
    final_eval_windows: int = 256,
    data_seed: int = 0,
    progress: Any = None,
) -> RunResult:
    """Train ``spec.model`` with ``spec.optimizer`` for every (lr, seed), vmapped.

    Every configuration sees the same batches (data order from ``data_seed``);
    seeds change the initialisation only. Returns train losses every step and
    validation losses every ``eval_every`` steps.
    """
    cfg = spec.model
    n_lr, n_members = len(spec.lrs), len(spec.members)
    train_tokens = jnp.asarray(corpus.train)
    max_start = len(corpus.train) - cfg.seq_len - 1
    eval_set = jnp.asarray(val_windows(corpus.val, cfg.seq_len, eval_windows))
    final_set = jnp.asarray(val_windows(corpus.val, cfg.seq_len, final_eval_windows))
    data_key = jax.random.key(data_seed)
    offsets = jnp.arange(cfg.seq_len + 1, dtype=jnp.int32)

    def batch_at(step: jax.Array) -> jax.Array:
        starts = jax.random.randint(
            jax.random.fold_in(data_key, step), (spec.batch,), 0, max_start, jnp.int32
        )
        return train_tokens[starts[:, None] + offsets[None, :]]

    def init_one(lr: jax.Array, seed: jax.Array, rescale: jax.Array) -> tuple[Any, Any]:
        params = init_params(jax.random.key(seed), cfg, rescale)
        return params, make_optimizer(spec.optimizer, lr, spec.steps).init(params)

    def chunk_one(
        lr: jax.Array, params: Any, opt_state: Any, start: jax.Array, length: int
    ) -> tuple[Any, Any, jax.Array]:
        opt = make_optimizer(spec.optimizer, lr, spec.steps)

        def body(carry: tuple[Any, Any], step: jax.Array) -> tuple[tuple[Any, Any], jax.Array]:
            p, s = carry
            loss, grads = jax.value_and_grad(loss_fn)(p, batch_at(step), cfg)
            updates, s = opt.update(grads, s, p)
            return (optax.apply_updates(p, updates), s), loss

        steps = start + jnp.arange(length, dtype=jnp.int32)
        (params, opt_state), losses = jax.lax.scan(body, (params, opt_state), steps)
        return params, opt_state, losses

    lrs = jnp.asarray(spec.lrs, jnp.float32)
    seeds = jnp.asarray([seed for _, seed in spec.members], jnp.int32)
    rescales = jnp.asarray([c for c, _ in spec.members], jnp.float32)

    with _standard_numpy():
        init = jax.jit(
            jax.vmap(
                jax.vmap(init_one, in_axes=(None, 0, 0)),
                in_axes=(0, None, None),
            )
        )
        params, opt_state = init(lrs, seeds, rescales)
        n_params = count_params(jax.tree.map(lambda x: x[0, 0], params))
        n_matrix = count_params(jax.tree.map(lambda x: x[0, 0], params), matrices_only=True)

        chunks = _chunks(spec.steps, eval_every)
        compiled: dict[int, Any] = {}

        def run_chunk(length: int) -> Any:
            if length not in compiled:
                one = lambda lr, p, s, start: chunk_one(lr, p, s, start, length)  # noqa: E731
                compiled[length] = jax.jit(
                    jax.vmap(jax.vmap(one, in_axes=(None, 0, 0, None)), in_axes=(0, 0, 0, None)),
                    donate_argnums=(1, 2),
                )
            return compiled[length]

        def evaluate(windows: jax.Array) -> Callable[[Any], jax.Array]:
            one = lambda p: loss_fn(p, windows, cfg)  # noqa: E731
            return jax.jit(jax.vmap(jax.vmap(one)))

        eval_small, eval_final = evaluate(eval_set), evaluate(final_set)

        t0 = time.perf_counter()
        train_losses, val_curve, eval_steps = [], [], []
        done = 0
        for length in chunks:
            params, opt_state, losses = run_chunk(length)(
                lrs, params, opt_state, jnp.asarray(done, jnp.int32)
            )
            done += length
            train_losses.append(np.asarray(losses))
            val_curve.append(np.asarray(eval_small(params)))
            eval_steps.append(done)
            if progress is not None:
                progress.update(length * n_lr * n_members)
                progress.set_postfix_str(
                    f"{spec.optimizer} {cfg.kind} step {done} val {np.nanmin(val_curve[-1]):.3f}"
                )
        final = np.asarray(eval_final(params))
        wall = time.perf_counter() - t0
        stats_of = jax.jit(jax.vmap(jax.vmap(lambda p: attention_stats(p, eval_set[:, :-1], cfg))))
        stats = {k: np.asarray(v) for k, v in stats_of(params).items()}
    return RunResult(
        spec=spec,
        eval_steps=eval_steps,
        val_curves=np.stack(val_curve, axis=-1),
        train_curves=np.concatenate(train_losses, axis=-1),
        final_val=final,
        wall_s=wall,
        n_params=n_params,
        n_matrix_params=n_matrix,
        stats=stats,
    )


def _chunks(steps: int, every: int) -> list[int]:
    sizes = [every] * (steps // every)
    if steps % every:
        sizes.append(steps % every)
    return sizes


# --------------------------------------------------------------------------- sweeps


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    steps: int = 200
    batch: int = 32
    seq_len: int = 64
    width: int = 128
    depth: int = 2
    seeds: tuple[int, ...] = (0, 1)
    eval_every: int = 50
    eval_windows: int = 64
    final_eval_windows: int = 256
    arch: str = "base"


def _lrs_for(
    optimizer: str, lrs: Sequence[float] | None, adamw_lrs: Sequence[float] | None
) -> tuple[float, ...]:
    if optimizer.startswith("adamw"):
        return tuple(adamw_lrs) if adamw_lrs is not None else ADAMW_LRS
    return tuple(lrs) if lrs is not None else SPECTRAL_LRS


def sweep_specs(
    sweep: str,
    study: StudyConfig,
    vocab_size: int,
    *,
    ranks: Sequence[int | None],
    optimizers: Sequence[str],
    lrs: Sequence[float] | None,
    adamw_lrs: Sequence[float] | None = None,
    widths: Sequence[int] = (64, 128),
    depths: Sequence[int] = (1, 2, 4),
    rescales: Sequence[float] = (1.0, 3.0, 9.0, 27.0),
    rescale_rank: int = 8,
    rescale_lr: float = 0.1,
) -> list[RunSpec]:
    """The runs of one sweep (``lr_rank``, ``width``, ``depth``, ``rescale``, ``quick``)."""

    def model(rank: int | None, **kw: Any) -> ModelConfig:
        base = {
            "width": study.width,
            "depth": study.depth,
            "seq_len": study.seq_len,
            "arch": study.arch,
        }
        base.update(kw)
        return ModelConfig(vocab_size=vocab_size, rank=rank, **base)

    def runs_for(rank: int | None, **kw: Any) -> list[RunSpec]:
        allowed = DENSE_OPTIMIZERS if rank is None else LOW_RANK_OPTIMIZERS
        return [
            RunSpec(
                sweep,
                model(rank, **kw),
                opt,
                _lrs_for(opt, lrs, adamw_lrs),
                study.seeds,
                study.steps,
                study.batch,
            )
            for opt in optimizers
            if opt in allowed
        ]

    specs: list[RunSpec] = []
    if sweep in ("lr_rank", "quick"):
        for rank in ranks:
            specs += runs_for(rank)
    elif sweep == "width":
        for width in widths:
            for rank in ranks:
                specs += runs_for(rank, width=width)
    elif sweep == "depth":
        for depth in depths:
            for rank in ranks:
                specs += runs_for(rank, depth=depth)
    elif sweep == "rescale":
        for opt in optimizers:
            if opt in ("lora_muon", "spectron"):
                specs.append(
                    RunSpec(
                        sweep,
                        model(rescale_rank),
                        opt,
                        (rescale_lr,),
                        study.seeds,
                        study.steps,
                        study.batch,
                        rescales=tuple(rescales),
                    )
                )
    else:
        raise ValueError(f"unknown sweep {sweep!r}")
    return specs


STAT_FIELDS = ("wq_norm", "wk_norm", "max_logit", "attn_entropy")
FINAL_FIELDS = (
    "sweep arch optimizer model rank width depth rescale lr seed steps batch seq_len tokens "
    "n_params n_matrix_params final_val_loss final_train_loss min_val_loss wall_s"
).split() + list(STAT_FIELDS)
CURVE_FIELDS = "sweep arch optimizer model rank width depth rescale lr seed step val_loss".split()


def result_rows(res: RunResult) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    s, cfg = res.spec, res.spec.model
    common = {
        "sweep": s.sweep,
        "arch": cfg.arch,
        "optimizer": s.optimizer,
        "model": cfg.kind,
        "rank": "" if cfg.rank is None else cfg.rank,
        "width": cfg.width,
        "depth": cfg.depth,
    }
    finals, curves = [], []
    tail = max(1, s.steps // 20)
    for i, lr in enumerate(s.lrs):
        for j, (rescale, seed) in enumerate(s.members):
            finals.append(
                {
                    **common,
                    "rescale": rescale,
                    "lr": lr,
                    "seed": seed,
                    "steps": s.steps,
                    "batch": s.batch,
                    "seq_len": cfg.seq_len,
                    "tokens": s.steps * s.batch * cfg.seq_len,
                    "n_params": res.n_params,
                    "n_matrix_params": res.n_matrix_params,
                    "final_val_loss": f"{res.final_val[i, j]:.6f}",
                    "final_train_loss": f"{np.mean(res.train_curves[i, j, -tail:]):.6f}",
                    "min_val_loss": f"{np.min(res.val_curves[i, j]):.6f}",
                    "wall_s": f"{res.wall_s:.1f}",
                    **{k: f"{res.stats[k][i, j]:.6g}" for k in STAT_FIELDS if k in res.stats},
                }
            )
            for k, step in enumerate(res.eval_steps):
                curves.append(
                    {
                        **common,
                        "rescale": rescale,
                        "lr": lr,
                        "seed": seed,
                        "step": step,
                        "val_loss": f"{res.val_curves[i, j, k]:.6f}",
                    }
                )
    return finals, curves


class CsvSink:
    """Rows of ``<prefix>_final.csv`` and ``<prefix>_curves.csv``, appended as runs finish.

    They are written under ``.partial`` names and renamed by ``close()``, so a final
    CSV exists only for a finished sweep (``--skip-existing`` relies on it).
    """

    def __init__(self, prefix: Path) -> None:
        prefix.parent.mkdir(parents=True, exist_ok=True)
        self.final_path = prefix.with_name(prefix.name + "_final.csv")
        self.curves_path = prefix.with_name(prefix.name + "_curves.csv")
        for path, fields in ((self.final_path, FINAL_FIELDS), (self.curves_path, CURVE_FIELDS)):
            with _partial(path).open("w", newline="") as f:
                csv.DictWriter(f, fieldnames=fields).writeheader()

    def add(self, res: RunResult) -> None:
        finals, curves = result_rows(res)
        for path, fields, rows in (
            (self.final_path, FINAL_FIELDS, finals),
            (self.curves_path, CURVE_FIELDS, curves),
        ):
            with _partial(path).open("a", newline="") as f:
                csv.DictWriter(f, fieldnames=fields).writerows(rows)

    def close(self) -> None:
        for path in (self.curves_path, self.final_path):  # the final CSV last: it marks done
            _partial(path).replace(path)


def _partial(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def comparison_table(results: Sequence[RunResult]) -> str:
    """Seed-mean final validation loss per learning rate, best per row marked ``*``.

    One row per (run, rescale); ``nan`` (diverged) never counts as best.
    """
    lines = []
    for res in results:
        s, cfg = res.spec, res.spec.model
        n_seed = len(s.seeds)
        for k, c in enumerate(s.rescales):
            means = res.final_val[:, k * n_seed : (k + 1) * n_seed].mean(axis=1)
            best = int(np.argmin(np.where(np.isfinite(means), means, np.inf)))
            cells = []
            for i, lr in enumerate(s.lrs):
                mark = "*" if i == best else " "
                cells.append(f"{lr:g}:{means[i]:.3f}{mark}")
            lines.append(
                f"{s.optimizer:<14} {cfg.kind:<7} w{cfg.width} d{cfg.depth} x{c:<3g} "
                f"best lr {s.lrs[best]:<7g} val {means[best]:.4f}  | " + "  ".join(cells)
            )
    header = (
        "final validation loss (nats/char, seed mean over "
        f"{len(results[0].spec.seeds) if results else 0} seeds), * = best lr"
    )
    return "\n".join([header, *lines])


def run_study(
    specs: Sequence[RunSpec],
    corpus: Corpus,
    study: StudyConfig,
    sink: CsvSink | None,
    show_progress: bool = True,
) -> list[RunResult]:
    total = sum(s.steps * len(s.lrs) * len(s.members) for s in specs)
    bar = None
    if show_progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="step", desc="study", dynamic_ncols=True, mininterval=5.0)
    results = []
    try:
        for spec in specs:
            res = train_grid(
                spec,
                corpus,
                eval_every=study.eval_every,
                eval_windows=study.eval_windows,
                final_eval_windows=study.final_eval_windows,
                progress=bar,
            )
            results.append(res)
            if sink is not None:
                sink.add(res)
    finally:
        if bar is not None:
            bar.close()
    return results


def _parse_rank(text: str) -> int | None:
    return None if text == "dense" else int(text)


def main(argv: Sequence[str] | None = None) -> list[RunResult]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="path to tinyshakespeare.txt")
    p.add_argument("--quick", action="store_true", help="the short CPU study (README)")
    p.add_argument(
        "--sweep", default="lr_rank", choices=("lr_rank", "width", "depth", "rescale", "quick")
    )
    p.add_argument("--ranks", default=None, help="comma list, e.g. 1,2,4,8,16,32,dense")
    p.add_argument("--optimizers", default=None, help=f"comma list from {OPTIMIZERS}")
    p.add_argument("--lrs", default=None, help="comma list of spectral learning rates")
    p.add_argument("--adamw-lrs", default=None, help="comma list of AdamW learning rates")
    p.add_argument("--widths", default="64,128")
    p.add_argument("--depths", default="1,2,4")
    p.add_argument("--rescales", default="1,3,9,27")
    p.add_argument("--rescale-rank", type=int, default=8)
    p.add_argument("--rescale-lr", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--depth", type=int, default=None)
    p.add_argument("--seeds", default=None, help="comma list of seeds")
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--max-chars", type=int, default=None, help="use only a prefix of the text")
    p.add_argument("--out", default=None, help="CSV prefix (default experiments/results/<sweep>)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--arch",
        default="base",
        choices=sorted(ARCHS),
        help="; ".join(f"{k}: {v}" for k, v in ARCHS.items()),
    )
    p.add_argument(
        "--skip-existing",
        action="store_true",
        help="do nothing when <out>_final.csv exists (resumable pieces of a study)",
    )
    args = p.parse_args(argv)

    study = StudyConfig()
    if args.quick:
        args.sweep = "quick"
        study = dataclasses.replace(study, steps=200, seeds=(0,), eval_every=50)
        args.ranks = args.ranks or "8,dense"
        args.optimizers = args.optimizers or "lora_muon,adamw_factors,muon"
        args.lrs = args.lrs or "0.0316,0.1,0.316"
        args.adamw_lrs = args.adamw_lrs or "0.001,0.003,0.01"
    overrides = {
        "steps": args.steps,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "width": args.width,
        "depth": args.depth,
        "eval_every": args.eval_every,
    }
    study = dataclasses.replace(study, **{k: v for k, v in overrides.items() if v is not None})
    study = dataclasses.replace(study, arch=args.arch)
    if args.seeds:
        study = dataclasses.replace(study, seeds=tuple(int(s) for s in args.seeds.split(",")))

    text = load_text(args.data)
    if args.max_chars:
        text = text[: args.max_chars]
    corpus = make_corpus(text)
    ranks = [_parse_rank(r) for r in (args.ranks or "1,2,4,8,16,32,dense").split(",")]
    optimizers = (args.optimizers or "lora_muon,spectron,adamw_factors,muon").split(",")
    for opt in optimizers:
        if opt not in OPTIMIZERS:
            p.error(f"unknown optimizer {opt!r}; choose from {OPTIMIZERS}")
    lrs = [float(x) for x in args.lrs.split(",")] if args.lrs else None
    adamw_lrs = [float(x) for x in args.adamw_lrs.split(",")] if args.adamw_lrs else None
    specs = sweep_specs(
        args.sweep,
        study,
        corpus.vocab_size,
        ranks=ranks,
        optimizers=optimizers,
        lrs=lrs,
        adamw_lrs=adamw_lrs,
        widths=[int(w) for w in args.widths.split(",")],
        depths=[int(d) for d in args.depths.split(",")],
        rescales=[float(c) for c in args.rescales.split(",")],
        rescale_rank=args.rescale_rank,
        rescale_lr=args.rescale_lr,
    )
    prefix = Path(args.out) if args.out else RESULTS / args.sweep
    done = prefix.with_name(prefix.name + "_final.csv")
    if args.skip_existing and done.exists():
        print(f"# {done} exists: skipped", flush=True)
        return []
    sink = CsvSink(prefix)
    print(
        f"# {args.sweep}: {len(specs)} compiled runs, {study}; jax {jax.__version__} "
        f"optax {optax.__version__} on {platform.processor() or platform.machine()} "
        f"({jax.devices()[0].platform})",
        flush=True,
    )
    t0 = time.perf_counter()
    results = run_study(specs, corpus, study, sink, show_progress=not args.no_progress)
    sink.close()
    print(comparison_table(results))
    print(f"# wall time {time.perf_counter() - t0:.0f} s; CSV: {sink.final_path}", flush=True)
    return results


if __name__ == "__main__":
    main()
