"""Plain-jnp references for the quantized matmul family: the oracle and the fallback.

Every function here has the exact signature of its Pallas twins in `gpu.py` / `tpu.py`
(keyword-only static arguments) and computes the mathematically intended product as
precisely as plain XLA allows: integer products accumulate in int32, float products in
float32 at HIGHEST precision, and rescales happen in float32. A kernel is judged against
these on the same quantized inputs (STYLE.md 13b).

Weight layout (the QTensor format of `lowbit/qtensor.py`, restated here because this
package depends on JAX alone): weights are [N, K] = [out, in] with the contraction axis K
minor. Symmetric codes are int8 and dequantize as `code * scale`; asymmetric codes are
uint8 and dequantize as `(code - zero) * scale`, zeros float32. 4-bit codes are packed
two per byte in "group_halves" order: within each group of g codes, byte j holds code j in
its low nibble and code j + g/2 in its high nibble (two's-complement nibbles for int8,
plain nibbles for uint8). Scales (and zeros) are float32 [N, K // g].

Terminology: *group* = the run of `group_size` input channels sharing one scale;
*tail* (Atom) = the last `n_out` input channels, kept in int8 with per-row scales.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

# ---------------------------------------------------------------------------------------
# Packing


def pack_4bit(codes: jax.Array, group_size: int) -> jax.Array:
  """codes [R, K] (int8 in -8..7, or uint8 in 0..15) -> packed [R, K // 2], same dtype."""
  r, k = codes.shape
  if k % group_size or group_size % 2:
    raise ValueError(f"{k=} must be a multiple of an even {group_size=}")
  nib = codes.astype(jnp.uint8).reshape(r, k // group_size, 2, group_size // 2)
  packed = (nib[:, :, 0] & 0xF) | (nib[:, :, 1] << 4)
  return lax.bitcast_convert_type(packed.reshape(r, k // 2), codes.dtype)


def unpack_4bit(packed: jax.Array, group_size: int) -> jax.Array:
  """packed [R, K // 2] -> codes [R, K]; int8 input comes back sign-extended."""
  r, half = packed.shape
  groups = packed.reshape(r, 2 * half // group_size, 1, group_size // 2)
  if packed.dtype == jnp.int8:
    low = jnp.left_shift(groups, 4) >> 4  # arithmetic shift: sign-extends the nibble
  elif packed.dtype == jnp.uint8:
    low = groups & 0xF
  else:
    raise ValueError(f"packed codes must be int8 or uint8, got {packed.dtype}")
  return jnp.concatenate([low, groups >> 4], axis=2).reshape(r, 2 * half)


def _codes(codes: jax.Array, bits: int, group_size: int) -> jax.Array:
  return unpack_4bit(codes, group_size) if bits == 4 else codes


# ---------------------------------------------------------------------------------------
# Static validation shared by the kernels and the reference (STYLE.md 6)


def validate_weight_only(x, codes, scales, zeros, *, bits: int, group_size: int) -> None:
  """Shape and dtype checks for `weight_only_matmul`; raises ValueError."""
  if bits not in (4, 8):
    raise ValueError(f"{bits=} must be 4 or 8")
  if x.ndim != 2 or codes.ndim != 2 or scales.ndim != 2:
    raise ValueError(f"x, codes, scales must be 2-D: {x.shape=} {codes.shape=} "
                     f"{scales.shape=}")
  m, k = x.shape
  n = codes.shape[0]
  if group_size <= 0 or k % group_size or (bits == 4 and group_size % 2):
    raise ValueError(f"{group_size=} must divide {k=} (and be even for 4 bits)")
  want = k // 2 if bits == 4 else k
  if codes.shape != (n, want):
    raise ValueError(f"{codes.shape=} does not match {x.shape=} for {bits=}")
  sym_dtype = jnp.int8 if zeros is None else jnp.uint8
  if codes.dtype != sym_dtype:
    raise ValueError(f"{codes.dtype=} must be {jnp.dtype(sym_dtype).name} "
                     f"({'symmetric' if zeros is None else 'asymmetric'})")
  if scales.shape != (n, k // group_size) or scales.dtype != jnp.float32:
    raise ValueError(f"{scales.shape=} {scales.dtype=} must be float32 {(n, k // group_size)}")
  if zeros is not None and (zeros.shape != scales.shape or zeros.dtype != jnp.float32):
    raise ValueError(f"{zeros.shape=} {zeros.dtype=} must be float32 {scales.shape}")
  if x.dtype not in (jnp.bfloat16, jnp.float32, jnp.float16):
    raise ValueError(f"{x.dtype=} must be a float type")


def validate_scaled(x, x_scales, w, w_scales, operand_dtype) -> None:
  """Checks a per-token x per-channel scaled product: x [M, K], w [N, K], scales float32."""
  m, k = x.shape
  n = w.shape[0]
  if x.dtype != operand_dtype or w.dtype != operand_dtype:
    raise ValueError(f"{x.dtype=} {w.dtype=} must both be {jnp.dtype(operand_dtype).name}")
  if w.shape != (n, k):
    raise ValueError(f"{w.shape=} must be [N, {k}] (contraction axis minor)")
  if x_scales.shape != (m, 1) or w_scales.shape != (n, 1):
    raise ValueError(f"{x_scales.shape=} {w_scales.shape=} must be [{m}, 1] and [{n}, 1]")
  if x_scales.dtype != jnp.float32 or w_scales.dtype != jnp.float32:
    raise ValueError(f"{x_scales.dtype=} {w_scales.dtype=} must be float32")


def validate_w4a4(x_codes, x_scales, w_codes, w_scales, x_out, x_out_scales, w_out,
                  w_out_scales, *, group_size: int) -> None:
  m, half = x_codes.shape
  n = w_codes.shape[0]
  k_main = 2 * half
  if x_codes.dtype != jnp.int8 or w_codes.dtype != jnp.int8:
    raise ValueError(f"{x_codes.dtype=} {w_codes.dtype=} must be int8 (packed nibbles)")
  if group_size % 2 or k_main % group_size:
    raise ValueError(f"{group_size=} must be even and divide K_main={k_main}")
  if w_codes.shape != (n, half):
    raise ValueError(f"{w_codes.shape=} must be [N, {half}]")
  g = k_main // group_size
  if x_scales.shape != (m, g) or w_scales.shape != (n, g):
    raise ValueError(f"{x_scales.shape=} {w_scales.shape=} must be [{m}, {g}], [{n}, {g}]")
  tail = (x_out, x_out_scales, w_out, w_out_scales)
  if any(t is None for t in tail) and not all(t is None for t in tail):
    raise ValueError("the outlier tail needs all four of x_out, x_out_scales, w_out, "
                     "w_out_scales, or none")
  if x_out is not None:
    n_out = x_out.shape[1]
    if x_out.shape != (m, n_out) or w_out.shape != (n, n_out):
      raise ValueError(f"{x_out.shape=} {w_out.shape=} must be [{m}, n_out], [{n}, n_out]")
    if x_out.dtype != jnp.int8 or w_out.dtype != jnp.int8:
      raise ValueError(f"{x_out.dtype=} {w_out.dtype=} must be int8")
    if x_out_scales.shape != (m, 1) or w_out_scales.shape != (n, 1):
      raise ValueError(f"{x_out_scales.shape=} {w_out_scales.shape=} must be [M,1], [N,1]")


# ---------------------------------------------------------------------------------------
# The references

_HIGHEST = lax.Precision.HIGHEST
_NT = (((1,), (1,)), ((), ()))  # contract the minor axes of x [M, K] and w [N, K]


@functools.partial(jax.jit, static_argnames=("bits", "group_size"))
def weight_only_matmul(x: jax.Array, codes: jax.Array, scales: jax.Array,
                       zeros: jax.Array | None = None, *, bits: int,
                       group_size: int) -> jax.Array:
  """W4A16 / W8A16: x [M, K] float @ dequant(codes)[N, K].T -> [M, N] in x.dtype.

  Dequantizes in float32 and multiplies at HIGHEST precision (fp32 accumulation).
  """
  validate_weight_only(x, codes, scales, zeros, bits=bits, group_size=group_size)
  n, k = codes.shape[0], x.shape[1]
  c = _codes(codes, bits, group_size).astype(jnp.float32).reshape(n, -1, group_size)
  if zeros is not None:
    c = c - zeros[..., None]
  w = (c * scales[..., None]).reshape(n, k)
  y = lax.dot_general(x.astype(jnp.float32), w, _NT, precision=_HIGHEST)
  return y.astype(x.dtype)


@functools.partial(jax.jit, static_argnames=("bits", "group_size"))
def weight_only_matmul_dequant_dot(x: jax.Array, codes: jax.Array, scales: jax.Array,
                                   zeros: jax.Array | None = None, *, bits: int,
                                   group_size: int) -> jax.Array:
  """The production XLA path ("xla_dequant"): dequantize to x.dtype, then XLA's own dot
  with fp32 accumulation. Weights round to x.dtype (2^-9 relative for bf16), so this is a
  fallback, not the oracle; for large M it runs near XLA's bf16 GEMM speed."""
  validate_weight_only(x, codes, scales, zeros, bits=bits, group_size=group_size)
  n, k = codes.shape[0], x.shape[1]
  c = _codes(codes, bits, group_size).astype(jnp.float32).reshape(n, -1, group_size)
  if zeros is not None:
    c = c - zeros[..., None]
  w = (c * scales[..., None]).reshape(n, k).astype(x.dtype)
  return lax.dot_general(x, w, _NT, preferred_element_type=jnp.float32).astype(x.dtype)


@functools.partial(jax.jit, static_argnames=("out_dtype",))
def int8_matmul(x_codes: jax.Array, x_scales: jax.Array, w_codes: jax.Array,
                w_scales: jax.Array, *, out_dtype=jnp.bfloat16) -> jax.Array:
  """W8A8: int8 [M, K] x int8 [N, K] -> int32, times x_scales [M,1] * w_scales[N,1].T."""
  validate_scaled(x_codes, x_scales, w_codes, w_scales, jnp.int8)
  acc = lax.dot_general(x_codes, w_codes, _NT, preferred_element_type=jnp.int32)
  return (acc.astype(jnp.float32) * x_scales * w_scales.T).astype(out_dtype)


@functools.partial(jax.jit, static_argnames=("out_dtype",))
def fp8_matmul(x: jax.Array, x_scales: jax.Array, w: jax.Array, w_scales: jax.Array, *,
               out_dtype=jnp.bfloat16) -> jax.Array:
  """FP8 W8A8 (e4m3): float32-accumulated products, rescaled per token and channel.

  The dot takes the fp8 operands as they are (never "dequantize then dot", which keeps XLA
  off its fp8 GEMM, PEERS.md 6.3), so on a GPU this is XLA's own fp8 dot.
  """
  validate_scaled(x, x_scales, w, w_scales, jnp.float8_e4m3fn)
  acc = lax.dot_general(x, w, _NT, preferred_element_type=jnp.float32)
  return (acc * x_scales * w_scales.T).astype(out_dtype)


@functools.partial(jax.jit, static_argnames=("group_size", "out_dtype"))
def w4a4_matmul(x_codes: jax.Array, x_scales: jax.Array, w_codes: jax.Array,
                w_scales: jax.Array, x_out: jax.Array | None = None,
                x_out_scales: jax.Array | None = None, w_out: jax.Array | None = None,
                w_out_scales: jax.Array | None = None, *, group_size: int = 128,
                out_dtype=jnp.bfloat16) -> jax.Array:
  """Atom W4A4 with the int8 outlier tail.

  x_codes [M, K_main/2] and w_codes [N, K_main/2] are packed signed 4-bit codes;
  x_scales [M, G] and w_scales [N, G] are per-token and per-row group scales. For every
  group the int32 partial sum is rescaled by x_scale * w_scale and summed in float32; the
  tail (x_out [M, n_out] int8, w_out [N, n_out] int8, scales [M,1] and [N,1]) adds an
  int8 x int8 product with its own scales. (Atom multiplies the two scales in fp16; here
  they are float32.)
  """
  validate_w4a4(x_codes, x_scales, w_codes, w_scales, x_out, x_out_scales, w_out,
                w_out_scales, group_size=group_size)
  m, n = x_codes.shape[0], w_codes.shape[0]
  xg = unpack_4bit(x_codes, group_size).reshape(m, -1, group_size).transpose(1, 0, 2)
  wg = unpack_4bit(w_codes, group_size).reshape(n, -1, group_size).transpose(1, 0, 2)

  def group(acc, args):  # one group at a time keeps the memory at [M, N]
    xq, wq, xs, ws = args
    part = lax.dot_general(xq, wq, _NT, preferred_element_type=jnp.int32)
    return acc + part.astype(jnp.float32) * xs[:, None] * ws[None, :], None

  acc, _ = lax.scan(group, jnp.zeros((m, n), jnp.float32),
                    (xg, wg, x_scales.T, w_scales.T))
  if x_out is not None:
    tail = lax.dot_general(x_out, w_out, _NT, preferred_element_type=jnp.int32)
    acc = acc + tail.astype(jnp.float32) * x_out_scales * w_out_scales.T
  return acc.astype(out_dtype)
