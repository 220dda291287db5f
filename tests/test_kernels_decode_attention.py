"""Paged decode attention on the CPU: reference, Pallas kernels in interpret mode, dispatch.

Oracles (STYLE.md 13, anti-pattern 1):
  * the reference (`reference.decode_attention`) is checked against an independent float64
    numpy computation that walks the page table token by token, unpacks and dequantizes
    each token with numpy, rotates it with its own RoPE, and takes a plain softmax over
    the visible keys; plus one hand-computed golden case;
  * each kernel (GPU kernel with interpret=True, TPU kernel under
    pltpu.InterpretParams(), which also flags out-of-bounds reads) is checked against the
    reference on the SAME pages (KERNEL_BUDGET by q dtype).
Inputs are adversarial (STYLE.md 17): lengths 0, 1, page-1, page+1 and a long one in one
batch, a shuffled page table whose entries past each sequence's end are garbage (-1, past
the pool), every page the table does not reach and every slot past a length poisoned
with NaN (float pages) or NaN scales and offsets (quantized pages).
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

# Relative (Frobenius) error of a kernel vs the reference on the same pages, by q dtype:
# f32 runs HIGHEST-precision dots (left: RoPE angles by angle addition, a few f32 ulps of
# p * f); bf16 q: the dots take bf16 (float pages) or float16 (codes) operands, and the
# output is rounded to bf16 (2^-9 relative); seen: 7e-4 .. 1.2e-3.
KERNEL_BUDGET = {jnp.float32: 2e-5, jnp.bfloat16: 5e-3}
# The reference (float32) vs the float64 numpy walk.
REFERENCE_BUDGET = 2e-6
NAN = float("nan")
PAGE = 16
INTERPRET_TPU = pltpu.InterpretParams()


def rel_err(out, want) -> float:
  a = np.asarray(jnp.asarray(out, jnp.float32), np.float64)
  b = np.asarray(want, np.float64)
  assert np.all(np.isfinite(a)), "non-finite values in the result"
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def keys(*params, n=8):
  seed = zlib.crc32(repr(params).encode())
  return jax.random.split(jax.random.key(seed), n)


def inv_freq(h, base=10000.0):
  return (1.0 / base ** (np.arange(0, h, 2, dtype=np.float32) / h)).astype(np.float32)


# ---------------------------------------------------------------------------------------
# Inputs


def make_case(params, *, bits, b_heads, h, lengths, dtype, page=PAGE, rope=False):
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
  hc = h // 2 if bits == 4 else h
  shape = (kh, num_pages, page, hc)
  if bits is None:
    kp = rng.standard_normal(shape, np.float32)
    vp = rng.standard_normal(shape, np.float32)
  else:  # random bytes: for bits=4, two random nibbles each
    kp = rng.integers(0, 256, shape, np.uint8)
    vp = rng.integers(0, 256, shape, np.uint8)
  sc = {}
  if bits is not None:
    qmax = 2 ** bits - 1
    u = lambda lo, hi: rng.uniform(lo, hi, shape[:3]).astype(np.float32)
    # Keys and values spread over about [-1.6, 1.8].
    sc = {"k_scales": u(2.0, 3.0) / qmax, "k_offsets": u(-1.6, -1.2),
          "v_scales": u(2.0, 3.0) / qmax, "v_offsets": u(-1.6, -1.2)}
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
    for name in sc:
      sc[name][:, poison_slots] = NAN
    kp, vp = jnp.asarray(kp), jnp.asarray(vp)
  sc = {k_: jnp.asarray(v) for k_, v in sc.items()}
  kwargs = dict(bits=bits, scale=h ** -0.5, **sc)
  if rope:
    kwargs["rope_inv_freq"] = jnp.asarray(inv_freq(h))
  return (q, kp, vp, jnp.asarray(lengths), jnp.asarray(table)), kwargs


def numpy_attention(q, k_pages, v_pages, lengths, page_table, *, bits, scale,
                    k_scales=None, k_offsets=None, v_scales=None, v_offsets=None,
                    logit_softcap=None, sliding_window=None, rope_inv_freq=None):
  """Float64 numpy walk of the page table, token by token: the independent oracle."""
  q = np.asarray(jnp.asarray(q, jnp.float32), np.float64)
  kp, vp = np.asarray(jnp.asarray(k_pages, jnp.float32) if bits is None else k_pages), \
      np.asarray(jnp.asarray(v_pages, jnp.float32) if bits is None else v_pages)
  table = np.asarray(page_table)
  b, n, h = q.shape
  kh, _, page, _ = kp.shape
  g = n // kh
  out = np.zeros((b, n, h))

  def token(pages, scales, offsets, kv, pos, seq):
    x = pages[kv, table[seq, pos // page], pos % page]
    if bits == 4:
      x = np.concatenate([x & 0xF, x >> 4])
    x = x.astype(np.float64)
    if bits is not None:
      s_, o_ = (np.asarray(a)[kv, table[seq, pos // page], pos % page]
                for a in (scales, offsets))
      x = x * s_ + o_
    return x

  for seq in range(b):
    n_len = int(lengths[seq])
    lo = 0 if sliding_window is None else max(0, n_len - sliding_window)
    positions = list(range(lo, n_len))
    for kv in range(kh):
      if not positions:
        continue
      keys_ = []
      for pos in positions:
        k = token(kp, k_scales, k_offsets, kv, pos, seq)
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
  return out


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
# Dispatch and errors


def _small(bits=None, n=4, kh=2, h=64, b=2, pps=2, page=PAGE):
  hc = h // 2 if bits == 4 else h
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
  with pytest.raises(ValueError, match="implementation='cuda'"):
    api.decode_attention(*args, scale=0.1, implementation="cuda")
  with pytest.raises(TypeError, match="TpuBlockSizes"):
    api.decode_attention(*args, scale=0.1, implementation="pallas_gpu",
                         block_sizes=TpuBlockSizes(), interpret=True)


@pytest.mark.parametrize("change,match", [
    (dict(n=6, kh=4), "multiple of kv heads"),
    (dict(bits=4, h=63), "even head dim"),
    (dict(bits=3), "bits=3"),
])
def test_bad_shapes_raise(change, match):
  bits = change.pop("bits", None)
  if bits == 3:
    args, sc = _small(bits=8)
  elif bits == 4 and change.get("h") == 63:
    args, sc = _small(bits=8)
    q = jnp.ones((2, 4, 63), jnp.float32)
    args = (q, jnp.ones((2, 4, PAGE, 31), jnp.uint8), jnp.ones((2, 4, PAGE, 31), jnp.uint8),
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


def _lowering_case(impl, bits, rope, page):
  b, n, kh, h, p, pps = 4, 32, 8, 128, 256, 64
  hc = h // 2 if bits == 4 else h
  dt = BF16 if bits is None else U8
  names = ((("k_scales", "k_offsets", "v_scales", "v_offsets") if bits else ())
           + (("rope_inv_freq",) if rope else ()))
  extra = [sds((kh, p, page), F32)] * (4 if bits else 0) + (
      [sds((h // 2,), F32)] if rope else [])

  def fn(q, kp, vp, lengths, table, *ex):
    return impl(q, kp, vp, lengths, table, bits=bits, scale=h ** -0.5,
                **dict(zip(names, ex)))

  args = (sds((b, n, h), BF16), sds((kh, p, page, hc), dt), sds((kh, p, page, hc), dt),
          sds((b,), jnp.int32), sds((b, pps), jnp.int32), *extra)
  return fn, args


@pytest.mark.parametrize("bits,rope", [(None, False), (8, True), (4, True)])
def test_gpu_kernel_lowers_for_cuda(bits, rope):
  fn, args = _lowering_case(gpu.decode_attention, bits, rope, 16)
  try:
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  except Exception as e:  # pylint: disable=broad-except
    # jaxlib >= 0.11 compiles the Triton IR while lowering, which needs the CUDA plugin.
    if "gpu" in str(e).lower() and "triton" in str(e).lower() or "cuda" in str(e).lower():
      pytest.skip(f"this jaxlib cannot lower Triton kernels without a GPU: {e}")
    raise
  assert "triton" in text


@pytest.mark.parametrize("bits,rope", [(None, True), (4, False)])
def test_tpu_kernel_lowers_for_tpu(bits, rope):
  # Page size 32: whole (32, 128) tiles of 8-bit codes for the DMAs.
  fn, args = _lowering_case(tpu.decode_attention, bits, rope, 32)
  text = jax.jit(fn).trace(*args).lower(lowering_platforms=("tpu",)).as_text()
  assert "tpu_custom_call" in text
