"""``LoRAAdapter``: a LoRA adapter around an existing ``nnx.Linear``/``nnx.Einsum`` layer.

Public as ``lora_muon_jax.flax.nnx.LoRAAdapter``; ``lora_muon_jax.flax.surgery.lorafy``
builds these.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn.dtypes import promote_dtype

from lora_muon_jax.flax import _common
from lora_muon_jax.flax._einsum import EinsumLoRASpec, einsum_lora_spec
from lora_muon_jax.flax._nnx_init import batched_init, flat_init, flax_names, sharding_metadata

Initializer = Callable[..., jax.Array]


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
            **sharding_metadata(
                None if a_names is None else (*a_names, None), a_metadata, self.lora_scale
            ),
        )
        self.lora_b = lora_param_type(
            batched_init(b_init, rngs.params(), batch_shape, spec.b_shape[nb:], dtype),
            **sharding_metadata(
                None if b_names is None or out_names is None else (*b_names, None, *out_names),
                b_metadata,
                self.lora_scale,
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
