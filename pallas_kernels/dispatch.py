"""What every op's api.py shares: the backend's default order of implementations, the
check of an `implementation=` override, and the keyword arguments that reach a Pallas
implementation.

`block_sizes=` must be the block-size type of the implementation it reaches (GPU or TPU);
`interpret=` runs a Pallas kernel on the CPU. XLA implementations take neither.
"""

from __future__ import annotations

from typing import Any, Sequence

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


def kernel_kwargs(name: str, block_sizes, interpret, *, gpu_type: type,
                  tpu_type: type) -> dict[str, Any]:
  """The extra keyword arguments of implementation `name` ("pallas_gpu", "pallas_tpu", or
  an XLA one, which takes none)."""
  if not name.startswith("pallas"):
    return {}
  want = gpu_type if name == "pallas_gpu" else tpu_type
  kwargs: dict[str, Any] = {"interpret": interpret}
  if block_sizes is not None:
    if not isinstance(block_sizes, want):
      raise TypeError(f"{name} takes block_sizes of type {want.__name__}, got "
                      f"{type(block_sizes).__name__}")
    kwargs["block_sizes"] = block_sizes
  return kwargs
