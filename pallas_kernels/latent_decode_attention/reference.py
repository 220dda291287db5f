"""Plain-jnp Palu latent decode attention: the oracle for the kernels and the XLA fallback.

Palu (SPEC.md 2) factors each K / V projection per head group g into down [G, R, in] and
up [G, gh*H, R]; the cache holds the per-token latents (x @ down[g]^T). The op:

  q           [B, N, H]           bf16 / f32, one query token per sequence, rotated at its
                                  position lengths[b] - 1
  k_latents   [G, B, S, Rk]       float (bits=None), or uint8 [G, B, S, Rk // 2] (bits=4,
                                  "halves" packing as decode_attention.reference)
  v_latents   [G, B, S, Rv]       likewise ([G, B, S, Rv // 2] for bits=4)
  k_up        [G, gh*H, Rk]       row j*H + d = dim d of kv head g*gh + j
  lengths     i32[B]              valid slots (slot s holds position s); 0 -> zeros
  k/v_scales, k/v_offsets  f32[G, B, S]   latent = code * scale + offset (bits=4)

  key[b, s, g*gh + j] = RoPE_s(k_up[g, j*H:(j+1)*H] @ k_latent[g, b, s])
  out[b, n] = sum_s softmax_s(q[b, n] . key[b, s, n // (N/K)] * scale) v_latent[g(n), b, s]

Letters: B batch, N query heads, K = G * gh kv heads, gh kv heads per group, G groups,
H head dim, S cache slots, Rk / Rv the key / value ranks per group. The V up-projection is
the caller's (once per query head, on the [B, N, Rv] result).

Masking, soft cap and RoPE follow decode_attention.reference (visible iff s < length and,
with a window, s > length - 1 - window; garbage slots removed with `where`). Everything
runs in float32 with HIGHEST-precision dots; the result is float32 [B, N, Rv].
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.decode_attention.reference import rope_rotate, unpack_halves
from pallas_kernels.decode_attention.reference import visible_mask

BITS = (None, 4)
_FLOATS = (jnp.bfloat16, jnp.float32, jnp.float16)


def _check_latents(name, lat, scales, offsets, *, g, b, bits, sc_names) -> int:
  """Checks one latent cache and its metadata; returns the rank R."""
  if lat.ndim != 4 or lat.shape[:2] != (g, b):
    raise ValueError(f"{name}.shape={lat.shape} must be [G={g}, B={b}, S, R']")
  s = lat.shape[2]
  if bits is None:
    if lat.dtype not in _FLOATS:
      raise ValueError(f"bits=None needs float {name}, got {name}.dtype={lat.dtype}")
    for sc_name, a in zip(sc_names, (scales, offsets)):
      if a is not None:
        raise ValueError(f"{sc_name} given for float latents (bits=None)")
    return lat.shape[3]
  if lat.dtype != jnp.uint8:
    raise ValueError(f"bits={bits} needs uint8 {name}, got {name}.dtype={lat.dtype}")
  for sc_name, a in zip(sc_names, (scales, offsets)):
    if a is None:
      raise ValueError(f"{sc_name} is required for quantized latents (bits={bits})")
    if a.shape != (g, b, s) or a.dtype != jnp.float32:
      raise ValueError(f"{sc_name}.shape={a.shape} {sc_name}.dtype={a.dtype} must be "
                       f"float32 {(g, b, s)}")
  return 2 * lat.shape[3]


def validate_inputs(q, k_latents, v_latents, k_up, lengths, k_scales, k_offsets,
                    v_scales, v_offsets, *, bits, rope_inv_freq=None,
                    sliding_window=None, logit_softcap=None) -> None:
  """Static (shape and dtype) checks shared by every implementation; raises ValueError."""
  if bits not in BITS:
    raise ValueError(f"bits={bits!r} must be one of {BITS}")
  if q.ndim != 3:
    raise ValueError(f"q must be [B, N, H], got q.shape={q.shape}")
  if q.dtype not in _FLOATS:
    raise ValueError(f"q.dtype={q.dtype} must be a float type")
  b, n, h = q.shape
  if k_up.ndim != 3 or k_up.dtype not in _FLOATS:
    raise ValueError(f"k_up must be float [G, gh*H, Rk], got k_up.shape={k_up.shape} "
                     f"k_up.dtype={k_up.dtype}")
  g = k_up.shape[0]
  if k_up.shape[1] % h:
    raise ValueError(f"k_up.shape={k_up.shape}: rows {k_up.shape[1]} must be gh * H "
                     f"(H={h} from q.shape={q.shape})")
  kh = g * (k_up.shape[1] // h)
  if kh == 0 or n % kh:
    raise ValueError(f"query heads N={n} must be a multiple of kv heads K={kh} "
                     f"(q.shape={q.shape}, k_up.shape={k_up.shape})")
  rk = _check_latents("k_latents", k_latents, k_scales, k_offsets, g=g, b=b, bits=bits,
                      sc_names=("k_scales", "k_offsets"))
  _check_latents("v_latents", v_latents, v_scales, v_offsets, g=g, b=b, bits=bits,
                 sc_names=("v_scales", "v_offsets"))
  if v_latents.shape[2] != k_latents.shape[2]:
    raise ValueError(f"v_latents.shape={v_latents.shape} and k_latents.shape="
                     f"{k_latents.shape} must have the same slots S")
  if k_up.shape[2] != rk:
    raise ValueError(f"k_up.shape={k_up.shape} last dim must be the key rank {rk} "
                     f"(k_latents.shape={k_latents.shape}, bits={bits})")
  if lengths.shape != (b,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
    raise ValueError(f"lengths.shape={lengths.shape} ({lengths.dtype}) must be int [{b}]")
  if rope_inv_freq is not None and (h % 2 or rope_inv_freq.shape != (h // 2,)):
    raise ValueError(f"rope_inv_freq.shape={rope_inv_freq.shape} must be [{h // 2}] "
                     f"(even head dim H={h})")
  if sliding_window is not None and sliding_window < 1:
    raise ValueError(f"sliding_window={sliding_window} must be >= 1")
  if logit_softcap is not None and not logit_softcap > 0:
    raise ValueError(f"logit_softcap={logit_softcap} must be > 0")


def dequantize(latents, scales, offsets, *, bits) -> jax.Array:
  """[G, B, S, R'] latents -> f32 [G, B, S, R]."""
  if bits is None:
    return latents.astype(jnp.float32)
  codes = unpack_halves(latents).astype(jnp.float32)
  return codes * scales[..., None] + offsets[..., None]


@functools.partial(jax.jit, static_argnames=("bits", "scale", "logit_softcap",
                                             "sliding_window"))
def latent_decode_attention(q, k_latents, v_latents, k_up, lengths, *, rope_inv_freq,
                            scale: float, k_scales=None, k_offsets=None, v_scales=None,
                            v_offsets=None, bits=None, logit_softcap=None,
                            sliding_window=None):
  """Latent decode attention in plain jnp (see the module docstring); -> f32 [B, N, Rv]."""
  validate_inputs(q, k_latents, v_latents, k_up, lengths, k_scales, k_offsets, v_scales,
                  v_offsets, bits=bits, rope_inv_freq=rope_inv_freq,
                  sliding_window=sliding_window, logit_softcap=logit_softcap)
  b, n, h = q.shape
  g, rows, _ = k_up.shape
  gh = rows // h
  kh = g * gh
  hi = lax.Precision.HIGHEST
  lk = dequantize(k_latents, k_scales, k_offsets, bits=bits)  # [G, B, S, Rk]
  lv = dequantize(v_latents, v_scales, v_offsets, bits=bits)  # [G, B, S, Rv]
  s = lk.shape[2]
  visible = visible_mask(lengths, s, sliding_window)  # [B, S]
  lk = jnp.where(visible[None, :, :, None], lk, 0.0)  # garbage never reaches a dot
  lv = jnp.where(visible[None, :, :, None], lv, 0.0)
  up = k_up.astype(jnp.float32).reshape(g, gh, h, -1)
  keys = jnp.einsum("gbsr,gjhr->gbsjh", lk, up, precision=hi)  # [G, B, S, gh, H]
  if rope_inv_freq is not None:
    pos = jnp.arange(s, dtype=jnp.int32)[:, None]  # [S, 1] broadcasts over gh
    keys = rope_rotate(keys, pos, rope_inv_freq)
  # query head n = ((g * gh + j) * qpk + i): kv head g*gh + j, qpk = N / K per kv head
  qg = q.astype(jnp.float32).reshape(b, g, gh, n // kh, h)
  scores = jnp.einsum("bgjih,gbsjh->bgjis", qg, keys, precision=hi) * scale
  if logit_softcap is not None:
    scores = jnp.tanh(scores / logit_softcap) * logit_softcap
  vis = visible[:, None, None, None, :]
  scores = jnp.where(vis, scores, -jnp.inf)
  m = jnp.max(scores, axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)  # a sequence with no visible key
  p = jnp.where(vis, jnp.exp(scores - m), 0.0)
  l = jnp.sum(p, axis=-1, keepdims=True)
  out = jnp.einsum("bgjis,gbsr->bgjir", p, lv, precision=hi)
  out = jnp.where(l > 0, out / jnp.where(l > 0, l, 1.0), 0.0)
  return out.reshape(b, n, -1)
