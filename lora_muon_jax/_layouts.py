"""How a pair's factor axes map to ``A (m×r)`` and ``B (n×r)``: the spec and its resolution.

A *reading* of a pair ``lora_a``, ``lora_b`` says which axes of each factor are
batch axes (one independent pair per index: stacked or scanned layers), which
is the rank axis, and so what ``m``, ``n`` and ``r`` are. A reading is *valid*
when the batch axes have equal sizes in order, each factor keeps its rank axis
and at least one other axis, both rank axes have the same size ``r``, and
``r ≤ min(m, n)`` (a larger "rank" is a misread layout: the factors of a real
LoRA pair have ``r ≤ min(m, n)``).

``LoRADimensionNumbers`` fixes any part of the reading; what it leaves ``None``
comes from the pair's *naming* (the pair rule's layout: flax/qwix/gemma put the
rank last in ``lora_a`` and first in ``lora_b``, torch/PEFT first in ``lora_A``
and second in ``lora_B``) and, for the batch axes, from inference. Inference
considers two families of readings and accepts only a unique valid one:

* leading batch axes shared by both factors, 0, 1, 2, ... of them (flax
  ``nnx.vmap``/``nnx.scan``, linen ``nn.scan``, levanter, qwix dot_general
  batch dimensions);
* one layer axis at the same interior position ``p ≥ 1`` of both factors
  (MaxText's ``param_scan_axis``).

The second family never wins on its own (its reading always leaves the
unbatched reading valid too), so a MaxText-scanned pair is never guessed: it is
reported as ambiguous, and ``maxtext_dimension_numbers()`` settles it. Two
valid readings raise a ``ValueError`` that lists both, with the spec of each.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple


class LoRADimensionNumbers(NamedTuple):
    """Where the axes of a pair's factors go in ``A (m×r)`` and ``B (n×r)``.

    Like optax's ``MuonDimensionNumbers`` for ``optax.contrib.muon``, but for
    a pair of factors: batch axes may sit anywhere in each factor.

    Attributes:
      num_batch_axes: the number of *leading* axes shared by both factors that
        index independent pairs (stacked layers). ``None``: infer (see the
        module docstring) unless ``a_batch_axes``/``b_batch_axes`` are given.
      a_rank_axis: the rank axis of ``lora_a`` counted among its non-batch
        axes; its other non-batch axes flatten, in order, into m. ``None``: what
        the pair's naming says (flax/qwix/gemma ``-1``, PEFT ``lora_A`` ``0``).
      b_rank_axis: the same for ``lora_b`` and n. ``None``: what the naming
        says (flax/qwix/gemma ``0``, PEFT ``lora_B (out, r)`` ``1``).
      a_batch_axes: the batch axes of ``lora_a`` at any positions (negative
        counts from the end), e.g. MaxText's scanned ``lora_a (embed, layers,
        r)`` has ``(1,)``. Give ``b_batch_axes`` with it.
      b_batch_axes: the batch axes of ``lora_b``, paired in order with
        ``a_batch_axes`` (equal sizes), e.g. ``(1,)`` for MaxText's
        ``lora_b (r, layers, heads, head_dim)``.

    On a resolved ``LoRAPair`` every field is set: ``a_batch_axes`` and
    ``b_batch_axes`` are non-negative tuples, ``num_batch_axes`` is their
    length (batch axes that do not lead included) and the rank axes are ints.

    Examples: PEFT-style ``lora_A (r, in)``, ``lora_B (out, r)`` under flax
    names is ``LoRADimensionNumbers(a_rank_axis=0, b_rank_axis=-1)``; two
    stacked layers of rank 2 is ``LoRADimensionNumbers(num_batch_axes=1)``.
    """

    num_batch_axes: int | None = None
    a_rank_axis: int | None = None
    b_rank_axis: int | None = None
    a_batch_axes: tuple[int, ...] | None = None
    b_batch_axes: tuple[int, ...] | None = None


# The layout torch/PEFT tensors have: lora_A (r, in[, kh, kw]) and
# lora_B (out, r[, 1, 1]) (nn.Linear / nn.Conv2d weights are (out, in, ...)).
PEFT_DIMENSION_NUMBERS = LoRADimensionNumbers(a_rank_axis=0, b_rank_axis=1)
# flax nnx.LoRA, qwix, gemma, this package: x @ lora_a @ lora_b.
FLAX_RANK_AXES = (-1, 0)


def maxtext_dimension_numbers(scan_axis: int = 1) -> LoRADimensionNumbers:
    """The spec of MaxText's scanned layers: the layer axis at ``scan_axis`` of both factors.

    MaxText stacks the weights of scanned layers (``scan_layers=True``) along
    ``param_scan_axis`` (1 by default), so a LoRA pair of a scanned kernel is
    ``lora_a (embed, layers, r)``, ``lora_b (r, layers, heads, head_dim)``.
    Shapes alone cannot tell that layer axis from a multi-axis input or output
    dimension, so it is never inferred; pass this as ``dimension_numbers``.
    For a tree that also holds unscanned pairs, apply it per pair, e.g.
    ``lambda name, a, b: maxtext_dimension_numbers() if "layers" in
    name.module_path else None``.

    Example:
      >>> import jax.numpy as jnp
      >>> from lora_muon_jax import find_lora_pairs, maxtext_dimension_numbers
      >>> tree = {"lora_a": jnp.zeros((16, 4, 2)), "lora_b": jnp.zeros((2, 4, 3, 5))}
      >>> (pair,) = find_lora_pairs(tree, dimension_numbers=maxtext_dimension_numbers())
      >>> pair.batch_shape, pair.rank
      ((4,), 2)
    """
    return LoRADimensionNumbers(a_batch_axes=(scan_axis,), b_batch_axes=(scan_axis,))


class Reading(NamedTuple):
    """One way to read a pair: batch axes and rank axes of each factor."""

    a_batch_axes: tuple[int, ...]
    b_batch_axes: tuple[int, ...]
    a_rank_axis: int
    b_rank_axis: int


class _Shapes(NamedTuple):
    batch: tuple[int, ...]
    m: int
    n: int
    r: int


def _non_batch(shape: tuple[int, ...], batch: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(d for ax, d in enumerate(shape) if ax not in batch)


def _problem(
    a_shape: tuple[int, ...], b_shape: tuple[int, ...], reading: Reading
) -> tuple[str | None, _Shapes | None]:
    """Why ``reading`` is not a consistent pair (``None`` if it is), and its sizes."""
    ab, bb = reading.a_batch_axes, reading.b_batch_axes
    if len(ab) != len(bb):
        return f"{len(ab)} batch axes in lora_a but {len(bb)} in lora_b", None
    for name, axes, shape in (("lora_a", ab, a_shape), ("lora_b", bb, b_shape)):
        if len(set(axes)) != len(axes) or not all(0 <= ax < len(shape) for ax in axes):
            return f"batch axes {axes} are not distinct axes of {name} {shape}", None
        if len(shape) - len(axes) < 2:
            return f"{name} {shape} keeps fewer than 2 axes besides batch axes {axes}", None
    batch = tuple(a_shape[ax] for ax in ab)
    if batch != tuple(b_shape[ax] for ax in bb):
        return (
            f"batch axes differ: lora_a{list(ab)} has sizes {batch}, lora_b{list(bb)} has "
            f"{tuple(b_shape[ax] for ax in bb)}"
        ), None
    ra, rb = _non_batch(a_shape, ab), _non_batch(b_shape, bb)
    for name, axis, rest in (
        ("lora_a", reading.a_rank_axis, ra),
        ("lora_b", reading.b_rank_axis, rb),
    ):
        if not -len(rest) <= axis < len(rest):
            return f"rank axis {axis} is out of range for {name}'s non-batch axes {rest}", None
    r_a, r_b = ra[reading.a_rank_axis], rb[reading.b_rank_axis]
    if r_a != r_b:
        return (
            f"mismatched ranks: lora_a {a_shape} has rank {r_a} (axis {reading.a_rank_axis} of "
            f"its non-batch axes) but lora_b {b_shape} has rank {r_b} (axis {reading.b_rank_axis})"
        ), None
    m = math.prod(_drop(ra, reading.a_rank_axis))
    n = math.prod(_drop(rb, reading.b_rank_axis))
    return None, _Shapes(batch, m, n, r_a)


def _drop(shape: tuple[int, ...], axis: int) -> tuple[int, ...]:
    rest = list(shape)
    rest.pop(axis)
    return tuple(rest)


def spec_text(reading: Reading, naming: tuple[int, int] = FLAX_RANK_AXES) -> str:
    """The ``LoRADimensionNumbers(...)`` selecting ``reading`` (rank axes if not ``naming``'s)."""
    ab, bb = reading.a_batch_axes, reading.b_batch_axes
    fields = []
    if ab == bb == tuple(range(len(ab))):
        fields.append(f"num_batch_axes={len(ab)}")
    else:
        fields.append(f"a_batch_axes={ab}, b_batch_axes={bb}")
    if (reading.a_rank_axis, reading.b_rank_axis) != naming:
        fields.append(f"a_rank_axis={reading.a_rank_axis}, b_rank_axis={reading.b_rank_axis}")
    return f"LoRADimensionNumbers({', '.join(fields)})"


def _describe(reading: Reading, shapes: _Shapes, naming: tuple[int, int]) -> str:
    what = (
        f"{math.prod(shapes.batch)} independent pairs (batch {shapes.batch}) of"
        if shapes.batch
        else "one pair of"
    )
    return (
        f"{spec_text(reading, naming)}: {what} A {shapes.m}×{shapes.r}, B {shapes.n}×{shapes.r} "
        f"(m={shapes.m}, n={shapes.n}, r={shapes.r})"
    )


def _candidates(
    a_shape: tuple[int, ...], b_shape: tuple[int, ...], rank_axes: tuple[int, int]
) -> list[Reading]:
    """Leading batch axes (0, 1, ...), then one layer axis at the same interior position."""
    lo = min(len(a_shape), len(b_shape))
    out = [Reading(tuple(range(k)), tuple(range(k)), *rank_axes) for k in range(max(lo - 1, 1))]
    for p in range(1, lo):
        if a_shape[p] == b_shape[p]:
            out.append(Reading((p,), (p,), *rank_axes))
    return out


def _normalize_axes(axes: Sequence[int], ndim: int, where: str, name: str) -> tuple[int, ...]:
    try:
        axes = tuple(int(ax) for ax in axes)
    except TypeError as e:
        raise TypeError(f"{where}: {name} must be a tuple of ints, got {axes!r}") from e
    return tuple(ax % ndim if -ndim <= ax < ndim else ax for ax in axes)


HOW_TO_PASS = (
    "Pass it as `dimension_numbers=` to lora_muon/find_lora_pairs (one LoRADimensionNumbers "
    "for every pair, or f(pair_name, a_shape, b_shape) -> LoRADimensionNumbers | None per pair)."
)


def resolve(
    where: str,
    a_shape: tuple[int, ...],
    b_shape: tuple[int, ...],
    spec: LoRADimensionNumbers | None,
    naming: LoRADimensionNumbers | None,
) -> LoRADimensionNumbers:
    """The unique valid reading of a pair as resolved ``LoRADimensionNumbers``, or a ValueError.

    Args:
      where: the pair and its factors' paths, for messages.
      a_shape, b_shape: the factors' shapes.
      spec: what the user fixed (``None`` fields are free).
      naming: the layout the pair's names imply (the pair rule's), if any.
    """
    spec = spec if spec is not None else LoRADimensionNumbers()
    naming = naming if naming is not None else LoRADimensionNumbers()
    naming_axes = (
        naming.a_rank_axis if naming.a_rank_axis is not None else FLAX_RANK_AXES[0],
        naming.b_rank_axis if naming.b_rank_axis is not None else FLAX_RANK_AXES[1],
    )
    rank_axes = (
        spec.a_rank_axis if spec.a_rank_axis is not None else naming_axes[0],
        spec.b_rank_axis if spec.b_rank_axis is not None else naming_axes[1],
    )
    shapes = f"lora_a {a_shape} and lora_b {b_shape}"
    batch_spec = spec if _has_batch(spec) else naming if _has_batch(naming) else None
    if batch_spec is not None:
        readings = [_explicit(where, a_shape, b_shape, batch_spec, rank_axes)]
    else:
        readings = _candidates(a_shape, b_shape, rank_axes)
    consistent = []
    problems = []
    for reading in readings:
        problem, sizes = _problem(a_shape, b_shape, reading)
        if problem is None and sizes is not None:
            consistent.append((reading, sizes))
        else:
            problems.append(f"{spec_text(reading, naming_axes)}: {problem}")
    valid = [(rd, s) for rd, s in consistent if s.r <= min(s.m, s.n)]
    if len(valid) == 1:
        reading, _ = valid[0]
        return LoRADimensionNumbers(
            num_batch_axes=len(reading.a_batch_axes),
            a_rank_axis=reading.a_rank_axis,
            b_rank_axis=reading.b_rank_axis,
            a_batch_axes=reading.a_batch_axes,
            b_batch_axes=reading.b_batch_axes,
        )
    if len(valid) > 1:
        listed = "\n".join(f"  - {_describe(rd, s, naming_axes)}" for rd, s in valid)
        raise ValueError(
            f"{where}: {shapes} admit more than one reading, and the optimizer will not guess:\n"
            f"{listed}\nStacked layers, a multi-axis factor and MaxText's scanned layout "
            f"(maxtext_dimension_numbers()) look alike by shape. Choose the right reading. "
            f"{HOW_TO_PASS} For an NNX model (lorafy'd, nnx.vmap/nnx.scan-stacked or "
            f"lora_muon_jax.hf scanned layers), the model declares it: "
            f"dimension_numbers=lora_muon_jax.flax.nnx.lora_dimension_numbers_fn(model)."
        )
    hints = _other_layouts(a_shape, b_shape, rank_axes, naming_axes)
    if consistent:
        listed = "\n".join(f"  - {_describe(rd, s, naming_axes)}" for rd, s in consistent)
        raise ValueError(
            f"{where}: {shapes} read as a LoRA pair only with a rank larger than min(m, n), "
            f"which no LoRA pair has, so the layout is misread:\n{listed}\n{hints}{HOW_TO_PASS}"
        )
    listed = "\n".join(f"  - {p}" for p in problems)
    raise ValueError(
        f"{where}: {shapes} do not form a LoRA pair with rank axes a_rank_axis={rank_axes[0]}, "
        f"b_rank_axis={rank_axes[1]}; readings tried:\n{listed}\n{hints}Check the factor "
        f"shapes, or give the layout. {HOW_TO_PASS}"
    )


def _has_batch(dims: LoRADimensionNumbers) -> bool:
    return (
        dims.num_batch_axes is not None
        or dims.a_batch_axes is not None
        or dims.b_batch_axes is not None
    )


def _explicit(
    where: str,
    a_shape: tuple[int, ...],
    b_shape: tuple[int, ...],
    dims: LoRADimensionNumbers,
    rank_axes: tuple[int, int],
) -> Reading:
    if (dims.a_batch_axes is None) != (dims.b_batch_axes is None):
        raise ValueError(
            f"{where}: give both a_batch_axes and b_batch_axes (got {dims}); axes that only one "
            "factor has are not batch axes: they flatten into m or n"
        )
    if dims.a_batch_axes is None or dims.b_batch_axes is None:
        nb = dims.num_batch_axes
        if not isinstance(nb, int) or nb < 0:
            raise ValueError(f"{where}: num_batch_axes must be an int >= 0, got {nb!r}")
        return Reading(tuple(range(nb)), tuple(range(nb)), *rank_axes)
    ab = _normalize_axes(dims.a_batch_axes, len(a_shape), where, "a_batch_axes")
    bb = _normalize_axes(dims.b_batch_axes, len(b_shape), where, "b_batch_axes")
    if dims.num_batch_axes is not None and dims.num_batch_axes != len(ab):
        raise ValueError(
            f"{where}: num_batch_axes={dims.num_batch_axes} disagrees with a_batch_axes={ab}"
        )
    return Reading(ab, bb, *rank_axes)


def _other_layouts(
    a_shape: tuple[int, ...],
    b_shape: tuple[int, ...],
    rank_axes: tuple[int, int],
    naming_axes: tuple[int, int],
) -> str:
    """Valid readings under the other common rank layout (flax <-> PEFT), as a hint."""
    found = []
    for other in (FLAX_RANK_AXES, (0, -1), (0, 1)):
        if other == rank_axes or (other == (0, 1) and len(b_shape) == 2):
            continue
        for reading in _candidates(a_shape, b_shape, other):
            problem, sizes = _problem(a_shape, b_shape, reading)
            if problem is None and sizes is not None and sizes.r <= min(sizes.m, sizes.n):
                found.append(f"  - {_describe(reading, sizes, naming_axes)}")
    if not found:
        return ""
    return "Valid readings with other rank axes (torch/PEFT factors are lora_A (r, in), " + (
        "lora_B (out, r)):\n" + "\n".join(dict.fromkeys(found)) + "\n"
    )
