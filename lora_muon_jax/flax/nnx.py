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
  ``lora_muon(..., lora_scale=...)`` takes, read off the model's modules.

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
from lora_muon_jax.flax import _common
from lora_muon_jax.flax._common import INIT_MODES, InitMode, LoRAScaleMap
from lora_muon_jax.flax._einsum import EinsumLoRASpec, einsum_lora_spec
from lora_muon_jax.flax._nnx_init import batched_init, flat_init, flax_names, sharding_metadata

__all__ = [
    "INIT_MODES",
    "EinsumLoRASpec",
    "InitMode",
    "LoRAAdapter",
    "LoRALinearGeneral",
    "LoRAScaleMap",
    "einsum_lora_spec",
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
            **sharding_metadata(None if in_names is None else (*in_names, None), a_metadata),
        )
        self.lora_b = lora_param_type(
            b_init(rngs.params(), (rank, *out_shape), param_dtype),
            **sharding_metadata(None if out_names is None else (None, *out_names), b_metadata),
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
# Adapters around existing nnx.Linear / nnx.Einsum layers
# ---------------------------------------------------------------------------


def _base_spec(base: nnx.Module, rank: int, where: str) -> tuple[EinsumLoRASpec, int]:
    """The per-layer LoRA layout of ``base`` and its number of stacked (layer) axes.

    An ``nnx.Linear`` made by ``nnx.vmap`` (stacked or scanned layers) holds a
    kernel ``(*layers, in, out)``: its factors get the same leading layer axes,
    which ``nnx.scan`` slices with the kernel.
    """
    kernel = getattr(base, "kernel", None)
    if not isinstance(kernel, nnx.Variable):
        raise TypeError(f"{where}: {type(base).__name__} has no kernel parameter")
    shape = tuple(kernel.shape)
    if isinstance(base, nnx.Einsum):
        if base.einsum_str is None:
            raise ValueError(f"{where}: nnx.Einsum without a constructor einsum_str")
        return einsum_lora_spec(base.einsum_str, shape, rank, where), 0
    if isinstance(base, nnx.Linear):
        if len(shape) < 2:
            raise ValueError(f"{where}: nnx.Linear kernel of shape {shape}")
        stacked = len(shape) - 2
        return einsum_lora_spec("...i,io->...o", shape[stacked:], rank, where), stacked
    raise TypeError(f"{where}: expected nnx.Linear or nnx.Einsum, got {type(base).__name__}")


def _stacked_equation(equation: str, stacked: int) -> str:
    """``'ab,bc->ac'`` -> ``'Lab,Lbc->Lac'`` for ``stacked`` leading layer axes."""
    if not stacked:
        return equation
    letters = "".join(c for c in "ZYXWVUTS" if c not in equation)[:stacked]
    lhs, out = equation.split("->")
    return ",".join(letters + op for op in lhs.split(",")) + "->" + letters + out


def _inherited_names(kernel: nnx.Variable, axes: Sequence[int]) -> tuple[Any, ...] | None:
    names = kernel.get_metadata().get("out_sharding")
    if names is None:
        return None
    return tuple(names[i] if i < len(names) else None for i in axes)


class LoRAAdapter(nnx.Module):
    """A pretrained ``nnx.Linear``/``nnx.Einsum`` plus a LoRA adapter: ``base(x) + s · Δ(x)``.

    ``base_module`` keeps its (pretrained) ``kernel``/``bias`` as ``nnx.Param``;
    the adapter adds ``lora_a``/``lora_b`` (``nnx.LoRAParam``, layout from
    ``einsum_lora_spec``; an ``nnx.Linear`` is ``'...i,io->...o'``) with
    ``s = alpha / rank`` (1 without ``alpha``). Factors inherit the kernel's
    ``out_sharding`` names (rank axis unsharded). Standard init: ``lora_a``
    he_uniform over the contracted axes, ``lora_b = 0`` (output unchanged).

    Args:
      base_module: the layer to adapt.
      lora_rank: r (``rank=`` is the deprecated old name); alpha: α (``None``: ``s = 1``).
      param_dtype: factors' dtype (default: the kernel's).
      a_initializer, b_initializer: initializers on the flattened
        ``(prod(contracted), r)`` / ``(r, prod(output))`` shapes, vmapped over
        batch axes (deprecated old names ``lora_a_init``, ``lora_b_init``).
      lora_param_type, promote_dtype, a_metadata, b_metadata: as in
        ``LoRALinearGeneral`` (flax's extension points).
      rngs: ``nnx.Rngs`` (keyword-only).
    """

    def __init__(
        self,
        base_module: nnx.Module,
        *,
        lora_rank: int | None = None,
        alpha: float | None = None,
        param_dtype: Any = None,
        a_initializer: Initializer | None = None,
        b_initializer: Initializer | None = None,
        lora_param_type: type[nnx.Variable] = nnx.LoRAParam,
        promote_dtype: Callable[..., Any] = promote_dtype,
        a_metadata: Mapping[str, Any] | None = None,
        b_metadata: Mapping[str, Any] | None = None,
        rank: int | None = None,
        lora_a_init: Initializer | None = None,
        lora_b_init: Initializer | None = None,
        rngs: nnx.Rngs,
    ):
        where = f"LoRAAdapter({type(base_module).__name__})"
        names = flax_names(
            where,
            dict(lora_rank=lora_rank, a_initializer=a_initializer, b_initializer=b_initializer),
            {"rank": rank, "lora_a_init": lora_a_init, "lora_b_init": lora_b_init},
        )
        rank = int(names["lora_rank"])
        lora_a_init, lora_b_init = names["a_initializer"], names["b_initializer"]
        self.promote_dtype = promote_dtype
        spec, stacked = _base_spec(base_module, rank, where)
        kernel: nnx.Variable = base_module.kernel  # type: ignore[attr-defined]
        dtype = kernel.dtype if param_dtype is None else param_dtype
        _common.check_float_dtype(where, "param_dtype", dtype)
        self.base_module = base_module
        self.spec, self.stacked_axes = spec, stacked
        self.lora_rank, self.alpha = rank, alpha
        self.rank = rank  # the old attribute name
        self.lora_scale = _common.lora_scale_value(where, alpha, rank)
        self.merged = False
        nb = len(spec.batch_axes)
        layers = tuple(kernel.shape[:stacked])
        batch_shape = layers + spec.a_shape[:nb]
        m, n = math.prod(spec.a_shape[nb:-1]), math.prod(spec.b_shape[nb + 1 :])
        a_init = flat_init(lora_a_init or _common.default_lora_a_init("standard", 1), (m, rank))
        b_init = flat_init(lora_b_init or _common.default_lora_b_init("standard"), (rank, n))
        lead = tuple(range(stacked))

        def shifted(axes: Sequence[int]) -> tuple[int, ...]:
            return (*lead, *(a + stacked for a in axes))

        a_names = _inherited_names(kernel, shifted((*spec.batch_axes, *spec.contracted_axes)))
        b_names = _inherited_names(kernel, shifted(spec.batch_axes))
        out_names = _inherited_names(kernel, tuple(a + stacked for a in spec.output_axes))
        self.lora_a = lora_param_type(
            batched_init(a_init, rngs.params(), batch_shape, spec.a_shape[nb:], dtype),
            **sharding_metadata(None if a_names is None else (*a_names, None), a_metadata),
        )
        self.lora_b = lora_param_type(
            batched_init(b_init, rngs.params(), batch_shape, spec.b_shape[nb:], dtype),
            **sharding_metadata(
                None if b_names is None or out_names is None else (*b_names, None, *out_names),
                b_metadata,
            ),
        )

    def delta_kernel(self) -> jax.Array:
        """``s · lora_a ⋅ lora_b`` in the kernel's shape and axis order (float32)."""
        delta = jnp.einsum(
            _stacked_equation(self.spec.kernel_equation, self.stacked_axes),
            self.lora_a[...].astype(jnp.float32),
            self.lora_b[...].astype(jnp.float32),
            precision=jax.lax.Precision.HIGHEST,
        )
        return delta * jnp.float32(self.lora_scale)

    def __call__(self, inputs: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
        """``base_module(x) + s · einsum(delta_equation, x, lora_a, lora_b)`` (unless merged)."""
        y = self.base_module(inputs, *args, **kwargs)  # type: ignore[operator]
        if self.merged:
            return y
        x = jnp.asarray(inputs)
        base_dtype = getattr(self.base_module, "dtype", None)
        x, lora_a, lora_b = self.promote_dtype(
            (x, self.lora_a[...], self.lora_b[...]), dtype=base_dtype
        )
        precision = getattr(self.base_module, "precision", None)
        delta = jnp.einsum(self.spec.delta_equation, x, lora_a, lora_b, precision=precision)
        if self.lora_scale != 1.0:
            delta = delta * jnp.asarray(self.lora_scale, delta.dtype)
        return y + delta.astype(y.dtype)


# ---------------------------------------------------------------------------
# Scales for the optimizer
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


__getattr__ = _deprecation.renamed(
    __name__,
    {
        "EinsumLoraSpec": ("EinsumLoRASpec", EinsumLoRASpec),
        "LoraScaleMap": ("LoRAScaleMap", LoRAScaleMap),
    },
)
