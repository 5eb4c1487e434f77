"""Sharding helpers for LoRA-Muon: optimizer-state shardings and a long-axis policy.

LoRA-Muon's step on a pair ``A (m×r)``, ``B (n×r)`` touches the tall axes m and
n only through r×r Grams (``AᵀA``, ``BᵀB``, ``M_AᵀM_A``, ``M_BᵀM_B``) and the
local products ``M K``. With the tall axes sharded over a mesh and the rank
axis kept whole, the whole update needs one all-reduce of r×r partial Grams per
group of mesh axes the factors are sharded over (XLA fuses all adapters' Grams
into it); the factors are never gathered. The math kernels name no mesh axes:
everything here takes the shardings or the axis names as arguments.

* ``optimizer_state_shardings(tx, param_shardings)``: the shardings of
  ``tx.init(params)``, every param-shaped piece of state (momenta, AdamW
  moments) following its parameter, scalars (``count``) replicated; built on
  ``optax.tree.map_params``. ``init_sharded`` runs ``tx.init`` under ``jax.jit``
  with those ``out_shardings``.
* ``long_axis_partition_specs(params, axis_name, axis_size)``: an FSDP policy
  that shards the longest divisible non-rank axis of every LoRA factor (and of
  every other leaf) over one mesh axis; the rank axis is never sharded.
* checking what a compiled step communicates: ``lora_muon_jax.testing.hlo_collectives``.

Import explicitly: ``from lora_muon_jax import sharding`` (jax and optax only).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import optax
from jax.sharding import NamedSharding, PartitionSpec

from lora_muon_jax import _pairs, _views

__all__ = [
    "init_sharded",
    "long_axis_partition_specs",
    "optimizer_state_shardings",
    "param_shardings",
]


def param_shardings(params: Any) -> Any:
    """The ``.sharding`` of every leaf (``jax.Array`` or ``ShapeDtypeStruct``).

    Raises:
      ValueError: naming the path of a leaf that carries no sharding.
    """

    def leaf_sharding(path: Any, x: Any) -> jax.sharding.Sharding:
        sharding = getattr(x, "sharding", None)
        if sharding is None:
            raise ValueError(
                f"param_shardings: leaf {jax.tree_util.keystr(path)} "
                f"({getattr(x, 'shape', '?')}) has no sharding; pass shardings explicitly"
            )
        return sharding

    return jax.tree_util.tree_map_with_path(leaf_sharding, params)


def _first_mesh(shardings: Any) -> jax.sharding.Mesh | jax.sharding.AbstractMesh | None:
    for s in jax.tree.leaves(shardings):
        if isinstance(s, NamedSharding):
            return s.mesh
    return None


def optimizer_state_shardings(
    tx: optax.GradientTransformation,
    params: Any,
    shardings: Any = None,
    *,
    non_param_sharding: jax.sharding.Sharding | None = None,
) -> Any:
    """Shardings for ``tx.init(params)`` that follow the parameters' shardings.

    Every copy of the parameter tree inside the state (LoRA-Muon's momenta, the
    fallback AdamW's ``mu``/``nu``, ``optax.partition``'s masked copies, whose
    ``optax.MaskedNode`` holes are kept) gets the sharding of its parameter, so
    a factor sharded along its long axis keeps its momentum on the same devices
    and nothing param-sized is replicated. Everything else (step counters,
    scalars) gets ``non_param_sharding``: default, replicated on the mesh of the
    first ``NamedSharding`` in ``shardings`` (or their one sharding, if all are
    equal, e.g. a ``SingleDeviceSharding``).

    Built on ``optax.tree.map_params`` (which calls ``tx.init`` on a leafless
    placeholder to find the param-shaped parts; ``lora_muon`` supports it).

    Args:
      tx: the optimizer (anything with ``init``).
      params: the parameters, as arrays or ``jax.ShapeDtypeStruct`` (only
        shapes and dtypes are read; ``tx.init`` runs under ``jax.eval_shape``).
      shardings: a tree with the params' structure whose leaves are
        ``jax.sharding.Sharding``s; default ``param_shardings(params)``.
      non_param_sharding: sharding of non-parameter state leaves.

    Returns:
      A tree with the structure of ``tx.init(params)`` whose leaves are
      shardings (``MaskedNode`` where the state has one): pass it as
      ``out_shardings`` of ``jax.jit(tx.init)`` or as the state's
      ``in_shardings``/``out_shardings`` of a training step.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jax.sharding import NamedSharding, PartitionSpec as P
      >>> from lora_muon_jax import lora_muon
      >>> from lora_muon_jax.sharding import optimizer_state_shardings
      >>> mesh = jax.make_mesh((1,), ("fsdp",))
      >>> params = {"lora_a": jnp.ones((8, 2)), "lora_b": jnp.zeros((2, 4))}
      >>> shardings = {"lora_a": NamedSharding(mesh, P("fsdp", None)),
      ...              "lora_b": NamedSharding(mesh, P(None, "fsdp"))}
      >>> state_shardings = optimizer_state_shardings(lora_muon(0.1), params, shardings)
      >>> state_shardings.inner_states["lora"].inner_state[0].mu["lora_a"].spec
      P('fsdp', None)
    """
    if shardings is None:
        shardings = param_shardings(params)
    if non_param_sharding is None:
        mesh = _first_mesh(shardings)
        distinct = set(jax.tree.leaves(shardings))
        if mesh is not None:
            non_param_sharding = NamedSharding(mesh, PartitionSpec())
        elif len(distinct) == 1:  # e.g. everything on one device
            (non_param_sharding,) = distinct
        else:
            raise ValueError(
                "optimizer_state_shardings: no NamedSharding in `shardings` to take the "
                "mesh from; pass non_param_sharding"
            )
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    state = jax.eval_shape(tx.init, abstract)

    def is_hole(x: Any) -> bool:
        return isinstance(x, optax.MaskedNode)

    def follow(state_leaf: Any, sharding: Any) -> Any:
        return state_leaf if is_hole(state_leaf) else sharding

    def replicate(subtree: Any) -> Any:
        return jax.tree.map(
            lambda x: x if is_hole(x) else non_param_sharding, subtree, is_leaf=is_hole
        )

    return optax.tree.map_params(
        tx, follow, state, shardings, transform_non_params=replicate, is_leaf=is_hole
    )


def init_sharded(tx: optax.GradientTransformation, params: Any, shardings: Any = None) -> Any:
    """``tx.init(params)`` under ``jax.jit`` with state shardings that follow the params'.

    Args:
      tx: the optimizer.
      params: the (sharded) parameters.
      shardings: their shardings (default: read from ``params``).

    Returns:
      The optimizer state, each param-shaped piece laid out like its parameter,
      every other leaf replicated.
    """
    out = optimizer_state_shardings(tx, params, shardings)
    return jax.jit(tx.init, out_shardings=out)(params)


def _largest_divisible_axis(
    shape: Sequence[int], candidates: Sequence[int], axis_size: int
) -> int | None:
    best = None
    for axis in candidates:
        if shape[axis] % axis_size == 0 and shape[axis] >= axis_size:
            if best is None or shape[axis] > shape[best]:
                best = axis
    return best


def long_axis_partition_specs(
    params: Any,
    axis_name: str | tuple[str, ...],
    axis_size: int,
    *,
    pair_rule: _pairs.PairRule | None = None,
    dimension_numbers: _pairs.DimensionNumbersArg = None,
    shard_other_leaves: bool = True,
) -> Any:
    """FSDP policy: shard the longest divisible non-rank axis of each LoRA factor.

    For a factor ``lora_a (*batch, *in, r)`` or ``lora_b (*batch, r, *out)`` the
    candidate axes are the non-batch, non-rank ones (m or n); the longest one
    whose size is a multiple of ``axis_size`` is sharded over ``axis_name``.
    The rank axis and the batch (stacked-layer) axes are never sharded: the
    LoRA-Muon step then needs only r×r all-reduces. Other leaves get the same
    rule over all their axes (``shard_other_leaves``) or stay replicated.
    Leaves with no divisible axis stay replicated.

    Args:
      params: the parameter tree (arrays or ``ShapeDtypeStruct``).
      axis_name: the mesh axis (or axes) to shard over; nothing is assumed.
      axis_size: the product of those mesh axes' sizes.
      pair_rule: passed to ``find_lora_pairs``.
      dimension_numbers: passed to ``find_lora_pairs``.
      shard_other_leaves: shard non-LoRA leaves too.

    Returns:
      A tree of ``PartitionSpec`` with the params' structure.
    """
    if axis_size < 1:
        raise ValueError(f"axis_size must be >= 1, got {axis_size=}")
    rule = pair_rule if pair_rule is not None else _pairs.default_pair_rule
    resolved = _pairs.resolve_pairs(params, rule, dimension_numbers)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    candidates: list[list[int] | None] = [None] * len(leaves)
    for pair in resolved.pairs:
        roles: tuple[tuple[int, _pairs.Role], ...] = ((pair.a_index, "a"), (pair.b_index, "b"))
        for index, role in roles:
            ndim = len(leaves[index].shape)
            # batch axes may sit anywhere (MaxText's layer axis is inside both factors)
            skip = {_views.rank_axis_of(pair, role, ndim), *_views.batch_axes_of(pair, role)}
            candidates[index] = [ax for ax in range(ndim) if ax not in skip]
    specs = []
    for leaf, cand in zip(leaves, candidates, strict=True):
        shape = tuple(leaf.shape)
        if cand is None:
            cand = list(range(len(shape))) if shard_other_leaves else []
        axis = _largest_divisible_axis(shape, cand, axis_size)
        entries: list[Any] = [None] * len(shape)
        if axis is not None:
            entries[axis] = axis_name
        specs.append(PartitionSpec(*entries))
    return jax.tree_util.tree_unflatten(treedef, specs)


def __getattr__(name: str) -> object:
    # The HLO parser moved to lora_muon_jax.testing (it serves tests and benchmarks).
    if name in ("hlo_collectives", "Collective"):
        import warnings

        from lora_muon_jax import testing

        warnings.warn(
            f"lora_muon_jax.sharding.{name} moved to lora_muon_jax.testing.{name}; the old "
            "location will be removed in the next release",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(testing, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
