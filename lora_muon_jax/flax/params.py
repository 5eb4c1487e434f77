"""LoRA on parameter *trees* (Linen, qwix, ``nnx.state`` dicts): labels, loading, merging.

Pure functions on nested dicts; no module is touched (NNX in-place surgery is
``lora_muon_jax.flax.surgery``):

* ``lora_labels(params)``: ``'lora'`` for factors, ``'frozen'`` for the rest, for
  ``optax.partition({'lora': lora_muon(...), 'frozen': optax.set_to_zero()}, labels)``.
* ``load_pretrained(params, pretrained)``: copy a pretrained (plain) tree's
  weights into a freshly initialised LoRA tree (the factors keep their init).
* ``qwix_lora_scale(rules)``: the ``lora_scale`` callable for qwix-made pairs
  (``alpha / rank`` of the first ``LoraRule`` whose ``module_path`` matches).
* ``merge_lora_params(params, lora_scale)`` -> a tree without factors whose
  kernels are ``W_pre + s · lora_a ⋅ lora_b`` (loads into the plain model:
  ``LoRADense`` -> ``nn.Dense``); ``unmerge_lora_params(merged, params, lora_scale)``
  recovers the adapted tree. Works on trees of this package's layers, qwix's
  (``kernel_lora_a``/``kernel_lora_b`` next to ``kernel``) and ``nnx.state``
  dicts of ``nnx.LoRA``/``nnx.LoRALinear``; stacked (``nn.scan``) layers merge
  per layer. Pairs are located by their structured paths (``LoRAPair.a_path``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax.core import unfreeze

from lora_muon_jax import _pairs
from lora_muon_jax.flax import _common

__all__ = [
    "load_pretrained",
    "lora_labels",
    "merge_lora_params",
    "qwix_lora_scale",
    "unmerge_lora_params",
]

Path = tuple[str, ...]
LoRAScaleArg = float | Callable[[Any], float]


def lora_labels(
    params: Any,
    *,
    lora_label: str = "lora",
    frozen_label: str = "frozen",
    dimension_numbers: _pairs.DimensionNumbersArg = None,
) -> Any:
    """Label each leaf ``lora_label`` (a LoRA factor) or ``frozen_label`` (everything else).

    For ``optax.partition({'lora': lora_muon(...), 'frozen': optax.set_to_zero()},
    lora_labels(params))``: only the factors train, base weights stay
    bit-identical. Pairs are found as ``lora_muon`` finds them (pass it the
    same ``dimension_numbers``).

    Raises:
      ValueError: ``params`` holds no LoRA pair (nothing would train), or a
        lone/mismatched factor (from ``find_lora_pairs``).
    """
    pairs = _pairs.find_lora_pairs(params, dimension_numbers=dimension_numbers)
    if not pairs:
        shapes = jax.tree_util.tree_map_with_path(
            lambda p, x: f"{jax.tree_util.keystr(p)}: {jnp.shape(x)}", params
        )
        shown = ", ".join(jax.tree.leaves(shapes)[:10])
        raise ValueError(
            f"lora_labels: no LoRA factor pairs (lora_a/lora_b, <name>_lora_a/_b, lora/{{a,b}}) "
            f"in params; leaves: {shown}"
        )
    return _pairs.lora_param_labels(
        params, dimension_numbers=dimension_numbers, lora_label=lora_label, other_label=frozen_label
    )


def _flat(tree: Any) -> dict[Path, Any]:
    tree = unfreeze(tree) if not isinstance(tree, dict) else tree
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {_pairs.normalized_path(p): v for p, v in leaves}


def _nested(flat: Mapping[Path, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path, value in flat.items():
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return out


def load_pretrained(params: Any, pretrained: Any) -> dict[str, Any]:
    """``params`` (a fresh LoRA tree) with every leaf of ``pretrained`` copied in.

    ``pretrained`` is the plain model's tree (``nn.Dense`` kernels and biases,
    norms, embeddings); every one of its leaves must exist in ``params`` with the
    same shape and dtype. LoRA factors (absent from ``pretrained``) keep their
    init. Returns a nested dict.

    Raises:
      ValueError: a pretrained leaf with no counterpart or another shape/dtype.
    """
    flat, old = _flat(params), _flat(pretrained)
    for path, value in old.items():
        if path not in flat:
            raise ValueError(
                f"load_pretrained: pretrained leaf {'/'.join(path)} {jnp.shape(value)} has no "
                "counterpart in the LoRA params (are the module names the same?)"
            )
        have = flat[path]
        if jnp.shape(have) != jnp.shape(value) or jnp.result_type(have) != jnp.result_type(value):
            raise ValueError(
                f"load_pretrained: {'/'.join(path)}: pretrained {jnp.shape(value)} "
                f"{jnp.result_type(value)} vs LoRA params {jnp.shape(have)} {jnp.result_type(have)}"
            )
        flat[path] = value
    return _nested(flat)


def _pair_paths(pair: _pairs.LoRAPair) -> tuple[Path, Path]:
    return pair.a_path, pair.b_path


def _base_candidates(a_path: Path) -> list[Path]:
    """Where the base weight of the pair whose ``lora_a`` is at ``a_path`` can be."""
    *parent, leaf = a_path
    par = tuple(parent)
    if leaf == "lora_a":
        out = [(*par, "kernel"), (*par, "base_module", "kernel")]
        if par and par[-1] == "lora":
            out.append((*par[:-1], "kernel"))  # nnx.LoRALinear: kernel next to its `lora` child
        return out
    if leaf.endswith("_lora_a"):
        return [(*par, leaf.removesuffix("_lora_a"))]  # qwix: kernel_lora_a -> kernel
    return []


def _scale(lora_scale: LoRAScaleArg, pair: _pairs.LoRAPair) -> float:
    return float(lora_scale(pair.name) if callable(lora_scale) else lora_scale)


def _product(a: jax.Array, b: jax.Array, pair: _pairs.LoRAPair, where: str) -> jax.Array:
    """``lora_a ⋅ lora_b`` (float32), batch axes in front; they must lead both factors."""
    if not pair.leading_batch_axes:
        raise ValueError(
            f"{where}: merging needs the batch (stacked-layer) axes to lead both factors, got "
            f"lora_a batch axes {pair.dims.a_batch_axes} of {pair.a_shape} and lora_b batch axes "
            f"{pair.dims.b_batch_axes} of {pair.b_shape} (e.g. MaxText's scanned layout); move "
            "them to the front of the factors and the kernel first"
        )
    return _common.lora_product(a, b, len(pair.batch_shape))


def _delta(
    a: jax.Array, b: jax.Array, pair: _pairs.LoRAPair, kernel_shape: tuple[int, ...], where: str
) -> jax.Array:
    """``lora_a ⋅ lora_b`` (float32) in ``kernel_shape``."""
    dims = pair.dims
    nb = len(pair.batch_shape)
    if dims.a_rank_axis not in (-1, a.ndim - nb - 1) or dims.b_rank_axis != 0:
        raise ValueError(
            f"{where}: merging needs the flax layout (lora_a rank axis last, lora_b rank axis "
            f"first), got {dims}"
        )
    delta = _product(a, b, pair, where)
    if delta.shape != kernel_shape:
        if delta.size != math.prod(kernel_shape) or delta.shape[:nb] != kernel_shape[:nb]:
            raise ValueError(
                f"{where}: lora_a {a.shape} ⋅ lora_b {b.shape} has shape {delta.shape}, which "
                f"does not fit the base kernel {kernel_shape}"
            )
        delta = delta.reshape(kernel_shape)  # qwix's flattened (batch, in, r) factors
    return delta


def merge_lora_params(
    params: Any,
    lora_scale: LoRAScaleArg = 1.0,
    *,
    dimension_numbers: _pairs.DimensionNumbersArg = None,
) -> dict[str, Any]:
    """Fold every LoRA pair into its base kernel and drop the factors: the plain model's tree.

    ``kernel ← kernel + s · lora_a ⋅ lora_b`` (float32 math, the kernel's dtype
    out), per layer for stacked (``nn.scan``) pairs; a pair without a kernel
    (``init_mode="native"``) gets ``kernel = s · lora_a ⋅ lora_b``. The base kernel
    of ``.../lora_a`` is ``.../kernel`` (this package, ``nnx.LoRA`` with a
    ``base_module``, ``nnx.LoRALinear``), of ``.../<name>_lora_a`` ``.../<name>``
    (qwix).

    Args:
      params: the adapted tree (unboxed: ``nn.unbox`` it first if partitioned).
      lora_scale: ``s``, a number or ``f(pair_name) -> s`` (e.g. ``lora_scale_fn(...)``:
        the same callable the optimizer takes).
      dimension_numbers: the pairs' layout, as ``find_lora_pairs`` takes it (e.g.
        ``lora_dimension_numbers_fn(model)``); batch axes must lead both factors.

    Returns:
      A nested dict without LoRA factors, e.g. the ``params`` of ``nn.Dense``
      layers where the model had ``LoRADense``.
    """
    flat = _flat(params)
    out = dict(flat)
    for pair in _pairs.find_lora_pairs(params, dimension_numbers=dimension_numbers):
        a_path, b_path = _pair_paths(pair)
        where = f"merge_lora_params: pair {pair.name}"
        a, b = jnp.asarray(flat[a_path]), jnp.asarray(flat[b_path])
        base = next((p for p in _base_candidates(a_path) if p in flat), None)
        s = jnp.float32(_scale(lora_scale, pair))
        if base is None:
            if not a_path[-1] == "lora_a":
                raise ValueError(f"{where}: no base weight found at {_base_candidates(a_path)}")
            delta = _product(a, b, pair, where)
            out[(*a_path[:-1], "kernel")] = (s * delta).astype(a.dtype)
        else:
            kernel = jnp.asarray(flat[base])
            delta = _delta(a, b, pair, kernel.shape, where)
            out[base] = (kernel.astype(jnp.float32) + s * delta).astype(kernel.dtype)
        del out[a_path], out[b_path]
    return _nested(out)


def unmerge_lora_params(
    merged: Any,
    params: Any,
    lora_scale: LoRAScaleArg = 1.0,
    *,
    dimension_numbers: _pairs.DimensionNumbersArg = None,
) -> dict[str, Any]:
    """Invert ``merge_lora_params``: the adapted tree, with its kernels recovered from ``merged``.

    ``kernel = merged kernel − s · lora_a ⋅ lora_b`` with the factors of
    ``params`` (the adapted tree: it gives the structure and the factors; its
    kernel values are not used); every other leaf comes from ``merged``. A pair
    without a kernel in ``params`` (native init) drops the merged kernel.
    Exact up to the float rounding of the kernel's dtype. ``dimension_numbers``:
    as in ``merge_lora_params``.

    Raises:
      ValueError: a leaf of ``params`` missing from ``merged`` or of another shape.
    """
    flat_m, flat_p = _flat(merged), _flat(params)
    out: dict[Path, Any] = {}
    pairs = _pairs.find_lora_pairs(params, dimension_numbers=dimension_numbers)
    factor_paths: set[Path] = set()
    for pair in pairs:
        factor_paths.update(_pair_paths(pair))
    for path, value in flat_p.items():
        if path in factor_paths:
            out[path] = value
            continue
        if path not in flat_m or jnp.shape(flat_m[path]) != jnp.shape(value):
            got = jnp.shape(flat_m[path]) if path in flat_m else "missing"
            raise ValueError(
                f"unmerge_lora_params: leaf {'/'.join(path)} {jnp.shape(value)} of params is "
                f"{got} in merged"
            )
        out[path] = flat_m[path]
    for pair in pairs:
        a_path, b_path = _pair_paths(pair)
        where = f"unmerge_lora_params: pair {pair.name}"
        a, b = jnp.asarray(flat_p[a_path]), jnp.asarray(flat_p[b_path])
        base = next((p for p in _base_candidates(a_path) if p in flat_p), None)
        if base is None:
            continue  # native: the adapted tree has no kernel; the merged one is dropped
        kernel = jnp.asarray(out[base])
        s = jnp.float32(_scale(lora_scale, pair))
        delta = _delta(a, b, pair, kernel.shape, where)
        out[base] = (kernel.astype(jnp.float32) - s * delta).astype(kernel.dtype)
    return _nested(out)


def qwix_lora_scale(rules: Any) -> Callable[[str], float]:
    """``lora_scale`` for qwix-made pairs: ``alpha / rank`` of the rule that made each pair.

    qwix scales every adapter by ``alpha / rank`` of the first ``LoraRule`` whose
    ``module_path`` regex fully matches the layer's ``'/'``-joined path. This
    callable does the same from the pair name (``['params']['blocks']['mlp']
    ['kernel_lora_{a,b}']`` -> ``'blocks/mlp'``; a leading ``'params'`` key is
    dropped). With one rule it is the constant ``alpha / rank``.

    Args:
      rules: the ``qwix.LoraRule`` list given to ``qwix.LoraProvider(rules)``
        (any objects with ``module_path``, ``rank`` and ``alpha``).

    Returns:
      ``f(pair) -> alpha / rank`` (a ``LoRAPair``, its ``PairName`` or a module
      path tuple); raises a ``KeyError`` for a pair no rule
      matches. Rules' ``op_names`` are not consulted: give rules that differ in
      scale distinct ``module_path`` patterns.
    """
    rules = list(rules)
    for rule in rules:
        if not all(hasattr(rule, a) for a in ("module_path", "rank", "alpha")):
            raise TypeError(f"qwix_lora_scale: {rule!r} is not a qwix LoraRule")
    compiled = [(re.compile(rule.module_path), float(rule.alpha) / rule.rank) for rule in rules]

    def scale(pair: Any) -> float:
        path = _pairs.module_path_of(pair)
        if path and path[0] == "params":
            path = path[1:]
        joined = "/".join(path)
        for regex, value in compiled:
            if regex.fullmatch(joined):
                return value
        raise KeyError(
            f"qwix_lora_scale: no rule matches the module path {joined!r} of pair {pair} "
            f"(rules: {[rule.module_path for rule in rules]})"
        )

    return scale
