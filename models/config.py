"""Model configuration: one frozen dataclass describes every supported decoder.

The architectures differ only in a handful of switches (biases, norm style, q/k norms,
sliding windows, activation, embedding scale), so one model definition serves them all and
`ModelConfig` names the switches explicitly. `for_architecture` fills the switches that an
architecture fixes; importers (GGUF, Hugging Face folders) fill the dimensions.

Terminology used across `models/` (einsum letters):
  B batch, T query tokens, S key tokens, D hidden, F MLP width, V vocabulary,
  N query heads, K KV heads, G query heads per KV head (N = K * G), H head dim.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

ARCHITECTURES = ("llama", "qwen2", "mistral", "gemma3")

LayerType = Literal["full", "sliding"]


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Rotary-frequency scaling.

  kind="llama3": Llama 3.1's piecewise scaling of long wavelengths.
  kind="linear": positions divided by `factor` (Gemma 3 global layers of the larger models).
  """

  kind: Literal["llama3", "linear"]
  factor: float
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Dimensions and architecture switches of a decoder-only LM.

  Invariants (checked by `validate`): num_heads % num_kv_heads == 0, head_dim even,
  len(layer_types) == num_layers, sliding layers only with a sliding_window.
  """

  architecture: str
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  max_position_embeddings: int
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  tie_word_embeddings: bool = False
  # Qwen2: biases on q/k/v projections.
  attention_bias: bool = False
  mlp_activation: Literal["silu", "gelu_tanh"] = "silu"
  # Per-layer attention type; sliding layers see the last `sliding_window` keys.
  layer_types: tuple[LayerType, ...] = ()
  sliding_window: int | None = None
  # Gemma: RMSNorm scales by (1 + w); q/k RMSNorm over head_dim; norms after attention
  # and MLP as well as before; embeddings multiplied by sqrt(hidden_size).
  norm_plus_one: bool = False
  qk_norm: bool = False
  sandwich_norms: bool = False
  scale_embeddings: bool = False
  # Softmax scale is query_pre_attn_scalar ** -0.5 (default head_dim ** -0.5).
  query_pre_attn_scalar: float | None = None
  # Gemma 3: sliding layers use their own RoPE base and no scaling.
  rope_local_theta: float | None = None
  final_logit_softcap: float | None = None
  attn_logit_softcap: float | None = None
  # Tokens: whether each window/prompt starts with BOS (Gemma), and the stop tokens.
  add_bos: bool = False
  bos_token_id: int | None = None
  eos_token_ids: tuple[int, ...] = ()

  def __post_init__(self):
    if not self.layer_types:
      object.__setattr__(self, "layer_types", ("full",) * self.num_layers)
    self.validate()

  def validate(self) -> None:
    if self.architecture not in ARCHITECTURES:
      raise ValueError(
          f"unknown architecture {self.architecture!r}; supported: {ARCHITECTURES}")
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                 "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings"):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
    if len(self.layer_types) != self.num_layers:
      raise ValueError(
          f"layer_types has {len(self.layer_types)} entries for num_layers={self.num_layers}")
    bad = set(self.layer_types) - {"full", "sliding"}
    if bad:
      raise ValueError(f"unknown layer types {sorted(bad)}; expected 'full' or 'sliding'")
    if "sliding" in self.layer_types and not self.sliding_window:
      raise ValueError("sliding layers need a positive sliding_window")

  @property
  def queries_per_kv_head(self) -> int:
    return self.num_heads // self.num_kv_heads

  @property
  def attention_scale(self) -> float:
    return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)


_ARCH_SWITCHES = {
    "llama": {},
    "mistral": {},
    "qwen2": {"attention_bias": True},
    "gemma3": {
        "mlp_activation": "gelu_tanh",
        "norm_plus_one": True,
        "qk_norm": True,
        "sandwich_norms": True,
        "scale_embeddings": True,
        "add_bos": True,
        "tie_word_embeddings": True,
    },
}


def for_architecture(architecture: str, **fields) -> ModelConfig:
  """A config with the switches that `architecture` fixes, overridden by `fields`."""
  if architecture not in _ARCH_SWITCHES:
    raise ValueError(
        f"unknown architecture {architecture!r}; supported: {tuple(_ARCH_SWITCHES)}")
  return ModelConfig(architecture=architecture, **{**_ARCH_SWITCHES[architecture], **fields})


def gemma3_layer_types(num_layers: int, pattern: int = 6) -> tuple[LayerType, ...]:
  """Gemma 3: every `pattern`-th layer is global, the others slide."""
  return tuple("full" if (i + 1) % pattern == 0 else "sliding" for i in range(num_layers))
