"""lowbit: compress pretrained decoder LLMs and run them compressed, in JAX.

Layers (imports point down only): train -> models -> lowbit -> pallas_kernels.
`lowbit` holds the formats, transforms and the Flax building blocks models are written with.
"""
