"""Probe: W4A16 at decode sizes written as one XLA reduction over the packed codes.

The Pallas-Triton W4A16 kernels sit at 25-35% of HBM at M <= 16 (quantized_matmul.md,
run 7), while XLA reads the same [N, K/2] int8 codes at 67-99% of HBM in a plain row sum.
This probe times formulations of x @ dequant(codes).T that XLA can emit as a single
reduction fusion (unpack, scale, multiply by x, sum over K), against XLA bf16 and the
shipped Pallas default, at M in {1, 2, 4, 8, 16} and the issue's shapes.

Usage (GPU): python -m bench.w4a16_rowsum_probe --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp

from bench.quantized_matmul import (rand_w4, rand_x, rel_err, rotations,
                                    time_op, xla_bf16, _key)
from pallas_kernels.quantized_matmul import gpu, reference

G = 128


def halves(x, g):
  """x [M, K] -> (x_low, x_high) [M, K/2]: the channels of each byte's low / high nibble."""
  m, k = x.shape
  xs = x.reshape(m, k // g, 2, g // 2)
  return xs[:, :, 0].reshape(m, k // 2), xs[:, :, 1].reshape(m, k // 2)


def nibbles(codes):
  low = jnp.left_shift(codes, 4) >> 4
  return low, codes >> 4


def rowsum_nm(x, codes, scales, *, g=G):
  """One reduction over [N, M, K/2] (M next to N: rows sharing codes are neighbours)."""
  xl, xh = halves(x.astype(jnp.float32), g)
  lo, hi = nibbles(codes)
  s = jnp.repeat(scales, g // 2, axis=1)  # [N, K/2]
  w_lo = (lo.astype(jnp.float32) * s)[:, None, :]
  w_hi = (hi.astype(jnp.float32) * s)[:, None, :]
  y = jnp.sum(w_lo * xl[None] + w_hi * xh[None], axis=-1)  # [N, M]
  return y.T.astype(x.dtype)


def rowsum_nm_grouped(x, codes, scales, *, g=G):
  """The same over [N, M, G, g/2] with the scale applied once per group partial."""
  n, kb = codes.shape
  m = x.shape[0]
  ng = 2 * kb // g
  xl, xh = halves(x.astype(jnp.float32), g)
  lo, hi = nibbles(codes.reshape(n, 1, ng, g // 2))
  part = jnp.sum(lo.astype(jnp.float32) * xl.reshape(1, m, ng, g // 2)
                 + hi.astype(jnp.float32) * xh.reshape(1, m, ng, g // 2), axis=-1)
  y = jnp.sum(part * scales[:, None, :], axis=-1)
  return y.T.astype(x.dtype)


def rowsum_mn(x, codes, scales, *, g=G):
  """One reduction over [M, N, K/2] (the einsum order)."""
  xl, xh = halves(x.astype(jnp.float32), g)
  lo, hi = nibbles(codes)
  s = jnp.repeat(scales, g // 2, axis=1)
  y = jnp.sum((lo.astype(jnp.float32) * s)[None] * xl[:, None]
              + (hi.astype(jnp.float32) * s)[None] * xh[:, None], axis=-1)
  return y.astype(x.dtype)


def rowsum_bf16(x, codes, scales, *, g=G):
  """[N, M, K/2] with the weight dequantized in bf16 and the product summed in f32."""
  xl, xh = halves(x, g)
  lo, hi = nibbles(codes)
  s = jnp.repeat(scales.astype(jnp.bfloat16), g // 2, axis=1)
  w_lo = (lo.astype(jnp.bfloat16) * s)[:, None, :]
  w_hi = (hi.astype(jnp.bfloat16) * s)[:, None, :]
  y = jnp.sum((w_lo * xl[None]).astype(jnp.float32) + (w_hi * xh[None]).astype(jnp.float32),
              axis=-1)
  return y.T.astype(x.dtype)


IMPLS = {"rowsum_nm": rowsum_nm, "rowsum_nm_grouped": rowsum_nm_grouped,
         "rowsum_mn": rowsum_mn, "rowsum_bf16": rowsum_bf16}


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
  p.add_argument("--iters", type=int, default=15)
  p.add_argument("--tiny", action="store_true")
  a = p.parse_args()
  shapes = [(256, 512)] if a.tiny else [(14336, 4096), (4096, 4096), (4096, 14336),
                                        (28672, 8192)]
  ms = [1, 4] if a.tiny else [1, 2, 4, 8, 16]
  card = jax.devices()[0].device_kind
  bw = 4.8e12 if "H200" in card else 3.35e12
  out = open(os.path.join(a.out, "w4a16_rowsum_probe.jsonl"), "w")  # noqa: SIM115
  for n, k in shapes:
    bytes_w = n * k // 2 + n * (k // G) * 4
    r = rotations(bytes_w)
    wsets = [rand_w4(n, k, G, i) for i in range(r)]
    rb = rotations(2 * n * k)
    wb = [jax.random.normal(_key("wb", n, k, i), (n, k), jnp.bfloat16) for i in range(rb)]
    for m in ms:
      xs = [rand_x(m, k, i) for i in range(max(r, rb))]
      ref = reference.weight_only_matmul(xs[0], wsets[0][0], wsets[0][1], bits=4,
                                         group_size=G)
      base = time_op(xla_bf16, [(xs[i], wb[i]) for i in range(rb)], iters=a.iters)[0]
      res = {"bf16": base}
      errs = {}
      fns = dict(IMPLS)
      fns["pallas_gpu"] = lambda x, c, s: gpu.weight_only_matmul(
          x, c, s, bits=4, group_size=G, interpret=a.tiny)
      for name, fn in fns.items():
        try:
          errs[name] = rel_err(jax.jit(fn)(xs[0], wsets[0][0], wsets[0][1]), ref)
          res[name] = time_op(fn, [(xs[i], wsets[i][0], wsets[i][1]) for i in range(r)],
                              iters=a.iters)[0]
        except Exception as e:  # noqa: BLE001 -- a probe: record and go on
          res[name] = None
          errs[name] = repr(e)[:200]
      line = {"n": n, "k": k, "m": m, "card": card, "ms": res, "rel_err": errs,
              "ratio": {kk: (base / v if v else None) for kk, v in res.items()},
              "hbm_frac": {kk: (bytes_w / v / 1e-3 / bw if v else None)
                           for kk, v in res.items() if kk != "bf16"}}
      out.write(json.dumps(line) + "\n")
      out.flush()
      print(f"{n}x{k} M={m}: " + "  ".join(
          f"{kk} {v * 1e3:.1f}us ({base / v:.2f}x)" for kk, v in res.items() if v)
          + f"  err {errs}", flush=True)


if __name__ == "__main__":
  main()
