"""The compiler parameters of a Pallas GPU kernel that lowers through Triton, and the
checks every op's block sizes share.

Every GPU `pallas_call` of this package passes them explicitly: recent JAX lowers a bare
`pallas_call` through Mosaic GPU instead. jax 0.10 and 0.11 name the class
`CompilerParams`; older releases `TritonCompilerParams`.
"""

from jax.experimental.pallas import triton as plgpu

TritonCompilerParams = getattr(plgpu, "CompilerParams", None) or getattr(
    plgpu, "TritonCompilerParams")


def is_pow2(x: int) -> bool:
  return x > 0 and x & (x - 1) == 0


def check_launch(num_warps: int, num_stages: int) -> None:
  """ValueError unless (num_warps, num_stages) is a Triton launch configuration."""
  if num_warps not in (1, 2, 4, 8, 16):
    raise ValueError(f"num_warps={num_warps} must be a power of two <= 16")
  if num_stages < 1:
    raise ValueError(f"num_stages={num_stages} must be >= 1")
