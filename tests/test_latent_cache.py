"""Palu's latent KV cache at runtime: the quantizer it shares with the simulation, the
cache's write/read, and prefill + decode through the latents in tiny random models (Llama
and Mistral through the latent decode kernel; Gemma 3 (key norm) and Qwen2 (key bias)
rebuilding keys with jnp), against the no-cache forward that measures perplexity."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lowbit import palu
from lowbit.kv_cache import KV_FORMATS, DenseKVCache, pack_codes
from lowbit.latent_cache import SLOT_ALIGN, LatentKVCache
from lowbit.lowrank import LowRankKV, dequantize_latents, quantize_latents
from lowbit.quantize import fake_quantize
from lowbit.recipes import load_into
from models.config import for_architecture, gemma3_layer_types
from models.generate import Generator
from models.transformer import DecoderLM

_VOCAB = 41
# 4 query heads over 2 KV heads of 16 dims: groups of 1 head or of both.
_DIMS = dict(vocab_size=_VOCAB, hidden_size=32, intermediate_size=48, num_layers=2,
             num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=256)


# ------------------------------------------------------------------------------------------
# The quantizer shared by the simulation and the cache
# ------------------------------------------------------------------------------------------

def test_latent_grid_is_the_simulations_integer_zero_point_grid():
  # Hand-checked at 2 bits: max 2.6, min -0.4 -> scale 3 / 3 = 1, zero = round(0.4) = 0,
  # codes round(x) + 0 = [0, 0, 3] -> [0, 0, 3]. (A float offset grid, min + code * scale,
  # as lowbit.kv_cache.quantize_asymmetric, would give [-0.4, 0.6, 2.6].)
  x = jnp.asarray([[-0.4, 0.3, 2.6]], jnp.float32)
  codes, scales, offsets = quantize_latents(x, 2)
  np.testing.assert_array_equal(codes, [[0, 0, 3]])
  np.testing.assert_allclose(dequantize_latents(codes, scales, offsets), [[0, 0, 3]],
                             atol=1e-6)
  np.testing.assert_allclose(fake_quantize(x, bits=2, symmetric=False), [[0, 0, 3]],
                             atol=1e-6)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_latent_quantizer_matches_fake_quantize(bits):
  """The codes are fake_quantize's (symmetric=False); only the last rounding differs:
  code * scale + offset (the kernel's form) against (code - zero) * scale."""
  x = jax.random.normal(jax.random.key(bits), (64, 3, 16)) * 3 + 0.5
  x = x.at[0, 0].set(1.25)  # a constant group: widened to include 0
  codes, scales, offsets = quantize_latents(x, bits)
  assert codes.dtype == jnp.uint8 and int(codes.max()) < 2**bits
  zeros = -offsets / scales
  np.testing.assert_allclose(zeros, jnp.round(zeros), atol=1e-4)  # integer zero points
  simulated = fake_quantize(x, bits=bits, symmetric=False)
  one_ulp = np.finfo(np.float32).eps * float(jnp.max(jnp.abs(x)))
  np.testing.assert_allclose(dequantize_latents(codes, scales, offsets), simulated, rtol=0,
                             atol=2 * one_ulp)


# ------------------------------------------------------------------------------------------
# LatentKVCache on its own
# ------------------------------------------------------------------------------------------

def _latents(seed, b=2, t=10, g=2, rk=8, rv=12):
  keys = jax.random.split(jax.random.key(seed))
  return (jax.random.normal(keys[0], (b, t, g, rk)) * 2,
          jax.random.normal(keys[1], (b, t, g, rv)) + 1)


@pytest.mark.parametrize("latent_bits", [None, 2, 3, 4])
def test_write_read_round_trip(latent_bits):
  k, v = _latents(0)
  cache = LatentKVCache.zeros(2, 20, 2, 8, 12, latent_bits)
  assert cache.max_len == SLOT_ALIGN and cache.ranks == (8, 12)
  prefilled = cache.write(k, v, 0, prefill=True)
  write = jax.jit(lambda cache, k, v, position: cache.write(k, v, position))
  stepped = cache
  for position in range(k.shape[1]):
    stepped = write(stepped, k[:, position:position + 1], v[:, position:position + 1],
                    jnp.int32(position))
  assert int(prefilled.length) == int(stepped.length) == 10
  for latents, name in ((k, "k"), (v, "v")):
    expected = (latents if latent_bits is None else
                dequantize_latents(*quantize_latents(latents, latent_bits)))
    index = 0 if name == "k" else 1
    for c in (prefilled, stepped):
      np.testing.assert_array_equal(c.read()[index][:, :10], expected)
    np.testing.assert_array_equal(prefilled.read(10)[index], expected)  # the first slots only
  if latent_bits is not None:  # 2 codes per byte in pack_codes' halves layout
    assert cache.k_latents.shape == (2, 2, SLOT_ALIGN, 4) and cache.k_latents.dtype == jnp.uint8
    codes = quantize_latents(jnp.transpose(k, (2, 0, 1, 3)), latent_bits)[0]
    np.testing.assert_array_equal(prefilled.k_latents[:, :, :10], pack_codes(codes, 4))


def test_bad_shapes_and_arguments_raise():
  cache = LatentKVCache.zeros(2, 16, 2, 8, 12, 4)
  k, v = _latents(1)
  with pytest.raises(ValueError,
                     match=r"k_new.shape=\(2, 10, 2, 6\) must be \[B=2, T, G=2, R=8\]"):
    cache.write(k[..., :6], v, 0)
  with pytest.raises(ValueError, match=r"v_new.shape=\(2, 9, 2, 12\)"):
    cache.write(k, v[:, :9], 0)
  with pytest.raises(ValueError, match=r"v_new.shape=\(1, 10, 2, 12\)"):
    cache.write(k, v[:1], 0)
  with pytest.raises(ValueError, match=r"k_new.shape=\(2, 10, 16\)"):
    cache.write(k.reshape(2, 10, 16), v, 0)
  with pytest.raises(ValueError, match="k_rank=7 must be even"):
    LatentKVCache.zeros(1, 16, 1, 7, 8, 3)
  LatentKVCache.zeros(1, 16, 1, 7, 8, None)  # float latents take any rank
  with pytest.raises(ValueError, match="latent_bits=8"):
    LatentKVCache.zeros(1, 16, 1, 8, 8, 8)
  with pytest.raises(ValueError, match="max_len=0"):
    LatentKVCache.zeros(1, 0, 1, 8, 8, None)
  leaf = LowRankKV(down=jnp.zeros((2, 8, 32)), up=jnp.zeros((2, 16, 8)), shape=(32, 32),
                   head_dim=16, rank=8)
  with pytest.raises(ValueError, match="latent_bits=3 must agree"):
    LatentKVCache.for_projections(leaf, dataclasses.replace(leaf, latent_bits=3), 1, 16)
  joint = LowRankKV(down=jnp.zeros((1, 8, 32)), up=jnp.zeros((1, 32, 8)), shape=(32, 32),
                    group_heads=2, head_dim=16, rank=8)
  with pytest.raises(ValueError, match="share their head groups"):
    LatentKVCache.for_projections(leaf, joint, 1, 16)


# ------------------------------------------------------------------------------------------
# Models through the latent cache
# ------------------------------------------------------------------------------------------

def _config(architecture):
  fields = dict(_DIMS)
  if architecture == "gemma3":  # a sliding layer (window 8) and a global one
    fields.update(layer_types=gemma3_layer_types(2, 2), sliding_window=8,
                  rope_local_theta=10000.0)
  if architecture == "mistral":
    fields.update(layer_types=("sliding",) * _DIMS["num_layers"], sliding_window=8)
  return for_architecture(architecture, **fields)


def _model(architecture):
  return DecoderLM(_config(architecture), rngs=nnx.Rngs(0))


def _palu_model(architecture, *, latent_bits, group_heads, ratio=0.5):
  """A tiny random model with Palu K/V factors, whitened by the X^T X of random inputs with
  a few large channels (as LLM activations have)."""
  model = _model(architecture)
  x = np.random.default_rng(1).standard_normal((256, _DIMS["hidden_size"]))
  x[:, :3] *= 10.0
  grams = {f"layers.{i}.attn.{p}": x.T @ x for i in range(_DIMS["num_layers"])
           for p in palu.PROJECTIONS}
  statistics = palu.PaluStatistics(grams, fisher=None, tokens=len(x), fisher_windows=0)
  params = palu.palu_compress(model, ratio=ratio, group_heads=group_heads,
                              rank_method="uniform", latent_bits=latent_bits,
                              rank_multiple=4, statistics=statistics, log=None)
  load_into(model, params)
  return model


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("prefill",))
def _run(graphdef, state, tokens, start=0, cache=None, prefill=False):
  """The model's forward, compiled once per architecture and factor shapes (tests share it)."""
  return nnx.merge(graphdef, state)(tokens, start=start, cache=cache, prefill=prefill)


# Llama and Mistral (sliding window 8 in every layer) decode through the latent kernel;
# Gemma 3 (key norm, a sliding layer) and Qwen2 (key bias) rebuild keys with jnp.
_CASES = [("llama", None, 1), ("llama", 4, "all"), ("mistral", 2, 1), ("gemma3", None, "all"),
          ("gemma3", 3, 1), ("qwen2", 4, "all")]


@pytest.mark.parametrize("architecture, latent_bits, group_heads", _CASES)
def test_prefill_and_decode_through_latents_equal_the_simulation(architecture, latent_bits,
                                                                 group_heads):
  """Every token's latents are quantized on their own, so the no-cache forward (the
  perplexity simulation through lowrank_linear) and prefill + decode through the latent
  cache give the same logits, to float rounding."""
  model = _palu_model(architecture, latent_bits=latent_bits, group_heads=group_heads)
  run = functools.partial(_run, *nnx.split(model))
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, _VOCAB, (2, 24)))
  full, _ = run(tokens)
  cache = model.init_cache(2, 32)
  assert all(isinstance(c, LatentKVCache) and c.latent_bits == latent_bits for c in cache)
  logits, cache = run(tokens[:, :18], cache=cache, prefill=True)
  np.testing.assert_allclose(logits, full[:, :18], atol=2e-5)
  for position in range(18, 22):
    out, cache = run(tokens[:, position:position + 1], jnp.int32(position), cache)
    np.testing.assert_allclose(out[:, 0], full[:, position], atol=2e-5)
  assert int(cache[0].length) == 22
  # A chunk of 2 tokens after the decode steps: the masked path over every slot.
  out, cache = run(tokens[:, 22:], jnp.int32(22), cache)
  np.testing.assert_allclose(out, full[:, 22:], atol=2e-5)


def test_decode_runs_the_latent_kernel_for_llama(monkeypatch):
  """Llama's decode goes through lowbit.attention.latent_decode_attention (Gemma's key
  norm does not); the test above checks its numbers."""
  import models.transformer as transformer
  calls = []
  original = transformer.latent_decode_attention
  monkeypatch.setattr(transformer, "latent_decode_attention",
                      lambda *a, **k: calls.append(1) or original(*a, **k))
  token = jnp.zeros((1, 1), jnp.int32)
  for architecture, expected in (("llama", 2), ("gemma3", 0)):
    model = _palu_model(architecture, latent_bits=4, group_heads=1)
    calls.clear()
    jax.eval_shape(lambda cache: model(token, start=5, cache=cache), model.init_cache(1, 8))
    assert len(calls) == expected, architecture


@pytest.mark.parametrize("architecture", ["llama", "gemma3"])
def test_generate_equals_a_no_cache_greedy_loop(architecture):
  model = _palu_model(architecture, latent_bits=3, group_heads=1)
  prompt = jnp.asarray(np.random.RandomState(2).randint(0, _VOCAB, (2, 5)))
  generated = Generator(model, 32).generate(prompt, 8)
  # No cache: the whole sequence so far, padded to one length (causal: the padding after
  # the last token does not change its logits).
  run = functools.partial(_run, *nnx.split(model))
  sequence = jnp.zeros((2, 13), jnp.int32).at[:, :5].set(prompt)
  for length in range(5, 13):
    logits, _ = run(sequence)
    sequence = sequence.at[:, length].set(jnp.argmax(logits[:, length - 1], -1))
  np.testing.assert_array_equal(generated, sequence[:, 5:])


@pytest.mark.parametrize("latent_bits", [None, 4, 2])
def test_cache_bytes(latent_bits):
  """At half the rank the float latents take half a dense cache; quantized latents take
  4 bits each (2- and 3-bit codes sit in nibbles) plus 4 float32 grids per token and group."""
  model = _palu_model("llama", latent_bits=latent_bits, group_heads=1)
  batch, slots = 2, 2 * SLOT_ALIGN
  latent = model.layers[0].attn.new_cache(batch, slots, jnp.float32)
  dense = DenseKVCache.zeros(batch, slots, 2, 16)
  assert dense.nbytes == 2 * batch * slots * 2 * 16 * 4
  groups, (k_rank, v_rank) = latent.num_groups, latent.ranks
  assert (groups, k_rank, v_rank) == (2, 8, 8)  # half of 2 x 16 per token
  if latent_bits is None:
    expected = batch * slots * groups * (k_rank + v_rank) * 4
    assert latent.nbytes - 4 == expected == dense.nbytes // 2
  else:
    expected = batch * slots * groups * ((k_rank + v_rank) // 2 + 4 * 4)
    assert latent.nbytes - 4 == expected
    assert latent.nbytes < dense.nbytes // 2


def test_palu_and_a_quantized_kv_format_do_not_compose():
  model = _palu_model("llama", latent_bits=None, group_heads=1)
  model.set_kv_format(KV_FORMATS["kv8"])
  tokens = jnp.zeros((1, 4), jnp.int32)
  with pytest.raises(ValueError, match="Palu latents and a quantized KV format do not "
                                       "compose"):
    model.init_cache(1, 8)
  with pytest.raises(ValueError, match="do not compose"):
    model(tokens)  # the perplexity path would simulate a quantized cache
  model.set_kv_format(KV_FORMATS["dense"])
  assert isinstance(model.init_cache(1, 8)[0], LatentKVCache)

