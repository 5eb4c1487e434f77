"""The step never leaves its trust region; accuracy against the float64 oracle where LoRA goes.

Contract (docs/algorithm.md, "Properties"): each tangent half ``‖ΔA Bᵀ‖₂``,
``‖A ΔBᵀ‖₂`` has spectral norm η/2 and never more than ``η/2 · (1 + 1e-3)``, whatever
the conditioning, the scale or the dtype; a direction float32 cannot resolve shrinks,
it never grows, and never vanishes where the exact step is well defined.

Halves are measured here in float64 from the float32 result (thin QR of the partner
factor, no m×n SVD), in units of η/2. The oracle is ``tests/reference.py`` (exact
SVD/eigh, float64). Tolerances on direction errors are the measured worst cases of
``benchmarks/numerics.py`` (its committed output) times ~3–5, stated per test.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lora_muon_jax import (
    _direction,
    lora_muon,
    lora_muon_direction,
    pair_diagnostics,
    scale_by_split_weight_decay,
)
from tests import reference as ref

METHODS = ("gram", "paper")
HALF_MAX = 1.0 + 1e-3  # the trust region, in units of η/2
_DIR = {m: jax.jit(functools.partial(lora_muon_direction, method=m)) for m in METHODS}


def _f32(x: np.ndarray) -> jax.Array:
    return jnp.asarray(np.asarray(x, np.float32))


def _half_svals(u: np.ndarray, f: np.ndarray) -> np.ndarray:
    """Singular values of ``u fᵀ`` in float64 (f = Q T thin QR: those of u Tᵀ)."""
    if not np.any(f):
        return np.zeros(min(u.shape))
    _, t = np.linalg.qr(np.asarray(f, np.float64))
    return np.linalg.svd(np.asarray(u, np.float64) @ t.T, compute_uv=False)


def _rel(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def _run(method, a, b, mu_a, mu_b):  # type: ignore[no-untyped-def]
    xs = [np.asarray(np.asarray(x, np.float32), np.float64) for x in (a, b, mu_a, mu_b)]
    u_a, u_b = _DIR[method](*(_f32(x) for x in xs))
    return xs, np.asarray(u_a, np.float64), np.asarray(u_b, np.float64)


def _bimodal(rng: np.random.Generator, m: int, r: int, w: float) -> np.ndarray:
    sig = np.array([1.0] * 4 + [w] * (r - 4))
    return (ref.random_orthonormal(rng, m, r) * sig) @ ref.random_orthonormal(rng, r, r).T


# ------------------------------------------------------------------ ill-conditioned momenta


# Measured worst direction errors (6 seeds, benchmarks/numerics.py table 1): gram 4.8e-6
# (w = 1e-2) … 2.7e-4 (w = 1e-4), 2.7e-3 (w = 1e-5, κ(M) = 1e5, beyond the 1e-2 contract's
# κ <= 1e3); 7.5e-5 for an exactly rank-4 momentum (w = 0, exact oracle).
GRAM_BIMODAL_TOL = {1e-2: 1e-4, 1e-3: 3e-4, 3e-4: 5e-4, 1e-4: 1e-3, 1e-5: 1e-2, 0.0: 5e-4}


@pytest.mark.parametrize("w", sorted(GRAM_BIMODAL_TOL, reverse=True))
@pytest.mark.parametrize("method", METHODS)
def test_bimodal_momentum_stays_in_trust_region(method: str, w: float) -> None:
    # The case: A, B orthonormal, r = 16, M's singular values [1]*4 + [w]*12 —
    # the whitened momentum M R is as ill-conditioned as M. The old Gram form gave
    # halves of 1.02 (w = 1e-3) … 1.4 (3e-4) and 2-24 % direction error.
    m, n, r = 256, 128, 16
    for seed in range(3):
        rng = np.random.default_rng(seed)
        a, b = ref.random_orthonormal(rng, m, r), ref.random_orthonormal(rng, n, r)
        mu_a, mu_b = _bimodal(rng, m, r, w), _bimodal(rng, n, r, w)
        xs, u_a, u_b = _run(method, a, b, mu_a, mu_b)
        s_a, s_b = _half_svals(u_a, xs[1]), _half_svals(u_b, xs[0])
        assert max(s_a.max(), s_b.max()) <= HALF_MAX, (seed, s_a.max(), s_b.max())
        if method == "gram":
            want_a, want_b = ref.direction(a, b, mu_a, mu_b) if w == 0 else ref.direction(*xs)
            assert _rel(u_a, want_a) <= GRAM_BIMODAL_TOL[w]
            assert _rel(u_b, want_b) <= GRAM_BIMODAL_TOL[w]
            if w > 0:  # never silently vanishes: every direction keeps most of its unit step
                assert min(s_a.min(), s_b.min()) >= 0.5


# Measured (3 seeds, 512×256, r = 16, benchmarks/numerics.py table 2): gram 2e-7, 8e-6,
# 3.5e-5, 2.6e-3, 4.5e-3 at κ = 1 … 1e4; the contract is 1e-2 up to κ = 1e3, bounded beyond.
GRAM_KAPPA_TOL = {1.0: 1e-5, 10.0: 5e-5, 100.0: 2e-4, 1e3: 1e-2, 1e4: 3e-2}


@pytest.mark.parametrize("kappa", sorted(GRAM_KAPPA_TOL))
@pytest.mark.parametrize("method", METHODS)
def test_ill_conditioned_factors_and_momenta(method: str, kappa: float) -> None:
    m, n, r = 512, 256, 16
    for seed in range(2):
        rng = np.random.default_rng(100 + seed)
        a, b = ref.random_factor(rng, m, r, kappa), ref.random_factor(rng, n, r, kappa)
        mu_a, mu_b = ref.random_factor(rng, m, r, kappa), ref.random_factor(rng, n, r, kappa)
        xs, u_a, u_b = _run(method, a, b, mu_a, mu_b)
        assert np.all(np.isfinite(u_a)) and np.all(np.isfinite(u_b))
        assert max(_half_svals(u_a, xs[1]).max(), _half_svals(u_b, xs[0]).max()) <= HALF_MAX
        if method == "gram":
            want_a, want_b = ref.direction(*xs)
            assert max(_rel(u_a, want_a), _rel(u_b, want_b)) <= GRAM_KAPPA_TOL[kappa]


def test_partner_beyond_float32_resolution_keeps_the_trust_region() -> None:
    # κ(B) = 1e5: storing a U_A with entries ~1/σ_min(B) in float32 rounds U_A Bᵀ by ~u κ.
    # The float64 oracle's own direction, rounded to float32, leaves the trust region here
    # (measured +1.5e-4…+3e-4); the robust form shrinks each half by 0.5 u κ_est and stays in.
    m, n, r = 72, 64, 64
    stored_excess, ours = [], []
    for seed in range(3):
        rng = np.random.default_rng(700 + seed)
        a, b = ref.random_factor(rng, m, r, 1.0), ref.random_factor(rng, n, r, 1e5)
        mu_a, mu_b = ref.random_factor(rng, m, r, 1.0), ref.random_factor(rng, n, r, 1.0)
        xs, u_a, u_b = _run("gram", a, b, mu_a, mu_b)
        want_a, _ = ref.direction(*xs)
        want_a = want_a / _half_svals(want_a, xs[1]).max()
        stored = np.asarray(want_a.astype(np.float32), np.float64)
        stored_excess.append(_half_svals(stored, xs[1]).max() - 1.0)
        ours.append(max(_half_svals(u_a, xs[1]).max(), _half_svals(u_b, xs[0]).max()))
    assert max(stored_excess) > 5e-5, stored_excess  # float32 storage alone overshoots
    assert max(ours) <= 1.0 + 1e-5, ours
    assert min(ours) >= 1.0 - 2e-2, ours  # shrunk by the margin, not lost


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_momentum_orthogonal_to_a_rank_deficient_partner_gives_zero(dtype: str) -> None:
    # B = x sᵀ of rank 1 and M_A = y tᵀ with t ⊥ s (±1 patterns): M_A R_B = 0 exactly, so
    # the exact U_A is 0 (msign(0) = 0); computed, M_A L_B is rounding noise, whose msign
    # would be a full step in a random direction. U_B is untouched by it.
    m, n, r = 12, 20, 4
    rng = np.random.default_rng(800)
    s_vec, t_vec = np.array([1.0, 1.0, 1.0, 1.0]), np.array([1.0, -1.0, 1.0, -1.0])
    a = ref.random_factor(rng, m, r, 2.0)
    b = np.outer(rng.standard_normal(n), s_vec)
    mu_a = np.outer(rng.standard_normal(m), t_vec)
    mu_b = rng.standard_normal((n, r))
    with jax.enable_x64(dtype == "float64"):
        args = [jnp.asarray(x, dtype) for x in (a, b, mu_a, mu_b)]
        u_a, u_b = (np.asarray(u, np.float64) for u in _DIR["gram"](*args))
    assert not np.any(u_a)
    # The exact M_A R_B vanishes (float64 leaves ~1e-17 of noise, which ref.msign would
    # also turn into a unit direction): nothing to step along.
    r_b = ref.inv_sqrt(b.T @ b)
    assert np.linalg.norm(mu_a @ r_b) <= 1e-12 * np.linalg.norm(mu_a) * np.linalg.norm(r_b)
    _, want_b = ref.direction(a, b, mu_a, mu_b)
    assert _rel(u_b, want_b) <= 1e-4
    assert abs(_half_svals(u_b, a).max() - 1.0) <= 1e-3


# ------------------------------------------------------------------ rank-deficient inputs


@pytest.mark.parametrize("k", [1, 2, 4, 8])
@pytest.mark.parametrize("method", METHODS)
def test_gradients_of_rank_below_r(method: str, k: int) -> None:
    # G_W of rank k < r = 16: exactly rank-deficient momenta (the old Gram form: halves up
    # to 1.175, 1.08 on the first step from B = 0), with B = 0, B full rank, B of rank k.
    # Oracle on the exact rank-k float64 inputs (float32 rounding adds ~1e-8-relative
    # singular values that an exact msign would turn into unit ones). Measured (6 seeds):
    # gram ≤ 1.3e-4 for B = 0 / full rank, ≤ 1e-4 for a rank-k B (1.1e-2 before the robust
    # form cleared the whitener's null-space part, docs/numerics.md).
    m, n, r = 256, 128, 16
    for seed in range(6):
        rng = np.random.default_rng(300 + seed)
        a = ref.random_factor(rng, m, r, 3.0)
        g_w = rng.standard_normal((m, k)) @ rng.standard_normal((k, n))
        cases = {
            "zero": (np.zeros((n, r)), 1e-3),
            "full": (ref.random_factor(rng, n, r, 3.0), 1e-3),
            "rank_k": (ref.random_factor(rng, n, k, 3.0) @ rng.standard_normal((k, r)), 1e-3),
        }
        for name, (b, tol) in cases.items():
            xs, u_a, u_b = _run(method, a, b, g_w @ b, g_w.T @ a)
            halves = max(_half_svals(u_a, xs[1]).max(), _half_svals(u_b, xs[0]).max())
            assert halves <= HALF_MAX, (name, seed, halves)
            if method == "gram":
                want_a, want_b = ref.direction(a, b, g_w @ b, g_w.T @ a)
                assert _rel(u_b, want_b) <= tol, (name, seed)
                if name != "zero":
                    assert _rel(u_a, want_a) <= tol, (name, seed)


# ------------------------------------------------------------------ scale


@pytest.mark.parametrize("method", METHODS)
def test_any_representable_scale_and_gauge(method: str) -> None:
    # (cA, B/c) and momenta × s over 60 orders of magnitude: ΔW is the same step (gauge
    # invariance) wherever float32 represents every input. The old code: a factor at
    # ~1e-19 was treated as zero, momenta at 1e-21 gave no step.
    rng = np.random.default_rng(400)
    m, n, r = 256, 128, 8
    a, b = ref.random_factor(rng, m, r, 5.0), ref.random_factor(rng, n, r, 5.0)
    g_w = rng.standard_normal((m, n))
    xs0, u_a0, u_b0 = _run(method, a, b, g_w @ b, g_w.T @ a)
    d0 = u_a0 @ xs0[1].T + xs0[0] @ u_b0.T
    tried = 0
    for c in (1e-30, 1e-20, 1e-10, 1e10, 1e20, 1e30):
        for s in (1e-30, 1.0, 1e30):
            exact = (a * c, b / c, s * g_w @ (b / c), s * g_w.T @ (a * c))
            peaks = [float(np.max(np.abs(x))) for x in exact]
            if min(peaks) < 1e-36 or max(peaks) > 1e37:
                continue
            tried += 1
            xs, u_a, u_b = _run(method, *exact)
            d = u_a @ xs[1].T + xs[0] @ u_b.T
            assert np.all(np.isfinite(d))
            assert max(_half_svals(u_a, xs[1]).max(), _half_svals(u_b, xs[0]).max()) <= HALF_MAX
            # Measured ≤ 6e-6 (gram), ≤ 1e-6 between scales (paper: its own error 4.5e-4
            # is the same at every scale).
            assert _rel(d, d0) <= 1e-4, (c, s)
    assert tried >= 6


def test_float64_beyond_float32_range() -> None:
    # Under x64 the math runs in float64: factors at 1e39 (not representable in float32)
    # give the same ΔW as at 1.
    rng = np.random.default_rng(401)
    m, n, r = 64, 48, 4
    a, b = ref.random_factor(rng, m, r, 3.0), ref.random_factor(rng, n, r, 3.0)
    g_w = rng.standard_normal((m, n))
    with jax.enable_x64(True):
        outs = []
        for c in (1.0, 1e39, 1e-39):
            xs = [jnp.asarray(x, jnp.float64) for x in (a * c, b / c, g_w @ b / c, g_w.T @ a * c)]
            u_a, u_b = lora_muon_direction(*xs)
            assert u_a.dtype == jnp.float64
            outs.append(
                np.asarray(u_a) @ np.asarray(xs[1]).T + np.asarray(xs[0]) @ np.asarray(u_b).T
            )
        want_a, want_b = ref.direction(a, b, g_w @ b, g_w.T @ a)
        want = want_a @ b.T + a @ want_b.T
    for d in outs:
        assert np.all(np.isfinite(d)) and _rel(d, want) <= 1e-6


# ------------------------------------------------------------------ closed loops


def _pair_params(a: np.ndarray, b: np.ndarray, dtype=jnp.float32) -> dict:  # type: ignore[no-untyped-def]
    return {"lora_a": jnp.asarray(a, dtype), "lora_b": jnp.asarray(b.T, dtype)}


def _grads(params: dict, target: jax.Array) -> dict:
    """Gradients of ½‖A Bᵀ − W*‖² in the flax layout (lora_b = Bᵀ)."""
    a, bt = params["lora_a"].astype(jnp.float32), params["lora_b"].astype(jnp.float32)
    g_w = a @ bt - target
    return {
        "lora_a": (g_w @ bt.T).astype(params["lora_a"].dtype),
        "lora_b": (a.T @ g_w).astype(params["lora_b"].dtype),
    }


def _halves(params: dict, updates: dict, lr: float) -> float:
    a, bt = np.asarray(params["lora_a"], np.float64), np.asarray(params["lora_b"], np.float64)
    da, dbt = np.asarray(updates["lora_a"], np.float64), np.asarray(updates["lora_b"], np.float64)
    return max(_half_svals(da, bt.T).max(), _half_svals(dbt.T, a).max()) / (lr / 2)


@pytest.mark.parametrize("method", METHODS)
def test_closed_loop_from_zero_b(method: str) -> None:
    # The loop: standard init B = 0, r = 16, rank-4 target, η = 0.1. Old Gram form:
    # halves 1.59 by step 5, W 0.32 from the reference after 10 steps. Measured now
    # (6 seeds): gram halves ≤ 1.00002, ‖W − W_oracle‖/‖W_oracle‖ ≤ 2.4e-4. The literal
    # paper method stays in its trust region but its trajectory leaves the oracle's (its
    # damped roots cannot pseudo-invert the exactly rank-4 B of step 1).
    m, n, r, k, lr = 128, 96, 16, 4, 0.1
    opt = lora_muon(lr, weight_decay=0.0, method=method)
    update = jax.jit(opt.update)
    for seed in range(3):
        rng = np.random.default_rng(200 + seed)
        a = rng.standard_normal((m, r)) / np.sqrt(m)
        target = ref.random_orthonormal(rng, m, k) @ ref.random_orthonormal(rng, n, k).T
        params = _pair_params(a, np.zeros((n, r)))
        state = opt.init(params)
        b, mu_a, mu_b = np.zeros((n, r)), np.zeros((m, r)), np.zeros((n, r))
        for _ in range(10):
            updates, state = update(_grads(params, jnp.asarray(target, jnp.float32)), state, params)
            assert _halves(params, updates, lr) <= HALF_MAX
            params = optax.apply_updates(params, updates)
            g_w = a @ b.T - target
            a, b, mu_a, mu_b = ref.step(
                a, b, g_w @ b, g_w.T @ a, mu_a, mu_b, lr=lr, weight_decay=0.0
            )
        if method == "gram":
            w = np.asarray(params["lora_a"], np.float64) @ np.asarray(params["lora_b"], np.float64)
            assert _rel(w, a @ b.T) <= 1e-2


@pytest.mark.parametrize("method", METHODS)
def test_zero_gradient_stretch_after_training(method: str) -> None:
    # 1000 steps of training a 64×32 rank-4 pair, then 800 steps of zero gradients: the
    # momenta decay geometrically to underflow (an unrouted expert, a masked layer). The
    # old Gram form stepped 2.9e5 × η/2 there and the loss jumped from 4e-5 to ~100.
    m, n, r, lr, train_steps, zero_steps = 64, 32, 4, 0.01, 1000, 800
    rng = np.random.default_rng(500)
    target = jnp.asarray(
        0.5 * ref.random_orthonormal(rng, m, r) @ ref.random_orthonormal(rng, n, r).T, jnp.float32
    )
    opt = lora_muon(
        optax.cosine_decay_schedule(lr, train_steps, 0.1), weight_decay=0.0, method=method
    )
    params = _pair_params(rng.standard_normal((m, r)) / np.sqrt(m), np.zeros((n, r)))

    def run(params, state, steps, zero):  # type: ignore[no-untyped-def]
        def body(carry, _):
            p, s = carry
            g = jax.tree.map(jnp.zeros_like, p) if zero else _grads(p, target)
            u, s = opt.update(g, s, p)
            return (optax.apply_updates(p, u), s), (p, u)

        return jax.lax.scan(body, (params, state), None, length=steps)

    (params, state), _ = jax.jit(run, static_argnums=(2, 3))(
        params, opt.init(params), train_steps, False
    )
    loss_before = 0.5 * float(jnp.sum((params["lora_a"] @ params["lora_b"] - target) ** 2))
    assert loss_before <= 1e-4
    (params, state), (ps, us) = jax.jit(run, static_argnums=(2, 3))(params, state, zero_steps, True)
    halves = [
        _halves(
            jax.tree.map(lambda x, i=i: x[i], ps), jax.tree.map(lambda x, i=i: x[i], us), lr * 0.1
        )
        for i in range(0, zero_steps, 7)
    ]
    assert max(halves) <= HALF_MAX
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves((params, state)))
    # Each step moves W by at most η (both halves) plus the decayed-product term: the loss
    # stays bounded by the distance the steps can travel, never jumps.
    w = params["lora_a"] @ params["lora_b"]
    assert float(jnp.linalg.norm(w - target, 2)) <= zero_steps * lr * 0.1 * 1.01 + 1e-2
    mu = state.inner_states["lora"].inner_state[0].mu
    assert max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(mu)) < 1e-30  # underflowed


# ------------------------------------------------------------------ dtypes


@pytest.mark.parametrize("method", METHODS)
def test_float16_cold_start_never_overflows(method: str) -> None:
    # float16 parameters and momenta from B = 0, and B with entries ~1e-6: the unit
    # direction (~1/‖B‖) exceeds float16's range while η·D does not. The direction is
    # kept in float32 until the learning rate has scaled it (scale before casting).
    m, n, r, lr = 128, 64, 8, 1e-3
    rng = np.random.default_rng(600)
    target = jnp.asarray(
        ref.random_orthonormal(rng, m, 4) @ ref.random_orthonormal(rng, n, 4).T, jnp.float32
    )
    opt = lora_muon(lr, weight_decay=0.0, method=method)
    update = jax.jit(opt.update)
    for b0 in (np.zeros((n, r)), 1e-6 * rng.standard_normal((n, r))):
        params = _pair_params(rng.standard_normal((m, r)) / np.sqrt(m), b0, jnp.float16)
        state = opt.init(params)
        for _ in range(20):
            updates, state = update(_grads(params, target), state, params)
            assert all(u.dtype == jnp.float16 for u in jax.tree.leaves(updates))
            assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves((updates, state)))
            params = optax.apply_updates(params, updates)
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(params))


def test_float16_step_that_cannot_fit_is_shrunk_not_inf() -> None:
    # A unit direction of 1e6 at η = 0.1: the step (1e5) exceeds float16's 65504. It is
    # scaled as a whole to a quarter of float16's max (direction kept, never inf); the
    # guard is float16's alone: bfloat16 and float32 steps carry no extra reduction.
    tx = scale_by_split_weight_decay(0.1, 0.0)
    d = jnp.asarray(np.linspace(-1e6, 1e6, 8).reshape(2, 4), jnp.float32)
    p = jnp.ones((2, 4), jnp.float16)
    step, _ = tx.update({"w": d}, tx.init({"w": p}), {"w": p})
    got = np.asarray(step["w"], np.float64)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, -np.asarray(d) / 1e6 * 65504 / 4, rtol=2e-3)
    for dtype, guarded in ((jnp.float16, True), (jnp.bfloat16, False), (jnp.float32, False)):
        q = {"w": jnp.ones((2, 4), dtype)}
        jaxpr = jax.make_jaxpr(lambda u, q: tx.update(u, tx.init(q), q)[0])({"w": d}, q)
        assert ("reduce_max" in str(jaxpr)) == guarded, dtype


def test_float16_direction_stays_in_trust_region_before_the_cast() -> None:
    # The float32 step of float16 factors is in the trust region; storing it in float16
    # adds that format's rounding (2^-11 per entry, amplified by κ(B) in ΔA Bᵀ).
    rng = np.random.default_rng(601)
    m, n, r = 128, 64, 8
    a = jnp.asarray(rng.standard_normal((m, r)) / np.sqrt(m), jnp.float16)
    b = jnp.asarray(1e-3 * rng.standard_normal((n, r)), jnp.float16)
    g_w = rng.standard_normal((m, n))
    mu_a = jnp.asarray(g_w @ np.asarray(b, np.float64), jnp.float16)
    mu_b = jnp.asarray(g_w.T @ np.asarray(a, np.float64), jnp.float16)
    u_a, u_b = lora_muon_direction(a, b, mu_a, mu_b)
    assert u_a.dtype == jnp.float32
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert _half_svals(np.asarray(u_a), b64).max() <= HALF_MAX
    assert _half_svals(np.asarray(u_b), a64).max() <= HALF_MAX


# ------------------------------------------------------------------ the two forms


def test_fast_form_gate_is_what_keeps_the_trust_region(monkeypatch: pytest.MonkeyPatch) -> None:
    # Mutation check: with the gate disabled (the fast Gram form everywhere) the bimodal
    # case is wrong, so the tests above do exercise the robust form. The exact half has
    # all r singular values 1 (A, B orthonormal, M_A of full rank). The fast form's
    # 6-step roots do not resolve the small mode (its singular values come out ~0.11);
    # with the 9-step schedule it left the trust region instead (> 1.01).
    rng = np.random.default_rng(0)
    m, n, r = 256, 128, 16
    a, b = ref.random_orthonormal(rng, m, r), ref.random_orthonormal(rng, n, r)
    mu_a, mu_b = _bimodal(rng, m, r, 5e-4), _bimodal(rng, n, r, 5e-4)
    u_a, _ = lora_muon_direction(*(_f32(x) for x in (a, b, mu_a, mu_b)))
    gated = _half_svals(np.asarray(u_a), b)
    assert np.all(np.abs(gated - 1.0) < 1e-3), gated
    monkeypatch.setattr(_direction, "FAST_MAX_INVERSE_EIGENVALUE", float("inf"))
    u_a, _ = lora_muon_direction(*(_f32(x) for x in (a, b, mu_a, mu_b)))
    ungated = _half_svals(np.asarray(u_a), b)
    assert ungated.max() > 1.01 or ungated.min() < 0.5, ungated


def test_robust_form_agrees_with_fast_form_where_both_apply(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # On well-conditioned inputs the robust form (forced by a zero gate) is as exact as
    # the fast one: measured 2e-7 apart at κ = 1.
    rng = np.random.default_rng(1)
    xs = [_f32(ref.random_factor(rng, s, 8, 3.0)) for s in (200, 100, 200, 100)]
    fast = lora_muon_direction(*xs)
    monkeypatch.setattr(_direction, "FAST_MAX_INVERSE_EIGENVALUE", 0.0)
    robust = lora_muon_direction(*xs)
    for f, g in zip(fast, robust, strict=True):
        assert _rel(np.asarray(g, np.float64), np.asarray(f, np.float64)) <= 2e-5


def test_stacked_pairs_take_the_robust_form_together() -> None:
    # Two pairs of one shape are stacked into one batch; one of them needs the robust form,
    # so the whole stack takes it. The well-conditioned pair's result must not change.
    rng = np.random.default_rng(2)
    m, n, r = 128, 64, 8
    good = [ref.random_factor(rng, s, r, 2.0) for s in (m, n, m, n)]
    bad = [ref.random_factor(rng, s, r, 2.0) for s in (m, n)]
    low = rng.standard_normal((m, 2)) @ rng.standard_normal((2, n))
    bad += [low @ bad[1], low.T @ bad[0]]
    alone = lora_muon_direction(*(_f32(x) for x in good))
    stacked = lora_muon_direction(
        *(jnp.stack([_f32(g), _f32(x)]) for g, x in zip(good, bad, strict=True))
    )
    for s, one in zip(stacked, alone, strict=True):
        assert _rel(np.asarray(s[0], np.float64), np.asarray(one, np.float64)) <= 2e-5


# ------------------------------------------------------------------ diagnostics


def test_pair_diagnostics_against_svd() -> None:
    rng = np.random.default_rng(3)
    a = ref.random_factor(rng, 96, 6, 30.0) * 3.0
    b = ref.random_factor(rng, 40, 6, 5.0)
    da, db = rng.standard_normal((96, 6)), rng.standard_normal((40, 6))
    params = {"layer": {"lora_a": _f32(a), "lora_b": _f32(b.T)}, "bias": jnp.zeros(3)}
    updates = {"layer": {"lora_a": _f32(da), "lora_b": _f32(db.T)}, "bias": jnp.zeros(3)}
    (d,) = pair_diagnostics(params, updates).values()
    sa, sb = np.linalg.svd(a, compute_uv=False), np.linalg.svd(b, compute_uv=False)
    dw = da @ b.T + a @ db.T
    sw = np.linalg.svd(dw, compute_uv=False)
    np.testing.assert_allclose(float(d.cond_a), sa[0] / sa[-1], rtol=1e-4)
    np.testing.assert_allclose(float(d.cond_b), sb[0] / sb[-1], rtol=1e-4)
    np.testing.assert_allclose(float(d.balance), sa[0] / sb[0], rtol=1e-5)
    np.testing.assert_allclose(float(d.step_stable_rank), np.sum(sw**2) / sw[0] ** 2, rtol=1e-4)
    (z,) = pair_diagnostics({"lora_a": _f32(a), "lora_b": jnp.zeros((6, 40))}).values()
    assert float(z.cond_b) == np.inf and float(z.balance) == np.inf
    assert np.isnan(float(z.step_stable_rank))
