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

import functools
import os
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax import lax

from lora_muon_jax import sharding as _sharding

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

# The state's orbax item: "default" is the name single-item managers gave it, so
# checkpoints written before the checksums item existed restore unchanged.
_STATE_ITEM = "default"
_CHECKSUMS_ITEM = "checksums"
# Bump when the hash changes: a checkpoint of another format is refused, not misverified.
CHECKSUM_FORMAT = "lora_muon_jax.checkpoint/fmix32-sum-2x32/1"
# MurmurHash3's 32-bit finalizer (Austin Appleby, public domain) and the golden-ratio
# increment; two lanes seeded with hex digits of pi make a 64-bit checksum.
_FMIX_MUL = (np.uint32(0x85EBCA6B), np.uint32(0xC2B2AE35))
_GOLDEN = np.uint32(0x9E3779B9)
_LANE_SEEDS = (np.uint32(0x243F6A88), np.uint32(0x85A308D3))


class CorruptCheckpointError(ValueError):
    """A checkpoint that does not read back as it was saved (flipped bits, truncated files).

    The message names the step, the directory and, for a checksum mismatch, the
    array's tree path with both checksums. ``restore_latest_intact`` falls back
    past these, and only these: a checkpoint that does not *fit* the model
    (another rank, architecture) raises a plain ``ValueError``.
    """


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
            _STATE_ITEM: ocp.StandardCheckpointHandler(),
            _CHECKSUMS_ITEM: ocp.JsonCheckpointHandler(),
        },
    )


def _fmix32(h: jax.Array) -> jax.Array:
    h = h ^ lax.shift_right_logical(h, np.uint32(16))
    h = h * _FMIX_MUL[0]
    h = h ^ lax.shift_right_logical(h, np.uint32(13))
    h = h * _FMIX_MUL[1]
    return h ^ lax.shift_right_logical(h, np.uint32(16))


def _words(x: jax.Array) -> jax.Array:
    """The bits of ``x`` as uint32 words, one per element (two for 64-bit types, trailing axis)."""
    dtype = x.dtype
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return _words(jax.random.key_data(x))
    if dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    if jnp.issubdtype(dtype, jnp.complexfloating):
        return jnp.stack([_words(jnp.real(x)), _words(jnp.imag(x))], axis=-1)
    bits = (jnp.iinfo(dtype) if jnp.issubdtype(dtype, jnp.integer) else jnp.finfo(dtype)).bits
    if bits >= 32:  # 32 bits: one word; 64 bits: lax adds a trailing axis of 2 words
        return lax.bitcast_convert_type(x, jnp.uint32)
    if bits in (8, 16):
        return lax.bitcast_convert_type(x, jnp.dtype(f"uint{bits}")).astype(jnp.uint32)
    # Sub-byte types (int4, float4): their values convert exactly.
    wide = jnp.int32 if jnp.issubdtype(dtype, jnp.integer) else jnp.float32
    return lax.bitcast_convert_type(x.astype(wide), jnp.uint32)


def _checksum(x: jax.Array) -> jax.Array:
    """``uint32[2]``: per lane, Σ_i fmix32(bits_i ^ fmix32(i·φ + seed)) mod 2³².

    For a fixed index i the term is a bijection of the element's bits, so any one
    changed element changes both lanes; other changes go undetected with
    probability ~2⁻⁶⁴. The sum is over uint32 (exact, wrapping), so its value does
    not depend on the sharding or the reduction order.
    """
    w = _words(x)
    index = jnp.zeros(w.shape, jnp.uint32)
    for axis, size in enumerate(w.shape):  # row-major flat index, wrapping past 2³²
        index = index * np.uint32(size) + lax.broadcasted_iota(jnp.uint32, w.shape, axis)
    lanes = [
        jnp.sum(_fmix32(w ^ _fmix32(index * _GOLDEN + seed)), dtype=jnp.uint32)
        for seed in _LANE_SEEDS
    ]
    return jnp.stack(lanes)


def _checksum_all(leaves: list[Any]) -> jax.Array:
    """``uint32[len(leaves), 2]``: every leaf's checksum, in one program."""
    return jnp.stack([_checksum(x) for x in leaves])


@functools.cache
def _checksum_fn(out_sharding: Any) -> Callable[[list[Any]], jax.Array]:
    """``_checksum_all`` jitted, its result replicated on ``out_sharding``'s devices."""
    return jax.jit(_checksum_all, out_shardings=out_sharding)


def _group(x: Any) -> Any:
    """Leaves on one mesh share one program (their all-reduces fuse into one)."""
    sharding = getattr(x, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    if isinstance(sharding, jax.sharding.SingleDeviceSharding):
        return sharding
    return None  # numpy, Python scalars: jit's default device


def _path_name(path: Any) -> str:
    return jax.tree_util.keystr(path)


def checksums(tree: Any) -> dict[str, dict[str, Any]]:
    """``{tree path: {"shape", "dtype", "checksum"}}`` of every array leaf of ``tree``.

    ``checksum`` is 16 hex digits (two 32-bit lanes; see ``_checksum``), computed on
    the devices that hold each array, shard by shard, and reduced exactly: the same
    value on every process of a multi-host job and for any sharding of the same
    values. What ``save`` stores and ``restore`` compares.
    """
    flat = [
        (path, x if hasattr(x, "dtype") else jnp.asarray(x))  # Python scalars
        for path, x in jax.tree_util.tree_leaves_with_path(tree)
    ]
    groups: dict[Any, list[int]] = {}
    for i, (_, x) in enumerate(flat):
        groups.setdefault(_group(x), []).append(i)
    host = np.zeros((len(flat), 2), np.uint32)
    for out, indices in groups.items():
        # One program at a time: several multi-device programs with all-reduces in
        # flight at once can deadlock XLA's CPU backend (seen with 8 CPU devices).
        sums = _checksum_fn(out)([flat[i][1] for i in indices])
        host[indices] = np.asarray(jax.device_get(sums))
    return {
        _path_name(path): {
            "shape": list(x.shape),
            "dtype": str(x.dtype),
            "checksum": f"{int(lanes[0]):08x}{int(lanes[1]):08x}",
        }
        for (path, x), lanes in zip(flat, host, strict=True)
    }


def _save_checked(manager: ocp.CheckpointManager, step: int, state: Any, force: bool) -> bool:
    if not force and not manager.should_save(step):
        return False  # between save intervals: no checksums to compute
    record = {"format": CHECKSUM_FORMAT, "step": step, "arrays": checksums(state)}
    args = ocp.args.Composite(
        **{_STATE_ITEM: ocp.args.StandardSave(state), _CHECKSUMS_ITEM: ocp.args.JsonSave(record)}
    )
    return bool(manager.save(step, args=args, force=force))


def _brief(err: BaseException) -> str:
    """The first line of an error, without tensorstore's spec dump."""
    text = str(err).split(" [tensorstore_spec=", 1)[0].strip().splitlines()
    line = text[0] if text else ""
    return f"{type(err).__name__}: {line[:600]}"


def _agreed(failure: str | None) -> str | None:
    """Every process's verdict: a failure on any process is a failure on all (same fallback).

    With several processes the failures' first 1000 bytes are all-gathered, so
    every process reports the first failing process's reason.
    """
    if jax.process_count() == 1:
        return failure
    from jax.experimental import multihost_utils

    mine = np.zeros(1000, np.uint8)
    text = (failure or "").encode()[:1000]
    mine[: len(text)] = np.frombuffer(text, np.uint8)
    everyone = np.asarray(multihost_utils.process_allgather(mine))  # (processes, 1000)
    if failure is not None:
        return failure
    for process, row in enumerate(everyone):
        if row.any():
            return f"(on process {process}) {bytes(row).rstrip(bytes(1)).decode(errors='replace')}"
    return None


_UNREADABLE = "could not be read (a truncated, missing or corrupted file?): {}"


def _where(manager: ocp.CheckpointManager, step: int) -> str:
    return f"checkpoint step {step} in {manager.directory}"


def _read_record(manager: ocp.CheckpointManager, step: int) -> tuple[Any, dict[str, Any] | None]:
    """The state item's orbax metadata and the checksums record (``None``: an older checkpoint)."""
    where = _where(manager, step)
    failure, metadata, record = None, None, None
    try:
        composite = manager.item_metadata(step)
        metadata = composite[_STATE_ITEM]
        if _CHECKSUMS_ITEM in composite.keys():
            got = manager.restore(
                step, args=ocp.args.Composite(**{_CHECKSUMS_ITEM: ocp.args.JsonRestore()})
            )
            record = got[_CHECKSUMS_ITEM]
            if not (
                isinstance(record, dict)
                and record.get("format") == CHECKSUM_FORMAT
                and record.get("step") == step
                and isinstance(record.get("arrays"), dict)
            ):
                failure = (
                    f"has a checksums item that is not step {step}'s in format "
                    f"{CHECKSUM_FORMAT!r} (got {str(record)[:200]})"
                )
    except Exception as err:  # orbax/tensorstore/json raise many types for unreadable files
        failure = _UNREADABLE.format(_brief(err))
    failure = _agreed(failure)
    if failure is not None:
        raise CorruptCheckpointError(f"{where} {failure}")
    return metadata, record


def _restore_checked(
    manager: ocp.CheckpointManager,
    step: int,
    target: Any,
    record: dict[str, Any] | None,
) -> Any:
    """Restore the state item onto ``target`` and verify it against ``record``."""
    where = _where(manager, step)
    failure, state = None, None
    try:
        restored = manager.restore(
            step, args=ocp.args.Composite(**{_STATE_ITEM: ocp.args.StandardRestore(target)})
        )
        state = restored[_STATE_ITEM]
    except Exception as err:  # tensorstore: DATA_LOSS, OUT_OF_RANGE, NOT_FOUND, ...
        failure = _UNREADABLE.format(_brief(err))
    failure = _agreed(failure)
    if failure is not None:
        raise CorruptCheckpointError(f"{where} {failure}")
    if record is None:
        warnings.warn(
            f"{where} has no content checksums (written before lora_muon_jax saved them): "
            "restored unverified",
            UserWarning,
            stacklevel=3,
        )
        return state
    _verify(where, record["arrays"], checksums(state))
    return state


def _verify(where: str, saved: dict[str, Any], got: dict[str, Any]) -> None:
    """Compare checksums by path; a dtype change (orbax casts to the target) is unverifiable."""
    cast = [p for p in got if p in saved and saved[p]["dtype"] != got[p]["dtype"]]
    if cast:
        warnings.warn(
            f"{where}: {len(cast)} arrays restored in another dtype than saved, not verified: "
            + ", ".join(f"{p} ({saved[p]['dtype']} -> {got[p]['dtype']})" for p in cast[:3]),
            UserWarning,
            stacklevel=4,
        )
    bad = [
        p
        for p in got
        if p in saved and p not in cast and saved[p]["checksum"] != got[p]["checksum"]
    ]
    if bad:
        first = bad[0]
        raise CorruptCheckpointError(
            f"{where} is corrupted: {first} (shape {tuple(got[first]['shape'])}, "
            f"{got[first]['dtype']}) reads back with checksum {got[first]['checksum']}, "
            f"saved with {saved[first]['checksum']}"
            + (f"; also {bad[1:4]}{'...' if len(bad) > 4 else ''}" if len(bad) > 1 else "")
        )
    missing = sorted(set(saved) - set(got))
    if missing:  # a subset restored: the rest of the checkpoint is not checked
        raise ValueError(f"{where}: arrays saved but not restored {missing[:3]}")


def _check_record_fits(where: str, record: dict[str, Any] | None, target: Any) -> None:
    """Raise ``ValueError`` (not corruption) when ``target`` has other paths or shapes."""
    if record is None:
        return
    saved = {p: tuple(a["shape"]) for p, a in record["arrays"].items()}
    wanted = {_path_name(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(target)}
    missing, extra = sorted(set(wanted) - set(saved)), sorted(set(saved) - set(wanted))
    if missing or extra:
        raise ValueError(
            f"{where} does not fit: target paths not in the checkpoint {missing[:3]}, "
            f"checkpoint paths not in the target {extra[:3]}"
        )
    for path, shape in wanted.items():
        if saved[path] != shape:
            raise ValueError(
                f"{where} does not fit: {path} has shape {saved[path]} in the checkpoint, "
                f"{shape} in the target"
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
    return _save_checked(manager, step, state, force)


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
    _, record = _read_record(manager, step)
    _check_record_fits(_where(manager, step), record, target)
    state = _restore_checked(manager, step, target, record)
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
    where = f"{_where(manager, step)} does not fit"
    missing = sorted(set(wanted) - set(saved))
    extra = sorted(set(saved) - set(wanted))
    if missing or extra:
        hint = "" if not extra else f" (saved with include_base={not include_base}?)"
        raise ValueError(
            f"{where} (include_base={include_base}): model/optimizer paths not in the checkpoint "
            f"{missing[:3]}{'...' if len(missing) > 3 else ''}, checkpoint paths not in the "
            f"model/optimizer {extra[:3]}{'...' if len(extra) > 3 else ''}{hint}"
        )
    for path, shape in wanted.items():
        if saved[path] != shape:
            raise ValueError(
                f"{where}: {path} has shape {saved[path]} in the checkpoint, {shape} here "
                "(another rank or model size?)"
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
    return _save_checked(manager, step, state, force)


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
    metadata, record = _read_record(manager, step)
    _check_fits(manager, step, metadata, current, include_base)
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), current
    )
    restored = _restore_checked(manager, step, target, record)
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
