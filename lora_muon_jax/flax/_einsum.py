"""Where a LoRA pair attaches to a kernel contracted by an einsum (NNX ``Einsum``/``Linear``)."""

from __future__ import annotations

import string
from collections.abc import Sequence
from typing import NamedTuple

from lora_muon_jax.flax import _common


class EinsumLoRASpec(NamedTuple):
    """How a LoRA pair attaches to a kernel contracted by an einsum.

    Kernel axes are split into *batch* axes (in the input and the output: one
    adapter per index, leading both factors), *contracted* axes (in the input
    only: they go to ``lora_a``) and *output* axes (in the output only: they go
    to ``lora_b``): ``lora_a (*batch, *contracted, r)``, ``lora_b (*batch, r,
    *output)``.
    """

    delta_equation: str  # "lhs,a,b->out": the adapter's contribution
    kernel_equation: str  # "a,b->kernel": a ⋅ b in the kernel's axis order (for merging)
    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...]
    batch_axes: tuple[int, ...]  # kernel axes of each kind
    contracted_axes: tuple[int, ...]
    output_axes: tuple[int, ...]


def einsum_lora_spec(
    einsum_str: str, kernel_shape: Sequence[int], rank: int, where: str = "einsum"
) -> EinsumLoRASpec:
    """The LoRA factor layout of the kernel (second operand) of ``einsum_str``.

    Example: ``'btd,dnh->btnh'`` with kernel ``(d, n, h)`` gives
    ``lora_a (d, r)``, ``lora_b (r, n, h)``; ``'btnh,nhd->btd'`` gives
    ``lora_a (n, h, r)``, ``lora_b (r, d)``.

    Raises:
      ValueError: not two operands, an ellipsis in the kernel, a kernel axis
        that is summed out, or a rank above ``min(prod(contracted), prod(output))``.
    """
    eq = einsum_str.replace(" ", "")
    if "->" not in eq or eq.count(",") != 1:
        raise ValueError(f"{where}: need an explicit two-operand einsum 'lhs,rhs->out', got {eq!r}")
    operands, out = eq.split("->")
    lhs, rhs = operands.split(",")
    if "." in rhs or len(rhs) != len(kernel_shape):
        raise ValueError(
            f"{where}: kernel subscripts {rhs!r} do not match kernel shape {tuple(kernel_shape)}"
        )
    batch, contracted, output = [], [], []
    for i, c in enumerate(rhs):
        in_lhs, in_out = c in lhs, c in out
        if in_lhs and in_out:
            batch.append(i)
        elif in_lhs:
            contracted.append(i)
        elif in_out:
            output.append(i)
        else:
            raise ValueError(f"{where}: kernel axis {c!r} of {eq!r} is summed out; not supported")
    used = set(eq)
    r_char = next(c for c in string.ascii_letters if c not in used)
    batch_s = "".join(rhs[i] for i in batch)
    a_sub = batch_s + "".join(rhs[i] for i in contracted) + r_char
    b_sub = batch_s + r_char + "".join(rhs[i] for i in output)
    shape = tuple(kernel_shape)
    _common.check_rank(where, rank, [shape[i] for i in contracted], [shape[i] for i in output])
    return EinsumLoRASpec(
        delta_equation=f"{lhs},{a_sub},{b_sub}->{out}",
        kernel_equation=f"{a_sub},{b_sub}->{rhs}",
        a_shape=(*(shape[i] for i in (*batch, *contracted)), rank),
        b_shape=(*(shape[i] for i in batch), rank, *(shape[i] for i in output)),
        batch_axes=tuple(batch),
        contracted_axes=tuple(contracted),
        output_axes=tuple(output),
    )
