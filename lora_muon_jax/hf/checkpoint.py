"""HF checkpoints in and out: ``config.json`` + ``*.safetensors`` <-> ``CausalLM``.

``load_pretrained(dir, mesh=...)`` builds the model abstractly and creates every
parameter with ``jax.make_array_from_callback`` straight in its
``NamedSharding``: each device's callback reads only its slice of the tensor
from disk (``SafetensorsIndex.read``), so no process holds a full host copy of
the checkpoint. Config and tensors are cross-checked: a missing, unexpected or
misshapen tensor is a ``ValueError`` naming the HF key, both shapes and the file.

``hf_tensors(params, config)`` maps a (merged) parameter tree back to HF names,
``save_pretrained(...)`` writes a checkpoint ``transformers`` loads.
"""

from __future__ import annotations

import json
import math
import pathlib
import re
import shutil
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from lora_muon_jax.hf.config import DecoderConfig
from lora_muon_jax.hf.model import CausalLM
from lora_muon_jax.hf.safetensors_io import SafetensorsIndex, write_safetensors

Path = tuple[str, ...]
PartitionFn = Callable[[Path, tuple[int, ...]], PartitionSpec]
# Tensors HF checkpoints may carry that the forward pass does not use.
IGNORED = re.compile(r".*\.rotary_emb\.inv_freq$")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
)


def _strings(path: tuple[Any, ...]) -> Path:
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def hf_name(path: Path, *, stacked: bool) -> tuple[str, bool]:
    """HF key of our parameter at ``path`` (``{i}`` for the layer index when stacked), transposed?

    ``kernel`` (ours: ``(in, out)``) is HF's ``weight`` ``(out, in)``; ``embedding`` is
    ``weight``; ``base_module`` (a ``LoRAAdapter``'s pretrained layer) is skipped.
    """
    keys = [k for k in path if k != "base_module"]
    leaf = keys[-1]
    transpose = leaf == "kernel"
    keys[-1] = "weight" if leaf in ("kernel", "embedding") else leaf
    if stacked and len(keys) > 2 and keys[:2] == ["model", "layers"]:
        keys.insert(2, "{i}")
    return ".".join(keys), transpose


def megatron_partition(
    mesh: jax.sharding.Mesh, *, fsdp: str = "fsdp", tp: str = "tp"
) -> PartitionFn:
    """Column-parallel q/k/v/gate/up and lm_head, row-parallel o/down, FSDP on the other axis.

    Axes the mesh lacks or that do not divide the dimension stay unsharded; a
    stacked layer axis is never sharded; norms and biases are replicated.
    """
    sizes = dict(zip(mesh.axis_names, mesh.devices.shape, strict=True))

    def fits(axis: str, dim: int) -> str | None:
        return axis if axis in sizes and dim % sizes[axis] == 0 else None

    def spec(path: Path, shape: tuple[int, ...]) -> PartitionSpec:
        lead = len(shape) - 2
        keys = ["", "", *path]
        name, leaf = keys[-2], keys[-1]
        if leaf == "embedding":
            return PartitionSpec(fits(tp, shape[0]), fits(fsdp, shape[1]))
        if leaf != "kernel" or lead < 0:
            return PartitionSpec()
        d_in, d_out = shape[-2:]
        if name in ("o_proj", "down_proj"):
            return PartitionSpec(*([None] * lead), fits(tp, d_in), fits(fsdp, d_out))
        return PartitionSpec(*([None] * lead), fits(fsdp, d_in), fits(tp, d_out))

    return spec


def _flat_state(tree: Any) -> Iterator[tuple[Path, Any]]:
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        yield _strings(path), leaf


def _reader(
    index: SafetensorsIndex, key: str, transpose: bool, layers: int | None, dtype: Any
) -> Callable[[Any], np.ndarray]:
    """``callback(index) -> ours[index]`` reading only that slice from disk."""

    def read_one(name: str, idx: tuple[Any, ...]) -> np.ndarray:
        if transpose:
            return index.read(name, tuple(reversed(idx))).T
        return index.read(name, idx)

    def callback(idx: Any) -> np.ndarray:
        if layers is not None:
            chosen = range(*idx[0].indices(layers)) if isinstance(idx[0], slice) else [idx[0]]
            out = np.stack([read_one(key.format(i=i), tuple(idx[1:])) for i in chosen])
        else:
            out = read_one(key, tuple(idx))
        return out.astype(dtype)

    return callback


def load_pretrained(
    directory: str | pathlib.Path,
    *,
    scan_layers: bool = False,
    dtype: Any = jnp.float32,
    mesh: jax.sharding.Mesh | None = None,
    partition: PartitionFn | None = None,
) -> CausalLM:
    """A ``CausalLM`` with the weights of the HF checkpoint in ``directory``.

    Args:
      directory: ``config.json`` plus ``model.safetensors`` (or shards with
        ``model.safetensors.index.json``).
      scan_layers: stack the layers (``nnx.scan``) instead of a list.
      dtype: the parameters' dtype (default float32; the file's dtype is cast).
      mesh: place every parameter on this mesh (default: the first device).
      partition: ``f(path, shape) -> PartitionSpec``; default
        ``megatron_partition(mesh)`` (axes ``fsdp`` and ``tp`` where present).

    Raises:
      ValueError: the tensors disagree with ``config.json`` (a missing or
        unexpected tensor, a shape), naming the HF key, both shapes and the file.
    """
    directory = pathlib.Path(directory)
    config = DecoderConfig.from_dir(directory)
    index = SafetensorsIndex(directory)
    abstract = nnx.eval_shape(
        lambda: CausalLM(config, scan_layers=scan_layers, param_dtype=dtype, rngs=nnx.Rngs(0))
    )
    graphdef, state = nnx.split(abstract)
    if mesh is not None and partition is None:
        partition = megatron_partition(mesh)
    used: set[str] = set()
    values = {}
    for path, leaf in _flat_state(nnx.to_pure_dict(state)):
        key, transpose = hf_name(path, stacked=scan_layers)
        names = [key.format(i=i) for i in range(config.num_layers)] if "{i}" in key else [key]
        want = leaf.shape[1:] if "{i}" in key else leaf.shape
        hf_want = tuple(reversed(want)) if transpose else tuple(want)
        for name in names:
            if name not in index:
                raise ValueError(
                    f"{directory}: config.json implies tensor {name!r} {hf_want}, which no "
                    f"safetensors file holds (have e.g. {sorted(index.tensors)[:5]})"
                )
            if index.shape(name) != hf_want:
                raise ValueError(
                    f"{directory}: tensor {name!r} has shape {index.shape(name)} in "
                    f"{index.tensors[name].file.name}, but config.json implies {hf_want}"
                )
            used.add(name)
        sharding = (
            NamedSharding(mesh, partition(path, tuple(leaf.shape)))  # type: ignore[misc]
            if mesh is not None
            else jax.sharding.SingleDeviceSharding(jax.devices()[0])
        )
        values[path] = jax.make_array_from_callback(
            tuple(leaf.shape),
            sharding,
            _reader(index, key, transpose, leaf.shape[0] if "{i}" in key else None, leaf.dtype),
        )
    extra = [n for n in index.tensors if n not in used and not IGNORED.match(n)]
    if config.tie_word_embeddings:
        extra = [n for n in extra if n != "lm_head.weight"]
    if extra:
        raise ValueError(
            f"{directory}: tensors config.json has no place for: {extra[:8]}"
            f"{' ...' if len(extra) > 8 else ''} (a different architecture or config?)"
        )
    pure = nnx.to_pure_dict(state)
    _assign(pure, values)
    nnx.replace_by_pure_dict(state, pure)
    model = nnx.merge(graphdef, state)
    if mesh is not None:
        _annotate_shardings(model, partition)  # type: ignore[arg-type]
    return model


def _assign(tree: dict[Any, Any], values: Mapping[Path, Any]) -> None:
    def walk(node: Any, prefix: Path) -> None:
        for k in list(node):
            p = (*prefix, str(k))
            if isinstance(node[k], dict):
                walk(node[k], p)
            else:
                node[k] = values[p]

    walk(tree, ())


def _annotate_shardings(model: nnx.Module, partition: PartitionFn) -> None:
    """Record each parameter's spec as nnx ``out_sharding`` metadata (nnx.Optimizer, tunix)."""
    for path, variable in nnx.iter_graph(model):
        if isinstance(variable, nnx.Variable):
            spec = partition(_strings(path), tuple(variable.shape))
            variable.set_metadata(
                out_sharding=tuple(spec) + (None,) * (len(variable.shape) - len(spec))
            )


def host_array(x: Any) -> np.ndarray:
    """A NumPy copy of ``x``; a multi-host array is gathered first (every process must call)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def hf_tensors(params: Any, config: DecoderConfig, *, stacked: bool) -> dict[str, np.ndarray]:
    """HF-named numpy tensors of a parameter tree without LoRA factors (merge them first)."""
    out: dict[str, np.ndarray] = {}
    for path, leaf in _flat_state(params):
        key, transpose = hf_name(path, stacked=stacked)
        array = host_array(leaf)
        parts = (
            [(key.format(i=i), array[i]) for i in range(array.shape[0])]
            if "{i}" in key
            else [(key, array)]
        )
        for name, value in parts:
            out[name] = np.ascontiguousarray(value.T if transpose else value)
    if config.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def save_pretrained(
    tensors: Mapping[str, np.ndarray],
    config_source: str | pathlib.Path,
    out_dir: str | pathlib.Path,
    *,
    max_shard_bytes: int = 2 * 1024**3,
) -> pathlib.Path:
    """Write an HF checkpoint: ``config.json`` (and tokenizer files) from ``config_source``.

    Shards above ``max_shard_bytes`` into ``model-0000k-of-0000n.safetensors``
    with ``model.safetensors.index.json``, as ``transformers`` does. In a
    multi-host job only process 0 writes.
    """
    if jax.process_index() != 0:
        return pathlib.Path(out_dir)
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    source = pathlib.Path(config_source)
    for name in ("config.json", *TOKENIZER_FILES):
        if (source / name).is_file():
            shutil.copy(source / name, out_dir / name)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, value in tensors.items():
        if size and size + value.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = value
        size += value.nbytes
    if len(shards) == 1:
        write_safetensors(out_dir / "model.safetensors", shards[0], {"format": "pt"})
        return out_dir
    weight_map = {}
    for k, shard in enumerate(shards, start=1):
        file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(out_dir / file, shard, {"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(math.prod(v.shape) * v.itemsize for v in tensors.values())
    (out_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    return out_dir
