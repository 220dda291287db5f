"""RTN weight quantization and fake quantization (lowbit.quantize)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowbit.qtensor import codes_of, dequantize, validate
from lowbit.quantize import fake_quantize, fit_group_size, quantize_weight

# Quantization-error budget: relative mean absolute error of a Gaussian weight after RTN,
# group 64, clip 1 (measured: 0.74 / 0.50 sym / asym at 2 bits, 0.26 / 0.21 at 3,
# 0.11 / 0.096 at 4, 0.052 / 0.046 at 5, 0.0061 / 0.0057 at 8).
REL_MAE = {2: 0.9, 3: 0.32, 4: 0.14, 5: 0.065, 8: 0.0075}


def _weight(seed, shape=(24, 256), dtype=np.float32):
  return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def _rel_mae(approx, exact):
  return float(np.mean(np.abs(np.asarray(approx, np.float64) - exact)) / np.mean(np.abs(exact)))


def _numpy_rtn(w, bits, g, symmetric, clip):
  """Independent float32 numpy oracle of the grids in lowbit.quantize's docstring."""
  x = w.astype(np.float32).reshape(w.shape[0], -1, g)
  if symmetric:
    scale = np.abs(x).max(-1, keepdims=True) * np.float32(clip / (2**(bits - 1) - 1))
    return np.clip(np.round(x / scale), -2**(bits - 1), 2**(bits - 1) - 1), scale, None
  hi, lo = x.max(-1, keepdims=True), x.min(-1, keepdims=True)
  scale = (hi - lo) * np.float32(clip / (2**bits - 1))
  zero = np.round(lo * np.float32(-clip) / scale)
  return np.clip(np.round(x / scale) + zero, 0, 2**bits - 1), scale, zero


def test_golden_symmetric_4bit():
  # absmax 1.4 -> scale 1.4 / 7 = 0.2; 1.4, -0.62, 0.26, -1.4 -> 7, -3.1, 1.3, -7 -> 7, -3, 1, -7
  q = quantize_weight(np.array([[1.4, -0.62, 0.26, -1.4]], np.float32), bits=4, group_size=4,
                      symmetric=True)
  np.testing.assert_array_equal(codes_of(q), [[7, -3, 1, -7]])
  np.testing.assert_allclose(q.scales, [[0.2]], rtol=1e-6)
  # clip 0.5 -> scale 0.1: 14 and -14 clip to 7 and -8 (the code only clipping reaches).
  q = quantize_weight(np.array([[1.4, -0.62, 0.26, -1.4]], np.float32), bits=4, group_size=4,
                      symmetric=True, clip_ratio=0.5)
  np.testing.assert_array_equal(codes_of(q), [[7, -6, 3, -8]])


def test_golden_asymmetric_4bit():
  # range [-1, 2] -> scale 3 / 15 = 0.2, zero round(1 / 0.2) = 5;
  # -1, 0.45, 2, 0 -> -5 + 5, 2.25 + 5, 10 + 5, 0 + 5 -> 0, 7, 15, 5.
  q = quantize_weight(np.array([[-1.0, 0.45, 2.0, 0.0]], np.float32), bits=4, group_size=4,
                      symmetric=False)
  np.testing.assert_array_equal(codes_of(q), [[0, 7, 15, 5]])
  np.testing.assert_allclose(q.zeros, [[5.0]])
  assert q.codes.dtype == jnp.uint8


@pytest.mark.parametrize("bits,symmetric,group_size", [
    *[(b, s, 64) for b in (2, 3, 4, 5, 8) for s in (True, False)],
    (4, True, None), (4, False, None), (8, True, None)])
def test_rtn_matches_numpy_oracle_and_error_bound(bits, symmetric, group_size):
  w = _weight(bits)
  q = quantize_weight(w, bits=bits, group_size=group_size, symmetric=symmetric)
  validate(q)
  g = group_size or w.shape[1]
  codes, scale, zero = _numpy_rtn(w, bits, g, symmetric, 1.0)
  np.testing.assert_array_equal(np.asarray(codes_of(q)), codes.reshape(w.shape))
  np.testing.assert_array_equal(q.scales, scale[..., 0])
  if not symmetric:
    np.testing.assert_array_equal(q.zeros, zero[..., 0])
  # Round to nearest without clipping: every entry within half a step of its grid point.
  err = np.abs(np.asarray(dequantize(q)) - w).reshape(w.shape[0], -1, g)
  assert (err <= scale / 2 * (1 + 1e-5)).all()
  if group_size == 64:
    assert _rel_mae(dequantize(q), w) < REL_MAE[bits]


def test_outliers_and_perm():
  w = _weight(1, (16, 200))
  perm = np.random.default_rng(2).permutation(200)
  q = quantize_weight(w, bits=4, group_size=32, symmetric=False, clip_ratio=0.9,
                      num_outliers=8, perm=perm, act_quant="int4_group")
  validate(q)
  assert q.shape == (16, 200) and q.num_outliers == 8 and q.act_quant == "int4_group"
  stored = w[:, perm]
  codes, scale, zero = _numpy_rtn(stored[:, :192], 4, 32, False, 0.9)
  np.testing.assert_array_equal(np.asarray(codes_of(q)), codes.reshape(16, 192))
  tail_scale = np.abs(stored[:, 192:]).max(1, keepdims=True) * np.float32(1 / 127)
  np.testing.assert_array_equal(q.outlier_codes, np.round(stored[:, 192:] / tail_scale))
  np.testing.assert_array_equal(q.outlier_scales, tail_scale)
  # dequantize puts the columns back in the original order.
  deq = np.asarray(dequantize(q))
  np.testing.assert_allclose(deq[:, perm[192:]], stored[:, 192:], atol=float(tail_scale.max()))
  assert _rel_mae(deq, w) < REL_MAE[4] * 1.5  # clip 0.9 costs a little on Gaussian weights


def test_constant_and_zero_groups_are_exact():
  w = np.array([[0.5] * 4 + [0.0] * 4, [-0.3] * 4 + [1.0, 1.0, 1.0, 1.0]], np.float32)
  for symmetric in (True, False):
    q = quantize_weight(w, bits=4, group_size=4, symmetric=symmetric)
    np.testing.assert_allclose(dequantize(q), w, rtol=1e-6)


def test_dtype_is_recorded():
  w = jnp.asarray(_weight(3, (8, 64)), jnp.bfloat16)
  q = quantize_weight(w, bits=8, group_size=None, symmetric=True)
  assert q.dtype == "bfloat16" and dequantize(q).dtype == jnp.bfloat16


@pytest.mark.parametrize("width,requested,expected", [
    (576, 128, 96), (4096, 128, 128), (1536, 128, 128), (100, 128, 100), (90, 64, 30),
    (64, 128, 64), (7, 4, 1)])
def test_fit_group_size(width, requested, expected):
  assert fit_group_size(width, requested) == expected


@pytest.mark.parametrize("kwargs,match", [
    (dict(bits=1), "bits=1"), (dict(bits=9), "bits=9"),
    (dict(group_size=48), "group_size=48 does not divide the 64.*= 32 does"),
    (dict(group_size=0), "group_size=0"), (dict(bits=4, group_size=1), "even"),
    (dict(clip_ratio=0.0), "clip_ratio"), (dict(num_outliers=64), "num_outliers=64"),
    (dict(perm=np.arange(63)), "perm"), (dict(perm=np.zeros(64, int)), "perm"),
    (dict(act_quant="fp8"), "act_quant='fp8'")])
def test_argument_errors(kwargs, match):
  args = {**dict(bits=4, group_size=32, symmetric=True), **kwargs}
  with pytest.raises(ValueError, match=match):
    quantize_weight(_weight(4, (8, 64)), **args)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_weight(bad):
  w = _weight(5, (8, 64))
  w[3, 7] = bad
  with pytest.raises(ValueError, match="NaN or Inf"):
    quantize_weight(w, bits=4, group_size=32, symmetric=True)


@pytest.mark.parametrize("symmetric", [True, False])
def test_fake_quantize_matches_weight_quantizer(symmetric):
  # The activation path (traced, any leading shape) and the weight path share the grids.
  x = _weight(6, (3, 5, 160))
  args = dict(bits=4, group_size=32, symmetric=symmetric, clip_ratio=0.9)
  fq = jax.jit(lambda x: fake_quantize(x, num_outliers=32, **args))(x)
  q = quantize_weight(x.reshape(15, 160), num_outliers=32, **args)
  np.testing.assert_array_equal(fq, np.asarray(dequantize(q)).reshape(x.shape))


def test_fake_quantize_per_token_kv_style():
  # KV cache: 4-bit asymmetric per (token, head), group = head_dim.
  kv = jnp.asarray(_weight(7, (2, 9, 4, 16)), jnp.bfloat16)
  fq = fake_quantize(kv, bits=4, group_size=16, symmetric=False)
  assert fq.dtype == jnp.bfloat16 and fq.shape == kv.shape
  x = np.asarray(kv, np.float32)
  step = (x.max(-1, keepdims=True) - x.min(-1, keepdims=True)) / 15
  # Half a step of rounding plus bfloat16 rounding of the result.
  assert (np.abs(np.asarray(fq, np.float32) - x) <= step / 2 + np.abs(x) / 128 + 1e-6).all()
