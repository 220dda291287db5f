"""Name mapping between Hugging Face state dicts and lowbit parameters (no model needed)."""

import numpy as np
import pytest

from models import hf_names
from models.loading import parameter_shapes
from models.config import for_architecture, gemma3_layer_types

_DIMS = dict(vocab_size=11, hidden_size=8, intermediate_size=12, num_layers=2, num_heads=4,
             num_kv_heads=2, head_dim=4, max_position_embeddings=32)


def _config(arch, **changes):
  extra = {"layer_types": gemma3_layer_types(2, 2), "sliding_window": 4} if arch == "gemma3" else {}
  return for_architecture(arch, **{**_DIMS, **extra, **changes})


def _random_params(config, seed=0):
  rng = np.random.default_rng(seed)
  return {k: rng.standard_normal(s).astype(np.float32)
          for k, s in parameter_shapes(config).items()}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gemma3"])
def test_round_trip(arch):
  params = _random_params(_config(arch, tie_word_embeddings=False))
  hf = hf_names.lowbit_to_hf(arch, params)
  assert "model.layers.1.mlp.down_proj.weight" in hf and "lm_head.weight" in hf
  back = hf_names.hf_to_lowbit(arch, hf)
  assert back.keys() == params.keys()
  for k in params:
    np.testing.assert_array_equal(back[k], params[k])


def test_llama_and_gemma_norm_names():
  # Llama's post_attention_layernorm feeds the MLP; Gemma 3's follows attention.
  assert hf_names.hf_name_to_lowbit(
      "llama", "model.layers.3.post_attention_layernorm.weight") == "layers.3.pre_mlp_norm.scale"
  assert hf_names.hf_name_to_lowbit(
      "gemma3", "model.layers.3.post_attention_layernorm.weight") == "layers.3.post_attn_norm.scale"
  assert hf_names.hf_name_to_lowbit(
      "gemma3", "model.layers.0.pre_feedforward_layernorm.weight") == "layers.0.pre_mlp_norm.scale"
  assert hf_names.hf_name_to_lowbit("qwen2", "model.layers.0.self_attn.k_proj.bias") == (
      "layers.0.attn.k_proj.bias")


def test_expected_shapes_follow_switches():
  qwen = parameter_shapes(_config("qwen2"))
  assert qwen["layers.0.attn.q_proj.bias"] == (16,) and qwen["layers.0.attn.k_proj.bias"] == (8,)
  assert "lm_head.weight" in qwen  # qwen2 does not tie by default
  gemma = parameter_shapes(_config("gemma3"))
  assert gemma["layers.1.attn.q_norm.scale"] == (4,) and "lm_head.weight" not in gemma
  assert gemma["layers.1.attn.o_proj.weight"] == (8, 16)
  assert "layers.0.post_mlp_norm.scale" in gemma
  llama = parameter_shapes(_config("llama"))
  assert not any("bias" in k or "q_norm" in k or "post_" in k for k in llama)


def test_tied_lm_head_is_dropped_only_when_a_duplicate():
  params = _random_params(_config("llama", tie_word_embeddings=True))
  hf = hf_names.lowbit_to_hf("llama", params)
  hf["lm_head.weight"] = hf["model.embed_tokens.weight"].copy()
  assert "lm_head.weight" not in hf_names.hf_to_lowbit("llama", hf)
  hf["lm_head.weight"] = hf["lm_head.weight"] + 1
  assert "lm_head.weight" in hf_names.hf_to_lowbit("llama", hf)
  assert "lm_head.weight" not in hf_names.hf_to_lowbit("llama", hf, tie_word_embeddings=True)


def test_buffers_are_ignored_and_unknown_names_rejected():
  assert hf_names.hf_name_to_lowbit("llama", "model.layers.0.self_attn.rotary_emb.inv_freq") is None
  with pytest.raises(ValueError, match="unknown llama tensor name 'model.layers.0.self_attn.o_pr"):
    hf_names.hf_name_to_lowbit("llama", "model.layers.0.self_attn.o_proj.bias")
  with pytest.raises(ValueError, match="unknown gemma3 tensor name 'vision_tower.x'"):
    hf_names.hf_name_to_lowbit("gemma3", "vision_tower.x")
  with pytest.raises(ValueError, match="unknown architecture 'gpt2'"):
    hf_names.hf_name_to_lowbit("gpt2", "model.norm.weight")
  with pytest.raises(ValueError, match="unknown lowbit parameter name 'layers.0.attn.wq'"):
    hf_names.lowbit_to_hf("llama", {"layers.0.attn.wq": np.zeros(1)})


def test_validate_params_names_the_tensor():
  config = _config("llama")
  params = _random_params(config)
  hf_names.validate_params(config, params, "src")
  bad = dict(params)
  del bad["layers.1.mlp.up_proj.weight"]
  with pytest.raises(ValueError, match=r"src: missing tensor 'layers.1.mlp.up_proj.weight' "
                                       r"\(expected shape \(12, 8\)\)"):
    hf_names.validate_params(config, bad, "src")
  bad = dict(params, **{"layers.0.attn.q_proj.bias": np.zeros(16)})
  with pytest.raises(ValueError, match=r"unexpected tensor 'layers.0.attn.q_proj.bias' with "
                                       r"shape \(16,\)"):
    hf_names.validate_params(config, bad, "src")
  bad = dict(params, **{"layers.0.attn.k_proj.weight": np.zeros((16, 8))})
  with pytest.raises(ValueError, match=r"tensor 'layers.0.attn.k_proj.weight' has shape "
                                       r"\(16, 8\), expected \(8, 8\)"):
    hf_names.validate_params(config, bad, "src")
