"""Derive the per-step coefficients of the Gram-form inverse square root.

Run:  python tools/derive_inverse_sqrt_coefficients.py [LOWER]   (CPU, < 1 s)
Prints `lora_muon_jax._coefficients.GRAM_INV_SQRT_COEFFS` (LOWER = 1e-4, default; its first four
steps are also the robust form's tall Newton–Schulz steps); tests/test_polar.py re-derives it.

The coupled iteration `W = a I + b P + c P²; X ← X W; P ← P W²` acts on each
eigenvalue p of P as `σ ↦ σ (a + b σ² + c σ⁴)` on σ = √p, so one step is an odd
quintic applied to the singular values, exactly as in a matrix-sign iteration.
Following Amsel et al., "The Polar Express" (arXiv:2505.16932, 2025), each step
uses the minimax odd quintic that maps the current interval [lo, 1] closest to 1
(found by the Remez exchange algorithm), normalised so its maximum is 1. While
the interval is wide (lo < 0.5) the polynomial is designed on [lo/γ, 1] and
evaluated at σ/γ with γ = 1.01, so eigenvalues pushed slightly above 1 by
rounding stay inside the design interval; the last steps have no γ and converge.
"""

from __future__ import annotations

import numpy as np

GAMMA = 1.01
SWITCH = 0.5
TOLERANCE = 1e-8


def minimax_odd_quintic(lo: float, iters: int = 100) -> tuple[float, float, float, float]:
    """Remez: the odd quintic a x + b x³ + c x⁵ closest to 1 on [lo, 1] and its error E."""
    nodes = np.array([lo, lo + (1 - lo) * 0.2, lo + (1 - lo) * 0.6, 1.0])
    signs = np.array([-1.0, 1.0, -1.0, 1.0])
    a = b = c = err = 0.0
    for _ in range(iters):
        system = np.stack([nodes, nodes**3, nodes**5, -signs], axis=1)
        a, b, c, err = np.linalg.solve(system, np.ones(4))
        # Interior extrema of the error: roots of a + 3 b y + 5 c y² with y = x².
        y = (-3 * b + np.array([-1.0, 1.0]) * np.sqrt(9 * b * b - 20 * a * c)) / (10 * c)
        new_nodes = np.array([lo, *np.sort(np.sqrt(y)), 1.0])
        if np.max(np.abs(new_nodes - nodes)) < 1e-14:
            break
        nodes = new_nodes
    return float(a), float(b), float(c), float(err)


def inverse_sqrt_schedule(lower: float) -> list[tuple[float, float, float]]:
    """Steps that take every σ in [lower, γ] to 1 within ~1e-8 (float64)."""
    steps = []
    lo = lower
    while True:
        gamma = GAMMA if lo < SWITCH else 1.0
        a, b, c, err = minimax_odd_quintic(min(lo / gamma, 0.9999))
        norm = 1.0 / (1.0 + err)
        steps.append((a * norm / gamma, b * norm / gamma**3, c * norm / gamma**5))
        lo = (1.0 - err) * norm
        if err < TOLERANCE:
            return steps


if __name__ == "__main__":
    import sys

    # 1e-4: GRAM_INV_SQRT_COEFFS.
    lower = float(sys.argv[1]) if len(sys.argv) > 1 else 1e-4
    for a, b, c in inverse_sqrt_schedule(lower):
        print(f"    ({a!r}, {b!r}, {c!r}),")
