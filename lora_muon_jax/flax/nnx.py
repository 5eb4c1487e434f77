"""Flax NNX LoRA layers: what ``nnx.LoRA``/``nnx.LoRALinear`` lack for LoRA-Muon workflows.

* ``LoRALinearGeneral``: a multi-axis layer (``nnx.LinearGeneral``/einsum style:
  ``kernel (*in, *out)``, ``lora_a (*in, r)``, ``lora_b (r, *out)``) with an
  optional ``alpha`` (scale ``s = α/r``) and the ``init_mode="native"`` option: no
  base kernel, both factors random, the weight *is* ``s · lora_a ⋅ lora_b``
  (the paper's native low-rank training).
* ``LoRAAdapter``: wraps an existing ``nnx.Linear`` or ``nnx.Einsum`` (kept as
  ``base_module``, pretrained kernel untouched) with ``lora_a``/``lora_b``;
  ``lora_muon_jax.flax.surgery.lorafy`` builds these.
* ``lora_scale_fn(model)``: the ``f(pair_name) -> s`` callable that
  ``lora_muon(..., lora_scale=...)`` takes, read off the model's modules;
  ``lora_dimension_numbers_fn(model)``: the ``dimension_numbers`` callable
  that declares each pair's stacked (layer) axes the same way.

Factors are ``nnx.LoRAParam`` (train them with
``nnx.Optimizer(model, lora_muon(...), wrt=nnx.LoRAParam)``); base weights are
plain ``nnx.Param``. ``rngs`` is keyword-only, as in every NNX layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn.dtypes import promote_dtype

from lora_muon_jax import _deprecation
from lora_muon_jax._layouts import LoRADimensionNumbers
from lora_muon_jax.flax import _common
from lora_muon_jax.flax._common import (
    INIT_MODES,
    InitMode,
    LoRADimensionNumbersMap,
    LoRAScaleMap,
)
from lora_muon_jax.flax._einsum import EinsumLoRASpec, einsum_lora_spec
from lora_muon_jax.flax._nnx_adapter import LoRAAdapter
from lora_muon_jax.flax._nnx_init import flat_init, flax_names, sharding_metadata

__all__ = [
    "INIT_MODES",
    "EinsumLoRASpec",
    "InitMode",
    "LoRAAdapter",
    "LoRADimensionNumbersMap",
    "LoRALinearGeneral",
    "LoRAScaleMap",
    "einsum_lora_spec",
    "lora_batch_axes",
    "lora_dimension_numbers_fn",
    "lora_scale_fn",
]

Initializer = Callable[..., jax.Array]
_DEFAULT_KERNEL_INIT = nnx.initializers.lecun_normal()
_DEFAULT_BIAS_INIT = nnx.initializers.zeros_init()


class LoRALinearGeneral(nnx.Module):
    """``y = x ⋅ kernel + s · (x ⋅ lora_a) ⋅ lora_b + bias`` over the last ``len(in)`` axes.

    ``kernel (*in, *out)`` and ``bias (*out)`` are ``nnx.Param`` (frozen by
    training with ``wrt=nnx.LoRAParam``); ``lora_a (*in, r)`` and
    ``lora_b (r, *out)`` are ``nnx.LoRAParam``; ``s = alpha / rank`` when
    ``alpha`` is set, else 1.

    Args:
      in_features: input size(s): an int, or a tuple for several contracted
        axes (the input's trailing axes), e.g. ``(heads, head_dim)``.
      out_features: output size(s), an int or a tuple.
      lora_rank: r, ``1 <= r <= min(prod(in), prod(out))`` (flax's name; ``rank=``
        is the deprecated old one).
      alpha: α of ``s = α/r``; ``None`` (default): ``s = 1``.
      init_mode: ``"standard"`` (``lora_b = 0``: output equals the base layer's at
        init) or ``"native"`` (no kernel: the weight is ``s · lora_a ⋅ lora_b``,
        both random); see ``INIT_MODES``.
      use_bias: add a bias.
      dtype: computation dtype (default: inferred); param_dtype: parameters' dtype.
      precision: ``jax.lax`` precision of the contractions.
      kernel_init, bias_init: base-weight initializers (``kernel_init`` sees
        the flattened ``(prod(in), prod(out))`` shape).
      a_initializer, b_initializer: factor initializers on the flattened
        ``(prod(in), r)`` / ``(r, prod(out))`` shapes (default: by ``init_mode``;
        the deprecated old names are ``lora_a_init``, ``lora_b_init``).
      lora_param_type: the Variable type of the factors (``nnx.LoRAParam``, as
        flax's; train with ``wrt=`` that type).
      promote_dtype: ``f((arrays), dtype=...)`` promoting inputs and parameters
        before the contractions (flax's ``promote_dtype`` by default).
      a_metadata, b_metadata: extra Variable metadata of ``lora_a``/``lora_b``.
      kernel_axes: mesh axis names of the kernel's axes ``(*in, *out)``; when
        set, the parameters get ``out_sharding`` metadata: kernel
        ``kernel_axes``, ``lora_a`` ``(*in names, None)``, ``lora_b``
        ``(None, *out names)``, bias the out names (rank axis unsharded).
        NNX shards eagerly: build the layer under ``jax.set_mesh(mesh)``.
      rngs: ``nnx.Rngs`` (keyword-only).
    """

    def __init__(
        self,
        in_features: int | Sequence[int],
        out_features: int | Sequence[int],
        *,
        lora_rank: int | None = None,
        alpha: float | None = None,
        init_mode: InitMode = "standard",
        use_bias: bool = True,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        precision: Any = None,
        kernel_init: Initializer = _DEFAULT_KERNEL_INIT,
        bias_init: Initializer = _DEFAULT_BIAS_INIT,
        a_initializer: Initializer | None = None,
        b_initializer: Initializer | None = None,
        lora_param_type: type[nnx.Variable] = nnx.LoRAParam,
        promote_dtype: Callable[..., Any] = promote_dtype,
        a_metadata: Mapping[str, Any] | None = None,
        b_metadata: Mapping[str, Any] | None = None,
        kernel_axes: Sequence[str | None] | None = None,
        rank: int | None = None,
        lora_a_init: Initializer | None = None,
        lora_b_init: Initializer | None = None,
        rngs: nnx.Rngs,
    ):
        in_shape, out_shape = _common.as_shape(in_features), _common.as_shape(out_features)
        where = f"LoRALinearGeneral(in_features={in_shape}, out_features={out_shape})"
        names = flax_names(
            where,
            dict(lora_rank=lora_rank, a_initializer=a_initializer, b_initializer=b_initializer),
            {"rank": rank, "lora_a_init": lora_a_init, "lora_b_init": lora_b_init},
        )
        rank = int(names["lora_rank"])
        lora_a_init, lora_b_init = names["a_initializer"], names["b_initializer"]
        self.promote_dtype = promote_dtype
        _common.check_init_mode(where, init_mode)
        _common.check_float_dtype(where, "param_dtype", param_dtype)
        _common.check_float_dtype(where, "dtype", dtype)
        _common.check_rank(where, rank, in_shape, out_shape)
        if kernel_axes is not None and len(kernel_axes) != len(in_shape) + len(out_shape):
            raise ValueError(
                f"{where}: kernel_axes={tuple(kernel_axes)} must name every kernel axis "
                f"(*in, *out) = {in_shape + out_shape}"
            )
        self.in_features, self.out_features = in_shape, out_shape
        self.lora_rank, self.alpha, self.init_mode = rank, alpha, init_mode
        self.rank = rank  # the old attribute name
        self.lora_scale = _common.lora_scale_value(where, alpha, rank)
        self.dtype, self.param_dtype, self.precision = dtype, param_dtype, precision
        self.merged = False
        in_names = out_names = None
        if kernel_axes is not None:
            in_names = tuple(kernel_axes[: len(in_shape)])
            out_names = tuple(kernel_axes[len(in_shape) :])
        m, n = math.prod(in_shape), math.prod(out_shape)
        a_init = flat_init(lora_a_init or _common.default_lora_a_init(init_mode, 1), (m, rank))
        b_init = flat_init(lora_b_init or _common.default_lora_b_init(init_mode), (rank, n))
        self.lora_a = lora_param_type(
            a_init(rngs.params(), (*in_shape, rank), param_dtype),
            **sharding_metadata(
                None if in_names is None else (*in_names, None), a_metadata, self.lora_scale
            ),
        )
        self.lora_b = lora_param_type(
            b_init(rngs.params(), (rank, *out_shape), param_dtype),
            **sharding_metadata(
                None if out_names is None else (None, *out_names), b_metadata, self.lora_scale
            ),
        )
        self.kernel = nnx.data(None)
        if init_mode == "standard":
            self.kernel = nnx.Param(
                flat_init(kernel_init, (m, n))(rngs.params(), in_shape + out_shape, param_dtype),
                **sharding_metadata(kernel_axes),
            )
        self.bias = nnx.data(None)
        if use_bias:
            self.bias = nnx.Param(
                flat_init(bias_init, (n,))(rngs.params(), out_shape, param_dtype),
                **sharding_metadata(out_names),
            )

    def __call__(self, inputs: jax.Array) -> jax.Array:
        """``x ⋅ kernel + s · (x ⋅ lora_a) ⋅ lora_b + bias``; skips the adapter once merged."""
        inputs = jnp.asarray(inputs)
        n_in = len(self.in_features)
        if inputs.shape[inputs.ndim - n_in :] != self.in_features:
            raise ValueError(
                f"LoRALinearGeneral: input shape {inputs.shape} does not end with "
                f"in_features={self.in_features}"
            )
        axes = tuple(range(inputs.ndim - n_in, inputs.ndim))
        kernel = None if self.kernel is None else self.kernel[...]
        bias = None if self.bias is None else self.bias[...]
        inputs, kernel, lora_a, lora_b, bias = self.promote_dtype(
            (inputs, kernel, self.lora_a[...], self.lora_b[...], bias), dtype=self.dtype
        )
        y: jax.Array | None = None
        if kernel is not None:
            y = jax.lax.dot_general(
                inputs, kernel, ((axes, tuple(range(n_in))), ((), ())), precision=self.precision
            )
        if not self.merged:
            delta = _common.lora_apply(inputs, axes, lora_a, lora_b, self.precision)
            if self.lora_scale != 1.0:
                delta = delta * jnp.asarray(self.lora_scale, delta.dtype)
            y = delta if y is None else y + delta
        assert y is not None  # a kernel exists whenever the adapter is merged
        if bias is not None:
            y = y + jnp.reshape(bias, (1,) * (y.ndim - bias.ndim) + bias.shape)
        return y


# ---------------------------------------------------------------------------
# Scales and layouts for the optimizer
# ---------------------------------------------------------------------------


def lora_scales(model: nnx.Module) -> dict[tuple[str, ...], float]:
    """``{module path: s}`` of every LoRA module in ``model``.

    ``LoRALinearGeneral`` and ``LoRAAdapter``: ``s = α/r`` (1 without alpha);
    ``nnx.LoRA`` (also the ``lora`` child of ``nnx.LoRALinear``): 1.
    """
    scales: dict[tuple[str, ...], float] = {}
    for path, module in nnx.iter_modules(model):
        if isinstance(module, LoRALinearGeneral | LoRAAdapter):
            scales[tuple(str(k) for k in path)] = module.lora_scale
        elif isinstance(module, nnx.LoRA):
            scales[tuple(str(k) for k in path)] = 1.0
    return scales


def lora_scale_fn(model: nnx.Module, *, default: float | None = None) -> LoRAScaleMap:
    """The ``lora_scale`` callable of ``lora_muon`` for ``model``'s LoRA modules.

    Example::

        tx = lora_muon(0.1, lora_scale=lora_scale_fn(model))
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)

    Args:
      model: an NNX module (read once; the scales are static).
      default: scale of pairs no known module owns (qwix-made pairs: its
        ``alpha / rank``); ``None`` makes them raise a ``KeyError``.
    """
    return LoRAScaleMap(lora_scales(model), default=default)


def _per_pair_ndims(module: nnx.Module) -> tuple[int, int]:
    """Axes of one pair's ``lora_a``/``lora_b`` as ``module`` declares them (no stacked axes)."""
    if isinstance(module, LoRALinearGeneral):
        return len(module.in_features) + 1, 1 + len(module.out_features)
    if isinstance(module, LoRAAdapter):
        nb = len(module.spec.batch_axes)  # an einsum's batch axes: independent pairs too
        return len(module.spec.a_shape) - nb, len(module.spec.b_shape) - nb
    return 2, 2  # nnx.LoRA: lora_a (in, r), lora_b (r, out)


def lora_batch_axes(model: nnx.Module) -> dict[tuple[str, ...], int]:
    """``{module path: k}``: the leading batch (stacked-layer) axes of each LoRA module's factors.

    A module declares the shape of one pair (``LoRALinearGeneral``: ``in_features``,
    ``out_features``; ``LoRAAdapter``: its ``einsum_lora_spec``; ``nnx.LoRA``:
    2-D factors); axes its factors hold beyond those lead both factors and index
    stacked layers: ``nnx.vmap``/``nnx.scan`` stacks (``lorafy`` on stacked
    layers, ``lora_muon_jax.hf`` ``scan_layers=True``) give ``k = 1``, an
    unstacked module ``0``. A ``LoRAAdapter`` on an ``nnx.Einsum`` with batch
    axes counts those too (one pair per index).

    Raises:
      ValueError: a module whose factors disagree with it (the path and shapes).
    """
    out: dict[tuple[str, ...], int] = {}
    for path, module in nnx.iter_modules(model):
        if not isinstance(module, LoRALinearGeneral | LoRAAdapter | nnx.LoRA):
            continue
        a_shape = tuple(module.lora_a.shape)  # type: ignore[attr-defined]
        b_shape = tuple(module.lora_b.shape)  # type: ignore[attr-defined]
        a_ndim, b_ndim = _per_pair_ndims(module)
        k = len(a_shape) - a_ndim
        if k < 0 or len(b_shape) - b_ndim != k or a_shape[:k] != b_shape[:k]:
            where = "/".join(str(p) for p in path) or "<root>"
            raise ValueError(
                f"{type(module).__name__} at {where}: lora_a {a_shape} and lora_b {b_shape} do "
                f"not hold pairs of {a_ndim}-axis and {b_ndim}-axis factors behind the same "
                "leading stacked axes"
            )
        out[tuple(str(p) for p in path)] = k
    return out


def lora_dimension_numbers_fn(
    model: nnx.Module, *, default: LoRADimensionNumbers | None = None
) -> LoRADimensionNumbersMap:
    """The ``dimension_numbers`` callable of ``lora_muon`` for ``model``'s LoRA modules.

    Declares each pair's stacked (layer) axes, as ``lora_scale_fn`` declares its
    scale: ``LoRADimensionNumbers(num_batch_axes=k)`` with ``k`` from
    ``lora_batch_axes(model)`` (``k = 0`` for an unstacked module). Needed for
    stacked/scanned layers whose count equals the rank (e.g. Llama-3.2-1B's 16
    layers at r = 16: ``lora_a (16, in, 16)``, ``lora_b (16, 16, out)`` read as
    16 pairs or as one pair, and the optimizer will not guess); harmless
    everywhere else.

    Example::

        tx = lora_muon(
            0.1, lora_scale=lora_scale_fn(model), dimension_numbers=lora_dimension_numbers_fn(model)
        )
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)

    Args:
      model: an NNX module (read once: call it after ``lorafy``).
      default: the layout of pairs no known module owns (qwix-made pairs);
        ``None``: inferred from their shapes.
    """
    return LoRADimensionNumbersMap(lora_batch_axes(model), default=default)


__getattr__ = _deprecation.renamed(
    __name__,
    {
        "EinsumLoraSpec": ("EinsumLoRASpec", EinsumLoRASpec),
        "LoraScaleMap": ("LoRAScaleMap", LoRAScaleMap),
    },
)
