"""Numerics of the LoRA-Muon step against a float64 SVD/eigh oracle: trust region and accuracy.

Run:      python benchmarks/numerics.py            (~4 min on a 2-core CPU)
          python benchmarks/numerics.py --quick    (fewer seeds and steps, ~1.5 min)
Hardware: a 2-core x86-64 VM, CPU backend; runs unchanged on a GPU.
Output:   benchmarks/results/numerics_cpu_2core.txt is this script's output on that VM.

Every "half" is the spectral norm of one tangent half of the step, ``‖ΔA Bᵀ‖₂`` or
``‖A ΔBᵀ‖₂``, in units of η/2 (the trust region is 1; the contract is ≤ 1 + 1e-3),
computed in float64 from the float32 result. "err" is the relative Frobenius distance
of the direction (or of W after a closed loop) from the float64 oracle of
``tests/reference.py`` (exact SVD/eigh, written from the paper, independent of the code).

Tables:
  1. bimodal momentum: A, B orthonormal, r = 16, M's singular values [1]*4 + [w]*12;
  2. accuracy vs condition number: κ(A) = κ(B) = κ(M) = κ;
  3. closed loop from the standard init B = 0 (r = 16, rank-4 target), 10 steps;
  4. gradients of rank k < r (first step from B = 0 and later steps), many seeds;
  5. scale: factors (cA, B/c) and momenta scaled by 1e-30 … 1e30 (gauge invariance);
  6. zero-gradient stretch: 1000 steps of training, then 800 steps of zero gradients;
  7. float16 cold start from B = 0 (parameters and momenta in float16);
  8. bfloat16 parameters: bfloat16 vs float32 momenta in a closed loop;
  9. cost of the robust form (taken where an r×r bound says the Gram form is inexact).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lora_muon_jax import lora_muon, lora_muon_direction
from tests import reference as ref

METHODS = ("gram", "paper")
_DIR = {
    m: jax.jit(lambda a, b, ma, mb, m=m: lora_muon_direction(a, b, ma, mb, method=m))
    for m in METHODS
}


def f32(x: np.ndarray) -> jax.Array:
    return jnp.asarray(np.asarray(x, np.float32))


def as64(x: jax.Array | np.ndarray) -> np.ndarray:
    return np.asarray(x, np.float64)


def half_norm(u: np.ndarray, f: np.ndarray) -> float:
    """‖u fᵀ‖₂ in float64 via a thin QR of f (exact, no m×n SVD)."""
    if not np.any(f):
        return 0.0
    _, t = np.linalg.qr(f)
    return float(np.linalg.svd(u @ t.T, compute_uv=False)[0])


def rel(got: np.ndarray, want: np.ndarray) -> float:
    den = np.linalg.norm(want)
    return float(np.linalg.norm(got - want) / den) if den > 0 else float(np.linalg.norm(got))


def direction_case(method: str, a, b, mu_a, mu_b, *, exact: bool = False) -> tuple[float, float]:
    """(max half, max direction error) of one direction evaluation vs the oracle.

    The oracle sees the float32-rounded inputs the code receives, or with ``exact``
    the float64 inputs themselves: for exactly rank-deficient inputs the rounding
    adds ~1e-8-relative singular values that the oracle would turn into unit ones.
    """
    xs = [as64(np.asarray(x, np.float32)) for x in (a, b, mu_a, mu_b)]
    u_a, u_b = (as64(u) for u in _DIR[method](*(f32(x) for x in xs)))
    want_a, want_b = ref.direction(*((a, b, mu_a, mu_b) if exact else xs))
    halves = max(half_norm(u_a, xs[1]), half_norm(u_b, xs[0]))
    return halves, max(rel(u_a, want_a), rel(u_b, want_b))


class Half(float):
    """A half norm in units of η/2: printed with 6 decimals (the contract is 1 + 1e-3)."""


def table(title: str, header: list[str], rows: list[list[object]]) -> None:
    print(f"\n## {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        cells = [
            f"{c:.6f}" if isinstance(c, Half) else f"{c:.3g}" if isinstance(c, float) else str(c)
            for c in row
        ]
        print("| " + " | ".join(cells) + " |")


# ------------------------------------------------------------------ 1, 2


def bimodal(seeds: int) -> None:
    rows = []
    m, n, r = 256, 128, 16
    for w in (1e-2, 1e-3, 5e-4, 3e-4, 1e-4, 1e-5):
        for method in METHODS:
            worst_h = worst_e = 0.0
            for seed in range(seeds):
                rng = np.random.default_rng(seed)
                a, b = ref.random_orthonormal(rng, m, r), ref.random_orthonormal(rng, n, r)
                sig = np.array([1.0] * 4 + [w] * 12)
                mu_a = (ref.random_orthonormal(rng, m, r) * sig) @ ref.random_orthonormal(
                    rng, r, r
                ).T
                mu_b = (ref.random_orthonormal(rng, n, r) * sig) @ ref.random_orthonormal(
                    rng, r, r
                ).T
                h, e = direction_case(method, a, b, mu_a, mu_b)
                worst_h, worst_e = max(worst_h, h), max(worst_e, e)
            rows.append([w, method, Half(worst_h), worst_e])
    table(
        f"1. Bimodal momentum (256×128, r = 16, worst of {seeds} seeds)",
        ["w", "method", "max half (η/2)", "direction err"],
        rows,
    )


def conditioning(seeds: int) -> None:
    rows = []
    m, n, r = 512, 256, 16
    for kappa in (1.0, 10.0, 100.0, 1e3, 1e4):
        for method in METHODS:
            worst_h = worst_e = 0.0
            for seed in range(seeds):
                rng = np.random.default_rng(100 + seed)
                a, b = ref.random_factor(rng, m, r, kappa), ref.random_factor(rng, n, r, kappa)
                mu_a, mu_b = (
                    ref.random_factor(rng, m, r, kappa),
                    ref.random_factor(rng, n, r, kappa),
                )
                h, e = direction_case(method, a, b, mu_a, mu_b)
                worst_h, worst_e = max(worst_h, h), max(worst_e, e)
            rows.append([kappa, method, Half(worst_h), worst_e])
    table(
        f"2. Accuracy vs condition number (512×256, r = 16, κ(A) = κ(B) = κ(M), worst of {seeds})",
        ["κ", "method", "max half (η/2)", "direction err"],
        rows,
    )


# ------------------------------------------------------------------ optimizer loops


def pair_params(a: np.ndarray, b: np.ndarray, dtype=jnp.float32) -> dict:
    return {"lora_a": jnp.asarray(a, dtype), "lora_b": jnp.asarray(b.T, dtype)}


def grads_of(params: dict, target: jax.Array) -> dict:
    """Gradients of ½‖A Bᵀ − W*‖² (flax layout: lora_b = Bᵀ)."""
    a = params["lora_a"].astype(jnp.float32)
    bt = params["lora_b"].astype(jnp.float32)
    g_w = a @ bt - target
    return {
        "lora_a": (g_w @ bt.T).astype(params["lora_a"].dtype),
        "lora_b": (a.T @ g_w).astype(params["lora_b"].dtype),
    }


def halves_of_update(params: dict, updates: dict, lr: float) -> tuple[float, float]:
    a, bt = as64(params["lora_a"]), as64(params["lora_b"])
    da, dbt = as64(updates["lora_a"]), as64(updates["lora_b"])
    scale = lr / 2
    return half_norm(da, bt.T) / scale, half_norm(dbt.T, a) / scale


def closed_loop(seeds: int) -> None:
    m, n, r, k, lr, steps = 128, 96, 16, 4, 0.1, 10
    rows = []
    for method in METHODS:
        worst_h = worst_e = 0.0
        for seed in range(seeds):
            rng = np.random.default_rng(200 + seed)
            a0 = rng.standard_normal((m, r)) / np.sqrt(m)
            target = ref.random_orthonormal(rng, m, k) @ ref.random_orthonormal(rng, n, k).T
            opt = lora_muon(lr, weight_decay=0.0, method=method)
            params = pair_params(a0, np.zeros((n, r)))
            state = opt.init(params)
            update = jax.jit(opt.update)
            a, b = a0.copy(), np.zeros((n, r))
            mu_a, mu_b = np.zeros_like(a), np.zeros_like(b)
            for _ in range(steps):
                g = grads_of(params, jnp.asarray(target, jnp.float32))
                updates, state = update(g, state, params)
                worst_h = max(worst_h, *halves_of_update(params, updates, lr))
                params = optax.apply_updates(params, updates)
                g_w = a @ b.T - target
                a, b, mu_a, mu_b = ref.step(
                    a, b, g_w @ b, g_w.T @ a, mu_a, mu_b, lr=lr, weight_decay=0.0
                )
            w_ours = as64(params["lora_a"]) @ as64(params["lora_b"])
            worst_e = max(worst_e, rel(w_ours, a @ b.T))
        rows.append([method, Half(worst_h), worst_e])
    table(
        f"3. Closed loop from B = 0 (128×96, r = 16, rank-4 target, η = 0.1, {steps} steps, "
        f"worst of {seeds} seeds)",
        ["method", "max half (η/2)", "‖W − W_oracle‖/‖W_oracle‖"],
        rows,
    )


def low_rank_gradients(seeds: int) -> None:
    m, n, r = 256, 128, 16
    rows = []
    for k in (1, 2, 4, 8):
        for method in METHODS:
            worst = {"from B = 0": [0.0, 0.0], "B full rank": [0.0, 0.0], "B rank k": [0.0, 0.0]}
            for seed in range(seeds):
                rng = np.random.default_rng(300 + seed)
                a = ref.random_factor(rng, m, r, 3.0)
                g_w = rng.standard_normal((m, k)) @ rng.standard_normal((k, n))
                cases = {
                    "from B = 0": np.zeros((n, r)),
                    "B full rank": ref.random_factor(rng, n, r, 3.0),
                    "B rank k": ref.random_factor(rng, n, k, 3.0) @ rng.standard_normal((k, r)),
                }
                for name, b in cases.items():
                    h, e = direction_case(method, a, b, g_w @ b, g_w.T @ a, exact=True)
                    worst[name] = [max(worst[name][0], h), max(worst[name][1], e)]
            rows.append(
                [k, method]
                + [f(x) for v in worst.values() for f, x in zip((Half, float), v, strict=True)]
            )
    table(
        f"4. Gradients of rank k < r (256×128, r = 16, worst of {seeds} seeds; oracle on the "
        "exact rank-k inputs)",
        ["k", "method"]
        + [f"{c} {q}" for c in ("B=0", "B full", "B rank k") for q in ("half", "err")],
        rows,
    )


def scales() -> None:
    rng = np.random.default_rng(400)
    m, n, r = 256, 128, 8
    a = ref.random_factor(rng, m, r, 5.0)
    b = ref.random_factor(rng, n, r, 5.0)
    g_w = rng.standard_normal((m, n))
    base = [as64(np.asarray(x, np.float32)) for x in (a, b, g_w @ b, g_w.T @ a)]
    want_a, want_b = ref.direction(*base)
    want = want_a @ base[1].T + base[0] @ want_b.T
    rows = []
    for method in METHODS:
        for c in (1e-30, 1e-20, 1e-10, 1.0, 1e10, 1e20, 1e30):
            for s in (1e-30, 1.0, 1e30):
                exact = (a * c, b / c, s * g_w @ (b / c), s * g_w.T @ (a * c))
                peaks = [float(np.max(np.abs(x))) for x in exact]
                if min(peaks) < 1e-36 or max(peaks) > 1e37:  # not representable in float32
                    continue
                xs = [as64(np.asarray(x, np.float32)) for x in exact]
                u_a, u_b = (as64(u) for u in _DIR[method](*(f32(x) for x in xs)))
                d_w = u_a @ xs[1].T + xs[0] @ u_b.T
                h = max(half_norm(u_a, xs[1]), half_norm(u_b, xs[0]))
                rows.append([method, c, s, Half(h), rel(d_w, want), bool(np.all(np.isfinite(d_w)))])
    table(
        "5. Scale: factors (cA, B/c), momenta × s, every combination float32 can represent "
        "(256×128, r = 8); ΔW against the oracle's at c = s = 1",
        ["method", "c", "s", "max half (η/2)", "ΔW err", "finite"],
        rows,
    )


def zero_gradient_stretch(train_steps: int, zero_steps: int) -> None:
    m, n, r, lr = 64, 32, 4, 0.01
    rows = []
    for method in METHODS:
        rng = np.random.default_rng(500)
        target = jnp.asarray(
            ref.random_orthonormal(rng, m, r) @ ref.random_orthonormal(rng, n, r).T * 0.5,
            jnp.float32,
        )
        opt = lora_muon(
            optax.cosine_decay_schedule(lr, train_steps, 0.1), weight_decay=0.0, method=method
        )
        params = pair_params(rng.standard_normal((m, r)) / np.sqrt(m), np.zeros((n, r)))
        state = opt.init(params)

        def loss(p, target=target):
            return 0.5 * float(jnp.sum((p["lora_a"] @ p["lora_b"] - target) ** 2))

        @jax.jit
        def train(params, state, opt=opt, target=target):
            def body(carry, _):
                p, s = carry
                u, s = opt.update(grads_of(p, target), s, p)
                return (optax.apply_updates(p, u), s), None

            return jax.lax.scan(body, (params, state), None, length=train_steps)[0]

        params, state = train(params, state)
        before = loss(params)
        zeros = jax.tree.map(jnp.zeros_like, params)
        update = jax.jit(opt.update)
        worst, moved, worst_err, kappa = 0.0, 0, 0.0, float("nan")
        lr_now = lr * 0.1  # the schedule has ended at alpha·η
        for t in range(zero_steps):
            if t % 50 == 0:  # this step's direction (momentum 0.9·M) against the oracle's
                mu = state.inner_states["lora"].inner_state[0].mu
                xs = [as64(x) for x in (params["lora_a"], params["lora_b"].T)]
                ms = [0.9 * as64(x) for x in (mu["lora_a"], mu["lora_b"].T)]
                # Measured while the momentum is far from float32's subnormal range:
                # below ~1e-30 its small entries start to flush to zero in XLA.
                if min(np.abs(ms[0]).max(), np.abs(ms[1]).max()) >= 1e-30:
                    u_a, u_b = (as64(x) for x in _DIR[method](*(f32(x) for x in xs + ms)))
                    want = ref.direction(*xs, *ms)
                    worst_err = max(worst_err, rel(u_a, want[0]), rel(u_b, want[1]))
                    if t == 0:  # condition number of the whitened momentum M_A R_B
                        kappa = np.linalg.cond(ms[0] @ ref.inv_sqrt(xs[1].T @ xs[1]))
            u, state = update(zeros, state, params)
            h = max(halves_of_update(params, u, lr_now))
            worst = max(worst, h)
            moved += int(h > 0)
            params = optax.apply_updates(params, u)
        rows.append(
            [method, before, loss(params), kappa, Half(worst), worst_err, f"{moved}/{zero_steps}"]
        )
    table(
        f"6. Zero-gradient stretch (64×32, r = 4; {train_steps} steps cosine η 0.01 → 0.001, "
        f"then {zero_steps} steps of zero gradients at η = 0.001; direction err every 50 steps "
        "while max|M| >= 1e-30)",
        [
            "method",
            "loss before",
            "loss after",
            "κ(M_A R_B)",
            "max half (η/2)",
            "direction err",
            "steps that moved",
        ],
        rows,
    )


def float16_cold_start() -> None:
    m, n, r, lr, steps = 256, 128, 16, 0.01, 30
    rows = []
    for method in METHODS:
        rng = np.random.default_rng(600)
        target = jnp.asarray(
            ref.random_orthonormal(rng, m, 4) @ ref.random_orthonormal(rng, n, 4).T, jnp.float32
        )
        params = pair_params(
            rng.standard_normal((m, r)) / np.sqrt(m) * 1e-3, np.zeros((n, r)), jnp.float16
        )
        opt = lora_muon(lr, weight_decay=0.0, method=method)
        state = opt.init(params)
        update = jax.jit(opt.update)
        worst_pre = worst_post = 0.0
        finite = True
        for _ in range(steps):
            g = grads_of(params, target)
            mu = jax.tree.map(
                lambda m_, g_: 0.9 * m_.astype(jnp.float32) + 0.1 * g_.astype(jnp.float32),
                state.inner_states["lora"].inner_state[0].mu,
                g,
            )
            u_a, u_b = _DIR[method](
                params["lora_a"], params["lora_b"].T, mu["lora_a"], mu["lora_b"].T
            )
            a, bt = as64(params["lora_a"]), as64(params["lora_b"])
            worst_pre = max(worst_pre, half_norm(as64(u_a), bt.T), half_norm(as64(u_b), a))
            u, state = update(g, state, params)
            finite &= all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves((u, state)))
            worst_post = max(worst_post, *halves_of_update(params, u, lr))
            params = optax.apply_updates(params, u)
        rows.append([method, finite, Half(worst_pre), Half(worst_post)])
    table(
        f"7. float16 cold start (256×128, r = 16, A ~ 1e-3·N(0, 1/m), B = 0, η = 0.01, {steps} "
        "steps, parameters and momenta float16): halves of the step before and after its cast "
        "to float16",
        ["method", "all finite", "max half, float32 step", "max half, float16 update"],
        rows,
    )


def bf16_momenta(seeds: int, steps: int) -> None:
    m, n, r = 256, 128, 16
    rows = []
    for noise in (0.0, 0.3):
        finals: dict[str, list[float]] = {
            "float32 params": [],
            "bfloat16, bfloat16 momenta": [],
            "bfloat16, float32 momenta": [],
        }
        for seed in range(seeds):
            rng = np.random.default_rng(700 + seed)
            target = jnp.asarray(
                ref.random_factor(rng, m, 64, 100.0) @ ref.random_orthonormal(rng, n, 64).T,
                jnp.float32,
            )
            a0 = rng.standard_normal((m, r)) / np.sqrt(m)
            for name, dtype, md in (
                ("float32 params", jnp.float32, None),
                ("bfloat16, bfloat16 momenta", jnp.bfloat16, None),
                ("bfloat16, float32 momenta", jnp.bfloat16, jnp.float32),
            ):
                opt = lora_muon(
                    optax.cosine_decay_schedule(0.02, steps, 0.01),
                    weight_decay=0.0,
                    mu_dtype=md,
                    momentum=0.95,
                )
                params = pair_params(a0, np.zeros((n, r)), dtype)

                @jax.jit
                def run(params, state, key, opt=opt, target=target, noise=noise):
                    def body(carry, k):
                        p, s = carry
                        t = target + noise * jax.random.normal(k, target.shape)
                        u, s = opt.update(grads_of(p, t), s, p)
                        return (optax.apply_updates(p, u), s), None

                    return jax.lax.scan(body, (params, state), jax.random.split(key, steps))[0][0]

                p = run(params, opt.init(params), jax.random.key(seed))
                w = p["lora_a"].astype(jnp.float32) @ p["lora_b"].astype(jnp.float32)
                finals[name].append(0.5 * float(jnp.sum((w - target) ** 2)))
        for name, v in finals.items():
            rows.append([noise, name, f"{np.mean(v):.5f}"])
    table(
        f"8. bfloat16 parameters, momentum dtype (256×128, r = 16, rank-64 target, {steps} steps, "
        f"cosine η 0.02, β = 0.95, gradient noise σ; final loss, mean of {seeds} seeds; the best "
        "rank-16 loss is 0.35410)",
        ["noise σ", "run", "final loss"],
        rows,
    )


def robust_cost() -> None:
    rng = np.random.default_rng(800)
    pairs, m, r = 24, 1024, 16
    a = np.stack([ref.random_factor(rng, m, r, 2.0) for _ in range(pairs)])
    b = np.stack([ref.random_factor(rng, m, r, 2.0) for _ in range(pairs)])
    well = [np.stack([ref.random_factor(rng, m, r, 2.0) for _ in range(pairs)]) for _ in range(2)]
    low = rng.standard_normal((pairs, m, 4)) @ rng.standard_normal((pairs, 4, r))  # rank 4 < r
    rows = []
    for name, (mu_a, mu_b) in (
        ("Gram form (well conditioned)", well),
        ("robust form (rank-4 momenta)", (low, low)),
    ):
        args = [f32(x) for x in (a, b, mu_a, mu_b)]
        fn = _DIR["gram"]
        jax.block_until_ready(fn(*args))
        times = []
        for _ in range(20):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times.append(time.perf_counter() - t0)
        rows.append([name, 1e3 * float(np.median(times))])
    rows.append(["ratio", rows[1][1] / rows[0][1]])
    table(
        f"9. Cost of the robust form: one direction call on {pairs} pairs of {m}×{r} (median ms)",
        ["path", "ms"],
        rows,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    seeds = 2 if args.quick else 6
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {jax.devices()[0].device_kind}")
    bimodal(seeds)
    conditioning(max(2, seeds // 2))
    closed_loop(seeds)
    low_rank_gradients(seeds)
    scales()
    zero_gradient_stretch(300 if args.quick else 1000, 200 if args.quick else 800)
    float16_cold_start()
    bf16_momenta(2 if args.quick else 3, 200 if args.quick else 400)
    robust_cost()


if __name__ == "__main__":
    main()
