"""Shared pieces of the Flax LoRA modules: init modes, validation, scales, the adapter product.

An adapted weight is ``W = W_pre + s · lora_a ⋅ lora_b`` with ``s = α / r`` when an
``alpha`` is given (the LoRA paper's and qwix's convention) and ``s = 1``
otherwise (``nnx.LoRA``'s convention). ``lora_a`` has shape ``(*in, r)`` and
``lora_b`` ``(r, *out)``; ``⋅`` contracts the rank axis, so the product has the
base kernel's shape ``(*in, *out)``. The optimizer needs ``s`` (its
``lora_scale``) to keep η a spectral radius on W; ``LoRAScaleMap`` carries it.

"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp

from lora_muon_jax._layouts import LoRADimensionNumbers
from lora_muon_jax._pairs import module_path_of

InitMode = Literal["standard", "native"]

INIT_MODES: dict[str, str] = {
    "standard": (
        "LoRA finetuning: a frozen base kernel plus lora_a random (he_uniform over the input "
        "axes) and lora_b = 0, so the layer's output equals the base layer's at init."
    ),
    "native": (
        "native low-rank training (the paper's setting): no base kernel, the weight *is* "
        "s · lora_a ⋅ lora_b with both factors random (lora_a: variance 1/fan_in, lora_b: "
        "variance 1/r, so lora_a ⋅ lora_b has the variance 1/fan_in of a LeCun-normal kernel)."
    ),
}

_HIGHEST = jax.lax.Precision.HIGHEST


def check_init_mode(where: str, init: str) -> None:
    """Raise a ``ValueError`` unless ``init`` is one of ``INIT_MODES``."""
    if init not in INIT_MODES:
        raise ValueError(f"{where}: unknown init={init!r}; expected one of {sorted(INIT_MODES)}")


def check_rank(where: str, rank: Any, in_shape: Sequence[int], out_shape: Sequence[int]) -> None:
    """``1 <= rank <= min(prod(in_shape), prod(out_shape))``, else a ``ValueError``."""
    m, n = math.prod(in_shape), math.prod(out_shape)
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"{where}: rank must be a positive int, got {rank!r}")
    if rank > min(m, n):
        raise ValueError(
            f"{where}: rank={rank} exceeds min(in, out) = min({m}, {n}) for a kernel with "
            f"input axes {tuple(in_shape)} and output axes {tuple(out_shape)}; a LoRA pair of "
            "that rank has a singular Gram (choose rank <= min(in, out))"
        )


def check_float_dtype(where: str, name: str, dtype: Any) -> None:
    """``dtype`` must be ``None`` or a real floating dtype, else a ``TypeError``."""
    if dtype is not None and not jnp.issubdtype(jnp.dtype(dtype), jnp.floating):
        raise TypeError(
            f"{where}: {name}={jnp.dtype(dtype)} is not a floating dtype; LoRA factors and "
            "their computation must be real floating point (e.g. float32, bfloat16)"
        )


def lora_scale_value(where: str, alpha: float | None, rank: int) -> float:
    """``s = α / r`` (or 1 when ``alpha`` is ``None``); ``α`` must be a positive number."""
    if alpha is None:
        return 1.0
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not alpha > 0:
        raise ValueError(f"{where}: alpha must be a positive number or None, got {alpha!r}")
    return float(alpha) / rank


def normalize_axes(axis: int | Sequence[int], ndim: int) -> tuple[int, ...]:
    """Non-negative, validated axes of an ``ndim``-dimensional input."""
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    out = []
    for ax in axes:
        if not -ndim <= ax < ndim:
            raise ValueError(f"axis {ax} is out of range for an input with {ndim} axes")
        out.append(ax % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"repeated axes in {axis!r}")
    return tuple(out)


def as_shape(features: int | Sequence[int]) -> tuple[int, ...]:
    return (features,) if isinstance(features, int) else tuple(features)


def lora_apply(
    x: jax.Array,
    axes: tuple[int, ...],
    lora_a: jax.Array,
    lora_b: jax.Array,
    precision: Any = None,
) -> jax.Array:
    """``(x ⋅ lora_a) ⋅ lora_b``: contract ``axes`` of ``x`` with ``lora_a (*in, r)``.

    Returns an array of shape ``(*x's other axes, *out)``; never forms the
    ``(*in, *out)`` product (two thin contractions, O((m + n) r) per row).
    """
    n_in = lora_a.ndim - 1
    h = jax.lax.dot_general(x, lora_a, ((axes, tuple(range(n_in))), ((), ())), precision=precision)
    return jax.lax.dot_general(h, lora_b, (((h.ndim - 1,), (0,)), ((), ())), precision=precision)


def lora_product(lora_a: jax.Array, lora_b: jax.Array, num_batch_axes: int = 0) -> jax.Array:
    """``lora_a ⋅ lora_b`` in float32 at HIGHEST precision, shape ``(*batch, *in, *out)``.

    ``lora_a (*batch, *in, r)``, ``lora_b (*batch, r, *out)``; leading batch axes
    (stacked layers) are kept, each index an independent product.
    """
    nb = num_batch_axes
    a = lora_a.astype(jnp.float32)
    b = lora_b.astype(jnp.float32)
    batch = tuple(range(nb))
    return jax.lax.dot_general(a, b, (((a.ndim - 1,), (nb,)), (batch, batch)), precision=_HIGHEST)


def variance_scaling_init(
    variance: Callable[[int], float],
    distribution: str,
    rng: jax.Array,
    shape: Sequence[int],
    fan_in: int,
    dtype: Any,
) -> jax.Array:
    """Entries with variance ``variance(fan_in)``, uniform or (untruncated) normal."""
    var = variance(fan_in)
    if distribution == "uniform":
        limit = math.sqrt(3.0 * var)
        return jax.random.uniform(rng, tuple(shape), dtype, -limit, limit)
    return math.sqrt(var) * jax.random.normal(rng, tuple(shape), dtype)


def default_lora_a_init(init: str, num_in_axes: int) -> Callable[..., jax.Array]:
    """Initializer of ``lora_a (*in, r)``; fan-in is ``prod(in)`` (the input axes only).

    standard: he_uniform (variance 2/fan_in, as ``nnx.LoRA`` and qwix); native:
    normal with variance 1/fan_in.
    """

    def initializer(rng: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
        fan_in = math.prod(shape[-1 - num_in_axes : -1])
        if init == "standard":
            return variance_scaling_init(lambda f: 2.0 / f, "uniform", rng, shape, fan_in, dtype)
        return variance_scaling_init(lambda f: 1.0 / f, "normal", rng, shape, fan_in, dtype)

    return initializer


def default_lora_b_init(init: str) -> Callable[..., jax.Array]:
    """Initializer of ``lora_b (r, *out)``: zeros (standard) or variance 1/r (native)."""

    def initializer(rng: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
        if init == "standard":
            return jnp.zeros(tuple(shape), dtype)
        rank = shape[0]
        return variance_scaling_init(lambda f: 1.0 / f, "normal", rng, shape, rank, dtype)

    return initializer


# ---------------------------------------------------------------------------
# Pairs -> scales
# ---------------------------------------------------------------------------


def owning_module(
    known: Iterable[tuple[str, ...]], path: tuple[str, ...]
) -> tuple[str, ...] | None:
    """The longest of the ``known`` module paths that ends ``path`` (``None``: none does)."""
    best: tuple[str, ...] | None = None
    for candidate in known:
        if len(candidate) <= len(path) and path[len(path) - len(candidate) :] == candidate:
            if best is None or len(candidate) > len(best):
                best = candidate
    return best


class LoRAScaleMap:
    """``f(pair) -> s``: the ``lora_scale`` callable ``lora_muon`` accepts.

    Holds ``{module path: s}`` for the pairs that LoRA modules own; a pair is
    looked up by its structured ``module_path`` (``lora_muon`` passes each
    pair's ``PairName``; a ``LoRAPair`` or a module-path tuple work too), never by
    parsing a string. The path may carry a prefix (``('params', ...)``, an outer
    collection): the longest known module path that ends the pair's wins. A pair
    no module owns gets ``default``, or raises a ``KeyError`` naming the pair and
    the known paths when ``default`` is ``None``.
    """

    def __init__(self, scales: Mapping[tuple[str, ...], float], default: float | None = None):
        self.scales = {tuple(str(k) for k in path): float(s) for path, s in scales.items()}
        self.default = default

    def __call__(self, pair: Any) -> float:
        if isinstance(pair, int | jax.Array) or (
            hasattr(pair, "dtype") and jnp.issubdtype(pair.dtype, jnp.integer)
        ):
            # optax.inject_hyperparams calls every callable hyperparameter as a
            # schedule, with the step count.
            raise TypeError(
                f"LoRAScaleMap was called with {pair!r}, a step count, not a LoRA pair: "
                "optax.inject_hyperparams treats a callable `lora_scale` as a schedule. "
                "Name it static: optax.inject_hyperparams(lora_muon, "
                'static_args=("lora_scale",))(learning_rate=..., lora_scale=...).'
            )
        path = module_path_of(pair)
        best = owning_module(self.scales, path)
        if best is not None:
            return self.scales[best]
        if self.default is not None:
            return float(self.default)
        known_str = ", ".join("/".join(k) or "<root>" for k in self.scales) or "none"
        raise KeyError(
            f"no LoRA module of known scale owns the pair at {'/'.join(path)}; known module "
            f"paths: {known_str}. Pass default=... for pairs made elsewhere (e.g. nnx.LoRA: 1.0)."
        )

    def __repr__(self) -> str:
        return f"LoRAScaleMap({self.scales!r}, default={self.default!r})"


class LoRADimensionNumbersMap:
    """``f(pair_name, a_shape, b_shape) -> LoRADimensionNumbers | None``: a model's declared layout.

    The ``dimension_numbers`` callable ``lora_muon``/``find_lora_pairs`` accept.
    Holds ``{module path: k}``, the number of leading stacked (layer) axes of
    the factors of each LoRA module the model owns (``nnx.vmap``/``nnx.scan``
    stacks, ``lorafy`` on stacked layers, ``lora_muon_jax.hf`` scanned layers;
    ``0`` for a module that is not stacked). A pair is looked up by its
    structured ``module_path`` as ``LoRAScaleMap`` does (the longest known path
    that ends the pair's wins) and gets ``LoRADimensionNumbers(num_batch_axes=k)``:
    the rank axes stay the naming's. A pair no known module owns gets
    ``default`` (``None``: the layout is inferred from the shapes).

    Stacked layers whose count equals the rank (``lora_a (16, in, 16)``,
    ``lora_b (16, 16, out)``) are ambiguous by shape; the model knows which
    axes are stacked, so declaring them settles it.
    """

    def __init__(
        self,
        batch_axes: Mapping[tuple[str, ...], int],
        default: LoRADimensionNumbers | None = None,
    ):
        self.batch_axes = {tuple(str(k) for k in path): int(k) for path, k in batch_axes.items()}
        if default is not None and not isinstance(default, LoRADimensionNumbers):
            raise TypeError(f"default must be LoRADimensionNumbers or None, got {default!r}")
        self.default = default

    def __call__(
        self, pair: Any, a_shape: Sequence[int] = (), b_shape: Sequence[int] = ()
    ) -> LoRADimensionNumbers | None:
        del a_shape, b_shape  # the model's declaration; find_lora_pairs checks the shapes
        if isinstance(pair, int | jax.Array):
            raise TypeError(
                f"LoRADimensionNumbersMap was called with {pair!r}, a step count, not a LoRA "
                "pair: optax.inject_hyperparams treats a callable as a schedule. Name it static: "
                'static_args=("dimension_numbers",).'
            )
        best = owning_module(self.batch_axes, module_path_of(pair))
        if best is None:
            return self.default
        return LoRADimensionNumbers(num_batch_axes=self.batch_axes[best])

    def __repr__(self) -> str:
        return f"LoRADimensionNumbersMap({self.batch_axes!r}, default={self.default!r})"
