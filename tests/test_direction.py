"""Tests of `lora_muon_jax.lora_muon_direction` against the float64 oracle.

`lora_muon_direction(a, b, mu_a, mu_b, *, method)` returns float32 ``(U_A, U_B)`` with
``U_A = msign(M_A R_B) R_B``, ``U_B = msign(M_B R_A) R_A`` (math layout, a: (m, r),
b: (n, r)); the step is ``ΔA = -(η/2) U_A``. ``D = U_A Bᵀ + A U_Bᵀ`` is the induced
unit step on W (``ΔW = -(η/2) D`` to first order).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_muon_jax import lora_muon_direction
from tests import reference as ref

METHODS = ("gram", "paper")
_DIRECTION = {m: jax.jit(functools.partial(lora_muon_direction, method=m)) for m in METHODS}

# Tolerances (relative Frobenius unless said otherwise):
# - gram, κ ≤ 10: 1e-4. the project's performance notes measured the Gram form against the
#   exact SVD/eigh step at 2e-6 (κ = 10); this file's cases measured ≤ 1e-5. float32
#   eigh-based inverse roots are good to ~1e-6 here (tests/test_polar.py).
# - gram, κ(B) = κ(M) = 100: 5e-3. those notes measured 2e-4; M_A R_B then has
#   condition number up to 1e4. The same Gram form computed with float32 eigh gave up
#   to 1.5e-3 on these inputs, the literal form with float32 eigh + SVD up to 4e-4.
# - paper: 5e-3. The spec: the paper's iterations differ from the exact step by "about
#   5e-4 relative" on well-conditioned factors (measured here: ≤ 9e-4 at κ = 10; Table 1
#   msign alone ~4e-4, tests/test_polar.py).
TOL = {"gram": 1e-4, "paper": 5e-3}
TOL_GRAM_ILL_CONDITIONED = 5e-3
# Unit spectral norm of each half (spec: "each half has spectral norm exactly η/2 (up to
# the iteration error)"): the same per-method budgets.
NORM_TOL = TOL
# Degenerate inputs (rank-deficient / extreme scales): no exact reference exists for a
# float32 rank-deficient factor, only the trust region: each half ≤ 1 (+ 1e-3 rounding).
DEGENERATE_NORM_SLACK = 1e-3
# bf16 inputs: bf16 rounds each entry by up to 2^-8 ≈ 4e-3 relative; for κ ≤ 2 factors
# and momenta the direction moves by a few of those: 2e-2.
BF16_TOL = 2e-2

# (m, n, r) with m, n in 64..512 and r in {1, 4, 16}. Few distinct shapes: every shape
# costs one compile per method (the dominant runtime on CPU).
SHAPES = [(64, 128, 1), (256, 64, 4), (512, 384, 16)]
SHAPE_IDS = ["64x128r1", "256x64r4", "512x384r16"]
SMALL = (256, 64, 4)


def _f32(x: np.ndarray) -> jax.Array:
    return jnp.asarray(np.asarray(x, np.float32), jnp.float32)


def _direction(
    method: str, a: np.ndarray, b: np.ndarray, mu_a: np.ndarray, mu_b: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    u_a, u_b = _DIRECTION[method](_f32(a), _f32(b), _f32(mu_a), _f32(mu_b))
    assert u_a.dtype == jnp.float32 and u_b.dtype == jnp.float32
    assert u_a.shape == a.shape and u_b.shape == b.shape
    return np.asarray(u_a, np.float64), np.asarray(u_b, np.float64)


def _rel(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def _as_f32_f64(x: np.ndarray) -> np.ndarray:
    """Round to float32 (what the code receives) and back, for the float64 oracle."""
    return np.asarray(np.asarray(x, np.float32), np.float64)


def _random_pair(
    rng: np.random.Generator, m: int, n: int, r: int, kappa_a: float, kappa_b: float
) -> tuple[np.ndarray, np.ndarray]:
    a = _as_f32_f64(ref.random_factor(rng, m, r, kappa_a))
    b = _as_f32_f64(ref.random_factor(rng, n, r, kappa_b))
    return a, b


def _consistent_momenta(
    g_w: np.ndarray, a: np.ndarray, b: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``M_A = G_W B``, ``M_B = G_Wᵀ A`` (the factor gradients of one G_W)."""
    return _as_f32_f64(g_w @ b), _as_f32_f64(g_w.T @ a)


def _delta_w(u_a: np.ndarray, u_b: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``D = U_A Bᵀ + A U_Bᵀ``: the unit tangent step on W (ΔW = -(η/2) D)."""
    return u_a @ b.T + a @ u_b.T


def _half_singular_values(u: np.ndarray, f: np.ndarray) -> np.ndarray:
    """Singular values of the rank-≤r product ``u fᵀ`` (m×n) in float64, cheaply.

    With ``f = Q T`` (thin QR, Q orthonormal), ``u fᵀ = (u Tᵀ) Qᵀ`` has the singular
    values of the m×r matrix ``u Tᵀ`` — exact, without an m×n SVD.
    """
    _, t = np.linalg.qr(f)
    return np.linalg.svd(u @ t.T, compute_uv=False)


def _half_norms(
    u_a: np.ndarray, u_b: np.ndarray, a: np.ndarray, b: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Singular values of ``U_A Bᵀ`` and ``A U_Bᵀ`` (the two tangent halves)."""
    return _half_singular_values(u_a, b), _half_singular_values(u_b, a)


@functools.cache
def _projector_case(shape: tuple[int, int, int], seed: int):
    """Factors, G_W and the spec's projector-form D (shared by both methods)."""
    m, n, r = shape
    rng = np.random.default_rng(seed)
    a, b = _random_pair(rng, m, n, r, 5.0, 5.0)
    g_w = rng.standard_normal((m, n))
    lr = 0.1
    return a, b, g_w, -(2.0 / lr) * ref.projector_delta_w(g_w, a, b, lr)


# ----------------------------------------------------------------- vs the oracle


@pytest.mark.parametrize("kappa", [1.0, 10.0])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("method", METHODS)
def test_direction_matches_reference(method: str, shape: tuple[int, int, int], kappa: float):
    m, n, r = shape
    rng = np.random.default_rng(1000 + r)
    for _ in range(3):
        a, b = _random_pair(rng, m, n, r, kappa, kappa)
        mu_a = _as_f32_f64(ref.random_factor(rng, m, r, kappa))
        mu_b = _as_f32_f64(ref.random_factor(rng, n, r, kappa))
        u_a, u_b = _direction(method, a, b, mu_a, mu_b)
        want_a, want_b = ref.direction(a, b, mu_a, mu_b)
        assert _rel(u_a, want_a) <= TOL[method]
        assert _rel(u_b, want_b) <= TOL[method]


@pytest.mark.parametrize("ill", ["b", "a"], ids=["kappa_b100", "kappa_a100"])
@pytest.mark.parametrize("shape", SHAPES[1:], ids=SHAPE_IDS[1:])
def test_gram_direction_ill_conditioned(shape: tuple[int, int, int], ill: str) -> None:
    # κ(B) = κ(M) = 100 drives U_A (and κ(A) = κ(M) = 100 drives U_B); the other
    # factor stays well conditioned.
    m, n, r = shape
    rng = np.random.default_rng(2000 + r)
    kappa_a, kappa_b = (1.0, 100.0) if ill == "b" else (100.0, 1.0)
    for _ in range(4):
        a, b = _random_pair(rng, m, n, r, kappa_a, kappa_b)
        mu_a = _as_f32_f64(ref.random_factor(rng, m, r, 100.0))
        mu_b = _as_f32_f64(ref.random_factor(rng, n, r, 100.0))
        u_a, u_b = _direction("gram", a, b, mu_a, mu_b)
        want_a, want_b = ref.direction(a, b, mu_a, mu_b)
        assert _rel(u_a, want_a) <= TOL_GRAM_ILL_CONDITIONED
        assert _rel(u_b, want_b) <= TOL_GRAM_ILL_CONDITIONED


# ----------------------------------------------------------------- invariances


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("method", METHODS)
def test_gauge_invariance(method: str, shape: tuple[int, int, int]) -> None:
    # Spec: under (A, B) → (A R, B R^{-T}) for invertible R, ΔW is unchanged.
    m, n, r = shape
    rng = np.random.default_rng(3000 + r)
    for _ in range(2):
        a, b = _random_pair(rng, m, n, r, 3.0, 3.0)
        g_w = rng.standard_normal((m, n))
        gauge = ref.random_factor(rng, r, r, 10.0)  # invertible, cond 10
        a2 = _as_f32_f64(a @ gauge)
        b2 = _as_f32_f64(b @ np.linalg.inv(gauge).T)
        d1 = _delta_w(*_direction(method, a, b, *_consistent_momenta(g_w, a, b)), a, b)
        d2 = _delta_w(*_direction(method, a2, b2, *_consistent_momenta(g_w, a2, b2)), a2, b2)
        assert _rel(d2, d1) <= TOL[method]


@pytest.mark.parametrize("c", [1e-3, 1 / 27, 1 / 9, 1.0, 9.0, 27.0, 1e3])
@pytest.mark.parametrize("method", METHODS)
def test_scalar_rescaling_invariance(method: str, c: float) -> None:
    # Spec: the paper's factor-rescaling test (A·c, B/c); ΔW must not move.
    a, b, g_w, want = _projector_case(SMALL, 4000)
    d1 = _delta_w(*_direction(method, a, b, *_consistent_momenta(g_w, a, b)), a, b)
    ac, bc = _as_f32_f64(a * c), _as_f32_f64(b / c)
    dc = _delta_w(*_direction(method, ac, bc, *_consistent_momenta(g_w, ac, bc)), ac, bc)
    assert _rel(dc, d1) <= TOL[method]
    assert _rel(dc, want) <= TOL[method]


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("method", METHODS)
def test_projector_form(method: str, shape: tuple[int, int, int]) -> None:
    # Spec: ΔW = -(η/2) msign(G_W P_B) - (η/2) msign(P_A G_W), i.e. D = -(2/η) ΔW.
    for seed in (5000, 5001):
        a, b, g_w, want = _projector_case(shape, seed)
        d = _delta_w(*_direction(method, a, b, *_consistent_momenta(g_w, a, b)), a, b)
        assert _rel(d, want) <= TOL[method]


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("method", METHODS)
def test_each_half_has_unit_spectral_norm(method: str, shape: tuple[int, int, int]) -> None:
    # Spec: ‖ΔA Bᵀ‖₂ = ‖A ΔBᵀ‖₂ = η/2, i.e. ‖U_A Bᵀ‖₂ = ‖A U_Bᵀ‖₂ = 1. For full-rank
    # M R every one of the r nonzero singular values is 1 (U_A Bᵀ = msign(M_A R_B) Q_Bᵀ).
    m, n, r = shape
    rng = np.random.default_rng(6000 + r)
    for _ in range(2):
        a, b = _random_pair(rng, m, n, r, 10.0, 10.0)
        mu_a = _as_f32_f64(ref.random_factor(rng, m, r, 10.0))
        mu_b = _as_f32_f64(ref.random_factor(rng, n, r, 10.0))
        for sigma in _half_norms(*_direction(method, a, b, mu_a, mu_b), a, b):
            np.testing.assert_allclose(sigma, np.ones(r), rtol=0.0, atol=NORM_TOL[method])


# ----------------------------------------------------------------- degenerate inputs


@pytest.mark.parametrize("method", METHODS)
def test_zero_b_standard_lora_init(method: str) -> None:
    # Spec, "Degenerate Grams": lora_b = 0 at init → S_B = 0 has inverse root 0, ΔA = 0
    # (G_A = G_W B = 0 anyway) and B gets a well-defined unit step.
    m, n, r = SMALL
    rng = np.random.default_rng(7000)
    a = _as_f32_f64(ref.random_factor(rng, m, r, 3.0))
    b = np.zeros((n, r))
    g_w = rng.standard_normal((m, n))
    mu_a, mu_b = _consistent_momenta(g_w, a, b)
    assert not np.any(mu_a)
    u_a, u_b = _direction(method, a, b, mu_a, mu_b)
    assert np.all(np.isfinite(u_a)) and np.all(np.isfinite(u_b))
    np.testing.assert_array_equal(u_a, np.zeros((m, r)))
    assert abs(float(np.max(_half_singular_values(u_b, a))) - 1.0) <= NORM_TOL[method]
    _, want_b = ref.direction(a, b, mu_a, mu_b)
    assert _rel(u_b, want_b) <= TOL[method]


@pytest.mark.parametrize("method", METHODS)
def test_zero_momenta_give_zero_direction(method: str) -> None:
    m, n, r = SMALL
    rng = np.random.default_rng(7100)
    a, b = _random_pair(rng, m, n, r, 3.0, 3.0)
    u_a, u_b = _direction(method, a, b, np.zeros((m, r)), np.zeros((n, r)))
    np.testing.assert_array_equal(u_a, np.zeros((m, r)))
    np.testing.assert_array_equal(u_b, np.zeros((n, r)))


def _low_rank(rng: np.random.Generator, m: int, r: int, k: int) -> np.ndarray:
    """Rank-k m×r factor (numerically: float32 rounding leaves ~1e-7 noise)."""
    return _as_f32_f64(rng.standard_normal((m, k)) @ rng.standard_normal((k, r)) / np.sqrt(m))


DEGENERATE_CASES = {
    # name: (rank of A, rank of B, scale of A, scale of B); rank None = full rank r.
    "rank_deficient_a": ("half", None, 1.0, 1.0),
    "rank_deficient_b": (None, "half", 1.0, 1.0),
    "rank_deficient_both": ("half", "half", 1.0, 1.0),
    "rank_one_both": (1, 1, 1.0, 1.0),
    "tiny": (None, None, 1e-8, 1e-8),
    "huge": (None, None, 1e8, 1e8),
    "tiny_a_huge_b": (None, None, 1e-8, 1e8),
    "underflowing_grams": (None, None, 1e-20, 1e-20),
    "overflowing_grams": (None, None, 1e20, 1e20),
}


@pytest.mark.parametrize("momenta", ["consistent", "random"])
@pytest.mark.parametrize("case", list(DEGENERATE_CASES))
@pytest.mark.parametrize("shape", SHAPES[1:], ids=SHAPE_IDS[1:])
@pytest.mark.parametrize("method", METHODS)
def test_degenerate_factors(
    method: str, shape: tuple[int, int, int], case: str, momenta: str
) -> None:
    # Spec: "No NaN or Inf may ever come out of a finite input, whatever the factor
    # scales or ranks"; the trust region still bounds each half by 1.
    m, n, r = shape
    rank_a, rank_b, scale_a, scale_b = DEGENERATE_CASES[case]
    rng = np.random.default_rng(8000 + r)

    def factor(rows: int, rank: int | str | None, scale: float) -> np.ndarray:
        if rank is None:
            x = ref.random_factor(rng, rows, r, 3.0)
        else:
            x = _low_rank(rng, rows, r, max(1, r // 2) if rank == "half" else int(rank))
        return _as_f32_f64(x * scale)

    a, b = factor(m, rank_a, scale_a), factor(n, rank_b, scale_b)
    if momenta == "consistent":
        mu_a, mu_b = _consistent_momenta(rng.standard_normal((m, n)), a, b)
    else:  # EMA momenta need not lie in the factors' spans: full rank, unit scale.
        mu_a = _as_f32_f64(ref.random_factor(rng, m, r, 3.0))
        mu_b = _as_f32_f64(ref.random_factor(rng, n, r, 3.0))
    assert all(np.all(np.isfinite(x)) for x in (a, b, mu_a, mu_b))
    u_a, u_b = _direction(method, a, b, mu_a, mu_b)
    assert np.all(np.isfinite(u_a)) and np.all(np.isfinite(u_b))
    for sigma in _half_norms(u_a, u_b, a, b):
        assert float(np.max(sigma)) <= 1.0 + DEGENERATE_NORM_SLACK
    if rank_a is None and rank_b is None and case != "underflowing_grams":
        # Full-rank factors at an extreme scale whose Grams float32 represents: the
        # exact direction is well defined and scale covariant, so the accuracy holds.
        # (At 1e-20 the float32 Grams underflow to subnormals; `_polar` documents
        # treating such a Gram as zero, so the direction is 0 and only the checks
        # above apply.)
        want_a, want_b = ref.direction(a, b, mu_a, mu_b)
        assert _rel(u_a, want_a) <= TOL[method]
        assert _rel(u_b, want_b) <= TOL[method]


# ----------------------------------------------------------------- batching, dtypes


@pytest.mark.parametrize("method", METHODS)
def test_batched_equals_per_slice(method: str) -> None:
    m, n, r = SMALL
    rng = np.random.default_rng(9000)
    scales = [[1.0, 1e-3, 1e3], [0.0, 5.0, 1.0]]  # slice (1, 0): B = 0
    a = np.empty((2, 3, m, r))
    b = np.empty((2, 3, n, r))
    mu_a = np.empty((2, 3, m, r))
    mu_b = np.empty((2, 3, n, r))
    for i in range(2):
        for j in range(3):
            a[i, j], b[i, j] = _random_pair(rng, m, n, r, 3.0, 3.0)
            b[i, j] *= scales[i][j]
            mu_a[i, j], mu_b[i, j] = _consistent_momenta(
                rng.standard_normal((m, n)), a[i, j], b[i, j]
            )
    u_a, u_b = _direction(method, a, b, mu_a, mu_b)
    for i in range(2):
        for j in range(3):
            one_a, one_b = _direction(method, a[i, j], b[i, j], mu_a[i, j], mu_b[i, j])
            # Same float32 operations per slice; batching may only reorder rounding.
            for got, one in ((u_a[i, j], one_a), (u_b[i, j], one_b)):
                atol = 1e-6 * float(np.max(np.abs(one), initial=0.0))
                np.testing.assert_allclose(got, one, rtol=1e-5, atol=atol)
    np.testing.assert_array_equal(u_a[1, 0], np.zeros((m, r)))


@pytest.mark.parametrize("method", METHODS)
def test_bfloat16_inputs(method: str) -> None:
    m, n, r = SMALL
    rng = np.random.default_rng(9100)
    a, b = _random_pair(rng, m, n, r, 2.0, 2.0)
    mu_a = _as_f32_f64(ref.random_factor(rng, m, r, 2.0))
    mu_b = _as_f32_f64(ref.random_factor(rng, n, r, 2.0))
    want_a, want_b = _direction(method, a, b, mu_a, mu_b)
    args = [jnp.asarray(_f32(x), jnp.bfloat16) for x in (a, b, mu_a, mu_b)]
    u_a, u_b = _DIRECTION[method](*args)
    assert u_a.dtype == jnp.float32 and u_b.dtype == jnp.float32
    got_a, got_b = np.asarray(u_a, np.float64), np.asarray(u_b, np.float64)
    assert np.all(np.isfinite(got_a)) and np.all(np.isfinite(got_b))
    assert _rel(got_a, want_a) <= BF16_TOL
    assert _rel(got_b, want_b) <= BF16_TOL


# ----------------------------------------------------------------- validation


def _zeros(*shape: int) -> jax.Array:
    return jnp.zeros(shape, jnp.float32)


def test_mismatched_rank_raises() -> None:
    with pytest.raises(ValueError, match="rank"):
        lora_muon_direction(_zeros(8, 4), _zeros(6, 3), _zeros(8, 4), _zeros(6, 3))


def test_mismatched_batch_axes_raise() -> None:
    with pytest.raises(ValueError, match="batch"):
        lora_muon_direction(_zeros(2, 8, 4), _zeros(3, 6, 4), _zeros(2, 8, 4), _zeros(3, 6, 4))


def test_mismatched_momentum_shape_raises() -> None:
    with pytest.raises(ValueError, match="momenta"):
        lora_muon_direction(_zeros(8, 4), _zeros(6, 4), _zeros(8, 3), _zeros(6, 4))
    with pytest.raises(ValueError, match="momenta"):
        lora_muon_direction(_zeros(8, 4), _zeros(6, 4), _zeros(8, 4), _zeros(4, 6))


def test_vector_factors_raise() -> None:
    with pytest.raises(ValueError, match="2 axes"):
        lora_muon_direction(_zeros(8), _zeros(6), _zeros(8), _zeros(6))


@pytest.mark.parametrize("method", ["svd", "Gram", ""])
def test_unknown_method_raises(method: str) -> None:
    with pytest.raises(ValueError, match="method"):
        lora_muon_direction(
            _zeros(8, 4),
            _zeros(6, 4),
            _zeros(8, 4),
            _zeros(6, 4),
            method=method,  # type: ignore[arg-type]
        )
