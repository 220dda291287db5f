"""Quantized KV caches: packing, quantizer error, write/read, and the model running them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lowbit.kv_cache import (KV_FORMATS, DenseKVCache, KVFormat, QuantizedKVCache, kv_format,
                             pack_codes, quantize_asymmetric, unpack_codes)
from models.config import for_architecture, gemma3_layer_types
from models.generate import Generator
from models.transformer import DecoderLM

QUANTIZED = [name for name, f in KV_FORMATS.items() if f.quantized]


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_pack_round_trip_and_layout(bits):
  codes = jnp.asarray(np.random.RandomState(bits).randint(0, 2**bits, (3, 5, 16)), jnp.uint8)
  packed = pack_codes(codes, bits)
  assert packed.shape == (3, 5, 16 * bits // 8) and packed.dtype == jnp.uint8
  np.testing.assert_array_equal(unpack_codes(packed, bits), codes)
  if bits == 4:  # low nibble element j, high nibble element j + H/2 (RoPE's pairs)
    np.testing.assert_array_equal(packed & 15, codes[..., :8])
    np.testing.assert_array_equal(packed >> 4, codes[..., 8:])


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_asymmetric_quantizer_error_bound(bits):
  x = jax.random.normal(jax.random.key(0), (64, 32)) * 3 + 1
  codes, scale, offset = quantize_asymmetric(x, bits, axis=-1)
  error = jnp.abs(codes * scale + offset - x)
  assert float(jnp.max(error / scale)) <= 0.5 + 1e-4
  # Min and max of every row are on the grid.
  np.testing.assert_allclose(jnp.min(codes * scale + offset, -1), jnp.min(x, -1), atol=1e-5)
  np.testing.assert_allclose(jnp.max(codes * scale + offset, -1), jnp.max(x, -1), atol=1e-4)


def test_constant_rows_are_exact():
  x = jnp.full((4, 8), 2.5)
  codes, scale, offset = quantize_asymmetric(x, 4, axis=-1)
  np.testing.assert_array_equal(codes * scale + offset, x)


def _kv(seed, b=2, t=40, k=2, h=16):
  keys = jax.random.split(jax.random.key(seed))
  return (jax.random.normal(keys[0], (b, t, k, h)), jax.random.normal(keys[1], (b, t, k, h)))


@pytest.mark.parametrize("name", QUANTIZED)
def test_decode_writes_equal_prefill_write(name):
  """Writing 40 tokens one at a time leaves the same cache contents as one prefill; the
  dequantized cache is within the grid's error of the input."""
  fmt = KV_FORMATS[name]
  k, v = _kv(1)
  prefilled = fmt.empty(2, 64, 2, 16).write(k, v, 0, prefill=True)
  stepped = fmt.empty(2, 64, 2, 16)
  write = jax.jit(lambda cache, k, v, position: cache.write(k, v, position))
  for position in range(k.shape[1]):
    stepped = write(stepped, k[:, position:position + 1], v[:, position:position + 1],
                    jnp.int32(position))
  for a, b in zip(prefilled.read(), stepped.read()):
    np.testing.assert_allclose(a[:, :40], b[:, :40], atol=1e-6)
  k_read, v_read = prefilled.read()
  tolerance = {8: 0.03, 4: 0.5, 2: 2.5}[fmt.bits]
  assert float(jnp.max(jnp.abs(k_read[:, :40] - k))) < tolerance
  assert float(jnp.max(jnp.abs(v_read[:, :40] - v))) < tolerance
  assert int(prefilled.length) == 40


def test_channel_keys_keep_the_newest_tokens_in_float():
  fmt = KV_FORMATS["kv4"]
  k, v = _kv(2, t=40)
  cache = fmt.empty(2, 64, 2, 16).write(k, v, 0, prefill=True)
  k_read, _ = cache.read()
  np.testing.assert_array_equal(k_read[:, 32:40], k[:, 32:40])  # the window: exact
  assert float(jnp.max(jnp.abs(k_read[:, :32] - k[:, :32]))) > 0  # the full group: quantized


def test_channel_key_grids_are_per_channel():
  """A key channel 100x larger than the others does not spoil the other channels."""
  k, v = _kv(3, t=32)
  k = k.at[..., 5].multiply(100.0)
  per_channel = KV_FORMATS["kv4"].empty(2, 32, 2, 16).write(k, v, 0, prefill=True).read()[0]
  per_token = KV_FORMATS["kv4-token"].empty(2, 32, 2, 16).write(k, v, 0, prefill=True).read()[0]
  others = np.arange(16) != 5
  error = lambda r: float(jnp.mean(jnp.abs(r - k)[..., others]))
  assert error(per_channel) < error(per_token) / 10


def test_per_channel_keys_refuse_chunked_writes():
  cache = KV_FORMATS["kv4"].empty(1, 64, 2, 16)
  k, v = _kv(4, b=1, t=3)
  with pytest.raises(ValueError, match="one token at a time"):
    cache.write(k, v, 5)


@pytest.mark.parametrize("bad, match", [(dict(bits=3), "bits=3"), (dict(keys="head"), "keys"),
                                        (dict(bits=4, key_group=0), "key_group"),
                                        (dict(bits=4, clip=1.5), "clip"),
                                        (dict(keys="channel"), "dense")])
def test_format_errors(bad, match):
  with pytest.raises(ValueError, match=match):
    KVFormat(**bad)


def test_format_lookup_and_manifest_round_trip():
  with pytest.raises(ValueError, match="unknown KV cache format 'kv5'"):
    kv_format("kv5")
  for fmt in KV_FORMATS.values():
    assert kv_format(fmt.to_dict()) == fmt
  with pytest.raises(ValueError, match="head_dim=6"):
    KV_FORMATS["kv2"].empty(1, 8, 1, 6)


def test_bytes_per_token():
  assert KV_FORMATS["dense"].bytes_per_token(8, 128) == 4096
  # 4-bit codes (1024 B) + per-token value grids (64 B) + per-channel key grids over 32 tokens.
  assert KV_FORMATS["kv4"].bytes_per_token(8, 128) == 1024 + 64 + 2 * 4 * 8 * 128 / 32
  cache = KV_FORMATS["kv4-token"].empty(1, 16, 8, 128)
  assert isinstance(cache, QuantizedKVCache)
  assert cache.nbytes == 16 * KV_FORMATS["kv4-token"].bytes_per_token(8, 128) + 4


def _model(architecture="llama"):
  fields = dict(vocab_size=41, hidden_size=32, intermediate_size=48, num_layers=2,
                num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=256)
  if architecture == "gemma3":
    fields.update(layer_types=gemma3_layer_types(2, 2), sliding_window=8,
                  rope_local_theta=10000.0)
  return DecoderLM(for_architecture(architecture, **fields), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("architecture", ["llama", "gemma3"])
@pytest.mark.parametrize("name", ["kv8", "kv4-token", "kv4-atom", KVFormat(bits=2)],
                         ids=["kv8", "kv4-token", "kv4-atom", "kv2-token"])
def test_cached_generation_equals_the_uncached_simulation(architecture, name):
  """Per-token formats quantize each token alone, so the no-cache forward (how perplexity
  is measured) and prefill + decode through the cache give the same logits."""
  model = _model(architecture)
  model.set_kv_format(kv_format(name))
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, 41, (2, 24)))
  full, _ = model(tokens)
  cache = model.init_cache(2, 32)
  assert all(isinstance(c, QuantizedKVCache) for c in cache)
  logits, cache = model(tokens[:, :20], cache=cache, prefill=True)
  np.testing.assert_allclose(logits, full[:, :20], atol=2e-5)
  for position in range(20, 24):
    step, cache = model(tokens[:, position:position + 1], start=position, cache=cache)
    np.testing.assert_allclose(step[:, 0], full[:, position], atol=2e-5)


def test_channel_key_pages_and_window():
  """A kv4 cache's paged view: pages a multiple of key_group, per-channel key grids per
  page, codes only for complete groups; the window holds the rest in float."""
  fmt = KV_FORMATS["kv4"]
  k, v = _kv(5, t=40)  # [B=2, T=40, K=2, H=16]: one complete group, 8 window tokens
  cache = fmt.empty(2, 64, 2, 16).write(k, v, 0, prefill=True)
  assert cache.paged and cache.page_size == 64 and fmt.slots(40) == 64
  pages = cache.pages()
  assert pages["key_group"] == 32 and pages["bits"] == 4
  assert pages["k_pages"].shape == (2, 2, 64, 8)  # [K, P = B * 64 / 64, page, H / 2]
  assert pages["k_scales"].shape == (2, 2, 2, 16)  # [K, P, page / G, H]
  assert pages["v_scales"].shape == (2, 2, 64)
  np.testing.assert_array_equal(pages["page_table"], [[0], [1]])
  assert int(cache.complete_length(jnp.int32(40))) == 32
  k_window, v_window = cache.window(jnp.int32(40))  # [K, B, G, H]
  np.testing.assert_array_equal(k_window[:, :, :8], jnp.transpose(k[:, 32:], (2, 0, 1, 3)))
  _, v_read = cache.read()
  np.testing.assert_allclose(v_window[:, :, :8], jnp.transpose(v_read[:, 32:40], (2, 0, 1, 3)))
  # Page sizes must hold whole key groups.
  assert not KVFormat(bits=4, keys="channel", key_group=24).empty(1, 48, 2, 16).paged
  assert KVFormat(bits=4, keys="channel", key_group=16).empty(1, 48, 2, 16).page_size == 16
  with pytest.raises(ValueError, match="4-bit cache with key_group=24"):
    KVFormat(bits=4, keys="channel", key_group=24).empty(1, 48, 2, 16).pages()


@pytest.mark.parametrize("fmt", [KV_FORMATS["kv2"], KVFormat(bits=2)],
                         ids=["kv2", "kv2-token"])
def test_two_bit_pages_are_the_cache_bytes(fmt):
  """A 2-bit cache (keys per channel or per token) has a paged view: its code arrays
  reshaped, four codes a byte, which the paged kernel's reference reads back to the
  cache's own dequantized keys and values."""
  from pallas_kernels.decode_attention import reference
  k, v = _kv(6, t=40)
  cache = fmt.empty(2, 64, 2, 16).write(k, v, 0, prefill=True)
  assert cache.paged and cache.page_size == 64
  pages = cache.pages()
  # [K, P = B * 64 / page, page, H / 4]
  assert pages["bits"] == 2 and pages["k_pages"].shape == (2, 2, 64, 4)
  assert pages["k_pages"].size == cache.k_codes.size  # a view of the codes, not a copy
  keys_read, values_read = cache.read()
  k_pages = reference.gather_dequantized(pages["k_pages"], pages["k_scales"],
                                         pages["k_offsets"], pages["page_table"], bits=2,
                                         key_group=pages["key_group"])
  v_pages = reference.gather_dequantized(pages["v_pages"], pages["v_scales"],
                                         pages["v_offsets"], pages["page_table"], bits=2)
  complete = int(cache.complete_length(jnp.int32(40)))  # keys in codes: complete groups
  np.testing.assert_allclose(k_pages[:, :complete], keys_read[:, :complete], atol=1e-6)
  np.testing.assert_allclose(v_pages[:, :40], values_read[:, :40], atol=1e-6)


@pytest.mark.parametrize("prefill", [30, 32])
@pytest.mark.parametrize("architecture,fmt", [
    ("llama", KV_FORMATS["kv4"]), ("gemma3", KV_FORMATS["kv4"]),
    ("llama", KVFormat(bits=4, keys="channel", key_group=32, keys_before_rope=True)),
    ("llama", KV_FORMATS["kv2"]), ("gemma3", KV_FORMATS["kv2"])],
                         ids=["llama-kv4", "gemma3-kv4", "llama-kv4-before-rope",
                              "llama-kv2", "gemma3-kv2"])
def test_channel_key_decode_through_the_kernel_equals_the_read_path(architecture, fmt,
                                                                    prefill, monkeypatch):
  """kv4 / kv2 decode through `paged_decode_attention` (the kernel over complete key groups,
  merged with the float window) gives the logits of reading the whole cache back and
  attending over it, step by step across a key-group boundary (gemma3: sliding window 8
  and soft caps; a pre-RoPE variant: the window's keys rotated outside the kernel)."""
  model = _model(architecture)
  model.set_kv_format(fmt)
  # Steps at positions prefill .. prefill + 2: 30 completes a group at position 31.
  tokens = jnp.asarray(np.random.RandomState(3).randint(0, 41, (2, prefill + 3)))

  def decode(paged: bool):
    monkeypatch.setattr(QuantizedKVCache, "paged", property(lambda self: paged))
    cache = model.init_cache(2, 48)
    logits, cache = model(tokens[:, :prefill], cache=cache, prefill=True)
    steps = [logits[:, -1]]
    for position in range(prefill, tokens.shape[1]):
      step, cache = model(tokens[:, position:position + 1], start=position, cache=cache)
      steps.append(step[:, 0])
    return jnp.stack(steps)

  np.testing.assert_allclose(decode(True), decode(False), atol=1e-4)


def test_quantized_caches_stay_close_to_float_and_order_by_bits():
  model = _model()
  tokens = jnp.asarray(np.random.RandomState(1).randint(0, 41, (2, 64)))
  reference, _ = model(tokens)
  errors = {}
  for name in ("kv8", "kv4", "kv4-token", "kv2"):
    model.set_kv_format(KV_FORMATS[name])
    logits, _ = model(tokens)
    errors[name] = float(jnp.mean(jnp.abs(logits - reference)))
  assert 0 < errors["kv8"] < errors["kv4"] < errors["kv2"]
  assert errors["kv8"] < 0.01 * float(jnp.mean(jnp.abs(reference)))


def test_generator_runs_quantized_caches():
  model = _model()
  prompt = jnp.asarray(np.random.RandomState(2).randint(0, 41, (1, 7)))
  dense = Generator(model, 48).generate(prompt, 12)
  model.set_kv_format(KV_FORMATS["kv8"])
  assert isinstance(model.init_cache(1, 8)[0], QuantizedKVCache)
  np.testing.assert_array_equal(Generator(model, 48).generate(prompt, 12), dense)
  model.set_kv_format(KV_FORMATS["kv4"])
  assert Generator(model, 48).generate(prompt, 12).shape == (1, 12)
  model.set_kv_format(KV_FORMATS["dense"])
  assert isinstance(model.init_cache(1, 8)[0], DenseKVCache)


def test_recipes_choose_the_kv_format():
  from lowbit.recipes import compress, recipe_kv_format, settings_of
  assert recipe_kv_format("atom-w4a4") == KV_FORMATS["kv4-atom"]
  assert recipe_kv_format("quarot-w4a4") == KV_FORMATS["kv4"]
  assert recipe_kv_format("w4a16", {"kv_cache": "kv4"}) == KV_FORMATS["kv4"]
  assert recipe_kv_format("kv2") == KV_FORMATS["kv2"]
  assert recipe_kv_format("rtn") == KV_FORMATS["dense"]
  with pytest.raises(ValueError, match="unknown KV cache format 'int3'"):
    settings_of("rtn", {"kv_cache": "int3"})
  model = _model()
  params = compress(model, "kv8", log=None)  # a KV-only recipe changes no weight
  assert all(a is b for a, b in zip(jax.tree.leaves(params),
                                    jax.tree.leaves(nnx.state(model, nnx.Param))))


def test_cli_eval_with_a_kv_format(tmp_path, capsys):
  """`lowbit compress --recipe kv4` records the format; `eval` runs with it, and
  `--kv-cache` overrides it."""
  import json

  from test_recipes import _params, _tiny_hf_folder
  from train.cli import main
  model_dir = _tiny_hf_folder(tmp_path / "tiny", _params())
  text = tmp_path / "eval.txt"
  text.write_text("A text to evaluate on, with some words in it. " * 30)
  out = tmp_path / "tiny-kv4"
  assert main(["compress", "--model", str(model_dir), "--recipe", "kv4", "--out", str(out)]) == 0
  assert json.loads((out / "manifest.json").read_text())["kv_cache"] == KV_FORMATS["kv4"].to_dict()
  capsys.readouterr()
  for argv in ([str(model_dir)], [str(out)], [str(out), "--kv-cache", "dense"]):
    assert main(["eval", "--model", *argv, "--text", str(text), "--seq-len", "64",
                 "--json"]) == 0
  dense, kv4, overridden = map(json.loads, capsys.readouterr().out.splitlines())
  assert kv4["kv_cache"]["bits"] == 4 and dense["kv_cache"]["bits"] is None
  assert kv4["perplexity"] != dense["perplexity"]
  assert overridden["perplexity"] == dense["perplexity"]
  assert main(["eval", "--model", str(model_dir), "--kv-cache", "kv3", "--text",
               str(text)]) == 2
  assert "unknown KV cache format 'kv3'" in capsys.readouterr().err
