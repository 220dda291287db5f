"""The compiler parameters of a Pallas GPU kernel that lowers through Triton.

Every GPU `pallas_call` of this package passes them explicitly: recent JAX lowers a bare
`pallas_call` through Mosaic GPU instead. jax 0.10 and 0.11 name the class
`CompilerParams`; older releases `TritonCompilerParams`.
"""

from jax.experimental.pallas import triton as plgpu

TritonCompilerParams = getattr(plgpu, "CompilerParams", None) or getattr(
    plgpu, "TritonCompilerParams")
