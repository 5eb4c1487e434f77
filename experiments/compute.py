"""Compute accounting for the TinyShakespeare study: FLOPs per step, FLOP-matched steps.

Two definitions of "compute-matched" (docs/reproduction.md, "Compute matching"):

* **equal steps**: every model gets the same steps, batches and tokens (the paper's setup);
* **equal FLOPs**: the dense model gets the steps that cost what the low-rank model's
  steps cost, counting the model's matrix-multiply FLOPs of forward + backward, with or
  without the optimizer's own matrix FLOPs.

What is counted (multiply-adds count 2, elementwise work and softmax count 0):

* forward, per token: every hidden matrix ``x W`` (``2 m n``; low-rank ``x A B``:
  ``2 r (m + n)``), the output head (``2 width vocab``), attention's ``Q Kᵀ`` and
  ``P V`` over all ``seq_len`` keys (``4 seq_len width`` per block: the mask does not
  skip work in this implementation);
* training = 3 × forward (backward: two products per forward product; the dense
  model's weight gradients and the low-rank model's factor gradients are both in it);
* dense Muon (``newton_schulz=True``): each m×n matrix (m <= n after orientation),
  per Newton–Schulz step ``U = X Xᵀ`` (``2 m² n``), ``U²`` (``2 m³``), ``(b U + c U²) X``
  (``2 m² n``), 8 steps (the paper's recipe, what ``dense_muon`` runs);
* LoRA-Muon (``newton_schulz=True``, the same switch): the tall products of the Gram
  form, six per pair (four Grams and two ``M K``: ``6 r² (m + n)``); its r×r work
  (``O(r³)`` per pair, independent of the width) is not counted.

Run: ``python experiments/compute.py`` prints the study's numbers (width 128, depth 2,
rank 32 vs dense, 32×64 tokens per step).
"""

from __future__ import annotations

import argparse

MUON_NEWTON_SCHULZ_STEPS = 8  # the paper's Table 1 recipe (lora_muon_jax.matrix_sign)


def hidden_shapes(width: int, depth: int) -> list[tuple[int, int]]:
    """(fan_in, fan_out) of every hidden matrix: q, k, v, o, up (×4), down per block."""
    d = width
    return [(d, d)] * 4 * depth + [(d, 4 * d), (4 * d, d)] * depth


def forward_flops_per_token(
    width: int, depth: int, seq_len: int, vocab: int, rank: int | None
) -> int:
    """Matrix-multiply FLOPs of one token's forward pass (see the module docstring)."""
    if rank is None:
        matrices = sum(2 * m * n for m, n in hidden_shapes(width, depth))
    else:
        matrices = sum(2 * rank * (m + n) for m, n in hidden_shapes(width, depth))
    return matrices + 2 * width * vocab + 4 * seq_len * width * depth


def optimizer_flops_per_step(width: int, depth: int, rank: int | None) -> int:
    """Dense Muon's Newton–Schulz FLOPs (rank None) or LoRA-Muon's tall products per step."""
    total = 0
    for fan_in, fan_out in hidden_shapes(width, depth):
        if rank is None:
            m, n = sorted((fan_in, fan_out))
            total += MUON_NEWTON_SCHULZ_STEPS * (4 * m * m * n + 2 * m**3)
        else:
            total += 6 * rank * rank * (fan_in + fan_out)
    return total


def train_flops_per_step(
    width: int,
    depth: int,
    seq_len: int,
    vocab: int,
    rank: int | None,
    batch: int,
    *,
    newton_schulz: bool,
) -> int:
    """One training step: 3 × forward over ``batch × seq_len`` tokens (+ the optimizer's)."""
    model = 3 * forward_flops_per_token(width, depth, seq_len, vocab, rank) * batch * seq_len
    return model + (optimizer_flops_per_step(width, depth, rank) if newton_schulz else 0)


def flop_matched_steps(
    low_rank_steps: int,
    rank: int,
    *,
    width: int,
    depth: int,
    seq_len: int,
    vocab: int,
    batch: int,
    newton_schulz: bool,
) -> int:
    """Dense steps costing what ``low_rank_steps`` of the rank-``rank`` model cost (rounded)."""
    kw = {"width": width, "depth": depth, "seq_len": seq_len, "vocab": vocab, "batch": batch}
    low = train_flops_per_step(rank=rank, newton_schulz=newton_schulz, **kw)
    dense = train_flops_per_step(rank=None, newton_schulz=newton_schulz, **kw)
    return round(low_rank_steps * low / dense)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--vocab", type=int, default=65)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--steps", type=int, default=1000, help="low-rank steps")
    a = p.parse_args()
    kw = {"width": a.width, "depth": a.depth, "seq_len": a.seq_len, "vocab": a.vocab}
    low = forward_flops_per_token(rank=a.rank, **kw)
    dense = forward_flops_per_token(rank=None, **kw)
    print(f"forward FLOPs/token: rank {a.rank} {low:,}, dense {dense:,} ({low / dense:.1%})")
    for ns in (False, True):
        steps = flop_matched_steps(a.steps, a.rank, batch=a.batch, newton_schulz=ns, **kw)
        label = "with" if ns else "without"
        print(
            f"dense steps matching {a.steps} rank-{a.rank} steps, {label} optimizer FLOPs: {steps}"
        )


if __name__ == "__main__":
    main()
