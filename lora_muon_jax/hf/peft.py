"""Adapters out and in: PEFT's format and merged HF checkpoints, from/to a LoRA'd ``CausalLM``.

PEFT stores, per adapted module ``X`` (an HF module path such as
``model.layers.0.self_attn.q_proj``), ``base_model.model.X.lora_A.weight (r, in)``
and ``...lora_B.weight (out, r)`` in ``adapter_model.safetensors`` and applies
``W + (lora_alpha / r) · lora_B @ lora_A`` (``use_rslora``: ``lora_alpha / √r``);
``adapter_config.json`` names ``r``, ``lora_alpha`` and ``target_modules``. Ours:
``lora_a = lora_Aᵀ (in, r)``, ``lora_b = lora_Bᵀ (r, out)``, scale ``s = α / r``.
Works with this package's ``lorafy`` adapters and with qwix's (``kernel_lora_a``),
stacked (scanned) layers included (one PEFT module per layer).
"""

from __future__ import annotations

import json
import math
import pathlib
import re
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx

from lora_muon_jax import _pairs
from lora_muon_jax.flax import params as tree_params
from lora_muon_jax.flax.nnx import lora_dimension_numbers_fn, lora_scale_fn
from lora_muon_jax.flax.surgery import lorafy
from lora_muon_jax.hf.checkpoint import hf_tensors, host_array, save_pretrained
from lora_muon_jax.hf.model import CausalLM
from lora_muon_jax.hf.safetensors_io import SafetensorsIndex, write_safetensors

ScaleArg = float | Callable[[Any], float]
PREFIX = "base_model.model."


def _scale_of(lora_scale: ScaleArg | None, model: CausalLM, pair: _pairs.LoRAPair) -> float:
    if lora_scale is None:
        lora_scale = lora_scale_fn(model, default=1.0)
    return float(lora_scale(pair.name) if callable(lora_scale) else lora_scale)


def _modules(model: CausalLM) -> list[tuple[str, np.ndarray, np.ndarray, _pairs.LoRAPair]]:
    """``(HF module path, lora_a (in, r), lora_b (r, out), pair)`` per adapted module and layer."""
    state = nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam))
    leaves = jax.tree_util.tree_leaves(state)
    out = []
    for pair in _pairs.find_lora_pairs(state, dimension_numbers=lora_dimension_numbers_fn(model)):
        a = host_array(leaves[pair.a_index]).astype(np.float32)
        b = host_array(leaves[pair.b_index]).astype(np.float32)
        path = [k for k in pair.module_path if k != "base_module"]
        nb = pair.dims.num_batch_axes or 0
        if nb == 0:
            out.append((".".join(path), a, b, pair))
        elif nb == 1 and pair.leading_batch_axes and path[:2] == ["model", "layers"]:
            for i in range(a.shape[0]):
                out.append((".".join([*path[:2], str(i), *path[2:]]), a[i], b[i], pair))
        else:
            raise ValueError(f"pair {pair.name}: batch axes {a.shape[:nb]} have no PEFT layout")
    return out


def save_peft_adapter(
    model: CausalLM,
    out_dir: str | pathlib.Path,
    *,
    base_model_name_or_path: str,
    lora_scale: ScaleArg | None = None,
) -> pathlib.Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` that ``peft`` loads.

    ``lora_scale``: each pair's ``s`` (default: ``lora_scale_fn(model)``, i.e. what
    ``lorafy``'s ``alpha / rank`` declared; pass ``alpha / rank`` for qwix).
    Ranks and scales that differ between modules go to PEFT's ``rank_pattern`` /
    ``alpha_pattern``. Multi-host: call on every process (the factors are
    gathered); process 0 writes.
    """
    modules = _modules(model)
    if not modules:
        raise ValueError("save_peft_adapter: the model has no LoRA factors (lorafy it first)")
    tensors, ranks, alphas, targets = {}, {}, {}, set()
    for path, a, b, pair in modules:
        tensors[f"{PREFIX}{path}.lora_A.weight"] = np.ascontiguousarray(a.T)
        tensors[f"{PREFIX}{path}.lora_B.weight"] = np.ascontiguousarray(b.T)
        r = a.shape[-1]
        ranks[path], alphas[path] = r, _scale_of(lora_scale, model, pair) * r
        targets.add(path.rsplit(".", 1)[-1])
    r0 = max(set(ranks.values()), key=list(ranks.values()).count)
    alpha0 = max(set(alphas.values()), key=list(alphas.values()).count)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": r0,
        "lora_alpha": alpha0,
        "target_modules": sorted(targets),
        "rank_pattern": {f"^{re.escape(p)}$": r for p, r in ranks.items() if r != r0},
        "alpha_pattern": {f"^{re.escape(p)}$": a for p, a in alphas.items() if a != alpha0},
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
    out_dir = pathlib.Path(out_dir)
    if jax.process_index() != 0:
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2))
    write_safetensors(out_dir / "adapter_model.safetensors", tensors, {"format": "pt"})
    return out_dir


def save_merged(
    model: CausalLM,
    out_dir: str | pathlib.Path,
    *,
    base_dir: str | pathlib.Path,
    lora_scale: ScaleArg | None = None,
) -> pathlib.Path:
    """``W_pre + s · lora_a ⋅ lora_b`` for every adapter, written as an HF checkpoint.

    The model itself is not changed; ``config.json`` and tokenizer files come from
    ``base_dir`` (the checkpoint the model was loaded from). Multi-host: call on
    every process (each weight is gathered to every host); process 0 writes.
    """
    if lora_scale is None:
        lora_scale = lora_scale_fn(model, default=1.0)
    # On the host: the weights are gathered for writing anyway, and merging there
    # avoids resharding each factor product onto its weight's layout on device.
    params = jax.tree.map(host_array, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    merged = tree_params.merge_lora_params(
        params, lora_scale, dimension_numbers=lora_dimension_numbers_fn(model)
    )
    tensors = hf_tensors(merged, model.config, stacked=model.model.scan_layers)
    return save_pretrained(tensors, base_dir, out_dir)


def load_peft_adapter(
    model: CausalLM, adapter_dir: str | pathlib.Path, *, rngs: nnx.Rngs | None = None
) -> CausalLM:
    """Put a PEFT LoRA adapter on ``model`` (in place) to continue training or evaluate it.

    A model without adapters is ``lorafy``-ed on the adapter's ``target_modules``
    with its ``r`` and ``lora_alpha``; a model with adapters must match them.

    Raises:
      ValueError: not a LoRA adapter, a module the base lacks (an adapter made for
        another base), a factor shape that does not fit the base's layer, or a rank
        that differs from the model's adapters — naming the PEFT key and the shapes.
    """
    adapter_dir = pathlib.Path(adapter_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{adapter_dir}: peft_type={config.get('peft_type')!r}, not LORA")
    for key in ("rank_pattern", "alpha_pattern", "layers_to_transform"):
        if config.get(key):
            raise ValueError(f"{adapter_dir}: {key} is not supported yet")
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    if config.get("use_rslora"):
        alpha = alpha * math.sqrt(r)  # s = lora_alpha / √r = alpha_ours / r
    index = SafetensorsIndex(adapter_dir, "adapter_model.safetensors")
    targets = config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    if not _modules(model):
        pattern = r".*(" + "|".join(re.escape(t) for t in targets) + r")"
        lorafy(model, pattern, rank=r, alpha=alpha, rngs=rngs or nnx.Rngs(0))
    ours = {path: (pair, a.shape, b.shape) for path, a, b, pair in _modules(model)}
    state = nnx.state(model, nnx.LoRAParam)
    originals, treedef = jax.tree_util.tree_flatten(nnx.to_pure_dict(state))
    leaves = [np.array(jax.device_get(x)) for x in originals]
    for key in index.tensors:
        match = re.fullmatch(re.escape(PREFIX) + r"(.+)\.lora_([AB])(?:\.default)?\.weight", key)
        if match is None:
            raise ValueError(f"{adapter_dir}: unexpected tensor {key!r} in a LoRA adapter")
        path, which = match.groups()
        if path not in ours:
            raise ValueError(
                f"{adapter_dir}: adapter module {path!r} does not exist in this model (an adapter "
                f"for another base?); the model's adapted modules include {sorted(ours)[:4]}"
            )
        pair, a_shape, b_shape = ours[path]
        value = index.read(key).astype(np.float32).T  # ours: (in, r) / (r, out)
        want = a_shape if which == "A" else b_shape
        if value.shape != want:
            theirs = value.shape[-1] if which == "A" else value.shape[0]
            what = "rank" if theirs != a_shape[-1] else "layer shape"
            raise ValueError(
                f"{adapter_dir}: {key} has shape {tuple(reversed(value.shape))}, the model's "
                f"adapter there needs {tuple(reversed(want))} (a different {what}: adapter r={r}, "
                f"model rank {a_shape[-1]})"
            )
        target = leaves[pair.a_index if which == "A" else pair.b_index]
        nb = pair.dims.num_batch_axes or 0
        if nb:
            layer = int(path.split(".")[2])
            target[layer] = value
        else:
            target[...] = value
    placed = [
        jax.device_put(x.astype(o.dtype), o.sharding)
        for x, o in zip(leaves, originals, strict=True)
    ]
    pure = jax.tree_util.tree_unflatten(treedef, placed)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)
    return model
