"""HuggingFace decoders in JAX: checkpoints in, LoRA on them, merged checkpoints and PEFT out.

Needs ``pip install -e ".[hf]"`` (flax, ml_dtypes; ``tokenizers`` for tokenizer
files). Llama-, Mistral- and Qwen-family (Qwen2, Qwen3) ``*ForCausalLM``
checkpoints: ``config.json`` plus ``*.safetensors``, sharded index included.
"""

from lora_muon_jax.hf.checkpoint import (
    hf_name,
    hf_tensors,
    load_pretrained,
    megatron_partition,
    save_pretrained,
)
from lora_muon_jax.hf.config import DecoderConfig
from lora_muon_jax.hf.model import CausalLM, tunix_model_input

__all__ = [
    "CausalLM",
    "DecoderConfig",
    "hf_name",
    "hf_tensors",
    "load_pretrained",
    "megatron_partition",
    "save_pretrained",
    "tunix_model_input",
]
