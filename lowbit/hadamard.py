"""Orthonormal Hadamard transforms of the sizes LLMs have (64, 576, 1536, 14336, ...).

Motivation: rotating activations, KV latents or the residual stream by a Hadamard matrix
spreads outliers over all channels before quantization (QuaRot; Palu's latents, xKV's
factors, UniQL's residual stream; SPEC.md 6.6). Sizes are often not powers of two.

Construction: H_n is a Kronecker product of small +-1 factors, scaled by 1/sqrt(n):
  * Sylvester: 2^k (split into factors of at most 128).
  * Paley I: order q + 1 for a prime power q = 3 mod 4 (12, 20, 28, 60, 108, 140, ...).
  * Paley II: order 2 (q + 1) for a prime power q = 1 mod 4 (36, 52, 76, ...).
The factor list is found by trying the smallest non-power-of-two base that divides n first,
so 576 = 12 x 12 x 4, 1536 = 12 x 128, 14336 = 28 x 128 x 4, 640 = 20 x 32. Orders 156
and 172 themselves need Williamson's construction and are not built (312 = 156 x 2 and
344 = 172 x 2 are Paley orders and are). The matrices are valid Hadamard matrices but not
the tables QuaRot pastes, so rotations baked by other tools cannot be undone with these.

`apply_hadamard` reshapes the transformed axis into the factors and applies each one: the
cost per element is the sum of the factor orders (160 at 14336), not n.
The randomized variant (QuaRot) is M = H diag(s) with seeded +-1 signs s.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

# Largest Sylvester factor: a 128 x 128 matmul fills an MXU / tensor-core tile.
_MAX_SYLVESTER = 128
# Largest Paley base built: its transform is a dense [m, m] matmul, past this no longer fast.
_MAX_BASE = 4096


def has_hadamard(n: int) -> bool:
  """Whether `hadamard_matrix(n)` / `apply_hadamard` can build order n."""
  return _plan(n) is not None


def hadamard_factors(n: int) -> tuple[int, ...]:
  """Orders of the Kronecker factors of H_n, outermost first (() for n = 1)."""
  plan = _plan(n)
  if plan is None:
    raise ValueError(
        f"no Hadamard matrix of order {n=}: buildable orders are 1, 2 and multiples of 4 "
        f"that are products of 2^k and Paley orders (q + 1 with q = 3 mod 4, 2 (q + 1) with "
        f"q = 1 mod 4, q a prime power, at most {_MAX_BASE})")
  return plan


def random_signs(n: int, seed: int) -> np.ndarray:
  """Seeded +-1 float32 signs [n] of the randomized transform (numpy: same on every host)."""
  return (np.random.default_rng(seed).integers(0, 2, n) * 2 - 1).astype(np.float32)


def hadamard_matrix(n: int, *, seed: int | None = None) -> jax.Array:
  """The orthonormal H_n float32 [n, n], or H_n diag(random_signs(n, seed)) with a seed."""
  h = np.ones((1, 1), np.float32)
  for m in hadamard_factors(n):
    h = np.kron(h, _factor(m))
  h /= np.sqrt(np.float32(n))
  if seed is not None:
    h *= random_signs(n, seed)
  return jnp.asarray(h)


def apply_hadamard(x: jax.Array, axis: int = -1, *, seed: int | None = None,
                   transpose: bool = False) -> jax.Array:
  """M @ x along `axis` (M = hadamard_matrix(n, seed=seed), n = x.shape[axis]); M.T @ x with
  `transpose`, the inverse. Computed in float32, returned in x's dtype. Traceable."""
  n = x.shape[axis]
  factors = hadamard_factors(n)
  y = jnp.moveaxis(x, axis, -1).astype(jnp.float32)
  lead = y.shape[:-1]
  signs = None if seed is None else jnp.asarray(random_signs(n, seed))
  if signs is not None and not transpose:
    y = y * signs
  y = y.reshape(-1, *factors)  # [B, m1, .., mk], row-major as np.kron orders the factors
  for i, m in enumerate(factors):
    f = _factor(m).T if transpose else _factor(m)
    # Factor i acts on axis i + 1: y[.., a, ..] <- sum_b f[a, b] y[.., b, ..].
    y = jnp.moveaxis(jnp.tensordot(y, f, axes=((i + 1,), (1,)),
                                   precision=jax.lax.Precision.HIGHEST), -1, i + 1)
  y = y.reshape(*lead, n) * np.float32(1 / math.sqrt(n))
  if signs is not None and transpose:
    y = y * signs
  return jnp.moveaxis(y, -1, axis).astype(x.dtype)


@functools.cache
def _plan(n: int) -> tuple[int, ...] | None:
  """Kronecker factor orders of H_n (the smallest Paley base first), or None if unbuildable."""
  if n < 1:
    return None
  if n & (n - 1) == 0:  # a power of two
    k = n.bit_length() - 1
    top = _MAX_SYLVESTER.bit_length() - 1
    return (_MAX_SYLVESTER,) * (k // top) + ((2**(k % top),) if k % top else ())
  for m in range(4, min(n, _MAX_BASE) + 1, 4):
    if n % m == 0 and m & (m - 1) and _paley_q(m) is not None:
      rest = _plan(n // m)
      if rest is not None:
        return (m,) + rest
  return None


def _paley_q(m: int) -> int | None:
  """The prime power q whose Paley construction (I, then II) has order m, if any."""
  if _prime_power(m - 1) and (m - 1) % 4 == 3:
    return m - 1
  if m % 2 == 0 and _prime_power(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
    return m // 2 - 1
  return None


@functools.cache
def _factor(m: int) -> np.ndarray:
  """The +-1 factor of order m (float32, read-only): Sylvester or Paley."""
  if m & (m - 1) == 0:
    h = np.ones((1, 1))
    for _ in range(m.bit_length() - 1):
      h = np.block([[h, h], [h, -h]])
  else:
    h = _paley(_paley_q(m))
  h = h.astype(np.float32)
  h.setflags(write=False)
  return h


def _paley(q: int) -> np.ndarray:
  """Paley I (q = 3 mod 4, order q + 1) or II (q = 1 mod 4, order 2 (q + 1)), +-1 entries."""
  jacobsthal = _jacobsthal(q)  # chi(a_i - a_j); skew when q = 3 mod 4, symmetric otherwise
  ones = np.ones(q)
  if q % 4 == 3:
    # H = I + S with S = [[0, 1^T], [-1, Q]] skew and S S^T = q I, so H H^T = (q + 1) I.
    s = np.block([[np.zeros((1, 1)), ones[None]], [-ones[:, None], jacobsthal]])
    return np.eye(q + 1) + s
  # C = [[0, 1^T], [1, Q]] is a symmetric conference matrix (C C^T = q I); replacing its
  # zeros by [[1, -1], [-1, -1]] and its +-1 by +-[[1, 1], [1, -1]] gives H H^T = 2(q+1) I.
  c = np.block([[np.zeros((1, 1)), ones[None]], [ones[:, None], jacobsthal]])
  return (np.kron(c, np.array([[1, 1], [1, -1]])) +
          np.kron(np.eye(q + 1), np.array([[1, -1], [-1, -1]])))


def _prime_power(q: int) -> tuple[int, int] | None:
  """(p, e) with q = p**e for a prime p, or None."""
  if q < 2:
    return None
  p = next(d for d in range(2, q + 1) if q % d == 0)  # the smallest prime factor
  e = 0
  while q % p == 0:
    q //= p
    e += 1
  return (p, e) if q == 1 else None


def _jacobsthal(q: int) -> np.ndarray:
  """Q[i, j] = chi(a_i - a_j) over GF(q), chi the quadratic character; float [q, q].

  Elements are vectors of e base-p digits (polynomials mod an irreducible of degree e), so
  subtraction is digit-wise and multiplication is only needed to list the squares.
  """
  p, e = _prime_power(q)
  powers = p ** np.arange(e)
  digits = (np.arange(q)[:, None] // powers) % p  # [q, e], low degree first
  modulus = _irreducible(p, e)
  squares = {int(_poly_mod(np.convolve(d, d), modulus, p) @ powers) for d in digits}
  chi = np.where(np.isin(np.arange(q), list(squares)), 1.0, -1.0)
  chi[0] = 0.0
  difference = ((digits[:, None, :] - digits[None, :, :]) % p) @ powers  # [q, q]
  return chi[difference]


def _irreducible(p: int, e: int) -> np.ndarray:
  """The first monic irreducible polynomial of degree e over GF(p) (coefficients low first)."""
  def monic(degree, index):
    return np.append((index // p ** np.arange(degree)) % p, 1)

  for index in range(p**e):
    f = monic(e, index)
    if not any(not _poly_mod(f, monic(d, i), p).any()
               for d in range(1, e // 2 + 1) for i in range(p**d)):
      return f
  raise AssertionError(f"GF({p}) has irreducible polynomials of every degree, {e=}")


def _poly_mod(a: np.ndarray, modulus: np.ndarray, p: int) -> np.ndarray:
  """a mod a monic modulus over GF(p), padded to deg(modulus) coefficients (low first)."""
  a = np.asarray(a, np.int64) % p
  d = len(modulus) - 1
  a = np.concatenate([a, np.zeros(max(d - len(a), 0), np.int64)])
  for top in range(len(a) - 1, d - 1, -1):
    a[top - d: top + 1] = (a[top - d: top + 1] - a[top] * modulus) % p
  return a[:d]
