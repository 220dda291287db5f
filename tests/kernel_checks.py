"""Checks that every kernel test file shares: the relative error of a result, and the
lowering of a Pallas kernel for the GPU (Triton) and TPU (Mosaic) targets on the CPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest


def rel_err(out, want) -> float:
  """||out - want|| / ||want|| in float64; fails on any non-finite value in `out`."""
  a = np.asarray(jnp.asarray(out, jnp.float32), np.float64)
  b = np.asarray(jnp.asarray(want, jnp.float32) if isinstance(want, jax.Array) else want,
                 np.float64)
  assert np.all(np.isfinite(a)), "non-finite values in the result"
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def assert_lowers_for_cuda(fn, args) -> None:
  """`fn(*args)` lowers to a Triton kernel call for CUDA (skipped where this jaxlib, >= 0.11,
  compiles the Triton IR while lowering, which needs the CUDA plugin)."""
  try:
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  except Exception as e:  # pylint: disable=broad-except
    message = str(e).lower()
    if "gpu" in message and "triton" in message or "cuda" in message:
      pytest.skip(f"this jaxlib cannot lower Triton kernels without a GPU: {e}")
    raise
  assert "triton" in text


def assert_lowers_for_tpu(fn, args) -> None:
  """`fn(*args)` lowers to a Mosaic TPU custom call."""
  text = jax.jit(fn).trace(*args).lower(lowering_platforms=("tpu",)).as_text()
  assert "tpu_custom_call" in text
