"""LoRA-Muon-OGD against a float64 oracle written from the blog post's equations.

The oracle works on dense m×n matrices in NumPy float64 with exact linear
algebra (SVD polar factors, eigh inverse roots) and the Lagrangian form of the
step: ``G_W → G_W + U Λ Vᵀ``, ``G_A = G' B``, ``G_B = G'ᵀ A``,
``ΔA = −(η/2) msign(G_A S_B^{-1/2}) S_B^{-1/2}``,
``ΔB = −(η/2) msign(G_B S_A^{-1/2}) S_A^{-1/2}`` (S_A, not the post's S_B typo),
``Λ ← Λ + σ ν Uᵀ ΔW V / η`` with ν the step's first-order gain on the unshifted
gradients per unit of η/2 (over 2r; at Λ = 0 the mean singular value of the
whitened gradients).

Tolerances: the float32 Gram-form direction is within ~5e-4 relative of the
exact step (docs/performance_notes.md) on well-conditioned factors; over a few
dual steps the errors do not grow (the dual map contracts), so 2e-3 relative
on directions and 2e-4 absolute on unit residuals.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lora_muon_jax import (
    ScaleByLoRAMuonOGDState,
    lora_muon,
    lora_muon_ogd,
    lora_muon_ogd_direction,
    ogd_bases_from_delta,
    scale_by_lora_muon_ogd,
    update_ogd_bases,
)

# ---------------------------------------------------------------- oracle


def _msign(x: np.ndarray) -> np.ndarray:
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    keep = s > 1e-12 * max(s[0], 1e-300)
    return u[:, keep] @ vt[keep]


def _inv_sqrt(s: np.ndarray) -> np.ndarray:
    w, e = np.linalg.eigh(0.5 * (s + s.T))
    keep = w > 1e-12 * max(w[-1], 1e-300)
    inv = np.where(keep, 1.0 / np.sqrt(np.where(keep, w, 1.0)), 0.0)
    return (e * inv) @ e.T


def oracle(a, b, g_w, u, v, sigma, steps, lam=None, average=False):
    """Dense float64 LoRA-Muon-OGD: unit directions, Λ and unit residuals after each step.

    ``average``: also return the mean of the iterates and its residual (primal averaging).
    """
    a, b, g_w, u, v = (np.asarray(x, np.float64) for x in (a, b, g_w, u, v))
    r = a.shape[1]
    lam = np.zeros((u.shape[1], v.shape[1])) if lam is None else np.asarray(lam, np.float64)
    r_a, r_b = _inv_sqrt(a.T @ a), _inv_sqrt(b.T @ b)
    residuals, iterates = [], []
    for _ in range(steps):
        g = g_w + u @ lam @ v.T  # the constraint shifts the gradient
        x_a, x_b = (g @ b) @ r_b, (g.T @ a) @ r_a
        d_a, d_b = _msign(x_a) @ r_b, _msign(x_b) @ r_a
        dw_unit = -0.5 * (d_a @ b.T + a @ d_b.T)  # ΔW / η
        rho = u.T @ dw_unit @ v
        # ν: the step's first-order gain on the *unshifted* gradients per unit of η/2,
        # ⟨G_A S_B^{-1/2}, msign(X_A)⟩ + ⟨G_B S_A^{-1/2}, msign(X_B)⟩, over 2r.
        gain = np.sum((g_w @ b @ r_b) * _msign(x_a)) + np.sum((g_w.T @ a @ r_a) * _msign(x_b))
        nu = max(gain, 0.0) / (2 * r)
        lam = lam + sigma * nu * rho
        residuals.append(np.linalg.norm(rho))
        iterates.append((d_a, d_b))
    if average:
        m_a = np.mean([d[0] for d in iterates], axis=0)
        m_b = np.mean([d[1] for d in iterates], axis=0)
        res = np.linalg.norm(u.T @ (-0.5 * (m_a @ b.T + a @ m_b.T)) @ v)
        return m_a, m_b, lam, res
    return d_a, d_b, lam, np.array(residuals)


def _orth(rng, x):
    return np.linalg.qr(x)[0]


def _problem(seed=0, m=40, n=32, r=4, k=3, overlap=0.3):
    """Random factors, gradient and bases that overlap the factors' spans (as learned ones do)."""
    rng = np.random.default_rng(seed)
    f32 = lambda x: np.asarray(np.float32(x), np.float64)  # noqa: E731
    a = f32(rng.standard_normal((m, r)))
    b = f32(rng.standard_normal((n, r)))
    g = f32(rng.standard_normal((m, n)))
    u = f32(_orth(rng, a[:, :k] + overlap * rng.standard_normal((m, k))))
    v = f32(_orth(rng, b[:, :k] + overlap * rng.standard_normal((n, k))))
    return a, b, g, u, v


_direction_jit = jax.jit(lora_muon_ogd_direction, static_argnames=("dual_steps",))


@functools.partial(jax.jit, static_argnames=("steps", "average"))
def _ogd(a, b, g, u, v, sigma, steps, average=False):
    return lora_muon_ogd_direction(
        a, b, g @ b, g.T @ a, u, v, dual_steps=steps, dual_step_size=sigma, primal_average=average
    )


def _ogd_states(state):
    is_ogd = lambda x: isinstance(x, ScaleByLoRAMuonOGDState)  # noqa: E731
    return [x for x in jax.tree.leaves(state, is_leaf=is_ogd) if is_ogd(x)]


def _f32(*xs):
    return [jnp.asarray(x, jnp.float32) for x in xs]


# ---------------------------------------------------------------- the equations


def test_matches_oracle_and_residual_contracts() -> None:
    """Directions, Λ and residuals match the oracle; the residual falls geometrically.

    Measured (this problem, bases 0.3-perturbed from the factors' spans): per
    dual step the residual shrinks by ~0.55 at σ = 0.5 (0.53 → 7e-4 in 12
    steps) and ~0.31 at σ = 1; σ = 2 does not converge (it overshoots). The
    rate is 1 − O(σ · overlap of U, V with the factors' spans): bases 3×
    perturbed contract only ~0.92 per step at σ = 0.5 (docs/lora_muon_ogd.md).
    """
    a, b, g, u, v = _problem()
    args = _f32(a, b, g, u, v)
    for steps in (1, 8):
        d_a, d_b, lam, res = _ogd(*args, jnp.float32(0.5), steps)
        o_a, o_b, o_lam, o_res = oracle(a, b, g, u, v, 0.5, steps)
        np.testing.assert_allclose(d_a, o_a, rtol=2e-3, atol=2e-3 * np.abs(o_a).max())
        np.testing.assert_allclose(d_b, o_b, rtol=2e-3, atol=2e-3 * np.abs(o_b).max())
        np.testing.assert_allclose(lam, o_lam, rtol=2e-3, atol=2e-3 * np.abs(o_lam).max())
        np.testing.assert_allclose(float(res), o_res[-1], atol=2e-4)

    # The rate, measured on the oracle (exact arithmetic) and the code alike.
    _, _, _, o_res = oracle(a, b, g, u, v, 0.5, 8)
    ratios = o_res[1:] / o_res[:-1]
    assert np.all(ratios < 0.75), ratios
    assert 0.3 < np.exp(np.mean(np.log(ratios))) < 0.7, ratios
    code = [float(_ogd(*args, jnp.float32(0.5), j)[3]) for j in (1, 8)]
    np.testing.assert_allclose(code, o_res[[0, 7]], atol=2e-4)
    assert code[1] < 0.02 * code[0]

    # Primal averaging (the default): the mean of the 8 iterates, against the oracle's.
    m_a, m_b, _, m_res = _ogd(*args, jnp.float32(0.5), 8, True)
    o_a, o_b, _, o_mres = oracle(a, b, g, u, v, 0.5, 8, average=True)
    np.testing.assert_allclose(m_a, o_a, rtol=2e-3, atol=2e-3 * np.abs(o_a).max())
    np.testing.assert_allclose(m_b, o_b, rtol=2e-3, atol=2e-3 * np.abs(o_b).max())
    np.testing.assert_allclose(float(m_res), o_mres, atol=2e-4)

    _, _, _, fast = oracle(a, b, g, u, v, 1.0, 8)
    assert np.all(fast[1:] / fast[:-1] < 0.4), fast
    _, _, _, over = oracle(a, b, g, u, v, 2.0, 12)
    assert over[-1] > 0.5 * over[0], over  # too large a σ: no convergence


def test_each_half_stays_in_the_trust_region() -> None:
    for seed in range(3):
        a, b, g, u, v = _problem(seed)
        ja, jb, *_ = _f32(a, b, g, u, v)
        for average in (False, True):
            d_a, d_b, _, _ = _ogd(*_f32(a, b, g, u, v), jnp.float32(0.5), 8, average)
            half_a = float(jnp.linalg.norm(d_a @ jb.T, ord=2))
            half_b = float(jnp.linalg.norm(ja @ d_b.T, ord=2))
            # The last iterate is an isometry on each half; the mean of iterates lies inside.
            low = 0.5 if average else 1 - 1e-3
            assert low <= half_a <= 1 + 1e-3 and low <= half_b <= 1 + 1e-3


def test_k0_is_lora_muon_bit_for_bit() -> None:
    """Built with num_bases=0 the optimizer runs LoRA-Muon's own code path."""
    a, b, g, *_ = _problem()
    ja, jb, jg = _f32(a, b, g)
    params = {"lora_a": ja, "lora_b": jb.T}
    trajectories = []
    for opt in (lora_muon(0.1), lora_muon_ogd(0.1, num_bases=0, weight_decay=0.01)):
        p, s = params, opt.init(params)
        step = jax.jit(opt.update)
        for _ in range(3):
            grads = {"lora_a": jg @ p["lora_b"].T, "lora_b": (jg.T @ p["lora_a"]).T}
            updates, s = step(grads, s, p)
            p = optax.apply_updates(p, updates)
        trajectories.append(p)
    for key in params:
        assert jnp.array_equal(trajectories[0][key], trajectories[1][key])


def test_optimizer_residual_and_constraint_from_updates() -> None:
    """Through the full optimizer: ‖Uᵀ(ΔA Bᵀ + A ΔBᵀ)V‖/η equals the state's residual."""
    a, b, g, u, v = _problem(1)
    ja, jb, jg, ju, jv = _f32(a, b, g, u, v)
    params = {"lora_a": ja, "lora_b": jb.T}
    eta = 0.1
    # Through inject_hyperparams too: σ traced, the OGD state nested in its inner state.
    opt = optax.inject_hyperparams(lora_muon_ogd, static_args=("num_bases", "dual_steps"))(
        learning_rate=eta, num_bases=4, dual_steps=3, dual_step_size=0.5
    )
    state = update_ogd_bases(opt.init(params), {"['lora_{a,b}']": (ju, jv)}, mode="replace")
    grads = {"lora_a": jg @ jb, "lora_b": (jg.T @ ja).T}
    step = jax.jit(opt.update)
    updates, new_state = step(grads, state, params)
    (ogd,) = [
        x
        for x in jax.tree.leaves(
            new_state, is_leaf=lambda x: isinstance(x, ScaleByLoRAMuonOGDState)
        )
        if isinstance(x, ScaleByLoRAMuonOGDState)
    ]
    d_a, d_b = updates["lora_a"], updates["lora_b"].T
    measured = float(jnp.linalg.norm(ju.T @ (d_a @ jb.T + ja @ d_b.T) @ jv)) / eta
    np.testing.assert_allclose(measured, float(ogd.residual["['lora_{a,b}']"][0]), rtol=1e-3)
    _, _, _, o_res = oracle(a, b, g, u, v, 0.5, 3, average=True)  # the default: averaged
    np.testing.assert_allclose(measured, o_res, atol=2e-4)
    assert ogd.u["['lora_{a,b}']"].shape == (1, 40, 4)  # capacity 4, 3 used, one zero column


def test_batch_axes_and_stacked_pairs_equal_per_pair_steps() -> None:
    rng = np.random.default_rng(3)
    f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
    orth = lambda x: jnp.linalg.qr(x)[0]  # noqa: E731
    layers, k = 3, 2
    params = {
        "stack": {"lora_a": f(layers, 24, 4), "lora_b": f(layers, 4, 16)},
        "p1": {"lora_a": f(24, 4), "lora_b": f(4, 16)},
        "p2": {"lora_a": f(24, 4), "lora_b": f(4, 16)},
    }
    grads = jax.tree.map(lambda x: f(*x.shape), params)
    bases = {
        "['stack']['lora_{a,b}']": (orth(f(layers, 24, k)), orth(f(layers, 16, k))),
        "['p1']['lora_{a,b}']": (orth(f(24, k)), orth(f(16, k))),
        "['p2']['lora_{a,b}']": (orth(f(24, k)), orth(f(16, k))),
    }
    tx = scale_by_lora_muon_ogd(num_bases=k, dual_steps=2)
    state = update_ogd_bases(tx.init(params), bases, mode="replace")
    together, _ = jax.jit(tx.update)(grads, state, params)

    for name in ("p1", "p2"):
        d_a, d_b, _, _ = _direction_jit(
            params[name]["lora_a"],
            params[name]["lora_b"].T,
            0.1 * grads[name]["lora_a"],  # the first EMA step: (1 − β) G
            0.1 * grads[name]["lora_b"].T,
            *bases[f"['{name}']['lora_{{a,b}}']"],
            dual_steps=2,
        )
        np.testing.assert_allclose(together[name]["lora_a"], 0.5 * d_a, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(together[name]["lora_b"], 0.5 * d_b.T, rtol=1e-5, atol=1e-6)
    u, v = bases["['stack']['lora_{a,b}']"]
    for i in range(layers):
        d_a, d_b, _, _ = _direction_jit(
            params["stack"]["lora_a"][i],
            params["stack"]["lora_b"][i].T,
            0.1 * grads["stack"]["lora_a"][i],
            0.1 * grads["stack"]["lora_b"][i].T,
            u[i],
            v[i],
            dual_steps=2,
        )
        np.testing.assert_allclose(together["stack"]["lora_a"][i], 0.5 * d_a, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(
            together["stack"]["lora_b"][i], 0.5 * d_b.T, rtol=1e-5, atol=1e-6
        )


# ---------------------------------------------------------------- bases


def test_bases_from_delta_are_the_top_singular_directions() -> None:
    rng = np.random.default_rng(5)
    m, n, r, k = 30, 20, 3, 4
    start = {"lora_a": rng.standard_normal((m, r)), "lora_b": rng.standard_normal((r, n))}
    now = {key: x + 0.3 * rng.standard_normal(x.shape) for key, x in start.items()}
    start, now = (jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), t) for t in (start, now))
    (basis,) = ogd_bases_from_delta(now, start, k).values()
    dw = np.asarray(now["lora_a"] @ now["lora_b"] - start["lora_a"] @ start["lora_b"], np.float64)
    uu, ss, vt = np.linalg.svd(dw)
    np.testing.assert_allclose(basis.s[0], ss[:k], rtol=1e-4)
    # Same subspaces, column by column up to sign (distinct singular values).
    np.testing.assert_allclose(np.abs(np.sum(basis.u[0] * uu[:, :k], 0)), 1.0, atol=1e-4)
    np.testing.assert_allclose(np.abs(np.sum(basis.v[0] * vt[:k].T, 0)), 1.0, atol=1e-4)

    # Rank-deficient delta (LoRA init, B₀ = 0, one-direction task): zero columns beyond it.
    zero = {"lora_a": start["lora_a"], "lora_b": jnp.zeros((r, n))}
    one = {"lora_a": start["lora_a"], "lora_b": jnp.zeros((r, n)).at[0, 0].set(2.0)}
    (basis,) = ogd_bases_from_delta(one, zero, k).values()
    assert float(basis.s[0, 0]) > 0 and np.all(np.asarray(basis.s[0, 1:]) == 0)
    assert np.all(np.asarray(basis.u[0, :, 1:]) == 0)


def test_update_ogd_bases_append_and_errors() -> None:
    rng = np.random.default_rng(7)
    params = {
        "lora_a": jnp.asarray(rng.standard_normal((12, 2)), jnp.float32),
        "lora_b": jnp.asarray(rng.standard_normal((2, 10)), jnp.float32),
    }
    name = "['lora_{a,b}']"
    opt = lora_muon_ogd(0.1, num_bases=3)
    state = opt.init(params)
    e = jnp.eye(12, dtype=jnp.float32)
    f = jnp.eye(10, dtype=jnp.float32)
    state = update_ogd_bases(state, {name: (e[:, :2], f[:, :2])})
    state = update_ogd_bases(state, {name: (e[:, 1:2], f[:, 4:5])})  # u overlaps: rank 2 / 3
    (ogd,) = _ogd_states(state)
    gu = np.asarray(ogd.u[name][0].T @ ogd.u[name][0])
    gv = np.asarray(ogd.v[name][0].T @ ogd.v[name][0])
    np.testing.assert_allclose(np.sort(np.diag(gu)), [0, 1, 1], atol=1e-5)
    np.testing.assert_allclose(np.diag(gv), [1, 1, 1], atol=1e-5)
    np.testing.assert_allclose(gv, np.eye(3), atol=1e-5)

    with pytest.raises(ValueError, match=r"needs 4 columns .* num_bases=3"):
        update_ogd_bases(state, {name: (e[:, 5:7], f[:, 6:8])})
    pair = r"pair \['lora_\{a,b\}'\]"
    with pytest.raises(ValueError, match=pair + r".*u \(shape \(1, 12, 2\)\).*orthonormal"):
        update_ogd_bases(state, {name: (2.0 * e[:, :2], f[:, :2])})
    with pytest.raises(ValueError, match=pair + r".*v has shape \(11, 2\)"):
        update_ogd_bases(state, {name: (e[:, :2], jnp.eye(11, 2))})
    with pytest.raises(ValueError, match="not LoRA pairs"):
        update_ogd_bases(state, {"nope": (e[:, :2], f[:, :2])})
    with pytest.raises(ValueError, match="mode must be one of"):
        update_ogd_bases(state, {}, mode="merge")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no ScaleByLoRAMuonOGDState"):
        update_ogd_bases(optax.adam(0.1).init(params), {})


def test_bad_arguments_raise() -> None:
    a, b = jnp.ones((8, 2)), jnp.ones((6, 2))
    with pytest.raises(ValueError, match=r"u.shape=\(7, 2\)"):
        lora_muon_ogd_direction(a, b, a, b, jnp.ones((7, 2)), jnp.ones((6, 2)))
    with pytest.raises(ValueError, match="dual_steps must be an int >= 1"):
        lora_muon_ogd(0.1, num_bases=2, dual_steps=0)
    with pytest.raises(ValueError, match="dual_step_size must be finite and >= 0"):
        lora_muon_ogd(0.1, num_bases=2, dual_step_size=-1.0)
    with pytest.raises(ValueError, match="num_bases must be an int >= 0"):
        scale_by_lora_muon_ogd(num_bases=-1)
    # Under inject_hyperparams every numeric argument becomes an array unless it is static:
    # the structural integers say which static_args they need.
    params = {"lora_a": a, "lora_b": b.T}
    with pytest.raises(TypeError, match=r"static_args=\('num_bases',\)"):
        optax.inject_hyperparams(lora_muon_ogd)(learning_rate=0.1, num_bases=2).init(params)
    static = ("num_bases",)
    with pytest.raises(TypeError, match=r"static_args=\('dual_steps',\)"):
        optax.inject_hyperparams(lora_muon_ogd, static_args=static)(
            learning_rate=0.1, num_bases=2
        ).init(params)
    optax.inject_hyperparams(lora_muon_ogd, static_args=(*static, "dual_steps"))(
        learning_rate=0.1, num_bases=2
    ).init(params)


def test_mixed_bf16_tree_bases_from_full_tree_one_compile() -> None:
    """bf16 stays bf16, non-LoRA leaves go to the fallback and are ignored by the bases."""
    rng = np.random.default_rng(9)
    bf = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.bfloat16)  # noqa: E731
    start = {
        "layer": {"lora_a": bf(32, 4), "lora_b": bf(4, 16)},
        "bias": jnp.zeros(16, jnp.bfloat16),
    }
    now = jax.tree.map(lambda x: x + jnp.asarray(0.1, x.dtype), start)
    opt = lora_muon_ogd(0.05, num_bases=3, fallback_learning_rate=1e-3)
    bases = ogd_bases_from_delta(now, start, 3)
    assert list(bases) == ["['layer']['lora_{a,b}']"]
    state = update_ogd_bases(opt.init(now), bases)
    step = jax.jit(opt.update)
    grads = jax.tree.map(jnp.ones_like, now)
    updates, state = step(grads, state, now)
    updates, state = step(grads, state, now)
    for leaf in jax.tree.leaves(updates):
        assert leaf.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(leaf.astype(jnp.float32))))
    assert step._cache_size() == 1  # type: ignore[attr-defined]
