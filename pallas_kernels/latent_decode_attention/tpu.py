"""Pallas (Mosaic TPU) Palu latent decode attention.

Same signature as `reference.latent_decode_attention`, plus `block_sizes=` and
`interpret=` (pass `pltpu.InterpretParams()` to run on a CPU; it also flags out-of-bounds
reads).

Design (simpler than the GPU kernel: no split of the sequence): grid (batch, group, tile),
the tile axis "arbitrary" and last. The lengths are scalar-prefetched; the BlockSpec
pipeline DMAs one `block_t`-slot tile of K and V latents (and their scale / offset rows)
per step, with the tile index clamped to the sequence's last live tile, so tiles past a
length are neither fetched anew nor computed. The running (out, max, sum) live in VMEM
scratch; the last step writes the normalized output.

Per tile: for each kv head j of the group and RoPE half, key half [T, H/2] = latents @
k_up[rows]^T on the MXU, rotated with cos / sin of float32(slot) * inv_freq (the
reference's angle exactly), scored against the group's queries (rows of other heads
zeroed, as on the GPU). 4-bit latents stay in the row layout of the scores: with
key = s_t * (codes @ up^T) + o_t * rowsum(up), RoPE being linear per slot,
score = s_t * (q . rot_t(codes @ up^T)) + o_t * (q . rot_t(rowsum(up))), and
out += (p * vscale) @ codes + sum_t(p * voffset), so scales and offsets arrive as [1, T]
rows (no column rescale).

Limits: validated in TPU interpret mode on a CPU
(tests/test_kernels_latent_decode_attention.py) and lowered for a TPU at the Llama-3-8B
Palu shape (block_t 128, H / 2 = 64, ranks 256), not yet run on a TPU. On a TPU
block_t should be a multiple of 128 (the scale rows are [1, block_t] blocks) and the
latent widths multiples of 128 lanes; the tests' small shapes run in interpret mode only.

Future work: a split of long sequences over the two TensorCores of a v5p / v7 chip;
skip the DMA of tiles before a sliding window.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.decode_attention.tpu import MASK_VALUE
from pallas_kernels.latent_decode_attention import reference
from pallas_kernels.latent_decode_attention.layout import pad_slots, query_halves
from pallas_kernels.latent_decode_attention.config import TpuBlockSizes

_NT = (((1,), (1,)), ((), ()))


def _kernel(len_ref, *refs, bits, rope: bool, gh: int, h: int, bt: int, scale: float,
            softcap, window, cdt, precision):
  it = iter(refs)
  q_ref = next(it)  # [gh, 2, Mp, H/2]: the group's queries, zero outside head j's rows
  k_ref = next(it)  # [T, Rk'] latents (codes packed in halves for 4 bits)
  ks_ref, ko_ref = (next(it), next(it)) if bits else (None, None)  # f32[1, T]
  v_ref = next(it)  # [T, Rv']
  vs_ref, vo_ref = (next(it), next(it)) if bits else (None, None)
  up_ref = next(it)  # [C, gh*H, Rk/C]: k_up columns per code half (C = 2 for 4 bits)
  upsum_ref = next(it) if bits else None  # f32[gh*H, 1]: rowsum(k_up)
  f_ref = next(it) if rope else None  # f32[1, H/2]
  o_ref = next(it)  # f32[Mp, Rv]
  acc_ref, m_ref, l_ref = next(it), next(it), next(it)  # f32[Mp, Rv], [Mp, 1], [Mp, 1]

  b, t = pl.program_id(0), pl.program_id(2)
  h2 = h // 2
  length = len_ref[b]
  start = t * bt
  lo_pos = None if window is None else jnp.maximum(length - window, 0)
  dot_nt = lambda a, c: lax.dot_general(a, c, _NT, precision=precision,
                                        preferred_element_type=jnp.float32)
  dot = lambda a, c: jnp.dot(a, c, precision=precision, preferred_element_type=jnp.float32)

  @pl.when(t == 0)
  def _():
    acc_ref[...] = jnp.zeros_like(acc_ref)
    m_ref[...] = jnp.full_like(m_ref, MASK_VALUE)
    l_ref[...] = jnp.zeros_like(l_ref)

  live = start < length
  if lo_pos is not None:
    live &= start + bt > lo_pos

  def codes(ref):
    """[T, R'] latents -> list of [T, R/C] float parts (code halves for 4 bits)."""
    x = ref[...]
    if bits:
      w = x.astype(jnp.int32)
      return [(w & 0xF).astype(cdt), (w >> 4).astype(cdt)]
    return [x.astype(cdt)]

  @pl.when(live)
  def _():
    pos_row = start + lax.broadcasted_iota(jnp.int32, (1, bt), 1)
    valid = pos_row < length
    if lo_pos is not None:
      valid &= pos_row >= lo_pos
    lat = codes(k_ref)
    if rope:
      pos_col = start + lax.broadcasted_iota(jnp.int32, (bt, 1), 0)
      ang = pos_col.astype(jnp.float32) * f_ref[...]  # [T, H/2], as the reference
      cos, sin = jnp.cos(ang), jnp.sin(ang)
    s_codes = jnp.zeros(o_ref.shape[:1] + (bt,), jnp.float32)  # [Mp, T]
    s_offsets = jnp.zeros_like(s_codes)
    for j in range(gh):
      halves, sums = [], []
      for half in range(2):
        rows = pl.ds(j * h + half * h2, h2)
        halves.append(sum(dot_nt(part, up_ref[c, rows, :]) for c, part in enumerate(lat)))
        if bits:
          sums.append(upsum_ref[rows, :].reshape(1, h2))  # [1, H/2]
      k1, k2 = halves  # f32 [T, H/2]
      if rope:
        k1, k2 = k1 * cos - k2 * sin, k2 * cos + k1 * sin
      q1, q2 = q_ref[j, 0], q_ref[j, 1]
      s_codes += dot_nt(q1, k1.astype(cdt)) + dot_nt(q2, k2.astype(cdt))
      if bits:
        u1, u2 = sums
        if rope:
          u1, u2 = u1 * cos - u2 * sin, u2 * cos + u1 * sin  # [T, H/2]
          s_offsets += dot_nt(q1, u1.astype(cdt)) + dot_nt(q2, u2.astype(cdt))
        else:  # the same for every slot: [Mp, 1]
          s_offsets += (jnp.sum(q1.astype(jnp.float32) * u1, axis=1, keepdims=True)
                        + jnp.sum(q2.astype(jnp.float32) * u2, axis=1, keepdims=True))
    s = s_codes * ks_ref[...] + s_offsets * ko_ref[...] if bits else s_codes
    s = s * scale
    if softcap is not None:
      s = jnp.tanh(s / softcap) * softcap
    s = jnp.where(valid, s, MASK_VALUE)

    m_prev, l_prev = m_ref[...], l_ref[...]
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))  # [Mp, 1]
    alpha = jnp.exp(m_prev - m_new)
    p = jnp.where(valid, jnp.exp(s - m_new), 0.0)  # [Mp, T]
    l_ref[...] = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
    m_ref[...] = m_new
    vals = codes(v_ref)
    if bits:
      pv = (p * jnp.where(valid, vs_ref[...], 0.0)).astype(cdt)
      bias = jnp.sum(p * jnp.where(valid, vo_ref[...], 0.0), axis=1, keepdims=True)
      new = jnp.concatenate([dot(pv, c) + bias for c in vals], axis=1)
    else:
      pos_col = start + lax.broadcasted_iota(jnp.int32, (bt, 1), 0)
      valid_col = pos_col < length
      if lo_pos is not None:
        valid_col &= pos_col >= lo_pos
      new = dot(p.astype(cdt), jnp.where(valid_col, vals[0], jnp.zeros((), cdt)))
    acc_ref[...] = alpha * acc_ref[...] + new

  @pl.when(t == pl.num_programs(2) - 1)
  def _():
    l = l_ref[...]
    o_ref[...] = jnp.where(l > 0, acc_ref[...] / jnp.where(l > 0, l, 1.0), 0.0)


def check_supported(q) -> None:
  """Raises NotImplementedError for cases this kernel does not serve."""
  if q.dtype not in (jnp.bfloat16, jnp.float32):
    raise NotImplementedError(f"pallas_tpu latent_decode_attention: q.dtype={q.dtype} "
                              "not bf16/f32")


@functools.partial(jax.jit, static_argnames=(
    "bits", "scale", "logit_softcap", "sliding_window", "block_sizes", "interpret"))
def latent_decode_attention(q, k_latents, v_latents, k_up, lengths, *, rope_inv_freq,
                            scale: float, k_scales=None, k_offsets=None, v_scales=None,
                            v_offsets=None, bits=None, logit_softcap=None,
                            sliding_window=None,
                            block_sizes: TpuBlockSizes | None = None, interpret=False):
  """Latent decode attention on the TPU; see `reference.latent_decode_attention`."""
  reference.validate_inputs(q, k_latents, v_latents, k_up, lengths, k_scales, k_offsets,
                            v_scales, v_offsets, bits=bits, rope_inv_freq=rope_inv_freq,
                            sliding_window=sliding_window, logit_softcap=logit_softcap)
  check_supported(q)
  rope = rope_inv_freq is not None
  b, n, h = q.shape
  g, rows, rk = k_up.shape
  gh = rows // h
  qpk = n // (g * gh)
  s = k_latents.shape[2]
  rv = v_latents.shape[3] * (2 if bits else 1)
  bs = block_sizes or TpuBlockSizes.get_default()
  bt = bs.block_t
  cdt = jnp.bfloat16 if q.dtype == jnp.bfloat16 else jnp.float32
  precision = lax.Precision.HIGHEST if cdt == jnp.float32 else None

  s_pad = -(-s // bt) * bt
  n_tiles = s_pad // bt
  k_latents, v_latents, k_scales, k_offsets, v_scales, v_offsets = pad_slots(
      s_pad, k_latents, v_latents, k_scales, k_offsets, v_scales, v_offsets)
  m = gh * qpk
  mp = -(-m // 8) * 8
  qj = query_halves(q, groups=g, group_heads=gh, rows=mp, dtype=cdt)
  lens = jnp.minimum(lengths.astype(jnp.int32), s)
  n_code = 2 if bits else 1
  up = k_up.astype(cdt).reshape(g, rows, n_code, rk // n_code).transpose(0, 2, 1, 3)

  def tile(bi, t, lens_ref):
    """The tile to fetch at step t: clamped to the sequence's last live tile."""
    last = jnp.maximum(lax.div(lens_ref[bi] + (bt - 1), bt) - 1, 0)
    return jnp.minimum(t, last)

  kc, vc = k_latents.shape[3], v_latents.shape[3]
  args = [qj, k_latents]
  specs = [pl.BlockSpec((None, None, gh, 2, mp, h // 2),
                        lambda i, j, t, lr: (i, j, 0, 0, 0, 0)),
           pl.BlockSpec((None, None, bt, kc),
                        lambda i, j, t, lr: (j, i, tile(i, t, lr), 0))]
  as_rows = lambda a: a.reshape(g, b, 1, s_pad)
  row_spec = pl.BlockSpec((None, None, 1, bt),
                          lambda i, j, t, lr: (j, i, 0, tile(i, t, lr)))
  if bits:
    args += [as_rows(k_scales), as_rows(k_offsets)]
    specs += [row_spec, row_spec]
  args.append(v_latents)
  specs.append(pl.BlockSpec((None, None, bt, vc),
                            lambda i, j, t, lr: (j, i, tile(i, t, lr), 0)))
  if bits:
    args += [as_rows(v_scales), as_rows(v_offsets)]
    specs += [row_spec, row_spec]
  args.append(up)
  specs.append(pl.BlockSpec((None, n_code, rows, rk // n_code),
                            lambda i, j, t, lr: (j, 0, 0, 0)))
  if bits:
    args.append(jnp.sum(k_up.astype(jnp.float32), axis=2)[..., None])  # [G, gh*H, 1]
    specs.append(pl.BlockSpec((None, rows, 1), lambda i, j, t, lr: (j, 0, 0)))
  if rope:
    args.append(rope_inv_freq.astype(jnp.float32)[None, :])
    specs.append(pl.BlockSpec((1, h // 2), lambda i, j, t, lr: (0, 0)))

  kernel = functools.partial(
      _kernel, bits=bits, rope=rope, gh=gh, h=h, bt=bt, scale=float(scale),
      softcap=logit_softcap, window=sliding_window, cdt=cdt, precision=precision)
  f32 = jnp.float32
  out = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1, grid=(b, g, n_tiles), in_specs=specs,
          out_specs=pl.BlockSpec((None, None, mp, rv), lambda i, j, t, lr: (i, j, 0, 0)),
          scratch_shapes=[pltpu.VMEM((mp, rv), f32), pltpu.VMEM((mp, 1), f32),
                          pltpu.VMEM((mp, 1), f32)]),
      out_shape=jax.ShapeDtypeStruct((b, g, mp, rv), f32),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name=f"latent_decode_attention_tpu_bits{bits or 16}{'_rope' if rope else ''}",
  )(lens, *args)
  return out[:, :, :m].reshape(b, n, rv)
