"""An HF decoder checkpoint's configuration (Llama, Mistral, Qwen2, Qwen3), from ``config.json``.

Only what the forward pass needs, validated with errors that name the field:
an architecture or a RoPE variant this package does not implement is refused,
never approximated.
"""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any, NamedTuple

import numpy as np

# model_type -> (attention has q/k/v biases, attention has per-head q/k RMSNorm)
ARCHITECTURES: dict[str, tuple[bool, bool]] = {
    "llama": (False, False),
    "mistral": (False, False),
    "qwen2": (True, False),
    "qwen3": (False, True),
}
ROPE_TYPES = ("default", "linear", "llama3")


class DecoderConfig(NamedTuple):
    """A pre-norm decoder: RMSNorm, RoPE attention with GQA, SwiGLU MLP (HF names in comments)."""

    model_type: str  # "llama" | "mistral" | "qwen2" | "qwen3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int  # num_hidden_layers
    num_heads: int  # num_attention_heads
    num_kv_heads: int  # num_key_value_heads
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 8192
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # qwen2
    qk_norm: bool = False  # qwen3
    mlp_bias: bool = False
    max_position_embeddings: int = 4096

    @property
    def projections(self) -> dict[str, tuple[int, int]]:
        """``{name: (in, out)}`` of the seven projections of a layer (HF module names)."""
        d, f, q, kv = self.hidden_size, self.intermediate_size, self.num_heads, self.num_kv_heads
        hd = self.head_dim
        return {
            "q_proj": (d, q * hd),
            "k_proj": (d, kv * hd),
            "v_proj": (d, kv * hd),
            "o_proj": (q * hd, d),
            "gate_proj": (d, f),
            "up_proj": (d, f),
            "down_proj": (f, d),
        }

    def inverse_frequencies(self) -> np.ndarray:
        """RoPE's ``inv_freq`` (head_dim / 2,) in float64, with the config's scaling rule."""
        exponents = np.arange(0, self.head_dim, 2, dtype=np.float64) / self.head_dim
        inv = 1.0 / (self.rope_theta**exponents)
        if self.rope_type == "linear":
            return inv / self.rope_factor
        if self.rope_type == "llama3":
            low_wavelen = self.rope_original_max_position / self.rope_low_freq_factor
            high_wavelen = self.rope_original_max_position / self.rope_high_freq_factor
            wavelen = 2 * math.pi / inv
            scaled = np.where(wavelen > low_wavelen, inv / self.rope_factor, inv)
            smooth = (self.rope_original_max_position / wavelen - self.rope_low_freq_factor) / (
                self.rope_high_freq_factor - self.rope_low_freq_factor
            )
            smoothed = (1 - smooth) * scaled / self.rope_factor + smooth * scaled
            medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
            return np.where(medium, smoothed, scaled)
        return inv

    @classmethod
    def from_hf(cls, config: dict[str, Any], where: str = "config.json") -> DecoderConfig:
        """From a parsed ``config.json``; raises ``ValueError`` naming what is unsupported."""
        model_type = config.get("model_type")
        if model_type not in ARCHITECTURES:
            raise ValueError(
                f"{where}: model_type={model_type!r} is not supported (supported: "
                f"{sorted(ARCHITECTURES)}: Llama-, Mistral- and Qwen-family decoders)"
            )
        act = config.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"{where}: hidden_act={act!r}; only SwiGLU ('silu') is implemented")
        heads = _int(config, "num_attention_heads", where)
        hidden = _int(config, "hidden_size", where)
        head_dim = config.get("head_dim") or hidden // heads
        rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
        theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
        if rope_type not in ROPE_TYPES:
            raise ValueError(
                f"{where}: RoPE type {rope_type!r} is not implemented (implemented: {ROPE_TYPES})"
            )
        if float(config.get("partial_rotary_factor", 1.0)) != 1.0:
            raise ValueError(f"{where}: partial_rotary_factor != 1 is not implemented")
        if config.get("use_sliding_window") or (
            model_type == "mistral" and config.get("sliding_window")
        ):
            raise ValueError(f"{where}: sliding-window attention is not implemented")
        qkv_bias, qk_norm = ARCHITECTURES[model_type]
        max_pos = int(config.get("max_position_embeddings", 4096))
        return cls(
            model_type=model_type,
            vocab_size=_int(config, "vocab_size", where),
            hidden_size=hidden,
            intermediate_size=_int(config, "intermediate_size", where),
            num_layers=_int(config, "num_hidden_layers", where),
            num_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            rope_type=rope_type,
            rope_factor=float(rope.get("factor", 1.0)),
            rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
            rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
            rope_original_max_position=int(rope.get("original_max_position_embeddings", max_pos)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=bool(config.get("attention_bias", qkv_bias)) or qkv_bias,
            qk_norm=qk_norm,
            mlp_bias=bool(config.get("mlp_bias", False)),
            max_position_embeddings=max_pos,
        )

    @classmethod
    def from_dir(cls, path: str | pathlib.Path) -> DecoderConfig:
        file = pathlib.Path(path) / "config.json"
        if not file.is_file():
            raise FileNotFoundError(
                f"{path}: no config.json (an HF checkpoint directory needs one)"
            )
        return cls.from_hf(json.loads(file.read_text()), where=str(file))


def _int(config: dict[str, Any], key: str, where: str) -> int:
    if key not in config:
        raise ValueError(f"{where}: missing {key!r}")
    return int(config[key])
