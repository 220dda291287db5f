"""Pallas (Triton lowering) paged decode attention over bf16 / int8 / int4 / int2 KV pages.

Same signature as `reference.decode_attention`, plus `block_sizes=` and `interpret=`.

Motivation: decode attention reads the whole KV cache once per token and does ~2 FLOPs
per byte, so it is bound by HBM. 8-bit pages halve the bytes, 4-bit pages quarter them
and 2-bit pages (KIVI) cut them eightfold, but only if the codes are dequantized in
registers on the way to the tensor cores: XLA's gather + dequantize + einsum writes the
float cache back to HBM first.

Design (flash-decoding):
  * grid (batch, kv head, split): a split is a contiguous range of one sequence's pages
    (config.split_layout); the default rule splits until the grid fills the GPU, which a
    single long sequence (B * K = 8 programs) would not.
  * each program walks its range `pages_per_block` pages at a time: the page ids come
    from the page table, the block's keys and values are gathered as whole pages
    ([pages_per_block, page_size, H'] vector loads), and an online softmax folds each
    block into a running (out, max, sum) in float32.
  * GQA: the G = N / K query heads of a kv head are the M rows of the tensor-core dots,
    padded with zero rows to 16 (mma's minimum); every key is read once per kv head.
  * dequantization is folded where it is linear. Without RoPE the codes go straight into
    the dot (as exact bf16 integers) and each token's scale and offset are applied to the
    [G, block] scores: s = scale_t * (q . c_t) + offset_t * sum(q). Values likewise:
    out += (p * vscale) @ codes + sum_t(p_t * voffset_t). 4-bit and 2-bit codes are
    unpacked with shifts and masks in registers into their 2 or 4 column parts of width
    H * bits / 8 (no interleave: the "fraction" packing, `reference.pack_codes`), each part
    its own dot (`unpack_parts`, one function for every width).
  * per-channel keys (KIVI, `key_group`): every channel of a group of key_group tokens has
    its own grid, f32 [P, page / key_group, H]. The block's grid rows ([pages_per_block,
    page / key_group, H], a few registers a thread) are broadcast over their groups and the
    codes dequantized in float32 (one FMA a code) before the dot. Folding the grid into
    the query instead ((q * scale_g) . c + q . offset_g) needs a differently scaled query
    for every group of the block, i.e. one small dot per group on a slice of the key
    block, which Triton cannot take from registers; decode is bound by HBM, and the RoPE
    path below already pays the same FMA per element.
  * RoPE on pre-RoPE keys: the key is dequantized to float32 and rotated before its dot,
    column part i with part i + parts / 2 (the rotate-half pairs; float and 8-bit keys
    are loaded as two halves, 2-bit keys rotate two pairs of quarters).
    cos/sin by angle addition: for slot r of a page starting at position p0,
    cos((p0 + r) f) = cos(p0 f) cos(r f) - sin(p0 f) sin(r f), composed twice: from the
    block's first position p0 (H/2 sin/cos per block, the only transcendental calls), a
    [pages_per_block, H/2] table of page offsets and a [page, H/2] table of slots, both
    built once outside the kernel and small in registers (a [block_t, H/2] table, or
    per-page sin/cos through libdevice's slow path, spilled: ptxas -v). The angle agrees
    with the reference's float32(p * f) to about two float32 ulps of p * f, the size of
    the reference's own rounding.
  * codes become floats without I2F (quarter rate on Hopper): the integer is OR-ed into
    the mantissa of a power of two and that power subtracted: codes as float16 (exact
    below 1024), with q and the value weights cast to float16 for those dots (bf16
    query: float16 keeps 3 more significand bits through the offset term).
  * masking by `where` only (scores to a large negative finite value, the value rows and
    the per-token value scales to 0), so garbage or NaN in unused slots never reaches the
    result; page ids are clamped into the pool, so a stale table entry past a sequence's
    end is never dereferenced out of bounds.
  * a plain jnp step merges the splits' partials by log-sum-exp; a sequence of length 0
    comes out as zeros. `return_lse` also returns that log-sum-exp (from the merged max
    and sum) for callers that merge further keys.

Limits: page_size * pages_per_block and the head dim must be powers of two (Triton block
shapes); q must be bf16 or f32 (f32 runs its dots at HIGHEST precision, for tests).
The page-table gather is a pointer gather (not TMA): each page row is contiguous, so the
loads are still 16-byte vectors.

Future work: Mosaic GPU (TMA page loads, wgmma); fold RoPE into the code domain for
quantized keys (rotate codes, carry the offset term through two extra small dots) to cut
the per-element work of the RoPE path.
"""

from __future__ import annotations

import functools
import operator

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.decode_attention import reference
from pallas_kernels.decode_attention.config import BlockSizes, MIN_DOT_DIM, next_pow2
from pallas_kernels.decode_attention.config import split_layout
from pallas_kernels.triton_params import TritonCompilerParams

# Masked scores: finite (as jax's own paged attention), so that exp(mask - max) is 0 and
# never exp(-inf - -inf) = NaN for a program that has not met a visible key yet.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)

# Exact small-integer -> float conversion without the (quarter-rate) I2F instruction: OR
# the integer into the mantissa of a power of two whose unit is 1, then subtract it.
# (bits of the power of two, its value, the integer type, the largest integer it holds)
_MAGIC = {
    jnp.dtype(jnp.bfloat16): (0x4300, 128.0, jnp.int16, 127),  # 128.0: 7 mantissa bits
    jnp.dtype(jnp.float16): (0x6400, 1024.0, jnp.int16, 1023),  # 1024.0: 10 bits
    jnp.dtype(jnp.float32): (0x4B000000, 8388608.0, jnp.int32, (1 << 23) - 1),  # 2^23
}


def _uint_as_float(x, dtype, max_value: int):
  """Unsigned integers x (int16/int32 holding 0..max_value) -> exact values in dtype."""
  bits, value, itype, cap = _MAGIC[jnp.dtype(dtype)]
  assert max_value <= cap, (dtype, max_value)
  x = x.astype(itype) | bits
  return lax.bitcast_convert_type(x, dtype) - jnp.asarray(value, dtype)


def unpack_parts(packed, bits: int, dtype) -> tuple:
  """uint8 [R, C] codes packed 8 / bits to a byte ("fraction" packing) -> the 8 / bits
  column parts [R, C] in dtype holding the exact codes: part i is bits i*bits.. of each byte
  (elements i*C .. (i+1)*C - 1). One part for 8 bits (dtype float16 or float32: bf16 cannot
  hold 0..255 with a unit of 1 in one binade)."""
  itype = _MAGIC[jnp.dtype(dtype)][2]
  w = packed.astype(itype) & 0xFF
  mask = (1 << bits) - 1
  parts = []
  for i in range(8 // bits):
    x = w if i == 0 else lax.shift_right_logical(w, jnp.asarray(i * bits, itype))
    if i < 8 // bits - 1:  # the top part has no higher bits left to clear
      x = x & mask
    parts.append(_uint_as_float(x, dtype, mask))
  return tuple(parts)


def nibbles(packed, dtype):
  """uint8 [R, C] "halves" packed -> (low, high) [R, C] in dtype holding the exact codes
  (`unpack_parts` at 4 bits; the latent decode kernel's name for it)."""
  return unpack_parts(packed, 4, dtype)


def _dot_nt(a, b, precision):
  """a [R, C] . b [S, C] -> f32 [R, S]."""
  return jnp.dot(a, b.T, preferred_element_type=jnp.float32, precision=precision)


def softmax_step(s, valid, m_prev, l_prev, *, scale: float, softcap: float | None):
  """One block of the online softmax: raw scores s f32 [rows, T] of the keys `valid`
  [T] marks, the running max and sum f32 [rows] -> (p [rows, T], alpha [rows] (the factor
  that rescales what was accumulated so far), new max, new sum). Scaled, soft-capped, and
  masked with `where`, so NaN in invalid slots never reaches p."""
  s = s * scale
  if softcap is not None:
    s = jnp.tanh(s / softcap) * softcap
  s = jnp.where(valid[None, :], s, MASK_VALUE)
  m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
  alpha = jnp.exp(m_prev - m_new)
  p = jnp.where(valid[None, :], jnp.exp(s - m_new[:, None]), 0.0)
  return p, alpha, m_new, alpha * l_prev + jnp.sum(p, axis=1)


def _sum(xs):
  """The sum of a non-empty sequence of arrays (no 0 + x)."""
  return functools.reduce(operator.add, xs)


def _kernel(*refs, bits, key_group, rope: bool, ps: int, ppb: int, pages_per_split: int,
            h: int, scale: float, softcap, window, cdt, precision):
  it = iter(refs)
  len_ref = next(it)  # i32[2]: length, first position of the sliding window
  tab_ref = next(it)  # i32[pages_padded]
  q_ref = next(it)  # [Gp, H]
  quant = bits is not None
  k_ref = next(it)  # [P, page, H] (or [P, page, H * bits / 8] packed)
  # f32[P, page] per token, or f32[P, page / key_group, H] per channel
  ks_ref, ko_ref = (next(it), next(it)) if quant else (None, None)
  v_ref = next(it)
  vs_ref, vo_ref = (next(it), next(it)) if quant else (None, None)
  if rope:
    # f32[page, H/2] x2: cos, sin of (slot * inv_freq); f32[ppb, H/2] x2: cos, sin of
    # (page_size * page-in-block * inv_freq); f32[H/2] inv_freq
    cos_ref, sin_ref, pcos_ref, psin_ref, f_ref = (next(it) for _ in range(5))
  o_ref, m_ref, l_ref = next(it), next(it), next(it)  # f32[Gp, H], f32[Gp], f32[Gp]

  # Column parts: packed codes unpack into code_parts parts of width H / code_parts (one
  # part for float and 8-bit pages), each its own dot. RoPE rotates part i with part
  # i + key_parts / 2 (rotate-half), so keys are split in two at least.
  code_parts = reference.codes_per_byte(bits)
  key_parts = max(code_parts, 2) if rope else code_parts
  key_width, value_width = h // key_parts, h // code_parts
  bt = ppb * ps
  gp = q_ref.shape[0]
  length = len_ref[0]
  first_page = pl.program_id(2) * pages_per_split
  n_pages = lax.div(length + (ps - 1), ps)
  end_page = jnp.minimum(first_page + pages_per_split, n_pages)
  n_blocks = jnp.maximum(lax.div(end_page - first_page + (ppb - 1), ppb), 0)
  if window is not None:
    lo_pos = len_ref[1]
    i0 = jnp.maximum(lax.div(lax.div(lo_pos, ps) - first_page, ppb), 0)
  else:
    lo_pos, i0 = None, jnp.int32(0)

  # Codes reach the tensor cores as exact float16 (for 8 bits bf16 cannot hold 0..255 in
  # one binade); q, the value weights p * vscale and rotated keys follow into float16,
  # whose 11-bit significand also keeps the offset term's cancellation small
  # (sum_t p_t (c_t s_t) and sum_t p_t o_t are both large next to their sum; with bf16
  # weights int4 outputs were 3.7e-3 off the reference, 1.2e-3 with float16 for int8).
  # float16 overflows past 65504: q, keys and p * scale are far below that in practice.
  if quant and cdt == jnp.bfloat16:
    cdt = jnp.float16
  columns = lambda ref, i, w: ref[:, pl.ds(i * w, w)]
  qs = ([q_ref[...].astype(cdt)] if key_parts == 1 else
        [columns(q_ref, i, key_width).astype(cdt) for i in range(key_parts)])
  qsum = _sum([jnp.sum(x.astype(jnp.float32), axis=1) for x in qs])
  if rope:
    # Per rotated pair of parts: the angle tables' columns of its frequencies.
    tables = [(columns(cos_ref, i, key_width), columns(sin_ref, i, key_width),
               columns(pcos_ref, i, key_width), columns(psin_ref, i, key_width),
               f_ref[pl.ds(i * key_width, key_width)]) for i in range(key_parts // 2)]

  def per_token(ref, ids):
    return ref[ids].reshape(bt)

  def unpacked(ref, ids, parts: int, dtype):
    """The block's pages as `parts` column parts [T, H / parts] in dtype: exact codes for
    quantized pages (parts == code_parts where codes are packed), values for float ones."""
    if code_parts > 1:
      return unpack_parts(ref[ids].reshape(bt, h // code_parts), bits, dtype)
    w = h // parts
    cols = ([ref[ids].reshape(bt, h)] if parts == 1 else
            [ref[ids, :, pl.ds(i * w, w)].reshape(bt, w) for i in range(parts)])
    return [unpack_parts(c, 8, dtype)[0] if quant else c.astype(dtype) for c in cols]

  def dequantize_channels(x, ids, col0: int):
    """f32 codes [T, w] of key columns col0 .. col0+w-1 -> keys: each token takes the grid
    row of its group, [ppb, page / key_group, w] broadcast to [T, w]."""
    w = x.shape[1]
    groups = (ppb, ps // key_group, key_group, w)
    row = lambda ref: jnp.broadcast_to(ref[ids, :, pl.ds(col0, w)][:, :, None, :],
                                       groups).reshape(bt, w)
    return x * row(ks_ref) + row(ko_ref)

  def float_key_scores(ids, pstart):
    """Scores [Gp, T] of the block's keys dequantized to float32 (per channel or per
    token) and rotated at their positions with RoPE, one rotate-half pair of parts at a
    time (fewer float32 key parts live at once)."""
    codes = unpacked(k_ref, ids, key_parts, jnp.float32)
    if quant and key_group is None:
      ks, ko = per_token(ks_ref, ids)[:, None], per_token(ko_ref, ids)[:, None]

    def dequantize(i):
      if key_group is not None:
        return dequantize_channels(codes[i], ids, i * key_width)
      return codes[i] * ks + ko if quant else codes[i]

    dot = lambda i, k: _dot_nt(qs[i], k.astype(cdt), precision)
    if not rope:
      keys = [dequantize(i) for i in range(key_parts)]
      return _sum([dot(i, k) for i, k in enumerate(keys)])
    half = key_parts // 2
    scores = []
    for i, (cos_r, sin_r, cos_a, sin_a, freq) in enumerate(tables):
      # Angle of slot r of page a of the block: float32(p0) * f (p0 the block's first
      # position) + a * page * f + r * f, composed by angle addition from the tables.
      ang0 = (pstart * ps).astype(jnp.float32) * freq  # [w]
      c0, s0 = jnp.cos(ang0)[None, :], jnp.sin(ang0)[None, :]
      ca = (c0 * cos_a - s0 * sin_a)[:, None, :]  # [ppb, 1, w]
      sa = (s0 * cos_a + c0 * sin_a)[:, None, :]
      cos = (ca * cos_r[None] - sa * sin_r[None]).reshape(bt, key_width)
      sin = (sa * cos_r[None] + ca * sin_r[None]).reshape(bt, key_width)
      k1, k2 = dequantize(i), dequantize(i + half)
      scores += [dot(i, k1 * cos - k2 * sin), dot(i + half, k2 * cos + k1 * sin)]
    return _sum(scores)

  def body(i, carry):
    accs, m_prev, l_prev = carry
    pstart = first_page + i * ppb
    ids = tab_ref[pl.ds(pstart, ppb)]  # i32[ppb]
    pos = pstart * ps + lax.broadcasted_iota(jnp.int32, (bt,), 0)
    valid = pos < length
    if lo_pos is not None:
      valid &= pos >= lo_pos

    # -- scores [Gp, T]
    if rope or key_group is not None:
      s = float_key_scores(ids, pstart)
    else:
      codes = unpacked(k_ref, ids, key_parts, cdt)
      s = _sum([_dot_nt(q, c, precision) for q, c in zip(qs, codes)])
      if quant:
        s = s * per_token(ks_ref, ids)[None, :] + qsum[:, None] * per_token(
            ko_ref, ids)[None, :]
    p, alpha, m_new, l_new = softmax_step(s, valid, m_prev, l_prev, scale=scale,
                                          softcap=softcap)

    # -- values
    if quant:
      vs = jnp.where(valid, per_token(vs_ref, ids), 0.0)
      vo = jnp.where(valid, per_token(vo_ref, ids), 0.0)
      pv = (p * vs[None, :]).astype(cdt)
      bias = jnp.sum(p * vo[None, :], axis=1)[:, None]
      parts = tuple(jnp.dot(pv, c, preferred_element_type=jnp.float32, precision=precision)
                    + bias for c in unpacked(v_ref, ids, code_parts, cdt))
    else:
      v = v_ref[ids].reshape(bt, h)
      v = jnp.where(valid[:, None], v, jnp.zeros((), v.dtype)).astype(cdt)
      parts = (jnp.dot(p.astype(cdt), v, preferred_element_type=jnp.float32,
                       precision=precision),)
    accs = tuple(alpha[:, None] * a + x for a, x in zip(accs, parts))
    return accs, m_new, l_new

  init = (tuple(jnp.zeros((gp, value_width), jnp.float32) for _ in range(code_parts)),
          jnp.full((gp,), MASK_VALUE, jnp.float32), jnp.zeros((gp,), jnp.float32))
  accs, m, l = lax.fori_loop(i0, n_blocks, body, init)
  if code_parts == 1:
    o_ref[...] = accs[0]
  else:
    for i, acc in enumerate(accs):
      o_ref[:, pl.ds(i * value_width, value_width)] = acc
  m_ref[...] = m
  l_ref[...] = l


def check_supported(q, k_pages, page_table, *, bits, rope: bool, channel_keys: bool,
                    block_sizes: BlockSizes | None) -> None:
  """Raises NotImplementedError for cases this kernel does not serve (STYLE.md 3)."""
  b, n, h = q.shape
  if bits is not None and k_pages.size >= 2**31:
    # Seen on an H200 (jax 0.11.2): int8 / int4 pools of 2^32 codes (B=64 x 64k tokens,
    # 8 kv heads) fault with an illegal address; the bf16 pool of the same size runs.
    raise NotImplementedError(f"pallas_gpu decode_attention: {k_pages.size} codes per "
                              f"pool exceed 2^31 - 1 for {bits}-bit pages")
  kh, _, ps, _ = k_pages.shape
  if q.dtype not in (jnp.bfloat16, jnp.float32):
    raise NotImplementedError(f"pallas_gpu decode_attention: {q.dtype=} not bf16/f32")
  # Every column part (two at least: RoPE's halves) is a dot dimension.
  min_h = MIN_DOT_DIM * max(2, reference.codes_per_byte(bits))
  if h & (h - 1) or h < min_h:
    raise NotImplementedError(f"pallas_gpu decode_attention: head dim {h=} must be a "
                              f"power of two >= {min_h} for bits={bits}")
  if ps & (ps - 1):
    raise NotImplementedError(f"pallas_gpu decode_attention: page_size={ps} must be a "
                              f"power of two")
  bs = block_sizes or BlockSizes.get_default(b, kh, page_table.shape[1], ps, h, rope=rope,
                                             channel_keys=channel_keys)
  bt = bs.pages_per_block * ps
  if bt & (bt - 1) or bt < MIN_DOT_DIM:
    raise NotImplementedError(f"pallas_gpu decode_attention: {bs.pages_per_block=} x "
                              f"page_size={ps} is not a power of two >= {MIN_DOT_DIM}")


@functools.partial(jax.jit, static_argnames=(
    "bits", "scale", "logit_softcap", "sliding_window", "key_group", "return_lse",
    "block_sizes", "interpret"))
def decode_attention(q, k_pages, v_pages, lengths, page_table, *, k_scales=None,
                     k_offsets=None, v_scales=None, v_offsets=None, bits=None,
                     scale: float, logit_softcap: float | None = None,
                     sliding_window: int | None = None, rope_inv_freq=None,
                     key_group: int | None = None, return_lse: bool = False,
                     query_positions=None, block_sizes: BlockSizes | None = None,
                     interpret=False):
  """Paged decode attention on the GPU; see `reference.decode_attention`."""
  reference.validate_inputs(q, k_pages, v_pages, lengths, page_table, k_scales, k_offsets,
                            v_scales, v_offsets, bits=bits, rope_inv_freq=rope_inv_freq,
                            sliding_window=sliding_window, key_group=key_group,
                            query_positions=query_positions)
  rope = rope_inv_freq is not None
  channel_keys = key_group is not None
  check_supported(q, k_pages, page_table, bits=bits, rope=rope, channel_keys=channel_keys,
                  block_sizes=block_sizes)
  b, n, h = q.shape
  kh, num_pages, ps, hc = k_pages.shape
  pps = page_table.shape[1]
  g = n // kh
  gp = max(MIN_DOT_DIM, next_pow2(g))
  bs = block_sizes or BlockSizes.get_default(b, kh, pps, ps, h, rope=rope,
                                             channel_keys=channel_keys)
  bs.validate(ps)
  ppb = bs.pages_per_block
  splits, pages_per_split = split_layout(b, kh, pps, bs)
  pages_padded = splits * pages_per_split
  cdt = jnp.bfloat16 if q.dtype == jnp.bfloat16 else jnp.float32
  precision = lax.Precision.HIGHEST if cdt == jnp.float32 else None

  # Page ids clamped into the pool: entries past a sequence's end are loaded (a block is
  # whole pages) but masked; clamping keeps even a stale or -1 entry in bounds.
  table = jnp.clip(page_table.astype(jnp.int32), 0, num_pages - 1)
  table = jnp.pad(table, ((0, 0), (0, pages_padded - pps)))
  qg = q.reshape(b, kh, g, h)
  if gp != g:
    qg = jnp.pad(qg, ((0, 0), (0, 0), (0, gp - g), (0, 0)))
  starts = (jnp.zeros((b,), jnp.int32) if sliding_window is None else
            reference.window_starts(lengths, query_positions, sliding_window))
  lens = jnp.stack([lengths.astype(jnp.int32), starts], axis=1)  # [B, 2]

  quant = bits is not None
  args = [lens, table, qg, k_pages]
  specs = [pl.BlockSpec((None, 2), lambda i, j, s: (i, 0)),
           pl.BlockSpec((None, pages_padded), lambda i, j, s: (i, 0)),
           pl.BlockSpec((None, None, gp, h), lambda i, j, s: (i, j, 0, 0))]
  page_spec = pl.BlockSpec((None, num_pages, ps, hc), lambda i, j, s: (j, 0, 0, 0))
  scale_spec = pl.BlockSpec((None, num_pages, ps), lambda i, j, s: (j, 0, 0))
  if key_group is None:
    key_scale_spec = scale_spec
  else:
    key_scale_spec = pl.BlockSpec((None, num_pages, ps // key_group, h),
                                  lambda i, j, s: (j, 0, 0, 0))
  specs.append(page_spec)
  if quant:
    args += [k_scales, k_offsets]
    specs += [key_scale_spec, key_scale_spec]
  args.append(v_pages)
  specs.append(page_spec)
  if quant:
    args += [v_scales, v_offsets]
    specs += [scale_spec, scale_spec]
  if rope:
    freq = rope_inv_freq.astype(jnp.float32)
    ang = jnp.arange(ps, dtype=jnp.float32)[:, None] * freq[None, :]
    pang = (jnp.arange(ppb, dtype=jnp.float32) * ps)[:, None] * freq[None, :]
    args += [jnp.cos(ang), jnp.sin(ang), jnp.cos(pang), jnp.sin(pang), freq]
    specs += [pl.BlockSpec((ps, h // 2), lambda i, j, s: (0, 0))] * 2
    specs += [pl.BlockSpec((ppb, h // 2), lambda i, j, s: (0, 0))] * 2
    specs.append(pl.BlockSpec((h // 2,), lambda i, j, s: (0,)))

  kernel = functools.partial(
      _kernel, bits=bits, key_group=key_group, rope=rope, ps=ps, ppb=ppb,
      pages_per_split=pages_per_split, h=h, scale=float(scale), softcap=logit_softcap,
      window=sliding_window, cdt=cdt, precision=precision)
  out_specs, out_shape = split_outputs(b, kh, splits, gp, h)
  o, m, l = pl.pallas_call(
      kernel,
      grid=(b, kh, splits),
      in_specs=specs,
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=TritonCompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
      interpret=interpret,
      name=(f"decode_attention_bits{bits or 16}"
            f"{'' if key_group is None else f'_keygroup{key_group}'}"
            f"{'_rope' if rope else ''}"),
  )(*args)
  out, lse = combine_splits(o, m, l, g)
  out = out.reshape(b, n, h)
  if return_lse:
    return out, lse.reshape(b, n)
  return out.astype(q.dtype)


def split_outputs(batch: int, heads: int, splits: int, rows: int, width: int):
  """(out_specs, out_shape) of a flash-decoding kernel on the grid (batch, heads, splits):
  per program its unnormalized output [rows, width] and its running max and sum [rows],
  float32, which `combine_splits` merges."""
  f32 = jnp.float32
  specs = [pl.BlockSpec((None, None, None, rows, width), lambda i, j, s: (i, j, s, 0, 0)),
           pl.BlockSpec((None, None, None, rows), lambda i, j, s: (i, j, s, 0)),
           pl.BlockSpec((None, None, None, rows), lambda i, j, s: (i, j, s, 0))]
  shapes = [jax.ShapeDtypeStruct((batch, heads, splits, rows, width), f32),
            jax.ShapeDtypeStruct((batch, heads, splits, rows), f32),
            jax.ShapeDtypeStruct((batch, heads, splits, rows), f32)]
  return specs, shapes


def combine_splits(o, m, l, g: int):
  """Merges split partials by log-sum-exp: o f32[B, K, S, Gp, H], m/l f32[B, K, S, Gp]
  -> (f32[B, K, g, H], lse f32[B, K, g]); a row with no visible key (sum 0) comes out as 0
  with lse -inf."""
  m_max = jnp.max(m, axis=2, keepdims=True)
  w = jnp.exp(m - m_max)  # 0 for splits that saw no visible key (m = MASK_VALUE)
  l_tot = jnp.sum(l * w, axis=2)[..., None]
  o_tot = jnp.sum(o * w[..., None], axis=2)
  out = jnp.where(l_tot > 0, o_tot / jnp.where(l_tot > 0, l_tot, 1.0), 0.0)
  lse = reference.lse_of(m_max[:, :, 0], l_tot[..., 0])
  return out[:, :, :g], lse[:, :, :g]
