"""Paged decode attention on the GPU: correctness against the reference, then speed.

In one process on one GPU (METHOD.md):
  1. ceiling: HBM read bandwidth (float32-accumulated sum of a 1 GiB bf16 array), measured;
  2. correctness of `pallas_kernels.decode_attention.gpu` against `reference.py` on fresh
     random inputs (ragged lengths incl. 0, shuffled pages, bits None / 8 / 4 / 2, with and
     without RoPE, softcap + window once), and of JAX's own paged attention (bf16);
  3. speed: GQA 32 query / 8 kv heads, head dim 128, page 16 (kv4: 32), every sequence at the full
     context, contexts {1k .. 128k} x batch {1, 8, 32, 64} (cases whose bf16 cache is over
     --max-cache-gb are skipped), in a priority order so that a run cut by --budget-s still
     covers the grid coarsely. Implementations:
       xla_bf16            XLA einsum attention over a dense [B, S, K, H] bf16 cache (the
                           library's reference path, lowbit.attention.gqa_attention,
                           restated here in jnp) -- the baseline of every ratio;
       jax_dpa             jax.nn.dot_product_attention (cuDNN if it takes one query token,
                           else XLA) on the same dense cache;
       jax_paged_bf16/int8 jax.experimental.pallas.ops.gpu.paged_attention (int8 with its
                           k/v_scales_pages);
       ours_bf16/int8/int4 pallas_kernels.decode_attention.gpu, and *_rope with RoPE on
                           pre-RoPE keys;
       ours_kv4            the same kernel on the library's kv4 layout (KIVI): int4 keys
                           with per-channel grids over groups of KEY_GROUP tokens
                           (key_group=, page CHANNEL_PAGE), per-token int4 values, with
                           return_lse=True as lowbit.attention calls it;
       ours_kv2            likewise on the kv2 layout (KIVI-2): 2-bit codes, four a byte.
     Each sample is one jitted call that runs the op over R rotating buffer sets (each set
     its own cache; R sized so a call reads >= CALL_BYTES, far above L2), INNER calls
     queued per sample, median of --iters samples after warm-up.
  4. per case and implementation: median us, effective bandwidth = bytes read (codes +
     scales/offsets of the live tokens + q) / time, its fraction of the measured read
     bandwidth, and the ratio to xla_bf16 (baseline / ours); one DESIGN.md line each in
     <out>/decode_attention.jsonl and a table in <out>/decode_attention.md.

Usage (GPU, ~8 min):  PYTHONUNBUFFERED=1 python -m bench.decode_attention --out $OUT
  --quick          a smoke subset (2 contexts x 2 batches, fewer samples)
  --budget-s 420   stop starting new cases after this many seconds
  --impls a,b      restrict implementations (names above)
  --sweep          instead of the grid: ours_bf16 / ours_int4 over 19 block sizes at
                   (B=1, 128k) and (B=32, 8k) (~5 min)
The first FULL_CASES cases of the priority order run every implementation, later ones
CORE_IMPLS only. CPU check of the script itself: --cpu-smoke (interpret mode, tiny).
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jax.experimental.pallas.ops.gpu import paged_attention as jpa

from bench import common
from pallas_kernels.decode_attention import gpu
from pallas_kernels.decode_attention import reference
from pallas_kernels.decode_attention.config import BlockSizes

BENCH = "decode_attention"
N_HEADS, KV_HEADS, HEAD_DIM, PAGE = 32, 8, 128, 16
# kv4 (lowbit.kv_cache.KV_FORMATS["kv4"]): keys quantized per channel over groups of 32
# tokens; its pages must hold whole groups.
KEY_GROUP, CHANNEL_PAGE = 32, 32
CONTEXTS = (1024, 4096, 8192, 16384, 32768, 65536, 131072)
BATCHES = (1, 8, 32, 64)
IMPLS = ("xla_bf16", "jax_dpa", "jax_paged_bf16", "jax_paged_int8", "ours_bf16", "ours_int8",
         "ours_int4", "ours_kv4", "ours_kv2", "ours_bf16_rope", "ours_int8_rope",
         "ours_int4_rope")
# Cases after the first FULL_CASES of the priority order run only these (time budget).
CORE_IMPLS = ("xla_bf16", "jax_paged_bf16", "ours_bf16", "ours_int8", "ours_int4", "ours_kv4",
              "ours_kv2")
# Code width of each kind of paged set.
KIND_BITS = {"bf16": None, "int8": 8, "int4": 4, "kv4": 4, "kv2": 2}
# Kinds with per-channel key grids (KIVI's layout; lowbit.kv_cache "kv4" and "kv2").
CHANNEL_KINDS = ("kv4", "kv2")
FULL_CASES = 8
# A call reads at least this much (L2 is 50 MB on H100, 60 MB on H200), and at most
# MAX_SETS buffer sets are rotated (each a separate cache; compile time grows with it).
CALL_BYTES = 256 << 20
MAX_SETS = 16
INNER = 4
INTERPRET = False  # --cpu-smoke: the Pallas kernels in interpret mode, tiny shapes


def _key(*ids):
  return jax.random.fold_in(jax.random.key(20261128), hash(ids) % (1 << 30))


# ---------------------------------------------------------------------------------------
# Inputs, generated on the device one kv head at a time (no float32 temporaries of the
# whole cache: a 34 GB bf16 cache must fit next to its own generation)


@functools.partial(jax.jit, static_argnames=("shape", "kind"))
def _rand_heads(key, *, shape, kind):
  """[K, ...] random: kind "bf16" (|x| in [0.5, 1), random sign), "u8" or "i8" bytes."""
  def one(k):
    if kind == "bf16":
      bits = jax.random.bits(k, shape[1:], jnp.uint16)
      return lax.bitcast_convert_type((bits & 0x807F) | 0x3F00, jnp.bfloat16)
    b = jax.random.bits(k, shape[1:], jnp.uint8)
    return b if kind == "u8" else lax.bitcast_convert_type(b, jnp.int8)
  return lax.map(one, jax.random.split(key, shape[0]))


def rand_q(b, i):
  return jax.random.normal(_key("q", b, i), (b, N_HEADS, HEAD_DIM), jnp.float32).astype(
      jnp.bfloat16)


def rand_scales(num_pages, i, tag, lo, hi, grid=(PAGE,)):
  """f32 [K, P, *grid] uniform in [lo, hi): per-token grids [page] by default."""
  return jax.random.uniform(_key("s", tag, num_pages, i), (KV_HEADS, num_pages, *grid),
                            jnp.float32, lo, hi)


def page_of(name):
  """Page size of a kind of paged set or of an implementation's label."""
  return CHANNEL_PAGE if any(kind in name for kind in CHANNEL_KINDS) else PAGE


def paged_set(kind, b, ctx, i):
  """(q, k_pages, v_pages, lengths, page_table, kwargs) of one buffer set."""
  page = page_of(kind)
  pps = ctx // page
  num_pages = b * pps
  hc = HEAD_DIM * (KIND_BITS.get(kind) or 8) // 8  # packed: 8 / bits codes a byte
  shape = (KV_HEADS, num_pages, page, hc)
  rk = "bf16" if kind == "bf16" else ("i8" if kind == "i8sym" else "u8")
  kp = _rand_heads(_key("k", kind, b, ctx, i), shape=shape, kind=rk)
  vp = _rand_heads(_key("v", kind, b, ctx, i), shape=shape, kind=rk)
  table = jax.random.permutation(_key("t", b, ctx, i), num_pages).astype(jnp.int32)
  table = table.reshape(b, pps)
  lengths = jnp.full((b,), ctx, jnp.int32)
  kw = {}
  if kind in ("int8", "int4", "kv4", "kv2"):
    qmax = 2.0 ** KIND_BITS[kind] - 1
    # kv4 / kv2: one key grid per channel and group of KEY_GROUP tokens
    key_grid = (page // KEY_GROUP, HEAD_DIM) if kind in CHANNEL_KINDS else (page,)
    kw = dict(k_scales=rand_scales(num_pages, i, "ks", 2.0, 3.0, key_grid) / qmax,
              k_offsets=rand_scales(num_pages, i, "ko", -1.6, -1.2, key_grid),
              v_scales=rand_scales(num_pages, i, "vs", 2.0, 3.0, (page,)) / qmax,
              v_offsets=rand_scales(num_pages, i, "vo", -1.6, -1.2, (page,)))
  elif kind == "i8sym":
    kw = dict(k_scales_pages=rand_scales(num_pages, i, "ks", 0.01, 0.02),
              v_scales_pages=rand_scales(num_pages, i, "vs", 0.01, 0.02))
  return rand_q(b, i), kp, vp, lengths, table, kw


def dense_set(b, ctx, i):
  shape = (b, ctx, KV_HEADS, HEAD_DIM)
  k = _rand_heads(_key("dk", b, ctx, i), shape=shape, kind="bf16")
  v = _rand_heads(_key("dv", b, ctx, i), shape=shape, kind="bf16")
  return rand_q(b, i), k, v, jnp.full((b,), ctx, jnp.int32)


def inv_freq():
  return 1.0 / 10000.0 ** (jnp.arange(0, HEAD_DIM, 2, dtype=jnp.float32) / HEAD_DIM)


# ---------------------------------------------------------------------------------------
# Baselines written the way a user of XLA would


def xla_bf16_attention(q, k, v, lengths):
  """lowbit.attention.gqa_attention for one query token: q [B, N, H], k/v [B, S, K, H]."""
  b, n, h = q.shape
  kh = k.shape[2]
  qg = q.reshape(b, kh, n // kh, h)
  scores = jnp.einsum("bkgh,bskh->bkgs", qg, k, preferred_element_type=jnp.float32)
  scores = scores * h ** -0.5
  mask = jnp.arange(k.shape[1])[None, :] < lengths[:, None]  # [B, S]
  scores = jnp.where(mask[:, None, None, :], scores, -jnp.inf)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgs,bskh->bkgh", probs, v, preferred_element_type=jnp.float32)
  return out.reshape(b, n, h).astype(q.dtype)


def jax_dpa(q, k, v, lengths, *, implementation):
  out = jax.nn.dot_product_attention(q[:, None], k, v, key_value_seq_lengths=lengths,
                                     implementation=implementation)
  return out[:, 0]


def jax_paged(q, kp, vp, lengths, table, k_scales_pages=None, v_scales_pages=None):
  pps = table.shape[1]
  k_splits = 16
  while pps % k_splits:
    k_splits //= 2
  ppcb = min(8, pps // k_splits)
  return jpa.paged_attention(q, kp, vp, table, lengths, k_scales_pages, v_scales_pages,
                             k_splits=k_splits, pages_per_compute_block=ppcb,
                             interpret=INTERPRET)


def ours(q, kp, vp, lengths, table, *, bits, rope, key_group=None, **kw):
  """Our kernel; per-channel keys (kv4) with the lse, as lowbit.attention calls it."""
  return gpu.decode_attention(q, kp, vp, lengths, table, bits=bits, scale=HEAD_DIM ** -0.5,
                              rope_inv_freq=inv_freq() if rope else None,
                              key_group=key_group, return_lse=key_group is not None,
                              interpret=INTERPRET, **kw)


# ---------------------------------------------------------------------------------------


def rel_err(out, want):
  a = np.asarray(jnp.asarray(out, jnp.float32), np.float64)
  b = np.asarray(jnp.asarray(want, jnp.float32), np.float64)
  if not np.all(np.isfinite(a)):
    return float("inf")
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def live_bytes(impl, b, ctx):
  """Bytes an implementation must read: codes (+ scales, offsets) of the live tokens + q."""
  tokens = b * ctx * KV_HEADS
  q = b * N_HEADS * HEAD_DIM * 2
  if impl.startswith(("ours_kv4", "ours_kv2")):
    # K and V codes (bits / 8 bytes each), 2 f32 per token (values), 2 f32 per channel and
    # KEY_GROUP tokens
    codes = tokens * HEAD_DIM * 2 * KIND_BITS[impl.split("_")[1]] // 8
    return codes + tokens * 8 + tokens * HEAD_DIM * 8 // KEY_GROUP + q
  if "int4" in impl:
    return tokens * HEAD_DIM + tokens * 16 + q  # K and V nibbles, 4 f32 per token
  if impl == "jax_paged_int8":
    return tokens * HEAD_DIM * 2 + tokens * 8 + q  # 2 scales per token
  if "int8" in impl:
    return tokens * HEAD_DIM * 2 + tokens * 16 + q
  return tokens * HEAD_DIM * 4 + q  # bf16 K and V


def time_op(op, sets, *, iters, warmup=2):
  """Median ms of one `op(*set)` over the rotating `sets` (tuples of arrays)."""
  fn = jax.jit(lambda all_sets: [op(*s) for s in all_sets])
  samples = common.time_calls(lambda: fn(sets), warmup=warmup, iters=iters, inner=INNER)
  return common.median(samples) / len(sets), common.spread(samples)


class Bench:

  def __init__(self, args):
    self.args = args
    os.makedirs(args.out, exist_ok=True)
    self.writer = common.ResultWriter(os.path.join(args.out, f"{BENCH}.jsonl"), BENCH)
    self.impls = tuple(args.impls.split(",")) if args.impls else IMPLS
    self.failures = []
    self.table = {}  # (b, ctx) -> {impl: (us, frac, ratio)}
    self.dpa_impl = None

  def guarded(self, label, fn):
    return common.guarded(label, fn, self.failures)

  def ceiling(self):
    bw = common.measure_read_bandwidth((1 << 20) if INTERPRET else (1 << 30),
                                    iters=3 if INTERPRET else 20)
    self.bw = bw["bytes_per_s"]
    print(f"card={self.writer.card} jax={jax.__version__} HBM read={self.bw / 1e12:.2f} TB/s "
          f"(sum of 1 GiB bf16, spread {bw['spread']:.2f})", flush=True)
    self.writer.add(case={"what": "hbm_read", "bytes": bw["bytes_moved"]}, impl="xla_sum",
                    baseline_impl="xla_sum", median_ms=bw["median_ms"],
                    baseline_median_ms=bw["median_ms"], fraction_of_ceiling=None,
                    ceiling="measured HBM read bandwidth", bytes_per_s=self.bw)

  # -- correctness
  def check(self):
    b, ctx = 4, (64 if INTERPRET else 1024) + 37
    lengths = jnp.array([0, 1, 17, ctx], jnp.int32)
    for kind, bits in KIND_BITS.items():
      page = page_of(kind)
      pps = -(-ctx // page)
      q, kp, vp, _, _, kw = paged_set(kind, b, pps * page, 99)
      table = jax.random.permutation(_key("ct", kind), b * pps).astype(jnp.int32)
      table = table.reshape(b, pps)
      for rope, extra in ((False, {}), (True, {}),
                          (True, dict(logit_softcap=30.0, sliding_window=300))):
        label = f"ours {kind}{' rope' if rope else ''}{' softcap+window' if extra else ''}"
        def run():
          fkw = dict(bits=bits, scale=HEAD_DIM ** -0.5,
                     rope_inv_freq=inv_freq() if rope else None, **kw, **extra)
          if kind in CHANNEL_KINDS:  # with the lse, as lowbit.attention asks for it
            fkw.update(key_group=KEY_GROUP, return_lse=True)
          got = gpu.decode_attention(q, kp, vp, lengths, table, interpret=INTERPRET, **fkw)
          want = reference.decode_attention(q, kp, vp, lengths, table, **fkw)
          if kind in CHANNEL_KINDS:
            lse_err = float(jnp.max(jnp.abs(got[1][1:] - want[1][1:])))
            (got, lse_got), want = got, want[0]
            ok_lse = lse_err <= 1e-2 and bool(jnp.all(lse_got[0] == -jnp.inf))
            label_lse = f" lse_err={lse_err:.1e}"
          else:
            ok_lse, label_lse = True, ""
          err = rel_err(got, want)
          ok = err <= 1.5e-2 and bool(jnp.all(got[0] == 0)) and ok_lse
          print(f"check {label:36s} rel_err={err:.2e}{label_lse} {'ok' if ok else 'FAIL'}",
                flush=True)
          if not ok:
            self.failures.append(f"check {label} rel_err={err:.2e}")
        self.guarded(label, run)
    q, kp, vp, lens, table, _ = paged_set("bf16", 2, 256 if INTERPRET else 1024, 98)
    def run_jax():
      got = jax_paged(q, kp, vp, lens, table)
      want = reference.decode_attention(q, kp, vp, lens, table, scale=1.0)
      print(f"check jax_paged_bf16 (scale 1) rel_err={rel_err(got, want):.2e}", flush=True)
    self.guarded("check jax_paged", run_jax)

  # -- speed
  def case(self, b, ctx, impls=None, block_sizes=None, tag=""):
    args = self.args
    bf16_bytes = b * ctx * KV_HEADS * HEAD_DIM * 4
    r = int(min(MAX_SETS, max(1, math.ceil(CALL_BYTES / bf16_bytes))))
    iters = args.iters

    def measure(impl, make_set, op, nsets):
      sets = [make_set(i) for i in range(nsets)]
      common.block(sets)
      ms, spr = time_op(op, sets, iters=iters)
      del sets
      return ms, spr

    def record(impl, ms, spr, base_ms, **extra):
      nbytes = live_bytes(impl, b, ctx)
      frac = nbytes / (ms * 1e-3) / self.bw
      row = self.writer.add(
          case={"batch": b, "context": ctx, "n_heads": N_HEADS, "kv_heads": KV_HEADS,
                "head_dim": HEAD_DIM, "page_size": page_of(impl)},
          impl=impl, baseline_impl="xla_bf16", median_ms=ms, baseline_median_ms=base_ms,
          fraction_of_ceiling=frac, ceiling=f"HBM read {self.bw / 1e12:.2f} TB/s (measured)",
          bytes_read=nbytes, effective_bytes_per_s=nbytes / (ms * 1e-3), spread=spr,
          buffer_sets=r, **extra)
      self.table.setdefault((b, ctx), {})[impl] = (ms * 1e3, frac, row["ratio_vs_baseline"])
      print(f"B={b:3d} ctx={ctx:6d} {impl:16s} {ms * 1e3:10.1f} us  "
            f"{nbytes / (ms * 1e-3) / 1e12:5.2f} TB/s  ceil {frac:.2f}  "
            f"x{row['ratio_vs_baseline']:.2f} vs xla_bf16  (spread {spr:.2f})", flush=True)

    # The baseline first: every ratio needs it.
    base = self.guarded(f"xla_bf16 B={b} ctx={ctx}", lambda: measure(
        "xla_bf16", lambda i: dense_set(b, ctx, i), xla_bf16_attention, r))
    if base is None:
      return
    base_ms = base[0]
    record("xla_bf16", base[0], base[1], base_ms)
    todo = [i for i in (impls or self.impls) if i != "xla_bf16"]
    for impl in todo:
      if impl == "jax_dpa":
        for dpa in ((self.dpa_impl,) if self.dpa_impl else ("cudnn", None)):
          res = self.guarded(f"jax_dpa[{dpa}] B={b} ctx={ctx}", lambda: measure(
              impl, lambda i: dense_set(b, ctx, i),
              functools.partial(jax_dpa, implementation=dpa), r))
          if res is not None:
            self.dpa_impl = dpa or "xla"
            record(impl, *res, base_ms, dpa_implementation=dpa or "xla")
            break
        continue
      if impl.startswith("jax_paged"):
        kind = "bf16" if impl.endswith("bf16") else "i8sym"
        def op(q, kp, vp, lengths, table, kw):
          return jax_paged(q, kp, vp, lengths, table, **kw)
        res = self.guarded(f"{impl} B={b} ctx={ctx}", lambda: measure(
            impl, lambda i: paged_set(kind, b, ctx, i), op, r))
        if res is not None:
          record(impl, *res, base_ms)
        continue
      kind = impl.split("_")[1]
      bits = KIND_BITS[kind]
      rope = impl.endswith("rope")
      for bs in (block_sizes or (None,)):
        def op(q, kp, vp, lengths, table, kw, bits=bits, rope=rope, bs=bs, kind=kind):
          return ours(q, kp, vp, lengths, table, bits=bits, rope=rope, block_sizes=bs,
                      key_group=KEY_GROUP if kind in CHANNEL_KINDS else None, **kw)
        label = impl if bs is None else (
            f"{impl}[ppb={bs.pages_per_block},splits={bs.num_splits},w={bs.num_warps}]")
        res = self.guarded(f"{label} B={b} ctx={ctx}", lambda: measure(
            impl, lambda i: paged_set(kind, b, ctx, i), op, r))
        if res is not None:
          record(label, *res, base_ms, run=tag or "grid",
                 block_sizes=None if bs is None else bs.__dict__)

  def markdown(self, path, elapsed):
    seen = [i for row in self.table.values() for i in row]
    impls = [i for i in IMPLS if i in seen]
    impls += sorted(set(seen) - set(impls))
    lines = [f"# Paged decode attention on {self.writer.card} (jax {jax.__version__})", "",
             f"GQA {N_HEADS}/{KV_HEADS} heads, head dim {HEAD_DIM}, page {PAGE} (kv4 / kv2: "
             f"{CHANNEL_PAGE}, keys per channel over {KEY_GROUP} tokens), every "
             f"sequence at the full context. HBM read ceiling {self.bw / 1e12:.2f} TB/s "
             f"(measured). Cell: median us / fraction of the read ceiling (bytes: codes + "
             f"scales of the live tokens + q) / speed-up vs xla_bf16. Run took "
             f"{elapsed:.0f} s.", "",
             "| B | context | " + " | ".join(impls) + " |",
             "|---|---|" + "---|" * len(impls)]
    for (b, ctx) in sorted(self.table):
      row = self.table[(b, ctx)]
      cells = []
      for i in impls:
        if i in row:
          us, frac, ratio = row[i]
          cells.append(f"{us:.0f} / {frac:.2f} / x{ratio:.2f}")
        else:
          cells.append("-")
      lines.append(f"| {b} | {ctx // 1024}k | " + " | ".join(cells) + " |")
    if self.failures:
      lines += ["", "Failures:", ""] + [f"- {f}" for f in self.failures]
    with open(path, "w") as f:
      f.write("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def case_order(contexts, batches, max_cache_gb):
  """Cases in priority order: a coarse cover of the grid first, then the rest."""
  fits = [(b, c) for c in contexts for b in batches
          if b * c * KV_HEADS * HEAD_DIM * 4 <= max_cache_gb * 1e9]
  first = [(1, 131072), (8, 32768), (32, 8192), (64, 4096), (1, 4096), (32, 32768),
           (8, 131072), (64, 16384), (1, 1024), (1, 32768), (8, 4096), (64, 65536)]
  out = [x for x in first if x in fits]
  return out + [x for x in fits if x not in out]


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
  p.add_argument("--quick", action="store_true", help="smoke subset")
  p.add_argument("--iters", type=int, default=10)
  p.add_argument("--budget-s", type=float, default=400.0,
                 help="no new case starts after this many seconds")
  p.add_argument("--max-cache-gb", type=float, default=40.0)
  p.add_argument("--impls", default=None)
  p.add_argument("--no-check", action="store_true")
  p.add_argument("--sweep", action="store_true",
                 help="only a block-size / split sweep of ours_bf16 and ours_int4 on two cases")
  p.add_argument("--cpu-smoke", action="store_true",
                 help="developer check of this script on a CPU: interpret mode, tiny shapes")
  args = p.parse_args(argv)
  global INTERPRET, CALL_BYTES, INNER
  if args.cpu_smoke:
    INTERPRET, CALL_BYTES, INNER = True, 1, 1
    args.iters = 2
  t0 = time.time()
  if args.cpu_smoke:
    cases = [(1, 256), (2, 128)]
  elif args.quick:
    args.iters = min(args.iters, 5)
    cases = [(1, 4096), (32, 32768), (1, 32768), (32, 4096)]
  else:
    cases = case_order(CONTEXTS, BATCHES, args.max_cache_gb)
  b = Bench(args)
  b.ceiling()
  if not args.no_check:
    b.check()
    print(f"[checks done at {time.time() - t0:.0f}s]", flush=True)
  skipped = []
  if args.sweep:
    sweep = [None] + [BlockSizes(pages_per_block=ppb, num_splits=sp, num_warps=w)
                      for ppb in (4, 8, 16) for sp in (None, 16, 128) for w in (4, 8)]
    for (bb, ctx) in ((1, 131072), (32, 8192)):
      b.guarded(f"sweep B={bb} ctx={ctx}", lambda: b.case(
          bb, ctx, impls=("ours_bf16", "ours_int4"), block_sizes=sweep, tag="sweep"))
      print(f"[sweep B={bb} ctx={ctx} done at {time.time() - t0:.0f}s]", flush=True)
    cases = []
  for n_case, (bb, ctx) in enumerate(cases):
    if time.time() - t0 > args.budget_s:
      skipped.append((bb, ctx))
      continue
    impls = None if (n_case < FULL_CASES or args.quick or args.impls) else CORE_IMPLS
    b.guarded(f"case B={bb} ctx={ctx}", lambda: b.case(bb, ctx, impls=impls))
    print(f"[B={bb} ctx={ctx} done at {time.time() - t0:.0f}s]", flush=True)
  if skipped:
    msg = f"skipped for time (--budget-s {args.budget_s:.0f}): {skipped}"
    print(msg, flush=True)
    b.failures.append(msg)
  b.markdown(os.path.join(args.out, f"{BENCH}.md"), time.time() - t0)
  print(f"{len(b.failures)} failures / notes", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
