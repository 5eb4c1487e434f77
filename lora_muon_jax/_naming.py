"""Pair rules: which leaves are LoRA factors, of which pair, in which role and layout.

``default_pair_rule`` knows the namings listed in ``_pairs``'s docstring. A rule
maps a leaf's key path (strings, nnx's ``.value`` dropped) to ``(group, role)``
or ``(group, role, layout)``, where ``layout`` is the ``LoRADimensionNumbers``
the naming implies (its ``None`` fields stay free), or to ``None`` for a leaf
that is no factor. Leaves with equal groups form a pair.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Hashable

from lora_muon_jax._layouts import PEFT_DIMENSION_NUMBERS, LoRADimensionNumbers
from lora_muon_jax._views import Role

PairMatch = tuple[Hashable, Role] | tuple[Hashable, Role, LoRADimensionNumbers | None]
PairRule = Callable[[tuple[str, ...]], "PairMatch | None"]


def tokens(path: tuple[str, ...]) -> tuple[str, ...]:
    """Path keys split at dots: flat ``"q_proj.lora_A.weight"`` keys read like nested ones."""
    return tuple(t for key in path for t in key.split("."))


# torch-style factor names -> (role, the group's name for the pair); each implies
# the torch layout (PEFT_DIMENSION_NUMBERS).
_TORCH_FACTORS = {
    "lora_A": ("a", "lora_{A,B}"),
    "lora_B": ("b", "lora_{A,B}"),
    "lora_embedding_A": ("a", "lora_embedding_{A,B}"),
    "lora_embedding_B": ("b", "lora_embedding_{A,B}"),
    "lora_down": ("a", "lora_{down,up}"),
    "lora_up": ("b", "lora_{down,up}"),
}
# What looks like a LoRA factor: a path key that any known naming would pair.
_FACTOR_LOOKING = re.compile(r"(?i)^(.+_)?lora_(a|b|down|up|embedding_a|embedding_b)$")
_NOT_FACTORS = ("bias", "alpha", "scale", "scaling")


def _torch_match(path: tuple[str, ...]) -> PairMatch | None:
    keys = tokens(path)
    for i in range(len(keys) - 1, -1, -1):
        hit = _TORCH_FACTORS.get(keys[i])
        if hit is None:
            continue
        # lora_A, lora_A.weight, lora_A.<adapter>, lora_A.<adapter>.weight; not a bias.
        tail = keys[i + 1 :]
        if len(tail) > 2 or (tail and tail[-1] in _NOT_FACTORS):
            return None
        if len(tail) == 2 and tail[-1] != "weight":
            return None
        role, pair_key = hit
        return (*keys[:i], pair_key, *tail), role, PEFT_DIMENSION_NUMBERS  # type: ignore[return-value]
    return None


def default_pair_rule(path: tuple[str, ...]) -> PairMatch | None:
    """The default rule: every naming of the table in ``lora_muon_jax._pairs``'s docstring.

    Args:
      path: a leaf's key path as strings (see ``normalized_path``).

    Returns:
      ``(group, role)`` for a factor of the flax/qwix/gemma namings,
      ``(group, role, PEFT_DIMENSION_NUMBERS)`` for a torch-named one (its
      rank axes: ``lora_A (r, in)``, ``lora_B (out, r)``), ``None`` for any
      other leaf. Leaves with equal groups form a pair.
    """
    if not isinstance(path, tuple):
        # optax.inject_hyperparams calls every callable not in static_args with the step.
        raise TypeError(
            f"default_pair_rule takes a leaf's key path (a tuple of str), got {path!r}; under "
            "optax.inject_hyperparams name it in static_args=('pair_rule',)"
        )
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
    return _torch_match(path)


def looks_like_factor(path: tuple[str, ...]) -> str | None:
    """The key that makes an unpaired leaf look like a LoRA factor, if any."""
    keys = tokens(path)
    if keys and keys[-1] in _NOT_FACTORS:
        return None
    return next((t for t in keys if _FACTOR_LOOKING.match(t)), None)
