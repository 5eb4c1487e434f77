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

Integrity: orbax checks its own b-tree files but not the array data (one
flipped byte in a data file restores without error, with a changed value), so
every checkpoint also carries a second orbax item, ``checksums`` (JSON,
finalized atomically with the state): per array its tree path, shape, dtype
and a 64-bit content checksum. The checksum is a jitted reduction over the
global array, a wrapping uint32 sum of a per-element hash of (flat index,
bits): integer sums are exact in any order, so every process, mesh and device
count computes the same value, each device hashing only its own shards.
``restore``/``restore_nnx`` recompute it on the restored arrays and raise
``CorruptCheckpointError`` (a ``ValueError``) naming the step, the array's path
and both checksums; a file orbax cannot read (truncated, missing) raises it too,
naming the step and directory. ``restore_latest_intact`` falls back to the
newest checkpoint that verifies. Checkpoints written before the checksums
existed restore with a ``UserWarning`` (unverified). On several hosts every
verdict is shared (a failure on one process fails the step on all, so all fall
back alike); a read error that only some processes hit first waits out orbax's
own end-of-restore barrier, which has not been exercised here (the multi-process
test, ``tests/test_tpu_entry.py``, covers intact checkpoints only).

Flax NNX training state (``nnx.Optimizer`` + model) has its own pair,
``save_nnx`` / ``restore_nnx``: they save plain nested dicts of arrays
(``nnx.to_pure_dict``), the adapters alone or adapters + base, and restore
into an existing model and optimizer built on the mesh wanted now, so the run
continues on another mesh or device count.

Import explicitly: ``from lora_muon_jax import checkpoint`` (needs
``orbax-checkpoint``; ``save_nnx``/``restore_nnx`` need ``flax``; the core
package imports neither).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import jax
import optax
import orbax.checkpoint as ocp

from lora_muon_jax import sharding as _sharding
from lora_muon_jax._checkpoint_integrity import (
    CHECKSUM_FORMAT,
    CHECKSUMS_ITEM,
    STATE_ITEM,
    CorruptCheckpointError,
    check_record_fits,
    checksums,
    read_record,
    restore_checked,
    save_checked,
    shape_differences,
    step_name,
)

__all__ = [
    "CHECKSUM_FORMAT",
    "CorruptCheckpointError",
    "abstract_train_state",
    "checkpoint_manager",
    "checksums",
    "restore",
    "restore_latest_intact",
    "restore_nnx",
    "save",
    "save_nnx",
]


def checkpoint_manager(
    directory: str | os.PathLike[str],
    *,
    max_to_keep: int | None = 3,
    save_interval_steps: int = 1,
    enable_async: bool = True,
) -> ocp.CheckpointManager:
    """A ``CheckpointManager`` for ``save``/``restore`` (one per process, same directory).

    Each step holds two orbax items: ``default`` (the state, ``StandardCheckpointHandler``;
    the name orbax gives a single item, so older single-item checkpoints restore) and
    ``checksums`` (JSON). ``save``/``restore`` and the NNX pair need a manager made here.

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
    return ocp.CheckpointManager(
        os.fspath(directory),
        options=options,
        item_handlers={
            STATE_ITEM: ocp.StandardCheckpointHandler(),
            CHECKSUMS_ITEM: ocp.JsonCheckpointHandler(),
        },
    )


def save(
    manager: ocp.CheckpointManager,
    step: int,
    params: Any,
    opt_state: Any,
    *,
    force: bool = False,
) -> bool:
    """Save ``{"params", "opt_state"}`` at ``step`` (asynchronously if the manager is).

    Every array's content checksum (``checksums``) is saved with it, as the
    checkpoint's ``checksums`` item; computing them waits for ``params`` and
    ``opt_state`` (orbax's copy to the host does too).

    Returns:
      Whether a checkpoint was started (``False`` between save intervals).
    """
    state = {"params": params, "opt_state": opt_state}
    return save_checked(manager, step, state, force)


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

    Raises:
      CorruptCheckpointError: an array's checksum differs from the saved one, or a
        file cannot be read (truncated, missing); the message names the step and
        the array's path.
      ValueError: ``target`` has other paths or shapes than the checkpoint.
    """
    if step is None:
        step = manager.latest_step()
        if step is None:
            return None
    _, record = read_record(manager, step)
    check_record_fits(step_name(manager, step), record, target)
    state = restore_checked(manager, step, target, record)
    return step, dict(state)


def _nnx_state(model: Any, optimizer: Any, include_base: bool) -> dict[str, Any]:
    from flax import nnx

    wanted = nnx.Param if include_base else nnx.LoRAParam
    state: dict[str, Any] = {"model": nnx.to_pure_dict(nnx.state(model, wanted))}
    if optimizer is not None:
        state["optimizer"] = nnx.to_pure_dict(nnx.state(optimizer, nnx.optimizer.OptState))
    return state


def _shapes_by_path(tree: Any) -> dict[str, tuple[int, ...]]:
    def name(path: Any) -> str:
        return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)

    return {name(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _check_fits(
    manager: ocp.CheckpointManager, step: int, metadata: Any, current: Any, include_base: bool
) -> None:
    """Raise ``ValueError`` naming the first path where checkpoint and target differ."""
    saved = _shapes_by_path(metadata)
    wanted = _shapes_by_path(current)
    where = f"{step_name(manager, step)} does not fit"
    missing, extra, differ = shape_differences(saved, wanted)
    if missing or extra:
        hint = "" if not extra else f" (saved with include_base={not include_base}?)"
        raise ValueError(
            f"{where} (include_base={include_base}): model/optimizer paths not in the checkpoint "
            f"{missing[:3]}{'...' if len(missing) > 3 else ''}, checkpoint paths not in the "
            f"model/optimizer {extra[:3]}{'...' if len(extra) > 3 else ''}{hint}"
        )
    if differ is not None:
        raise ValueError(
            f"{where}: {differ} has shape {saved[differ]} in the checkpoint, {wanted[differ]} "
            "here (another rank or model size?)"
        )


def save_nnx(
    manager: ocp.CheckpointManager,
    step: int,
    model: Any,
    optimizer: Any = None,
    *,
    include_base: bool = False,
    force: bool = False,
) -> bool:
    """Save a Flax NNX model's adapters (or all its parameters) and its ``nnx.Optimizer``.

    The checkpoint is ``{"model": ..., "optimizer": ...}`` of plain nested dicts
    of arrays: the model's ``nnx.LoRAParam`` values (``include_base=True``: every
    ``nnx.Param``, base weights included) and the optimizer's step and
    ``opt_state``. Every process of a multi-host job must call it.

    Args:
      manager: ``checkpoint_manager(directory)``.
      step: the step number to save under (e.g. ``int(optimizer.step.value)``).
      model: the ``nnx.Module`` trained.
      optimizer: its ``nnx.Optimizer`` (``None``: the model alone).
      include_base: also save the frozen base weights (default: adapters only;
        the base comes back from its own checkpoint).
      force: save even between ``save_interval_steps``.

    Returns:
      Whether a checkpoint was started.
    """
    state = _nnx_state(model, optimizer, include_base)
    return save_checked(manager, step, state, force)


def restore_nnx(
    manager: ocp.CheckpointManager,
    model: Any,
    optimizer: Any = None,
    *,
    include_base: bool = False,
    step: int | None = None,
) -> int | None:
    """Restore ``save_nnx``'s checkpoint into ``model`` (and ``optimizer``) in place.

    The arrays come back with the shardings that ``model``'s and ``optimizer``'s
    current arrays have: build them on the mesh wanted now (e.g.
    ``hf.load_pretrained(dir, mesh=new_mesh)``, ``finetune.adapt(..., mesh=new_mesh)``,
    ``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)``), then restore; orbax reads
    each device's slice, so the mesh shape and device count may differ from the
    saving run's. Pass the same ``include_base`` and optimizer as when saving.

    Returns:
      The step restored, or ``None`` when the directory has no finished checkpoint
      (``model`` and ``optimizer`` are then left as they are).

    Raises:
      CorruptCheckpointError: the checkpoint does not read back as saved (an
        array's checksum differs, a file is truncated or missing); the message
        names the step and the array's path. ``model`` and ``optimizer`` are then
        left as they are.
      ValueError: the checkpoint's tree differs from the model's/optimizer's
        (another architecture, rank, optimizer, or ``include_base`` setting);
        the message names both.
    """
    from flax import nnx

    if step is None:
        step = manager.latest_step()
        if step is None:
            return None
    current = _nnx_state(model, optimizer, include_base)
    metadata, record = read_record(manager, step)
    _check_fits(manager, step, metadata, current, include_base)
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), current
    )
    restored = restore_checked(manager, step, target, record)
    wanted = nnx.Param if include_base else nnx.LoRAParam
    model_state = nnx.state(model, wanted)
    nnx.replace_by_pure_dict(model_state, restored["model"])
    nnx.update(model, model_state)
    if optimizer is not None:
        opt_state = nnx.state(optimizer, nnx.optimizer.OptState)
        nnx.replace_by_pure_dict(opt_state, restored["optimizer"])
        nnx.update(optimizer, opt_state)
    return step


def restore_latest_intact(
    manager: ocp.CheckpointManager,
    model: Any,
    optimizer: Any = None,
    *,
    include_base: bool = False,
    delete_corrupt: bool = False,
    log: Callable[[str], None] = print,
) -> int | None:
    """``restore_nnx`` from the newest checkpoint that verifies, falling back to older ones.

    Each step that raises ``CorruptCheckpointError`` is reported through ``log``
    (which step, why) and the next older one is tried. A checkpoint that does not
    fit the model still raises ``ValueError``: that is a configuration error, not
    a fault to skip past. Every process of a multi-host job must call it (they
    agree on each verdict).

    Args:
      manager: ``checkpoint_manager(directory)``.
      model, optimizer, include_base: as for ``restore_nnx``.
      delete_corrupt: delete the steps that failed (all newer than the one
        restored). A run that continues from an older step needs this: orbax
        saves no step at or below the newest one on disk. Default: leave the
        files as they are.
      log: where the reports go (e.g. process 0's ``print``).

    Returns:
      The step restored, or ``None`` when no checkpoint is intact (or there is
      none); ``model`` and ``optimizer`` are then left as they are.
    """
    steps = sorted(manager.all_steps(), reverse=True)
    restored, failed = None, []
    for i, step in enumerate(steps):
        try:
            restored = restore_nnx(manager, model, optimizer, include_base=include_base, step=step)
            break
        except CorruptCheckpointError as err:
            then = f"trying step {steps[i + 1]}" if i + 1 < len(steps) else "no older one"
            log(f"checkpoint step {step} is unusable, {then}: {err}")
            failed.append(step)
    if restored is None and steps:
        log(
            f"no intact checkpoint in {manager.directory} (steps {sorted(steps)} all failed "
            "verification): starting from scratch"
        )
    if delete_corrupt and failed:
        log(f"deleting the unusable checkpoint steps {sorted(failed)}")
        for step in failed:
            manager.delete(step)
    return restored
