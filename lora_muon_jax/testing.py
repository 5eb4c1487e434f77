"""Helpers for tests and benchmarks: what collectives a compiled program runs.

``hlo_collectives(compiled.as_text())`` lists the all-reduces, all-gathers,
reduce-scatters, all-to-alls and collective-permutes of a compiled XLA program,
with their buffers and whether they sit inside a conditional branch or a loop —
how the tests check that a sharded LoRA-Muon step moves only r×r Grams.
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple

_COLLECTIVE_KINDS = (
    "all-reduce",
    "all-gather",
    "reduce-scatter",
    "all-to-all",
    "collective-permute",
    "collective-broadcast",
    "ragged-all-to-all",
)
_DTYPE_BYTES = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "f8e4m3fn": 1,
    "f8e5m2": 1,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
    "c64": 8,
    "c128": 16,
}


class Collective(NamedTuple):
    """One collective op of a compiled HLO module."""

    kind: str  # "all-reduce", "all-gather", ...
    name: str  # the HLO instruction name
    computation: str  # the computation it sits in
    shapes: tuple[tuple[str, tuple[int, ...]], ...]  # (dtype, dims) per buffer
    nbytes: int  # total bytes of its result buffers (per device)
    conditional: bool  # True: only inside a branch of an HLO conditional
    in_loop: bool  # True: inside a while-loop body (runs once per iteration)


_SHAPE_RE = re.compile(r"\b([a-z]+[0-9]*(?:e[0-9]m[0-9][a-z]*)?)\[([0-9,]*)\]")
_COMPUTATION_RE = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTRUCTION_RE = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_CALLS_RE = re.compile(
    r"\b(calls|to_apply|body|condition|branch_computations|true_computation|"
    r"false_computation)=(\{[^}]*\}|%?[\w.\-]+)"
)


def _parse_shapes(text: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    out = []
    for dtype, dims in _SHAPE_RE.findall(text):
        if dtype in _DTYPE_BYTES:
            out.append((dtype, tuple(int(d) for d in dims.split(",") if d)))
    return tuple(out)


def hlo_collectives(compiled_text: str | None) -> list[Collective]:
    """The collective ops of a compiled module (``Compiled.as_text()``).

    Each op reports its result buffers (dtype and dims, per device), their
    bytes, and whether it runs on every execution (``conditional=False``:
    reachable from ENTRY without entering a ``conditional`` branch) or only in
    a branch (e.g. LoRA-Muon's overflow-rescaling path), and whether it sits in
    a while-loop body (``in_loop``: it runs once per iteration, e.g. inside the
    literal method's Newton–Schulz scan). Counts are of ops in the program
    text. Async pairs count once (the ``-start`` op; ``-done`` is skipped).

    Args:
      compiled_text: the text of ``jax.jit(f).lower(...).compile().as_text()``.

    Returns:
      A list of ``Collective``, in program order.

    Raises:
      ValueError: when there is no text (``as_text()`` returned ``None``).
    """
    if compiled_text is None:
        raise ValueError("hlo_collectives: no HLO text (Compiled.as_text() returned None)")
    computation = ""
    entry = ""
    found: list[tuple[str, str, str, str]] = []  # kind, name, computation, result text
    calls: dict[str, list[tuple[str, str]]] = {}  # computation -> [(how, callee)]
    for line in compiled_text.splitlines():
        if not line.startswith(" ") and line.rstrip().endswith("{"):
            match = _COMPUTATION_RE.match(line)
            if match:
                computation = match.group(2)
                if match.group(1):
                    entry = computation
            continue
        match = _INSTRUCTION_RE.match(line)
        if not match:
            continue
        name, rest = match.groups()
        for how, callees in _CALLS_RE.findall(rest):
            for callee in callees.strip("{}").split(","):
                callee = callee.strip().lstrip("%")
                if callee:
                    calls.setdefault(computation, []).append((how, callee))
        for kind in _COLLECTIVE_KINDS:
            op = re.search(rf"\s{re.escape(kind)}(-start)?\(", rest)
            if op:
                found.append((kind, name, computation, rest[: op.start()]))
                break
    branch_edges = ("branch_computations", "true_computation", "false_computation")
    loop_edges = ("body", "condition")

    def reachable(skip: tuple[str, ...]) -> set[str]:
        seen: set[str] = set()
        stack = [entry]
        while stack:
            comp = stack.pop()
            if comp in seen:
                continue
            seen.add(comp)
            stack.extend(callee for how, callee in calls.get(comp, []) if how not in skip)
        return seen

    unconditional = reachable(branch_edges)
    straight = reachable(branch_edges + loop_edges)
    out = []
    for kind, name, comp, result in found:
        shapes = _parse_shapes(result)
        nbytes = sum(_DTYPE_BYTES[d] * math.prod(dims) for d, dims in shapes)
        conditional = comp not in unconditional
        in_loop = not conditional and comp not in straight
        out.append(Collective(kind, name, comp, shapes, nbytes, conditional, in_loop))
    return out
