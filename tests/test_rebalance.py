"""Gauge rebalancing (Algorithm 2): balanced spectral norms, W and its trajectory unchanged."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lora_muon_jax import _rebalance, lora_muon


def _svd_norm(x: np.ndarray) -> np.ndarray:
    return np.linalg.norm(np.asarray(x, np.float64), ord=2, axis=(-2, -1))


@pytest.mark.parametrize("scale", [1e-20, 1e-8, 1.0, 1e8, 1e20])
@pytest.mark.parametrize("rank_first", [False, True])
def test_log_spectral_norm_matches_svd(scale: float, rank_first: bool) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 40, 8)) * np.array([1.0, 0.3, 5.0, 1e-3, 2.0])[:, None, None]
    if rank_first:
        x = np.swapaxes(x, -1, -2)
    x = (x * scale).astype(np.float32)
    got = np.exp(np.asarray(_rebalance.log_spectral_norm(jnp.asarray(x), rank_first=rank_first)))
    want = _svd_norm(np.swapaxes(x, -1, -2) if rank_first else x)
    # Bias bound of the repeated squaring: (r - 1) / (e 2^k) relative on λ_max, half on ‖x‖₂.
    bound = 0.5 * 7 / (np.e * 2**_rebalance._SQUARINGS) + 1e-5
    np.testing.assert_allclose(got, want, rtol=bound)


def test_log_spectral_norm_tied_top_singular_values_and_zero() -> None:
    # Singular values (3, 3, 3, 1): a tied top eigenspace is still exact.
    q, _ = np.linalg.qr(np.random.default_rng(1).standard_normal((30, 4)))
    x = q * np.array([3.0, 3.0, 3.0, 1.0])
    got = np.exp(np.asarray(_rebalance.log_spectral_norm(jnp.asarray(x[None], jnp.float32))))
    np.testing.assert_allclose(got, [3.0], rtol=1e-5)
    zero = _rebalance.log_spectral_norm(jnp.zeros((1, 10, 3)))
    assert np.asarray(zero)[0] == -np.inf
    c = _rebalance.balancing_gauge(jnp.ones((1, 10, 3)), jnp.zeros((1, 12, 3)))
    assert np.asarray(c)[0] == 1.0


def _pair_tree(key: jax.Array, layers: int | None, a_scale: float, b_scale: float) -> dict:
    ka, kb, kw = jax.random.split(key, 3)
    lead = () if layers is None else (layers,)
    return {
        "proj": {
            "lora_a": a_scale * jax.random.normal(ka, (*lead, 24, 4)),
            "lora_b": b_scale * jax.random.normal(kb, (*lead, 4, 16)),
        },
        "bias": 0.1 * jax.random.normal(kw, (16,)),
    }


def _product(tree: dict) -> np.ndarray:
    a = np.asarray(tree["proj"]["lora_a"], np.float64)
    b = np.asarray(tree["proj"]["lora_b"], np.float64)
    return a @ b


def _run(params: dict, tx: optax.GradientTransformation, steps: int) -> list[dict]:
    target = jax.random.normal(jax.random.key(7), _product(params).shape)

    def loss(p: dict) -> jax.Array:
        w = p["proj"]["lora_a"] @ p["proj"]["lora_b"]
        return jnp.sum((w - target) ** 2) + jnp.sum(p["bias"] ** 2)

    @jax.jit
    def step(p: dict, s: optax.OptState) -> tuple[dict, optax.OptState]:
        u, s = tx.update(jax.grad(loss)(p), s, p)
        return optax.apply_updates(p, u), s

    state = tx.init(params)
    out = []
    for _ in range(steps):
        params, state = step(params, state)
        out.append(params)
    return out


@pytest.mark.parametrize("layers", [None, 3])
@pytest.mark.parametrize("imbalance", [1.0, 1e3])
def test_rebalance_keeps_the_trajectory_of_w_and_balances(layers: int | None, imbalance: float):
    params = _pair_tree(jax.random.key(0), layers, 0.3 * imbalance, 0.3 / imbalance)
    plain = _run(params, lora_muon(0.05, weight_decay=0.1, fallback_learning_rate=0.05), 10)
    balanced = _run(
        params, lora_muon(0.05, weight_decay=0.1, rebalance=True, fallback_learning_rate=0.05), 10
    )
    for p, q in zip(plain, balanced, strict=True):
        w, v = _product(p), _product(q)
        np.testing.assert_allclose(v, w, atol=1e-4 * np.abs(w).max())
        np.testing.assert_allclose(q["bias"], p["bias"], rtol=1e-6, atol=1e-7)
        norm_a = _svd_norm(np.asarray(q["proj"]["lora_a"]))
        norm_b = _svd_norm(np.asarray(q["proj"]["lora_b"]))
        np.testing.assert_allclose(norm_a, norm_b, rtol=3e-3)
    if imbalance != 1.0:
        # Without rebalancing the factors stay ~1e6 apart in scale.
        last = plain[-1]["proj"]
        ratio = _svd_norm(np.asarray(last["lora_a"])) / _svd_norm(np.asarray(last["lora_b"]))
        assert np.all(ratio > 1e4)


def test_rebalance_from_standard_init_is_finite_and_balanced() -> None:
    params = _pair_tree(jax.random.key(1), None, 0.3, 0.0)
    (first,) = _run(params, lora_muon(0.1, rebalance=True, fallback_learning_rate=0.1), 1)
    a, b = np.asarray(first["proj"]["lora_a"]), np.asarray(first["proj"]["lora_b"])
    assert np.all(np.isfinite(a)) and np.all(np.isfinite(b))
    np.testing.assert_allclose(_svd_norm(a), _svd_norm(b), rtol=3e-3)
    (plain,) = _run(params, lora_muon(0.1, fallback_learning_rate=0.1), 1)
    np.testing.assert_allclose(_product(first), _product(plain), atol=1e-6)


def test_rebalance_rescales_momenta() -> None:
    # Momentum rescaling is what keeps the trajectory: check it directly on step 1.
    params = _pair_tree(jax.random.key(2), None, 30.0, 0.01)
    grads = jax.tree.map(jnp.ones_like, params)
    tx_plain, tx_bal = (
        lora_muon(0.1, fallback_learning_rate=0.1),
        lora_muon(0.1, rebalance=True, fallback_learning_rate=0.1),
    )
    u_plain, s_plain = tx_plain.update(grads, tx_plain.init(params), params)
    u_bal, s_bal = tx_bal.update(grads, tx_bal.init(params), params)
    new_a = np.asarray(params["proj"]["lora_a"] + u_bal["proj"]["lora_a"], np.float64)
    plain_a = np.asarray(params["proj"]["lora_a"] + u_plain["proj"]["lora_a"], np.float64)
    c = np.linalg.norm(new_a) / np.linalg.norm(plain_a)
    assert c < 0.1  # A was far too large: it is shrunk
    mu_plain = s_plain.inner_states["lora"].inner_state[0].mu["proj"]
    mu_bal = s_bal.inner_states["lora"].inner_state[0].mu["proj"]
    np.testing.assert_allclose(mu_bal["lora_a"], np.asarray(mu_plain["lora_a"]) / c, rtol=1e-4)
    np.testing.assert_allclose(mu_bal["lora_b"], np.asarray(mu_plain["lora_b"]) * c, rtol=1e-4)
