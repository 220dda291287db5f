"""Pallas (Triton lowering) Palu latent decode attention.

Same signature as `reference.latent_decode_attention`, plus `block_sizes=` and
`interpret=`.

What bounds it: per token and group the cache holds (Rk + Rv) latent values, half the
2 * gh * H of a dense cache at Palu's 50% rank, but the keys must be rebuilt:
2 * Rk * gh * H FLOPs per token and group (262k at Llama-3-8B, gh=4, Rk=256), i.e. 256
FLOPs per bf16 key-latent byte, above the H200's ridge point (~690 TFLOP/s measured /
~4 TB/s). So the rebuild runs on the tensor cores (wgmma, one dot per tile, head and
RoPE half) and the kernel is compute-bound: at (B=16, 64k) the rebuild alone at the
measured matmul rate takes 0.80 ms against 0.54 ms to read the bf16 latents and 1.02 ms
for cuDNN's dense bf16 attention, so even a perfect kernel gains at most ~1.3x over
dense there; 4-bit latents cut bytes, not FLOPs. The rebuild FLOPs per token are
2 * (G * Rk) * gh * H: at a fixed cache budget G * Rk they grow with the group size gh
(gh=1 costs a quarter of gh=4). Measured (H200, jax 0.11.2, bench/latent_decode.py):
the rebuild runs at 150-225 TFLOP/s (22-32% of the matmul rate) at B=16, 50-160 at
B=1; end to end (with the caller's V up-projection) 0.41-1.0x the speed of the dense
bf16 path (cuDNN) with bf16 latents, 0.33-0.93x with 4-bit latents.

Design (flash-decoding):
  * grid (batch, group, split): a split is a contiguous range of `block_t`-slot tiles of
    one sequence (config.BlockSizes.split_layout fills the GPU: B * G is only 2 for one
    Llama-3-8B sequence).
  * per tile: the latent tile [T, Rk] is loaded once and, for each kv head j of the
    group and each RoPE half, the key half [T, H/2] = latents @ k_up[g, rows]^T is one
    tensor-core dot (rows = H/2 rows of head j). k_up of a group (gh * H * Rk values,
    256 KB at Llama-3-8B) does not fit in registers or shared memory, so it is re-read
    per tile from L2 (all programs of a group share it) inside a loop over the heads
    (an unrolled loop let Triton hoist it whole into shared memory: 300-400 KB, over
    the 227 KB limit); a larger block_t amortizes the re-reads.
  * RoPE works on the two halves directly (rotate-half pairs dim d with d + H/2); cos
    and sin come from angle-addition with [T, H/2] tables built once outside the kernel
    (decode_attention/gpu.py does the same), one cos / sin of the tile start per tile.
  * GQA: all gh * (N/K) queries of the group are the M rows of the score dots (padded to
    16); for head j the query rows of other heads are zeroed, so the scores of the tile
    are the sum over j of the per-head dots. The value dot [M, T] x [T, Rv] serves all
    queries of the group at once (they share the V latent).
  * 4-bit latents: codes unpacked in registers into their two halves (decode_attention's
    nibbles, exact as bf16 / f32), and dequantization folded where linear:
    key = s_t * (codes @ up^T) + o_t * rowsum(up), with rowsum(up) [gh*H] precomputed;
    values as decode_attention: (p * vscale) @ codes + sum_t(p * voffset) in float16.
  * masking by `where` only: scores of invisible slots to a large negative finite value,
    their value rows / value scales to 0, so NaN in unused slots never reaches a sum.
    (A NaN latent row only reaches its own key row, whose score is replaced.)
  * decode_attention.gpu.combine_splits merges the splits by log-sum-exp.

Limits: H / 2 and the stored latent widths (Rk, Rv; Rk / 2, Rv / 2 for 4 bits) must be
powers of two >= 16 (Triton block shapes, dot dimensions); q bf16 or f32 (f32 runs
HIGHEST-precision dots, for tests). A cache whose S is not a multiple of block_t is
padded (a copy): allocate S as a multiple of it.

Compile (pallas_kernels/triton_offline.py, Triton 3.6, sm_90, the default 128-slot tiles,
8 warps, 2 stages, Llama-3-8B Palu shape): bf16 latents 255 registers, 248 B spilled,
217 KB shared memory (the 227 KB limit: 3 stages or 256-slot tiles do not fit); 4-bit
latents 255 registers, 808 B spilled, 152 KB. One program per SM, so the wgmma waits are
not hidden by other programs: the main loss against the matmul rate.

Future work: two programs per SM (smaller shared footprint, fewer live registers);
Mosaic GPU (asynchronous wgmma with k_up streamed by TMA, RoPE overlapped with the next
dot); keep k_up in shared memory where gh * H * Rk is small; without RoPE the
up-projection can be absorbed into the query (q @ up_j, Rk per query head) and no key
needs rebuilding.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.decode_attention.config import MIN_DOT_DIM, next_pow2
from pallas_kernels.decode_attention.gpu import MASK_VALUE, nibbles
from pallas_kernels.decode_attention.gpu import combine_splits, softmax_step, split_outputs
from pallas_kernels.latent_decode_attention import reference
from pallas_kernels.latent_decode_attention.layout import pad_slots, query_halves
from pallas_kernels.latent_decode_attention.config import BlockSizes
from pallas_kernels.triton_params import TritonCompilerParams


def _dot(a, b, precision, *, nt=False):
  """a [R, C] . b [C, S] (or b [S, C] with nt) -> f32 [R, S]."""
  return jnp.dot(a, b.T if nt else b, preferred_element_type=jnp.float32,
                 precision=precision)


def _kernel(*refs, bits, rope: bool, gh: int, h: int, bt: int, slots_per_split: int,
            scale: float, softcap, window, cdt, precision):
  it = iter(refs)
  len_ref = next(it)  # i32[1]
  q_ref = next(it)  # [gh, 2, Mp, H/2]: the group's queries, zero outside head j's rows
  k_ref = next(it)  # [S, Rk] (or [S, Rk/2] packed)
  ks_ref, ko_ref = (next(it), next(it)) if bits else (None, None)  # f32[S]
  v_ref = next(it)  # [S, Rv] (or [S, Rv/2] packed)
  vs_ref, vo_ref = (next(it), next(it)) if bits else (None, None)
  up_ref = next(it)  # [gh*H, Rk]
  upsum_ref = next(it) if bits else None  # f32[gh*H]: rowsum(up)
  if rope:
    cos_ref, sin_ref, f_ref = next(it), next(it), next(it)  # f32[T, H/2] x2, f32[H/2]
  o_ref, m_ref, l_ref = next(it), next(it), next(it)  # f32[Mp, Rv], f32[Mp], f32[Mp]

  h2 = h // 2
  mp = q_ref.shape[2]
  rk = up_ref.shape[1]
  length = len_ref[0]
  first = pl.program_id(2) * slots_per_split
  end = jnp.minimum(first + slots_per_split, length)
  n_tiles = jnp.maximum(lax.div(end - first + (bt - 1), bt), 0)
  if window is not None:
    lo_pos = jnp.maximum(length - window, 0)
    i0 = jnp.maximum(lax.div(lo_pos - first, bt), 0)
  else:
    lo_pos, i0 = None, jnp.int32(0)
  # Value codes and their weights p * vscale in float16 (decode_attention/gpu.py: the
  # offset term cancels less in float16's 11-bit significand than in bf16's 8).
  vdt = jnp.float16 if bits and cdt == jnp.bfloat16 else cdt

  acc_cols = (0, 1) if bits else (0,)

  def body(i, carry):
    accs, m_prev, l_prev = carry
    start = first + i * bt
    rows = pl.ds(start, bt)
    pos = start + lax.broadcasted_iota(jnp.int32, (bt,), 0)
    valid = pos < length
    if lo_pos is not None:
      valid &= pos >= lo_pos

    # -- latents [T, Rk] (two code halves [T, Rk/2] for 4 bits)
    if bits:
      lat = nibbles(k_ref[rows, :], cdt)
      ks, ko = ks_ref[rows][:, None], ko_ref[rows][:, None]  # f32 [T, 1]
    else:
      lat = (k_ref[rows, :].astype(cdt),)
    if rope:
      # Tables loaded per tile (L1 hits): held across the loop they cost 32 registers.
      ang0 = start.astype(jnp.float32) * f_ref[...]  # [H/2]
      c0, s0 = jnp.cos(ang0)[None, :], jnp.sin(ang0)[None, :]
      cos_r, sin_r = cos_ref[...], sin_ref[...]  # [T, H/2]: cos, sin of slot * freq
      cos = c0 * cos_r - s0 * sin_r  # [T, H/2]
      sin = s0 * cos_r + c0 * sin_r

    # -- scores [Mp, T]: sum over the group's kv heads j of q_j . rebuilt key_j. A loop,
    # not unrolled: k_up's rows are then loaded per tile (from L2), which keeps Triton's
    # loop-invariant code motion from hoisting all of k_up (256 KB) into shared memory.
    def head(j, s):
      halves = []
      for half in range(2):
        urows = pl.ds(j * h + half * h2, h2)
        if bits:
          cols = rk // 2
          k = (_dot(lat[0], up_ref[urows, pl.ds(0, cols)], precision, nt=True)
               + _dot(lat[1], up_ref[urows, pl.ds(cols, cols)], precision, nt=True))
          k = k * ks + ko * upsum_ref[urows][None, :]
        else:
          k = _dot(lat[0], up_ref[urows, :], precision, nt=True)
        halves.append(k)  # f32 [T, H/2]
      k1, k2 = halves
      if rope:
        k1, k2 = k1 * cos - k2 * sin, k2 * cos + k1 * sin
      return s + (_dot(q_ref[j, 0], k1.astype(cdt), precision, nt=True)
                  + _dot(q_ref[j, 1], k2.astype(cdt), precision, nt=True))

    s = lax.fori_loop(0, gh, head, jnp.zeros((mp, bt), jnp.float32))
    p, alpha, m_new, l_new = softmax_step(s, valid, m_prev, l_prev, scale=scale,
                                          softcap=softcap)

    # -- values [Mp, Rv]
    if bits:
      vs = jnp.where(valid, vs_ref[rows], 0.0)
      vo = jnp.where(valid, vo_ref[rows], 0.0)
      pv = (p * vs[None, :]).astype(vdt)
      c1, c2 = nibbles(v_ref[rows, :], vdt)
      bias = jnp.sum(p * vo[None, :], axis=1)[:, None]
      parts = (_dot(pv, c1, precision) + bias, _dot(pv, c2, precision) + bias)
    else:
      v = v_ref[rows, :]
      v = jnp.where(valid[:, None], v, jnp.zeros((), v.dtype)).astype(cdt)
      parts = (_dot(p.astype(cdt), v, precision),)
    accs = tuple(alpha[:, None] * a + x for a, x in zip(accs, parts))
    return accs, m_new, l_new

  # 4 bits: one accumulator per code half (columns [0, Rv/2) and [Rv/2, Rv)).
  width = o_ref.shape[1] // len(acc_cols)
  init = (tuple(jnp.zeros((mp, width), jnp.float32) for _ in acc_cols),
          jnp.full((mp,), MASK_VALUE, jnp.float32), jnp.zeros((mp,), jnp.float32))
  accs, m, l = lax.fori_loop(i0, n_tiles, body, init)
  for col, a in zip(acc_cols, accs):
    o_ref[:, pl.ds(col * width, width)] = a
  m_ref[...] = m
  l_ref[...] = l


def check_supported(q, k_latents, v_latents, k_up, *, bits) -> None:
  """Raises NotImplementedError for cases this kernel does not serve (STYLE.md 3)."""
  h = q.shape[2]
  if q.dtype not in (jnp.bfloat16, jnp.float32):
    raise NotImplementedError(f"pallas_gpu latent_decode_attention: q.dtype={q.dtype} "
                              "not bf16/f32")
  # The widths that reach a dot: head halves, and whole ranks (float) or code halves.
  for name, x in (("H / 2", h // 2), ("Rk'", k_latents.shape[3]),
                  ("Rv'", v_latents.shape[3])):
    if x & (x - 1) or x < MIN_DOT_DIM:
      raise NotImplementedError(f"pallas_gpu latent_decode_attention: {name}={x} must be "
                                f"a power of two >= {MIN_DOT_DIM} (bits={bits})")
  del k_up


@functools.partial(jax.jit, static_argnames=(
    "bits", "scale", "logit_softcap", "sliding_window", "block_sizes", "interpret"))
def latent_decode_attention(q, k_latents, v_latents, k_up, lengths, *, rope_inv_freq,
                            scale: float, k_scales=None, k_offsets=None, v_scales=None,
                            v_offsets=None, bits=None, logit_softcap=None,
                            sliding_window=None, block_sizes: BlockSizes | None = None,
                            interpret=False):
  """Latent decode attention on the GPU; see `reference.latent_decode_attention`."""
  reference.validate_inputs(q, k_latents, v_latents, k_up, lengths, k_scales, k_offsets,
                            v_scales, v_offsets, bits=bits, rope_inv_freq=rope_inv_freq,
                            sliding_window=sliding_window, logit_softcap=logit_softcap)
  check_supported(q, k_latents, v_latents, k_up, bits=bits)
  rope = rope_inv_freq is not None
  b, n, h = q.shape
  g, rows, rk = k_up.shape
  gh = rows // h
  qpk = n // (g * gh)  # query heads per kv head
  s = k_latents.shape[2]
  rv = v_latents.shape[3] * (2 if bits else 1)
  bs = block_sizes or BlockSizes.get_default()
  bt = bs.block_t
  cdt = jnp.bfloat16 if q.dtype == jnp.bfloat16 else jnp.float32
  precision = lax.Precision.HIGHEST if cdt == jnp.float32 else None

  s_pad = -(-s // bt) * bt
  splits, slots_per_split = bs.split_layout(b, g, s_pad)
  k_latents, v_latents, k_scales, k_offsets, v_scales, v_offsets = pad_slots(
      s_pad, k_latents, v_latents, k_scales, k_offsets, v_scales, v_offsets)
  # Queries of group g: rows j * qpk + i (kv head g*gh + j), padded to Mp rows; copy j
  # keeps only head j's rows, split into RoPE halves: [B, G, gh, 2, Mp, H/2].
  m = gh * qpk
  mp = max(MIN_DOT_DIM, next_pow2(m))
  qj = query_halves(q, groups=g, group_heads=gh, rows=mp, dtype=cdt)
  lens = jnp.minimum(lengths.astype(jnp.int32), s).reshape(b, 1)

  kc, vc = k_latents.shape[3], v_latents.shape[3]
  args = [lens, qj, k_latents]
  specs = [pl.BlockSpec((None, 1), lambda i, j, t: (i, 0)),
           pl.BlockSpec((None, None, gh, 2, mp, h // 2),
                        lambda i, j, t: (i, j, 0, 0, 0, 0)),
           pl.BlockSpec((None, None, s_pad, kc), lambda i, j, t: (j, i, 0, 0))]
  scale_spec = pl.BlockSpec((None, None, s_pad), lambda i, j, t: (j, i, 0))
  if bits:
    args += [k_scales, k_offsets]
    specs += [scale_spec, scale_spec]
  args.append(v_latents)
  specs.append(pl.BlockSpec((None, None, s_pad, vc), lambda i, j, t: (j, i, 0, 0)))
  if bits:
    args += [v_scales, v_offsets]
    specs += [scale_spec, scale_spec]
  args.append(k_up.astype(cdt))
  specs.append(pl.BlockSpec((None, rows, rk), lambda i, j, t: (j, 0, 0)))
  if bits:
    args.append(jnp.sum(k_up.astype(jnp.float32), axis=2))  # [G, gh*H]
    specs.append(pl.BlockSpec((None, rows), lambda i, j, t: (j, 0)))
  if rope:
    freq = rope_inv_freq.astype(jnp.float32)
    ang = jnp.arange(bt, dtype=jnp.float32)[:, None] * freq[None, :]
    args += [jnp.cos(ang), jnp.sin(ang), freq]
    specs += [pl.BlockSpec((bt, h // 2), lambda i, j, t: (0, 0))] * 2
    specs.append(pl.BlockSpec((h // 2,), lambda i, j, t: (0,)))

  kernel = functools.partial(
      _kernel, bits=bits, rope=rope, gh=gh, h=h, bt=bt, slots_per_split=slots_per_split,
      scale=float(scale), softcap=logit_softcap, window=sliding_window, cdt=cdt,
      precision=precision)
  out_specs, out_shape = split_outputs(b, g, splits, mp, rv)
  o, m_, l_ = pl.pallas_call(
      kernel,
      grid=(b, g, splits),
      in_specs=specs,
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=TritonCompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
      interpret=interpret,
      name=f"latent_decode_attention_bits{bits or 16}{'_rope' if rope else ''}",
  )(*args)
  out, _ = combine_splits(o, m_, l_, m)  # f32 [B, G, M, Rv], lse
  return out.reshape(b, n, rv)
