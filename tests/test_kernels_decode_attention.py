"""Paged decode attention on the CPU: reference, Pallas kernels in interpret mode, dispatch.

Oracles (STYLE.md 13, anti-pattern 1):
  * the reference (`reference.decode_attention`) is checked against an independent float64
    numpy computation that walks the page table token by token, unpacks and dequantizes
    each token with numpy, rotates it with its own RoPE, and takes a plain softmax over
    the visible keys; plus one hand-computed golden case;
  * each kernel (GPU kernel with interpret=True, TPU kernel under
    pltpu.InterpretParams(), which also flags out-of-bounds reads) is checked against the
    reference on the SAME pages (KERNEL_BUDGET by q dtype).
Bit widths: float pages, 8-bit codes, and 4- / 2-bit codes in lowbit.kv_cache's "fraction"
packing (the numpy walk unpacks them on its own).
Inputs are adversarial (STYLE.md 17): lengths 0, 1, page-1, page+1 and a long one in one
batch, a shuffled page table whose entries past each sequence's end are garbage (-1, past
the pool), every page the table does not reach and every slot past a length poisoned
with NaN (float pages) or NaN scales and offsets (quantized pages). Per-channel keys
(key_group G) add lengths G-1 and G+1; their key grids are poisoned for every group that
holds no visible token. `return_lse` is checked against the walk's own log-sum-exp.
"""

from __future__ import annotations

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.decode_attention import api
from pallas_kernels.decode_attention import gpu
from pallas_kernels.decode_attention import reference as ref
from pallas_kernels.decode_attention import tpu
from pallas_kernels.decode_attention.config import BlockSizes, TpuBlockSizes, split_layout
from kernel_checks import assert_lowers_for_cuda, assert_lowers_for_tpu, rel_err

# Relative (Frobenius) error of a kernel vs the reference on the same pages, by q dtype:
# f32 runs HIGHEST-precision dots (left: RoPE angles by angle addition, a few f32 ulps of
# p * f); bf16 q: the dots take bf16 (float pages) or float16 (codes) operands, and the
# output is rounded to bf16 (2^-9 relative); seen: 7e-4 .. 1.2e-3.
KERNEL_BUDGET = {jnp.float32: 2e-5, jnp.bfloat16: 5e-3}
# Absolute error of a log-sum-exp (return_lse) against the float64 walk, by q dtype: f32
# accumulates scores in f32 (~1e-6 seen); bf16 q: the kernels' float16 dot operands put
# ~1e-3 relative error on each score (4e-4 seen on scores of ~3), the TPU kernel's bf16
# operands 2^-9 (2e-3 seen).
LSE_BUDGET = {jnp.float32: 2e-5, jnp.bfloat16: 5e-3}
# The reference (float32) vs the float64 numpy walk.
REFERENCE_BUDGET = 2e-6
NAN = float("nan")
PAGE = 16
INTERPRET_TPU = pltpu.InterpretParams()


def keys(*params, n=8):
  seed = zlib.crc32(repr(params).encode())
  return jax.random.split(jax.random.key(seed), n)


def inv_freq(h, base=10000.0):
  return (1.0 / base ** (np.arange(0, h, 2, dtype=np.float32) / h)).astype(np.float32)


# ---------------------------------------------------------------------------------------
# Inputs


def make_case(params, *, bits, b_heads, h, lengths, dtype, page=PAGE, rope=False,
              key_group=None):
  """Random pages, shuffled table with garbage tails, NaN poison; returns (args, kwargs)."""
  n, kh = b_heads
  lengths = np.asarray(lengths, np.int32)
  b = len(lengths)
  pps = max(1, -(-int(lengths.max()) // page)) + 1  # one spare column of garbage entries
  live = [-(-int(x) // page) for x in lengths]
  num_pages = sum(live) + 3  # unreferenced pages too
  # numpy draws (no per-shape jax.random compiles); fresh, never zeros.
  rng = np.random.default_rng(zlib.crc32(repr(params).encode()))
  q = jnp.asarray(rng.standard_normal((b, n, h), np.float32)).astype(dtype)
  hc = h // ref.codes_per_byte(bits)
  shape = (kh, num_pages, page, hc)
  if bits is None:
    kp = rng.standard_normal(shape, np.float32)
    vp = rng.standard_normal(shape, np.float32)
  else:  # random bytes: for bits=4 or 2, every packed code random
    kp = rng.integers(0, 256, shape, np.uint8)
    vp = rng.integers(0, 256, shape, np.uint8)
  sc = {}
  if bits is not None:
    qmax = 2 ** bits - 1
    u = lambda lo, hi: rng.uniform(lo, hi, shape[:3]).astype(np.float32)
    # Keys and values spread over about [-1.6, 1.8].
    sc = {"k_scales": u(2.0, 3.0) / qmax, "k_offsets": u(-1.6, -1.2),
          "v_scales": u(2.0, 3.0) / qmax, "v_offsets": u(-1.6, -1.2)}
    if key_group is not None:  # one grid per channel and group of key_group tokens
      grid = (kh, num_pages, page // key_group, h)
      sc["k_scales"] = rng.uniform(2.0, 3.0, grid).astype(np.float32) / qmax
      sc["k_offsets"] = rng.uniform(-1.6, -1.2, grid).astype(np.float32)
  # Shuffled table; garbage past each sequence's live pages (-1 and past the pool).
  perm = rng.permutation(num_pages)
  table = np.full((b, pps), -1, np.int32)
  table[:, -1] = num_pages + 7
  used = np.zeros(num_pages, bool)
  at = 0
  for i, npg in enumerate(live):
    table[i, :npg] = perm[at:at + npg]
    used[perm[at:at + npg]] = True
    at += npg
  # Poison: unreferenced pages whole, and slots past each length in its last page.
  poison_slots = np.zeros((num_pages, page), bool)
  poison_slots[~used] = True
  for i, x in enumerate(lengths):
    if x % page:
      poison_slots[table[i, x // page], x % page:] = True
  if bits is None:
    kp[:, poison_slots] = NAN
    vp[:, poison_slots] = NAN
    kp, vp = jnp.asarray(kp, dtype), jnp.asarray(vp, dtype)
  else:
    for name in ("v_scales", "v_offsets") if key_group else sc:
      sc[name][:, poison_slots] = NAN
    if key_group:  # a key grid is shared by its group: poison the groups with no live slot
      dead_groups = poison_slots.reshape(num_pages, page // key_group, key_group).all(-1)
      for name in ("k_scales", "k_offsets"):
        sc[name][:, dead_groups] = NAN
    kp, vp = jnp.asarray(kp), jnp.asarray(vp)
  sc = {k_: jnp.asarray(v) for k_, v in sc.items()}
  kwargs = dict(bits=bits, scale=h ** -0.5, **sc)
  if key_group is not None:
    kwargs["key_group"] = key_group
  if rope:
    kwargs["rope_inv_freq"] = jnp.asarray(inv_freq(h))
  return (q, kp, vp, jnp.asarray(lengths), jnp.asarray(table)), kwargs


def numpy_attention(q, k_pages, v_pages, lengths, page_table, *, bits, scale,
                    k_scales=None, k_offsets=None, v_scales=None, v_offsets=None,
                    logit_softcap=None, sliding_window=None, rope_inv_freq=None,
                    key_group=None, return_lse=False, query_positions=None):
  """Float64 numpy walk of the page table, token by token: the independent oracle
  (-> out [B, N, H], and lse [B, N] with return_lse)."""
  q = np.asarray(jnp.asarray(q, jnp.float32), np.float64)
  kp, vp = np.asarray(jnp.asarray(k_pages, jnp.float32) if bits is None else k_pages), \
      np.asarray(jnp.asarray(v_pages, jnp.float32) if bits is None else v_pages)
  table = np.asarray(page_table)
  b, n, h = q.shape
  kh, _, page, _ = kp.shape
  g = n // kh
  out = np.zeros((b, n, h))
  lse = np.full((b, n), -np.inf)

  def token(pages, scales, offsets, kv, pos, seq, group=None):
    x = pages[kv, table[seq, pos // page], pos % page]
    if bits in (4, 2):  # byte j holds element j + i H/f at bits i * bits (f per byte)
      x = np.concatenate([(x >> (i * bits)) & (2**bits - 1) for i in range(8 // bits)])
    x = x.astype(np.float64)
    if bits is not None:
      # Per token: one scalar grid; per channel: the [H] grid row of the token's group.
      slot = pos % page if group is None else pos % page // group
      s_, o_ = (np.asarray(a, np.float64)[kv, table[seq, pos // page], slot]
                for a in (scales, offsets))
      x = x * s_ + o_
    return x

  for seq in range(b):
    n_len = int(lengths[seq])
    query = n_len - 1 if query_positions is None else int(query_positions[seq])
    lo = 0 if sliding_window is None else max(0, query + 1 - sliding_window)
    positions = list(range(lo, n_len))
    for kv in range(kh):
      if not positions:
        continue
      keys_ = []
      for pos in positions:
        k = token(kp, k_scales, k_offsets, kv, pos, seq, group=key_group)
        if rope_inv_freq is not None:
          # HF: the angle in float32, cos/sin of it.
          ang = (np.float32(pos) * np.asarray(rope_inv_freq, np.float32)).astype(np.float64)
          c, s_ = np.cos(ang), np.sin(ang)
          k1, k2 = k[: h // 2], k[h // 2:]
          k = np.concatenate([k1 * c - k2 * s_, k2 * c + k1 * s_])
        keys_.append(k)
      vals = np.stack([token(vp, v_scales, v_offsets, kv, pos, seq) for pos in positions])
      kk = np.stack(keys_)
      for gi in range(g):
        logits = kk @ q[seq, kv * g + gi] * scale
        if logit_softcap is not None:
          logits = np.tanh(logits / logit_softcap) * logit_softcap
        w = np.exp(logits - logits.max())
        out[seq, kv * g + gi] = (w / w.sum()) @ vals
        lse[seq, kv * g + gi] = logits.max() + np.log(w.sum())
  return (out, lse) if return_lse else out


# Case: (bits, (N, K), H, q dtype, rope, softcap, window, gpu BlockSizes, tpu BlockSizes)
LENGTHS = (0, 1, PAGE - 1, PAGE + 1, 9 * PAGE + 5)
CASES = {
    "f32_gqa4": (None, (8, 2), 64, jnp.float32, False, None, None, None, None),
    "bf16_rope_mha_softcap": (None, (2, 2), 128, jnp.bfloat16, True, 30.0, None,
                              BlockSizes(pages_per_block=2, num_splits=3), None),
    "int8_window": (8, (4, 1), 128, jnp.float32, False, None, 40,
                    BlockSizes(pages_per_block=2, num_splits=3), TpuBlockSizes(2)),
    "int8_rope_bf16": (8, (8, 2), 64, jnp.bfloat16, True, None, None, None, None),
    "int4_rope_window_softcap": (4, (4, 1), 64, jnp.float32, True, 20.0, 25,
                                 BlockSizes(pages_per_block=1, num_splits=4),
                                 TpuBlockSizes(2)),
    "int4_bf16_mha": (4, (2, 2), 128, jnp.bfloat16, False, None, None, None, None),
    "int2_gqa4": (2, (8, 2), 64, jnp.float32, False, None, None, None, None),
    "int2_rope_bf16_window_softcap": (2, (4, 1), 64, jnp.bfloat16, True, 20.0, 40,
                                      BlockSizes(pages_per_block=2, num_splits=3),
                                      TpuBlockSizes(2)),
}


@functools.lru_cache(maxsize=None)
def case_inputs(name):
  bits, heads, h, dtype, rope, softcap, window, _, _ = CASES[name]
  args, kwargs = make_case((name,), bits=bits, b_heads=heads, h=h, lengths=LENGTHS,
                           dtype=dtype, rope=rope)
  kwargs.update(logit_softcap=softcap, sliding_window=window)
  want = ref.decode_attention(*args, **kwargs)
  return args, kwargs, want


# ---------------------------------------------------------------------------------------
# The reference


def test_reference_golden():
  # One sequence of 2 tokens, one head, H = 2, scale 1, no RoPE:
  # k0 = [1, 0], k1 = [0, 1], q = [ln 3, 0] -> scores [ln 3, 0] -> softmax [3/4, 1/4];
  # v0 = [4, 0], v1 = [0, 8] -> out = [3/4 * 4, 1/4 * 8] = [3, 2].
  q = jnp.array([[[np.log(3.0), 0.0]]], jnp.float32)
  k = jnp.array([[[[1.0, 0.0], [0.0, 1.0]]]], jnp.float32)  # [K=1, P=1, page=2, H=2]
  v = jnp.array([[[[4.0, 0.0], [0.0, 8.0]]]], jnp.float32)
  out = ref.decode_attention(q, k, v, jnp.array([2]), jnp.array([[0]]), scale=1.0)
  np.testing.assert_allclose(np.asarray(out), [[[3.0, 2.0]]], rtol=1e-6)
  # Length 1: only k0 is visible -> out = v0. Length 0 -> zeros.
  out = ref.decode_attention(q, k, v, jnp.array([1]), jnp.array([[0]]), scale=1.0)
  np.testing.assert_allclose(np.asarray(out), [[[4.0, 0.0]]], rtol=1e-6)
  out = ref.decode_attention(q, k, v, jnp.array([0]), jnp.array([[0]]), scale=1.0)
  np.testing.assert_array_equal(np.asarray(out), 0.0)


@pytest.mark.parametrize("name", sorted(CASES))
def test_reference_matches_numpy_walk(name):
  args, kwargs, want = case_inputs(name)
  got = numpy_attention(*args, **kwargs)
  assert np.all(got[0] == 0) and np.all(np.asarray(want)[0] == 0)  # length 0 -> zeros
  dtype = CASES[name][3]
  if dtype == jnp.bfloat16:
    # The reference casts its f32 result to bf16: compare with bf16 rounding of numpy's.
    budget = 4e-3
  else:
    budget = REFERENCE_BUDGET
  assert rel_err(want, got) < budget


def test_pack_halves_roundtrip():
  codes = jax.random.randint(keys("pack")[0], (3, 5, 64), 0, 16).astype(jnp.uint8)
  packed = ref.pack_halves(codes)
  assert packed.shape == (3, 5, 32)
  np.testing.assert_array_equal(packed[..., 0] & 0xF, codes[..., 0])
  np.testing.assert_array_equal(packed[..., 0] >> 4, codes[..., 32])
  np.testing.assert_array_equal(ref.unpack_halves(packed), codes)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_pack_codes_fraction_layout(bits):
  """Byte j holds element j + i H/f at bits i * bits (f = 8 / bits per byte): the layout
  lowbit.kv_cache stores (it packs with this function)."""
  from lowbit import kv_cache  # pylint: disable=g-import-not-at-top
  assert kv_cache.pack_codes is ref.pack_codes and kv_cache.unpack_codes is ref.unpack_codes
  codes = jax.random.randint(keys("pack", bits)[0], (3, 5, 64), 0, 2**bits)
  codes = codes.astype(jnp.uint8)
  packed = np.asarray(ref.pack_codes(codes, bits))
  f = 8 // bits
  assert packed.shape == (3, 5, 64 // f) and packed.dtype == np.uint8
  for i in range(f):
    np.testing.assert_array_equal((packed >> (i * bits)) & (2**bits - 1),
                                  codes[..., i * 64 // f:(i + 1) * 64 // f])
  np.testing.assert_array_equal(ref.unpack_codes(jnp.asarray(packed), bits), codes)


# ---------------------------------------------------------------------------------------
# Kernels in interpret mode vs the reference


@pytest.mark.parametrize("name", sorted(CASES))
def test_gpu_kernel_interpret(name):
  args, kwargs, want = case_inputs(name)
  dtype, bs = CASES[name][3], CASES[name][7]
  got = gpu.decode_attention(*args, **kwargs, block_sizes=bs, interpret=True)
  assert got.dtype == dtype and got.shape == args[0].shape
  np.testing.assert_array_equal(np.asarray(got[0], np.float32), 0.0)
  assert rel_err(got, want) < KERNEL_BUDGET[dtype]


@pytest.mark.parametrize("name", sorted(CASES))
def test_tpu_kernel_interpret(name):
  args, kwargs, want = case_inputs(name)
  dtype, bs = CASES[name][3], CASES[name][8]
  got = tpu.decode_attention(*args, **kwargs, block_sizes=bs, interpret=INTERPRET_TPU)
  assert got.dtype == dtype and got.shape == args[0].shape
  np.testing.assert_array_equal(np.asarray(got[0], np.float32), 0.0)
  assert rel_err(got, want) < KERNEL_BUDGET[dtype]


def test_split_layout_fills_the_gpu():
  # One 128k-token sequence, 8 kv heads, page 16: 8 * splits >= 4 programs per SM.
  splits, pps = split_layout(1, 8, 8192, BlockSizes())
  assert 8 * splits >= 3 * 132 and splits * pps >= 8192 and pps % 8 == 0
  # Short table: never more splits than blocks.
  assert split_layout(1, 8, 3, BlockSizes()) == (1, 8)
  # Large batch: one split.
  assert split_layout(64, 8, 8192, BlockSizes())[0] == 2
  assert split_layout(2, 1, 40, BlockSizes(pages_per_block=2, num_splits=3)) == (3, 14)


# ---------------------------------------------------------------------------------------
# Per-channel keys (KIVI's key_group) and return_lse

# Case: (bits, (N, K), H, q dtype, rope, softcap, window, key_group, page, gpu BlockSizes,
#        tpu BlockSizes)
CHANNEL_CASES = {
    "int4_g8_gqa4": (4, (8, 2), 64, jnp.float32, False, None, None, 8, 16, None, None),
    "int4_g16_bf16_window_softcap": (4, (4, 1), 64, jnp.bfloat16, False, 30.0, 20, 16, 16,
                                     BlockSizes(pages_per_block=2, num_splits=3),
                                     TpuBlockSizes(2)),
    "int8_g8_rope": (8, (4, 2), 64, jnp.float32, True, None, None, 8, 16,
                     BlockSizes(pages_per_block=1, num_splits=4), None),
    # kv2 (lowbit.kv_cache): 2-bit keys per channel; two groups per page.
    "int2_g16_page32_gqa4": (2, (8, 2), 64, jnp.float32, False, None, None, 16, 32, None,
                             None),
    "int2_g16_bf16_rope_window": (2, (4, 1), 64, jnp.bfloat16, True, None, 24, 16, 16,
                                  BlockSizes(pages_per_block=2, num_splits=3),
                                  TpuBlockSizes(2)),
}


@functools.lru_cache(maxsize=None)
def channel_inputs(name):
  """(args, kwargs with return_lse, reference (out, lse)) of a per-channel case; lengths
  0, 1, G-1, G+1 and a long one; with a sliding window, query_positions past the pages."""
  bits, heads, h, dtype, rope, softcap, window, group, page, _, _ = CHANNEL_CASES[name]
  lengths = (0, 1, group - 1, group + 1, 9 * page + 5)
  args, kwargs = make_case((name,), bits=bits, b_heads=heads, h=h, lengths=lengths,
                           dtype=dtype, page=page, rope=rope, key_group=group)
  kwargs.update(logit_softcap=softcap, sliding_window=window, return_lse=True)
  if window is not None:  # the query G/2 tokens past the pages (a float window's worth)
    kwargs["query_positions"] = jnp.asarray(lengths, jnp.int32) - 1 + group // 2
  return args, kwargs, ref.decode_attention(*args, **kwargs)


def check_lse(lse, want_lse, dtype=jnp.float32):
  """lse: -inf exactly for the empty sequence, else within LSE_BUDGET of want."""
  lse, want_lse = np.asarray(lse, np.float64), np.asarray(want_lse, np.float64)
  assert lse.shape == want_lse.shape
  np.testing.assert_array_equal(lse[0], -np.inf)
  np.testing.assert_allclose(lse[1:], want_lse[1:], rtol=0, atol=LSE_BUDGET[dtype])


@pytest.mark.parametrize("name", sorted(CHANNEL_CASES))
def test_channel_reference_matches_numpy_walk(name):
  args, kwargs, (out, lse) = channel_inputs(name)
  assert out.dtype == jnp.float32 and lse.shape == args[0].shape[:2]
  want, want_lse = numpy_attention(*args, **kwargs)
  np.testing.assert_array_equal(np.asarray(out[0]), 0.0)
  # return_lse gives float32 out: the reference budget whatever q's dtype (q is rounded
  # to bf16 before both).
  assert rel_err(out, want) < REFERENCE_BUDGET
  check_lse(lse, want_lse)
  plain = ref.decode_attention(*args, **{**kwargs, "return_lse": False})
  np.testing.assert_array_equal(np.asarray(plain), np.asarray(out.astype(plain.dtype)))


def test_channel_reference_golden():
  # One sequence of 2 tokens in a page of 2, key_group 2 (one grid for both), H = 2,
  # 8-bit codes: k0 codes [1, 0], k1 codes [0, 1], k_scales [2, 3], k_offsets [0, -1] ->
  # k0 = [2, -1], k1 = [0, 2]. q = [1, 0] -> scores [2, 0]; lse = log(e^2 + 1);
  # values per token: codes [1, 0] and [0, 1], scale 4, offset 0 -> v0 = [4, 0],
  # v1 = [0, 4] -> out = [4 e^2, 4] / (e^2 + 1).
  q = jnp.array([[[1.0, 0.0]]], jnp.float32)
  codes = jnp.array([[[[1, 0], [0, 1]]]], jnp.uint8)  # [K=1, P=1, page=2, H=2]
  out, lse = ref.decode_attention(
      q, codes, codes, jnp.array([2]), jnp.array([[0]]), bits=8, key_group=2, scale=1.0,
      k_scales=jnp.array([[[[2.0, 3.0]]]]), k_offsets=jnp.array([[[[0.0, -1.0]]]]),
      v_scales=jnp.full((1, 1, 2), 4.0), v_offsets=jnp.zeros((1, 1, 2)), return_lse=True)
  e2 = np.exp(2.0)
  np.testing.assert_allclose(np.asarray(out), [[[4 * e2 / (e2 + 1), 4 / (e2 + 1)]]],
                             rtol=1e-6)
  np.testing.assert_allclose(np.asarray(lse), [[np.log(e2 + 1)]], rtol=1e-6)


@pytest.mark.parametrize("name", sorted(CHANNEL_CASES))
def test_channel_gpu_kernel_interpret(name):
  args, kwargs, (want, want_lse) = channel_inputs(name)
  dtype, bs = CHANNEL_CASES[name][3], CHANNEL_CASES[name][9]
  out, lse = gpu.decode_attention(*args, **kwargs, block_sizes=bs, interpret=True)
  assert out.dtype == jnp.float32 and out.shape == args[0].shape
  np.testing.assert_array_equal(np.asarray(out[0]), 0.0)
  assert rel_err(out, want) < KERNEL_BUDGET[dtype]
  check_lse(lse, want_lse, dtype)


@pytest.mark.parametrize("name", sorted(CHANNEL_CASES))
def test_channel_tpu_kernel_interpret(name):
  args, kwargs, (want, want_lse) = channel_inputs(name)
  dtype, bs = CHANNEL_CASES[name][3], CHANNEL_CASES[name][10]
  out, lse = tpu.decode_attention(*args, **kwargs, block_sizes=bs, interpret=INTERPRET_TPU)
  assert out.dtype == jnp.float32 and out.shape == args[0].shape
  np.testing.assert_array_equal(np.asarray(out[0]), 0.0)
  assert rel_err(out, want) < KERNEL_BUDGET[dtype]
  check_lse(lse, want_lse, dtype)


def test_per_token_return_lse():
  """return_lse on per-token pages: the GPU kernel's split merge and the reference agree
  with the float64 walk."""
  args, kwargs, _ = case_inputs("int8_window")
  kwargs = {**kwargs, "return_lse": True}
  _, want_lse = numpy_attention(*args, **kwargs)
  check_lse(ref.decode_attention(*args, **kwargs)[1], want_lse)
  bs = CASES["int8_window"][7]
  check_lse(gpu.decode_attention(*args, **kwargs, block_sizes=bs, interpret=True)[1],
            want_lse)


def test_channel_bad_shapes_raise():
  args, sc = _small(bits=4)
  kh, p, page, _ = args[1].shape
  grid = jnp.ones((kh, p, page // 8, 64), jnp.float32)
  good = {**sc, "k_scales": grid, "k_offsets": grid}
  api.decode_attention(*args, **good, bits=4, key_group=8, scale=0.1)
  with pytest.raises(ValueError, match="page_size=16 must be a multiple of key_group=6"):
    api.decode_attention(*args, **good, bits=4, key_group=6, scale=0.1)
  with pytest.raises(ValueError, match=r"k_scales.shape=\(2, 4, 16\)"):
    api.decode_attention(*args, **sc, bits=4, key_group=8, scale=0.1)
  with pytest.raises(ValueError, match="k_offsets.shape"):
    api.decode_attention(*args, **{**good, "k_offsets": grid[..., :32]}, bits=4,
                         key_group=8, scale=0.1)
  with pytest.raises(ValueError, match="key_group=0"):
    api.decode_attention(*args, **good, bits=4, key_group=0, scale=0.1)
  float_args, _ = _small()
  with pytest.raises(ValueError, match="key_group=8 needs quantized pages"):
    api.decode_attention(*float_args, key_group=8, scale=0.1)


# ---------------------------------------------------------------------------------------
# Dispatch and errors


def _small(bits=None, n=4, kh=2, h=64, b=2, pps=2, page=PAGE):
  hc = h // ref.codes_per_byte(bits)
  dt = jnp.float32 if bits is None else jnp.uint8
  q = jnp.ones((b, n, h), jnp.float32)
  kp = jnp.ones((kh, 4, page, hc), dt)
  sc = {} if bits is None else {k: jnp.ones((kh, 4, page), jnp.float32)
                                for k in ("k_scales", "k_offsets", "v_scales", "v_offsets")}
  return (q, kp, kp, jnp.full((b,), 5, jnp.int32), jnp.zeros((b, pps), jnp.int32)), sc


def test_api_dispatch():
  args, _ = _small()
  want = ref.decode_attention(*args, scale=0.1)
  # On the CPU the default order is "xla" alone.
  np.testing.assert_array_equal(api.decode_attention(*args, scale=0.1), want)
  # A case the GPU kernel refuses (head dim 48 is not a power of two) falls through.
  q48 = jnp.ones((2, 4, 48), jnp.float32)
  kp48 = jnp.ones((2, 4, PAGE, 48), jnp.float32)
  a48 = (q48, kp48, kp48, args[3], args[4])
  with pytest.raises(NotImplementedError, match="head dim"):
    api.decode_attention(*a48, scale=0.1, implementation="pallas_gpu", interpret=True)
  out = api.decode_attention(*a48, scale=0.1, implementation=("pallas_gpu", "xla"),
                             interpret=True)
  np.testing.assert_array_equal(out, ref.decode_attention(*a48, scale=0.1))
  # 2-bit codes of head dim 32 unpack into quarters of 8 columns, below a dot's 16.
  args2, sc2 = _small(bits=2, h=32)
  with pytest.raises(NotImplementedError, match="h=32 must be a power of two >= 64"):
    api.decode_attention(*args2, **sc2, bits=2, scale=0.1, implementation="pallas_gpu",
                         interpret=True)
  with pytest.raises(ValueError, match="implementation='cuda'"):
    api.decode_attention(*args, scale=0.1, implementation="cuda")
  with pytest.raises(TypeError, match="TpuBlockSizes"):
    api.decode_attention(*args, scale=0.1, implementation="pallas_gpu",
                         block_sizes=TpuBlockSizes(), interpret=True)


@pytest.mark.parametrize("change,match", [
    (dict(n=6, kh=4), "multiple of kv heads"),
    (dict(bits=4, h=63), "bits=4 needs a head dim that is a multiple of 2"),
    (dict(bits=2, h=62), "bits=2 needs a head dim that is a multiple of 4"),
    (dict(bits=2, h=64, hc=32), r"last dim must be 16 for bits=2"),
    (dict(bits=3), "bits=3"),
])
def test_bad_shapes_raise(change, match):
  bits = change.pop("bits", None)
  if bits == 3:
    args, sc = _small(bits=8)
  elif "h" in change and bits is not None:  # packed pages of a bad head dim or width
    h = change["h"]
    hc = change.get("hc", h * bits // 8)
    args, sc = _small(bits=8)
    q = jnp.ones((2, 4, h), jnp.float32)
    args = (q, jnp.ones((2, 4, PAGE, hc), jnp.uint8), jnp.ones((2, 4, PAGE, hc), jnp.uint8),
            *args[3:])
  else:
    args, sc = _small(bits=bits, **change)
  with pytest.raises(ValueError, match=match):
    api.decode_attention(*args, **sc, bits=bits, scale=0.1)


def test_bad_metadata_and_scales_raise():
  args, sc = _small(bits=8)
  q, kp, vp, lengths, table = args
  with pytest.raises(ValueError, match="lengths.shape"):
    api.decode_attention(q, kp, vp, lengths[:1], table, **sc, bits=8, scale=0.1)
  with pytest.raises(ValueError, match="page_table.shape"):
    api.decode_attention(q, kp, vp, lengths, table[:1], **sc, bits=8, scale=0.1)
  missing = dict(sc)
  del missing["v_offsets"]
  with pytest.raises(ValueError, match="v_offsets is required"):
    api.decode_attention(q, kp, vp, lengths, table, **missing, bits=8, scale=0.1)
  with pytest.raises(ValueError, match="k_scales.shape"):
    api.decode_attention(q, kp, vp, lengths, table, **{**sc, "k_scales": sc["k_scales"][0]},
                         bits=8, scale=0.1)
  with pytest.raises(ValueError, match="bits=None needs float pages"):
    api.decode_attention(q, kp, vp, lengths, table, scale=0.1)
  with pytest.raises(ValueError, match="rope_inv_freq.shape"):
    api.decode_attention(q, kp, vp, lengths, table, **sc, bits=8, scale=0.1,
                         rope_inv_freq=jnp.ones((3,)))


def test_dynamic_validate():
  ref.dynamic_validate_inputs(np.array([17]), np.array([[0, 1, -1]]), 4, PAGE)
  with pytest.raises(ValueError, match="outside"):
    ref.dynamic_validate_inputs(np.array([17]), np.array([[0, 9, 0]]), 4, PAGE)
  with pytest.raises(ValueError, match="lengths"):
    ref.dynamic_validate_inputs(np.array([100]), np.array([[0, 1]]), 4, PAGE)


# ---------------------------------------------------------------------------------------
# Lowering checks for the real targets, where the CPU can lower them

sds = jax.ShapeDtypeStruct
F32, BF16, U8 = jnp.float32, jnp.bfloat16, jnp.uint8


def _lowering_case(impl, bits, rope, page, key_group=None):
  b, n, kh, h, p, pps = 4, 32, 8, 128, 256, 64
  hc = h // ref.codes_per_byte(bits)
  dt = BF16 if bits is None else U8
  names = ((("k_scales", "k_offsets", "v_scales", "v_offsets") if bits else ())
           + (("rope_inv_freq",) if rope else ()))
  key_grid = (kh, p, page) if key_group is None else (kh, p, page // key_group, h)
  extra = ([sds(key_grid, F32)] * 2 + [sds((kh, p, page), F32)] * 2 if bits else []) + (
      [sds((h // 2,), F32)] if rope else [])
  # With key_group: the lse output too, as lowbit.attention asks for it.
  options = {} if key_group is None else dict(key_group=key_group, return_lse=True)

  def fn(q, kp, vp, lengths, table, *ex):
    return impl(q, kp, vp, lengths, table, bits=bits, scale=h ** -0.5,
                **dict(zip(names, ex)), **options)

  args = (sds((b, n, h), BF16), sds((kh, p, page, hc), dt), sds((kh, p, page, hc), dt),
          sds((b,), jnp.int32), sds((b, pps), jnp.int32), *extra)
  return fn, args


@pytest.mark.parametrize("bits,rope,page,key_group", [
    (None, False, 16, None), (8, True, 16, None), (4, True, 16, None), (4, False, 32, 32),
    (4, True, 64, 32), (2, False, 32, None), (2, True, 32, 32)])
def test_gpu_kernel_lowers_for_cuda(bits, rope, page, key_group):
  fn, args = _lowering_case(gpu.decode_attention, bits, rope, page, key_group)
  assert_lowers_for_cuda(fn, args)


@pytest.mark.parametrize("bits,rope,key_group", [(None, True, None), (4, False, None),
                                                  (4, False, 32), (2, False, 32)])
def test_tpu_kernel_lowers_for_tpu(bits, rope, key_group):
  # Page size 32: whole (32, 128) tiles of 8-bit codes for the DMAs.
  fn, args = _lowering_case(tpu.decode_attention, bits, rope, 32, key_group)
  assert_lowers_for_tpu(fn, args)
