"""Finding LoRA factor pairs in a parameter tree, by tree structure.

A pair is two sibling leaves that a *pair rule* maps to the same group with
roles ``"a"`` and ``"b"``. The default rule knows three layouts:

* ``lora_a`` / ``lora_b`` siblings: flax ``nnx.LoRA``, ``nnx.LoRALinear``
  (under its ``lora`` child) and this package's modules;
* ``<name>_lora_a`` / ``<name>_lora_b`` siblings: qwix
  (``kernel_lora_a``, ``kernel_lora_b``);
* ``lora: {a: ..., b: ...}``: gemma-style.

Key paths are read with nnx's trailing ``.value`` attribute dropped, so the
Variables ``nnx.Optimizer`` gives ``init`` and the arrays it gives ``update``
pair identically. ``optax.MaskedNode`` holes and leafless placeholders have no
leaves and are simply skipped.

Each ``LoRAPair`` carries its identity as structured paths (``PairName``);
nothing downstream parses a formatted name back.

Layout: ``x @ lora_a @ lora_b`` with ``lora_a (*batch, *in_axes, r)`` and
``lora_b (*batch, r, *out_axes)``, i.e. ``A = lora_a`` flattened to
``(m = prod(in_axes), r)`` and ``B = lora_bᵀ`` flattened to
``(n = prod(out_axes), r)``. Leading axes the two factors share (stacked or
scanned layers, dot_general batch dimensions) are batch axes: one independent
pair per index. ``LoRADimensionNumbers`` says where the rank axes are when a
tree uses another layout and fixes the batch axes when inference is ambiguous.

Each ``LoRAPair`` carries its identity as structured paths (``PairName``):
nothing downstream parses a formatted name back.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.tree_util import DictKey, FlattenedIndexKey, GetAttrKey, SequenceKey

from lora_muon_jax import _deprecation
from lora_muon_jax._views import Role as Role
from lora_muon_jax._views import from_math_layout as from_math_layout
from lora_muon_jax._views import from_matrix_view as from_matrix_view
from lora_muon_jax._views import math_views as math_views
from lora_muon_jax._views import to_math_layout as to_math_layout
from lora_muon_jax._views import to_matrix_view as to_matrix_view

PairRule = Callable[[tuple[str, ...]], "tuple[Hashable, Role] | None"]


class LoRADimensionNumbers(NamedTuple):
    """Where the axes of a pair's factors go in ``A (m×r)`` and ``B (n×r)``.

    Attributes:
      num_batch_axes: leading axes shared by both factors that index
        independent pairs (stacked/scanned layers). ``None``: infer it as the
        largest count of equal leading axes that leaves a valid pair.
      a_rank_axis: the rank axis of ``lora_a`` among its non-batch axes
        (flax/qwix: ``-1``). Its other non-batch axes flatten into m.
      b_rank_axis: the rank axis of ``lora_b`` among its non-batch axes
        (flax/qwix: ``0``). Its other non-batch axes flatten into n.

    Example: PyTorch-PEFT-style ``lora_A (r, in)``, ``lora_B (out, r)`` is
    ``LoRADimensionNumbers(a_rank_axis=0, b_rank_axis=-1)``.
    """

    num_batch_axes: int | None = None
    a_rank_axis: int = -1
    b_rank_axis: int = 0


DimensionNumbersArg = (
    LoRADimensionNumbers
    | Callable[[str, tuple[int, ...], tuple[int, ...]], LoRADimensionNumbers | None]
    | None
)


Path = tuple[str, ...]


def _common_prefix(a: Path, b: Path) -> Path:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


class PairName(str):
    """A pair's display name that carries its structured identity.

    It *is* the string ``find_lora_pairs`` always printed (e.g.
    ``"['block']['attn']['kernel_lora_{a,b}']"``), so ``lora_scale=f(name)``
    callables written for strings keep working, and it carries what code needs
    instead of parsing that string back: ``group`` (the pair rule's key),
    ``a_path`` / ``b_path`` (the factors' key paths, nnx's ``.value`` dropped)
    and ``module_path`` (their common prefix: the module that owns the pair).
    """

    group: Hashable
    a_path: Path
    b_path: Path

    def __new__(cls, text: str, *, group: Hashable, a_path: Path, b_path: Path) -> PairName:
        self = super().__new__(cls, text)
        self.group, self.a_path, self.b_path = group, tuple(a_path), tuple(b_path)
        return self

    @property
    def module_path(self) -> Path:
        return _common_prefix(self.a_path, self.b_path)

    def __reduce__(self) -> tuple[Any, ...]:  # keep the fields through pickling
        return (_make_pair_name, (str(self), self.group, self.a_path, self.b_path))


def _make_pair_name(text: str, group: Hashable, a_path: Path, b_path: Path) -> PairName:
    return PairName(text, group=group, a_path=a_path, b_path=b_path)


def module_path_of(pair: Any) -> Path:
    """The owning module's key path of a ``LoRAPair``, a ``PairName`` or a key-path tuple.

    A plain string is refused: names are for display, and parsing one back
    would break on any custom ``pair_rule``.
    """
    path = getattr(pair, "module_path", None)
    if path is not None:
        return tuple(path)
    if isinstance(pair, tuple) and all(isinstance(k, str) for k in pair):
        return pair
    raise TypeError(
        f"expected a LoRAPair, its .name (a PairName) or a module path tuple of strings, got "
        f"{pair!r}; pair names are not parsed back from strings"
    )


class LoRAPair(NamedTuple):
    """A resolved factor pair: where its leaves are, how to read them, who it is.

    ``name`` is a ``PairName``: a string for display and ``lora_scale``
    callables, with the structured ``group``, ``a_path``, ``b_path`` and
    ``module_path`` (also available on the pair itself).
    """

    name: PairName  # e.g. "['block']['attn']['kernel_lora_{a,b}']"
    a_index: int  # index of lora_a among the tree's leaves (jax.tree.leaves order)
    b_index: int
    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...]
    dims: LoRADimensionNumbers  # num_batch_axes resolved to an int

    @property
    def rank(self) -> int:
        rest = self.a_shape[self.dims.num_batch_axes or 0 :]
        return rest[self.dims.a_rank_axis]

    @property
    def group(self) -> Hashable:
        return self.name.group

    @property
    def a_path(self) -> Path:
        return self.name.a_path

    @property
    def b_path(self) -> Path:
        return self.name.b_path

    @property
    def module_path(self) -> Path:
        return self.name.module_path


def _key_name(key: Any) -> str:
    if isinstance(key, DictKey):
        return str(key.key)
    if isinstance(key, GetAttrKey):
        return key.name
    if isinstance(key, SequenceKey):
        return str(key.idx)
    if isinstance(key, FlattenedIndexKey):
        return str(key.key)
    return str(key)


def normalized_path(path: Sequence[Any]) -> tuple[str, ...]:
    """Key path as strings, without nnx's trailing ``.value`` attribute."""
    keys = list(path)
    if keys and isinstance(keys[-1], GetAttrKey) and keys[-1].name == "value":
        keys = keys[:-1]
    return tuple(_key_name(k) for k in keys)


def default_pair_rule(path: tuple[str, ...]) -> tuple[Hashable, Role] | None:
    """The default rule: flax ``lora_a/lora_b``, qwix ``*_lora_a/_b``, gemma ``lora/{a,b}``.

    Args:
      path: a leaf's key path as strings (see ``normalized_path``).

    Returns:
      ``(group, role)`` for a factor, ``None`` for any other leaf. Leaves with
      equal groups form a pair.
    """
    if not path:
        return None
    *parent, leaf = path
    if leaf in ("lora_a", "lora_b"):
        return (*parent, "lora_{a,b}"), leaf[-1]  # type: ignore[return-value]
    for suffix in ("_lora_a", "_lora_b"):
        if leaf.endswith(suffix) and len(leaf) > len(suffix):
            return (*parent, leaf[: -len(suffix)] + "_lora_{a,b}"), suffix[-1]  # type: ignore[return-value]
    if parent and parent[-1] == "lora" and leaf in ("a", "b"):
        return (*parent, "{a,b}"), leaf  # type: ignore[return-value]
    return None


def _group_name(group: Hashable) -> str:
    if isinstance(group, tuple):
        return "".join(f"[{k!r}]" for k in group)
    return repr(group)


def _infer_num_batch_axes(
    a_shape: tuple[int, ...], b_shape: tuple[int, ...], dims: LoRADimensionNumbers
) -> int | None:
    for k in range(min(len(a_shape), len(b_shape)) - 2, -1, -1):
        if a_shape[:k] != b_shape[:k]:
            continue
        if _rank_of(a_shape[k:], dims.a_rank_axis) == _rank_of(b_shape[k:], dims.b_rank_axis):
            return k
    return None


def _rank_of(shape: tuple[int, ...], axis: int) -> int | None:
    if not -len(shape) <= axis < len(shape):
        return None
    return shape[axis]


def _resolve_dims(
    name: str, a_shape: tuple[int, ...], b_shape: tuple[int, ...], arg: DimensionNumbersArg
) -> LoRADimensionNumbers:
    dims = arg(name, a_shape, b_shape) if callable(arg) else arg
    dims = dims if dims is not None else LoRADimensionNumbers()
    if not isinstance(dims, LoRADimensionNumbers):
        raise TypeError(
            f"pair {name}: dimension numbers must be LoRADimensionNumbers, got {dims!r}"
        )
    nb = dims.num_batch_axes
    if nb is None:
        nb = _infer_num_batch_axes(a_shape, b_shape, dims)
        if nb is None:
            raise ValueError(
                f"pair {name}: lora_a {a_shape} and lora_b {b_shape} do not form a LoRA pair "
                f"with rank axes a_rank_axis={dims.a_rank_axis}, b_rank_axis={dims.b_rank_axis}: "
                "the ranks differ (or no leading batch axes agree). Check the factor shapes, "
                "or pass LoRADimensionNumbers(...) via `dimension_numbers`."
            )
    if nb < 0 or nb > min(len(a_shape), len(b_shape)) - 2:
        raise ValueError(
            f"pair {name}: num_batch_axes={nb} leaves fewer than 2 axes in lora_a {a_shape} "
            f"or lora_b {b_shape}"
        )
    if a_shape[:nb] != b_shape[:nb]:
        raise ValueError(
            f"pair {name}: the {nb} batch axes differ: lora_a {a_shape}, lora_b {b_shape}"
        )
    r_a = _rank_of(a_shape[nb:], dims.a_rank_axis)
    r_b = _rank_of(b_shape[nb:], dims.b_rank_axis)
    if r_a is None or r_b is None or r_a != r_b:
        raise ValueError(
            f"pair {name}: mismatched ranks: lora_a {a_shape} has rank {r_a} "
            f"(axis {dims.a_rank_axis} after {nb} batch axes) but lora_b {b_shape} has rank "
            f"{r_b} (axis {dims.b_rank_axis})"
        )
    return dims._replace(num_batch_axes=nb)


def _shape_dtype(leaf: Any) -> tuple[tuple[int, ...], Any]:
    return tuple(jnp.shape(leaf)), getattr(leaf, "dtype", None)


class _Resolved(NamedTuple):
    pairs: list[LoRAPair]
    unpaired: list[str]  # key paths (jax.tree_util.keystr) of leaves in no pair


def resolve_pairs(
    tree: Any,
    pair_rule: PairRule = default_pair_rule,
    dimension_numbers: DimensionNumbersArg = None,
) -> _Resolved:
    """Pairs and unpaired leaves of ``tree``; raises on lone or malformed factors."""
    leaves_with_path = jax.tree_util.tree_flatten_with_path(tree)[0]
    groups: dict[Hashable, dict[str, tuple[int, str]]] = {}
    paths: list[Path] = []
    unpaired = []
    for index, (path, _) in enumerate(leaves_with_path):
        paths.append(normalized_path(path))
        match = pair_rule(paths[-1])
        keystr = jax.tree_util.keystr(tuple(path))
        if match is None:
            unpaired.append(keystr)
            continue
        group, role = match
        if role not in ("a", "b"):
            raise ValueError(f"pair rule returned role {role!r} for {keystr}; expected 'a' or 'b'")
        slot = groups.setdefault(group, {})
        if role in slot:
            raise ValueError(
                f"two leaves claim role {role!r} in LoRA pair {_group_name(group)}: "
                f"{slot[role][1]} and {keystr}"
            )
        slot[role] = (index, keystr)
    pairs = []
    for group, slot in groups.items():
        text = _group_name(group)
        if set(slot) != {"a", "b"}:
            ((role, (index, keystr)),) = slot.items()
            shape, _ = _shape_dtype(leaves_with_path[index][1])
            other = "lora_b" if role == "a" else "lora_a"
            raise ValueError(
                f"LoRA factor {keystr} (shape {shape}) has no matching {other} sibling "
                f"(pair {text}). Both factors of a pair must be in the tree, and inside "
                "optax.partition/masked both must get the same label."
            )
        (ia, ka), (ib, kb) = slot["a"], slot["b"]
        name = PairName(text, group=group, a_path=paths[ia], b_path=paths[ib])
        a_shape, a_dtype = _shape_dtype(leaves_with_path[ia][1])
        b_shape, b_dtype = _shape_dtype(leaves_with_path[ib][1])
        for keystr, shape, dtype in ((ka, a_shape, a_dtype), (kb, b_shape, b_dtype)):
            if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
                raise TypeError(
                    f"LoRA factor {keystr} has dtype {dtype} (shape {shape}); LoRA factors "
                    "must be real floating point arrays"
                )
        dims = _resolve_dims(name, a_shape, b_shape, dimension_numbers)
        pairs.append(LoRAPair(name, ia, ib, a_shape, b_shape, dims))
    return _Resolved(pairs, unpaired)


def find_lora_pairs(
    tree: Any,
    *,
    pair_rule: PairRule = default_pair_rule,
    dimension_numbers: DimensionNumbersArg = None,
) -> list[LoRAPair]:
    """List the LoRA factor pairs of a tree (to inspect what the optimizer will see).

    Args:
      tree: parameters, gradients, an ``nnx.State`` or a tree of
        ``jax.ShapeDtypeStruct``.
      pair_rule: maps a leaf's key path (strings) to ``(group, "a" | "b")`` or
        ``None``; default ``default_pair_rule``.
      dimension_numbers: ``None`` (infer), one ``LoRADimensionNumbers`` for all
        pairs, or ``f(pair_name, a_shape, b_shape) -> LoRADimensionNumbers | None``.

    Returns:
      One ``LoRAPair`` per pair, in tree order of their groups.

    Raises:
      ValueError: a factor without its sibling, mismatched ranks or batch axes.
      TypeError: a non-floating factor.
    """
    return resolve_pairs(tree, pair_rule, dimension_numbers).pairs


def lora_param_labels(
    tree: Any,
    *,
    pair_rule: PairRule = default_pair_rule,
    dimension_numbers: DimensionNumbersArg = None,
    lora_label: str = "lora",
    other_label: str = "fallback",
) -> Any:
    """Label every leaf ``lora_label`` (a factor of a pair) or ``other_label``.

    For ``optax.partition({'lora': lora_muon(...), 'fallback': ...}, labels)``.
    Both factors of a pair always get the same label.
    """
    resolved = resolve_pairs(tree, pair_rule, dimension_numbers)
    in_pair = {i for p in resolved.pairs for i in (p.a_index, p.b_index)}
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    labels = [lora_label if i in in_pair else other_label for i in range(len(leaves))]
    flat_labels = jax.tree_util.tree_unflatten(treedef, labels)
    # A label stands in for a whole value wrapper (an nnx Variable, whose only child
    # is `.value`), so optax.masked replaces the *wrapper* by MaskedNode, not its value:
    # a Variable holding a MaskedNode breaks tools that shard per Variable (tunix's
    # checkpoint restore, nnx.get_named_sharding).
    wrappers = jax.tree_util.tree_flatten(tree, is_leaf=_is_value_wrapper)[0]
    if not any(_is_value_wrapper(w) for w in wrappers):
        return flat_labels
    outer = jax.tree_util.tree_structure(tree, is_leaf=_is_value_wrapper)
    return jax.tree_util.tree_unflatten(outer, labels)


def _is_value_wrapper(x: Any) -> bool:
    """True for a pytree node whose only child is its ``.value`` (an nnx Variable)."""
    if isinstance(x, dict | list | tuple) or jax.tree_util.treedef_is_leaf(
        jax.tree_util.tree_structure(x)
    ):
        return False
    children = jax.tree_util.tree_flatten_with_path(x, is_leaf=lambda y: y is not x)[0]
    if len(children) != 1:
        return False
    path = children[0][0]
    return len(path) == 1 and isinstance(path[0], GetAttrKey) and path[0].name == "value"


__getattr__ = _deprecation.renamed(
    __name__,
    {
        "LoraPair": ("LoRAPair", LoRAPair),
        "LoraDimensionNumbers": ("LoRADimensionNumbers", LoRADimensionNumbers),
    },
)
