"""One decoder-only transformer for Llama 2/3, Qwen2, Mistral and Gemma 3.

The architectures share attention and MLP code; `ModelConfig` switches select biases, norm
style, q/k norms, sandwich norms, sliding windows and the activation. Linear layers, the
embedding and the KV cache are `lowbit` building blocks, so compression only replaces
leaves of the parameter state and this file never changes for it.

Parameter paths (stable under every transform): embed.embedding, layers.{i}.input_norm.scale,
layers.{i}.attn.{q,k,v,o}_proj.{weight,bias}, layers.{i}.attn.{q,k}_norm.scale,
layers.{i}.post_attn_norm.scale, layers.{i}.pre_mlp_norm.scale, layers.{i}.post_mlp_norm.scale,
layers.{i}.mlp.{gate,up,down}_proj.weight, final_norm.scale, lm_head.weight.
Einsum letters: see models/config.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lowbit.attention import (attention_mask, causal_self_attention, dense_decode_attention,
                              gqa_attention, latent_decode_attention, paged_decode_attention)
from lowbit.kv_cache import DENSE, KVFormat
from lowbit.latent_cache import LatentKVCache
from lowbit.lowrank import LowRankKV, lowrank_expand, lowrank_latents
from lowbit.nn import Embed, Linear
from models.config import ModelConfig
from models.rope import apply_rope, inverse_frequencies


class RMSNorm(nnx.Module):
  """RMSNorm computed in float32; Gemma scales by (1 + w), the others by w."""

  def __init__(self, dim: int, *, eps: float, plus_one: bool, dtype=jnp.float32):
    self.eps = eps
    self.plus_one = plus_one
    init = jnp.zeros if plus_one else jnp.ones
    self.scale = nnx.Param(init((dim,), dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    scale = self.scale.get_value()
    if self.plus_one:
      return (normed * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)
    # Llama casts back to the input dtype before the scale, as transformers does.
    return scale * normed.astype(x.dtype)


class Attention(nnx.Module):

  def __init__(self, config: ModelConfig, layer_index: int, *, dtype, rngs: nnx.Rngs):
    c = config
    self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
    self.scale = c.attention_scale
    # What the KV cache stores (a recipe may set a quantized format; DecoderLM.set_kv_format).
    self.kv_format: KVFormat = DENSE
    self.logit_softcap = c.attn_logit_softcap
    sliding = c.layer_types[layer_index] == "sliding"
    self.sliding_window = c.sliding_window if sliding else None
    # Gemma 3's sliding layers use their own RoPE base and no scaling.
    if sliding and c.rope_local_theta is not None:
      self.rope = (c.rope_local_theta, None)
    else:
      self.rope = (c.rope_theta, c.rope_scaling)
    kw = dict(dtype=dtype, rngs=rngs)
    self.q_proj = Linear(c.hidden_size, c.num_heads * c.head_dim, use_bias=c.attention_bias, **kw)
    self.k_proj = Linear(c.hidden_size, c.num_kv_heads * c.head_dim, use_bias=c.attention_bias,
                         **kw)
    self.v_proj = Linear(c.hidden_size, c.num_kv_heads * c.head_dim, use_bias=c.attention_bias,
                         **kw)
    self.o_proj = Linear(c.num_heads * c.head_dim, c.hidden_size, **kw)
    if c.qk_norm:
      norm = dict(eps=c.rms_norm_eps, plus_one=c.norm_plus_one, dtype=dtype)
      self.q_norm = RMSNorm(c.head_dim, **norm)
      self.k_norm = RMSNorm(c.head_dim, **norm)
    else:
      self.q_norm = self.k_norm = None

  def palu_factors(self) -> tuple[LowRankKV, LowRankKV] | None:
    """The (k_proj, v_proj) weights when Palu factored both (the cache then holds latents)."""
    k_weight, v_weight = self.k_proj.weight.get_value(), self.v_proj.weight.get_value()
    if isinstance(k_weight, LowRankKV) and isinstance(v_weight, LowRankKV):
      return k_weight, v_weight
    return None

  def new_cache(self, batch: int, max_len: int, dtype):
    factors = self.palu_factors()
    if factors is None:
      return self.kv_format.empty(batch, max_len, self.num_kv_heads, self.head_dim, dtype)
    if self.kv_format.quantized:
      raise ValueError(f"Palu latents and a quantized KV format do not compose: k_proj and "
                       f"v_proj are LowRankKV, so the cache holds their latents, but "
                       f"kv_format={self.kv_format}; use the dense format (the factors' "
                       f"latent_bits quantize the latents)")
    return LatentKVCache.for_projections(*factors, batch, max_len, dtype)

  def __call__(self, x: jax.Array, positions: jax.Array, cache, prefill: bool):
    """x [B, T, D], positions [T] (consecutive) -> ([B, T, D], updated cache).

    Without a cache, or when `prefill` fills an empty dense cache from position 0, attention
    runs over the new keys only (`causal_self_attention`). One decode token runs
    `dense_decode_attention` over a dense cache, or the paged decode kernel on the packed
    codes of a quantized cache with per-token grids.
    Otherwise attention runs over every cache slot read back, masked by position. A
    quantized format without a cache (perplexity, calibration) writes this window into a
    cache of its own and attends over what it reads back: the numbers of a cached run.
    A Palu latent cache is served by `_latent_attention`.
    """
    b, t, _ = x.shape
    q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
    if self.q_norm is not None:
      q = self.q_norm(q)
    inv_freq = inverse_frequencies(self.head_dim, *self.rope)
    q = apply_rope(q, positions, inv_freq)
    if isinstance(cache, LatentKVCache):
      return self._latent_attention(x, q, positions, cache, prefill, inv_freq)
    k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    if self.k_norm is not None:
      k = self.k_norm(k)
    k_rotated = apply_rope(k, positions, inv_freq)
    attend = self._attend_options()
    if cache is None and not self.kv_format.quantized:
      return self._output(causal_self_attention(q, k_rotated, v, **attend)), None
    # Slot s of `store` holds position first_position + s; without a cache, a quantized
    # format simulates one over this window.
    store, first_position = ((cache, 0) if cache is not None else
                             (self.new_cache(b, t, x.dtype), positions[0]))
    store = store.write(k if store.keys_before_rope else k_rotated, v,
                        positions[0] - first_position, prefill or cache is None)
    cache = store if cache is not None else None
    if prefill and store.exact:
      out = causal_self_attention(q, k_rotated, v, **attend)
    elif cache is not None and t == 1 and store.paged:
      out = paged_decode_attention(
          q, store, positions[0] + 1, **attend,
          rope_inv_freq=inv_freq if store.keys_before_rope else None)
    elif cache is not None and t == 1 and store.exact:
      out = dense_decode_attention(q, *store.read(), positions[0] + 1, **attend)
    else:
      keys, values = store.read(x.dtype)
      k_positions = first_position + jnp.arange(keys.shape[1], dtype=positions.dtype)
      if store.keys_before_rope:
        keys = apply_rope(keys, k_positions, inv_freq)
      out = self._masked_attention(q, keys, values, positions, k_positions)
    return self._output(out), cache

  def _attend_options(self) -> dict:
    return dict(scale=self.scale, sliding_window=self.sliding_window,
                logit_softcap=self.logit_softcap)

  def _masked_attention(self, q, keys, values, positions, k_positions):
    """q [B, T, N, H] at `positions` over rotated keys / values [B, S, K, H] at
    `k_positions`, causal (and sliding-window) by position."""
    mask = attention_mask(positions, k_positions, self.sliding_window)
    return gqa_attention(q, keys, values, mask, scale=self.scale,
                         logit_softcap=self.logit_softcap)

  def _latent_attention(self, x, q, positions, cache: LatentKVCache, prefill: bool, inv_freq):
    """Attention through a Palu latent cache: x [B, T, D] and the rotated q [B, T, N, H] ->
    ([B, T, D], cache).

    The latents of the new tokens are written once (quantized if the factors say so); keys
    and values come from the latents as cached, so the result is that of the no-cache
    simulation (`lowrank_linear`). One decode token runs `latent_decode_attention` (keys
    rebuilt and rotated inside the kernel, values up-projected after the softmax); a layer
    with a key bias or key norm, whose keys the kernel cannot rebuild, and any T > 1 rebuild
    K and V with jnp: a prefill from position 0 attends over its own tokens
    (`causal_self_attention`), anything else over every slot, masked by position.
    """
    k_weight, v_weight = self.palu_factors()
    t = x.shape[1]
    cache = cache.write(lowrank_latents(x, k_weight), lowrank_latents(x, v_weight),
                        positions[0], prefill)
    if t == 1 and self.k_norm is None and self.k_proj.bias is None:
      v_bias = None if self.v_proj.bias is None else self.v_proj.bias.get_value()
      out = latent_decode_attention(
          q, cache, k_weight.up, v_weight.up, jnp.full((x.shape[0],), positions[0] + 1,
                                                       jnp.int32),
          rope_inv_freq=jnp.asarray(inv_freq), v_bias=v_bias, **self._attend_options())
      return self._output(out), cache
    k_latents, v_latents = cache.read(t if prefill else None)  # [B, S, G, R] float32
    keys = self._heads_from_latents(self.k_proj, k_latents, x.dtype)
    values = self._heads_from_latents(self.v_proj, v_latents, x.dtype)
    if self.k_norm is not None:
      keys = self.k_norm(keys)
    if prefill:
      keys = apply_rope(keys, positions, inv_freq)
      out = causal_self_attention(q, keys, values, **self._attend_options())
    else:
      k_positions = jnp.arange(keys.shape[1], dtype=positions.dtype)
      keys = apply_rope(keys, k_positions, inv_freq)
      out = self._masked_attention(q, keys, values, positions, k_positions)
    return self._output(out), cache

  def _heads_from_latents(self, projection: Linear, latents, dtype):
    """Latents [B, S, G, R] -> the projection's output [B, S, K, H] in `dtype` (as its
    `Linear` would give it: up-projection, cast, bias)."""
    y = lowrank_expand(latents, projection.weight.get_value()).astype(dtype)
    if projection.bias is not None:
      y = y + projection.bias.get_value().astype(dtype)
    return y.reshape(*latents.shape[:2], self.num_kv_heads, self.head_dim)

  def _output(self, attention_out: jax.Array) -> jax.Array:
    """[B, T, N, H] -> o_proj -> [B, T, D]."""
    b, t = attention_out.shape[:2]
    return self.o_proj(attention_out.reshape(b, t, self.num_heads * self.head_dim))


class MLP(nnx.Module):

  def __init__(self, config: ModelConfig, *, dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, rngs=rngs)
    self.activation = config.mlp_activation
    self.gate_proj = Linear(config.hidden_size, config.intermediate_size, **kw)
    self.up_proj = Linear(config.hidden_size, config.intermediate_size, **kw)
    self.down_proj = Linear(config.intermediate_size, config.hidden_size, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    gate = self.gate_proj(x)
    if self.activation == "silu":
      gate = jax.nn.silu(gate)
    else:
      gate = jax.nn.gelu(gate, approximate=True)
    return self.down_proj(gate * self.up_proj(x))


class Block(nnx.Module):

  def __init__(self, config: ModelConfig, layer_index: int, *, dtype, rngs: nnx.Rngs):
    norm = dict(eps=config.rms_norm_eps, plus_one=config.norm_plus_one, dtype=dtype)
    d = config.hidden_size
    self.input_norm = RMSNorm(d, **norm)
    self.attn = Attention(config, layer_index, dtype=dtype, rngs=rngs)
    self.pre_mlp_norm = RMSNorm(d, **norm)
    self.mlp = MLP(config, dtype=dtype, rngs=rngs)
    if config.sandwich_norms:
      self.post_attn_norm = RMSNorm(d, **norm)
      self.post_mlp_norm = RMSNorm(d, **norm)
    else:
      self.post_attn_norm = self.post_mlp_norm = None

  def __call__(self, x, positions, cache, prefill):
    h, cache = self.attn(self.input_norm(x), positions, cache, prefill)
    if self.post_attn_norm is not None:
      h = self.post_attn_norm(h)
    x = x + h
    h = self.mlp(self.pre_mlp_norm(x))
    if self.post_mlp_norm is not None:
      h = self.post_mlp_norm(h)
    return x + h, cache


class DecoderLM(nnx.Module):
  """tokens [B, T] -> logits [B, T, V] (float32), optionally reading/writing a KV cache."""

  def __init__(self, config: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.config = config
    self.dtype = dtype
    self.embed = Embed(config.vocab_size, config.hidden_size, dtype=dtype, rngs=rngs)
    self.layers = nnx.List(
        [Block(config, i, dtype=dtype, rngs=rngs) for i in range(config.num_layers)])
    self.final_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps,
                              plus_one=config.norm_plus_one, dtype=dtype)
    self.lm_head = (None if config.tie_word_embeddings else
                    Linear(config.hidden_size, config.vocab_size, dtype=dtype, rngs=rngs))

  def init_cache(self, batch: int, max_len: int) -> tuple:
    """One empty cache per layer, of the layer's KV format."""
    return tuple(layer.attn.new_cache(batch, max_len, self.dtype) for layer in self.layers)

  def set_kv_format(self, kv_format: KVFormat) -> None:
    """Every layer's cache stores `kv_format` from now on (split the model again after)."""
    for layer in self.layers:
      layer.attn.kv_format = kv_format

  @property
  def kv_format(self) -> KVFormat:
    formats = {layer.attn.kv_format for layer in self.layers}
    if len(formats) != 1:
      raise ValueError(f"the layers have different KV formats: {formats}")
    return formats.pop()

  def embed_inputs(self, tokens: jax.Array) -> jax.Array:
    """tokens [B, T] -> the first block's input [B, T, D] (scaled for Gemma)."""
    x = self.embed(tokens)
    if self.config.scale_embeddings:
      x = x * jnp.asarray(self.config.hidden_size**0.5, x.dtype)
    return x

  def hidden_states(self, tokens: jax.Array, *, start=0, cache=None, prefill: bool = False):
    """tokens [B, T] at positions start.. -> (final-normed hidden [B, T, D], cache)."""
    positions = start + jnp.arange(tokens.shape[1], dtype=jnp.int32)
    x = self.embed_inputs(tokens)
    new_cache = []
    for i, layer in enumerate(self.layers):
      x, layer_cache = layer(x, positions, None if cache is None else cache[i], prefill)
      new_cache.append(layer_cache)
    return self.final_norm(x), (None if cache is None else tuple(new_cache))

  def logits(self, hidden: jax.Array) -> jax.Array:
    """hidden [..., D] -> float32 logits [..., V]."""
    if self.lm_head is None:
      out = self.embed.attend(hidden)
    else:
      out = self.lm_head(hidden)
    out = out.astype(jnp.float32)
    cap = self.config.final_logit_softcap
    if cap is not None:
      out = jnp.tanh(out / cap) * cap
    return out

  def __call__(self, tokens: jax.Array, *, start=0, cache=None, prefill: bool = False):
    hidden, cache = self.hidden_states(tokens, start=start, cache=cache, prefill=prefill)
    return self.logits(hidden), cache
