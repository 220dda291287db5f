"""Hugging Face parameter names <-> lowbit's flat parameter names.

Importers (GGUF, safetensors) produce a flat dict keyed by lowbit names, so the model, the
compression rules and checkpoints see one naming whatever the source. Weights keep the Hugging
Face layout [out, in], and norms the Hugging Face convention (a Gemma norm weight is the `w`
in x * (1 + w)). lowbit names, per layer i:

  embed.embedding                      [V, D]
  layers.{i}.input_norm.scale          [D]
  layers.{i}.attn.q_proj.weight        [N*H, D]   (+ .bias [N*H] with attention_bias)
  layers.{i}.attn.k_proj.weight        [K*H, D]   (+ .bias [K*H])
  layers.{i}.attn.v_proj.weight        [K*H, D]   (+ .bias [K*H])
  layers.{i}.attn.o_proj.weight        [D, N*H]
  layers.{i}.attn.q_norm.scale         [H]        (qk_norm: Gemma 3)
  layers.{i}.attn.k_norm.scale         [H]
  layers.{i}.post_attn_norm.scale      [D]        (sandwich_norms: Gemma 3)
  layers.{i}.pre_mlp_norm.scale        [D]
  layers.{i}.post_mlp_norm.scale       [D]        (sandwich_norms)
  layers.{i}.mlp.gate_proj.weight      [F, D]
  layers.{i}.mlp.up_proj.weight        [F, D]
  layers.{i}.mlp.down_proj.weight      [D, F]
  final_norm.scale                     [D]
  lm_head.weight                       [V, D]     (only with untied embeddings)
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from models.config import ARCHITECTURES, ModelConfig
from models.loading import parameter_shapes

# Hugging Face names that are buffers, not parameters (older Llama checkpoints saved them).
_IGNORED_HF = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")

_GLOBAL = {
    "model.embed_tokens.weight": "embed.embedding",
    "model.norm.weight": "final_norm.scale",
    "lm_head.weight": "lm_head.weight",
}

# Biases only on q/k/v (Qwen2); an o_proj bias is an unknown name.
_ATTN = {f"self_attn.{p}_proj.weight": f"attn.{p}_proj.weight" for p in "qkvo"}
_ATTN.update({f"self_attn.{p}_proj.bias": f"attn.{p}_proj.bias" for p in "qkv"})
_MLP = {f"mlp.{p}_proj.weight": f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")}

# Per-layer suffixes. Llama's post_attention_layernorm is the norm before the MLP; Gemma 3
# names that one pre_feedforward_layernorm and uses post_attention_layernorm after attention.
_LAYER = {
    "llama": {
        "input_layernorm.weight": "input_norm.scale",
        "post_attention_layernorm.weight": "pre_mlp_norm.scale",
        **_ATTN, **_MLP,
    },
    "gemma3": {
        "input_layernorm.weight": "input_norm.scale",
        "post_attention_layernorm.weight": "post_attn_norm.scale",
        "pre_feedforward_layernorm.weight": "pre_mlp_norm.scale",
        "post_feedforward_layernorm.weight": "post_mlp_norm.scale",
        "self_attn.q_norm.weight": "attn.q_norm.scale",
        "self_attn.k_norm.weight": "attn.k_norm.scale",
        **_ATTN, **_MLP,
    },
}
_LAYER["qwen2"] = _LAYER["mistral"] = _LAYER["llama"]

_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_LOWBIT_LAYER = re.compile(r"layers\.(\d+)\.(.+)")


def _layer_table(architecture: str) -> dict[str, str]:
  if architecture not in ARCHITECTURES:
    raise ValueError(f"unknown architecture {architecture!r}; supported: {ARCHITECTURES}")
  return _LAYER[architecture]


def hf_name_to_lowbit(architecture: str, name: str) -> str | None:
  """The lowbit name of one Hugging Face tensor; None for buffers that are not parameters."""
  table = _layer_table(architecture)
  if _IGNORED_HF.fullmatch(name):
    return None
  if name in _GLOBAL:
    return _GLOBAL[name]
  m = _HF_LAYER.fullmatch(name)
  if m and m.group(2) in table:
    return f"layers.{m.group(1)}.{table[m.group(2)]}"
  raise ValueError(f"unknown {architecture} tensor name {name!r}")


def lowbit_name_to_hf(architecture: str, name: str) -> str:
  """The Hugging Face name of one lowbit tensor."""
  inverse = {v: k for k, v in _layer_table(architecture).items()}
  for hf, ours in _GLOBAL.items():
    if name == ours:
      return hf
  m = _LOWBIT_LAYER.fullmatch(name)
  if m and m.group(2) in inverse:
    return f"model.layers.{m.group(1)}.{inverse[m.group(2)]}"
  raise ValueError(f"unknown lowbit parameter name {name!r} for {architecture}")


def _to_numpy(value: Any) -> np.ndarray:
  # torch tensors (a transformers state dict) expose .numpy(); everything else goes through
  # np.asarray, which also accepts jax arrays.
  if hasattr(value, "detach"):
    value = value.detach().cpu().numpy()
  return np.asarray(value)


def hf_to_lowbit(architecture: str, hf_state: Mapping[str, Any],
                 tie_word_embeddings: bool | None = None) -> dict[str, np.ndarray]:
  """Renames a Hugging Face state dict to lowbit names.

  A tied lm_head is a duplicate of the embedding, and lowbit stores it once: it is dropped when
  `tie_word_embeddings` is True, or, when that is None, when it equals the embedding.
  """
  params = {}
  for name, value in hf_state.items():
    ours = hf_name_to_lowbit(architecture, name)
    if ours is not None:
      params[ours] = _to_numpy(value)
  if "lm_head.weight" in params:
    if tie_word_embeddings is None:
      embed = params.get("embed.embedding")
      tie_word_embeddings = embed is not None and np.array_equal(embed, params["lm_head.weight"])
    if tie_word_embeddings:
      del params["lm_head.weight"]
  return params


def lowbit_to_hf(architecture: str, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Renames lowbit parameters to a Hugging Face state dict (no lm_head when tied)."""
  return {lowbit_name_to_hf(architecture, k): _to_numpy(v) for k, v in params.items()}


def validate_params(config: ModelConfig, params: Mapping[str, Any], source: str) -> None:
  """Raises ValueError naming the first missing, unexpected or misshapen tensor of `source`."""
  validate_shapes(config, {k: tuple(np.shape(v)) for k, v in params.items()}, source)


def validate_shapes(config: ModelConfig, shapes: Mapping[str, tuple[int, ...]],
                    source: str) -> None:
  """`validate_params` on shapes alone, so importers can check before converting anything."""
  expected = parameter_shapes(config)
  missing = [k for k in expected if k not in shapes]
  if missing:
    raise ValueError(f"{source}: missing tensor {missing[0]!r} (expected shape "
                     f"{expected[missing[0]]}); {len(missing)} missing in all")
  extra = [k for k in shapes if k not in expected]
  if extra:
    raise ValueError(f"{source}: unexpected tensor {extra[0]!r} with shape {shapes[extra[0]]} "
                     f"for this config; {len(extra)} unexpected in all")
  for name, shape in expected.items():
    if tuple(shapes[name]) != shape:
      raise ValueError(f"{source}: tensor {name!r} has shape {tuple(shapes[name])}, "
                       f"expected {shape}")
