"""Palu latent decode attention: the dispatcher over the Pallas kernels and the XLA
reference, by the rules of `pallas_kernels.dispatch` (implementation=, block_sizes=,
interpret=). Bad shapes, dtypes or bits raise ValueError naming the argument before any
implementation runs.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax

from pallas_kernels.dispatch import backend_order, call_first, requested_order
from pallas_kernels.latent_decode_attention import gpu
from pallas_kernels.latent_decode_attention import reference
from pallas_kernels.latent_decode_attention import tpu
from pallas_kernels.latent_decode_attention.config import BlockSizes, TpuBlockSizes

IMPLEMENTATIONS = ("pallas_gpu", "pallas_tpu", "xla")


def latent_decode_attention(q: jax.Array, k_latents: jax.Array, v_latents: jax.Array,
                            k_up: jax.Array, lengths: jax.Array, *,
                            rope_inv_freq: jax.Array | None, scale: float,
                            k_scales: jax.Array | None = None,
                            k_offsets: jax.Array | None = None,
                            v_scales: jax.Array | None = None,
                            v_offsets: jax.Array | None = None,
                            bits: int | None = None,
                            logit_softcap: float | None = None,
                            sliding_window: int | None = None,
                            implementation: str | Sequence[str] | None = None,
                            block_sizes: BlockSizes | TpuBlockSizes | None = None,
                            interpret: Any = False) -> jax.Array:
  """Grouped-query decode attention over a Palu latent KV cache (keys rebuilt in the op).

  Args:
    q: [B, N, H] bf16 or f32, one query token per sequence, RoPE applied at its position
      lengths[b] - 1.
    k_latents: [G, B, S, Rk] float (bits=None) or uint8 [G, B, S, Rk // 2] (bits=4,
      "halves" packing: low nibble of byte j = element j, high nibble = element j + Rk/2).
      Slot s of sequence b holds position s; slots >= lengths[b] may hold garbage.
    v_latents: [G, B, S, Rv] float or uint8 [G, B, S, Rv // 2]; Rv may differ from Rk.
    k_up: [G, gh*H, Rk] bf16 / f32; row j*H + d is dim d of kv head g*gh + j. K = G*gh
      kv heads; query head n uses kv head n // (N // K).
    lengths: int [B] valid slots per sequence (0 gives zeros).
    rope_inv_freq: f32 [H/2]: rebuilt keys are rotated at their slot positions (HF
      rotate-half); None: keys are not rotated.
    scale: softmax scale (e.g. H ** -0.5).
    k_scales, k_offsets, v_scales, v_offsets: f32 [G, B, S] for bits=4:
      latent = code * scale + offset.
    bits: None or 4.
    logit_softcap: tanh(s / c) * c on the scores before the mask.
    sliding_window: slot s visible iff s > length - 1 - window.
    implementation, block_sizes, interpret: see the module docstring.

  Returns:
    f32 [B, N, Rv]: the attention-weighted V latents of each query head's group (the
    caller applies the V up-projection).

  Raises:
    ValueError: bad shapes, dtypes or bits (named argument and value), unknown
      implementation.
    NotImplementedError: no implementation in the requested order serves the case.
  """
  reference.validate_inputs(q, k_latents, v_latents, k_up, lengths, k_scales, k_offsets,
                            v_scales, v_offsets, bits=bits, rope_inv_freq=rope_inv_freq,
                            sliding_window=sliding_window, logit_softcap=logit_softcap)
  fns = {"pallas_gpu": gpu.latent_decode_attention,
         "pallas_tpu": tpu.latent_decode_attention,
         "xla": reference.latent_decode_attention}
  names = (backend_order() if implementation is None
           else requested_order(implementation, IMPLEMENTATIONS))
  kwargs = dict(rope_inv_freq=rope_inv_freq, scale=float(scale), k_scales=k_scales,
                k_offsets=k_offsets, v_scales=v_scales, v_offsets=v_offsets, bits=bits,
                logit_softcap=logit_softcap, sliding_window=sliding_window)
  return call_first("latent_decode_attention", names, fns,
                    (q, k_latents, v_latents, k_up, lengths), kwargs,
                    block_sizes=block_sizes, interpret=interpret, gpu_type=BlockSizes,
                    tpu_type=TpuBlockSizes)
