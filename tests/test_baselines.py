"""Baselines (lora_muon_jax.baselines) against float64 references and identities.

* LoRA-RITE core: with ``B = Q_B R_B``, ``msign(M_A R_B⁻¹) R_B⁻ᵀ`` equals LoRA-Muon's
  ``msign(M_A S_B^{-1/2}) S_B^{-1/2}`` (``R_Bᵀ R_B = S_B``), so ``lora_rite(η/2)`` steps
  like ``lora_muon(η)``. Checked in float64 (the identity itself), against the spec's
  oracle ``tests/reference.py`` and against ``lora_muon`` / ``lora_muon_direction``.
* Spectron is not gauge invariant: ``(A, B) → (cA, B/c)`` changes its induced ΔW,
  while LoRA-Muon's ΔW does not.
* Dense Muon: ``W ← (1 − λη) W − η msign(M)`` against a float64 SVD.

Tolerances: float32 QR/SVD/triangular solves are backward stable, so at condition
number κ their relative error is ≲ κ·u·(small constant), u = 6e-8 (float32 unit
roundoff); ``RITE_TOL = 100·κ·u`` at κ = 10 is 6e-5. LoRA-Muon is held to the
project's contract for ``method="gram"`` (1e-4 relative at κ ≤ 10, as in
tests/test_lora_muon.py). Dense Muon uses ``matrix_sign`` (the paper's 8-step
Newton–Schulz), within 2 × the spec's 5e-4 (as in tests/test_polar.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lora_muon_jax import lora_muon, lora_muon_direction, maxtext_dimension_numbers
from lora_muon_jax.baselines import (
    ScaleBySpectronState,
    dense_muon,
    lora_rite,
    lora_rite_direction,
    scale_by_dense_muon,
    scale_by_lora_rite,
    scale_by_spectron,
    spectral_norm_power,
    spectron,
)
from tests import reference

KAPPA = 10.0
F32_UNIT_ROUNDOFF = 2.0**-24
RITE_TOL = 100 * KAPPA * F32_UNIT_ROUNDOFF  # 6e-5
LORA_MUON_GRAM_TOL = 1e-4  # the project's contract for method="gram" at κ <= 10
MSIGN_TOL = 2 * 5e-4  # 2 × the spec's published error of the paper's msign recipe


def _rel(x: object, y: object) -> float:
    x64, y64 = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return float(np.linalg.norm(x64 - y64) / np.linalg.norm(y64))


def _factors(seed: int, m: int = 48, n: int = 32, r: int = 4, kappa: float = KAPPA):
    """Float32-representable A (m, r), B (n, r) of condition κ and a gradient G_W (m, n)."""
    rng = np.random.default_rng(seed)
    a = reference.random_factor(rng, m, r, kappa, scale=2.0)
    b = reference.random_factor(rng, n, r, kappa, scale=0.5)
    g_w = rng.standard_normal((m, n))
    return tuple(np.asarray(np.float32(x), np.float64) for x in (a, b, g_w))


def _params(a: np.ndarray, b: np.ndarray) -> dict:
    # Flax layout: lora_a = A (in, r), lora_b = Bᵀ (r, out).
    return {"layer": {"lora_a": jnp.asarray(a, jnp.float32), "lora_b": jnp.asarray(b.T)}}


def _linear_loss_grads(params: dict, g_w: np.ndarray) -> dict:
    """Gradients of ``⟨G_W, A Bᵀ⟩``: ``G_A = G_W B``, ``G_B = G_Wᵀ A`` (flax layout)."""
    g = jnp.asarray(g_w, params["layer"]["lora_a"].dtype)
    return jax.grad(lambda p: jnp.sum(g * (p["layer"]["lora_a"] @ p["layer"]["lora_b"])))(params)


def _run(opt: optax.GradientTransformation, params: dict, g_w: np.ndarray, steps: int) -> dict:
    state = opt.init(params)

    @jax.jit
    def step(p, s):
        updates, s = opt.update(_linear_loss_grads(p, g_w), s, p)
        return optax.apply_updates(p, updates), s

    for _ in range(steps):
        params, state = step(params, state)
    return params


# ------------------------------------------------------------------ LoRA-RITE core


def _rite_direction_f64(a, b, mu_a, mu_b):
    """The RITE core in float64 from its definition (QR, triangular solves, SVD)."""
    r_a = np.linalg.qr(a, mode="r")
    r_b = np.linalg.qr(b, mode="r")
    d_a = reference.msign(mu_a @ np.linalg.inv(r_b)) @ np.linalg.inv(r_b).T
    d_b = reference.msign(mu_b @ np.linalg.inv(r_a)) @ np.linalg.inv(r_a).T
    return d_a, d_b


@pytest.mark.parametrize("seed", [0, 1])
def test_rite_identity_in_float64(seed: int) -> None:
    """``msign(M R_B⁻¹) R_B⁻ᵀ = msign(M S_B^{-1/2}) S_B^{-1/2}``: exact, so ~1e-13 in float64."""
    a, b, g_w = _factors(seed)
    d_rite = _rite_direction_f64(a, b, g_w @ b, g_w.T @ a)
    d_muon = reference.direction(a, b, g_w @ b, g_w.T @ a)
    for x, y in zip(d_rite, d_muon, strict=True):
        assert _rel(x, y) < 1e-10


@pytest.mark.parametrize("seed", [0, 1])
def test_rite_direction_matches_float64_and_lora_muon(seed: int) -> None:
    a, b, g_w = _factors(seed)
    mu_a, mu_b = g_w @ b, g_w.T @ a
    args32 = [jnp.asarray(x, jnp.float32) for x in (a, b, mu_a, mu_b)]
    got = lora_rite_direction(*args32)
    ref = reference.direction(a, b, mu_a, mu_b)
    muon = lora_muon_direction(*args32)
    for g, r, mm in zip(got, ref, muon, strict=True):
        assert g.dtype == jnp.float32
        assert _rel(g, r) <= RITE_TOL
        assert _rel(g, mm) <= RITE_TOL + LORA_MUON_GRAM_TOL
    # Each tangent half has spectral norm 1 (the step's radius is η').
    assert np.linalg.norm(np.asarray(got[0], np.float64) @ b.T, 2) == pytest.approx(1, abs=1e-5)
    assert np.linalg.norm(a @ np.asarray(got[1], np.float64).T, 2) == pytest.approx(1, abs=1e-5)


def test_rite_at_half_lr_equals_lora_muon_trajectory() -> None:
    """Three steps of ``lora_rite(η/2)`` = ``lora_muon(η)`` (no decay), momentum included."""
    a, b, g_w = _factors(2)
    eta = 0.05
    rite = _run(lora_rite(eta / 2, weight_decay=0.0), _params(a, b), g_w, steps=3)
    muon = _run(lora_muon(eta, weight_decay=0.0), _params(a, b), g_w, steps=3)
    start = _params(a, b)["layer"]
    for key in ("lora_a", "lora_b"):
        moved_rite = np.asarray(rite["layer"][key], np.float64) - np.asarray(start[key])
        moved_muon = np.asarray(muon["layer"][key], np.float64) - np.asarray(start[key])
        assert _rel(moved_rite, moved_muon) <= RITE_TOL + LORA_MUON_GRAM_TOL


def test_rite_state_and_dtypes() -> None:
    a, b, g_w = _factors(3)
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _params(a, b))
    tx = scale_by_lora_rite(mu_dtype=jnp.float32)
    state = tx.init(params)
    assert state.count.dtype == jnp.int32
    assert all(m.dtype == jnp.float32 for m in jax.tree.leaves(state.mu))
    grads = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _linear_loss_grads(params, g_w))
    updates, state = tx.update(grads, state, params)
    assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(updates))
    assert all(np.all(np.isfinite(np.asarray(u, np.float32))) for u in jax.tree.leaves(updates))
    assert int(state.count) == 1


# ----------------------------------------------------------------------- Spectron


def _induced_delta_w(a, b, new_params) -> np.ndarray:
    """First-order change of W: ``ΔA Bᵀ + A ΔBᵀ`` (float64)."""
    d_a = np.asarray(new_params["layer"]["lora_a"], np.float64) - a
    d_b = np.asarray(new_params["layer"]["lora_b"], np.float64).T - b
    return d_a @ b.T + a @ d_b.T


@pytest.mark.parametrize("c", [3.0, 9.0])
def test_spectron_is_not_gauge_invariant_lora_muon_is(c: float) -> None:
    a, b, g_w = _factors(4)
    a_c, b_c = np.float32(a * c).astype(np.float64), np.float32(b / c).astype(np.float64)
    eta = 0.05
    for name, opt, expect_invariant in (
        ("lora_muon", lora_muon(eta, weight_decay=0.0), True),
        ("spectron", spectron(eta, weight_decay=0.0), False),
    ):
        dw1 = _induced_delta_w(a, b, _run(opt, _params(a, b), g_w, steps=1))
        dw_c = _induced_delta_w(a_c, b_c, _run(opt, _params(a_c, b_c), g_w, steps=1))
        change = _rel(dw_c, dw1)
        if expect_invariant:
            assert change <= LORA_MUON_GRAM_TOL, (name, change)
        else:
            # ‖A‖₂ = 2 and ‖B‖₂ = 0.5 become 2c and 0.5/c: ρ and the per-factor
            # contributions change by O(1) factors, far beyond rounding.
            assert change > 0.1, (name, change)


def test_spectron_step_matches_float64_reference() -> None:
    a, b, g_w = _factors(5)
    eta, lam, beta = 0.1, 0.01, 0.9
    got = _run(
        spectron(eta, weight_decay=lam, momentum=beta, power_iterations=100),
        _params(a, b),
        g_w,
        steps=1,
    )
    rho = eta / (np.linalg.norm(a, 2) + np.linalg.norm(b, 2) + 1.0)
    mu_a, mu_b = (1 - beta) * (g_w @ b), (1 - beta) * (g_w.T @ a)
    want_a = (1 - lam * eta) * a - rho * reference.msign(mu_a)
    want_b = (1 - lam * eta) * b - rho * reference.msign(mu_b)
    got_a = np.asarray(got["layer"]["lora_a"], np.float64)
    got_b = np.asarray(got["layer"]["lora_b"], np.float64).T
    assert _rel(got_a - a, want_a - a) <= MSIGN_TOL
    assert _rel(got_b - b, want_b - b) <= MSIGN_TOL


def test_spectral_norm_power_iteration() -> None:
    rng = np.random.default_rng(6)
    x = np.stack([reference.random_factor(rng, 40, 6, 30.0, scale=s) for s in (0.1, 7.0)])
    v0 = jnp.full((2, 6), 6**-0.5, jnp.float32)
    sigma, v = spectral_norm_power(jnp.asarray(x, jnp.float32), v0, iterations=60)
    want = [np.linalg.norm(xi, 2) for xi in x]
    np.testing.assert_allclose(np.asarray(sigma), want, rtol=1e-5)
    assert v.shape == (2, 6) and v.dtype == jnp.float32


def test_spectron_state_dtypes_and_errors() -> None:
    a, b, g_w = _factors(7)
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _params(a, b))
    tx = scale_by_spectron()
    state = tx.init(params)
    assert state.count.dtype == jnp.int32
    assert all(m.dtype == jnp.bfloat16 for m in jax.tree.leaves(state.mu))
    assert [v.shape for v in state.power_vectors[0]] == [(1, 4), (1, 4)]
    grads = _linear_loss_grads(params, g_w)
    updates, new_state = jax.jit(tx.update)(grads, state, params)
    assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(updates))
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    with pytest.raises(ValueError, match=r"\['bias'\]"):
        tx.init({**params, "bias": jnp.zeros(3)})
    with pytest.raises(ValueError, match="params"):
        tx.update(grads, state, None)


def test_spectron_maxtext_layout_steps_per_layer() -> None:
    # The layer axis inside both factors (MaxText): one power-iteration state per layer,
    # and each layer steps as its 2-D pair alone would (same float32 math, batched).
    rng = np.random.default_rng(11)
    layers, m, n, r = 3, 8, 6, 2

    def tree(scale: float) -> dict:
        return {
            "lora_a": jnp.asarray(scale * rng.standard_normal((m, layers, r)), jnp.float32),
            "lora_b": jnp.asarray(scale * rng.standard_normal((r, layers, n)), jnp.float32),
        }

    params, grads = tree(0.5), [tree(1.0), tree(1.0)]
    opt = spectron(0.1, weight_decay=0.01, dimension_numbers=maxtext_dimension_numbers())
    state = opt.init(params)
    (spectron_state,) = [
        s
        for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, ScaleBySpectronState))
        if isinstance(s, ScaleBySpectronState)
    ]
    assert [v.shape for v in spectron_state.power_vectors[0]] == [(layers, r)] * 2
    stepped = params
    for g in grads:
        u, state = opt.update(g, state, stepped)
        stepped = optax.apply_updates(stepped, u)
    alone_opt = spectron(0.1, weight_decay=0.01)
    for i in range(layers):
        alone = {k: params[k][:, i] for k in params}
        alone_state = alone_opt.init(alone)
        for g in grads:
            u, alone_state = alone_opt.update({k: g[k][:, i] for k in g}, alone_state, alone)
            alone = optax.apply_updates(alone, u)
        for k in alone:
            want = np.asarray(alone[k])
            np.testing.assert_allclose(
                stepped[k][:, i], want, rtol=0, atol=1e-6 * np.abs(want).max(), err_msg=k
            )


# ---------------------------------------------------------------------- dense Muon


def test_dense_muon_matches_float64_svd() -> None:
    rng = np.random.default_rng(8)
    w = {
        "w": np.float32(rng.standard_normal((24, 40)) / 5).astype(np.float64),
        "stacked": np.float32(rng.standard_normal((3, 16, 8))).astype(np.float64),
    }
    grads = [jax.tree.map(lambda x: np.float32(rng.standard_normal(x.shape)), w) for _ in range(2)]
    eta, lam, beta = 0.1, 0.01, 0.9
    opt = dense_muon(eta, weight_decay=lam, momentum=beta)
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), w)
    state = opt.init(params)
    want = dict(w)
    mu = jax.tree.map(np.zeros_like, w)
    for g in grads:
        updates, state = opt.update(jax.tree.map(jnp.asarray, g), state, params)
        params = optax.apply_updates(params, updates)
        for k in w:
            mu[k] = beta * mu[k] + (1 - beta) * g[k]
            want[k] = (1 - lam * eta) * want[k] - eta * reference.msign(mu[k])
    for k in w:
        moved = np.asarray(params[k], np.float64) - w[k]
        assert _rel(moved, want[k] - w[k]) <= MSIGN_TOL, k


def test_dense_muon_step_has_spectral_norm_eta_and_fallback_is_adamw() -> None:
    rng = np.random.default_rng(9)
    params = {
        "kernel": jnp.asarray(rng.standard_normal((32, 16)), jnp.float32),
        "embed": jnp.asarray(rng.standard_normal((10, 16)), jnp.float32),
        "scale": jnp.ones(16, jnp.float32),
    }
    grads = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), params)
    opt = dense_muon(
        0.2,
        weight_decay=0.0,
        is_matrix=lambda path, leaf: path[-1] == "kernel",
        fallback_learning_rate=1e-3,
    )
    updates, _ = opt.update(grads, opt.init(params), params)
    assert np.linalg.norm(np.asarray(updates["kernel"], np.float64), 2) == pytest.approx(
        0.2, rel=MSIGN_TOL
    )
    adam = optax.adamw(1e-3, weight_decay=0.0)
    rest = {k: params[k] for k in ("embed", "scale")}
    with jax.numpy_dtype_promotion("standard"):
        want, _ = adam.update({k: grads[k] for k in rest}, adam.init(rest), rest)
    for k in rest:
        np.testing.assert_allclose(np.asarray(updates[k]), np.asarray(want[k]), rtol=1e-6)


def test_dense_muon_state_dtypes_and_errors() -> None:
    params = {"w": jnp.ones((8, 4), jnp.bfloat16)}
    tx = scale_by_dense_muon(mu_dtype=jnp.float32)
    state = tx.init(params)
    assert state.count.dtype == jnp.int32 and state.mu["w"].dtype == jnp.float32
    updates, state = jax.jit(tx.update)({"w": jnp.ones((8, 4), jnp.bfloat16)}, state)
    assert updates["w"].dtype == jnp.bfloat16 and state.mu["w"].dtype == jnp.float32
    with pytest.raises(ValueError, match=r"\['b'\].*\(4,\)"):
        tx.init({"w": jnp.ones((8, 4)), "b": jnp.ones(4)})
    with pytest.raises(ValueError, match="params"):
        dense_muon(0.1).update(params, dense_muon(0.1).init(params), None)
