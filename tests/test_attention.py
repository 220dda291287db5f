"""The attention dispatchers of lowbit.attention on the CPU (the reference paths; the cuDNN
paths are measured and compared on the GPU by bench/prefill_dispatch.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowbit.attention import (attention_mask, causal_self_attention, dense_decode_attention,
                              gqa_attention, paged_decode_attention)
from lowbit.kv_cache import KV_FORMATS


def _qkv(t, s, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(keys[0], (2, t, 4, 8)), jax.random.normal(keys[1], (2, s, 2, 8)),
          jax.random.normal(keys[2], (2, s, 2, 8)))


@pytest.mark.parametrize("window", [None, 3])
def test_causal_self_attention_is_the_masked_reference(window):
  q, k, v = _qkv(9, 9)
  positions = jnp.arange(9)
  expected = gqa_attention(q, k, v, attention_mask(positions, positions, window), scale=0.3)
  got = causal_self_attention(q, k, v, scale=0.3, sliding_window=window)
  np.testing.assert_allclose(got, expected, atol=1e-6)
  with pytest.raises(ValueError, match="implementation='flash'"):
    causal_self_attention(q, k, v, scale=0.3, implementation="flash")


@pytest.mark.parametrize("window", [None, 4])
def test_dense_decode_attends_to_the_first_length_slots(window):
  q, k, v = _qkv(1, 16, 1)
  length = 11
  # Stale slots (finite garbage: a dense cache is zero-initialized and never holds NaN).
  got = dense_decode_attention(q, k, v.at[:, length:].set(1e4), length, scale=0.3,
                               sliding_window=window)
  lo = 0 if window is None else length - window
  expected = gqa_attention(q, k[:, lo:length], v[:, lo:length],
                           jnp.ones((1, length - lo), bool), scale=0.3)
  np.testing.assert_allclose(got, expected, atol=1e-6)


@pytest.mark.parametrize("fmt", ["kv4", "kv2"])
@pytest.mark.parametrize("length", [20, 32, 45])
@pytest.mark.parametrize("window,softcap", [(None, None), (4, None), (20, 5.0)])
def test_paged_decode_over_channel_keys_is_the_masked_reference(fmt, length, window,
                                                                softcap):
  """kv4 / kv2 (per-channel keys): the kernel over the complete key groups merged with the
  float window equals attention over the whole cache read back; windows inside the float
  window (4) and across both parts (20); lengths below, at and past a group."""
  q, k, v = _qkv(1, length, 2)
  cache = KV_FORMATS[fmt].empty(2, 64, 2, 8).write(k, v, 0, prefill=True)
  assert cache.paged
  got = paged_decode_attention(q, cache, length, scale=0.3, sliding_window=window,
                               logit_softcap=softcap)
  keys, values = cache.read()
  mask = attention_mask(jnp.array([length - 1]), jnp.arange(keys.shape[1]), window)
  expected = gqa_attention(q, keys, values, mask, scale=0.3, logit_softcap=softcap)
  np.testing.assert_allclose(got, expected, atol=1e-5)
