"""Where one lora_muon step's time goes, next to the machine's flop and byte floors.

Run:      python benchmarks/step_breakdown.py            (~1 min on a 2-core CPU)
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

from lora_muon_jax import _polar, _robust, lora_muon
from lora_muon_jax._factors import FactorPair

F32_BYTES = 4


def _median_ms(call: Callable[[], Any], repeats: int, rounds: int) -> float:
    """Median over rounds of the mean time of `repeats` back-to-back calls (one sync each)."""
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(repeats):
            out = call()
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / repeats)
    return float(np.median(times) * 1e3)


def median_ms(fn: Callable[..., Any], *args: Any, repeats: int, rounds: int) -> float:
    """Time per call of jit(fn)(*args), after a warm-up call."""
    jitted = jax.jit(fn)
    jax.block_until_ready(jitted(*args))
    return _median_ms(lambda: jitted(*args), repeats, rounds)


def loop_ms(opt: optax.GradientTransformation, params: Any, repeats: int, rounds: int) -> float:
    """Time per step of a donated training loop (parameters and state fed back)."""
    grads = jax.tree.map(lambda x: 0.1 * x, params)

    def step(p: Any, s: Any) -> tuple[Any, Any]:
        updates, s = opt.update(grads, s, p)
        return optax.apply_updates(p, updates), s

    donated = jax.jit(step, donate_argnums=(0, 1))
    carry = [jax.block_until_ready(donated(jax.tree.map(jnp.copy, params), opt.init(params)))]

    def advance() -> Any:
        carry[0] = donated(*carry[0])
        return carry[0]

    return _median_ms(advance, repeats, rounds)


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

    def tall_products(mu_a, mu_b, kk):
        return (
            jnp.matmul(mu_a, kk, precision="highest"),
            jnp.einsum("nrm,nrs->nsm", mu_b, kk, precision="highest"),
        )

    def ema(a, b, mu_a, mu_b):
        return tuple(0.9 * x + 0.1 * g for x, g in ((mu_a, a), (mu_b, b), (a, mu_a), (b, mu_b)))

    # lora_b (r, out): flax's layout. The loop feeds fixed gradients back, so the
    # factors drift; at this scale every step stays on the fast form (the robust
    # row shows what a step costs where it does not).
    params = {f"l{i}": {"lora_a": a[i], "lora_b": b[i]} for i in range(n)}

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
            "2 r×r inverse-root chains (2n matrices each)",
            2
            * median_ms(
                lambda s: _polar.inverse_sqrt_normalized(s, "gram"), s, repeats=reps, rounds=rounds
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
            loop_ms(lora_muon(0.1), params, reps, rounds),
            (4 * 2 + 2 * 2) * factor * r,
            2 * 10 * factor * F32_BYTES,
        ),
        (
            "whole step: optax.adamw, donated loop",
            loop_ms(optax.adamw(1e-3), params, reps, rounds),
            2 * 12 * factor,
            2 * 7 * factor * F32_BYTES,
        ),
    ]
    print("\n| part | time (ms) | GFLOP | flop floor (ms) | MB moved | byte floor (ms) |")
    print("|---|---|---|---|---|---|")
    for name, ms, flops, nbytes in rows:
        flop_floor = flops / peak_gflops / 1e6
        byte_floor = nbytes / bandwidth_gbs / 1e6
        print(
            f"| {name} | {ms:.3f} | {flops / 1e9:.3f} | {flop_floor:.3f} | "
            f"{nbytes / 1e6:.1f} | {byte_floor:.3f} |"
        )
    muon, adamw = rows[-2][1], rows[-1][1]
    muon_floor = max(rows[-2][2] / peak_gflops, rows[-2][3] / bandwidth_gbs) / 1e6
    adamw_floor = max(rows[-1][2] / peak_gflops, rows[-1][3] / bandwidth_gbs) / 1e6
    print(
        f"\nlora_muon / adamw: {muon / adamw:.2f}x measured (target ≤ 2x); floors "
        f"{muon_floor:.3f} / {adamw_floor:.3f} ms = {muon_floor / adamw_floor:.2f}x "
        "(each the larger of its flop and byte floor)."
    )


if __name__ == "__main__":
    main()
