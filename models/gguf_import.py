"""Loads a GGUF file (llama.cpp's format) as a ModelConfig and float32 lowbit parameters.

The GGUF is the float baseline of the real models that ship in packages (DATA.md): its
quantized tensors are dequantized with the `gguf` package and brought back to the Hugging Face
layout and conventions that the rest of lowbit uses (models/hf_names.py):
  * shapes are stored innermost first and are reversed to [out, in];
  * llama.cpp permutes the Q and K rows of Llama models for its interleaved-pair RoPE; they are
    permuted back to the half-split layout of Hugging Face;
  * llama.cpp's Gemma converter stores every norm weight (q/k norms too) as 1 + w; the 1 is
    subtracted again, so a Gemma norm scales by (1 + w) as in Hugging Face.

The header is parsed here rather than with `gguf.GGUFReader`: that reader builds numpy views for
every vocabulary string and takes 20 s on Gemma 3's 262k-token vocabulary; this parser takes
well under a second and reports truncation and bad magic with the path.
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import struct
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from models import hf_names
from models.config import ModelConfig, RopeScaling, for_architecture, gemma3_layer_types

_MAGIC = b"GGUF"
_SCALARS = {
    gguf.GGUFValueType.UINT8: "<B", gguf.GGUFValueType.INT8: "<b",
    gguf.GGUFValueType.UINT16: "<H", gguf.GGUFValueType.INT16: "<h",
    gguf.GGUFValueType.UINT32: "<I", gguf.GGUFValueType.INT32: "<i",
    gguf.GGUFValueType.UINT64: "<Q", gguf.GGUFValueType.INT64: "<q",
    gguf.GGUFValueType.FLOAT32: "<f", gguf.GGUFValueType.FLOAT64: "<d",
    gguf.GGUFValueType.BOOL: "<?",
}

# GGUF architecture -> lowbit architecture. llama.cpp writes Mistral 7B as "llama".
_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "gemma3": "gemma3"}
# Architectures whose Q/K rows llama.cpp permutes (its LLM_ARCH_LLAMA converter); Qwen2 and
# Gemma 3 use NeoX-style RoPE there and are stored as in Hugging Face.
_PERMUTED_QK = ("llama",)
# Architectures whose converter stores norm weights as 1 + w (Gemma's norm_shift).
_NORM_SHIFTED = ("gemma3",)

_GLOBAL_TENSORS = {
    "token_embd.weight": "embed.embedding",
    "output_norm.weight": "final_norm.scale",
    "output.weight": "lm_head.weight",
}
_LAYER_TENSORS = {
    "attn_norm.weight": "input_norm.scale",
    "attn_q.weight": "attn.q_proj.weight", "attn_q.bias": "attn.q_proj.bias",
    "attn_k.weight": "attn.k_proj.weight", "attn_k.bias": "attn.k_proj.bias",
    "attn_v.weight": "attn.v_proj.weight", "attn_v.bias": "attn.v_proj.bias",
    "attn_output.weight": "attn.o_proj.weight",
    "attn_q_norm.weight": "attn.q_norm.scale",
    "attn_k_norm.weight": "attn.k_norm.scale",
    "post_attention_norm.weight": "post_attn_norm.scale",
    "ffn_norm.weight": "pre_mlp_norm.scale",
    "post_ffw_norm.weight": "post_mlp_norm.scale",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


@dataclasses.dataclass(frozen=True)
class GGUFTensor:
  """Where one tensor's bytes lie in the file."""

  name: str
  shape: tuple[int, ...]  # [out, in]: the file's dims reversed
  qtype: int  # a gguf.GGMLQuantizationType value
  offset: int  # absolute byte offset

  @property
  def type_name(self) -> str:
    try:
      return gguf.GGMLQuantizationType(self.qtype).name
    except ValueError:
      return f"unknown type {self.qtype}"

  def nbytes(self, path: Path) -> int:
    try:
      block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(self.qtype)]
    except (ValueError, KeyError):
      raise ValueError(f"{path}: tensor {self.name!r} has unsupported type {self.type_name}")
    if self.shape[-1] % block:
      raise ValueError(f"{path}: tensor {self.name!r} has row length {self.shape[-1]}, not a "
                       f"multiple of the {self.type_name} block size {block}")
    return int(np.prod(self.shape)) // block * type_size


class _Cursor:
  """Reads little-endian GGUF values from a buffer, naming the path when the file ends early."""

  def __init__(self, buf, path: Path):
    self.buf, self.path, self.pos = buf, path, 0

  def take(self, n: int) -> int:
    start = self.pos
    if start + n > len(self.buf):
      raise ValueError(f"{self.path}: truncated GGUF file: header needs byte {start + n}, "
                       f"the file has {len(self.buf)} bytes")
    self.pos += n
    return start

  def scalar(self, fmt: str):
    return struct.unpack_from(fmt, self.buf, self.take(struct.calcsize(fmt)))[0]

  def string(self) -> str:
    n = self.scalar("<Q")
    start = self.take(n)
    try:
      return self.buf[start:start + n].decode("utf-8")
    except UnicodeDecodeError as e:
      raise ValueError(f"{self.path}: string at byte {start} is not UTF-8 ({e})") from None

  def value(self, vtype: int) -> Any:
    if vtype == gguf.GGUFValueType.STRING:
      return self.string()
    if vtype == gguf.GGUFValueType.ARRAY:
      item_type, count = self.scalar("<I"), self.scalar("<Q")
      fmt = _SCALARS.get(item_type)
      if fmt is not None:  # numbers: one numpy read instead of `count` struct calls
        start = self.take(count * struct.calcsize(fmt))
        return np.frombuffer(self.buf, np.dtype(fmt), count, start).tolist()
      return [self.value(item_type) for _ in range(count)]
    if vtype in _SCALARS:
      return self.scalar(_SCALARS[vtype])
    raise ValueError(f"{self.path}: unknown GGUF value type {vtype} at byte {self.pos}")


def _open(path: Path):
  if not path.is_file():
    raise FileNotFoundError(f"GGUF file not found: {path}")
  size = path.stat().st_size
  if size < 24:
    raise ValueError(f"{path}: not a GGUF file: only {size} bytes")
  with open(path, "rb") as f:
    # The map outlives the file object; numpy views of it keep it alive.
    return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def read_gguf(path: str | os.PathLike) -> tuple[dict[str, Any], list[GGUFTensor], mmap.mmap]:
  """Parses a GGUF header: (metadata, tensors with absolute offsets, the mapped file)."""
  path = Path(path)
  buf = _open(path)
  if buf[:4] != _MAGIC:
    raise ValueError(f"{path}: not a GGUF file (magic {bytes(buf[:4])!r}, expected {_MAGIC!r})")
  cur = _Cursor(buf, path)
  cur.take(4)
  version = cur.scalar("<I")
  if version not in (2, 3):
    raise ValueError(f"{path}: unsupported GGUF version {version} (supported: 2, 3; a "
                     "big-endian file also shows up here)")
  n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")
  metadata = {}
  for _ in range(n_kv):
    key = cur.string()
    metadata[key] = cur.value(cur.scalar("<I"))
  infos = []
  for _ in range(n_tensors):
    name = cur.string()
    dims = [cur.scalar("<Q") for _ in range(cur.scalar("<I"))]
    qtype, offset = cur.scalar("<I"), cur.scalar("<Q")
    infos.append((name, tuple(reversed(dims)), qtype, offset))
  alignment = metadata.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT)
  data_start = -(-cur.pos // alignment) * alignment
  tensors = [GGUFTensor(n, s, q, data_start + o) for n, s, q, o in infos]
  for t in tensors:
    end = t.offset + t.nbytes(path)
    if end > len(buf):
      raise ValueError(f"{path}: truncated GGUF file: tensor {t.name!r} ends at byte {end}, "
                       f"the file has {len(buf)} bytes")
  return metadata, tensors, buf


def _dequantize(t: GGUFTensor, buf: mmap.mmap, path: Path) -> np.ndarray:
  nbytes = t.nbytes(path)
  raw = np.frombuffer(buf, np.uint8, nbytes, t.offset)
  rows = int(np.prod(t.shape[:-1]))
  try:
    out = gguf.quants.dequantize(raw.reshape(rows, nbytes // rows),
                                 gguf.GGMLQuantizationType(t.qtype))
  except NotImplementedError:
    raise ValueError(f"{path}: tensor {t.name!r} has type {t.type_name}, which the gguf "
                     "package cannot dequantize") from None
  return np.array(out.reshape(t.shape), dtype=np.float32)  # copy: detach from the mapping


def _unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Undoes llama.cpp's per-head row permutation: pairs (2j, 2j+1) -> rows j and j + H/2."""
  # [n*H, ...] -> [n, H/2, 2, ...] -> [n, 2, H/2, ...]
  per_head = w.shape[0] // n_heads
  return (w.reshape(n_heads, per_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def lowbit_name(gguf_name: str) -> str:
  """The lowbit parameter name of a GGUF tensor."""
  if gguf_name in _GLOBAL_TENSORS:
    return _GLOBAL_TENSORS[gguf_name]
  parts = gguf_name.split(".", 2)
  if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_TENSORS:
    return f"layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}"
  if gguf_name == "rope_freqs.weight":
    raise ValueError("tensor 'rope_freqs.weight' (llama.cpp's precomputed Llama 3.1 RoPE "
                     "scaling) is not supported")
  raise ValueError(f"unknown GGUF tensor {gguf_name!r}")


def config_from_metadata(metadata: dict[str, Any], tensors: list[GGUFTensor],
                         path: str | os.PathLike) -> ModelConfig:
  """The ModelConfig a GGUF describes; defaults follow llama.cpp where the file is silent."""
  gguf_arch = metadata.get("general.architecture")
  if gguf_arch not in _ARCHITECTURES:
    raise ValueError(f"{path}: unsupported GGUF architecture {gguf_arch!r}; supported: "
                     f"{sorted(_ARCHITECTURES)}")
  required = object()

  def get(key: str, default: Any = required) -> Any:
    full = f"{gguf_arch}.{key}"
    if full in metadata:
      return metadata[full]
    if default is required:
      raise ValueError(f"{path}: GGUF metadata key {full!r} is missing")
    return default

  by_name = {t.name: t for t in tensors}
  if "token_embd.weight" not in by_name:
    raise ValueError(f"{path}: tensor 'token_embd.weight' is missing")
  hidden, heads = get("embedding_length"), get("attention.head_count")
  kv_heads = get("attention.head_count_kv", heads)
  if not isinstance(kv_heads, int):
    raise ValueError(f"{path}: per-layer {gguf_arch}.attention.head_count_kv={kv_heads!r} "
                     "is not supported")
  head_dim = get("attention.key_length", hidden // heads)
  rope_dims = get("rope.dimension_count", head_dim)
  if rope_dims != head_dim:
    raise ValueError(f"{path}: partial RoPE ({gguf_arch}.rope.dimension_count={rope_dims}, "
                     f"head_dim={head_dim}) is not supported")
  scaling_type = get("rope.scaling.type", "none")
  if scaling_type == "linear":
    rope_scaling = RopeScaling(kind="linear", factor=float(get("rope.scaling.factor")))
  elif scaling_type == "none":
    rope_scaling = None
  else:
    raise ValueError(f"{path}: {gguf_arch}.rope.scaling.type={scaling_type!r} is not supported")
  num_layers = get("block_count")
  fields = dict(
      vocab_size=by_name["token_embd.weight"].shape[0],
      hidden_size=hidden,
      intermediate_size=get("feed_forward_length"),
      num_layers=num_layers,
      num_heads=heads,
      num_kv_heads=kv_heads,
      head_dim=head_dim,
      max_position_embeddings=get("context_length"),
      rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
      rope_theta=float(get("rope.freq_base", 10000.0)),
      rope_scaling=rope_scaling,
      tie_word_embeddings="output.weight" not in by_name,
      attention_bias="blk.0.attn_q.bias" in by_name,
      bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"),
      eos_token_ids=tuple(metadata[k] for k in ("tokenizer.ggml.eos_token_id",)
                          if k in metadata),
  )
  if "tokenizer.ggml.add_bos_token" in metadata:
    fields["add_bos"] = bool(metadata["tokenizer.ggml.add_bos_token"])
  if gguf_arch == "gemma3":
    pattern = get("attention.sliding_window_pattern", 6)
    if isinstance(pattern, list):  # newer llama.cpp: one flag per layer, True = sliding
      layer_types = tuple("sliding" if p else "full" for p in pattern)
    else:
      layer_types = gemma3_layer_types(num_layers, pattern)
    # llama.cpp scales queries by hidden/heads for the 27B (62 layers), by head_dim otherwise;
    # the file does not say (llama-model.cpp, LLM_ARCH_GEMMA3).
    scalar = hidden // heads if num_layers == 62 else head_dim
    fields.update(
        layer_types=layer_types,
        sliding_window=get("attention.sliding_window"),
        rope_local_theta=float(get("rope.freq_base_swa", 10000.0)),
        query_pre_attn_scalar=float(scalar),
        final_logit_softcap=get("final_logit_softcapping", None),
        attn_logit_softcap=get("attn_logit_softcapping", None),
    )
  return for_architecture(_ARCHITECTURES[gguf_arch], **fields)


def load_gguf(path: str | os.PathLike
              ) -> tuple[ModelConfig, dict[str, np.ndarray], dict[str, Any]]:
  """Reads a GGUF: (config, float32 lowbit parameters, the file's metadata).

  The metadata carries the tokenizer (`tokenizer.ggml.*`, `tokenizer.chat_template`); pass it
  to `models.tokenizer.Tokenizer.from_gguf_metadata`.
  """
  path = Path(path)
  metadata, tensors, buf = read_gguf(path)
  config = config_from_metadata(metadata, tensors, path)
  gguf_arch = metadata["general.architecture"]
  try:
    named = {lowbit_name(t.name): t for t in tensors}
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from None
  hf_names.validate_shapes(config, {k: t.shape for k, t in named.items()}, str(path))
  params = {}
  for name, t in named.items():
    w = _dequantize(t, buf, path)
    if gguf_arch in _PERMUTED_QK and name.endswith(("q_proj.weight", "q_proj.bias")):
      w = _unpermute_rope_rows(w, config.num_heads)
    elif gguf_arch in _PERMUTED_QK and name.endswith(("k_proj.weight", "k_proj.bias")):
      w = _unpermute_rope_rows(w, config.num_kv_heads)
    if gguf_arch in _NORM_SHIFTED and name.endswith(".scale"):
      w -= 1.0
    params[name] = w
  return config, params, metadata
