"""An NNX decoder that computes what HuggingFace's Llama / Mistral / Qwen2 / Qwen3 compute.

Module and parameter names follow HF's (``model.layers.0.self_attn.q_proj`` is
``model.layers[0].self_attn.q_proj``, an ``nnx.Linear`` whose ``kernel`` is the
transpose of HF's ``weight``), so checkpoints map one to one and PEFT's
``target_modules`` (``q_proj``, ..., ``down_proj``) name the same layers. Every
projection is a plain ``nnx.Linear``: ``lorafy`` and qwix adapt them as they are.

``scan_layers=True`` stacks the layers (one ``DecoderLayer`` whose parameters
have a leading layer axis, applied by ``nnx.scan``): one compiled layer instead
of ``num_layers``, the MaxText/levanter layout; ``lorafy`` adapts it too (the
factors get the layer axis). The call signature is tunix's:
``model(tokens, positions, cache, attention_mask) -> (logits, None)``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lora_muon_jax.hf.config import DecoderConfig

_F32 = jnp.float32


class RMSNorm(nnx.Module):
    """``weight · x / √(mean(x²) + ε)``, statistics in float32 (HF's LlamaRMSNorm)."""

    def __init__(self, dim: int, eps: float, *, param_dtype: Any = _F32, rngs: nnx.Rngs):
        del rngs
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(_F32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        weight = self.weight[...].astype(x.dtype).reshape((1,) * (x.ndim - 1) + (-1,))
        return weight * y.astype(x.dtype)


def _linear(d_in: int, d_out: int, bias: bool, param_dtype: Any, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(
        d_in,
        d_out,
        use_bias=bias,
        param_dtype=param_dtype,
        kernel_init=nnx.initializers.normal(0.02),
        rngs=rngs,
    )


def rotary(positions: jax.Array, config: DecoderConfig) -> tuple[jax.Array, jax.Array]:
    """``cos, sin`` of shape (B, L, head_dim): HF's ``cat(freqs, freqs)`` layout."""
    inv = jnp.asarray(config.inverse_frequencies(), _F32)
    freqs = positions.astype(_F32)[..., None] * inv.reshape((1,) * positions.ndim + (-1,))
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def _rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    c, s = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * c + rotated * s


class Attention(nnx.Module):
    def __init__(self, config: DecoderConfig, *, param_dtype: Any, rngs: nnx.Rngs):
        self.config = config
        p = config.projections
        bias = config.qkv_bias
        self.q_proj = _linear(*p["q_proj"], bias, param_dtype, rngs)
        self.k_proj = _linear(*p["k_proj"], bias, param_dtype, rngs)
        self.v_proj = _linear(*p["v_proj"], bias, param_dtype, rngs)
        self.o_proj = _linear(*p["o_proj"], False, param_dtype, rngs)
        self.q_norm = nnx.data(None)
        self.k_norm = nnx.data(None)
        if config.qk_norm:
            self.q_norm = RMSNorm(
                config.head_dim, config.rms_norm_eps, param_dtype=param_dtype, rngs=rngs
            )
            self.k_norm = RMSNorm(
                config.head_dim, config.rms_norm_eps, param_dtype=param_dtype, rngs=rngs
            )

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array) -> jax.Array:
        c = self.config
        b, length, _ = x.shape
        q = self.q_proj(x).reshape(b, length, c.num_heads, c.head_dim)
        k = self.k_proj(x).reshape(b, length, c.num_kv_heads, c.head_dim)
        v = self.v_proj(x).reshape(b, length, c.num_kv_heads, c.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        groups = c.num_heads // c.num_kv_heads
        k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(_F32) / jnp.sqrt(
            jnp.asarray(c.head_dim, _F32)
        )
        scores = jnp.where(mask[:, None, :, :], scores, jnp.finfo(_F32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, length, c.num_heads * c.head_dim)
        return self.o_proj(out)


class MLP(nnx.Module):
    def __init__(self, config: DecoderConfig, *, param_dtype: Any, rngs: nnx.Rngs):
        p, bias = config.projections, config.mlp_bias
        self.gate_proj = _linear(*p["gate_proj"], bias, param_dtype, rngs)
        self.up_proj = _linear(*p["up_proj"], bias, param_dtype, rngs)
        self.down_proj = _linear(*p["down_proj"], bias, param_dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, config: DecoderConfig, *, param_dtype: Any, rngs: nnx.Rngs):
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps, param_dtype=param_dtype, rngs=rngs)
        self.self_attn = Attention(config, param_dtype=param_dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(
            config.hidden_size, eps, param_dtype=param_dtype, rngs=rngs
        )
        self.mlp = MLP(config, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array) -> jax.Array:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return h + self.mlp(self.post_attention_layernorm(h))


class Backbone(nnx.Module):
    """HF's ``model``: ``embed_tokens``, ``layers``, ``norm``."""

    def __init__(
        self, config: DecoderConfig, *, scan_layers: bool, param_dtype: Any, rngs: nnx.Rngs
    ):
        self.config, self.scan_layers = config, scan_layers
        self.embed_tokens = nnx.Embed(
            config.vocab_size,
            config.hidden_size,
            param_dtype=param_dtype,
            embedding_init=nnx.initializers.normal(0.02),
            rngs=rngs,
        )
        if scan_layers:

            @nnx.split_rngs(splits=config.num_layers)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def stacked(rngs: nnx.Rngs) -> DecoderLayer:
                return DecoderLayer(config, param_dtype=param_dtype, rngs=rngs)

            self.layers = stacked(rngs)
        else:
            self.layers = nnx.List(
                [
                    DecoderLayer(config, param_dtype=param_dtype, rngs=rngs)
                    for _ in range(config.num_layers)
                ]
            )
        self.norm = RMSNorm(
            config.hidden_size, config.rms_norm_eps, param_dtype=param_dtype, rngs=rngs
        )

    def __call__(self, tokens: jax.Array, positions: jax.Array, mask: jax.Array) -> jax.Array:
        x = self.embed_tokens(tokens)
        cos, sin = rotary(positions, self.config)
        if self.scan_layers:

            @nnx.scan(in_axes=(nnx.Carry, 0, None, None, None), out_axes=nnx.Carry)
            def body(
                x: jax.Array, layer: DecoderLayer, cos: jax.Array, sin: jax.Array, mask: jax.Array
            ):
                return layer(x, cos, sin, mask)

            x = body(x, self.layers, cos, sin, mask)  # type: ignore[arg-type]
        else:
            for layer in self.layers:  # type: ignore[union-attr]
                x = layer(x, cos, sin, mask)
        return self.norm(x)


class CausalLM(nnx.Module):
    """HF's ``*ForCausalLM``: ``model`` (the backbone) and ``lm_head`` (absent when tied)."""

    def __init__(
        self,
        config: DecoderConfig,
        *,
        scan_layers: bool = False,
        param_dtype: Any = _F32,
        rngs: nnx.Rngs,
    ):
        self.config = config
        self.model = Backbone(config, scan_layers=scan_layers, param_dtype=param_dtype, rngs=rngs)
        self.lm_head = nnx.data(None)
        if not config.tie_word_embeddings:
            self.lm_head = _linear(config.hidden_size, config.vocab_size, False, param_dtype, rngs)

    def __call__(
        self,
        input_tokens: jax.Array,
        positions: jax.Array | None = None,
        cache: Any = None,
        attention_mask: jax.Array | None = None,
    ) -> tuple[jax.Array, None]:
        """Logits (B, L, vocab) of ``input_tokens`` (B, L); the second output is tunix's cache slot.

        ``attention_mask``: (B, L, L) booleans (query, key), as tunix's
        ``make_causal_attn_mask`` builds them; default causal.
        """
        if cache is not None:
            raise NotImplementedError("CausalLM has no KV cache (training and scoring only)")
        b, length = input_tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(length), (b, length))
        if attention_mask is None:
            attention_mask = jnp.broadcast_to(
                jnp.tril(jnp.ones((length, length), bool)), (b, length, length)
            )
        x = self.model(input_tokens, positions, attention_mask.astype(bool))
        if self.lm_head is None:
            table = self.model.embed_tokens.embedding[...]
            logits = jnp.einsum("bld,vd->blv", x, table.astype(x.dtype))
        else:
            logits = self.lm_head(x)
        return logits, None


def tunix_model_input(x: Any) -> dict[str, jax.Array]:
    """A tunix ``TrainingInput`` as the keyword arguments of tunix's default loss on `CausalLM`.

    For ``PeftTrainer(...).with_gen_model_input_fn(tunix_model_input)``. Tokens (B, L) and
    ``input_mask`` (B, L) pass through; ``positions`` (B, L) count from 0 along each row;
    ``attention_mask`` (B, L, L) is causal and hides padded keys (``input_mask`` False), what
    tunix's ``sft.utils.make_causal_attn_mask`` builds.
    """
    tokens, mask = jnp.asarray(x.input_tokens), jnp.asarray(x.input_mask, bool)
    b, length = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(length), (b, length))
    causal = jnp.tril(jnp.ones((length, length), bool))
    return dict(
        input_tokens=tokens,
        input_mask=mask,
        positions=positions,
        attention_mask=causal[None] & mask[:, None, :],
    )
