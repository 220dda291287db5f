"""Palu latent decode attention on the GPU vs dense bf16 decode attention.

In one process on one GPU (METHOD.md):
  1. ceilings: HBM read bandwidth and the bf16 matmul rate, measured (bench/common.py);
  2. correctness of `pallas_kernels.latent_decode_attention.gpu` against its reference on
     fresh random latents (ragged lengths incl. 0, bits None / 4, RoPE);
  3. speed at the Llama-3-8B shape (N=32 query heads, K=8 kv heads, H=128, bf16) with Palu
     grouping gh=4 (G=2 groups) at 50% rank (Rk = Rv = 256 per group: 512 latent values
     per token and group for K, vs 1024 for the dense K), every sequence at the full
     context, contexts {4k .. 64k} x batch {1, 16}. Implementations:
       dense_cudnn        lowbit.attention.dense_decode_attention over a dense
                          [B, S, K, H] bf16 cache (cuDNN; the model's bf16 path) -- the
                          baseline of every ratio;
       dense_xla          plain jnp einsum attention over the same dense cache;
       dense_pallas_bf16  pallas_kernels.decode_attention.gpu over bf16 pages (page 16,
                          identity page table);
       latent_bf16/int4   pallas_kernels.latent_decode_attention.gpu (bf16 / 4-bit
                          latents, RoPE on the rebuilt keys) followed by the V
                          up-projection einsum the caller does ([B, N, Rv] x v_up), so the
                          output is the same [B, N, H] as the dense ops';
       latent_xla_bf16    the latent op's XLA reference (+ the same einsum), small cases.
     Each sample is one jitted call that runs the op over R rotating buffer sets (R sized
     so a call reads >= CALL_BYTES, far above L2), INNER calls queued per sample, blocked
     once; median of --iters samples after warm-up.
  4. per case and implementation: median us, ratio to dense_cudnn (baseline / ours), bytes
     read (live latents or K/V + scales + k_up / v_up + q) / time and its fraction of the
     measured read bandwidth, and for the latent ops the FLOP rate of the key rebuild
     (2 * Rk * gh * H per token and group) and its fraction of the measured matmul rate;
     DESIGN.md lines in <out>/latent_decode.jsonl and a table in <out>/latent_decode.md.

Usage (GPU, ~6 min):  PYTHONUNBUFFERED=1 python -m bench.latent_decode --out $OUT
  --impls a,b  restrict implementations     --budget-s  stop starting new cases after
  --block-sizes T,splits,warps,stages  the latent kernel's tiling (0 splits: default)
  --mha        the multi-head Llama-2-7B shape instead (32 kv heads, RoPE base 1e4), written
               to latent_decode_mha.{jsonl,md}
  --sweep      instead of the grid: latent_bf16 / latent_int4 over SWEEP tilings at
               (B=1, 64k) and (B=16, 16k), no baselines (~3 min)
CPU check of the script itself: --cpu-smoke (tiny shapes, Pallas in interpret mode).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
import zlib

import jax
import jax.numpy as jnp

from bench import common
from bench.decode_attention import _rand_heads, rel_err, time_op
from lowbit.attention import dense_decode_attention
from pallas_kernels.decode_attention import gpu as paged_gpu
from pallas_kernels.latent_decode_attention import gpu
from pallas_kernels.latent_decode_attention import reference
from pallas_kernels.latent_decode_attention.config import BlockSizes

BENCH = "latent_decode"
# Llama-3-8B attention with Palu gh=4 at 50% rank.
SHAPE = dict(name="Llama-3-8B", n=32, kv=8, h=128, gh=4, rank=256, page=16, rope_base=500000.0)
CONTEXTS = (4096, 8192, 16384, 32768, 65536)
BATCHES = (1, 16)
IMPLS = ("dense_cudnn", "dense_xla", "dense_pallas_bf16", "latent_bf16", "latent_int4",
         "latent_xla_bf16")
BASELINE = "dense_cudnn"
LATENT_XLA_MAX_TOKENS = 16384  # its [G, B, S, gh, H] f32 keys: 4 GiB at 64k x 16
# --sweep: (block_t, num_splits or 0 for the default rule, num_warps, num_stages).
SWEEP = ((128, 0, 8, 2), (64, 0, 4, 1), (32, 0, 4, 1), (128, 0, 4, 1), (32, 0, 2, 2),
         (64, 0, 4, 2), (128, 0, 8, 1), (256, 0, 8, 1))
CALL_BYTES = 256 << 20
MAX_SETS = 8
INTERPRET = False


def _key(*ids):
  return jax.random.fold_in(jax.random.key(20261128), zlib.crc32(repr(ids).encode()))


def dims():
  s = SHAPE
  return s["n"], s["kv"], s["h"], s["gh"], s["kv"] // s["gh"], s["rank"]


def inv_freq():
  h = SHAPE["h"]
  return 1.0 / SHAPE["rope_base"] ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h)


def rand_q(b, i):
  n, _, h, *_ = dims()
  return jax.random.normal(_key("q", b, i), (b, n, h), jnp.float32).astype(jnp.bfloat16)


def up_weights(i):
  """(k_up, v_up) bf16 [G, gh*H, R], entries ~ N(0, 1/R) (rebuilt keys of unit size)."""
  _, _, h, gh, g, r = dims()
  mk = lambda t: (jax.random.normal(_key(t, i), (g, gh * h, r), jnp.float32)
                  * r ** -0.5).astype(jnp.bfloat16)
  return mk("ku"), mk("vu")


def latent_set(bits, b, ctx, i):
  """(q, k_latents, v_latents, k_up, lengths, v_up, kwargs) of one buffer set."""
  _, _, _, _, g, r = dims()
  shape = (g, b, ctx, r // 2 if bits else r)
  kind = "u8" if bits else "bf16"
  kl = _rand_heads(_key("kl", bits, b, ctx, i), shape=shape, kind=kind)
  vl = _rand_heads(_key("vl", bits, b, ctx, i), shape=shape, kind=kind)
  kw = {}
  if bits:
    u = lambda t, lo, hi: jax.random.uniform(_key(t, b, ctx, i), (g, b, ctx), jnp.float32,
                                             lo, hi)
    kw = dict(k_scales=u("ks", 2.0, 3.0) / 15, k_offsets=u("ko", -1.6, -1.2),
              v_scales=u("vs", 2.0, 3.0) / 15, v_offsets=u("vo", -1.6, -1.2))
  k_up, v_up = up_weights(i)
  return rand_q(b, i), kl, vl, k_up, jnp.full((b,), ctx, jnp.int32), v_up, kw


def dense_set(b, ctx, i):
  _, kv, h, *_ = dims()
  shape = (b, ctx, kv, h)
  k = _rand_heads(_key("dk", b, ctx, i), shape=shape, kind="bf16")
  v = _rand_heads(_key("dv", b, ctx, i), shape=shape, kind="bf16")
  return rand_q(b, i), k, v, jnp.full((b,), ctx, jnp.int32)


# ---------------------------------------------------------------------------------------
# The ops, each -> [B, N, H] bf16


def v_up_projection(o, v_up):
  """The caller's step after the latent op: o f32 [B, N, Rv], v_up [G, gh*H, Rv] ->
  [B, N, H] bf16 (query head n = ((g * gh + j) * qpk + i) uses rows j*H.. of group g)."""
  b, n, rv = o.shape
  g, rows, _ = v_up.shape
  h = SHAPE["h"]
  gh = rows // h
  og = o.astype(jnp.bfloat16).reshape(b, g, gh, n // (g * gh), rv)
  out = jnp.einsum("bgjir,gjhr->bgjih", og, v_up.reshape(g, gh, h, rv),
                   preferred_element_type=jnp.float32)
  return out.reshape(b, n, h).astype(jnp.bfloat16)


def latent_op(bits, impl, block_sizes=None):
  def op(q, kl, vl, k_up, lengths, v_up, kw):
    common_kw = dict(rope_inv_freq=inv_freq(), scale=SHAPE["h"] ** -0.5, bits=bits, **kw)
    if impl == "xla":
      o = reference.latent_decode_attention(q, kl, vl, k_up, lengths, **common_kw)
    else:
      o = gpu.latent_decode_attention(q, kl, vl, k_up, lengths, **common_kw,
                                      block_sizes=block_sizes, interpret=INTERPRET)
    return v_up_projection(o, v_up)
  return op


def dense_xla(q, k, v, lengths):
  """Plain jnp GQA attention for one query token: q [B, N, H], k/v [B, S, K, H]."""
  b, n, h = q.shape
  kh = k.shape[2]
  qg = q.reshape(b, kh, n // kh, h)
  scores = jnp.einsum("bkgh,bskh->bkgs", qg, k, preferred_element_type=jnp.float32)
  mask = jnp.arange(k.shape[1])[None, :] < lengths[:, None]
  scores = jnp.where(mask[:, None, None, :], scores * h ** -0.5, -jnp.inf)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgs,bskh->bkgh", probs, v, preferred_element_type=jnp.float32)
  return out.reshape(b, n, h).astype(q.dtype)


def dense_cudnn(q, k, v, lengths):
  """The model's bf16 decode path (cuDNN on a GPU; every sequence at the same length)."""
  out = dense_decode_attention(q[:, None], k, v, lengths[0], scale=SHAPE["h"] ** -0.5)
  return out[:, 0]


def dense_pallas(q, k, v, lengths):
  """pallas_kernels.decode_attention over the dense cache viewed as bf16 pages."""
  b, s, kv, h = k.shape
  ps = SHAPE["page"]
  pages = lambda x: x.reshape(b * s // ps, ps, kv, h).transpose(2, 0, 1, 3)
  table = jnp.arange(b * s // ps, dtype=jnp.int32).reshape(b, s // ps)
  return paged_gpu.decode_attention(q, pages(k), pages(v), lengths, table,
                                    scale=h ** -0.5, interpret=INTERPRET)


# ---------------------------------------------------------------------------------------
# Accounting


def live_bytes(impl, b, ctx):
  """Bytes an implementation must read: live latents / K, V (+ scales), weights, q."""
  n, kv, h, gh, g, r = dims()
  q = b * n * h * 2
  if impl.startswith("dense"):
    return b * ctx * kv * h * 2 * 2 + q
  weights = 2 * g * gh * h * r * 2  # k_up and v_up, bf16
  if impl == "latent_int4":
    return g * b * ctx * (r + 4 * 4) + weights + q  # two nibble halves, 4 f32 per token
  return g * b * ctx * r * 2 * 2 + weights + q


def rebuild_flops(b, ctx):
  _, _, h, gh, g, r = dims()
  return 2 * r * gh * h * g * b * ctx


def tiling(t):
  """(block_t, num_splits or 0, num_warps, num_stages) -> BlockSizes."""
  return BlockSizes(t[0], t[1] or None, t[2], t[3])


class Runner:
  def __init__(self, args):
    self.args = args
    self.failures: list[str] = []
    self.writer = common.ResultWriter(os.path.join(args.out, f"{BENCH}.jsonl"), BENCH)
    self.impls = tuple(args.impls.split(",")) if args.impls else IMPLS
    bs = [int(x) for x in args.block_sizes.split(",")] if args.block_sizes else None
    self.block_sizes = tiling(bs) if bs else None
    self.read_bw = self.matmul_rate = None

  def guarded(self, label, fn):
    return common.guarded(label, fn, self.failures)

  def ceilings(self):
    if INTERPRET:
      return
    bw = self.guarded("read bandwidth", lambda: common.measure_read_bandwidth(1 << 30))
    mm = self.guarded("matmul rate", common.measure_matmul_rate)
    self.read_bw = bw and bw["bytes_per_s"]
    self.matmul_rate = mm and mm["flops_per_s"]
    print(f"ceilings: read {self.read_bw} B/s, bf16 matmul {self.matmul_rate} FLOP/s",
          flush=True)

  def check(self):
    """The GPU kernel vs the reference at ragged lengths (0, 1, odd, full)."""
    for bits in (None, 4):
      def run(bits=bits):
        ctx = 256 if INTERPRET else 4096
        q, kl, vl, k_up, _, _, kw = latent_set(bits, 4, ctx, 99)
        lengths = jnp.asarray([0, 1, ctx // 3 + 7, ctx], jnp.int32)
        kwargs = dict(rope_inv_freq=inv_freq(), scale=SHAPE["h"] ** -0.5, bits=bits, **kw)
        want = reference.latent_decode_attention(q, kl, vl, k_up, lengths, **kwargs)
        got = gpu.latent_decode_attention(q, kl, vl, k_up, lengths, **kwargs,
                                          block_sizes=self.block_sizes,
                                          interpret=INTERPRET)
        err = rel_err(got, want)
        print(f"check bits={bits}: rel err {err:.2e}", flush=True)
        if not err < 1e-2:
          raise AssertionError(f"latent kernel bits={bits} rel err {err}")
      self.guarded(f"check bits={bits}", run)

  def case(self, b, ctx):
    nsets = max(1, min(MAX_SETS, -(-CALL_BYTES // live_bytes("latent_int4", b, ctx))))
    results = {}
    for impl in self.impls:
      if impl == "latent_xla_bf16" and b * ctx > LATENT_XLA_MAX_TOKENS:
        continue
      if impl.startswith("dense"):
        op = {"dense_cudnn": dense_cudnn, "dense_xla": dense_xla,
              "dense_pallas_bf16": dense_pallas}[impl]
        make = lambda i: dense_set(b, ctx, i)
      else:
        bits = 4 if impl == "latent_int4" else None
        op = latent_op(bits, "xla" if impl == "latent_xla_bf16" else "pallas",
                       self.block_sizes)
        make = lambda i, bits=bits: latent_set(bits, b, ctx, i)
      n = max(1, min(nsets, -(-CALL_BYTES // live_bytes(impl, b, ctx))))

      def measure(op=op, make=make, n=n):
        sets = [make(i) for i in range(n)]
        return time_op(op, sets, iters=self.args.iters)

      got = self.guarded(f"{impl} B={b} ctx={ctx}", measure)
      if got is not None:
        results[impl] = got
    base = results.get(BASELINE, (None, None))[0]
    for impl, (ms, spr) in results.items():
      byts = live_bytes(impl, b, ctx)
      bps = byts / (ms * 1e-3)
      extra = dict(spread=round(spr, 4), bytes_read=byts, bytes_per_s=bps)
      line = f"B={b:3d} ctx={ctx:6d} {impl:18s} {ms * 1e3:9.1f} us  {bps / 1e9:7.0f} GB/s"
      if impl.startswith("latent"):
        fl = rebuild_flops(b, ctx) / (ms * 1e-3)
        extra["rebuild_flops_per_s"] = fl
        if self.matmul_rate:
          extra["rebuild_fraction_of_matmul"] = round(fl / self.matmul_rate, 4)
        line += f"  rebuild {fl / 1e12:6.1f} TFLOP/s"
      if base:
        line += f"  x{base / ms:5.2f} vs {BASELINE}"
      tiles = dataclasses.asdict(self.block_sizes or BlockSizes.get_default())
      if impl.startswith("latent"):
        line += f"  {tiles}"
      print(line, flush=True)
      self.writer.add(case=dict(batch=b, context=ctx, **SHAPE,
                                **({"tiling": tiles} if impl.startswith("latent") else {})),
                      impl=impl,
                      baseline_impl=BASELINE, median_ms=ms,
                      baseline_median_ms=base or float("nan"),
                      fraction_of_ceiling=bps / self.read_bw if self.read_bw else None,
                      ceiling="measured HBM read bandwidth", **extra)

  def markdown(self, path, elapsed):
    lines = [f"# {BENCH} ({self.writer.card}, jax {jax.__version__}, "
             f"{elapsed:.0f} s)", "",
             f"{SHAPE['name']} attention (N={SHAPE['n']}, K={SHAPE['kv']}, H={SHAPE['h']}), Palu "
             f"gh={SHAPE['gh']} (G={SHAPE['kv'] // SHAPE['gh']}), Rk=Rv={SHAPE['rank']}, RoPE; "
             "latent ops include the V up-projection einsum. ratio = "
             f"{BASELINE} / impl (> 1: faster than the bf16 decode attention). Ceilings "
             f"measured here: HBM read {(self.read_bw or 0) / 1e12:.2f} TB/s, bf16 matmul "
             f"{(self.matmul_rate or 0) / 1e12:.0f} TFLOP/s.", "",
             "| B | context | impl | us | ratio | GB/s | frac. of read BW "
             "| rebuild TFLOP/s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in self.writer.rows:
      c = r["case"]
      fl = r.get("rebuild_flops_per_s")
      frac = r["fraction_of_ceiling"]
      lines.append(f"| {c['batch']} | {c['context']} | {r['impl']} | "
                   f"{r['median_ms'] * 1e3:.1f} | {r['ratio_vs_baseline']:.2f} | "
                   f"{r['bytes_per_s'] / 1e9:.0f} | "
                   f"{'' if frac is None else f'{frac:.2f}'} | "
                   f"{'' if fl is None else f'{fl / 1e12:.1f}'} |")
    if self.failures:
      lines += ["", "Failures:", ""] + [f"- {f}" for f in self.failures]
    with open(path, "w") as f:
      f.write("\n".join(lines) + "\n")


def main(argv=None):
  global INTERPRET, CONTEXTS, BATCHES, CALL_BYTES, BENCH
  p = argparse.ArgumentParser()
  p.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
  p.add_argument("--iters", type=int, default=10)
  p.add_argument("--budget-s", type=float, default=480.0)
  p.add_argument("--impls", default=None)
  p.add_argument("--block-sizes", default=None)
  p.add_argument("--contexts", default=None)
  p.add_argument("--batches", default=None)
  p.add_argument("--group-heads", type=int, default=None,
                 help="kv heads per Palu group (rank stays 50%%: gh * H / 2)")
  p.add_argument("--mha", action="store_true", help="Llama-2-7B multi-head shape")
  p.add_argument("--sweep", action="store_true", help="latent kernel tilings")
  p.add_argument("--cpu-smoke", action="store_true",
                 help="tiny shapes, Pallas in interpret mode (checks the script)")
  args = p.parse_args(argv)
  if args.cpu_smoke:
    INTERPRET = True
    SHAPE.update(n=8, kv=4, h=32, gh=2, rank=32, page=16)
    CONTEXTS, BATCHES, CALL_BYTES = (64,), (1, 2), 1
    args.iters = 2
  if args.mha:
    SHAPE.update(name="Llama-2-7B", kv=SHAPE["n"], rope_base=10000.0)
    BENCH = "latent_decode_mha"
  if args.group_heads:
    SHAPE.update(gh=args.group_heads, rank=args.group_heads * SHAPE["h"] // 2)
  if args.contexts:
    CONTEXTS = tuple(int(x) for x in args.contexts.split(","))
  if args.batches:
    BATCHES = tuple(int(x) for x in args.batches.split(","))
  runner = Runner(args)
  start = time.time()
  if args.sweep:
    runner.impls = ("latent_bf16", "latent_int4")
    for t in SWEEP:
      runner.block_sizes = tiling(t)
      for b, ctx in ((1, 65536), (16, 16384)):
        runner.case(b, ctx)
    return
  runner.ceilings()
  runner.check()
  for b in BATCHES:
    for ctx in CONTEXTS:
      if time.time() - start > args.budget_s:
        print(f"budget: skipping B={b} ctx={ctx}", flush=True)
        continue
      runner.case(b, ctx)
  runner.markdown(os.path.join(args.out, f"{BENCH}.md"), time.time() - start)
  print(open(os.path.join(args.out, f"{BENCH}.md")).read(), flush=True)
  if runner.failures:
    raise SystemExit(f"{len(runner.failures)} failures")


if __name__ == "__main__":
  main()
