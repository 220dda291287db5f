"""The dynamic activation quantizer (per token, per group, 4 or 8 bits, optional channel
gather, Atom's int8 outlier tail and a fused RMSNorm) feeding the integer matmuls of
`pallas_kernels.quantized_matmul`, for GPU and TPU.

reference.py is the plain-jnp oracle and XLA fallback, gpu.py the Pallas-Triton kernel,
tpu.py the Pallas-Mosaic kernel, config.py their block sizes, and api.py the dispatcher
exported here (DESIGN.md "Kernels").
"""

from pallas_kernels.activation_quant.api import IMPLEMENTATIONS
from pallas_kernels.activation_quant.api import quantize_activations
from pallas_kernels.activation_quant.config import BlockSizes
from pallas_kernels.activation_quant.config import TpuBlockSizes
from pallas_kernels.activation_quant.reference import QuantizedActivations
