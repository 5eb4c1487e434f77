"""Tests of `lora_muon_jax._polar`: matmul-only inverse square root and polar factor.

Oracles: float64 `eigh` / SVD (tests/reference.py) on the exact float32 input the
code under test receives, and the float32 `jnp.linalg.eigh` error on that same
matrix as the yardstick for what float32 can achieve.
"""

from __future__ import annotations

import functools
import importlib.util
import pathlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_muon_jax import _coefficients, _polar
from tests import reference as ref

_TOOLS = pathlib.Path(__file__).resolve().parents[1] / "tools"
METHODS = ("gram", "paper")

# One jitted function per method/entry point: every test with the same shape reuses
# the compiled executable (compile time dominates this file's runtime on CPU).
_INV_SQRT = {m: jax.jit(functools.partial(_polar.inverse_sqrt, method=m)) for m in METHODS}
_MSIGN = jax.jit(_polar.matrix_sign)

# Spec, "Inverse square root ... (Appendix B.4, Table 2)": measured ‖R P R − I‖₂ of the
# paper's recurrence (float64, r = 8) at condition numbers 1, 1e2, 1e3, 1e4.
PAPER_PUBLISHED_RESIDUAL = {1.0: 3e-5, 1e2: 1e-3, 1e3: 1e-2, 1e4: 9e-2}
# The spec publishes no number at κ = 10; by monotonicity in κ it lies between the
# κ = 1 and κ = 1e2 figures, and the test uses those two as its bracket.
PAPER_RESIDUAL_BRACKET = {
    **{k: (v, v) for k, v in PAPER_PUBLISHED_RESIDUAL.items()},
    10.0: (PAPER_PUBLISHED_RESIDUAL[1.0], PAPER_PUBLISHED_RESIDUAL[1e2]),
}
# "Within 2×" of a published measurement: the spec's numbers are one-significant-digit
# measurements, so the implementation must reproduce them up to a factor of 2.
PUBLISHED_FACTOR = 2.0

# Gram method: "as accurate as float32 eigh" (its docstring). Allowed error:
# 3× float32 eigh's error on the same matrix, floored at 1e-5 (at κ ≲ 10 eigh's error
# is ~1e-7 and the polynomial's own float32 rounding, ~1e-6, dominates).
EIGH_FACTOR = 3.0
EIGH_FLOOR = 1e-5

# msign: the spec says the paper-recipe step "differs from the exact SVD/eigh step by
# about 5e-4 relative on well-conditioned factors"; 2× that published figure.
MSIGN_TOL = 2 * 5e-4


def _rel(got: jax.Array | np.ndarray, want: np.ndarray) -> float:
    got = np.asarray(got, np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def _random_spd(rng: np.random.Generator, r: int, kappa: float, scale: float = 1.0) -> np.ndarray:
    """float32 SPD matrix, eigenvalues geomspace(1, 1/κ, r)·scale, random eigenvectors."""
    q = ref.random_orthonormal(rng, r, r)
    p = ((q * (np.geomspace(1.0, 1.0 / kappa, r) * scale)) @ q.T).astype(np.float32)
    return np.float32(0.5) * (p + p.T)  # exactly symmetric in float32


def _eigh32_inv_sqrt(p32: np.ndarray) -> np.ndarray:
    """What float32 `jnp.linalg.eigh` gives for P^{-1/2} (the float32 yardstick)."""
    w, v = jnp.linalg.eigh(jnp.asarray(p32, jnp.float32))
    root = jnp.matmul(v * jax.lax.rsqrt(w)[None, :], v.T, precision=jax.lax.Precision.HIGHEST)
    return np.asarray(root, np.float64)


def _check_gram_against_eigh(mats: list[np.ndarray]) -> None:
    """Gram-method error on each matrix vs float32 eigh's error on the same matrices.

    The yardstick is the median of eigh's errors over ``mats`` (all drawn with the
    same spectrum), not eigh's error on each matrix alone: for small r, float32
    eigh's error varies ~10× with the eigenvector orientation (measured over 40
    matrices at r = 8, κ = 1e4: 1.6e-5 … 3.4e-4, median 7e-5, while the gram
    method's median was 4.3e-5), so a per-matrix ratio fails whenever eigh is lucky.
    """
    wants = [ref.inv_sqrt(p) for p in mats]
    err_eigh = float(
        np.median([_rel(_eigh32_inv_sqrt(p), w) for p, w in zip(mats, wants, strict=True)])
    )
    bound = max(EIGH_FACTOR * err_eigh, EIGH_FLOOR)
    for p32, want in zip(mats, wants, strict=True):
        got = _INV_SQRT["gram"](jnp.asarray(p32, jnp.float32))
        assert got.dtype == jnp.float32
        err = _rel(got, want)
        assert err <= bound, f"{err=:.2e} median {err_eigh=:.2e} {bound=:.2e}"


def _paper_residual(p32: np.ndarray) -> float:
    """‖R P R − I‖₂ in float64 for the paper method's R (the spec's metric)."""
    r = np.asarray(_INV_SQRT["paper"](jnp.asarray(p32, jnp.float32)), np.float64)
    p = np.asarray(p32, np.float64)
    return float(np.linalg.norm(r @ p @ r - np.eye(p.shape[-1]), 2))


# ----------------------------------------------------------------- inverse_sqrt


@pytest.mark.parametrize("r", [8, 16, 64])
@pytest.mark.parametrize("kappa", [1.0, 10.0, 1e2, 1e4])
def test_gram_inverse_sqrt_matches_eigh(kappa: float, r: int) -> None:
    rng = np.random.default_rng(100 + r)
    _check_gram_against_eigh([_random_spd(rng, r, kappa) for _ in range(5)])


@pytest.mark.parametrize("r", [8, 16, 64])
@pytest.mark.parametrize("kappa", [1e5, 1e6])
def test_gram_inverse_sqrt_documented_range(kappa: float, r: int) -> None:
    # `inverse_sqrt`'s docstring: "as accurate as float32 eigh for κ(P) up to ~1e6".
    rng = np.random.default_rng(200 + r)
    _check_gram_against_eigh([_random_spd(rng, r, kappa) for _ in range(5)])


@pytest.mark.parametrize("kappa", [1.0, 10.0, 1e2, 1e3, 1e4])
def test_paper_inverse_sqrt_matches_published_accuracy(kappa: float) -> None:
    lo, hi = PAPER_RESIDUAL_BRACKET[kappa]
    rng = np.random.default_rng(300)
    for _ in range(3):
        res = _paper_residual(_random_spd(rng, 8, kappa))  # the spec measured r = 8
        assert lo / PUBLISHED_FACTOR <= res <= hi * PUBLISHED_FACTOR, f"{res=:.2e}"


@pytest.mark.parametrize("method", METHODS)
def test_inverse_sqrt_zero_matrix_is_zero(method: str) -> None:
    # Spec, "Degenerate Grams": a zero Gram has inverse root 0.
    out = _INV_SQRT[method](jnp.zeros((8, 8), jnp.float32))
    assert out.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(out), np.zeros((8, 8), np.float32))


@pytest.mark.parametrize("method", METHODS)
def test_inverse_sqrt_batched_equals_per_slice(method: str) -> None:
    rng = np.random.default_rng(400)
    kappas = [[1.0, 10.0, 1e2], [1e3, 1e4, 1.0]]
    scales = [[1.0, 1e-6, 1e6], [3.0, 0.0, 1e-3]]  # one zero slice
    batch = np.stack(
        [
            np.stack([_random_spd(rng, 8, k, s) for k, s in zip(ks, ss, strict=True)])
            for ks, ss in zip(kappas, scales, strict=True)
        ]
    )
    got = np.asarray(_INV_SQRT[method](jnp.asarray(batch, jnp.float32)))
    assert got.shape == (2, 3, 8, 8)
    for i in range(2):
        for j in range(3):
            one = np.asarray(_INV_SQRT[method](jnp.asarray(batch[i, j], jnp.float32)))
            # Same float32 operations per slice; batching may only reorder rounding.
            np.testing.assert_allclose(
                got[i, j], one, rtol=1e-5, atol=1e-6 * float(np.max(np.abs(one)))
            )
    np.testing.assert_array_equal(got[1, 1], np.zeros((8, 8), np.float32))
    want = ref.inv_sqrt(batch[0, 1])
    if method == "gram":
        err_eigh = _rel(_eigh32_inv_sqrt(batch[0, 1]), want)
        assert _rel(got[0, 1], want) <= max(EIGH_FACTOR * err_eigh, EIGH_FLOOR)
    else:
        r, p = np.asarray(got[0, 1], np.float64), np.asarray(batch[0, 1], np.float64)
        residual = np.linalg.norm(r @ p @ r - np.eye(8), 2)
        assert residual <= PUBLISHED_FACTOR * PAPER_PUBLISHED_RESIDUAL[1e2]


@pytest.mark.parametrize("scale", [1e30, 1e-15])
@pytest.mark.parametrize("method", METHODS)
def test_inverse_sqrt_extreme_scales(method: str, scale: float) -> None:
    # Spec: "No NaN or Inf may ever come out of a finite input, whatever the factor
    # scales"; the root of c·P is c^{-1/2} P^{-1/2}, so the accuracy must not change.
    rng = np.random.default_rng(500)
    p32 = _random_spd(rng, 8, 1e2, scale)
    assert np.all(np.isfinite(p32)) and np.max(np.abs(p32)) > 0
    got = _INV_SQRT[method](jnp.asarray(p32, jnp.float32))
    assert bool(jnp.all(jnp.isfinite(got)))
    if method == "gram":
        # The eigh yardstick: this matrix and four more with the same spectrum and scale.
        _check_gram_against_eigh([p32, *(_random_spd(rng, 8, 1e2, scale) for _ in range(4))])
    else:
        res = _paper_residual(p32)
        assert res <= PUBLISHED_FACTOR * PAPER_PUBLISHED_RESIDUAL[1e2], f"{res=:.2e}"


@pytest.mark.parametrize("method", METHODS)
def test_inverse_sqrt_rank_deficient_grams_are_finite(method: str) -> None:
    # Spec, "Degenerate Grams": no NaN/Inf from a finite input "whatever the factor
    # scales or ranks". Grams of rank-k factors (k < r) computed in float32, where
    # rounding can make them slightly indefinite.
    rng = np.random.default_rng(600)
    f = _INV_SQRT[method]
    for case in range(100):
        m = int(rng.choice([16, 256, 4096]))
        r = int(rng.choice([1, 2, 8, 16, 64]))
        k = int(rng.integers(0, r))
        scale = float(10.0 ** rng.uniform(-15.0, 15.0))
        x = ((rng.standard_normal((m, k)) @ rng.standard_normal((k, r))) * scale).astype(np.float32)
        p32 = x.T @ x
        assert np.all(np.isfinite(p32))
        out = np.asarray(f(jnp.asarray(p32, jnp.float32)))
        assert np.all(np.isfinite(out)), f"{case=} {m=} {r=} {k=} {scale=:.3e}"


def test_inverse_sqrt_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="method"):
        _polar.inverse_sqrt(jnp.eye(4, dtype=jnp.float32), method="eigh")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="square"):
        _polar.inverse_sqrt(jnp.zeros((4, 3), jnp.float32))


# ----------------------------------------------------------------- matrix_sign


def _random_matrix(rng: np.random.Generator, shape: tuple[int, int], kappa: float) -> np.ndarray:
    m, n = shape
    if m >= n:
        return ref.random_factor(rng, m, n, kappa).astype(np.float32)
    return ref.random_factor(rng, n, m, kappa).T.astype(np.float32)


@pytest.mark.parametrize("shape", [(512, 16), (16, 512), (64, 64)], ids=["tall", "wide", "square"])
@pytest.mark.parametrize("kappa", [1.0, 10.0])
def test_matrix_sign_matches_svd(shape: tuple[int, int], kappa: float) -> None:
    rng = np.random.default_rng(700)
    for _ in range(3):
        x = _random_matrix(rng, shape, kappa)
        got = _MSIGN(jnp.asarray(x, jnp.float32))
        assert got.dtype == jnp.float32 and got.shape == shape
        err = _rel(got, ref.msign(x))
        assert err <= MSIGN_TOL, f"{err=:.2e}"


def test_matrix_sign_batched() -> None:
    rng = np.random.default_rng(800)
    x = np.stack(
        [np.stack([_random_matrix(rng, (128, 8), 10.0) for _ in range(3)]) for _ in range(2)]
    )
    got = np.asarray(_MSIGN(jnp.asarray(x, jnp.float32)))
    assert got.shape == (2, 3, 128, 8)
    for i in range(2):
        for j in range(3):
            assert _rel(got[i, j], ref.msign(x[i, j])) <= MSIGN_TOL
            one = np.asarray(_MSIGN(jnp.asarray(x[i, j], jnp.float32)))
            np.testing.assert_allclose(got[i, j], one, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(256, 8), (8, 256)], ids=["tall", "wide"])
def test_matrix_sign_zero_is_zero(shape: tuple[int, int]) -> None:
    out = np.asarray(_MSIGN(jnp.zeros(shape, jnp.float32)))
    np.testing.assert_array_equal(out, np.zeros(shape, np.float32))


@pytest.mark.parametrize("scale", [1e-30, 1.0, 1e30])
def test_matrix_sign_rank_deficient(scale: float) -> None:
    rng = np.random.default_rng(900)
    # Exactly rank 3 in float32: duplicated and zero columns (the float64 SVD then has
    # exact-zero singular values, which the reference drops).
    y = (ref.random_factor(rng, 256, 3, 5.0) * scale).astype(np.float32)
    x = np.concatenate([y, y[:, :2], np.zeros((256, 3), np.float32)], axis=1)  # (256, 8)
    for xi in (x, x.T):
        got = np.asarray(_MSIGN(jnp.asarray(xi, jnp.float32)), np.float64)
        assert np.all(np.isfinite(got))
        # Zero singular values stay zero, the others go to 1 (matrix_sign docstring).
        assert np.linalg.norm(got, 2) <= 1.0 + MSIGN_TOL
        assert _rel(got, ref.msign(xi)) <= MSIGN_TOL


def test_matrix_sign_rejects_vectors() -> None:
    with pytest.raises(ValueError, match="matrices"):
        _polar.matrix_sign(jnp.ones((4,), jnp.float32))


# ----------------------------------------------------------------- coefficients


def _load_derivation_tool():
    path = _TOOLS / "derive_inverse_sqrt_coefficients.py"
    spec = importlib.util.spec_from_file_location("derive_inverse_sqrt_coefficients", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _compose(coeffs: Sequence[tuple[float, float, float]], sigma: np.ndarray) -> np.ndarray:
    for a, b, c in coeffs:
        sigma = a * sigma + b * sigma**3 + c * sigma**5
    return sigma


@pytest.mark.parametrize(
    ("lower", "coeffs"),
    [
        (_coefficients.GRAM_INV_SQRT_LOWER, _coefficients.GRAM_INV_SQRT_COEFFS),
        (_coefficients.GRAM_FAST_INV_SQRT_LOWER, _coefficients.GRAM_FAST_INV_SQRT_COEFFS),
    ],
    ids=["gram", "fast_gate"],
)
def test_gram_coefficients_match_derivation(
    lower: float, coeffs: Sequence[tuple[float, float, float]]
) -> None:
    tool = _load_derivation_tool()
    schedule = tool.inverse_sqrt_schedule(lower)
    np.testing.assert_allclose(
        np.asarray(schedule, np.float64),
        np.asarray(coeffs, np.float64),
        rtol=0.0,
        # Where the Remez exchange stops depends on LAPACK's rounding: re-derived
        # on two x86 machines the coefficients differ by up to 7e-9. The
        # composition check below is the contract the coefficients must meet.
        atol=1e-7,
    )
    # The coupled iteration acts on σ = √eigenvalue as σ ↦ aσ + bσ³ + cσ⁵ per step:
    # the composition must take the whole design interval [ℓ, γ] to 1.
    sigma = np.concatenate([np.geomspace(lower, 1.01, 100_001), np.linspace(lower, 1.01, 100_001)])
    out = _compose(coeffs, sigma)
    assert float(np.max(np.abs(out - 1.0))) <= 1e-9


def test_fast_gate_schedule_leaves_unresolved_only_what_its_gate_rejects() -> None:
    """Below the fast schedule's design interval the gate cannot pass.

    Oracle: the scalar map of the coupled iteration in float64 (the design interval
    [5e-3, 1.01] itself: test_gram_coefficients_match_derivation[fast_gate]). Below it
    the root's eigenvalue z(σ) = map(σ)/σ stays above √FAST_MAX_INVERSE_EIGENVALUE, so
    the gate (which needs λ_max(Z)² <= ‖Z⁴‖_F^{1/2} <= that bound) rejects every matrix
    the 6 steps leave unconverged, down to the damping floor σ = √ε.
    """
    from lora_muon_jax import _direction

    assert len(_coefficients.GRAM_FAST_INV_SQRT_COEFFS) == 6
    lower = _coefficients.GRAM_FAST_INV_SQRT_LOWER
    below = np.geomspace(np.sqrt(_coefficients.GRAM_INV_SQRT_EPS), lower, 100_001)
    z = _compose(_coefficients.GRAM_FAST_INV_SQRT_COEFFS, below) / below
    assert float(np.min(z)) > 1.9 * np.sqrt(_direction.FAST_MAX_INVERSE_EIGENVALUE)


@pytest.mark.parametrize("sigma_min", [2e-2, 1e-2, 7e-3, 3e-3, 1e-3, 1e-4])
def test_fast_gate_roots_are_exact_or_rejected(sigma_min: float) -> None:
    """float32 roots from the fast schedule: within 1e-4 of eigh's, or the gate's bound fails.

    Oracle: float64 eigh of the same normalised matrix. Eigenvalues of P̂ from σ_min² to 1.
    """
    from lora_muon_jax import _direction

    r = 8
    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((r, r)))
    eig = np.geomspace(sigma_min**2, 1.0, r)
    p = (q * eig) @ q.T
    x, scale = _polar.inverse_sqrt_normalized(jnp.asarray(p, jnp.float32), fast_gate=True)
    exact = ref.inv_sqrt(p)  # float64 eigh
    bound = float(_direction._inverse_eigenvalue_bound(x))
    got = np.asarray(x, np.float64) * float(scale)
    rel = np.linalg.norm(got - exact, 2) / np.linalg.norm(exact, 2)
    if bound <= _direction.FAST_MAX_INVERSE_EIGENVALUE:
        assert rel < 1e-4, (sigma_min, bound, rel)
    else:
        assert sigma_min < 1.5e-2, (sigma_min, bound)  # rejected only where it should be
