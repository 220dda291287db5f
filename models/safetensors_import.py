"""Loads a Hugging Face model folder (config.json + safetensors) as a ModelConfig and float32
lowbit parameters, without torch.

Both config conventions are read: transformers 4.x (`rope_theta`, `rope_scaling`,
`rope_local_base_freq`, `sliding_window_pattern`) and 5.x (`rope_parameters`, per layer type for
Gemma 3, and `layer_types`). The safetensors files are parsed here: the format is an 8-byte
header length, a JSON header and raw little-endian data, and bf16 widens to f32 by a shift,
so neither torch nor a bfloat16 numpy type is needed.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np

from models import hf_names
from models.config import LayerType, ModelConfig, RopeScaling, for_architecture

_MODEL_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2",
                "gemma3_text": "gemma3", "gemma3": "gemma3"}
_LAYER_TYPES: dict[str, LayerType] = {"full_attention": "full", "sliding_attention": "sliding"}
# transformers' class defaults for keys a config.json may leave out (an explicit null stays).
_CLASS_DEFAULTS = {
    "llama": {"max_position_embeddings": 2048, "tie_word_embeddings": False},
    "mistral": {"max_position_embeddings": 131072, "tie_word_embeddings": False,
                "sliding_window": 4096},
    "qwen2": {"max_position_embeddings": 32768, "tie_word_embeddings": False,
              "sliding_window": 4096, "max_window_layers": 28},
    "gemma3": {"max_position_embeddings": 131072, "tie_word_embeddings": True,
               "sliding_window": 4096, "query_pre_attn_scalar": 256},
}
_ROPE_THETA_DEFAULT = {"llama": 10000.0, "mistral": 10000.0, "qwen2": 10000.0, "gemma3": 1e6}
_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}
# Gemma 3 multimodal checkpoints (model_type "gemma3") hold the text model under a prefix.
_MULTIMODAL_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."),
                        ("language_model.lm_head.", "lm_head."))
_VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                    "model.multi_modal_projector.")


def _rope_scaling(params: dict[str, Any] | None, where: str) -> RopeScaling | None:
  if not params:
    return None
  kind = params.get("rope_type", params.get("type", "default"))
  if kind == "default":
    return None
  if kind == "linear":
    return RopeScaling(kind="linear", factor=float(params["factor"]))
  if kind == "llama3":
    return RopeScaling(
        kind="llama3", factor=float(params["factor"]),
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position_embeddings=int(params["original_max_position_embeddings"]))
  raise ValueError(f"{where}: rope type {kind!r} is not supported (supported: default, "
                   "linear, llama3)")


def _rope(cfg: dict[str, Any], arch: str, where: str
          ) -> tuple[float, RopeScaling | None, float | None]:
  """(theta, scaling) of full-attention layers and the theta of sliding layers (Gemma 3)."""
  params = cfg.get("rope_parameters")
  if params and "full_attention" in params:  # transformers 5, per layer type
    full, sliding = params["full_attention"], params.get("sliding_attention") or {}
  else:
    full = params or dict(cfg.get("rope_scaling") or {}, rope_theta=cfg.get("rope_theta"))
    sliding = {"rope_theta": cfg.get("rope_local_base_freq")}
  theta = full.get("rope_theta") or _ROPE_THETA_DEFAULT[arch]
  if arch != "gemma3":
    return float(theta), _rope_scaling(full, where), None
  if _rope_scaling(sliding, where) is not None:
    raise ValueError(f"{where}: RoPE scaling on Gemma 3 sliding layers is not supported")
  return (float(theta), _rope_scaling(full, where),
          float(sliding.get("rope_theta") or 10000.0))


def _layer_types(cfg: dict[str, Any], arch: str, n: int, where: str
                 ) -> tuple[tuple[LayerType, ...], int | None]:
  """Per-layer attention types and the sliding window, from whichever keys the config has."""
  window = cfg.get("sliding_window")
  if cfg.get("layer_types"):
    unknown = set(cfg["layer_types"]) - set(_LAYER_TYPES)
    if unknown:
      raise ValueError(f"{where}: unsupported layer_types {sorted(unknown)}")
    types = tuple(_LAYER_TYPES[t] for t in cfg["layer_types"])
  elif arch == "gemma3":
    pattern = cfg.get("sliding_window_pattern", cfg.get("_sliding_window_pattern", 6))
    types = tuple("full" if (i + 1) % pattern == 0 else "sliding" for i in range(n))
  elif arch == "qwen2" and cfg.get("use_sliding_window") and window:
    first = cfg["max_window_layers"]
    types = tuple("sliding" if i >= first else "full" for i in range(n))
  elif arch == "mistral" and window:  # Mistral slides on every layer
    types = ("sliding",) * n
  else:
    types = ("full",) * n
  return types, (window if "sliding" in types else None)


def config_from_hf(cfg: dict[str, Any], where: str = "config.json",
                   generation: dict[str, Any] | None = None,
                   tokenizer_config: dict[str, Any] | None = None) -> ModelConfig:
  """A ModelConfig from a transformers config dict (+ generation/tokenizer config dicts)."""
  model_type = cfg.get("model_type")
  if model_type not in _MODEL_TYPES:
    raise ValueError(f"{where}: unsupported model_type {model_type!r}; supported: "
                     f"{sorted(_MODEL_TYPES)}")
  arch = _MODEL_TYPES[model_type]
  outer = cfg
  if model_type == "gemma3":  # multimodal: the decoder is described by text_config
    cfg = cfg.get("text_config") or {}
  cfg = {**_CLASS_DEFAULTS[arch], **cfg}
  for key in ("mlp_bias", "use_bidirectional_attention"):
    if cfg.get(key):
      raise ValueError(f"{where}: {key}=true is not supported")
  if cfg.get("attention_bias") and arch != "qwen2":  # there o_proj has a bias too
    raise ValueError(f"{where}: attention_bias=true is not supported for {model_type}")
  expected_act = "gelu_pytorch_tanh" if arch == "gemma3" else "silu"
  act = cfg.get("hidden_activation") or cfg.get("hidden_act") or expected_act
  if act != expected_act:
    raise ValueError(f"{where}: hidden activation {act!r} is not supported for {model_type}")
  try:
    hidden, heads, n = (cfg["hidden_size"], cfg["num_attention_heads"],
                        cfg["num_hidden_layers"])
    dims = dict(vocab_size=cfg["vocab_size"], intermediate_size=cfg["intermediate_size"])
  except KeyError as e:
    raise ValueError(f"{where}: required key {e.args[0]!r} is missing") from None
  theta, scaling, local_theta = _rope(cfg, arch, where)
  layer_types, window = _layer_types(cfg, arch, n, where)
  generation = generation or {}
  eos = generation.get("eos_token_id", cfg.get("eos_token_id", outer.get("eos_token_id")))
  fields = dict(
      hidden_size=hidden, num_heads=heads, num_layers=n, **dims,
      num_kv_heads=cfg.get("num_key_value_heads") or heads,
      head_dim=cfg.get("head_dim") or hidden // heads,
      max_position_embeddings=cfg["max_position_embeddings"],
      rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
      rope_theta=theta,
      rope_scaling=scaling,
      tie_word_embeddings=bool(outer.get("tie_word_embeddings", cfg["tie_word_embeddings"])),
      layer_types=layer_types,
      sliding_window=window,
      bos_token_id=cfg.get("bos_token_id", outer.get("bos_token_id")),
      eos_token_ids=() if eos is None else (eos,) if isinstance(eos, int) else tuple(eos),
  )
  if tokenizer_config and "add_bos_token" in tokenizer_config:
    fields["add_bos"] = bool(tokenizer_config["add_bos_token"])
  if arch == "gemma3":
    fields.update(query_pre_attn_scalar=float(cfg["query_pre_attn_scalar"]),
                  rope_local_theta=local_theta,
                  final_logit_softcap=cfg.get("final_logit_softcapping"),
                  attn_logit_softcap=cfg.get("attn_logit_softcapping"))
  return for_architecture(arch, **fields)


def _read_header(path: Path) -> tuple[dict[str, Any], mmap.mmap, int]:
  """(tensor entries, the mapped file, where the data starts) of one safetensors file."""
  size = path.stat().st_size
  if size < 8:
    raise ValueError(f"{path}: corrupt safetensors file: only {size} bytes")
  with open(path, "rb") as f:
    buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
  (n,) = struct.unpack_from("<Q", buf, 0)
  if n > size - 8:
    raise ValueError(f"{path}: corrupt safetensors header: it claims {n} bytes, the file has "
                     f"{size - 8} after the length")
  try:
    header = json.loads(buf[8:8 + n])
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: corrupt safetensors header: {e}") from None
  if not isinstance(header, dict):
    raise ValueError(f"{path}: corrupt safetensors header: not a JSON object")
  header.pop("__metadata__", None)
  data_start, data_size = 8 + n, size - 8 - n
  for name, entry in header.items():
    try:
      dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
    except (KeyError, TypeError, ValueError):
      raise ValueError(f"{path}: corrupt safetensors header entry for {name!r}: {entry!r}")
    if dtype not in _DTYPES:
      raise ValueError(f"{path}: tensor {name!r} has dtype {dtype}; supported: "
                       f"{sorted(_DTYPES)}")
    if end - begin != int(np.prod(shape)) * _DTYPES[dtype].itemsize or not 0 <= begin <= end:
      raise ValueError(f"{path}: corrupt safetensors header: tensor {name!r} of shape {shape} "
                       f"{dtype} has data_offsets {begin}..{end}")
    if end > data_size:
      raise ValueError(f"{path}: truncated safetensors file: tensor {name!r} ends at data byte "
                       f"{end}, the file holds {data_size}")
  return header, buf, data_start


def _to_float32(entry: dict[str, Any], buf: mmap.mmap, data_start: int) -> np.ndarray:
  begin, end = entry["data_offsets"]
  dtype = _DTYPES[entry["dtype"]]
  raw = np.frombuffer(buf, dtype, (end - begin) // dtype.itemsize, data_start + begin)
  if entry["dtype"] == "BF16":  # bf16 is the top half of an f32
    raw = (raw.astype(np.uint32) << 16).view(np.float32)
  return np.array(raw, dtype=np.float32).reshape(entry["shape"])


def _shards(path: Path) -> list[Path]:
  index = path / "model.safetensors.index.json"
  if index.is_file():
    try:
      weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise ValueError(f"{index}: not a safetensors index ({e!r})") from None
    shards = [path / name for name in dict.fromkeys(weight_map.values())]
    missing = [s for s in shards if not s.is_file()]
    if missing:
      raise FileNotFoundError(f"{index} lists shard {missing[0].name}, which is missing from "
                              f"{path}")
    return shards
  single = path / "model.safetensors"
  if not single.is_file():
    raise FileNotFoundError(f"{path}: neither model.safetensors nor "
                            "model.safetensors.index.json")
  return [single]


def _hf_name(name: str) -> str | None:
  """The text-model name of a multimodal Gemma 3 tensor; None for the vision tower."""
  if name.startswith(_VISION_PREFIXES):
    return None
  for prefix, replacement in _MULTIMODAL_PREFIXES:
    if name.startswith(prefix):
      return replacement + name[len(prefix):]
  return name


def load_hf_folder(path: str | os.PathLike
                   ) -> tuple[ModelConfig, dict[str, np.ndarray], Path | None]:
  """Reads a Hugging Face folder: (config, float32 lowbit parameters, tokenizer folder).

  The third value is the folder to pass to `Tokenizer.from_hf_folder`, or None when the
  folder has no tokenizer.json.
  """
  path = Path(path)
  config_file = path / "config.json"
  if not config_file.is_file():
    raise FileNotFoundError(f"{path}: no config.json (is this a Hugging Face model folder?)")

  def read_json(name: str) -> dict[str, Any] | None:
    p = path / name
    if not p.is_file():
      return None
    try:
      return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
      raise ValueError(f"{p}: invalid JSON ({e})") from None

  config = config_from_hf(read_json("config.json"), str(config_file),
                          read_json("generation_config.json"), read_json("tokenizer_config.json"))
  entries = {}  # lowbit name -> (header entry, mapped file, data start)
  for shard in _shards(path):
    header, buf, data_start = _read_header(shard)
    for name, entry in header.items():
      hf = _hf_name(name)
      try:
        ours = hf and hf_names.hf_name_to_lowbit(config.architecture, hf)
      except ValueError as e:
        raise ValueError(f"{shard}: {e}") from None
      if ours == "lm_head.weight" and config.tie_word_embeddings:
        continue  # a tied copy of the embedding
      if ours:
        entries[ours] = (entry, buf, data_start)
  hf_names.validate_shapes(config, {k: tuple(e[0]["shape"]) for k, e in entries.items()},
                           str(path))
  params = {k: _to_float32(*e) for k, e in entries.items()}
  return config, params, path if (path / "tokenizer.json").is_file() else None
