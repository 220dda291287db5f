"""Quantized matmuls (W4A16 / W8A16, W8A8, Atom W4A4 + int8 tail, FP8) for GPU and TPU.

reference.py is the plain-jnp oracle, gpu.py the Pallas-Triton kernels, tpu.py the
Pallas-Mosaic kernels, config.py their block sizes, and api.py the dispatchers exported
here (DESIGN.md "Kernels").
"""

from pallas_kernels.quantized_matmul.api import fp8_matmul
from pallas_kernels.quantized_matmul.api import IMPLEMENTATIONS
from pallas_kernels.quantized_matmul.api import int8_matmul
from pallas_kernels.quantized_matmul.api import w4a4_matmul
from pallas_kernels.quantized_matmul.api import weight_only_matmul
from pallas_kernels.quantized_matmul.config import BlockSizes
from pallas_kernels.quantized_matmul.config import TpuBlockSizes
from pallas_kernels.quantized_matmul.reference import pack_4bit
from pallas_kernels.quantized_matmul.reference import unpack_4bit
