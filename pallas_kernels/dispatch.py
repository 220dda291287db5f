"""What every op's api.py shares: the backend's default order of implementations, the
check of an `implementation=` override, the keyword arguments that reach a Pallas
implementation, and the call of the first implementation that serves the case.

The rules every dispatcher follows (quantized_matmul's api adds measured exceptions):

  implementation=None     the backend's order: "pallas_gpu" then "xla" on a GPU,
                          "pallas_tpu" then "xla" on a TPU, "xla" elsewhere; a kernel that
                          cannot serve the case raises NotImplementedError and the next is
                          tried.
  implementation="name"   that implementation only; its errors propagate.
  implementation=(...)    that order.

"xla" is the op's `reference.py` (plain jnp, correct everywhere). `block_sizes=` must be
the block-size type of the implementation it reaches (`BlockSizes` for GPU,
`TpuBlockSizes` for TPU, the op's own type for a Mosaic GPU kernel); `interpret=` runs a
Pallas kernel on the CPU (True for a GPU kernel, `pltpu.InterpretParams()` for a TPU one).
XLA implementations take neither.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax


def backend_order() -> tuple[str, ...]:
  """The default order: the backend's Pallas kernel, then the XLA reference."""
  return {"gpu": ("pallas_gpu", "xla"), "tpu": ("pallas_tpu", "xla")}.get(
      jax.default_backend(), ("xla",))


def requested_order(implementation: str | Sequence[str],
                    known: Sequence[str]) -> tuple[str, ...]:
  """An `implementation=` override (a name or a sequence of names) as a checked tuple."""
  names = (implementation,) if isinstance(implementation, str) else tuple(implementation)
  if not names:
    raise ValueError("implementation=() names no implementation")
  for name in names:
    if name not in known:
      raise ValueError(f"implementation={name!r} is not one of {tuple(known)}")
  return names


def kernel_kwargs(name: str, block_sizes, interpret, *, gpu_type: type, tpu_type: type,
                  mosaic_type: type | None = None) -> dict[str, Any]:
  """The extra keyword arguments of implementation `name` ("pallas_gpu", "pallas_tpu",
  "mosaic_gpu", or an XLA one, which takes none)."""
  want = {"pallas_gpu": gpu_type, "pallas_tpu": tpu_type, "mosaic_gpu": mosaic_type}.get(name)
  if want is None:
    return {}
  kwargs: dict[str, Any] = {"interpret": interpret}
  if block_sizes is not None:
    if not isinstance(block_sizes, want):
      raise TypeError(f"{name} takes block_sizes of type {want.__name__}, got "
                      f"{type(block_sizes).__name__}")
    kwargs["block_sizes"] = block_sizes
  return kwargs


def call_first(op: str, names: Sequence[str], fns: Mapping[str, Callable], args: tuple,
               kwargs: Mapping[str, Any], *, block_sizes, interpret, gpu_type: type,
               tpu_type: type, mosaic_type: type | None = None):
  """`fns[name](*args, **kwargs)` (plus its kernel keyword arguments) for the first name in
  `names` that serves the case: an implementation that cannot raises NotImplementedError
  and the next is tried. With one name its own error propagates; otherwise all are named."""
  errors = []
  for name in names:
    fn = fns.get(name)
    if fn is None:
      errors.append(NotImplementedError(f"{op}: no {name} implementation"))
      continue
    try:
      return fn(*args, **kwargs, **kernel_kwargs(name, block_sizes, interpret,
                                                 gpu_type=gpu_type, tpu_type=tpu_type,
                                                 mosaic_type=mosaic_type))
    except NotImplementedError as e:
      errors.append(e)
  if len(names) == 1:
    raise errors[0]
  raise NotImplementedError(f"{op}: no implementation in {tuple(names)} serves this case: "
                            + "; ".join(str(e) for e in errors))
