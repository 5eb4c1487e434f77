"""Finding LoRA factor pairs in a parameter tree, by tree structure.

A pair is two leaves that a *pair rule* maps to the same group with roles
``"a"`` and ``"b"``. The default rule, ``default_pair_rule``, knows these
namings, each with the layout it implies (``A`` is the input side, ``m`` its
size; ``B`` the output side, ``n``):

======================================  =====================================  ==================
naming (sibling leaves)                  who writes it                          factor axes
======================================  =====================================  ==================
``lora_a`` / ``lora_b``                  flax ``nnx.LoRA``, ``nnx.LoRALinear``  ``(*in, r)``,
                                         (under ``lora``), this package,        ``(r, *out)``
                                         MaxText
``<name>_lora_a`` / ``<name>_lora_b``    qwix (Linear, Einsum, conv), so tunix  ``(*in, r)``,
                                                                                ``(r, *out)``
``lora: {a, b}``                         gemma ``peft`` (batch dims of the      ``(*in, r)``,
                                         einsum in ``a`` only: they flatten     ``(r, *out)``
                                         into m)
``lora_A`` / ``lora_B`` (optionally      HF PEFT / torch-converted trees,       ``(r, in, *k)``,
``.<adapter>`` and ``.weight``, nested   levanter (``lora_A.weight``)           ``(out, r, *1)``
or as dotted flat keys)
``lora_embedding_A`` / ``_B``            PEFT embeddings                        ``(r, vocab)``,
                                                                                ``(dim, r)``
``lora_down`` / ``lora_up`` (+           kohya / diffusers                      ``(r, in, *k)``,
``.weight``)                                                                    ``(out, r, *1)``
======================================  =====================================  ==================

Batch axes (one independent pair per index) are inferred only where the shapes
admit exactly one valid reading (``_layouts``): leading axes both factors share
(``nnx.vmap``/``nnx.scan``, linen ``nn.scan``, levanter, qwix dot_general batch
dims, kauldron trees alike). A reading is valid when ranks agree and
``r ≤ min(m, n)``. What is *not* inferred, because shapes alone cannot tell:

* MaxText scanned layers (``scan_layers=True``): the layer axis sits inside both
  factors at ``param_scan_axis`` (1), ``lora_a (embed, layers, r)``,
  ``lora_b (r, layers, heads, head_dim)``; read as one matrix it would couple
  all layers. Pass ``dimension_numbers=maxtext_dimension_numbers()``.
* Stacked layers whose count equals the rank, e.g. ``(4, 16, 4)`` /
  ``(4, 4, 8)``: 4 layers of ``16×4``/``4×8``, or one conv ``a`` with an einsum
  ``b``? Pass ``LoRADimensionNumbers(num_batch_axes=...)``, or for an NNX
  model ``lora_muon_jax.flax.nnx.lora_dimension_numbers_fn(model)``.

Both raise a ``ValueError`` that lists the readings with the spec of each, as
do a rank larger than ``min(m, n)`` (e.g. torch-layout factors under flax
names) and leaves whose names look like factors (``lora_A``, ``lora_down``,
``w_lora_a``, ...) but that no rule pairs. Never a silent guess.

Key paths are read with nnx's trailing ``.value`` attribute dropped, so the
Variables ``nnx.Optimizer`` gives ``init`` and the arrays it gives ``update``
pair identically. ``optax.MaskedNode`` holes (``optax.masked``/``partition``,
kauldron ``partial_updates``) and leafless placeholders have no leaves and are
simply skipped.

Each ``LoRAPair`` carries its identity as structured paths (``PairName``):
nothing downstream parses a formatted name back.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.tree_util import DictKey, FlattenedIndexKey, GetAttrKey, SequenceKey

from lora_muon_jax import _deprecation, _layouts
from lora_muon_jax._layouts import LoRADimensionNumbers as LoRADimensionNumbers
from lora_muon_jax._layouts import maxtext_dimension_numbers as maxtext_dimension_numbers
from lora_muon_jax._naming import PairMatch as PairMatch
from lora_muon_jax._naming import PairRule as PairRule
from lora_muon_jax._naming import default_pair_rule as default_pair_rule
from lora_muon_jax._naming import looks_like_factor, tokens
from lora_muon_jax._views import Role as Role
from lora_muon_jax._views import batch_axes_of, rank_axis_of
from lora_muon_jax._views import from_math_layout as from_math_layout
from lora_muon_jax._views import from_matrix_view as from_matrix_view
from lora_muon_jax._views import math_views as math_views
from lora_muon_jax._views import to_math_layout as to_math_layout
from lora_muon_jax._views import to_matrix_view as to_matrix_view

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
    and ``module_path`` (their common prefix, keys split at dots so flat
    ``"q_proj.lora_A.weight"`` keys give ``(..., "q_proj")``: the module that
    owns the pair).
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
        return _common_prefix(tokens(self.a_path), tokens(self.b_path))

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
    dims: LoRADimensionNumbers  # resolved: every field set, batch axes as tuples

    @property
    def rank(self) -> int:
        return self.a_shape[rank_axis_of(self, "a")]

    @property
    def batch_shape(self) -> tuple[int, ...]:
        """Sizes of the batch axes (``()`` for a single pair): one pair per index."""
        return tuple(self.a_shape[ax] for ax in batch_axes_of(self, "a"))

    @property
    def leading_batch_axes(self) -> bool:
        """True when the batch axes lead both factors (``lora_a[i]``, ``lora_b[i]`` is pair i)."""
        nb = len(self.batch_shape)
        return batch_axes_of(self, "a") == batch_axes_of(self, "b") == tuple(range(nb))

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


def _group_name(group: Hashable) -> str:
    if isinstance(group, tuple):
        return "".join(f"[{k!r}]" for k in group)
    return repr(group)


def _resolve_dims(
    name: PairName,
    where: str,
    a_shape: tuple[int, ...],
    b_shape: tuple[int, ...],
    arg: DimensionNumbersArg,
    naming: LoRADimensionNumbers | None,
) -> LoRADimensionNumbers:
    dims = arg(name, a_shape, b_shape) if callable(arg) else arg
    if dims is not None and not isinstance(dims, LoRADimensionNumbers):
        raise TypeError(
            f"pair {name}: dimension numbers must be LoRADimensionNumbers, got {dims!r}"
        )
    if naming is not None and not isinstance(naming, LoRADimensionNumbers):
        raise TypeError(
            f"pair {name}: the pair rule's layout must be LoRADimensionNumbers or None, "
            f"got {naming!r}"
        )
    return _layouts.resolve(where, a_shape, b_shape, dims, naming)


def _shape_dtype(leaf: Any) -> tuple[tuple[int, ...], Any]:
    return tuple(jnp.shape(leaf)), getattr(leaf, "dtype", None)


class _Resolved(NamedTuple):
    pairs: list[LoRAPair]
    unpaired: list[str]  # key paths (jax.tree_util.keystr) of leaves in no pair


def _check_not_a_factor(path: Path, keystr: str, leaf: Any) -> None:
    key = looks_like_factor(path)
    if key is None:
        return
    shape, _ = _shape_dtype(leaf)
    raise ValueError(
        f"{keystr} (shape {shape}) looks like a LoRA factor ({key!r}) but no pair rule pairs "
        "it, so it would silently train with the fallback optimizer. The default rule pairs "
        "sibling lora_a/lora_b, <name>_lora_a/_lora_b, lora: {a, b}, and lora_A/lora_B, "
        "lora_embedding_A/_B, lora_down/lora_up (each optionally followed by '.<adapter>' and "
        "'.weight'). Pass pair_rule=f(path) -> (group, 'a' | 'b'[, LoRADimensionNumbers(...)]) "
        "that pairs it, or rename the leaf if it is not a factor."
    )


def resolve_pairs(
    tree: Any,
    pair_rule: PairRule = default_pair_rule,
    dimension_numbers: DimensionNumbersArg = None,
) -> _Resolved:
    """Pairs and unpaired leaves of ``tree``; raises on lone or malformed factors."""
    leaves_with_path = jax.tree_util.tree_flatten_with_path(tree)[0]
    groups: dict[Hashable, dict[str, tuple[int, str]]] = {}
    namings: dict[Hashable, LoRADimensionNumbers | None] = {}
    paths: list[Path] = []
    unpaired = []
    for index, (path, _) in enumerate(leaves_with_path):
        paths.append(normalized_path(path))
        match = pair_rule(paths[-1])
        keystr = jax.tree_util.keystr(tuple(path))
        if match is None:
            _check_not_a_factor(paths[-1], keystr, leaves_with_path[index][1])
            unpaired.append(keystr)
            continue
        if not isinstance(match, tuple) or len(match) not in (2, 3):
            raise TypeError(
                f"pair rule returned {match!r} for {keystr}; expected (group, role), "
                "(group, role, LoRADimensionNumbers | None) or None"
            )
        group, role = match[0], match[1]
        if role not in ("a", "b"):
            raise ValueError(f"pair rule returned role {role!r} for {keystr}; expected 'a' or 'b'")
        slot = groups.setdefault(group, {})
        if role in slot:
            raise ValueError(
                f"two leaves claim role {role!r} in LoRA pair {_group_name(group)}: "
                f"{slot[role][1]} and {keystr}"
            )
        slot[role] = (index, keystr)
        naming = match[2] if len(match) == 3 else None  # type: ignore[misc]
        if naming is not None or group not in namings:
            namings[group] = naming
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
        where = f"pair {text} (lora_a at {ka}, lora_b at {kb})"
        dims = _resolve_dims(name, where, a_shape, b_shape, dimension_numbers, namings[group])
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
      pair_rule: maps a leaf's key path (strings) to ``(group, "a" | "b")``,
        ``(group, role, LoRADimensionNumbers)`` (the layout its naming implies)
        or ``None``; default ``default_pair_rule``.
      dimension_numbers: ``None`` (the naming's layout, batch axes inferred),
        one ``LoRADimensionNumbers`` for all pairs, or ``f(pair_name, a_shape,
        b_shape) -> LoRADimensionNumbers | None``; its ``None`` fields stay free.

    Returns:
      One ``LoRAPair`` per pair, in tree order of their groups.

    Raises:
      ValueError: a factor without its sibling, mismatched ranks or batch axes,
        shapes that admit more than one reading, a rank larger than
        ``min(m, n)``, or a leaf named like a factor that no rule pairs; each
        message names the paths, the shapes, the readings and the spec.
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
