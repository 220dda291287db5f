"""Hadamard matrices and transforms (lowbit.hadamard)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowbit.hadamard import (_factor, apply_hadamard, hadamard_factors, hadamard_matrix,
                             has_hadamard)

# The bases the brief names (156 and 172 need Williamson's construction: 2x them is built).
BASES = [12, 20, 28, 36, 40, 52, 60, 108, 140, 312, 344]
# Every order m * 2^k <= 14336 of those bases, every power of two up to 2^14, and the
# sizes models have.
SIZES = sorted({m << k for m in BASES for k in range(11) if m << k <= 14336} |
               {1 << k for k in range(15)} | {64, 96, 128, 192, 576, 640, 1536, 2048, 14336})
# For the transform itself: the largest size of each base, and 2^14.
LARGEST = sorted({max(n for n in SIZES if n % m == 0) for m in BASES} | {1 << 14})


@pytest.mark.parametrize("n", [64, 96, 128, 192, 576, 640, 1536, 2048, 14336])
def test_named_sizes_are_supported(n):
  assert has_hadamard(n) and np.prod(hadamard_factors(n)) == n


def test_factors_are_hadamard():
  # H_n is the Kronecker product of these factors, so this is H_n H_n^T = n I for all SIZES.
  orders = {m for n in SIZES for m in hadamard_factors(n)}
  assert {12, 20, 28, 36, 52, 60, 108, 140, 312, 344, 128} <= orders
  for m in orders:
    f = _factor(m)
    assert set(np.unique(f)) == {-1.0, 1.0}, m
    np.testing.assert_array_equal(f @ f.T, m * np.eye(m), err_msg=f"order {m}")


@pytest.mark.parametrize("n", [1, 2, 12, 20, 28, 36, 40, 52, 60, 96, 108, 140, 312, 344, 576,
                               640, 1536])
def test_dense_matrix_is_orthonormal_hadamard(n):
  h = np.asarray(hadamard_matrix(n), np.float64)
  np.testing.assert_allclose(np.abs(h), n**-0.5, rtol=1e-6)
  np.testing.assert_allclose(h @ h.T, np.eye(n), atol=1e-5)


@pytest.mark.parametrize("n,seed,transpose", [(12, None, False), (96, 3, False),
                                              (576, None, True), (640, 7, True),
                                              (1536, 1, False)])
def test_transform_matches_the_matrix(n, seed, transpose):
  rng = np.random.default_rng(n)
  x = rng.standard_normal((3, n, 2)).astype(np.float32)
  m = np.asarray(hadamard_matrix(n, seed=seed), np.float64)
  if transpose:
    m = m.T
  expected = np.einsum("ij,bjc->bic", m, x)
  got = jax.jit(lambda x: apply_hadamard(x, axis=1, seed=seed, transpose=transpose))(x)
  np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("n", LARGEST)
def test_large_sizes_preserve_norms_and_invert(n):
  x = np.random.default_rng(n).standard_normal((2, n)).astype(np.float32)

  @jax.jit
  def round_trip(x):
    y = apply_hadamard(x, seed=n)
    return y, apply_hadamard(y, seed=n, transpose=True)

  y, back = round_trip(x)
  np.testing.assert_allclose(jnp.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1),
                             rtol=1e-5)
  np.testing.assert_allclose(back, x, atol=2e-5)


def test_large_columns_are_orthonormal():
  # 14336 = 28 x 128 x 4: too big for a dense check, so take a few columns H e_i.
  n = 14336
  idx = np.array([0, 1, 27, 28, 511, 512, 9000, n - 1])
  units = np.zeros((len(idx), n), np.float32)
  units[np.arange(len(idx)), idx] = 1
  columns = apply_hadamard(units).T  # [n, 8]: column j is H e_idx[j]
  np.testing.assert_allclose(jnp.abs(columns), n**-0.5, rtol=1e-5)
  np.testing.assert_allclose(columns.T @ columns, np.eye(len(idx)), atol=1e-5)


def test_dtype_and_axis():
  x = jnp.asarray(np.random.default_rng(1).standard_normal((12, 5)), jnp.bfloat16)
  y = apply_hadamard(x, axis=0)
  assert y.dtype == jnp.bfloat16 and y.shape == (12, 5)
  np.testing.assert_allclose(np.asarray(y, np.float32),
                             np.asarray(hadamard_matrix(12)) @ np.asarray(x, np.float32),
                             atol=0.03)


@pytest.mark.parametrize("n", [0, 3, 6, 10, 92, 116, 156, 172, 184])
def test_unsupported_orders(n):
  assert not has_hadamard(n)
  with pytest.raises(ValueError, match=f"n={n}"):
    hadamard_matrix(n)
  with pytest.raises(ValueError, match=f"n={n}"):
    apply_hadamard(jnp.ones((2, max(n, 1))) if n else jnp.ones((2, 0)))
