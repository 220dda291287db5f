"""Paged decode attention over bf16 / int8 / int4 / int2 KV pages (GQA, RoPE on pre-RoPE
keys, logit soft cap, sliding window; keys with per-token or per-channel (KIVI) grids; the
log-sum-exp on request) for GPU and TPU.

reference.py is the plain-jnp oracle and XLA fallback, gpu.py the Pallas-Triton
flash-decoding kernel, tpu.py the Pallas-Mosaic kernel, config.py their block sizes, and
api.py the dispatcher exported here (DESIGN.md "Kernels").
"""

from pallas_kernels.decode_attention.api import decode_attention
from pallas_kernels.decode_attention.api import IMPLEMENTATIONS
from pallas_kernels.decode_attention.config import BlockSizes
from pallas_kernels.decode_attention.config import TpuBlockSizes
from pallas_kernels.decode_attention.reference import pack_codes
from pallas_kernels.decode_attention.reference import pack_halves
from pallas_kernels.decode_attention.reference import unpack_codes
from pallas_kernels.decode_attention.reference import unpack_halves
