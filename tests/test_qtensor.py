"""The QTensor format: packing, validation, QTensor leaves in Linear and in a model, sharding."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lowbit.hadamard import hadamard_matrix, has_hadamard
from lowbit.nn import linear
from lowbit.qtensor import dequantize, pack_4bit, unpack_4bit, validate
from lowbit.quantize import fake_quantize, quantize_weight
from models.config import for_architecture
from models.loading import from_params, parameter_shapes

# Implementation budget (QTensor matmul vs the float64 product of the same dequantized
# weight): float32 rounding of a K-term dot product, relative to sum_k |x_k w_k|.
IMPL_RTOL = 1e-5
# Quantization budget: relative error of the logits of a model with every linear weight
# quantized as in _QUANT against the float model (measured 0.23; 4-bit with groups of 8-16
# on 32 channels dominates).
MODEL_REL_ERR = 0.35


def _rng(seed):
  return np.random.default_rng(seed)


def _assert_dot_close(y, x, w):
  """y ~ x @ w.T within IMPL_RTOL of the sum of the products' magnitudes."""
  x = np.asarray(x, np.float64)
  assert (np.abs(np.asarray(y) - x @ w.T) <= IMPL_RTOL * (np.abs(x) @ np.abs(w).T)).all()


def test_pack_layout_golden():
  # Group of 4: byte j = code j (low nibble) | code j + 2 (high nibble).
  codes = np.array([[1, -2, 7, -8, 3, 0, -1, 5]], np.int8)
  packed = np.asarray(pack_4bit(jnp.asarray(codes), 4))
  # 1 | 7 << 4 = 0x71; -2 | -8 << 4 = 0x8E; 3 | -1 << 4 = 0xF3; 0 | 5 << 4 = 0x50.
  assert packed.view(np.uint8).tolist() == [[0x71, 0x8E, 0xF3, 0x50]]


@pytest.mark.parametrize("dtype,low,high", [(np.int8, -8, 8), (np.uint8, 0, 16)])
def test_pack_round_trip(dtype, low, high):
  codes = _rng(0).integers(low, high, (6, 96)).astype(dtype)
  packed = pack_4bit(jnp.asarray(codes), 32)
  assert packed.shape == (6, 48) and packed.dtype == dtype
  np.testing.assert_array_equal(unpack_4bit(packed, 32), codes)


def test_validate_names_the_broken_invariant():
  q = quantize_weight(_rng(1).standard_normal((8, 72)).astype(np.float32), bits=4,
                      group_size=32, symmetric=False, num_outliers=8)
  validate(q)
  broken = {
      "scales": dataclasses.replace(q, scales=q.scales[:, :1]),
      "zeros": dataclasses.replace(q, zeros=q.zeros.astype(jnp.int32)),
      "outlier_codes": dataclasses.replace(q, outlier_codes=None),
      "perm": dataclasses.replace(q, perm=jnp.zeros(72, jnp.int32)),
      "act_quant": dataclasses.replace(q, act_quant="fp8"),
      "bits": dataclasses.replace(q, bits=9),
  }
  for name, bad in broken.items():
    with pytest.raises(ValueError, match=name):
      validate(bad)


@pytest.mark.parametrize("kwargs", [
    dict(bits=4, group_size=32, symmetric=True),
    dict(bits=4, group_size=32, symmetric=False, num_outliers=32, perm="random"),
    dict(bits=8, group_size=None, symmetric=True),
])
def test_linear_with_qtensor(kwargs):
  rng = _rng(2)
  w = rng.standard_normal((48, 160)).astype(np.float32)
  x = rng.standard_normal((2, 5, 160)).astype(np.float32)
  if kwargs.get("perm") == "random":
    kwargs = dict(kwargs, perm=rng.permutation(160))
  q = quantize_weight(w, **kwargs)
  y = np.asarray(jax.jit(linear)(x, q))
  deq = np.asarray(dequantize(q), np.float64)
  # Implementation: the same dequantized weight in float64.
  _assert_dot_close(y, x, deq)
  # Quantization: against the float weight.
  exact = x @ w.T.astype(np.float64)
  rel = np.linalg.norm(y - exact) / np.linalg.norm(exact)
  assert rel < (0.15 if kwargs["bits"] == 4 else 0.01)


@pytest.mark.parametrize("act_quant", ["int8_token", "int4_group"])
def test_linear_simulates_the_activation_quantizer(act_quant):
  rng = _rng(3)
  w = rng.standard_normal((16, 80)).astype(np.float32)
  x = rng.standard_normal((3, 80)).astype(np.float32)
  perm = rng.permutation(80)
  q = quantize_weight(w, bits=4, group_size=32, symmetric=True, num_outliers=16, perm=perm,
                      act_quant=act_quant)
  if act_quant == "int8_token":
    xq = np.asarray(fake_quantize(x, bits=8))
  else:  # in the stored order: groups of 32 in 4 bits, the last 16 channels in int8
    xq = np.empty_like(x)
    xq[:, perm] = np.asarray(fake_quantize(x[:, perm], bits=4, group_size=32,
                                           num_outliers=16))
  _assert_dot_close(linear(x, q), xq, np.asarray(dequantize(q), np.float64))
  assert not np.allclose(xq, x)


# Per projection: a mix of the formats (4-bit packed sym / asym, outliers + perm, clipping,
# 8-bit); projections of one shape share a setting, so each compiles once.
_QUANT = {
    ("q_proj", "o_proj"): dict(bits=4, group_size=16, symmetric=True),
    ("k_proj", "v_proj"): dict(bits=4, group_size=8, symmetric=False, num_outliers=8,
                               perm=True),
    ("gate_proj", "up_proj"): dict(bits=8, group_size=16, symmetric=False),
    ("down_proj",): dict(bits=4, group_size=16, symmetric=True, clip_ratio=0.9,
                         num_outliers=16, perm=True),
    ("lm_head",): dict(bits=8, group_size=None, symmetric=True),
}
_QUANT = {name: args for names, args in _QUANT.items() for name in names}


def test_model_with_qtensor_leaves():
  config = for_architecture("llama", vocab_size=37, hidden_size=32, intermediate_size=48,
                            num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                            max_position_embeddings=64)
  rng = _rng(4)
  # Random weights from numpy (no per-shape jax init to compile), norms around 1.
  model = from_params(config, {
      name: (rng.standard_normal(shape) * (shape[-1]**-0.5 if len(shape) == 2 else 0.1) +
             (len(shape) == 1)).astype(np.float32)
      for name, shape in parameter_shapes(config).items()})
  graphdef, state = nnx.split(nnx.clone(model))
  flat = nnx.to_flat_state(state)
  fake_flat = nnx.to_flat_state(nnx.split(nnx.clone(model))[1])  # dequantized weights
  for (path, variable), (_, fake) in zip(flat, fake_flat):
    if path[-1] != "weight":
      continue
    args = dict(_QUANT[path[-2]])
    if args.pop("perm", False):
      args["perm"] = rng.permutation(variable.shape[1])
    q = quantize_weight(variable.get_value(), **args)
    variable.set_value(q)
    fake.set_value(dequantize(q))
  quantized = nnx.merge(graphdef, nnx.from_flat_state(flat))
  # The Param holds the QTensor itself, and split / merge / jit carry it.
  weight = quantized.layers[1].attn.k_proj.weight.get_value()
  assert weight.bits == 4 and weight.num_outliers == 8 and weight.perm is not None
  _, quantized_state = nnx.split(quantized)

  @jax.jit
  def logits_of(state, tokens):
    return nnx.merge(graphdef, state)(tokens)[0]

  tokens = jnp.asarray(rng.integers(0, 37, (2, 11)))
  got = logits_of(quantized_state, tokens)
  fake = logits_of(nnx.from_flat_state(fake_flat), tokens)
  np.testing.assert_allclose(got, fake, rtol=1e-5, atol=1e-5)
  exact = logits_of(nnx.split(model)[1], tokens)
  rel = float(jnp.linalg.norm(got - exact) / jnp.linalg.norm(exact))
  assert 1e-4 < rel < MODEL_REL_ERR


_SHARDING_CHILD = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, PartitionSpec as P
from lowbit.nn import linear
from lowbit.qtensor import qtensor_sharding
from lowbit.quantize import quantize_weight

assert jax.device_count() == 8
mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("n", "k"))
rng = np.random.default_rng(5)
w = rng.standard_normal((64, 272)).astype(np.float32)
x = rng.standard_normal((4, 272)).astype(np.float32)
q = quantize_weight(w, bits=4, group_size=32, symmetric=False, num_outliers=16,
                    perm=rng.permutation(272))
expected = np.asarray(jax.jit(linear)(x, q))
# Spec of the dense weight -> shape of one shard of the packed codes [64, 128].
for spec, shard in {P("n", None): (32, 128), P(None, ("n", "k")): (64, 16),
                    P("n", "k"): (32, 32)}.items():
  sharded = jax.device_put(q, qtensor_sharding(q, spec, mesh))
  assert sharded.codes.addressable_shards[0].data.shape == shard, (spec, shard)
  assert sharded.scales.addressable_shards[0].data.shape == (shard[0], shard[1] // 16), spec
  got = np.asarray(jax.jit(linear)(x, sharded))
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
try:
  qtensor_sharding(quantize_weight(w[:, :96], bits=4, group_size=32, symmetric=True),
                   P(None, "k"), mesh)  # 3 groups over 4
except ValueError as e:
  assert "3 groups of 32" in str(e), e
else:
  raise AssertionError("3 groups over 4 devices did not raise")
print("ok")
"""


def test_qtensor_shards_like_its_weight():
  # Fake CPU devices must be set before jax starts: a separate process (STYLE.md 19).
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  root = Path(__file__).resolve().parents[1]
  result = subprocess.run([sys.executable, "-c", textwrap.dedent(_SHARDING_CHILD)], cwd=root,
                          env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def test_weight_only_qtensors_run_the_quantized_matmul_op(monkeypatch):
  """W4A16/W8A16 leaves go through pallas_kernels' dispatcher; simulated formats do not."""
  from lowbit import nn as lowbit_nn
  calls = []
  real = lowbit_nn.quantized_matmul.weight_only_matmul

  def spy(x, codes, scales, zeros, **kwargs):
    calls.append((x.shape, kwargs["bits"]))
    return real(x, codes, scales, zeros, **kwargs)

  monkeypatch.setattr(lowbit_nn.quantized_matmul, "weight_only_matmul", spy)
  rng = _rng(7)
  w = rng.standard_normal((24, 64)).astype(np.float32)
  x = rng.standard_normal((3, 4, 64)).astype(np.float32)
  y = linear(x, quantize_weight(w, bits=4, group_size=32, symmetric=False))
  assert calls == [((12, 64), 4)] and y.shape == (3, 4, 24)
  linear(x, quantize_weight(w, bits=8, group_size=None, symmetric=True, act_quant="int8_token"))
  assert len(calls) == 1


def _rotated(w, *, seed, bits=4, group_size=32, act_quant=None):
  """A QTensor of w [N, K] stored in the Hadamard basis: the codes of W M^T."""
  m = np.asarray(hadamard_matrix(w.shape[1], seed=seed), np.float64)
  q = quantize_weight((w.astype(np.float64) @ m.T).astype(np.float32), bits=bits,
                      group_size=group_size, symmetric=True, act_quant=act_quant)
  return dataclasses.replace(q, input_transform="hadamard", input_seed=seed), m


@pytest.mark.parametrize("seed,bits", [(None, 4), (7, 4), (7, 8)])
def test_rotated_qtensor_computes_x_times_its_weight(seed, bits):
  # K = 96 = 12 x 8, not a power of two. Without an activation quantizer the rotation is
  # exact: (x M^T) (W M^T)^T = x W^T for the W the QTensor dequantizes to.
  rng = _rng(8)
  w = rng.standard_normal((24, 96)).astype(np.float32)
  x = rng.standard_normal((2, 3, 96)).astype(np.float32)
  q, m = _rotated(w, seed=seed, bits=bits)
  validate(q)
  deq = np.asarray(dequantize(q), np.float64)  # W, the rotation undone
  np.testing.assert_allclose(deq @ m.T, dequantize(q, transformed=True), atol=1e-5)
  y = np.asarray(jax.jit(linear)(x, q))
  np.testing.assert_allclose(y, x @ deq.T, rtol=1e-5, atol=1e-4)
  rel = np.linalg.norm(y - x @ w.T) / np.linalg.norm(x @ w.T)
  assert rel < (0.15 if bits == 4 else 0.01)


def test_rotated_qtensor_quantizes_the_rotated_input():
  rng = _rng(9)
  w = rng.standard_normal((16, 96)).astype(np.float32)
  x = rng.standard_normal((5, 96)).astype(np.float32)
  x[:, 3] *= 20  # one outlier channel, as in LLM activations, where its weights are small
  w[:, 3] /= 20
  exact = x.astype(np.float64) @ w.T
  err = {}
  for act_quant in ("int4_token", "int4_group"):
    q, m = _rotated(w, seed=1, act_quant=act_quant, group_size=48)
    q = dataclasses.replace(q, act_clip=0.9)
    group = 48 if act_quant == "int4_group" else None
    xq = np.asarray(fake_quantize((x.astype(np.float64) @ m.T).astype(np.float32), bits=4,
                                  group_size=group, clip_ratio=0.9))
    y = np.asarray(linear(x, q))
    _assert_dot_close(y, xq, np.asarray(dequantize(q, transformed=True), np.float64))
    err[act_quant] = np.linalg.norm(y - exact) / np.linalg.norm(exact)
  # Without the rotation, the outlier sets the per-token scale and the rest rounds to 0.
  plain = quantize_weight(w, bits=4, group_size=48, symmetric=True, act_quant="int4_token")
  err["plain"] = np.linalg.norm(np.asarray(linear(x, plain)) - exact) / np.linalg.norm(exact)
  assert max(err["int4_token"], err["int4_group"]) < 0.5 * err["plain"], err


def test_validate_checks_the_input_transform():
  w = _rng(10).standard_normal((8, 96)).astype(np.float32)
  q, _ = _rotated(w, seed=3)
  for bad, match in [(dict(input_transform="fft"), "input_transform='fft'"),
                     (dict(input_transform=None), "input_seed=3 without"),
                     (dict(input_seed=1.5), "input_seed=1.5 is not an integer")]:
    with pytest.raises(ValueError, match=match):
      validate(dataclasses.replace(q, **bad))
  assert not has_hadamard(6)
  six = quantize_weight(w[:, :6], bits=4, group_size=6, symmetric=True)
  with pytest.raises(ValueError, match="no Hadamard matrix of order K=6"):
    validate(dataclasses.replace(six, input_transform="hadamard"))


def test_input_transform_survives_a_checkpoint(tmp_path):
  from lowbit import checkpoint
  w = _rng(11).standard_normal((8, 96)).astype(np.float32)
  params = {"a": _rotated(w, seed=5, act_quant="int4_token")[0],
            "b": _rotated(w, seed=None)[0], "c": quantize_weight(w, bits=4, group_size=32,
                                                                  symmetric=True)}
  checkpoint.save(tmp_path / "c", params)
  restored = checkpoint.restore(tmp_path / "c")
  assert jax.tree.structure(restored) == jax.tree.structure(params)  # static fields too
  assert (restored["a"].input_transform, restored["a"].input_seed) == ("hadamard", 5)
  assert (restored["b"].input_transform, restored["b"].input_seed) == ("hadamard", None)
  assert restored["c"].input_transform is None
  for key in params:
    np.testing.assert_array_equal(dequantize(restored[key]), dequantize(params[key]))
