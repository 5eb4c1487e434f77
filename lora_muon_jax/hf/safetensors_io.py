"""Read slices of ``*.safetensors`` tensors without loading whole files; write checkpoints.

The format is an 8-byte little-endian header length, a JSON header
``{name: {"dtype", "shape", "data_offsets"}}`` and the raw row-major bytes. A
tensor is read through a read-only ``numpy.memmap``, so indexing it copies only
the requested slice — what ``jax.make_array_from_callback`` asks for on each
device (every process reads just its shards). bfloat16 maps to
``ml_dtypes.bfloat16``, which numpy's own safetensors backend does not read.
"""

from __future__ import annotations

import json
import pathlib
import struct
from collections.abc import Mapping
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np

DTYPES: dict[str, Any] = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_NAMES = {np.dtype(v): k for k, v in DTYPES.items()}


class TensorInfo(NamedTuple):
    file: pathlib.Path
    dtype: str  # safetensors dtype code, e.g. "BF16"
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the file


def read_header(file: pathlib.Path) -> tuple[dict[str, Any], int]:
    with open(file, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{file}: not a safetensors file (truncated header)")
        (length,) = struct.unpack("<Q", raw)
        header = json.loads(f.read(length))
    return header, 8 + length


class SafetensorsIndex:
    """Every tensor of a checkpoint directory: its file, dtype, shape and offset.

    Reads ``model.safetensors.index.json`` when present (a sharded checkpoint),
    else every ``*.safetensors`` file of the directory.
    """

    def __init__(self, directory: str | pathlib.Path, pattern: str = "*.safetensors"):
        directory = pathlib.Path(directory)
        files = sorted(directory.glob(pattern))
        index_file = directory / "model.safetensors.index.json"
        if index_file.is_file():
            weight_map = json.loads(index_file.read_text()).get("weight_map", {})
            files = sorted({directory / name for name in weight_map.values()})
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise FileNotFoundError(f"{index_file}: lists missing shard files {missing}")
        if not files:
            raise FileNotFoundError(f"{directory}: no {pattern} files")
        self.tensors: dict[str, TensorInfo] = {}
        for file in files:
            header, data_start = read_header(file)
            for name, meta in header.items():
                if name == "__metadata__":
                    continue
                if name in self.tensors:
                    raise ValueError(f"{directory}: tensor {name!r} appears in two files")
                start, _ = meta["data_offsets"]
                self.tensors[name] = TensorInfo(
                    file, meta["dtype"], tuple(meta["shape"]), data_start + start
                )

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name].shape

    def read(self, name: str, index: Any = ...) -> np.ndarray:
        """``tensor[index]`` as a numpy array (only that slice is read from disk)."""
        info = self.tensors[name]
        if info.dtype not in DTYPES:
            raise ValueError(f"{info.file}: tensor {name!r} has unsupported dtype {info.dtype}")
        data = np.memmap(
            info.file, dtype=DTYPES[info.dtype], mode="r", offset=info.offset, shape=info.shape
        )
        return np.array(data[index])


def write_safetensors(
    file: str | pathlib.Path,
    tensors: Mapping[str, np.ndarray],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write ``tensors`` (numpy arrays, bfloat16 via ml_dtypes) as one safetensors file."""
    header: dict[str, Any] = {}
    offset = 0
    arrays = {}
    for name, value in tensors.items():
        array = np.ascontiguousarray(value)
        if array.dtype not in _NAMES:
            raise TypeError(f"{name}: dtype {array.dtype} cannot be written to safetensors")
        arrays[name] = array
        header[name] = {
            "dtype": _NAMES[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
    if metadata:
        header["__metadata__"] = dict(metadata)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # align the data to 8 bytes
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for array in arrays.values():
            f.write(array.tobytes())
