"""Pallas (Mosaic TPU) paged decode attention over bf16 / int8 / int4 / int2 KV pages.

Same signature as `reference.decode_attention`, plus `block_sizes=` and `interpret=`
(pass `pltpu.InterpretParams()` to run on a CPU; it also flags out-of-bounds reads).

Design (simpler than the GPU kernel: no split of the sequence): grid (batch, kv head),
both "parallel". The lengths, the sliding windows' first positions and the page table are
scalar-prefetched into SMEM; the pages stay in HBM (memory_space ANY) and each loop step
DMAs `pages_per_block` pages of keys, values and their scales into VMEM scratch, waits,
and folds the block into an online softmax (float32 scores, max and sum in VMEM values
carried by the loop).

Packed 4-bit and 2-bit codes are unpacked with shifts and masks into their 2 or 4 column
parts (the "fraction" packing, `reference.pack_codes`), each part its own dot; RoPE takes
its two halves by joining parts (one part each at 4 bits).

Dequantization stays in the row layout the scores have ([G, block_t]): scales and offsets
arrive as [1, block_t] rows, so s = scale_t * (q . c_t) + offset_t * sum(q) and
out += (p * vscale) @ codes + sum_t(p * voffset). RoPE on quantized keys is done in the
code domain: rot(c * s + o) = s * rot(c) + o * rot(1), where rot(1) = (cos - sin, cos + sin)
per half, which adds two small MXU dots instead of a column-layout rescale. cos/sin come
from the same angle-addition tables as the GPU kernel (reference.py's angle up to a few
float32 ulps).

Per-channel keys (KIVI, `key_group`): each page's grid rows (f32 [page / key_group, H])
are DMA'd with it and the key block is dequantized in float32 before the dot (each token
takes its group's row); RoPE, if any, then rotates the float keys. `return_lse` adds the
softmax's running max and sum as outputs, from which the wrapper forms the log-sum-exp.

Masking by `where` only; page ids are clamped into the pool by the wrapper. No double
buffering of the DMAs yet.

Limits: validated in TPU interpret mode on a CPU (tests/test_kernels_decode_attention.py),
not yet run on a TPU; page_size should be a multiple of the sublane tiling (8 for f32, 16
for bf16, 32 for 8-bit) for real Mosaic DMAs, which the tests do not cover.

Future work: double-buffered DMAs; a split of long sequences over the two TensorCores of
a v5p / v7 chip; the head dim padded to 128 lanes for H = 64.
"""

from __future__ import annotations

import functools
import operator

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.decode_attention import reference
from pallas_kernels.decode_attention.config import TpuBlockSizes

# Memory space "anywhere" (the pages stay in HBM): pl.ANY in jax 0.10 / 0.11; newer
# releases spell it pl.MemorySpace.ANY.
_ANY = getattr(pl, "ANY", None) or pl.MemorySpace.ANY
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
_NT = (((1,), (1,)), ((), ()))


def _kernel(len_ref, start_ref, tab_ref, *refs, bits, key_group, rope: bool, ps: int,
            ppb: int, pages_padded: int, h: int, scale: float, softcap, window, cdt,
            precision, return_lse: bool):
  quant = bits is not None
  token_keys = quant and key_group is None  # per-token grids folded into the scores
  it = iter(refs)
  q_ref = next(it)  # [G, H]
  k_hbm = next(it)  # [K, P, page, H'] in HBM
  # f32[K, P, 1, page] per token, or f32[K, P, page / key_group, H] per channel
  ks_hbm, ko_hbm = (next(it), next(it)) if quant else (None, None)
  v_hbm = next(it)
  vs_hbm, vo_hbm = (next(it), next(it)) if quant else (None, None)
  if rope:
    # f32[page, H/2] x2, f32[ppb, H/2] x2 (angle-addition tables), f32[1, H/2] inv_freq
    cos_ref, sin_ref, pcos_ref, psin_ref, f_ref = (next(it) for _ in range(5))
  o_ref = next(it)  # [G, H] (f32 with return_lse)
  m_ref, l_ref = (next(it), next(it)) if return_lse else (None, None)  # f32[G, 1]
  kbuf, vbuf = next(it), next(it)  # [T, H']
  # f32[1, T] each; per channel the key grids are f32[ppb * page / key_group, H]
  sbufs = tuple(next(it) for _ in range(4)) if quant else ()
  sem = next(it)  # DMA semaphores [6]

  b, kv = pl.program_id(0), pl.program_id(1)
  h2 = h // 2
  bt = ppb * ps
  length = len_ref[b]
  n_pages = lax.div(length + (ps - 1), ps)
  n_blocks = lax.div(n_pages + (ppb - 1), ppb)
  if window is not None:
    lo_pos = start_ref[b]
    i0 = lax.div(lax.div(lo_pos, ps), ppb)
  else:
    lo_pos, i0 = None, jnp.int32(0)

  q = q_ref[...].astype(jnp.float32)
  qc = q.astype(cdt)
  q1, q2 = qc[:, :h2], qc[:, h2:]
  qsum = jnp.sum(qc.astype(jnp.float32), axis=1, keepdims=True)  # [G, 1]
  dot_nt = lambda a, c: lax.dot_general(a, c, _NT, precision=precision,
                                        preferred_element_type=jnp.float32)
  dot = lambda a, c: jnp.dot(a, c, precision=precision, preferred_element_type=jnp.float32)

  def copies(pstart):
    """DMA descriptors of the block's pages (keys, values, scales)."""
    out = []
    for j in range(ppb):
      page = tab_ref[b * pages_padded + pstart + j]
      rows = pl.ds(j * ps, ps)
      out.append(pltpu.make_async_copy(k_hbm.at[kv, page], kbuf.at[rows], sem.at[0]))
      out.append(pltpu.make_async_copy(v_hbm.at[kv, page], vbuf.at[rows], sem.at[1]))
      if quant:
        for n, (src, dst) in enumerate(zip((ks_hbm, ko_hbm, vs_hbm, vo_hbm), sbufs)):
          if key_group is not None and n < 2:
            npg = ps // key_group
            dst = dst.at[pl.ds(j * npg, npg)]
          else:
            dst = dst.at[:, rows]
          out.append(pltpu.make_async_copy(src.at[kv, page], dst, sem.at[2 + n]))
    return out

  parts = reference.codes_per_byte(bits)  # column parts of the unpacked codes
  width = h // parts
  columns = lambda x, i: x[:, i * width:(i + 1) * width]

  def codes_of(buf):
    """Page block -> f32 column parts [T, H / parts]: part i of packed codes is bits
    i*bits.. of each byte; one part (the whole block) for float and 8-bit pages."""
    x = buf[...]
    if parts == 1:
      return [x.astype(jnp.float32)]
    w = x.astype(jnp.int32)
    mask = (1 << bits) - 1
    return [((w >> (i * bits)) & mask).astype(jnp.float32) for i in range(parts)]

  def halves(x):
    """Column parts -> the two halves [T, H/2] that RoPE pairs."""
    if len(x) == 1:
      return x[0][:, :h2], x[0][:, h2:]
    join = lambda xs: xs[0] if len(xs) == 1 else jnp.concatenate(xs, axis=1)
    return join(x[:len(x) // 2]), join(x[len(x) // 2:])

  def dequantize_channels(x, ks, ko):
    """Key code parts -> float keys: each token takes the grid row (ks, ko
    f32[ppb * page / key_group, H]) of its group."""
    def rows(g):  # [ppb * page / key_group, H] -> [T, H]
      return jnp.broadcast_to(g[:, None, :], (g.shape[0], key_group, h)).reshape(bt, h)
    ks, ko = rows(ks), rows(ko)
    return [c * columns(ks, i) + columns(ko, i) for i, c in enumerate(x)]

  def body(i, carry):
    acc, m_prev, l_prev = carry
    pstart = i * ppb
    cps = copies(pstart)
    for c in cps:
      c.start()
    for c in cps:
      c.wait()
    pos_row = pstart * ps + lax.broadcasted_iota(jnp.int32, (1, bt), 1)
    valid = pos_row < length
    if lo_pos is not None:
      valid &= pos_row >= lo_pos
    pos_col = pstart * ps + lax.broadcasted_iota(jnp.int32, (bt, 1), 0)
    valid_col = pos_col < length
    if lo_pos is not None:
      valid_col &= pos_col >= lo_pos

    kparts = codes_of(kbuf)
    if quant:
      ks, ko, vs, vo = (s_[...] for s_ in sbufs)  # f32[1, T] (keys per channel: [., H])
    if key_group is not None:
      kparts = dequantize_channels(kparts, ks, ko)
    if rope:
      k1, k2 = halves(kparts)
      ang0 = (pstart * ps).astype(jnp.float32) * f_ref[...]  # [1, H/2]
      c0, s0 = jnp.cos(ang0), jnp.sin(ang0)
      ca = (c0 * pcos_ref[...] - s0 * psin_ref[...])[:, None, :]  # [ppb, 1, H/2]
      sa = (s0 * pcos_ref[...] + c0 * psin_ref[...])[:, None, :]
      cos = (ca * cos_ref[...][None] - sa * sin_ref[...][None]).reshape(bt, h2)
      sin = (sa * cos_ref[...][None] + ca * sin_ref[...][None]).reshape(bt, h2)
      r1 = (k1 * cos - k2 * sin).astype(cdt)
      r2 = (k2 * cos + k1 * sin).astype(cdt)
      s = dot_nt(q1, r1) + dot_nt(q2, r2)
      if token_keys:  # rot(c * s + o) = s * rot(c) + o * rot(1)
        ones = dot_nt(q1, (cos - sin).astype(cdt)) + dot_nt(q2, (cos + sin).astype(cdt))
        s = s * ks + ones * ko
    else:
      s = functools.reduce(operator.add, [dot_nt(columns(qc, i), c.astype(cdt))
                                          for i, c in enumerate(kparts)])
      if token_keys:
        s = s * ks + qsum * ko
    s = s * scale
    if softcap is not None:
      s = jnp.tanh(s / softcap) * softcap
    s = jnp.where(valid, s, MASK_VALUE)

    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))  # [G, 1]
    alpha = jnp.exp(m_prev - m_new)
    p = jnp.where(valid, jnp.exp(s - m_new), 0.0)  # [G, T]
    l_new = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)

    vparts = codes_of(vbuf)
    if quant:
      pv = (p * jnp.where(valid, vs, 0.0)).astype(cdt)
      bias = jnp.sum(p * jnp.where(valid, vo, 0.0), axis=1, keepdims=True)
      outs = [dot(pv, c.astype(cdt)) + bias for c in vparts]
    else:
      v = jnp.where(valid_col, vparts[0], 0.0).astype(cdt)
      outs = [dot(p.astype(cdt), v)]
    new = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)
    return alpha * acc + new, m_new, l_new

  g = q_ref.shape[0]
  init = (jnp.zeros((g, h), jnp.float32), jnp.full((g, 1), MASK_VALUE, jnp.float32),
          jnp.zeros((g, 1), jnp.float32))
  acc, m, l = lax.fori_loop(i0, n_blocks, body, init)
  out = jnp.where(l > 0, acc / jnp.where(l > 0, l, 1.0), 0.0)
  o_ref[...] = out.astype(o_ref.dtype)
  if return_lse:
    m_ref[...] = m
    l_ref[...] = l


def check_supported(q, k_pages, *, bits) -> None:
  """Raises NotImplementedError for cases this kernel does not serve."""
  del bits  # Every bit width.
  if q.dtype not in (jnp.bfloat16, jnp.float32):
    raise NotImplementedError(f"pallas_tpu decode_attention: {q.dtype=} not bf16/f32")
  del k_pages


@functools.partial(jax.jit, static_argnames=(
    "bits", "scale", "logit_softcap", "sliding_window", "key_group", "return_lse",
    "block_sizes", "interpret"))
def decode_attention(q, k_pages, v_pages, lengths, page_table, *, k_scales=None,
                     k_offsets=None, v_scales=None, v_offsets=None, bits=None,
                     scale: float, logit_softcap: float | None = None,
                     sliding_window: int | None = None, rope_inv_freq=None,
                     key_group: int | None = None, return_lse: bool = False,
                     query_positions=None, block_sizes: TpuBlockSizes | None = None,
                     interpret=False):
  """Paged decode attention on the TPU; see `reference.decode_attention`."""
  reference.validate_inputs(q, k_pages, v_pages, lengths, page_table, k_scales, k_offsets,
                            v_scales, v_offsets, bits=bits, rope_inv_freq=rope_inv_freq,
                            sliding_window=sliding_window, key_group=key_group,
                            query_positions=query_positions)
  check_supported(q, k_pages, bits=bits)
  rope = rope_inv_freq is not None
  quant = bits is not None
  b, n, h = q.shape
  kh, num_pages, ps, hc = k_pages.shape
  pps = page_table.shape[1]
  g = n // kh
  bs = block_sizes or TpuBlockSizes.get_default(ps)
  ppb = bs.pages_per_block
  bt = ppb * ps
  pages_padded = -(-pps // ppb) * ppb
  cdt = jnp.bfloat16 if q.dtype == jnp.bfloat16 else jnp.float32
  precision = lax.Precision.HIGHEST if cdt == jnp.float32 else None

  table = jnp.clip(page_table.astype(jnp.int32), 0, num_pages - 1)
  table = jnp.pad(table, ((0, 0), (0, pages_padded - pps))).reshape(-1)
  starts = (jnp.zeros((b,), jnp.int32) if sliding_window is None else
            reference.window_starts(lengths, query_positions, sliding_window))
  qg = q.reshape(b, kh, g, h)
  anyspec = pl.BlockSpec(memory_space=_ANY)
  args = [qg, k_pages]
  specs = [pl.BlockSpec((None, None, g, h), lambda i, j, *_: (i, j, 0, 0)), anyspec]
  as_rows = lambda a: a.reshape(kh, num_pages, 1, ps)
  if quant:
    key_rows = as_rows if key_group is None else (lambda a: a)
    args += [key_rows(k_scales), key_rows(k_offsets)]
    specs += [anyspec, anyspec]
  args.append(v_pages)
  specs.append(anyspec)
  if quant:
    args += [as_rows(v_scales), as_rows(v_offsets)]
    specs += [anyspec, anyspec]
  if rope:
    freq = rope_inv_freq.astype(jnp.float32)
    ang = jnp.arange(ps, dtype=jnp.float32)[:, None] * freq[None, :]
    pang = (jnp.arange(ppb, dtype=jnp.float32) * ps)[:, None] * freq[None, :]
    args += [jnp.cos(ang), jnp.sin(ang), jnp.cos(pang), jnp.sin(pang), freq[None, :]]
    specs += [pl.BlockSpec((ps, h // 2), lambda i, j, *_: (0, 0))] * 2
    specs += [pl.BlockSpec((ppb, h // 2), lambda i, j, *_: (0, 0))] * 2
    specs.append(pl.BlockSpec((1, h // 2), lambda i, j, *_: (0, 0)))
  scratch = [pltpu.VMEM((bt, hc), k_pages.dtype), pltpu.VMEM((bt, hc), v_pages.dtype)]
  if quant:
    key_grid = (1, bt) if key_group is None else (ppb * ps // key_group, h)
    scratch += [pltpu.VMEM(key_grid, jnp.float32) for _ in range(2)]
    scratch += [pltpu.VMEM((1, bt), jnp.float32) for _ in range(2)]
  scratch.append(pltpu.SemaphoreType.DMA((6,)))

  kernel = functools.partial(
      _kernel, bits=bits, key_group=key_group, rope=rope, ps=ps, ppb=ppb,
      pages_padded=pages_padded, h=h, scale=float(scale), softcap=logit_softcap,
      window=sliding_window, cdt=cdt, precision=precision, return_lse=return_lse)
  out_specs = [pl.BlockSpec((None, None, g, h), lambda i, j, *_: (i, j, 0, 0))]
  out_shape = [jax.ShapeDtypeStruct((b, kh, g, h), jnp.float32 if return_lse else q.dtype)]
  if return_lse:  # the softmax's max and sum, f32[B, K, G, 1] each
    out_specs += [pl.BlockSpec((None, None, g, 1), lambda i, j, *_: (i, j, 0, 0))] * 2
    out_shape += [jax.ShapeDtypeStruct((b, kh, g, 1), jnp.float32)] * 2
  outs = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=3, grid=(b, kh), in_specs=specs, out_specs=out_specs,
          scratch_shapes=scratch),
      out_shape=out_shape,
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
      interpret=interpret,
      name=(f"decode_attention_tpu_bits{bits or 16}"
            f"{'' if key_group is None else f'_keygroup{key_group}'}"
            f"{'_rope' if rope else ''}"),
  )(lengths.astype(jnp.int32), starts, table, *args)
  out = outs[0].reshape(b, n, h)
  if return_lse:
    return out, reference.lse_of(outs[1], outs[2]).reshape(b, n)
  return out
