"""Fold the scales of the RMSNorms that feed linear layers into those layers' weights.

Motivation (QuaRot, SliceGPT): a pre-norm block computes W (s * x_hat), x_hat the normalized
residual and s the norm's per-channel scale. The product equals (W diag(s)) x_hat, so the
scale can live in the weight instead of the activation. An activation quantizer then sees
x_hat, whose channels no longer carry the norm's scale (norm scales of small models reach
tens in a few channels), and the weight quantizer (GPTQ, with its Hessian) absorbs it.
After the fold the norm multiplies by one: s = 1 (s = 0 for Gemma's (1 + s) norms), so the
parameter paths and the model code are unchanged.

Which norms feed which linears is the model's block layout: `input_norm` feeds
`attn.{q,k,v}_proj` and `pre_mlp_norm` feeds `mlp.{gate,up}_proj` (lowbit never imports
`models`; a block without these attributes is refused). A block's sandwich norms
(Gemma 3's `post_attn_norm`, `post_mlp_norm`) scale linear *outputs* and are left alone.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

# norm attribute of a block -> (sub-module, linears it feeds)
FOLDS = (("input_norm", "attn", ("q_proj", "k_proj", "v_proj")),
         ("pre_mlp_norm", "mlp", ("gate_proj", "up_proj")))


def fold_norm_scales(model: nnx.Module) -> nnx.Module:
  """A copy of `model` (not modified) with every pre-norm's scale folded into the weights
  of the linears it feeds (module docstring). Float weights only: folding into a quantized
  leaf would change its grid, so compress first from the float model."""
  folded = nnx.clone(model)
  for i, block in enumerate(folded.layers):
    for norm_name, owner_name, linear_names in FOLDS:
      try:
        norm = getattr(block, norm_name)
        linears = [getattr(getattr(block, owner_name), n) for n in linear_names]
      except AttributeError as e:
        raise TypeError(f"layers.{i} has no {norm_name} -> {owner_name}.{linear_names} "
                        f"layout to fold norm scales into: {e}") from e
      scale = norm.scale.get_value()
      multiplier = (1.0 + scale.astype(jnp.float32)) if norm.plus_one else scale
      for name, linear in zip(linear_names, linears):
        weight = linear.weight.get_value()
        if not isinstance(weight, (jnp.ndarray, np.ndarray)):
          raise TypeError(f"layers.{i}.{owner_name}.{name} holds a "
                          f"{type(weight).__name__}; fold norm scales before compressing")
        linear.weight.set_value((weight * multiplier[None, :]).astype(weight.dtype))
      norm.scale.set_value(jnp.zeros_like(scale) if norm.plus_one else jnp.ones_like(scale))
  return folded
