"""Orbax checkpoints of a LoRA-Muon training state: save, restore onto any mesh, resume.

The state is one pytree ``{"params": params, "opt_state": opt_state}`` saved with
``orbax.checkpoint.CheckpointManager`` and ``StandardSave``. Restoring takes an
*abstract target*: ``jax.ShapeDtypeStruct`` leaves carrying the shardings
wanted now (``abstract_train_state``), so a checkpoint written on one mesh
restores onto another mesh or another number of devices (orbax reads each
shard's slice) and the optimizer state comes back as the same NamedTuples,
``optax.MaskedNode`` holes included.

Atomicity (orbax's, on local and POSIX file systems): step ``k`` is written
into ``<dir>/k.orbax-checkpoint-tmp`` and renamed to ``<dir>/k`` only once
every host has finished; a process that dies mid-write leaves the tmp
directory behind, never a partial ``k``, and ``latest_step()`` keeps pointing
at the previous checkpoint (``tests/test_checkpoint.py`` kills a writer to
show it). Every process of a multi-host job must call ``save`` and
``restore``.

Import explicitly: ``from lora_muon_jax import checkpoint`` (needs
``orbax-checkpoint``; the core package does not import it).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import optax
import orbax.checkpoint as ocp

from lora_muon_jax import sharding as _sharding

__all__ = [
    "abstract_train_state",
    "checkpoint_manager",
    "restore",
    "save",
]


def checkpoint_manager(
    directory: str | os.PathLike[str],
    *,
    max_to_keep: int | None = 3,
    save_interval_steps: int = 1,
    enable_async: bool = True,
) -> ocp.CheckpointManager:
    """A ``CheckpointManager`` for ``save``/``restore`` (one per process, same directory).

    Args:
      directory: absolute path (local, NFS or ``gs://``); created if missing.
      max_to_keep: how many finished checkpoints to keep (``None``: all).
      save_interval_steps: ``save`` writes only steps divisible by this
        (unless ``force=True``).
      enable_async: write in a background thread (training continues; call
        ``manager.wait_until_finished()`` before exiting).
    """
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        save_interval_steps=save_interval_steps,
        enable_async_checkpointing=enable_async,
    )
    return ocp.CheckpointManager(os.fspath(directory), options=options)


def save(
    manager: ocp.CheckpointManager,
    step: int,
    params: Any,
    opt_state: Any,
    *,
    force: bool = False,
) -> bool:
    """Save ``{"params", "opt_state"}`` at ``step`` (asynchronously if the manager is).

    Returns:
      Whether a checkpoint was started (``False`` between save intervals).
    """
    state = {"params": params, "opt_state": opt_state}
    return bool(manager.save(step, args=ocp.args.StandardSave(state), force=force))


def abstract_train_state(
    tx: optax.GradientTransformation,
    params: Any,
    shardings: Any,
) -> dict[str, Any]:
    """Restore target: shapes and dtypes of params and ``tx.init(params)``, with shardings.

    Optimizer-state shardings follow the parameters'
    (``lora_muon_jax.sharding.optimizer_state_shardings``). Nothing is
    allocated: ``params`` may be ``jax.ShapeDtypeStruct`` leaves.

    Args:
      tx: the optimizer the state belongs to.
      params: the parameters (arrays or ``ShapeDtypeStruct``), for shapes and dtypes.
      shardings: the parameters' target shardings (on the mesh restored onto).

    Returns:
      ``{"params": ..., "opt_state": ...}`` of ``ShapeDtypeStruct`` with shardings.
    """
    abstract_params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    abstract_state = jax.eval_shape(tx.init, abstract_params)
    state_shardings = _sharding.optimizer_state_shardings(tx, abstract_params, shardings)

    def with_sharding(x: Any, s: Any) -> Any:
        if isinstance(x, optax.MaskedNode):
            return x
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)

    def is_hole(x: Any) -> bool:
        return isinstance(x, optax.MaskedNode)

    return {
        "params": jax.tree.map(with_sharding, abstract_params, shardings),
        "opt_state": jax.tree.map(with_sharding, abstract_state, state_shardings, is_leaf=is_hole),
    }


def restore(
    manager: ocp.CheckpointManager,
    target: dict[str, Any],
    step: int | None = None,
) -> tuple[int, dict[str, Any]] | None:
    """Restore ``{"params", "opt_state"}`` laid out as ``target`` says.

    Args:
      manager: the manager of the checkpoint directory.
      target: ``abstract_train_state(...)`` for the mesh restored onto.
      step: which step (default: the latest finished one).

    Returns:
      ``(step, state)``, or ``None`` when the directory has no finished checkpoint.
    """
    if step is None:
        step = manager.latest_step()
        if step is None:
            return None
    state = manager.restore(step, args=ocp.args.StandardRestore(target))
    return step, dict(state)
