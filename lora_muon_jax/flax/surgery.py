"""NNX model surgery for LoRA finetuning: add adapters, train only them, merge them for export.

In place, on modules (tree-level labels, loading and merging: ``lora_muon_jax.flax.params``,
whose functions this module re-exports for compatibility):

* ``lorafy(model, pattern, rank=..., alpha=..., rngs=...)`` replaces every
  ``nnx.Linear``/``nnx.Einsum`` whose path (``'/'``-joined, as qwix's
  ``module_path``) fully matches the regex ``pattern`` by a ``LoRAAdapter``
  that keeps the pretrained layer as ``base_module``. Train with
  ``nnx.Optimizer(model, lora_muon(..., lora_scale=lora_scale_fn(model)), wrt=nnx.LoRAParam)``;
  on stacked (``nnx.vmap``/``nnx.scan``) layers also pass
  ``dimension_numbers=lora_dimension_numbers_fn(model)`` (needed when layers == rank).
* ``merge_lora(model)`` folds ``s · lora_a ⋅ lora_b`` into each base kernel and
  switches the adapter off; ``unmerge_lora(model)`` undoes it;
  ``merge_lora(model, remove_adapters=True)`` also puts the base layers back
  (the original architecture, for export).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lora_muon_jax.flax import _common
from lora_muon_jax.flax.nnx import LoRAAdapter, LoRALinearGeneral

__all__ = [
    "load_pretrained",
    "lora_labels",
    "lorafy",
    "merge_lora",
    "merge_lora_params",
    "qwix_lora_scale",
    "unmerge_lora",
    "unmerge_lora_params",
]

Path = tuple[str, ...]
LoRAScaleArg = float | Callable[[str], float]


# ---------------------------------------------------------------------------
# NNX: add adapters
# ---------------------------------------------------------------------------


def _path_str(path: tuple[Any, ...]) -> str:
    return "/".join(str(k) for k in path)


def _is_attribute(parent: Any, key: Any) -> bool:
    return isinstance(parent, nnx.Module) and isinstance(key, str) and hasattr(parent, key)


def _get_child(parent: Any, key: Any) -> Any:
    if _is_attribute(parent, key):
        return getattr(parent, key)
    return parent[key]  # nnx.List / dict children


def _set_child(parent: Any, key: Any, value: Any) -> None:
    if _is_attribute(parent, key):
        setattr(parent, key, value)
    else:
        parent[key] = value


def _replace(model: nnx.Module, path: tuple[Any, ...], new: Any) -> None:
    parent: Any = model
    for key in path[:-1]:
        parent = _get_child(parent, key)
    _set_child(parent, path[-1], new)


def _adaptable(model: nnx.Module) -> list[tuple[tuple[Any, ...], nnx.Module]]:
    """``nnx.Linear``/``nnx.Einsum`` layers not already LoRA (not under an adapter)."""
    modules = list(nnx.iter_modules(model))
    adapted = [p for p, m in modules if isinstance(m, LoRAAdapter | nnx.LoRA)]
    out = []
    for path, module in modules:
        if not isinstance(module, nnx.Linear | nnx.Einsum) or isinstance(module, nnx.LoRALinear):
            continue
        if any(path[: len(a)] == a for a in adapted):
            continue
        out.append((path, module))
    return out


def lorafy(
    model: nnx.Module,
    pattern: str,
    *,
    rank: int,
    alpha: float | None = None,
    param_dtype: Any = None,
    lora_a_init: Callable[..., jax.Array] | None = None,
    lora_b_init: Callable[..., jax.Array] | None = None,
    rngs: nnx.Rngs,
) -> nnx.Module:
    """Wrap the ``nnx.Linear``/``nnx.Einsum`` layers matching ``pattern`` in ``LoRAAdapter``s.

    In place: each matching layer (its ``'/'``-joined path fully matches the
    regex ``pattern``, e.g. ``'.*attn/(q|v)'``, ``'blocks/\\d+/mlp/.*'``) is
    replaced by ``LoRAAdapter(layer, lora_rank=rank, alpha=alpha, rngs=rngs)``; the
    layer's kernel and bias are kept bit-for-bit as ``nnx.Param`` and, with the
    standard init (``lora_b = 0``), the model's outputs are unchanged.

    Args:
      model: the (pretrained) NNX model, modified in place.
      pattern: regex over layer paths (``re.fullmatch``).
      rank: r of every adapter (checked against each kernel: r <= min(in, out)).
      alpha: α of ``s = α/r`` (``None``: ``s = 1``).
      param_dtype: factors' dtype (default: each kernel's).
      lora_a_init, lora_b_init: factor initializers (see ``LoRAAdapter``).
      rngs: ``nnx.Rngs`` for the factors.

    Returns:
      ``model`` (modified in place).

    Raises:
      ValueError: ``pattern`` matches no ``nnx.Linear``/``nnx.Einsum`` (the
        message lists the paths it could match), or a bad rank.
      TypeError: a non-float ``param_dtype``.
    """
    regex = re.compile(pattern)
    candidates = _adaptable(model)
    chosen = [(p, m) for p, m in candidates if regex.fullmatch(_path_str(p))]
    if not chosen:
        shown = ", ".join(repr(_path_str(p)) for p, _ in candidates[:20]) or "none"
        raise ValueError(
            f"lorafy: pattern {pattern!r} matches no nnx.Linear/nnx.Einsum layer (re.fullmatch "
            f"on '/'-joined paths). Layers that can be adapted: {shown}"
        )
    adapters = []
    for path, module in chosen:  # build every adapter first: a bad layer changes nothing
        try:
            adapter = LoRAAdapter(
                module,
                lora_rank=rank,
                alpha=alpha,
                param_dtype=param_dtype,
                a_initializer=lora_a_init,
                b_initializer=lora_b_init,
                rngs=rngs,
            )
        except (ValueError, TypeError) as err:
            kernel_shape = tuple(module.kernel.shape)  # type: ignore[attr-defined]
            raise type(err)(
                f"lorafy: layer {_path_str(path)!r} (kernel {kernel_shape}): {err}"
            ) from err
        adapters.append((path, adapter))
    for path, adapter in adapters:
        _replace(model, path, adapter)
    return model


def _lora_modules(
    model: nnx.Module,
) -> list[tuple[tuple[Any, ...], LoRAAdapter | LoRALinearGeneral]]:
    return [
        (p, m) for p, m in nnx.iter_modules(model) if isinstance(m, LoRAAdapter | LoRALinearGeneral)
    ]


def _linear_general_delta(module: LoRALinearGeneral) -> jax.Array:
    """``s · lora_a ⋅ lora_b`` (float32); leading stacked (``nnx.vmap``) axes are batch axes."""
    lora_a = module.lora_a[...]
    num_batch_axes = lora_a.ndim - 1 - len(module.in_features)
    delta = _common.lora_product(lora_a, module.lora_b[...], num_batch_axes)
    return delta * jnp.float32(module.lora_scale)


def merge_lora(model: nnx.Module, *, remove_adapters: bool = False) -> nnx.Module:
    """Fold ``s · lora_a ⋅ lora_b`` into the base kernels of ``model``'s LoRA modules (in place).

    Each ``LoRAAdapter``/``LoRALinearGeneral`` gets ``kernel ← kernel + s · lora_a ⋅ lora_b``
    (computed in float32, stored in the kernel's dtype; a native-init layer
    gets a kernel) and stops adding its adapter, so outputs are unchanged up to
    rounding. ``unmerge_lora`` reverses it.

    Args:
      model: NNX model, modified in place.
      remove_adapters: also replace every ``LoRAAdapter`` by its (merged)
        ``base_module``: the original architecture, ready for export; the
        factors are dropped (cannot be unmerged).

    Returns:
      ``model``.
    """
    for path, module in _lora_modules(model):
        if not module.merged:
            if isinstance(module, LoRAAdapter):
                kernel = module.base_module.kernel  # type: ignore[attr-defined]
                kernel.set_value(
                    (kernel[...].astype(jnp.float32) + module.delta_kernel()).astype(kernel.dtype)
                )
            else:
                assert isinstance(module, LoRALinearGeneral)
                delta = _linear_general_delta(module)
                if module.kernel is None:
                    module.kernel = nnx.Param(delta.astype(module.lora_a.dtype))
                else:
                    kernel = module.kernel
                    kernel.set_value((kernel[...].astype(jnp.float32) + delta).astype(kernel.dtype))
            module.merged = True
        if remove_adapters and isinstance(module, LoRAAdapter):
            _replace(model, path, module.base_module)
    return model


def unmerge_lora(model: nnx.Module) -> nnx.Module:
    """Undo ``merge_lora`` (without ``remove_adapters``): subtract the adapters again, in place.

    The recovered kernels equal the pre-merge ones up to float rounding of the
    kernel's dtype (exactly when the products are exact); a native-init layer
    drops the kernel it got.
    """
    for _, module in _lora_modules(model):
        if not module.merged:
            continue
        if isinstance(module, LoRAAdapter):
            kernel = module.base_module.kernel  # type: ignore[attr-defined]
            kernel.set_value(
                (kernel[...].astype(jnp.float32) - module.delta_kernel()).astype(kernel.dtype)
            )
        else:
            assert isinstance(module, LoRALinearGeneral)
            if module.init_mode == "native":
                module.kernel = nnx.data(None)
            else:
                delta = _linear_general_delta(module)
                kernel = module.kernel
                assert kernel is not None
                kernel.set_value((kernel[...].astype(jnp.float32) - delta).astype(kernel.dtype))
        module.merged = False
    return model


# Tree-level helpers moved to lora_muon_jax.flax.params; kept importable from here.
from lora_muon_jax.flax.params import (  # noqa: E402
    load_pretrained as load_pretrained,
)
from lora_muon_jax.flax.params import lora_labels as lora_labels  # noqa: E402
from lora_muon_jax.flax.params import merge_lora_params as merge_lora_params  # noqa: E402
from lora_muon_jax.flax.params import qwix_lora_scale as qwix_lora_scale  # noqa: E402
from lora_muon_jax.flax.params import unmerge_lora_params as unmerge_lora_params  # noqa: E402
