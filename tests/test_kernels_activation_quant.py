"""The activation quantizer on the CPU: reference, Pallas kernels in interpret mode, dispatch.

Exactness, not an error budget: the quantizer is the same arithmetic everywhere, so
  * the reference, dequantized, equals `lowbit.quantize.fake_quantize` (the simulation's
    quantizer) bit for bit, for the same settings (after the same norm and gather);
  * the GPU kernel (interpret=True) and the TPU kernel (pltpu.InterpretParams(), which also
    flags out-of-bounds reads) return the reference's codes and scales bit for bit, except
    with the fused norm, where the kernels sum squares in another order: there a code may
    move by one step where a normalised value lies on a rounding boundary (NORM_FLIPS).
Inputs are fresh random draws with uneven channel scales; shapes include M = 1, M not a
multiple of the row block, K not a power of two (576), groups None / 32 / 128, the tail,
and chunked loops (GPU block_k smaller than a group or the tail).
"""

from __future__ import annotations

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from lowbit.quantize import fake_quantize
from pallas_kernels.activation_quant import api
from pallas_kernels.activation_quant import gpu
from pallas_kernels.activation_quant import reference as ref
from pallas_kernels.activation_quant import tpu
from pallas_kernels.activation_quant.config import BlockSizes, TpuBlockSizes
from kernel_checks import assert_lowers_for_cuda, assert_lowers_for_tpu

# With the fused norm: the largest fraction of codes allowed to differ (by one step).
NORM_FLIPS = 0.01


def draw(case):
  """x [M, K] with uneven channel scales, perm or None, norm weight or None."""
  seed = zlib.crc32(repr(case).encode())
  k0, k1, k2, k3 = jax.random.split(jax.random.key(seed), 4)
  m, k = case["m"], case["k"]
  chan = jax.random.uniform(k1, (k,), jnp.float32, 0.1, 4.0)
  x = (jax.random.normal(k0, (m, k), jnp.float32) * chan).astype(case.get("dtype",
                                                                         jnp.bfloat16))
  perm = jax.random.permutation(k2, k).astype(jnp.int32) if case.get("perm") else None
  norm = (jax.random.uniform(k3, (k,), jnp.float32, 0.5, 1.5).astype(x.dtype)
          if case.get("norm") else None)
  return x, perm, norm


def settings(case):
  return dict(bits=case["bits"], group_size=case.get("g"), clip_ratio=case.get("clip", 1.0),
              num_outliers=case.get("tail", 0))


# M in {1, 5, 64}; K in {64, 576}; bits 4 / 8; groups None / 32 / 128; perm, tail, norm,
# clip 0.9; "gpu": GPU block sizes that force chunked loops or partial row blocks.
CASES = {
    "m1_k64_b8_token": dict(m=1, k=64, bits=8),
    "m5_k64_b4_g32_perm_clip": dict(m=5, k=64, bits=4, g=32, perm=True, clip=0.9,
                                    gpu=BlockSizes(block_m=4)),
    "m64_k64_b4_token_norm": dict(m=64, k=64, bits=4, norm=True),
    "m5_k576_b4_g128_atom": dict(m=5, k=576, bits=4, g=128, perm=True, tail=64, clip=0.9),
    "m1_k576_b4_g32_atom_norm": dict(m=1, k=576, bits=4, g=32, perm=True, tail=64,
                                     clip=0.9, norm=True),
    "m64_k576_b8_token_perm_chunked": dict(m=64, k=576, bits=8, perm=True, clip=0.9,
                                           gpu=BlockSizes(block_m=16, block_k=64)),
    "m5_k576_b8_g128_tail_f32": dict(m=5, k=576, bits=8, g=128, tail=64, dtype=jnp.float32),
    "m64_k576_b4_g128_atom_norm": dict(m=64, k=576, bits=4, g=128, perm=True, tail=64,
                                       clip=0.9, norm=True, tpu=TpuBlockSizes(block_m=24)),
    "m5_k576_b4_token_tail_chunked": dict(m=5, k=576, bits=4, tail=64,
                                          gpu=BlockSizes(block_m=2, block_k=32)),
    "m1_k576_b4_g32": dict(m=1, k=576, bits=4, g=32, dtype=jnp.float32),
    # 6 groups, 4 per step (the second step masks 2), each group read in 2 chunks
    "m5_k576_b8_g96_perm_group_steps": dict(
        m=5, k=576, bits=8, g=96, perm=True,
        gpu=BlockSizes(block_m=4, block_k=64, groups_per_step=4)),
}


def group_of(case):
  return case.get("g") or case["k"] - case.get("tail", 0)


@pytest.mark.parametrize("name", sorted(CASES))
def test_reference_dequantizes_to_fake_quantize_exactly(name):
  case = CASES[name]
  x, perm, norm = draw(case)
  s = settings(case)
  got = ref.quantize_activations(x, perm=perm, rms_norm_weight=norm, **s)
  y = x if norm is None else ref.rms_norm(x, norm, 1e-6)
  y = y if perm is None else y[:, perm]
  want = fake_quantize(y, **s)
  deq = ref.dequantize(got, bits=case["bits"], group_size=group_of(case)).astype(x.dtype)
  np.testing.assert_array_equal(np.asarray(deq, np.float32), np.asarray(want, np.float32))


def check_against_reference(out, want, case):
  assert jax.tree.structure(out) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(want)):
    assert a.shape == b.shape and a.dtype == b.dtype
  if not case.get("norm"):
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(want)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    return
  g = group_of(case)
  got_deq = np.asarray(ref.dequantize(out, bits=case["bits"], group_size=g))
  want_deq = np.asarray(ref.dequantize(want, bits=case["bits"], group_size=g))
  np.testing.assert_allclose(np.asarray(out.scales), np.asarray(want.scales), rtol=1e-5)
  # Per-element grid steps: the group scales, then the tail's.
  step = np.repeat(np.asarray(want.scales), g, axis=1)
  if want.outlier_scales is not None:
    step = np.concatenate([step, np.broadcast_to(np.asarray(want.outlier_scales),
                                                 want.outlier_codes.shape)], axis=1)
  assert np.all(np.abs(got_deq - want_deq) <= 1.01 * step)
  assert np.mean(got_deq != want_deq) <= NORM_FLIPS


def run_kernel(impl, case, x, perm, norm):
  if impl == "pallas_gpu":
    return gpu.quantize_activations(x, perm=perm, rms_norm_weight=norm, **settings(case),
                                    block_sizes=case.get("gpu"), interpret=True)
  return tpu.quantize_activations(x, perm=perm, rms_norm_weight=norm, **settings(case),
                                  block_sizes=case.get("tpu"),
                                  interpret=pltpu.InterpretParams())


@pytest.mark.parametrize("impl", ["pallas_gpu", "pallas_tpu"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_kernel_matches_reference(name, impl):
  case = CASES[name]
  x, perm, norm = draw(case)
  want = ref.quantize_activations(x, perm=perm, rms_norm_weight=norm, **settings(case))
  check_against_reference(run_kernel(impl, case, x, perm, norm), want, case)


def test_codes_feed_the_integer_matmuls():
  """The packed layout is the one w4a4_matmul unpacks: its product with identity-like
  weights gives back the dequantized activations."""
  from pallas_kernels.quantized_matmul import api as qmm
  from pallas_kernels.quantized_matmul.reference import pack_4bit
  x, perm, _ = draw(dict(m=3, k=160, perm=True))
  q = api.quantize_activations(x, bits=4, group_size=32, perm=perm, num_outliers=32)
  # W = [I_128 | 0] on the main part and [0 | I_32] on the tail, both with scale 1.
  eye = jnp.eye(160, dtype=jnp.int8)
  w_main = pack_4bit(eye[:, :128], 32)
  y = qmm.w4a4_matmul(q.codes, q.scales, w_main, jnp.ones((160, 4), jnp.float32),
                      q.outlier_codes, q.outlier_scales, eye[:, 128:],
                      jnp.ones((160, 1), jnp.float32), group_size=32,
                      out_dtype=jnp.float32, implementation="xla")
  want = ref.dequantize(q, bits=4, group_size=32)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(want))
  q8 = api.quantize_activations(x, bits=8)
  y8 = qmm.int8_matmul(q8.codes, q8.scales, jnp.eye(160, dtype=jnp.int8),
                       jnp.ones((160, 1), jnp.float32), out_dtype=jnp.float32,
                       implementation="xla")
  np.testing.assert_array_equal(np.asarray(y8),
                                np.asarray(ref.dequantize(q8, bits=8, group_size=160)))


def test_dispatch():
  x, _, _ = draw(dict(m=2, k=64))
  want = ref.quantize_activations(x, bits=8)
  for impl in (None, "xla", ("pallas_gpu", "xla")):
    out = api.quantize_activations(x, bits=8, implementation=impl, interpret=True)
    np.testing.assert_array_equal(np.asarray(out.codes), np.asarray(want.codes))
  with pytest.raises(ValueError, match="implementation='cuda'"):
    api.quantize_activations(x, bits=8, implementation="cuda")
  with pytest.raises(TypeError, match="TpuBlockSizes"):
    api.quantize_activations(x, bits=8, implementation="pallas_tpu",
                             block_sizes=BlockSizes(), interpret=pltpu.InterpretParams())
  with pytest.raises(NotImplementedError, match="block_m=12"):
    api.quantize_activations(jnp.ones((20, 64)), bits=8, implementation="pallas_tpu",
                             block_sizes=TpuBlockSizes(block_m=12),
                             interpret=pltpu.InterpretParams())


@pytest.mark.parametrize("kwargs,match", [
    (dict(x=jnp.ones((64,))), "x must be"),
    (dict(x=jnp.ones((2, 64), jnp.int8)), "x.dtype"),
    (dict(bits=3), "bits=3"),
    (dict(clip_ratio=0.0), "clip_ratio=0.0"),
    (dict(group_size=48), "group_size=48 does not divide"),
    (dict(group_size=32, num_outliers=16), "group_size=32 does not divide the 48"),
    (dict(bits=4, group_size=1), "group_size=1 must be even"),
    (dict(num_outliers=64), "num_outliers=64"),
    (dict(perm=jnp.arange(63, dtype=jnp.int32)), "perm must be int32 \\[64\\]"),
    (dict(perm=jnp.arange(64.0)), "perm must be int32"),
    (dict(rms_norm_weight=jnp.ones((32,))), "rms_norm_weight must be \\[64\\]"),
])
def test_bad_inputs_raise_naming_the_argument(kwargs, match):
  args = dict(x=jnp.ones((2, 64), jnp.float32), bits=8)
  args.update(kwargs)
  for impl in ("xla", "pallas_gpu"):
    with pytest.raises(ValueError, match=match):
      api.quantize_activations(implementation=impl, interpret=True, **args)


# ---------------------------------------------------------------------------------------
# Lowering checks for the real targets, where the CPU can lower them

sds = jax.ShapeDtypeStruct
BF16, I32 = jnp.bfloat16, jnp.int32
LOWERING_CASES = {
    "int8_token": (functools.partial(gpu.quantize_activations, bits=8),
                   (sds((4096, 4096), BF16),)),
    "atom_perm_tail_norm": (
        lambda x, p, w: gpu.quantize_activations(x, bits=4, group_size=128, clip_ratio=0.9,
                                                 perm=p, num_outliers=128,
                                                 rms_norm_weight=w),
        (sds((300, 4096), BF16), sds((4096,), I32), sds((4096,), BF16))),
    "int4_g112_tail16": (functools.partial(gpu.quantize_activations, bits=4, group_size=112,
                                           num_outliers=16),
                         (sds((7, 576), BF16),)),
}


@pytest.mark.parametrize("name", sorted(LOWERING_CASES))
def test_gpu_kernel_lowers_for_cuda(name):
  fn, args = LOWERING_CASES[name]
  assert_lowers_for_cuda(fn, args)


@pytest.mark.parametrize("name,fn,args", [
    ("int8_token", functools.partial(tpu.quantize_activations, bits=8),
     (sds((64, 4096), BF16),)),
    ("atom_perm_tail_norm",
     lambda x, p, w: tpu.quantize_activations(x, bits=4, group_size=128, clip_ratio=0.9,
                                              perm=p, num_outliers=128, rms_norm_weight=w),
     (sds((64, 4096), BF16), sds((4096,), I32), sds((4096,), BF16))),
])
def test_tpu_kernel_lowers_for_tpu(name, fn, args):
  del name
  assert_lowers_for_tpu(fn, args)
