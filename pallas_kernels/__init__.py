"""Pallas kernels for GPU and TPU, one folder per op; depends on JAX alone.

Each op folder holds reference.py (plain jnp), gpu.py, tpu.py, api.py and config.py
(DESIGN.md, "Kernels"). `quantized_matmul/` holds W4A16 / W8A16, W8A8, Atom's W4A4 with its
int8 outlier tail, and FP8; the attention kernels arrive with their issues.
`triton_offline.py` is a developer tool that compiles a Pallas-Triton kernel for Hopper on a
machine without a GPU (SASS, registers, spills) with a pip-installed `triton`.
"""
