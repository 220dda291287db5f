"""Flax NNX building blocks that models are written with.

Motivation: compression replaces leaves of the parameter state (a weight array becomes a
quantized tensor or a low-rank factor pair at the same path), so model code must not care
which leaf it holds. These blocks dispatch on the leaf type at call time: a dense array,
or a type registered in `_LINEAR_IMPLS` (`QTensor`: `qtensor_linear`); any other type is
refused with a clear error.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from lowbit.qtensor import QTensor, apply_input_transform, dequantize
from lowbit.quantize import fake_quantize
from pallas_kernels.activation_quant import api as activation_quant
from pallas_kernels.quantized_matmul import api as quantized_matmul

# Leaf type -> function(x [..., in], weight) -> [..., out]. Formats register themselves here.
_LINEAR_IMPLS: dict[type, Callable[[jax.Array, object], jax.Array]] = {}


def register_linear_impl(leaf_type: type, impl: Callable[[jax.Array, object], jax.Array]):
  """Lets a weight format (QTensor, low-rank pair) serve `Linear` without touching models."""
  _LINEAR_IMPLS[leaf_type] = impl


# While set (inside `capture_linear_inputs`), every `Linear` call reports (module, input):
# calibration reads each layer's inputs this way. Unset, it costs one lookup per call.
_INPUT_CAPTURE: contextvars.ContextVar[Callable | None] = contextvars.ContextVar(
    "lowbit_linear_input_capture", default=None)


@contextlib.contextmanager
def capture_linear_inputs(callback: Callable[["Linear", jax.Array], None]) -> Iterator[None]:
  """Within the block, `callback(module, x)` sees the input x [..., in] of every `Linear`
  call (traced values when the call runs under jit)."""
  token = _INPUT_CAPTURE.set(callback)
  try:
    yield
  finally:
    _INPUT_CAPTURE.reset(token)


def linear(x: jax.Array, weight) -> jax.Array:
  """x [..., in] times weight [out, in] (contraction axis minor) -> [..., out]."""
  if isinstance(weight, (jax.Array, jax.ShapeDtypeStruct)) or hasattr(weight, "__array__"):
    # dot_general contracting the minor axis of both operands: the "NT" layout that
    # XLA's int8/fp8 GEMMs need too, so dense and quantized weights share one layout.
    return jax.lax.dot_general(x, weight, (((x.ndim - 1,), (1,)), ((), ())))
  impl = _LINEAR_IMPLS.get(type(weight))
  if impl is None:
    raise TypeError(f"Linear has no implementation for a weight of type {type(weight).__name__}")
  return impl(x, weight)


def qtensor_linear(x: jax.Array, q: QTensor) -> jax.Array:
  """x [..., in] times a QTensor [out, in] -> [..., out]: the one place where a QTensor
  matmul is chosen.

  An input transform (q.input_transform = "hadamard", QuaRot's online rotation) is applied
  to x first: x M^T, one fast Hadamard transform of the input width per call (cost per
  element = the sum of its Kronecker factor orders: 28 at 576 = 12 x 12 x 4, 140 at 1536 =
  12 x 128; a runtime would rotate once for the linears that share an input, q/k/v and
  gate/up). Everything after runs in that basis, against the stored weight W M^T.

  Weight-only 4/8-bit formats without outlier tail or permutation (W4A16, W8A16) run the
  quantized matmul of `pallas_kernels` (its Pallas kernel on GPU/TPU where it serves the
  shape, its XLA reference elsewhere).

  On a GPU or TPU backend (`jax.default_backend()` decides; there is no switch), W8A8 and
  Atom's W4A4 run in integers (`integer_linear`) where the QTensor's layout is what the
  integer kernels take (`integer_format`) and, for W4A4, one of the backend's kernels
  (`W4A4_KERNELS`) serves the shape (e.g. Triton needs group_size / 2 a power of two
  >= 16; SmolLM2's groups of 112 do not qualify).

  Every other case, and everything on the CPU, runs the simulation: the weight is
  dequantized in the original channel order and multiplied as a dense weight, after the
  activation quantizer the QTensor names (in the stored channel order), so the result is
  exactly that of the fake-quantized float model (what the accuracy results measure). The
  integer path computes the same products, exactly in int32, and differs from it only by
  the float rounding of the rescale and of the simulation's float dot.
  """
  x = apply_input_transform(x, q)
  if q.act_quant is None and not q.num_outliers and q.perm is None and q.bits in (4, 8):
    y = quantized_matmul.weight_only_matmul(x.reshape(-1, x.shape[-1]), q.codes, q.scales,
                                            q.zeros, bits=q.bits, group_size=q.group_size)
    return y.reshape(*x.shape[:-1], y.shape[-1])
  backend = jax.default_backend()
  fmt = integer_format(q)
  if backend in ("gpu", "tpu") and fmt is not None:
    # W8A8 may end at XLA's own int8 dot; W4A4 only runs a Pallas kernel (XLA's reference
    # loops over the groups), else the simulation below.
    matmul = None if fmt == "w8a8" else W4A4_KERNELS[backend]
    try:
      return integer_linear(x, q, matmul_implementation=matmul)
    except NotImplementedError:
      pass  # no kernel serves this shape: simulate
  if q.act_quant is not None:
    x = _fake_quantize_input(x, q)
  return linear(x, dequantize(q, transformed=True))


def integer_format(q: QTensor) -> str | None:
  """"w8a8", "w4a4" or None: whether q's layout is what the integer kernels take.

  "w8a8": int8 symmetric codes [N, K] with one scale per output channel (one group over
  the row), no outlier tail, act_quant "int8_token" (`quantized_matmul.int8_matmul`).
  "w4a4": 4-bit symmetric codes packed in q's groups ("group_halves"), optionally an int8
  tail and a perm, act_quant "int4_group" (`quantized_matmul.w4a4_matmul`). Both keep the
  contraction axis minor, as every QTensor does.
  """
  if q.zeros is not None:
    return None
  if (q.act_quant == "int8_token" and q.bits == 8 and not q.num_outliers
      and q.group_size == q.main_width):
    return "w8a8"
  if q.act_quant == "int4_group" and q.bits == 4:
    return "w4a4"
  return None


# The W4A4 matmul kernels `qtensor_linear` tries, by backend (Mosaic GPU serves Hopper).
W4A4_KERNELS = {"gpu": ("mosaic_gpu", "pallas_gpu"), "tpu": ("pallas_tpu",)}


def integer_linear(x: jax.Array, q: QTensor, *, implementation=None,
                   matmul_implementation=None, interpret=False) -> jax.Array:
  """x [..., K] (in q's input-transform basis) times a W8A8 or W4A4 QTensor in integers:
  `activation_quant.quantize_activations` (gather by q.perm, per-token grids clipped at
  q.act_clip, the int8 tail), then `quantized_matmul.int8_matmul` or `w4a4_matmul` (int32
  accumulation, the rescale fused) -> [..., N] in the simulation's dtype.

  `implementation` and `interpret` reach both ops (tests pin "xla" or a Pallas kernel in
  interpret mode); `matmul_implementation`, where given, replaces `implementation` for
  the matmul (`qtensor_linear` limits W4A4 to its kernels). Raises ValueError for a QTensor that
  `integer_format` refuses, NotImplementedError where no requested implementation serves.
  """
  fmt = integer_format(q)
  if fmt is None:
    raise ValueError(f"integer_linear: a QTensor with bits={q.bits}, "
                     f"act_quant={q.act_quant!r}, group_size={q.group_size}, "
                     f"num_outliers={q.num_outliers}, symmetric={q.symmetric} has no "
                     "integer kernel")
  ops = dict(implementation=implementation, interpret=interpret)
  matmul_ops = dict(ops, implementation=matmul_implementation or implementation)
  x2 = x.reshape(-1, x.shape[-1])  # [M, K]
  out_dtype = jnp.result_type(x.dtype, jnp.dtype(q.dtype))
  if fmt == "w8a8":
    a = activation_quant.quantize_activations(x2, bits=8, clip_ratio=q.act_clip,
                                              perm=q.perm, **ops)
    y = quantized_matmul.int8_matmul(a.codes, a.scales, q.codes, q.scales,
                                     out_dtype=out_dtype, **matmul_ops)
  else:
    a = activation_quant.quantize_activations(
        x2, bits=4, group_size=q.group_size, clip_ratio=q.act_clip, perm=q.perm,
        num_outliers=q.num_outliers, **ops)
    y = quantized_matmul.w4a4_matmul(a.codes, a.scales, q.codes, q.scales,
                                     a.outlier_codes, a.outlier_scales, q.outlier_codes,
                                     q.outlier_scales, group_size=q.group_size,
                                     out_dtype=out_dtype, **matmul_ops)
  return y.reshape(*x.shape[:-1], y.shape[-1])


def _fake_quantize_input(x, q):
  """x [..., K] (already in q's input-transform basis) on the grid of q.act_quant (see
  lowbit.qtensor), back in the original channel order."""
  if q.act_quant == "int8_token":
    return fake_quantize(x, bits=8, clip_ratio=q.act_clip)
  if q.perm is not None:
    x = x[..., q.perm]
  # int4_group: groups of the weight's group size; int4_token: one group per token.
  group_size = q.group_size if q.act_quant == "int4_group" else None
  x = fake_quantize(x, bits=4, group_size=group_size, num_outliers=q.num_outliers,
                    clip_ratio=q.act_clip)
  if q.perm is not None:
    x = jnp.zeros_like(x).at[..., q.perm].set(x)
  return x


register_linear_impl(QTensor, qtensor_linear)


def _normal_init(key, shape, dtype, fan_in):
  # Random (never zero) weights for benchmarks and fresh models; real weights are loaded.
  return (jax.random.normal(key, shape, jnp.float32) * fan_in**-0.5).astype(dtype)


class Linear(nnx.Module):
  """y = x @ weight.T + bias, with `weight` stored [out_features, in_features]."""

  def __init__(self, in_features: int, out_features: int, *, use_bias: bool = False,
               dtype=jnp.float32, rngs: nnx.Rngs):
    self.in_features = in_features
    self.out_features = out_features
    self.weight = nnx.Param(
        _normal_init(rngs.params(), (out_features, in_features), dtype, in_features))
    self.bias = nnx.Param(jnp.zeros((out_features,), dtype)) if use_bias else None

  def __call__(self, x: jax.Array) -> jax.Array:
    capture = _INPUT_CAPTURE.get()
    if capture is not None:
      capture(self, x)
    y = linear(x, self.weight.get_value())
    if self.bias is not None:
      y = y + self.bias.get_value().astype(y.dtype)
    return y


class Embed(nnx.Module):
  """Token embedding table [V, D]; `attend` reuses it as a tied output head."""

  def __init__(self, num_embeddings: int, features: int, *, dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.embedding = nnx.Param(
        _normal_init(rngs.params(), (num_embeddings, features), dtype, 1))

  def __call__(self, tokens: jax.Array) -> jax.Array:
    return jnp.take(self.embedding.get_value(), tokens, axis=0)

  def attend(self, x: jax.Array) -> jax.Array:
    return linear(x, self.embedding.get_value())
