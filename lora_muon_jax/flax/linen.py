"""Flax Linen LoRA layers whose parameter trees ``lora_muon`` understands out of the box.

``LoRADenseGeneral`` (and ``LoRADense``, its one-axis form) computes

    y = x ⋅ W_pre + s · (x ⋅ lora_a) ⋅ lora_b + bias,   s = α / r (or 1 without ``alpha``),

with a frozen base ``kernel (*in, *out)``, ``lora_a (*in, r)`` and
``lora_b (r, *out)`` (flax layout: the sibling names ``lora_a``/``lora_b`` the
optimizer pairs). ``init_mode="native"`` drops the base kernel: the weight *is*
``s · lora_a ⋅ lora_b`` with both factors random (the paper's native low-rank
training). Inside ``nn.scan`` the factors get a leading layer axis, which the
optimizer treats as a batch of independent pairs.

The scale ``s`` is declared to the optimizer by ``lora_scale_fn(model, *inputs)``,
which records every LoRA layer's path and ``s`` during an abstract
``model.init`` and returns the ``f(pair_name) -> s`` callable that
``lora_muon(..., lora_scale=...)`` and ``merge_lora_params`` take.

Reference: Cesista, Crowson, Simal, Biderman, "LoRA-Muon: Spectral Steepest
Descent on the Low-Rank Manifold", arXiv:2606.12921, 2026; Hu et al., "LoRA:
Low-Rank Adaptation of Large Language Models", arXiv:2106.09685, 2021.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import meta
from flax.linen.dtypes import promote_dtype

from lora_muon_jax import _deprecation
from lora_muon_jax.flax import _common
from lora_muon_jax.flax._common import INIT_MODES, InitMode, LoRAScaleMap

__all__ = [
    "INIT_MODES",
    "InitMode",
    "LoRADense",
    "LoRADenseGeneral",
    "LoRAScaleMap",
    "lora_scale_fn",
    "lora_scales",
]

Initializer = Callable[..., Any]
LogicalNames = Sequence[str | None]


def _reshaping(init: Initializer, flat_shape: tuple[int, ...]) -> Initializer:
    """Call ``init`` on a 2-D ``flat_shape`` (so fans are the flattened in/out sizes), reshape."""

    def wrapped(rng: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> Any:
        value = init(rng, flat_shape, dtype)
        if isinstance(value, meta.AxisMetadata):
            return meta.replace_boxed(value, jnp.reshape(value.unbox(), tuple(shape)))
        return jnp.reshape(value, tuple(shape))

    return wrapped


def _partitioned(init: Initializer, names: LogicalNames | None) -> Initializer:
    return init if names is None else nn.with_logical_partitioning(init, tuple(names))


class LoRADenseGeneral(nn.Module):
    """A DenseGeneral layer with a LoRA adapter (frozen base kernel + trainable factors).

    ``y = x ⋅ kernel + s · (x ⋅ lora_a) ⋅ lora_b + bias``, contracting the input
    ``axis`` (one or several) with ``kernel (*in, *features)``,
    ``lora_a (*in, rank)`` and ``lora_b (rank, *features)``; ``s = alpha / rank``
    when ``alpha`` is set, else 1.

    Attributes:
      features: output feature size(s), an int or a tuple (multi-axis output,
        e.g. ``(heads, head_dim)``).
      rank: r, ``1 <= r <= min(prod(in), prod(features))``.
      axis: input axis or axes to contract (default: the last).
      alpha: α of the scale ``s = α/r`` (off by default: ``s = 1``). Declare it
        to the optimizer with ``lora_scale_fn``.
      init_mode: ``"standard"`` (``lora_b = 0``: the output equals the base layer's
        at init) or ``"native"`` (no base kernel; both factors random); see
        ``INIT_MODES``.
      use_bias: add a (frozen, like the kernel) bias.
      freeze_base: apply ``stop_gradient`` to the kernel and bias, so their
        gradients are exactly zero and never computed (label them ``frozen``
        for the optimizer anyway; see ``lora_muon_jax.flax.surgery``).
      dtype: computation dtype (default: inferred from inputs and params).
      param_dtype: dtype of all parameters (float).
      precision: ``jax.lax`` precision of the three contractions.
      kernel_init, bias_init: initializers of the base weights; ``kernel_init``
        sees the flattened ``(prod(in), prod(features))`` shape, as in
        ``nn.DenseGeneral``.
      lora_a_init, lora_b_init: initializers of the factors, called on the
        flattened ``(prod(in), r)`` and ``(r, prod(features))`` shapes (default:
        by ``init_mode``, see ``INIT_MODES``).
      kernel_axes: logical axis names of the kernel ``(*in, *features)``; when
        set, every parameter is annotated with ``nn.with_logical_partitioning``:
        the kernel with ``kernel_axes``, ``lora_a`` with ``(*in names, None)``,
        ``lora_b`` with ``(None, *feature names)``, the bias with the feature
        names (the rank axis is never sharded). Alternatively wrap the
        initializers yourself (``nn.with_partitioning``) and leave this ``None``.
    """

    features: int | Sequence[int]
    rank: int
    axis: int | Sequence[int] = -1
    alpha: float | None = None
    init_mode: InitMode = "standard"
    use_bias: bool = True
    freeze_base: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: Initializer = nn.initializers.lecun_normal()
    bias_init: Initializer = nn.initializers.zeros_init()
    lora_a_init: Initializer | None = None
    lora_b_init: Initializer | None = None
    kernel_axes: LogicalNames | None = None

    @property
    def lora_scale(self) -> float:
        """``s = alpha / rank`` (1 without ``alpha``): the adapter's scale in ``W``."""
        return _common.lora_scale_value(self._where(), self.alpha, self.rank)

    def _where(self) -> str:
        path = "/".join(self.scope.path) if self.scope is not None else "<unbound>"
        return f"{type(self).__name__}(name={self.name!r}) at {path or '<root>'!r}"

    def _check(self, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> None:
        where = self._where()
        _common.check_init_mode(where, self.init_mode)
        _common.check_float_dtype(where, "param_dtype", self.param_dtype)
        _common.check_float_dtype(where, "dtype", self.dtype)
        _common.check_rank(where, self.rank, in_shape, out_shape)
        if self.kernel_axes is not None and len(self.kernel_axes) != len(in_shape) + len(out_shape):
            raise ValueError(
                f"{where}: kernel_axes={tuple(self.kernel_axes)} must name every kernel axis "
                f"(*in, *features) = {in_shape + out_shape}"
            )

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        """Apply ``x ⋅ kernel + s · (x ⋅ lora_a) ⋅ lora_b + bias`` to ``inputs``.

        Args:
          inputs: array whose ``axis`` axes have the input sizes ``in``.

        Returns:
          An array with the non-contracted axes of ``inputs`` followed by ``features``.
        """
        inputs = jnp.asarray(inputs)
        axes = _common.normalize_axes(self.axis, inputs.ndim)
        features = _common.as_shape(self.features)
        in_shape = tuple(inputs.shape[ax] for ax in axes)
        self._check(in_shape, features)
        m, n, r = math.prod(in_shape), math.prod(features), self.rank
        in_names = out_names = None
        if self.kernel_axes is not None:
            in_names = tuple(self.kernel_axes[: len(in_shape)])
            out_names = tuple(self.kernel_axes[len(in_shape) :])

        a_init = self.lora_a_init or _common.default_lora_a_init(self.init_mode, 1)
        b_init = self.lora_b_init or _common.default_lora_b_init(self.init_mode)
        a_names = None if in_names is None else (*in_names, None)
        b_names = None if out_names is None else (None, *out_names)
        lora_a = self.param(
            "lora_a",
            _partitioned(_reshaping(a_init, (m, r)), a_names),
            (*in_shape, r),
            self.param_dtype,
        )
        lora_b = self.param(
            "lora_b",
            _partitioned(_reshaping(b_init, (r, n)), b_names),
            (r, *features),
            self.param_dtype,
        )
        kernel = bias = None
        if self.init_mode == "standard":
            kernel = self.param(
                "kernel",
                _partitioned(_reshaping(self.kernel_init, (m, n)), self.kernel_axes),
                in_shape + features,
                self.param_dtype,
            )
        if self.use_bias:
            bias = self.param(
                "bias",
                _partitioned(_reshaping(self.bias_init, (n,)), out_names),
                features,
                self.param_dtype,
            )
        if self.freeze_base:
            kernel, bias = jax.lax.stop_gradient((kernel, bias))

        inputs, kernel, lora_a, lora_b, bias = promote_dtype(
            inputs, kernel, lora_a, lora_b, bias, dtype=self.dtype
        )
        y = _common.lora_apply(inputs, axes, lora_a, lora_b, self.precision)
        scale = self.lora_scale
        if scale != 1.0:
            y = y * jnp.asarray(scale, y.dtype)
        if kernel is not None:
            contract = (axes, tuple(range(len(axes))))
            y = y + jax.lax.dot_general(
                inputs, kernel, (contract, ((), ())), precision=self.precision
            )
        if bias is not None:
            y = y + jnp.reshape(bias, (1,) * (y.ndim - len(features)) + features)
        return y


class LoRADense(LoRADenseGeneral):
    """``nn.Dense`` with a LoRA adapter: ``kernel (in, features)``, ``lora_a (in, r)``,
    ``lora_b (r, features)``, over the last input axis.

    Same attributes as ``LoRADenseGeneral`` with an int ``features`` (leave
    ``axis`` at -1). Its ``kernel``/``bias`` have ``nn.Dense``'s names and shapes,
    so a pretrained ``nn.Dense`` tree loads into it and a merged tree loads back.
    """

    features: int  # type: ignore[assignment]


def lora_scales(
    model: nn.Module,
    *init_args: Any,
    rngs: Any = None,
    method: Callable[..., Any] | str | None = None,
    **init_kwargs: Any,
) -> dict[tuple[str, ...], float]:
    """``{module path: s}`` of every LoRA layer that ``model.init(rngs, *init_args)`` calls.

    Runs ``model.init`` under ``jax.eval_shape`` (no FLOPs, no memory) with a
    method interceptor that records each ``LoRADenseGeneral``'s scope path and
    ``s = α/r``. Paths are the layers' paths in the ``params`` collection (a
    layer inside ``nn.scan``/``nn.remat``/``nn.vmap`` keeps its path).

    Args:
      model: an unbound Linen module.
      *init_args: example inputs, as for ``model.init`` (arrays or
        ``jax.ShapeDtypeStruct``).
      rngs: the ``rngs`` of ``model.init`` (default: ``jax.random.key(0)``;
        never used for values).
      method: passed to ``model.init``.
      **init_kwargs: passed to ``model.init``.
    """
    found: dict[tuple[str, ...], float] = {}

    def interceptor(next_fun: Any, args: Any, kwargs: Any, context: Any) -> Any:
        module = context.module
        if isinstance(module, LoRADenseGeneral) and context.method_name == "__call__":
            assert module.scope is not None
            found[tuple(module.scope.path)] = module.lora_scale
        return next_fun(*args, **kwargs)

    keys = jax.random.key(0) if rngs is None else rngs
    with nn.intercept_methods(interceptor):
        jax.eval_shape(lambda: model.init(keys, *init_args, method=method, **init_kwargs))
    return found


def lora_scale_fn(
    model: nn.Module,
    *init_args: Any,
    default: float | None = None,
    rngs: Any = None,
    method: Callable[..., Any] | str | None = None,
    **init_kwargs: Any,
) -> LoRAScaleMap:
    """The ``lora_scale`` callable for ``lora_muon``: pair name -> ``s = α/r`` of its layer.

    Example::

        model = MyModel()                       # uses LoRADense(..., rank=8, alpha=16)
        params = model.init(key, x)["params"]
        tx = lora_muon(0.1, lora_scale=lora_scale_fn(model, x))

    Args:
      model, *init_args, rngs, method, **init_kwargs: as in ``lora_scales``.
      default: the scale of pairs no ``LoRADenseGeneral`` owns (e.g. qwix's:
        ``alpha/rank``); ``None`` makes such pairs raise a ``KeyError``.
    """
    scales = lora_scales(model, *init_args, rngs=rngs, method=method, **init_kwargs)
    return LoRAScaleMap(scales, default=default)


__getattr__ = _deprecation.renamed(
    __name__,
    {
        "LoraDense": ("LoRADense", LoRADense),
        "LoraDenseGeneral": ("LoRADenseGeneral", LoRADenseGeneral),
        "LoraScaleMap": ("LoRAScaleMap", LoRAScaleMap),
    },
)
