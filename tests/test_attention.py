"""The attention dispatchers of lowbit.attention on the CPU (the reference paths; the cuDNN
paths are measured and compared on the GPU by bench/prefill_dispatch.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowbit.attention import (attention_mask, causal_self_attention, dense_decode_attention,
                              gqa_attention)


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
