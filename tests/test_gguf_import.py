"""GGUF import: tiny files written with the `gguf` package, then the two real models against
transformers' own GGUF loader."""


import gguf
import numpy as np
import pytest

from models.loading import parameter_shapes
from models.config import for_architecture, gemma3_layer_types
from models.gguf_import import load_gguf, read_gguf

_LAYER_NAMES = {
    "attn_norm.weight": "input_norm.scale", "attn_q.weight": "attn.q_proj.weight",
    "attn_k.weight": "attn.k_proj.weight", "attn_v.weight": "attn.v_proj.weight",
    "attn_output.weight": "attn.o_proj.weight", "ffn_norm.weight": "pre_mlp_norm.scale",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight", "attn_q_norm.weight": "attn.q_norm.scale",
    "attn_k_norm.weight": "attn.k_norm.scale",
    "post_attention_norm.weight": "post_attn_norm.scale",
    "post_ffw_norm.weight": "post_mlp_norm.scale",
}
_GLOBAL_NAMES = {"token_embd.weight": "embed.embedding", "output_norm.weight": "final_norm.scale",
                 "output.weight": "lm_head.weight"}


def _llama_cpp_permute(w, n_head):
  """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute: HF rows -> interleaved pairs."""
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
      w.shape)


def _tiny_config(arch):
  # Rows of 32 so that Q8_0 / Q4_0 blocks fit; eps exact in float32, as GGUF stores it.
  dims = dict(vocab_size=32, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
              num_kv_heads=2, head_dim=16, max_position_embeddings=64, rms_norm_eps=2.0**-16,
              rope_theta=5e5, bos_token_id=1, eos_token_ids=(2,))
  if arch == "gemma3":
    # 2 layers at the default pattern 6: both sliding.
    dims.update(layer_types=gemma3_layer_types(2), sliding_window=8, query_pre_attn_scalar=16.0,
                rope_local_theta=1e4, max_position_embeddings=128)
  else:
    dims.update(tie_word_embeddings=False)
  return for_architecture(arch, **dims)


def _write_gguf(path, arch, params, *, qtypes=None, extra=None, skip_keys=()):
  """Writes lowbit `params` as llama.cpp would store them, `qtypes[name]` quantized."""
  config = _tiny_config(arch)
  w = gguf.GGUFWriter(str(path), arch)
  keys = {
      "block_count": config.num_layers, "context_length": config.max_position_embeddings,
      "embedding_length": config.hidden_size, "feed_forward_length": config.intermediate_size,
      "head_count": config.num_heads, "head_count_kv": config.num_kv_heads,
      "layer_norm_rms_eps": config.rms_norm_eps, "rope_freq_base": config.rope_theta,
      "key_length": config.head_dim, "value_length": config.head_dim,
  }
  if arch == "gemma3":
    keys.update(sliding_window=config.sliding_window)
  for key, value in keys.items():
    if key not in skip_keys:
      getattr(w, f"add_{key}")(value)
  w.add_bos_token_id(1)
  w.add_eos_token_id(2)
  to_gguf = {v: k for k, v in _GLOBAL_NAMES.items()}
  to_gguf.update({f"layers.{i}.{v}": f"blk.{i}.{k}" for i in range(config.num_layers)
                  for k, v in _LAYER_NAMES.items()})
  for name, value in params.items():
    value = value.copy()
    if arch == "llama" and name.endswith("q_proj.weight"):
      value = _llama_cpp_permute(value, config.num_heads)
    if arch == "llama" and name.endswith("k_proj.weight"):
      value = _llama_cpp_permute(value, config.num_kv_heads)
    if arch == "gemma3" and name.endswith(".scale"):
      value += 1  # llama.cpp's Gemma norm_shift
    qtype = (qtypes or {}).get(name)
    if qtype is None:
      w.add_tensor(to_gguf[name], value)
    else:
      w.add_tensor(to_gguf[name], gguf.quants.quantize(value, qtype), raw_dtype=qtype)
  for name, value in (extra or {}).items():
    w.add_tensor(name, value)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


def _random_params(config, seed=0):
  rng = np.random.default_rng(seed)
  return {k: rng.standard_normal(s).astype(np.float32)
          for k, s in parameter_shapes(config).items()}


@pytest.fixture(params=["llama", "gemma3"])
def tiny(request, tmp_path):
  arch = request.param
  params = _random_params(_tiny_config(arch))
  return arch, params, _write_gguf(tmp_path / f"{arch}.gguf", arch, params)


@pytest.fixture
def llama_params():
  return _random_params(_tiny_config("llama"))


def test_tiny_round_trip(tiny):
  """Undoing llama.cpp's Q/K permutation and Gemma's norm shift gives the HF tensors back."""
  arch, params, path = tiny
  config, loaded, metadata = load_gguf(path)
  assert config == _tiny_config(arch)
  assert metadata["general.architecture"] == arch
  assert loaded.keys() == params.keys()
  for k in params:
    assert loaded[k].dtype == np.float32
    np.testing.assert_allclose(loaded[k], params[k], rtol=0, atol=1e-6, err_msg=k)


def test_header_parser_matches_gguf_reader(tiny):
  _, _, path = tiny
  metadata, tensors, _ = read_gguf(path)
  reader = gguf.GGUFReader(path)
  expected = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
  assert metadata == expected
  assert [(t.name, t.shape, t.qtype, t.offset) for t in tensors] == [
      (t.name, tuple(int(d) for d in reversed(t.shape)), t.tensor_type, t.data_offset)
      for t in reader.tensors]


def test_quantized_tensors_dequantize(tmp_path, llama_params):
  qtypes = {"embed.embedding": gguf.GGMLQuantizationType.Q8_0,
            "layers.1.mlp.down_proj.weight": gguf.GGMLQuantizationType.Q4_0}
  _, loaded, _ = load_gguf(_write_gguf(tmp_path / "q.gguf", "llama", llama_params, qtypes=qtypes))
  for name, qtype in qtypes.items():
    expected = gguf.quants.dequantize(gguf.quants.quantize(llama_params[name], qtype), qtype)
    assert not np.array_equal(expected, llama_params[name])  # the quantization did something
    np.testing.assert_array_equal(loaded[name], expected)


def test_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="GGUF file not found: .*nothing.gguf"):
    load_gguf(tmp_path / "nothing.gguf")


def test_not_a_gguf(tmp_path):
  path = tmp_path / "model.gguf"
  path.write_bytes(b"PK\x03\x04" + bytes(100))
  with pytest.raises(ValueError, match=r"model.gguf: not a GGUF file \(magic b'PK\\x03\\x04'"):
    load_gguf(path)
  path.write_bytes(b"GGUF")
  with pytest.raises(ValueError, match="model.gguf: not a GGUF file: only 4 bytes"):
    load_gguf(path)


@pytest.mark.parametrize("keep", [30, 200, -10])
def test_truncated(tmp_path, llama_params, keep):
  """Cut in the metadata, in the tensor table, and in the last tensor's data."""
  full = _write_gguf(tmp_path / "full.gguf", "llama", llama_params).read_bytes()
  path = tmp_path / "cut.gguf"
  path.write_bytes(full[:keep])
  with pytest.raises(ValueError, match="cut.gguf: truncated GGUF file"):
    load_gguf(path)


def test_unknown_architecture(tmp_path):
  w = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "gpt2")
  w.add_block_count(1)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  with pytest.raises(ValueError, match="x.gguf: unsupported GGUF architecture 'gpt2'"):
    load_gguf(tmp_path / "x.gguf")


def test_missing_metadata(tmp_path, llama_params):
  path = _write_gguf(tmp_path / "m.gguf", "llama", llama_params, skip_keys={"block_count"})
  with pytest.raises(ValueError, match="m.gguf: GGUF metadata key 'llama.block_count' is missing"):
    load_gguf(path)


def test_missing_tensor(tmp_path, llama_params):
  del llama_params["layers.1.mlp.up_proj.weight"]
  path = _write_gguf(tmp_path / "m.gguf", "llama", llama_params)
  with pytest.raises(ValueError, match=r"m.gguf: missing tensor 'layers.1.mlp.up_proj.weight' "
                                       r"\(expected shape \(64, 32\)\)"):
    load_gguf(path)


def test_misshapen_tensor(tmp_path, llama_params):
  llama_params["layers.0.mlp.gate_proj.weight"] = np.zeros((32, 64), np.float32)
  path = _write_gguf(tmp_path / "m.gguf", "llama", llama_params)
  with pytest.raises(ValueError, match=r"m.gguf: tensor 'layers.0.mlp.gate_proj.weight' has "
                                       r"shape \(32, 64\), expected \(64, 32\)"):
    load_gguf(path)


def test_unknown_tensor(tmp_path, llama_params):
  path = _write_gguf(tmp_path / "m.gguf", "llama", llama_params,
                     extra={"blk.0.ffn_gate_exps.weight": np.zeros((2, 3), np.float32)})
  with pytest.raises(ValueError, match="m.gguf: unknown GGUF tensor 'blk.0.ffn_gate_exps.weight'"):
    load_gguf(path)


def test_unsupported_tensor_type(tmp_path, llama_params):
  del llama_params["final_norm.scale"]
  path = _write_gguf(tmp_path / "m.gguf", "llama", llama_params,
                     extra={"output_norm.weight": np.ones(32, np.int32)})
  with pytest.raises(ValueError, match="m.gguf: tensor 'output_norm.weight' has type I32, which "
                                       "the gguf package cannot dequantize"):
    load_gguf(path)


# Real models, against transformers' own GGUF loader.

_REAL = ["smollm2-135m", "gemma3-270m"]


@pytest.mark.real_model
@pytest.mark.parametrize("name", _REAL)
def test_real_weights_match_transformers(name, real_model_import, hf_gguf_reference):
  _, ours, _ = real_model_import(name)
  reference = hf_gguf_reference(name).params
  assert ours.keys() == reference.keys()
  for k, ref in reference.items():
    np.testing.assert_allclose(ours[k], ref, rtol=1e-6, atol=1e-6, err_msg=k)


@pytest.mark.real_model
@pytest.mark.parametrize("name", _REAL)
def test_real_config_matches_transformers(name, real_model_import, hf_gguf_reference,
                                          assert_config_matches_hf):
  config, _, _ = real_model_import(name)
  assert_config_matches_hf(config, hf_gguf_reference(name).model.config)


@pytest.mark.real_model
def test_real_configs(real_model_import):
  """The values read from the two files (also what the report quotes)."""
  smol, _, _ = real_model_import("smollm2-135m")
  assert (smol.architecture, smol.num_layers, smol.hidden_size, smol.num_heads,
          smol.num_kv_heads, smol.head_dim, smol.intermediate_size, smol.vocab_size) == (
              "llama", 30, 576, 9, 3, 64, 1536, 49152)
  assert (smol.rope_theta, smol.max_position_embeddings, smol.tie_word_embeddings) == (
      1e5, 8192, True)
  assert (smol.bos_token_id, smol.eos_token_ids, smol.add_bos) == (1, (2,), False)
  gemma, _, _ = real_model_import("gemma3-270m")
  assert (gemma.num_layers, gemma.hidden_size, gemma.num_heads, gemma.num_kv_heads,
          gemma.head_dim, gemma.intermediate_size, gemma.vocab_size) == (
              18, 640, 4, 1, 256, 2048, 262144)
  assert gemma.layer_types == gemma3_layer_types(18, 6)
  assert (gemma.sliding_window, gemma.rope_theta, gemma.rope_local_theta,
          gemma.query_pre_attn_scalar, gemma.rope_scaling) == (512, 1e6, 1e4, 256.0, None)
  assert (gemma.bos_token_id, gemma.eos_token_ids, gemma.add_bos) == (2, (1,), True)


@pytest.mark.real_model
def test_real_file_truncated(tmp_path, real_model_path):
  path = tmp_path / "cut.gguf"
  with open(real_model_path("smollm2-135m"), "rb") as f:
    path.write_bytes(f.read(5_000_000))  # the header is whole, the tensor data is not
  with pytest.raises(ValueError, match="cut.gguf: truncated GGUF file: tensor '.*' ends at byte"):
    load_gguf(path)
