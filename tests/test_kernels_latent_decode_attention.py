"""Palu latent decode attention on the CPU: reference, Pallas kernels in interpret mode,
dispatch and input checks.

Oracles (STYLE.md 13):
  * the reference (`reference.latent_decode_attention`) is checked against an independent
    float64 numpy walk: per sequence, kv head and visible slot it unpacks and dequantizes
    the latent with numpy, rebuilds the key with its own matrix-vector product, rotates
    it with its own RoPE and takes a plain softmax;
  * each kernel (GPU kernel with interpret=True, TPU kernel under pltpu.InterpretParams(),
    which also flags out-of-bounds reads) is checked against the reference on the SAME
    latents (KERNEL_BUDGET by q dtype).
Inputs are adversarial (STYLE.md 17): lengths 0, 1, block-1, block+1 and a longer one in
one batch, every slot past a length poisoned with NaN (float latents) or NaN scales and
offsets (4-bit latents), random non-zero values everywhere else.
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.decode_attention.reference import pack_halves
from pallas_kernels.latent_decode_attention import api
from pallas_kernels.latent_decode_attention import gpu
from pallas_kernels.latent_decode_attention import reference as ref
from pallas_kernels.latent_decode_attention import tpu
from pallas_kernels.latent_decode_attention.config import BlockSizes, TpuBlockSizes
from kernel_checks import assert_lowers_for_cuda, assert_lowers_for_tpu, rel_err

# Relative (Frobenius) error of a kernel vs the reference on the same latents, by q dtype:
# f32 runs HIGHEST-precision dots (left: RoPE angles by angle addition, a few f32 ulps);
# bf16 q: the rebuilt keys, k_up and the probabilities enter the dots as bf16 / float16.
KERNEL_BUDGET = {jnp.float32: 2e-5, jnp.bfloat16: 1e-2}
# The reference (float32) vs the float64 numpy walk.
REFERENCE_BUDGET = 2e-6
NAN = float("nan")
BLOCK = 16
INTERPRET_TPU = pltpu.InterpretParams()


def inv_freq(h, base=10000.0):
  return (1.0 / base ** (np.arange(0, h, 2, dtype=np.float32) / h)).astype(np.float32)


# ---------------------------------------------------------------------------------------
# Inputs


def make_case(params, *, bits, heads, h, groups, rk, rv, lengths, dtype, rope=True,
              softcap=None, window=None, slots=None):
  """Random latents with NaN-poisoned slots past each length; returns (args, kwargs).

  heads = (N, K); groups = G (K % G == 0, gh = K / G kv heads per group)."""
  n, kh = heads
  gh = kh // groups
  lengths = np.asarray(lengths, np.int32)
  b = len(lengths)
  s = slots or int(lengths.max()) + 3
  rng = np.random.default_rng(zlib.crc32(repr(params).encode()))
  q = jnp.asarray(rng.standard_normal((b, n, h), np.float32)).astype(dtype)
  # Rows of k_up scaled so rebuilt keys have about unit size.
  up = rng.standard_normal((groups, gh * h, rk), np.float32) / np.sqrt(rk)
  poison = np.arange(s)[None, :] >= lengths[:, None]  # [B, S]
  kwargs = dict(bits=bits, scale=h ** -0.5, logit_softcap=softcap, sliding_window=window,
                rope_inv_freq=jnp.asarray(inv_freq(h)) if rope else None)
  lat = {}
  for name, r in (("k", rk), ("v", rv)):
    if bits is None:
      x = rng.standard_normal((groups, b, s, r), np.float32)
      x[:, poison] = NAN
      lat[name] = jnp.asarray(x, dtype)
    else:
      lat[name] = pack_halves(jnp.asarray(rng.integers(0, 16, (groups, b, s, r), np.uint8)))
      scales = rng.uniform(2.0, 3.0, (groups, b, s)).astype(np.float32) / 15
      offsets = rng.uniform(-1.6, -1.2, (groups, b, s)).astype(np.float32)
      scales[:, poison] = NAN
      offsets[:, poison] = NAN
      kwargs[f"{name}_scales"] = jnp.asarray(scales)
      kwargs[f"{name}_offsets"] = jnp.asarray(offsets)
  k_up = jnp.asarray(up, dtype)
  return (q, lat["k"], lat["v"], k_up, jnp.asarray(lengths)), kwargs


def numpy_walk(q, k_latents, v_latents, k_up, lengths, *, bits, scale, logit_softcap,
               sliding_window, rope_inv_freq, k_scales=None, k_offsets=None,
               v_scales=None, v_offsets=None):
  """float64 loop over sequences, query heads and visible slots."""
  f64 = lambda a: np.asarray(jnp.asarray(a, jnp.float32), np.float64)
  q, up = f64(q), f64(k_up)
  b, n, h = q.shape
  g = up.shape[0]
  gh = up.shape[1] // h
  qpk = n // (g * gh)

  def latent(x, sc, of, gi, bi, s):
    if bits is None:
      return f64(x[gi, bi, s])
    byte = np.asarray(x[gi, bi, s]).astype(np.int64)
    codes = np.concatenate([byte & 15, byte >> 4]).astype(np.float64)
    return codes * float(sc[gi, bi, s]) + float(of[gi, bi, s])

  rv = v_latents.shape[-1] * (2 if bits == 4 else 1)
  out = np.zeros((b, n, rv))
  for bi in range(b):
    length = int(lengths[bi])
    lo = 0 if sliding_window is None else max(0, length - sliding_window)
    for ni in range(n):
      kv = ni // qpk
      gi, j = kv // gh, kv % gh
      scores, values = [], []
      for s in range(lo, length):
        key = up[gi, j * h:(j + 1) * h] @ latent(k_latents, k_scales, k_offsets, gi, bi, s)
        if rope_inv_freq is not None:
          ang = float(s) * f64(rope_inv_freq)
          c, si = np.cos(ang), np.sin(ang)
          k1, k2 = key[: h // 2], key[h // 2:]
          key = np.concatenate([k1 * c - k2 * si, k2 * c + k1 * si])
        sc = float(q[bi, ni] @ key) * scale
        if logit_softcap is not None:
          sc = np.tanh(sc / logit_softcap) * logit_softcap
        scores.append(sc)
        values.append(latent(v_latents, v_scales, v_offsets, gi, bi, s))
      if scores:
        p = np.exp(np.asarray(scores) - max(scores))
        out[bi, ni] = (p / p.sum()) @ np.asarray(values)
  return out


# Case: (bits, (N, K), G, H, Rk, Rv, q dtype, rope, softcap, window)
LENGTHS = (0, 1, BLOCK - 1, BLOCK + 1, 3 * BLOCK + 5)
CASES = {
    "float_gh2_rope": (None, (8, 4), 2, 32, 32, 16, jnp.float32, True, None, None),
    "float_gh1_norope": (None, (4, 2), 2, 32, 16, 32, jnp.float32, False, None, None),
    "float_ghall_softcap": (None, (4, 2), 1, 32, 32, 16, jnp.float32, True, 5.0, None),
    "float_window": (None, (8, 4), 2, 32, 16, 16, jnp.float32, True, None, 7),
    "int4_gh2_rope": (4, (8, 4), 2, 32, 32, 64, jnp.float32, True, None, None),
    "int4_ghall_window": (4, (4, 2), 1, 32, 64, 32, jnp.float32, True, 3.0, 20),
    "int4_gh1_norope": (4, (4, 2), 2, 32, 32, 32, jnp.float32, False, None, None),
    "bf16_gh2_rope": (None, (8, 4), 2, 32, 32, 16, jnp.bfloat16, True, None, None),
    "bf16_int4_rope": (4, (8, 4), 2, 32, 32, 32, jnp.bfloat16, True, None, None),
}


def case(name):
  bits, heads, g, h, rk, rv, dtype, rope, softcap, window = CASES[name]
  return make_case(name, bits=bits, heads=heads, h=h, groups=g, rk=rk, rv=rv,
                   lengths=LENGTHS, dtype=dtype, rope=rope, softcap=softcap, window=window)


# ---------------------------------------------------------------------------------------
# Reference


@pytest.mark.parametrize("name", ["float_gh2_rope", "float_window", "int4_ghall_window",
                                  "int4_gh1_norope"])
def test_reference_matches_numpy_walk(name):
  args, kwargs = case(name)
  got = ref.latent_decode_attention(*args, **kwargs)
  assert got.dtype == jnp.float32 and got.shape == (len(LENGTHS), args[0].shape[1],
                                                    CASES[name][5])
  want = numpy_walk(*args, **kwargs)
  assert np.all(np.asarray(got)[0] == 0.0)  # length 0
  assert rel_err(got, want) < REFERENCE_BUDGET


# ---------------------------------------------------------------------------------------
# Kernels vs the reference on the same latents

# One tiling per case, alternating: 16-slot tiles in 2 splits (a split boundary inside
# the longest sequence) and 32-slot tiles in one split.
GPU_BLOCKS = (BlockSizes(block_t=BLOCK, num_splits=2), BlockSizes(block_t=2 * BLOCK,
                                                                  num_splits=1))


@pytest.mark.parametrize("name", list(CASES))
def test_gpu_kernel_interpret(name):
  args, kwargs = case(name)
  want = ref.latent_decode_attention(*args, **kwargs)
  bs = GPU_BLOCKS[list(CASES).index(name) % len(GPU_BLOCKS)]
  got = gpu.latent_decode_attention(*args, **kwargs, block_sizes=bs, interpret=True)
  assert got.dtype == jnp.float32 and got.shape == want.shape
  assert np.all(np.asarray(got)[0] == 0.0)  # length 0
  assert rel_err(got, want) < KERNEL_BUDGET[args[0].dtype.type], bs


@pytest.mark.parametrize("name", list(CASES))
def test_tpu_kernel_interpret(name):
  args, kwargs = case(name)
  want = ref.latent_decode_attention(*args, **kwargs)
  got = tpu.latent_decode_attention(*args, **kwargs, block_sizes=TpuBlockSizes(BLOCK),
                                    interpret=INTERPRET_TPU)
  assert got.dtype == jnp.float32 and got.shape == want.shape
  assert np.all(np.asarray(got)[0] == 0.0)  # length 0
  assert rel_err(got, want) < KERNEL_BUDGET[args[0].dtype.type]


def test_split_layout_fills_the_gpu():
  # One 64k sequence, 2 groups: 2 * splits >= 3 programs per SM, splits cover the slots.
  splits, per_split = BlockSizes().split_layout(1, 2, 65536)
  assert 2 * splits >= 3 * 132 and splits * per_split >= 65536 and per_split % 128 == 0
  assert BlockSizes(block_t=16, num_splits=3).split_layout(2, 1, 40) == (3, 16)


def test_block_sizes_validate():
  with pytest.raises(ValueError, match="block_t=48"):
    BlockSizes(block_t=48)
  with pytest.raises(ValueError, match="num_splits=0"):
    BlockSizes(num_splits=0)
  with pytest.raises(ValueError, match="block_t=12"):
    TpuBlockSizes(block_t=12)


# ---------------------------------------------------------------------------------------
# Dispatch and input checks


def _small(**change):
  p = dict(bits=None, heads=(4, 2), h=32, groups=1, rk=32, rv=32, lengths=(3, 9),
           dtype=jnp.float32)
  p.update(change)
  return make_case(("small", tuple(sorted(p.items()))), **p)


def test_api_dispatch():
  args, kwargs = _small()
  want = ref.latent_decode_attention(*args, **kwargs)
  # On the CPU the default order is "xla" alone.
  np.testing.assert_array_equal(api.latent_decode_attention(*args, **kwargs), want)
  # A case the GPU kernel refuses (H / 2 = 12 is not a power of two) falls through.
  args24, kwargs24 = _small(h=24)
  with pytest.raises(NotImplementedError, match="H / 2=12"):
    api.latent_decode_attention(*args24, **kwargs24, implementation="pallas_gpu",
                                interpret=True)
  out = api.latent_decode_attention(*args24, **kwargs24,
                                    implementation=("pallas_gpu", "xla"), interpret=True)
  np.testing.assert_array_equal(out, ref.latent_decode_attention(*args24, **kwargs24))
  got = api.latent_decode_attention(*args, **kwargs, implementation="pallas_gpu",
                                    block_sizes=BlockSizes(block_t=16), interpret=True)
  assert rel_err(got, want) < KERNEL_BUDGET[jnp.float32]
  with pytest.raises(ValueError, match="implementation='cuda'"):
    api.latent_decode_attention(*args, **kwargs, implementation="cuda")
  with pytest.raises(TypeError, match="TpuBlockSizes"):
    api.latent_decode_attention(*args, **kwargs, implementation="pallas_gpu",
                                block_sizes=TpuBlockSizes(), interpret=True)


def _replace(args, kwargs, **change):
  names = ("q", "k_latents", "v_latents", "k_up", "lengths")
  full = {**dict(zip(names, args)), **kwargs, **change}
  return [full.pop(n) for n in names], full


@pytest.mark.parametrize("change,match", [
    (lambda a, k: dict(bits=3), "bits=3"),
    (lambda a, k: dict(q=a[0][0]), "q must be"),
    (lambda a, k: dict(q=a[0].astype(jnp.int32)), "q.dtype=int32"),
    (lambda a, k: dict(q=a[0][:, :3]), "multiple of kv heads"),
    (lambda a, k: dict(k_up=a[3][:, :40]), "gh \\* H"),
    (lambda a, k: dict(k_up=a[3][..., :16]), "key rank 32"),
    (lambda a, k: dict(k_latents=a[1][:, :1]), "k_latents.shape"),
    (lambda a, k: dict(v_latents=a[2][:, :, :4]), "same slots"),
    (lambda a, k: dict(k_latents=a[1].astype(jnp.int8)), "float k_latents"),
    (lambda a, k: dict(lengths=a[4][:1]), "lengths.shape"),
    (lambda a, k: dict(lengths=a[4].astype(jnp.float32)), "lengths.shape"),
    (lambda a, k: dict(rope_inv_freq=k["rope_inv_freq"][:4]), "rope_inv_freq.shape"),
    (lambda a, k: dict(sliding_window=0), "sliding_window=0"),
    (lambda a, k: dict(logit_softcap=-1.0), "logit_softcap=-1.0"),
    (lambda a, k: dict(k_scales=jnp.ones(a[1].shape[:3])), "k_scales given"),
])
def test_bad_float_inputs_raise(change, match):
  args, kwargs = _small()
  args, kwargs = _replace(args, kwargs, **change(args, kwargs))
  with pytest.raises(ValueError, match=match):
    api.latent_decode_attention(*args, **kwargs)


@pytest.mark.parametrize("change,match", [
    (lambda a, k: dict(k_latents=a[1].astype(jnp.float32)), "uint8 k_latents"),
    (lambda a, k: dict(v_scales=None), "v_scales is required"),
    (lambda a, k: dict(k_offsets=k["k_offsets"][:, :, :2]), "k_offsets.shape"),
    (lambda a, k: dict(v_offsets=k["v_offsets"].astype(jnp.bfloat16)), "v_offsets.dtype"),
    (lambda a, k: dict(k_latents=a[1][..., :8]), "key rank 16"),
])
def test_bad_quantized_inputs_raise(change, match):
  args, kwargs = _small(bits=4)
  args, kwargs = _replace(args, kwargs, **change(args, kwargs))
  with pytest.raises(ValueError, match=match):
    api.latent_decode_attention(*args, **kwargs)


# ---------------------------------------------------------------------------------------
# Lowering checks for the real targets at the Llama-3-8B Palu shape (gh=4, Rk=Rv=256)

sds = jax.ShapeDtypeStruct


def _lowering_case(impl, bits):
  b, n, h, g, gh, r, s = 2, 32, 128, 2, 4, 256, 1024
  rc, dt = (r // 2, jnp.uint8) if bits else (r, jnp.bfloat16)
  names = ("k_scales", "k_offsets", "v_scales", "v_offsets") if bits else ()

  def fn(q, kl, vl, up, lengths, freq, *sc):
    return impl(q, kl, vl, up, lengths, rope_inv_freq=freq, scale=h ** -0.5, bits=bits,
                **dict(zip(names, sc)))

  args = (sds((b, n, h), jnp.bfloat16), sds((g, b, s, rc), dt), sds((g, b, s, rc), dt),
          sds((g, gh * h, r), jnp.bfloat16), sds((b,), jnp.int32),
          sds((h // 2,), jnp.float32), *[sds((g, b, s), jnp.float32)] * len(names))
  return fn, args


@pytest.mark.parametrize("bits", [None, 4])
def test_gpu_kernel_lowers_for_cuda(bits):
  fn, args = _lowering_case(gpu.latent_decode_attention, bits)
  assert_lowers_for_cuda(fn, args)


@pytest.mark.parametrize("bits", [None, 4])
def test_tpu_kernel_lowers_for_tpu(bits):
  fn, args = _lowering_case(tpu.latent_decode_attention, bits)
  assert_lowers_for_tpu(fn, args)
