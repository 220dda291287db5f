"""Hugging Face folder import against tiny random transformers models saved to disk."""

import json
import struct

import numpy as np
import pytest
import torch
import transformers

from models import hf_names
from models.loading import parameter_shapes
from models.config import RopeScaling
from models.safetensors_import import config_from_hf, load_hf_folder

_DIMS = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
             bos_token_id=1, eos_token_id=2)

_MODELS = {
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **_DIMS, rms_norm_eps=1e-5, rope_theta=5e5, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 128})),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        **_DIMS, use_sliding_window=True, sliding_window=16, max_window_layers=1,
        tie_word_embeddings=True)),
    "mistral": lambda: transformers.MistralForCausalLM(transformers.MistralConfig(
        **_DIMS, head_dim=16, sliding_window=32)),
    "gemma3": lambda: transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
        **_DIMS, head_dim=16, query_pre_attn_scalar=24, sliding_window=8,
        sliding_window_pattern=2, rope_scaling={"rope_type": "linear", "factor": 4.0},
        rope_local_base_freq=500.0, final_logit_softcapping=30.0)),
}


def _save(model, path, dtype, shard=False):
  torch.manual_seed(0)
  model.to(dtype).save_pretrained(path, max_shard_size="40KB" if shard else "5GB")
  return path


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("arch", list(_MODELS))
def test_matches_transformers(tmp_path, arch, dtype, assert_config_matches_hf):
  torch.manual_seed(0)
  model = _MODELS[arch]()
  shard = dtype == torch.bfloat16  # exercise the index + shards once per architecture
  path = _save(model, tmp_path / "m", dtype, shard)
  assert (path / "model.safetensors.index.json").is_file() == shard
  config, params, tokenizer = load_hf_folder(path)
  assert tokenizer is None
  assert_config_matches_hf(config, model.config)
  expected = hf_names.hf_to_lowbit(config.architecture, {
      k: v.float() for k, v in model.state_dict().items()}, config.tie_word_embeddings)
  assert params.keys() == expected.keys()
  for k, v in expected.items():
    assert params[k].dtype == np.float32
    np.testing.assert_array_equal(params[k], v, err_msg=k)  # widening is exact


def test_specific_config_values(tmp_path):
  """Spot checks that do not go through the same helper as the comparison above."""
  torch.manual_seed(0)
  gemma, _, _ = load_hf_folder(_save(_MODELS["gemma3"](), tmp_path / "g", torch.float32))
  assert gemma.layer_types == ("sliding", "full", "sliding")
  assert (gemma.sliding_window, gemma.rope_local_theta, gemma.query_pre_attn_scalar) == (
      8, 500.0, 24.0)
  assert gemma.rope_scaling == RopeScaling(kind="linear", factor=4.0)
  assert (gemma.final_logit_softcap, gemma.tie_word_embeddings) == (30.0, True)
  qwen, _, _ = load_hf_folder(_save(_MODELS["qwen2"](), tmp_path / "q", torch.float32))
  assert qwen.layer_types == ("full", "sliding", "sliding") and qwen.attention_bias
  llama, _, _ = load_hf_folder(_save(_MODELS["llama"](), tmp_path / "l", torch.float32))
  assert llama.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 128)
  assert llama.rope_theta == 5e5 and not llama.tie_word_embeddings


def test_transformers_4_config_keys():
  """Configs written by transformers 4.x: rope_theta / rope_scaling / rope_local_base_freq."""
  base = {"vocab_size": 96, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 6,
          "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 16,
          "max_position_embeddings": 1024, "eos_token_id": [1, 106], "bos_token_id": 2}
  gemma = config_from_hf({**base, "model_type": "gemma3_text", "rope_theta": 1e6,
                          "rope_local_base_freq": 1e4, "sliding_window": 512,
                          "sliding_window_pattern": 3, "query_pre_attn_scalar": 16,
                          "rope_scaling": {"rope_type": "linear", "factor": 8.0}})
  assert gemma.layer_types == ("sliding", "sliding", "full") * 2
  assert (gemma.rope_theta, gemma.rope_local_theta, gemma.sliding_window) == (1e6, 1e4, 512)
  assert gemma.rope_scaling == RopeScaling("linear", 8.0) and gemma.eos_token_ids == (1, 106)
  llama = config_from_hf({**base, "model_type": "llama", "rope_theta": 5e5, "rope_scaling": {
      "type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 8192}}, generation={"eos_token_id": 7},
      tokenizer_config={"add_bos_token": True})
  assert llama.rope_scaling == RopeScaling("llama3", 32.0, 1.0, 4.0, 8192)
  assert (llama.rope_theta, llama.eos_token_ids, llama.add_bos) == (5e5, (7,), True)
  # Multimodal Gemma 3: the decoder is the text_config.
  multimodal = config_from_hf({"model_type": "gemma3", "text_config": {
      **base, "model_type": "gemma3_text"}})
  assert multimodal.architecture == "gemma3" and multimodal.num_layers == 6


def test_gemma3_multimodal_folder_keeps_the_text_model(tmp_path):
  torch.manual_seed(0)
  text = transformers.Gemma3TextConfig(**_DIMS, head_dim=16)
  vision = transformers.SiglipVisionConfig(hidden_size=16, intermediate_size=16,
                                           num_hidden_layers=1, num_attention_heads=2,
                                           image_size=28, patch_size=14)
  model = transformers.Gemma3ForConditionalGeneration(transformers.Gemma3Config(
      text_config=text, vision_config=vision, mm_tokens_per_image=4))
  config, params, _ = load_hf_folder(_save(model, tmp_path / "mm", torch.float32))
  assert_equal = np.testing.assert_array_equal
  language = model.model.language_model
  assert_equal(params["embed.embedding"], language.embed_tokens.weight.detach().numpy())
  assert_equal(params["layers.2.attn.k_norm.scale"],
               language.layers[2].self_attn.k_norm.weight.detach().numpy())
  assert len(params) == len(parameter_shapes(config))


@pytest.fixture
def llama_folder(tmp_path):
  torch.manual_seed(0)
  return _save(_MODELS["llama"](), tmp_path / "m", torch.float32)


def test_missing_config(tmp_path):
  with pytest.raises(FileNotFoundError, match="no config.json"):
    load_hf_folder(tmp_path)


def test_unknown_model_type(llama_folder):
  config = json.loads((llama_folder / "config.json").read_text())
  (llama_folder / "config.json").write_text(json.dumps({**config, "model_type": "gpt_neox"}))
  with pytest.raises(ValueError, match="config.json: unsupported model_type 'gpt_neox'"):
    load_hf_folder(llama_folder)


def test_unsupported_switches():
  base = dict(model_type="llama", vocab_size=8, hidden_size=8, intermediate_size=8,
              num_hidden_layers=1, num_attention_heads=2)
  with pytest.raises(ValueError, match="attention_bias=true is not supported for llama"):
    config_from_hf({**base, "attention_bias": True})
  with pytest.raises(ValueError, match="hidden activation 'gelu' is not supported"):
    config_from_hf({**base, "hidden_act": "gelu"})
  with pytest.raises(ValueError, match="rope type 'yarn' is not supported"):
    config_from_hf({**base, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
  with pytest.raises(ValueError, match="required key 'intermediate_size' is missing"):
    config_from_hf({k: v for k, v in base.items() if k != "intermediate_size"})


def test_missing_shard(tmp_path):
  torch.manual_seed(0)
  path = _save(_MODELS["llama"](), tmp_path / "m", torch.bfloat16, shard=True)
  shards = sorted(path.glob("model-*.safetensors"))
  shards[1].unlink()
  with pytest.raises(FileNotFoundError, match=f"lists shard {shards[1].name}, which is missing"):
    load_hf_folder(path)


def test_no_weights(llama_folder):
  (llama_folder / "model.safetensors").unlink()
  with pytest.raises(FileNotFoundError, match="neither model.safetensors nor"):
    load_hf_folder(llama_folder)


def _rewrite_header(path, header):
  """Replaces the JSON header of a safetensors file, keeping its data."""
  data = path.read_bytes()
  (n,) = struct.unpack("<Q", data[:8])
  encoded = json.dumps(header).encode()
  path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data[8 + n:])


def _header(path):
  data = path.read_bytes()
  (n,) = struct.unpack("<Q", data[:8])
  return json.loads(data[8:8 + n])


def test_corrupt_header(llama_folder):
  file = llama_folder / "model.safetensors"
  data = file.read_bytes()
  file.write_bytes(data[:8] + b"{not json" + data[17:])
  with pytest.raises(ValueError, match="model.safetensors: corrupt safetensors header"):
    load_hf_folder(llama_folder)
  file.write_bytes(struct.pack("<Q", 10**12) + data[8:])
  with pytest.raises(ValueError, match="corrupt safetensors header: it claims 1000000000000"):
    load_hf_folder(llama_folder)


def test_truncated_data(llama_folder):
  file = llama_folder / "model.safetensors"
  file.write_bytes(file.read_bytes()[:-100])
  with pytest.raises(ValueError, match="model.safetensors: truncated safetensors file: tensor"):
    load_hf_folder(llama_folder)


def test_unsupported_dtype(llama_folder):
  file = llama_folder / "model.safetensors"
  header = _header(file)
  header["model.norm.weight"]["dtype"] = "I32"
  _rewrite_header(file, header)
  with pytest.raises(ValueError, match="tensor 'model.norm.weight' has dtype I32"):
    load_hf_folder(llama_folder)


def test_misshapen_tensor(llama_folder):
  file = llama_folder / "model.safetensors"
  header = _header(file)
  header["model.layers.1.mlp.up_proj.weight"]["shape"] = [32, 48]  # same bytes, transposed
  _rewrite_header(file, header)
  with pytest.raises(ValueError, match=r"tensor 'layers.1.mlp.up_proj.weight' has shape "
                                       r"\(32, 48\), expected \(48, 32\)"):
    load_hf_folder(llama_folder)


def test_unknown_tensor(llama_folder):
  file = llama_folder / "model.safetensors"
  header = _header(file)
  header["model.layers.0.self_attn.o_proj.bias"] = header.pop("model.norm.weight")
  _rewrite_header(file, header)
  with pytest.raises(ValueError, match="unknown llama tensor name "
                                       "'model.layers.0.self_attn.o_proj.bias'"):
    load_hf_folder(llama_folder)
