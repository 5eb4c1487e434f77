"""Old names kept for one release: module ``__getattr__`` hooks that warn and forward."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any


def renamed(module: str, old_to_new: dict[str, tuple[str, Any]]) -> Callable[[str], Any]:
    """A module ``__getattr__`` resolving each old name to its new object with a warning."""

    def __getattr__(name: str) -> Any:
        if name in old_to_new:
            new_name, obj = old_to_new[name]
            warnings.warn(
                f"{module}.{name} was renamed {new_name} (one LoRA casing, as flax's nnx.LoRA); "
                "the old name will be removed in the next release",
                DeprecationWarning,
                stacklevel=2,
            )
            return obj
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__
