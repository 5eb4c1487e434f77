"""Every numeric constant of the matrix iterations, with where it comes from.

References:
  Cesista, Crowson, Simal, Biderman, "LoRA-Muon: Spectral Steepest Descent on
  the Low-Rank Manifold", arXiv:2606.12921, 2026 (Appendix B.3 Table 1, B.4
  Table 2).
  Amsel, Persson, Musco, Gower, "The Polar Express: Optimal Matrix Sign Methods
  and Their Application to the Muon Algorithm", arXiv:2505.16932, 2025.
"""

from __future__ import annotations

# Paper, Appendix B.3, Table 1: 8 quintic Newton–Schulz steps for msign.
PAPER_MSIGN_COEFFS: tuple[tuple[float, float, float], ...] = (
    (7.2086, -15.5131, 9.0178),
    (3.9623, -2.5813, 0.4542),
    (3.9466, -2.5765, 0.4544),
    (3.8991, -2.5671, 0.4566),
    (3.7186, -2.5308, 0.4653),
    (3.1390, -2.3073, 0.4733),
    (2.1715, -1.5246, 0.3885),
    (1.8648, -1.2224, 0.3577),
)

# Paper, Appendix B.4, Table 2: 7 coupled steps for P^{-1/2}, damping and safety.
PAPER_INV_SQRT_COEFFS: tuple[tuple[float, float, float], ...] = (
    (7.424865680309214, -18.39581635618996, 12.896720413604342),
    (3.4877256051546017, -2.3300436563986993, 0.4404692168431095),
    (2.7766085124882527, -2.070643152532662, 0.46302261050004967),
    (1.9913142104341506, -1.373936700681269, 0.3875934979568538),
    (1.8754637749479246, -1.2505152090010534, 0.37505152463617264),
    (1.874999066623701, -1.2499981332141676, 0.37499906659046633),
    (1.875, -1.25, 0.375),
)
PAPER_INV_SQRT_EPS = 1e-5
PAPER_INV_SQRT_GAMMA = 1.001

# Gram form: minimax (Polar Express) steps for eigenvalues of P/‖P‖_F in
# [1e-8, 1.02], γ = 1.01 folded into the first seven rows; float64 error of the
# scalar map < 1e-12 over that interval. Derived by
# `tools/derive_inverse_sqrt_coefficients.py` (re-run in tests/test_polar.py).
GRAM_INV_SQRT_LOWER = 1e-4  # smallest singular value (√eigenvalue) designed for
GRAM_INV_SQRT_COEFFS: tuple[tuple[float, float, float], ...] = (
    (4.214611692100267, -12.265893576806072, 8.925513707659647),
    (4.213359627997317, -12.255559598461325, 8.916586558506603),
    (4.208081642565003, -12.212061775744317, 8.879017854998239),
    (4.185828995712539, -12.029810066752047, 8.72174158091339),
    (4.092180089903479, -11.282825952802183, 8.079470762803439),
    (3.7144865405157534, -8.585268496558298, 5.79802192259893),
    (2.691929973899452, -3.495813971571848, 1.7915065197586353),
    (1.9425420400757072, -1.3887828245381404, 0.44624078446243315),
    (1.8750937602226676, -1.2501875274786893, 0.3750937672560217),
)
# The Gram form's fast path needs less. Its gate (`_direction.FAST_MAX_INVERSE_EIGENVALUE`
# = 1e4 on ‖Z⁴‖_F^{1/2} >= λ_max(Z)²) admits only roots Z with eigenvalues <= 100, i.e.
# singular values σ >= 1e-2, so its two root chains take the schedule for σ in
# [5e-3, 1.01]: 6 steps instead of 9. Below 5e-3 the computed root's eigenvalue
# σ⁻¹·(composed map)(σ) stays >= 200 (monotone, tested), so the gate rejects every matrix
# this schedule does not cover and the robust form takes it: the same steps as with the
# 9-step schedule, 24 fewer r×r products per call. Derived by the same tool (argument 5e-3).
GRAM_FAST_INV_SQRT_LOWER = 5e-3
GRAM_FAST_INV_SQRT_COEFFS: tuple[tuple[float, float, float], ...] = (
    (4.1954969227012855, -12.108765299069415, 8.789850395426033),
    (4.132805030863769, -11.60292082811901, 8.354218734753315),
    (3.8737416224815004, -9.662748495902049, 6.701230305742499),
    (3.0277415986302065, -4.847525244494135, 2.793875369728059),
    (2.0525960877918354, -1.6313162900884028, 0.5787202022965676),
    (1.8758625122833537, -1.2517256198113216, 0.37586310752796775),
)
# Damping relative to ‖P‖_F: the schedule covers eigenvalues down to ℓ² = 1e-8.
GRAM_INV_SQRT_EPS = 1e-8
# float32 rounding can make a numerically singular Gram slightly indefinite
# (eigenvalues near -1e-7·‖P‖ were seen); such a matrix diverges. Any matrix
# whose residual Σ|Z Y − I| / r exceeds GRAM_INV_SQRT_TOL is recomputed with the
# paper's damping 1e-5 (inside a lax.cond, so only when one fails). Converged
# matrices measure ≤ 2e-6 at κ = 1e2, 1.5e-5 at 1e4, 1.1e-4 at 1e6 and ~1e-3 at
# 1e8; diverged ones are O(1), inf or NaN.
GRAM_INV_SQRT_FALLBACK_EPS = 1e-5
GRAM_INV_SQRT_TOL = 1e-2
# Newton polish of the converged root on matrices with tr(P̂^{-1}) below this.
POLISH_MAX_TRACE = 100.0
