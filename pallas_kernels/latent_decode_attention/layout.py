"""Operand layouts that the GPU and TPU latent decode kernels share."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def pad_slots(slots: int, *arrays):
  """Arrays [G, B, S, ...] (None passes through) zero-padded to `slots` slots, so that whole
  tiles cover them (padded slots lie past every length and are masked)."""
  def pad(a):
    if a is None or a.shape[2] == slots:
      return a
    return jnp.pad(a, [(0, 0), (0, 0), (0, slots - a.shape[2])] + [(0, 0)] * (a.ndim - 3))
  return [pad(a) for a in arrays]


def query_halves(q: jax.Array, *, groups: int, group_heads: int, rows: int,
                 dtype) -> jax.Array:
  """q [B, N, H] -> [B, G, gh, 2, rows, H/2] in `dtype`.

  Group g's M = N / G queries are rows j * (M / gh) + i (i-th query of kv head g * gh + j);
  copy j keeps only kv head j's rows (the others zero), so one dot per copy scores the
  rebuilt keys of head j; rows >= M are zero padding up to `rows` (the dot's minimum), and
  the last axis is split into RoPE's two halves."""
  b, n, h = q.shape
  m = n // groups
  qg = q.reshape(b, groups, m, h)
  head_of_row = jnp.arange(m) // (m // group_heads)
  mine = head_of_row[None, :] == jnp.arange(group_heads)[:, None]  # [gh, M]
  qj = jnp.where(mine[None, None, :, :, None], qg[:, :, None], 0).astype(dtype)
  qj = jnp.pad(qj, ((0, 0),) * 3 + ((0, rows - m), (0, 0)))  # [B, G, gh, rows, H]
  return qj.reshape(b, groups, group_heads, rows, 2, h // 2).transpose(0, 1, 2, 4, 3, 5)
