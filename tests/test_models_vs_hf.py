"""Our models against Hugging Face transformers (PyTorch, CPU) on tiny random configs.

Each tiny model is written by transformers' own `save_pretrained` and read back through
lowbit's safetensors importer, so the check covers the config translation, the parameter
names and the forward pass. Float32 logits must agree to 1e-5 relative to their scale;
the KV-cache path (prefill then one-token decode) must reproduce the full forward pass.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from models.loading import from_params  # noqa: E402
from models.safetensors_import import load_hf_folder  # noqa: E402

_DIMS = dict(vocab_size=11, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
             max_position_embeddings=64)
SEQ_LEN = 12


def _llama(heads, kv_heads):
  return transformers.LlamaConfig(
      **_DIMS, num_attention_heads=heads, num_key_value_heads=kv_heads,
      rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 16})


def _qwen2():
  return transformers.Qwen2Config(**_DIMS, num_attention_heads=4, num_key_value_heads=2)


def _mistral():
  # A window shorter than the sequence, so the sliding mask matters.
  return transformers.MistralConfig(**_DIMS, num_attention_heads=4, num_key_value_heads=1,
                                    sliding_window=5)


def _gemma3():
  return transformers.Gemma3TextConfig(
      **_DIMS, num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=5,
      layer_types=["sliding_attention", "full_attention", "sliding_attention"],
      query_pre_attn_scalar=24)


CONFIGS = {
    "llama-mha": lambda: _llama(4, 4),
    "llama-gqa": lambda: _llama(4, 2),
    "llama-mqa": lambda: _llama(4, 1),
    "qwen2": _qwen2,
    "mistral": _mistral,
    "gemma3": _gemma3,
}


def _hf_model(config):
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
  # Random norm scales: the default ones (or Gemma's zeros) would hide a wrong norm formula.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(torch.randn_like(p) * 0.5 + (0.0 if config.model_type.startswith("gemma")
                                              else 1.0))
  return model


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def tiny_pair(request, tmp_path_factory):
  hf_model = _hf_model(CONFIGS[request.param]())
  folder = tmp_path_factory.mktemp(request.param)
  hf_model.save_pretrained(folder)
  config, params, _ = load_hf_folder(folder)
  return hf_model, from_params(config, params)


def _tokens(seed=0):
  return np.random.RandomState(seed).randint(0, _DIMS["vocab_size"], (2, SEQ_LEN))


def _relative_error(ours, reference):
  return float(np.max(np.abs(ours - reference)) / np.max(np.abs(reference)))


def test_logits_match_transformers(tiny_pair):
  hf_model, model = tiny_pair
  tokens = _tokens()
  with torch.no_grad():
    reference = hf_model(torch.from_numpy(tokens)).logits.numpy()
  ours, _ = model(jnp.asarray(tokens))
  assert _relative_error(np.asarray(ours), reference) < 1e-5


def test_cached_decode_matches_full_forward(tiny_pair):
  _, model = tiny_pair
  tokens = jnp.asarray(_tokens(1))
  full, _ = model(tokens)
  prompt = 7
  cache = model.init_cache(tokens.shape[0], 16)
  logits, cache = model(tokens[:, :prompt], cache=cache, prefill=True)
  steps = [logits]
  for position in range(prompt, SEQ_LEN):
    logits, cache = model(tokens[:, position:position + 1], start=position, cache=cache)
    steps.append(logits)
  assert _relative_error(np.asarray(jnp.concatenate(steps, axis=1)), np.asarray(full)) < 1e-5
