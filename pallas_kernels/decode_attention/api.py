"""Paged decode attention: the dispatcher over the Pallas kernels and the XLA reference,
by the rules of `pallas_kernels.dispatch` (implementation=, block_sizes=, interpret=). Bad
shapes raise ValueError naming the argument before any implementation runs.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax

from pallas_kernels.dispatch import backend_order, call_first, requested_order
from pallas_kernels.decode_attention import gpu
from pallas_kernels.decode_attention import reference
from pallas_kernels.decode_attention import tpu
from pallas_kernels.decode_attention.config import BlockSizes, TpuBlockSizes

IMPLEMENTATIONS = ("pallas_gpu", "pallas_tpu", "xla")


def _order(implementation) -> tuple[str, ...]:
  return backend_order() if implementation is None else requested_order(implementation,
                                                                         IMPLEMENTATIONS)


def decode_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                     lengths: jax.Array, page_table: jax.Array, *,
                     k_scales: jax.Array | None = None, k_offsets: jax.Array | None = None,
                     v_scales: jax.Array | None = None, v_offsets: jax.Array | None = None,
                     bits: int | None = None, scale: float,
                     logit_softcap: float | None = None,
                     sliding_window: int | None = None,
                     rope_inv_freq: jax.Array | None = None,
                     key_group: int | None = None, return_lse: bool = False,
                     query_positions: jax.Array | None = None,
                     implementation: str | Sequence[str] | None = None,
                     block_sizes: BlockSizes | TpuBlockSizes | None = None,
                     interpret: Any = False) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Paged grouped-query decode attention over float / 8-bit / 4-bit / 2-bit KV pages,
  with per-token or (keys) per-channel grids.

  Args:
    q: [B, N, H] bf16 or f32, one query token per sequence (already rotated).
    k_pages, v_pages: [K, P, page_size, H] float pages (bits=None) or uint8 codes
      (bits=8); [K, P, page_size, H * bits / 8] uint8 for bits=4 or 2 (`pack_codes`'
      "fraction" packing, lowbit.kv_cache's: byte j holds element j + i H/f at bits
      i * bits, f = 8 / bits codes per byte; H % f == 0). N % K == 0.
    lengths: int32 [B], valid tokens per sequence (0 gives zeros).
    page_table: int32 [B, pages_per_seq]; token p of sequence b is in page
      page_table[b, p // page_size], slot p % page_size.
    k_scales, k_offsets, v_scales, v_offsets: float32 [K, P, page_size] for quantized
      pages: x = code * scale + offset. With key_group, k_scales / k_offsets are float32
      [K, P, page_size // key_group, H] instead.
    bits: None, 8, 4 or 2 (codes 0 .. 2^bits - 1).
    scale: softmax scale (e.g. H ** -0.5).
    logit_softcap: tanh(s / c) * c on the scores before the mask (Gemma).
    sliding_window: key p visible iff p > query_position - window.
    rope_inv_freq: f32 [H / 2]: keys are stored before RoPE and rotated at their
      absolute positions inside the op (HF rotate-half).
    key_group: per-channel keys (KIVI): one grid per channel and group of key_group
      tokens of a page; page_size % key_group == 0. Values keep per-token grids.
    return_lse: also return the log-sum-exp of the visible (scaled, soft-capped) scores,
      so that attention over further keys can be merged exactly.
    query_positions: int32 [B], the query's position for the sliding window (default
      lengths - 1): the pages may be a prefix of a longer sequence whose newest keys the
      caller attends itself.
    implementation, block_sizes, interpret: see the module docstring.

  Returns:
    [B, N, H] in q.dtype; with return_lse, (out f32 [B, N, H], lse f32 [B, N]), lse -inf
    for a sequence with no visible key.

  Raises:
    ValueError: bad shapes or dtypes (named argument and value), unknown implementation.
    NotImplementedError: no implementation in the requested order serves the case.
  """
  reference.validate_inputs(q, k_pages, v_pages, lengths, page_table, k_scales, k_offsets,
                            v_scales, v_offsets, bits=bits, rope_inv_freq=rope_inv_freq,
                            sliding_window=sliding_window, key_group=key_group,
                            query_positions=query_positions)
  fns = {"pallas_gpu": gpu.decode_attention, "pallas_tpu": tpu.decode_attention,
         "xla": reference.decode_attention}
  names = _order(implementation)
  kwargs = dict(k_scales=k_scales, k_offsets=k_offsets, v_scales=v_scales,
                v_offsets=v_offsets, bits=bits, scale=float(scale),
                logit_softcap=logit_softcap, sliding_window=sliding_window,
                rope_inv_freq=rope_inv_freq, key_group=key_group, return_lse=return_lse,
                query_positions=query_positions)
  return call_first("decode_attention", names, fns,
                    (q, k_pages, v_pages, lengths, page_table), kwargs,
                    block_sizes=block_sizes, interpret=interpret, gpu_type=BlockSizes,
                    tpu_type=TpuBlockSizes)
