"""KV-cache leaf types that attention blocks store.

An attention block holds whatever cache type a recipe chose (dense now; quantized, Palu
latents or xKV factors later) and talks to it through `write` and `read`, so the model code
is written once. Slots are absolute positions: slot s holds the token at position s.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DenseKVCache:
  """Keys and values of one layer in the activation dtype.

  k, v: [B, S_max, K, H]. Slots at or past the current length hold stale data; attention
  masks them by position.
  """

  k: jax.Array
  v: jax.Array

  @classmethod
  def zeros(cls, batch: int, max_len: int, num_kv_heads: int, head_dim: int,
            dtype=jnp.float32) -> "DenseKVCache":
    shape = (batch, max_len, num_kv_heads, head_dim)
    return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

  @property
  def max_len(self) -> int:
    return self.k.shape[1]

  def write(self, k_new: jax.Array, v_new: jax.Array, start) -> "DenseKVCache":
    """Stores k_new, v_new [B, T, K, H] at slots start .. start+T-1."""
    index = (0, start, 0, 0)
    return DenseKVCache(
        jax.lax.dynamic_update_slice(self.k, k_new.astype(self.k.dtype), index),
        jax.lax.dynamic_update_slice(self.v, v_new.astype(self.v.dtype), index))

  def read(self) -> tuple[jax.Array, jax.Array]:
    return self.k, self.v

  @property
  def nbytes(self) -> int:
    return self.k.nbytes + self.v.nbytes
