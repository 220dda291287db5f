"""The integer path of `qtensor_linear` (W8A8 and Atom W4A4) against the simulation, on CPU.

`qtensor_linear` takes the integer path on GPU / TPU backends only; these tests force it
by calling `integer_linear` with the XLA references (and once with the Pallas kernels in
interpret mode). Integer products are exact, so the two paths differ only by the float
rounding of the rescale and of the simulation's float32 dot: a tight budget.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowbit import nn
from lowbit.calibration import LinearStats
from lowbit.qtensor import QTensor
from lowbit.recipes import get_recipe, settings_of

# Relative (Frobenius) difference, integer path vs simulation, float32 inputs.
BUDGET = 1e-5


def make_qtensor(recipe: str, n: int, k: int, seed: int, **settings) -> QTensor:
  """A QTensor for a random [n, k] weight, made by the recipe's own quantize function
  (with calibration statistics from random inputs whose channels have uneven scales)."""
  rng = np.random.default_rng(seed)
  w = jnp.asarray(rng.normal(size=(n, k)).astype(np.float32) / np.sqrt(k))
  x = rng.normal(size=(64, k)) * rng.uniform(0.1, 4.0, size=k)
  stats = LinearStats(hessian=(x.T @ x).astype(np.float32), tokens=64)
  opts = settings_of(recipe, settings)
  del opts["kv_cache"]
  quantize = get_recipe(recipe).make(k, **opts)
  return quantize("layers.0.mlp.up_proj", w, stats)


def inputs(shape, seed):
  rng = np.random.default_rng(seed)
  k = shape[-1]
  # Uneven channel scales: outlier channels for the tail, varied group maxima.
  return jnp.asarray((rng.normal(size=shape) * rng.uniform(0.1, 4.0, size=k))
                     .astype(np.float32))


def simulate(x, q):
  """The simulation path of qtensor_linear (what runs on the CPU)."""
  assert jax.default_backend() == "cpu"
  return nn.qtensor_linear(x, q)


def rel_diff(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


CASES = {
    "w8a8": ("w8a8", 48, 96, {}),
    "w8a8_clip": ("w8a8", 40, 64, {"act_clip": 0.9}),
    # group 32 on 112 - 16 = 96 channels, an 16-channel int8 tail, perm, GPTQ, clip 0.9
    "atom": ("atom-w4a4", 48, 112, {"group_size": 32, "num_outliers": 16}),
    # no tail: groups of 64 over the whole (permuted) width
    "atom_no_tail": ("atom-w4a4", 32, 128, {"group_size": 64, "num_outliers": 0,
                                            "gptq": False}),
}


@pytest.mark.parametrize("lead", [(5,), (2, 3)], ids=["2d", "3d"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_integer_path_matches_simulation(case, lead):
  recipe, n, k, settings = CASES[case]
  q = make_qtensor(recipe, n, k, seed=len(case), **settings)
  assert nn.integer_format(q) == ("w8a8" if recipe == "w8a8" else "w4a4")
  x = inputs((*lead, k), seed=k)
  want = simulate(x, q)
  got = nn.integer_linear(x, q, implementation="xla")
  assert got.shape == (*lead, n) and got.dtype == want.dtype
  assert rel_diff(got, want) < BUDGET


def test_integer_path_through_pallas_kernels_in_interpret_mode():
  q = make_qtensor("atom-w4a4", 32, 112, seed=3, group_size=32, num_outliers=16)
  x = inputs((2, 3, 112), seed=4)
  got = nn.integer_linear(x, q, implementation="pallas_gpu", interpret=True)
  assert rel_diff(got, simulate(x, q)) < BUDGET


def test_integer_path_through_mosaic_w4a4_kernel_in_interpret_mode():
  """Groups of 64 and a 32-channel tail: a layout the Mosaic GPU kernel serves (its
  quantizer stays the XLA reference)."""
  q = make_qtensor("atom-w4a4", 64, 160, seed=5, group_size=64, num_outliers=32)
  x = inputs((3, 160), seed=6)
  got = nn.integer_linear(x, q, implementation="xla", matmul_implementation="mosaic_gpu",
                          interpret=True)
  assert rel_diff(got, simulate(x, q)) < BUDGET


def test_integer_path_through_mosaic_int8_kernel_in_interpret_mode():
  """W8A8 through the Mosaic GPU int8 kernel (one 128-wide tile of N, K = 256, 3 padded
  tokens), with the float32 output a float32 model asks for."""
  q = make_qtensor("w8a8", 128, 256, seed=7)
  x = inputs((3, 256), seed=8)
  got = nn.integer_linear(x, q, implementation="xla", matmul_implementation="mosaic_gpu",
                          interpret=True)
  assert got.dtype == jnp.float32
  assert rel_diff(got, simulate(x, q)) < BUDGET


def test_gpu_backend_tries_the_w4a4_kernels(monkeypatch):
  """On a GPU, W4A4 goes to the Mosaic GPU kernel, then Triton, never XLA's group loop."""
  q = make_qtensor("atom-w4a4", 32, 112, seed=3, group_size=32, num_outliers=16)
  seen = {}

  def integer_linear(x, q, **kwargs):
    seen.update(kwargs)
    raise NotImplementedError("no kernel here")
  monkeypatch.setattr(nn.jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(nn, "integer_linear", integer_linear)
  x = inputs((2, 112), seed=4)
  out = nn.qtensor_linear(x, q)  # falls back to the simulation
  assert seen == {"matmul_implementation": ("mosaic_gpu", "pallas_gpu")}
  monkeypatch.undo()
  np.testing.assert_allclose(out, simulate(x, q), rtol=1e-6, atol=1e-6)


def test_integer_format_refuses_other_layouts():
  q = make_qtensor("w8a8", 16, 64, seed=0)
  assert nn.integer_format(dataclasses.replace(q, act_quant=None)) is None
  assert nn.integer_format(dataclasses.replace(q, act_quant="int4_token")) is None
  rtn = make_qtensor("rtn", 16, 64, seed=0, group_size=32)  # asymmetric, weight-only
  assert nn.integer_format(rtn) is None
  with pytest.raises(ValueError, match="has no integer kernel"):
    nn.integer_linear(jnp.ones((2, 64)), rtn)


def test_cpu_backend_runs_the_simulation(monkeypatch):
  """On the CPU, qtensor_linear never calls the integer path."""
  q = make_qtensor("w8a8", 16, 64, seed=1)

  def fail(*args, **kwargs):
    raise AssertionError("integer path used on the CPU")
  monkeypatch.setattr(nn, "integer_linear", fail)
  nn.qtensor_linear(inputs((3, 64), seed=1), q)
