"""Palu latent decode attention (SPEC.md 2): keys rebuilt from per-group latents by the
K up-projection, rotated, and scored inside the op; values stay latent (the caller applies
the V up-projection) — GPU and TPU.

reference.py is the plain-jnp oracle and XLA fallback, gpu.py the Pallas-Triton
flash-decoding kernel, tpu.py the Pallas-Mosaic kernel, config.py their block sizes, and
api.py the dispatcher exported here (DESIGN.md "Kernels").
"""

from pallas_kernels.latent_decode_attention.api import IMPLEMENTATIONS
from pallas_kernels.latent_decode_attention.api import latent_decode_attention
from pallas_kernels.latent_decode_attention.config import BlockSizes
from pallas_kernels.latent_decode_attention.config import TpuBlockSizes
