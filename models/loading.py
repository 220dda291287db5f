"""Building a `DecoderLM` from a flat parameter dict, and loading pretrained models by name.

The model skeleton is built abstractly (`nnx.eval_shape`: no random init of large arrays)
and every parameter is filled from the dict after a shape check, so a missing, extra or
misshapen tensor is an error that names it, never a silently random weight.
"""

from __future__ import annotations

from typing import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.config import ModelConfig
from models.transformer import DecoderLM


def parameter_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
  """Flat parameter name -> shape, as the model defines them."""
  abstract = nnx.eval_shape(lambda: DecoderLM(config, rngs=nnx.Rngs(0)))
  return {_name(path): tuple(v.shape) for path, v in nnx.to_flat_state(nnx.state(abstract))}


def from_params(config: ModelConfig, params: Mapping[str, np.ndarray], *,
                dtype=jnp.float32) -> DecoderLM:
  """A model whose every parameter comes from `params` (flat names, see models/transformer)."""
  abstract = nnx.eval_shape(lambda: DecoderLM(config, dtype=dtype, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  flat = nnx.to_flat_state(state)
  expected = {_name(path) for path, _ in flat}
  missing = sorted(expected - set(params))
  extra = sorted(set(params) - expected)
  if missing or extra:
    raise ValueError(f"parameters do not match the {config.architecture} model: "
                     f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                     f"unexpected {extra[:8]}{'...' if len(extra) > 8 else ''}")
  for path, variable in flat:
    name = _name(path)
    value = params[name]
    if tuple(value.shape) != tuple(variable.shape):
      raise ValueError(f"parameter {name} has shape {tuple(value.shape)}, "
                       f"expected {tuple(variable.shape)}")
    variable.set_value(jnp.asarray(value, dtype=dtype))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _name(path) -> str:
  return ".".join(str(part) for part in path)


def load_pretrained(name_or_path: str, *, dtype=jnp.float32):
  """(model, tokenizer) from a known name, a .gguf file or a Hugging Face folder."""
  from models import hub
  from models.gguf_import import load_gguf
  from models.safetensors_import import load_hf_folder
  from models.tokenizer import Tokenizer

  path = hub.resolve_model(name_or_path)
  if path.is_dir():
    config, params, tokenizer_folder = load_hf_folder(path)
    if tokenizer_folder is None:
      raise ValueError(f"{path}: no tokenizer.json, so the model cannot read text")
    tokenizer = Tokenizer.from_hf_folder(tokenizer_folder)
  else:
    config, params, metadata = load_gguf(path)
    tokenizer = Tokenizer.from_gguf_metadata(metadata)
  return from_params(config, params, dtype=dtype), tokenizer
