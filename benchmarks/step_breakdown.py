"""Where one lora_muon step's time goes, next to the machine's flop and byte floors.

Run:      python benchmarks/step_breakdown.py            (~2 min on a 2-core CPU)
          python benchmarks/step_breakdown.py --pairs 4  (smoke)
Hardware: measured on a 2-core x86-64 VM (CPU backend, float32); runs unchanged on GPU.
Expected: a table of the gram method's parts on 24 pairs of 1024x16 (r = 16), each jitted
          alone on the same stacked arrays the step uses: the four tall Grams, the two
          r×r inverse-root chains, the two tall products M·K, the momentum EMA, and the
          whole donated training step of lora_muon and optax.adamw; each with its flops,
          its bytes and the time either would take at the machine's measured matmul rate
          and copy bandwidth.

The parts are timed alone (medians of rounds of `repeats` dispatches), so they need not
add up to the step: XLA overlaps and fuses across them. The floor columns say which
resource bounds a part: a part far above both is latency-bound (many small kernels).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from step_time import Measured

from lora_muon_jax import _polar, _robust, lora_muon
from lora_muon_jax._factors import FactorPair, times_symmetric

F32_BYTES = 4


def median_ms(fn: Callable[..., Any], *args: Any, repeats: int, rounds: int) -> float:
    """Median over rounds of the time per call of `repeats` back-to-back jit(fn)(*args)."""
    jitted = jax.jit(fn)
    jax.block_until_ready(jitted(*args))
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(repeats):
            out = jitted(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / repeats)
    return float(np.median(times) * 1e3)


def loop_ms(steps: dict[str, Measured], repeats: int, rounds: int) -> dict[str, float]:
    """Donated-loop time per step of each optimizer (step_time's loop mode), interleaved."""
    for _ in range(rounds):
        for m in steps.values():
            m.run(repeats)
    return {name: m.loop_ms for name, m in steps.items()}


def floor_ms(flops: float, nbytes: float, gflops: float, gbs: float) -> tuple[float, float]:
    """(flop floor, byte floor) in ms at the measured matmul rate and bandwidth."""
    return flops / gflops / 1e6, nbytes / gbs / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=24)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    n, m, r, reps, rounds = args.pairs, args.width, args.rank, args.repeats, args.rounds
    print(
        f"jax {jax.__version__}, device {jax.devices()[0].device_kind}, "
        f"{n} pairs of {m}x{r} (A: {m}x{r}, B stored rank-first {r}x{m}), float32"
    )
    key = jax.random.key(0)
    k = jax.random.split(key, 4)
    a = jax.random.normal(k[0], (n, m, r)) / np.sqrt(m)
    b = jax.random.normal(k[1], (n, r, m)) / np.sqrt(r)
    mu_a = jax.random.normal(k[2], (n, m, r))
    mu_b = jax.random.normal(k[3], (n, r, m))
    factor = n * m * r  # entries of one stacked factor

    # The machine: a large matmul's rate and a large copy's bandwidth.
    big = jax.random.normal(key, (2048, 2048))
    matmul_ms = median_ms(lambda x: x @ x, big, repeats=5, rounds=rounds)
    peak_gflops = 2 * 2048**3 / matmul_ms / 1e6
    # Bandwidth at the step's working-set size (4 stacked factors: cache-resident on
    # a CPU, so DRAM bandwidth would understate it).
    vec = jax.random.normal(key, (4 * n * m * r,))
    copy_ms = median_ms(lambda x: x * 2.0, vec, repeats=reps, rounds=rounds)
    bandwidth_gbs = 2 * vec.nbytes / copy_ms / 1e6
    print(
        f"machine: {peak_gflops:.0f} GFLOP/s (2048³ matmul), {bandwidth_gbs:.1f} GB/s "
        f"(x*2 on {vec.nbytes / 1e6:.1f} MB)"
    )

    def grams(a, b, mu_a, mu_b):
        return (
            _polar.gram(a),
            _polar.gram(b, rank_first=True),
            _polar.gram(mu_a),
            _polar.gram(mu_b, rank_first=True),
        )

    s = jnp.concatenate([_polar.gram(a), _polar.gram(b, rank_first=True)])
    kk = jax.random.normal(key, (n, r, r))

    kk = _polar._sym(kk)  # the gram form's K is symmetric

    def tall_products(mu_a, mu_b, kk):
        # The step's own products: M_A K (column layout), K M_B (rank-first layout).
        return times_symmetric(mu_a, kk, False), times_symmetric(mu_b, kk, True)

    def ema(a, b, mu_a, mu_b):
        return tuple(0.9 * x + 0.1 * g for x, g in ((mu_a, a), (mu_b, b), (a, mu_a), (b, mu_b)))

    # lora_b (r, out): flax's layout. The loop feeds fixed gradients back, so the
    # factors drift; at this scale the measured step matches the fast form's parts
    # (~5 ms; the robust row shows what a step costs where the robust form runs).
    params = {f"l{i}": {"lora_a": a[i], "lora_b": b[i]} for i in range(n)}
    steps = loop_ms(
        {
            "lora_muon": Measured("lora_muon", lora_muon(0.1), params),
            "adamw": Measured("optax.adamw", optax.adamw(1e-3), params),
        },
        reps,
        rounds,
    )

    def robust(a, b, mu_a, mu_b):
        return _robust.robust_directions_many([FactorPair(a, b, mu_a, mu_b, False, True)])

    rows: list[tuple[str, float, float, float]] = [
        (
            "4 tall Grams (AᵀA, BBᵀ, M_AᵀM_A, M_BM_Bᵀ)",
            median_ms(grams, a, b, mu_a, mu_b, repeats=reps, rounds=rounds),
            4 * 2 * factor * r,
            4 * factor * F32_BYTES,
        ),
        (
            "2 r×r inverse-root chains (2n matrices each, the fast form's 6 steps)",
            2
            * median_ms(
                lambda s: _polar.inverse_sqrt_normalized(s, "gram", fast_gate=True),
                s,
                repeats=reps,
                rounds=rounds,
            ),
            0.0,
            0.0,
        ),
        (
            "2 tall products M·K",
            median_ms(tall_products, mu_a, mu_b, kk, repeats=reps, rounds=rounds),
            2 * 2 * factor * r,
            4 * factor * F32_BYTES,
        ),
        (
            "robust form, all pairs (only where the fast form is inexact)",
            median_ms(robust, a, b, mu_a, mu_b, repeats=reps, rounds=rounds),
            0.0,
            0.0,
        ),
        (
            "momentum EMA (4 factor-sized arrays)",
            median_ms(ema, a, b, mu_a, mu_b, repeats=reps, rounds=rounds),
            4 * 2 * factor,
            12 * factor * F32_BYTES,
        ),
        (
            "whole step: lora_muon (gram), donated loop",
            steps["lora_muon"],
            # Grams 2r and M·K 2r flops per entry; reads A, B, G, M and writes M, A, B.
            (4 * 2 + 2 * 2) * factor * r,
            2 * 10 * factor * F32_BYTES,
        ),
        (
            "whole step: optax.adamw, donated loop",
            steps["adamw"],
            # ~12 flops per entry; reads p, g, m, v and writes p, m, v.
            2 * 12 * factor,
            2 * 7 * factor * F32_BYTES,
        ),
    ]
    print("\n| part | time (ms) | GFLOP | flop floor (ms) | MB moved | byte floor (ms) |")
    print("|---|---|---|---|---|---|")
    floors = [floor_ms(flops, nbytes, peak_gflops, bandwidth_gbs) for _, _, flops, nbytes in rows]
    for (name, ms, flops, nbytes), (flop_floor, byte_floor) in zip(rows, floors, strict=True):
        print(
            f"| {name} | {ms:.3f} | {flops / 1e9:.3f} | {flop_floor:.3f} | "
            f"{nbytes / 1e6:.1f} | {byte_floor:.3f} |"
        )
    muon, adamw = steps["lora_muon"], steps["adamw"]
    muon_floor, adamw_floor = max(floors[-2]), max(floors[-1])
    print(
        f"\nlora_muon / adamw: {muon / adamw:.2f}x measured (target ≤ 2x); floors "
        f"{muon_floor:.3f} / {adamw_floor:.3f} ms = {muon_floor / adamw_floor:.2f}x "
        "(each the larger of its flop and byte floor)."
    )


if __name__ == "__main__":
    main()
