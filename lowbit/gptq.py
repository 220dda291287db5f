"""GPTQ: quantize a weight column by column, pushing each column's rounding error onto the
columns not yet quantized, weighted by the inverse Hessian of the layer's inputs.

Motivation: RTN minimizes the weight error; GPTQ minimizes the output error ||X W^T -
X Wq^T|| on calibration inputs X, which is what perplexity feels (Atom, UniQL; SPEC.md 1.1
step 5 and 6.2). The grids are those of `lowbit.quantize` (RTN), so with nothing to
propagate (a diagonal Hessian) GPTQ returns RTN's QTensor bit for bit.

Algorithm (Frantar et al. 2022, "lazy batch" form): H = sum x x^T over calibration tokens;
dead inputs (H_jj = 0) get H_jj = 1 (they are rounded to nearest and neither pass nor
receive error; the reference zeroes their weight, which loses it for inputs calibration
never showed); H += damp * mean(diag H) * I; U = the upper Cholesky factor of H^-1. Columns
are quantized in blocks: inside a block the error of column j updates the block's later
columns at once, the other later columns receive the block's errors in one matmul at its
end. The grid (scale, zero) of a group is computed when its first column comes up, from
the current, error-updated weights of the whole group.

Terminology: *block* = columns updated lazily together (`block_size`, shrunk to a size
that tiles both the groups and the main width); *group* = columns sharing one grid.

Atom variant: with `num_outliers`, the trailing columns (after `perm`) are never rounded to
`bits`; they receive the propagated error of all the others and are then rounded to int8
per row, as the QTensor's outlier tail.

act_order: the main columns are quantized in order of decreasing H_jj (the tail stays
last). With groups, a group is then a run of consecutive columns in that order, so the
order becomes the QTensor's `perm` (composed with the input `perm`; the kernel gathers x
by it). With one group per row the grouping does not depend on the order, so the codes
are put back in the input layout and the QTensor is the same as without act_order apart
from the rounding.

The Hessian is factored on the host in float64 (scipy): calibration Hessians are
ill-conditioned and float32 Cholesky of the inverse loses the small directions; the column
loop runs jitted in float32 with lax loops.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

from lowbit.qtensor import QTensor
from lowbit.quantize import (assemble_qtensor, check_quant_args, check_weight, from_grid,
                             group_params, round_to_grid, weight_dtype_name)


def gptq_quantize(w: jax.Array, hessian, *, bits: int, group_size: int | None,
                  symmetric: bool, clip_ratio: float = 1.0, damp: float = 0.01,
                  block_size: int = 128, act_order: bool = False, num_outliers: int = 0,
                  perm=None, act_quant: str | None = None) -> QTensor:
  """GPTQ of a weight [N, K] (out, in) given the Hessian [K, K] = sum over calibration tokens
  of x x^T (in the original channel order). Other arguments as `quantize_weight`."""
  perm = check_weight(w, num_outliers=num_outliers, perm=perm, act_quant=act_quant)
  n, k = w.shape
  k_main = k - num_outliers
  g = check_quant_args(bits=bits, group_size=group_size, width=k_main, clip_ratio=clip_ratio)
  if block_size <= 0:
    raise ValueError(f"{block_size=} must be positive")
  h = np.asarray(hessian, np.float64)
  if h.shape != (k, k):
    raise ValueError(f"hessian must be [K, K] = {[k, k]}, got {list(h.shape)}")
  if not np.isfinite(h).all():
    raise ValueError("hessian has NaN or Inf entries")

  layout = np.arange(k, dtype=np.int32) if perm is None else perm
  order = layout
  if act_order:
    main = layout[:k_main]
    main = main[np.argsort(-np.diag(h)[main], kind="stable")]
    order = np.concatenate([main, layout[k_main:]])
  unpermute = None
  if act_order and g == k_main:
    # One group per row: put the codes back in the input layout (the j-th quantized column
    # sits at layout position `position[j]`).
    position = np.argsort(layout)[order[:k_main]]
    unpermute = np.argsort(position)
  elif act_order:
    layout = order
  layout = None if np.array_equal(layout, np.arange(k)) else layout.astype(np.int32)
  q, finite = _gptq(
      w, order, _inverse_cholesky(h[np.ix_(order, order)], damp), unpermute, layout,
      bits=bits, group_size=g, symmetric=bool(symmetric), clip_ratio=float(clip_ratio),
      block=_block_width(k_main, g, block_size), k_main=k_main)
  if not finite:
    raise ValueError("weight has NaN or Inf entries")
  return dataclasses.replace(q, dtype=weight_dtype_name(w), act_quant=act_quant)


def _block_width(k_main: int, group_size: int, block_size: int) -> int:
  """The largest width <= block_size that divides the main width and either holds whole
  groups or divides a group, so every group starts at a block start or lies inside one
  block. It batches the work and never changes the result."""
  return max(d for d in range(1, block_size + 1)
             if k_main % d == 0 and (d % group_size == 0 or group_size % d == 0))


def _inverse_cholesky(h: np.ndarray, damp: float) -> np.ndarray:
  """Upper Cholesky factor U of (H + damping)^-1 (so H^-1 = U^T U), float32 [K, K]."""
  if damp < 0:
    raise ValueError(f"{damp=} must be >= 0")
  h = h.copy()
  diag = np.diag(h).copy()
  dead = diag == 0
  diag[dead] = 1.0
  diag += damp * np.mean(diag)
  np.fill_diagonal(h, diag)
  try:
    lower = scipy.linalg.cholesky(h, lower=True)
  except np.linalg.LinAlgError as e:
    raise ValueError(f"hessian is not positive definite with {damp=}; raise damp") from e
  h_inv = scipy.linalg.cho_solve((lower, True), np.eye(len(h)))
  return scipy.linalg.cholesky(h_inv, lower=False).astype(np.float32)


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "symmetric", "clip_ratio",
                                             "block", "k_main"))
def _gptq(w, order, u, unpermute, layout, *, bits, group_size, symmetric, clip_ratio, block,
          k_main):
  """w [N, K] quantized in `order` with u [K, K] (in that order) -> (QTensor of layout
  `layout`, its codes taken through `unpermute` when given; whether w is finite)."""
  finite = jnp.isfinite(w).all()
  w = w.astype(jnp.float32)[:, order]
  codes, scales, zeros, w = _gptq_columns(w, u, bits=bits, group_size=group_size,
                                          symmetric=symmetric, clip_ratio=clip_ratio,
                                          block=block, k_main=k_main)
  if unpermute is not None:
    codes = codes[:, unpermute]
  return assemble_qtensor(codes, scales, zeros, w[:, k_main:], layout, bits=bits,
                          group_size=group_size), finite


def _gptq_columns(w, u, *, bits, group_size, symmetric, clip_ratio, block, k_main):
  """w [N, K], u [K, K] upper, both in quantization order -> (codes [N, K_main] float,
  scales and zeros [N, K_main // g] (zeros None when symmetric), w with the error propagated
  into its columns >= K_main)."""
  n, _ = w.shape
  g = group_size
  seg = min(g, block)  # columns of one block that share a grid
  quant = dict(bits=bits, symmetric=symmetric, clip_ratio=clip_ratio)

  def block_step(b, carry):
    w, codes, scales, zeros, grid = carry
    i1 = b * block
    w1 = jax.lax.dynamic_slice_in_dim(w, i1, block, axis=1)  # [N, B]
    u1 = jax.lax.dynamic_slice(u, (i1, i1), (block, block))  # [B, B], upper

    def segment_step(s, carry):
      w1, q1, e1, scales, zeros, grid = carry
      start = s * seg
      col = i1 + start
      if g <= block:  # the group lies inside this block: read its current weights from w1
        grid = group_params(jax.lax.dynamic_slice_in_dim(w1, start, g, axis=1), **quant)
      else:  # a group spans blocks and starts at a block start, where w is current
        grid = jax.lax.cond(
            col % g == 0,
            lambda: group_params(jax.lax.dynamic_slice_in_dim(w, i1, g, axis=1), **quant),
            lambda: grid)
      scale, zero = grid
      scales = jax.lax.dynamic_update_slice(scales, scale, (0, col // g))
      if zero is not None:
        zeros = jax.lax.dynamic_update_slice(zeros, zero, (0, col // g))

      def column_step(i, carry):
        w1, q1, e1 = carry
        j = start + i
        x = jax.lax.dynamic_slice_in_dim(w1, j, 1, axis=1)  # [N, 1]
        code = round_to_grid(x, scale, zero, bits=bits)
        err = (x - from_grid(code, scale, zero)) / u1[j, j]
        # U is upper triangular: this touches columns >= j of the block only.
        w1 = w1 - err * u1[j][None, :]
        q1 = jax.lax.dynamic_update_slice(q1, code, (0, j))
        e1 = jax.lax.dynamic_update_slice(e1, err, (0, j))
        return w1, q1, e1

      w1, q1, e1 = jax.lax.fori_loop(0, seg, column_step, (w1, q1, e1))
      return w1, q1, e1, scales, zeros, grid

    zeros_block = jnp.zeros((n, block), jnp.float32)
    _, q1, e1, scales, zeros, grid = jax.lax.fori_loop(
        0, block // seg, segment_step, (w1, zeros_block, zeros_block, scales, zeros, grid))
    # Lazy update of every later column (rows i1.. of U are zero left of the diagonal; the
    # block's own columns are changed too but never read again).
    u_rows = jax.lax.dynamic_slice_in_dim(u, i1, block, axis=0)  # [B, K]
    w = w - jnp.matmul(e1, u_rows, precision=jax.lax.Precision.HIGHEST)
    codes = jax.lax.dynamic_update_slice(codes, q1, (0, i1))
    return w, codes, scales, zeros, grid

  num_groups = k_main // g
  scales = jnp.ones((n, num_groups), jnp.float32)
  zeros = None if symmetric else jnp.zeros((n, num_groups), jnp.float32)
  grid = (jnp.ones((n, 1), jnp.float32), None if symmetric else jnp.zeros((n, 1), jnp.float32))
  carry = (w, jnp.zeros((n, k_main), jnp.float32), scales, zeros, grid)
  w, codes, scales, zeros, _ = jax.lax.fori_loop(0, k_main // block, block_step, carry)
  return codes, scales, zeros, w
