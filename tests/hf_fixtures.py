"""Tiny random HF checkpoints built offline with ``transformers`` (2 layers, torch CPU)."""

from __future__ import annotations

import os
import pathlib

import numpy as np

VOCAB = 300  # >= 256: byte-level text works without a tokenizer file


def make_checkpoint(
    directory: pathlib.Path,
    kind: str,
    *,
    seed: int = 0,
    tie: bool = False,
    shard: bool = False,
    hidden: int = 64,
) -> pathlib.Path:
    """Save a random ``LlamaForCausalLM`` / ``Qwen2…`` / ``Qwen3…`` and return its directory.

    Norm weights are perturbed too (HF initialises them to 1, which would hide a
    wrong norm); ``shard`` writes several safetensors files with an index.
    """
    import torch
    import transformers

    torch.manual_seed(seed)
    common = dict(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
    )
    if kind == "llama":
        config = transformers.LlamaConfig(rms_norm_eps=1e-5, rope_theta=10000.0, **common)
        model = transformers.LlamaForCausalLM(config)
    elif kind == "llama3_rope":  # Llama 3.1's frequency-dependent RoPE scaling
        config = transformers.LlamaConfig(
            rms_norm_eps=1e-5,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
            **common,
        )
        model = transformers.LlamaForCausalLM(config)
    elif kind == "qwen2":
        config = transformers.Qwen2Config(rms_norm_eps=1e-6, rope_theta=10000.0, **common)
        model = transformers.Qwen2ForCausalLM(config)
    elif kind == "qwen3":
        config = transformers.Qwen3Config(rms_norm_eps=1e-6, rope_theta=10000.0, **common)
        model = transformers.Qwen3ForCausalLM(config)
    else:
        raise ValueError(kind)
    model = model.float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(
        directory, safe_serialization=True, max_shard_size="20KB" if shard else "5GB"
    )
    return directory


def torch_logits(directory: pathlib.Path, tokens: np.ndarray, adapter: pathlib.Path | None = None):  # type: ignore[no-untyped-def]
    """Logits of the checkpoint (with a PEFT adapter on top, if given) in float32."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    if adapter is not None:
        import peft

        model = peft.PeftModel.from_pretrained(model, adapter)
    model.eval()
    with torch.no_grad():
        return model(torch.as_tensor(np.array(tokens), dtype=torch.long)).logits.numpy()


def tokens(batch: int = 2, length: int = 12, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, (batch, length)).astype(np.int32)


# Where the README's main job leaves its pretrained base, relative to a clone.
QUICK_BASE = "experiments/results/finetune_study/quick/base"
SHAKESPEARE = pathlib.Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare.txt"


def clone_after_main_job(tmp: pathlib.Path) -> pathlib.Path:
    """A directory laid out like a clone after the README's main job, for running its blocks.

    The base checkpoint at ``QUICK_BASE`` is a tiny random 2-layer Llama saved by
    ``transformers``; ``../shared/data/tinyshakespeare.txt`` beside it links to the real file.
    """
    import pytest

    if not SHAKESPEARE.exists():
        pytest.skip(f"needs {SHAKESPEARE}")
    work = tmp / "clone"
    make_checkpoint(work / QUICK_BASE, "llama")
    (tmp / "shared" / "data").mkdir(parents=True)
    (tmp / "shared" / "data" / "tinyshakespeare.txt").symlink_to(SHAKESPEARE)
    return work


def fast_compile_env(cache: pathlib.Path) -> dict[str, str]:
    """Environment of a subprocess that restarts JAX often: a persistent compilation cache
    (restarts skip compiling) and unoptimised XLA CPU code, which compiles ~2.5x faster
    (27 s → 11 s CPU per run of tests/test_tpu_entry.py). Runs that are compared with each
    other must all use it."""
    return {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "JAX_COMPILATION_CACHE_DIR": str(cache),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
        "XLA_FLAGS": " ".join(
            [
                os.environ.get("XLA_FLAGS", ""),
                "--xla_backend_optimization_level=0",
                "--xla_llvm_disable_expensive_passes=true",
            ]
        ).strip(),
    }
