"""Compile a Pallas-Triton kernel for a Hopper GPU on a machine without one (dev tool).

Pallas lowers a `pallas_call` to Triton IR (TTIR) inside jaxlib; the GPU machine then
compiles it with Triton. This tool prints that TTIR during a CPU lowering for the "cuda"
platform (`debug=True`) and hands it to a pip-installed `triton` (use the GPU machine's
version, 3.6.0 at the time of writing) targeting sm_90, which gives the PTX, the cubin, the
shared-memory size and, through the cuobjdump / nvdisasm that ship in the triton wheel,
the SASS: whether the tensor-core instructions are the ones meant (HGMMA / IGMMA / QGMMA
for wgmma, HMMA / IMMA for mma.sync), whether loads are 16 bytes wide, and the register
count and spills (ptxas -v).

Usage:
  PYTHONPATH=/path/with/triton python -m pallas_kernels.triton_offline   # self-check
or from Python:
  report = compile_for_hopper(fn, *shape_dtype_structs)

`triton` is not a dependency of the library; this module imports it lazily and only for
this purpose. Pass `triton_path=` (or TRITON_OFFLINE_PATH) when it lives outside
sys.path (e.g. a `pip install --target` folder).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import re
import subprocess
import sys
import tempfile
from typing import Any, Callable

import jax


@dataclasses.dataclass
class KernelReport:
  name: str
  num_warps: int
  num_stages: int
  shared_bytes: int
  registers: int | None
  spill_bytes: int | None
  mma_counts: dict[str, int]
  ptx: str
  sass: str
  ttgir: str = ""
  loop_ops: dict[str, int] = dataclasses.field(default_factory=dict)


def _ttir_modules(fn: Callable, args) -> list[tuple[str, str, int, int]]:
  """(name, ttir, num_warps, num_stages) of every pallas_call that `fn` lowers to."""
  buf = io.StringIO()
  with contextlib.redirect_stdout(buf):
    lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
  hlo = lowered.as_text()
  configs = re.findall(r"num_stages = (\d+) : i32, num_warps = (\d+) : i32", hlo)
  text = buf.getvalue()
  mods = []
  for i, part in enumerate(text.split("The Triton module for pallas_call")[1:]):
    body = part[part.index("\n") + 1:]
    end = body.find("\nThe kernel jaxpr")
    body = body if end < 0 else body[:end]
    name = re.search(r"tt.func public @(\w+)", body).group(1)
    stages, warps = (int(c) for c in configs[i]) if i < len(configs) else (3, 4)
    mods.append((name, body, warps, stages))
  return mods


def _clean(ttir: str) -> str:
  ttir = re.sub(r' "[^"\n]*"\(#loc\d*\)', "", ttir)
  ttir = re.sub(r" \[unknown\]", "", ttir)
  ttir = re.sub(r" loc\([^()\n]*(\([^()\n]*\))?[^()\n]*\)", "", ttir)
  lines = ttir.splitlines()
  start = next(i for i, l in enumerate(lines) if l.startswith("module"))
  end = next((i for i in range(start, len(lines)) if lines[i].startswith("#loc")),
             len(lines))
  return "\n".join(lines[start:end])


def loop_body(sass: str) -> dict[str, int]:
  """Opcode counts of the largest loop in `sass` (a backward branch to an earlier address)."""
  insts = []
  for line in sass.splitlines():
    mm = re.search(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[0-9T]+\s+)?([A-Z0-9_]+)([^;]*);", line)
    if mm:
      insts.append((int(mm.group(1), 16), mm.group(3), mm.group(4)))
  best = (0, 0)
  for i, (addr, op, rest) in enumerate(insts):
    target = re.search(r"0x([0-9a-f]+)", rest) if op == "BRA" else None
    if target and int(target.group(1), 16) < addr:
      start = int(target.group(1), 16)
      j0 = next(j for j, ins in enumerate(insts) if ins[0] >= start)
      if i - j0 > best[1] - best[0]:
        best = (j0, i + 1)
  counts: dict[str, int] = {}
  for _, op, _ in insts[best[0]:best[1]]:
    counts[op] = counts.get(op, 0) + 1
  return counts


def compile_for_hopper(fn: Callable, *args: Any, triton_path: str | None = None,
                       debug_flag: bool = True) -> list[KernelReport]:
  """Lowers `fn(*args)` for cuda on this machine and compiles each Triton kernel for sm_90.

  `fn` must build its pallas_calls with `debug=True` printing enabled; the kernels in
  `pallas_kernels` take no debug flag, so this patches `pl.pallas_call` for the trace.
  """
  triton_path = triton_path or os.environ.get("TRITON_OFFLINE_PATH")
  if triton_path and triton_path not in sys.path:
    sys.path.insert(0, triton_path)
  import triton  # pylint: disable=g-import-not-at-top
  from triton.backends.compiler import GPUTarget  # pylint: disable=g-import-not-at-top

  from jax.experimental import pallas as pl  # pylint: disable=g-import-not-at-top
  original = pl.pallas_call

  def debug_call(*a, **kw):
    kw["debug"] = debug_flag
    return original(*a, **kw)

  pl.pallas_call = debug_call
  try:
    mods = _ttir_modules(fn, args)
  finally:
    pl.pallas_call = original
  bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
  reports = []
  with tempfile.TemporaryDirectory() as tmp:
    for name, ttir, warps, stages in mods:
      path = os.path.join(tmp, f"{name}.ttir")
      with open(path, "w") as f:
        f.write(_clean(ttir))
      kernel = triton.compile(path, target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=warps, num_stages=stages))
      cubin = os.path.join(tmp, f"{name}.cubin")
      with open(cubin, "wb") as f:
        f.write(kernel.asm["cubin"])
      sass = subprocess.run([os.path.join(bindir, "cuobjdump"), "-sass", cubin],
                            capture_output=True, text=True).stdout
      ptx_path = os.path.join(tmp, f"{name}.ptx")
      with open(ptx_path, "w") as f:
        f.write(kernel.asm["ptx"])
      info = subprocess.run([os.path.join(bindir, "ptxas"), "-arch=sm_90a", "-v", ptx_path,
                             "-o", os.path.join(tmp, "x.o")], capture_output=True,
                            text=True).stderr
      regs = re.search(r"Used (\d+) registers", info)
      spill = re.search(r"(\d+) bytes spill stores", info)
      ops = re.findall(r"\b(HGMMA|IGMMA|QGMMA|HMMA|IMMA|LDGSTS|UTMALDG|LDG\.E\.128|"
                       r"I2F[.\w]*|F2FP[.\w]*|RED[.\w]*|ATOM[.\w]*)\b", sass)
      counts: dict[str, int] = {}
      for op in ops:
        counts[op] = counts.get(op, 0) + 1
      loop = loop_body(sass)
      reports.append(KernelReport(
          name=name, num_warps=warps, num_stages=stages,
          shared_bytes=int(kernel.metadata.shared), registers=regs and int(regs.group(1)),
          spill_bytes=spill and int(spill.group(1)), mma_counts=counts, loop_ops=loop,
          ptx=kernel.asm["ptx"], sass=sass, ttgir=kernel.asm.get("ttgir", "")))
  return reports


def _self_check() -> None:
  import functools  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from pallas_kernels.quantized_matmul import gpu  # pylint: disable=g-import-not-at-top
  sds = jax.ShapeDtypeStruct
  m, n, k, g = 16, 4096, 4096, 128
  cases = {
      "w4a16 m16": (functools.partial(gpu.weight_only_matmul, bits=4, group_size=g),
                    (sds((m, k), jnp.bfloat16), sds((n, k // 2), jnp.int8),
                     sds((n, k // g), jnp.float32))),
      "w4a16 m1024": (functools.partial(gpu.weight_only_matmul, bits=4, group_size=g),
                      (sds((1024, k), jnp.bfloat16), sds((n, k // 2), jnp.int8),
                       sds((n, k // g), jnp.float32))),
      "int8 m4096": (gpu.int8_matmul, (sds((4096, k), jnp.int8), sds((4096, 1), jnp.float32),
                                       sds((n, k), jnp.int8), sds((n, 1), jnp.float32))),
      "fp8 m4096": (gpu.fp8_matmul, (sds((4096, k), jnp.float8_e4m3fn),
                                     sds((4096, 1), jnp.float32),
                                     sds((n, k), jnp.float8_e4m3fn), sds((n, 1), jnp.float32))),
      "w4a4 m4096": (gpu.w4a4_matmul, (sds((4096, (k - 128) // 2), jnp.int8),
                                       sds((4096, (k - 128) // g), jnp.float32),
                                       sds((n, (k - 128) // 2), jnp.int8),
                                       sds((n, (k - 128) // g), jnp.float32),
                                       sds((4096, 128), jnp.int8), sds((4096, 1), jnp.float32),
                                       sds((n, 128), jnp.int8), sds((n, 1), jnp.float32))),
  }
  for label, (fn, args) in cases.items():
    for r in compile_for_hopper(fn, *args):
      print(f"{label:12s} {r.name:28s} warps={r.num_warps} stages={r.num_stages} "
            f"smem={r.shared_bytes} regs={r.registers} spill={r.spill_bytes} {r.mma_counts}")


if __name__ == "__main__":
  _self_check()
