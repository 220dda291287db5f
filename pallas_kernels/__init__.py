"""Pallas kernels for GPU and TPU, one folder per op; depends on JAX alone.

Each op folder holds reference.py (plain jnp), gpu.py, tpu.py, api.py and config.py
(DESIGN.md, "Kernels"). The quantized matmul and attention kernels arrive with their issues.
"""
