"""Content integrity of ``lora_muon_jax.checkpoint``: per-array checksums and verified I/O.

Orbax checks its own b-tree files but not the array data, so every checkpoint
carries a second item, ``checksums`` (JSON): per array its tree path, shape,
dtype and a 64-bit checksum, a jitted wrapping-uint32 sum of a per-element hash
of (flat index, bits). Integer sums are exact in any order, so every process,
mesh and device count computes the same value, each device hashing only its
own shards. See ``lora_muon_jax.checkpoint`` for the user-facing contract.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax import lax

# The state's orbax item: "default" is the name single-item managers gave it, so
# checkpoints written before the checksums item existed restore unchanged.
STATE_ITEM = "default"
CHECKSUMS_ITEM = "checksums"
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


def save_checked(manager: ocp.CheckpointManager, step: int, state: Any, force: bool) -> bool:
    if not force and not manager.should_save(step):
        return False  # between save intervals: no checksums to compute
    record = {"format": CHECKSUM_FORMAT, "step": step, "arrays": checksums(state)}
    args = ocp.args.Composite(
        **{STATE_ITEM: ocp.args.StandardSave(state), CHECKSUMS_ITEM: ocp.args.JsonSave(record)}
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


def step_name(manager: ocp.CheckpointManager, step: int) -> str:
    return f"checkpoint step {step} in {manager.directory}"


def read_record(manager: ocp.CheckpointManager, step: int) -> tuple[Any, dict[str, Any] | None]:
    """The state item's orbax metadata and the checksums record (``None``: an older checkpoint)."""
    where = step_name(manager, step)
    failure, metadata, record = None, None, None
    try:
        composite = manager.item_metadata(step)
        metadata = composite[STATE_ITEM]
        if CHECKSUMS_ITEM in composite.keys():
            got = manager.restore(
                step, args=ocp.args.Composite(**{CHECKSUMS_ITEM: ocp.args.JsonRestore()})
            )
            record = got[CHECKSUMS_ITEM]
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


def restore_checked(
    manager: ocp.CheckpointManager,
    step: int,
    target: Any,
    record: dict[str, Any] | None,
) -> Any:
    """Restore the state item onto ``target`` and verify it against ``record``."""
    where = step_name(manager, step)
    failure, state = None, None
    try:
        restored = manager.restore(
            step, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(target)})
        )
        state = restored[STATE_ITEM]
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


def shape_differences(
    saved: dict[str, tuple[int, ...]], wanted: dict[str, tuple[int, ...]]
) -> tuple[list[str], list[str], str | None]:
    """Paths only in ``wanted``, only in ``saved`` (sorted), and the first common path
    whose shapes differ (``None`` if none): what makes a checkpoint not fit a target."""
    missing, extra = sorted(set(wanted) - set(saved)), sorted(set(saved) - set(wanted))
    differ = next((p for p, shape in wanted.items() if p in saved and saved[p] != shape), None)
    return missing, extra, differ


def check_record_fits(where: str, record: dict[str, Any] | None, target: Any) -> None:
    """Raise ``ValueError`` (not corruption) when ``target`` has other paths or shapes."""
    if record is None:
        return
    saved = {p: tuple(a["shape"]) for p, a in record["arrays"].items()}
    wanted = {_path_name(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(target)}
    missing, extra, differ = shape_differences(saved, wanted)
    if missing or extra:
        raise ValueError(
            f"{where} does not fit: target paths not in the checkpoint {missing[:3]}, "
            f"checkpoint paths not in the target {extra[:3]}"
        )
    if differ is not None:
        raise ValueError(
            f"{where} does not fit: {differ} has shape {saved[differ]} in the checkpoint, "
            f"{wanted[differ]} in the target"
        )
