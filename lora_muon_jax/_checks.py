"""Checks on what users pass: hyperparameters, gradient shapes, pair sizes.

A hyperparameter given as a Python or NumPy number is *static*: it is checked
when the optimizer is built and a bad value raises there, naming the argument
and showing the value. Anything else (a jax array, a tracer, what
``optax.inject_hyperparams`` passes, a schedule's value) is *traced*: it cannot
raise inside ``jit``, so the transforms test it at run time with ``valid`` and
make a step with an invalid value a zero step (see each transform's docstring).

Shape problems raise at ``init`` / trace time with the tree path and the shapes.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from lora_muon_jax import _pairs

Domain = Literal["nonnegative", "positive", "momentum", "decay_fraction"]
# One registry: the message each domain shows, and its test (on floats and on arrays).
DOMAINS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "nonnegative": (">= 0", lambda v: v >= 0.0),
    "positive": ("> 0", lambda v: v > 0.0),
    "momentum": ("in [0, 1)", lambda v: (v >= 0.0) & (v < 1.0)),
    "decay_fraction": ("< 1", lambda v: v < 1.0),
}


def static_number(x: Any) -> float | None:
    """``x`` as a float if it is a Python or NumPy number (or a 0-d NumPy array), else ``None``.

    ``None`` means "traced": a jax array (concrete or a tracer), a schedule or
    anything else only known at run time.
    """
    if isinstance(x, numbers.Real | np.bool_):
        return float(x)
    if isinstance(x, np.ndarray) and x.ndim == 0 and x.dtype.kind in "biuf":
        return float(x)
    return None


def check_static(where: str, name: str, value: Any, domain: Domain) -> float | None:
    """Raise ``ValueError`` if ``value`` is a static number outside ``domain`` or not finite.

    Returns the number (``None`` for a traced value, which is not checked here).
    """
    number = static_number(value)
    if number is None:
        return None
    text, test = DOMAINS[domain]
    if not (math.isfinite(number) and bool(test(number))):
        raise ValueError(f"{where}: {name} must be finite and {text}, got {name}={shown(value)}")
    return number


def check_mu_dtype(where: str, mu_dtype: Any) -> None:
    """``mu_dtype`` must be ``None`` or a floating dtype (integer momenta truncate the EMA)."""
    if mu_dtype is None:
        return
    if isinstance(mu_dtype, jax.Array):  # optax.inject_hyperparams called the dtype with the step
        raise TypeError(
            f"{where}: mu_dtype is an array ({mu_dtype!r}), not a dtype; under "
            "optax.inject_hyperparams name it in static_args=('mu_dtype',)"
        )
    try:
        dtype = jnp.dtype(mu_dtype)
    except TypeError as e:
        raise TypeError(f"{where}: mu_dtype={mu_dtype!r} is not a dtype") from e
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{where}: mu_dtype must be a floating dtype (or None), got {dtype}")


def check_int(where: str, name: str, value: Any, low: int) -> int:
    """``value`` as an int ≥ ``low`` (a Python or NumPy integer): ``TypeError`` for another
    type, ``ValueError`` below ``low``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        hint = (
            f" (a structural integer: under optax.inject_hyperparams name it in "
            f"static_args=({name!r},))"
            if isinstance(value, jax.Array)
            else ""
        )
        raise TypeError(f"{where}: {name} must be an int >= {low}, got {name}={value!r}{hint}")
    if value < low:
        raise ValueError(f"{where}: {name} must be an int >= {low}, got {name}={value!r}")
    return int(value)


def shown(value: Any) -> str:
    """A number as the message shows it: a Python number as is, a NumPy one as its float."""
    number = static_number(value)
    if number is None or isinstance(value, int | float):
        return repr(value)
    return repr(number)


def valid(value: jax.Array, domain: Domain) -> jax.Array:
    """Run-time (traced) form of ``check_static``: a boolean scalar."""
    return jnp.isfinite(value) & DOMAINS[domain][1](value)


def _describe(tree: Any, limit: int = 5) -> str:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    shown = [f"{jax.tree_util.keystr(tuple(p))} {tuple(jnp.shape(x))}" for p, x in leaves[:limit]]
    more = f" (and {len(leaves) - limit} more)" if len(leaves) > limit else ""
    return (", ".join(shown) or "none") + more


def check_grads_match_params(where: str, grads: Any, params: Any) -> None:
    """Raise ``ValueError`` naming the path unless ``grads`` has ``params``' leaves and shapes.

    Paths are compared with nnx's trailing ``.value`` dropped, so arrays and
    the Variables that hold them match.
    """
    if params is None:
        return
    g = jax.tree_util.tree_flatten_with_path(grads)[0]
    p = jax.tree_util.tree_flatten_with_path(params)[0]
    g_paths = [_pairs.normalized_path(path) for path, _ in g]
    p_paths = [_pairs.normalized_path(path) for path, _ in p]
    if g_paths != p_paths:
        only_g = [k for k in g_paths if k not in set(p_paths)][:5]
        only_p = [k for k in p_paths if k not in set(g_paths)][:5]
        fmt = lambda ks: ", ".join("/".join(k) for k in ks) or "none"  # noqa: E731
        raise ValueError(
            f"{where}: the gradients and the parameters are different trees "
            f"({len(g_paths)} vs {len(p_paths)} leaves; only in the gradients: {fmt(only_g)}; "
            f"only in the parameters: {fmt(only_p)})"
        )
    for (path, gx), (_, px) in zip(g, p, strict=True):
        g_shape, p_shape = tuple(jnp.shape(gx)), tuple(jnp.shape(px))
        if g_shape != p_shape:
            raise ValueError(
                f"{where}: the gradient at {jax.tree_util.keystr(tuple(path))} has shape "
                f"{g_shape} but the parameter has shape {p_shape}"
            )


def check_pair_sizes(where: str, tree: Any, pairs: list[_pairs.LoRAPair]) -> None:
    """``ValueError`` for a pair with a zero-size axis (rank 0, m = 0, n = 0 or a batch of 0)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    for p in pairs:
        if 0 not in p.a_shape and 0 not in p.b_shape:
            continue
        a_key = jax.tree_util.keystr(tuple(leaves[p.a_index][0]))
        b_key = jax.tree_util.keystr(tuple(leaves[p.b_index][0]))
        try:
            what = "rank 0" if p.rank == 0 else "a zero-size axis"
        except (IndexError, TypeError, AttributeError):  # pragma: no cover - defensive
            what = "a zero-size axis"
        raise ValueError(
            f"{where}: LoRA pair {p.name} has {what}: lora_a {a_key} has shape {p.a_shape}, "
            f"lora_b {b_key} has shape {p.b_shape}. A LoRA pair needs rank >= 1 and non-empty "
            "input, output and batch axes; drop the adapter (or give it rank >= 1)."
        )


def should_have_pairs(params: Any) -> bool:
    """True for a tree with leaves, or an empty container (``{}``, an empty ``nnx.State``).

    False for any other leafless object, e.g. the placeholder that
    ``optax.tree.map_params`` passes to ``init`` to learn the state's layout.
    """
    if jax.tree_util.tree_leaves(params):
        return True
    return isinstance(params, Mapping | list | tuple)


def no_pairs_error(where: str, params: Any, opt_out: str) -> ValueError:
    return ValueError(
        f"{where}: no LoRA pair was found in the parameters (leaves: {_describe(params)}), so "
        "every leaf would be trained by the fallback alone. Check the tree (nnx.Optimizer "
        "wrt=nnx.LoRAParam on a model with no LoRA modules gives an empty tree; "
        "PEFT/torch-style names need a `pair_rule` and `dimension_numbers`), see "
        f"find_lora_pairs, or pass {opt_out} for a deliberately LoRA-free tree."
    )
