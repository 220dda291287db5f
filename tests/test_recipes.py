"""Calibration (lowbit.calibration), recipes (lowbit.recipes) and `lowbit compress` / `eval`
of a compressed folder, on tiny random models."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lowbit import calibration
from lowbit.nn import capture_linear_inputs, qtensor_linear
from lowbit.qtensor import QTensor, validate
from lowbit.quantize import fake_quantize, quantize_weight
from lowbit.norm_fold import fold_norm_scales
from lowbit.recipes import RECIPES, atom_num_outliers, compress, load_into
from models.config import for_architecture
from models.loading import from_params, parameter_shapes

_DIMS = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_layers=2,
             num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=64)
_CONFIG = for_architecture("llama", **_DIMS)
_LINEARS = ("attn.k_proj", "attn.o_proj", "attn.q_proj", "attn.v_proj", "mlp.down_proj",
            "mlp.gate_proj", "mlp.up_proj")


def _params(config=_CONFIG, seed=0):
  rng = np.random.default_rng(seed)
  return {name: (rng.standard_normal(shape) * (0.5 if len(shape) == 1 else 0.15)
                 + (len(shape) == 1)).astype(np.float32)
          for name, shape in parameter_shapes(config).items()}


def _tokens(shape, seed):
  return np.random.default_rng(seed).integers(0, _DIMS["vocab_size"], shape)


@pytest.fixture(scope="module")
def params():
  return _params()


def test_statistics_are_x_transpose_x(params):
  model = from_params(_CONFIG, params)
  windows = _tokens((3, 10), 0)  # 3 windows in batches of 2: the sums span batches
  seen = {}

  def keep(path, w, stats):
    seen[path] = stats
    return w  # float weights: the next block sees float inputs

  out = calibration.calibrate(model, windows, keep, batch_size=2, log=None)
  assert sorted(out) == sorted(f"layers.{i}.{p}" for i in range(2) for p in _LINEARS)
  x = model.embed_inputs(jnp.asarray(windows))
  positions = jnp.arange(10)
  for i, block in enumerate(model.layers):
    inputs = {}
    with capture_linear_inputs(lambda m, a: inputs.setdefault(id(m), a)):
      y = block(x, positions, None, False)[0]
    for path, module in calibration.linear_modules(block).items():
      a = np.asarray(inputs[id(module)], np.float64).reshape(30, -1)
      stats = seen[f"layers.{i}.{path}"]
      assert stats.tokens == 30 and stats.hessian.dtype == np.float32
      np.testing.assert_allclose(stats.hessian, a.T @ a, rtol=1e-4, atol=1e-4)
      np.testing.assert_allclose(stats.diag, (a * a).sum(0), rtol=1e-4)
    # q_proj's input, computed without the capture.
    a = np.asarray(block.input_norm(x), np.float64).reshape(30, -1)
    np.testing.assert_allclose(seen[f"layers.{i}.attn.q_proj"].hessian, a.T @ a, rtol=1e-4,
                               atol=1e-4)
    x = y


def test_the_capture_is_off_outside_its_scope(params):
  model = from_params(_CONFIG, params)
  calls = []
  with capture_linear_inputs(lambda m, a: calls.append(m)):
    model.layers[0].attn.q_proj(jnp.ones((1, 64)))
  model.layers[0].attn.q_proj(jnp.ones((1, 64)))
  assert len(calls) == 1


@pytest.mark.parametrize("name", sorted(n for n, r in RECIPES.items() if r.make is not None))
def test_recipes_keep_paths_and_the_model_runs(params, name):
  model = from_params(_CONFIG, params)
  windows = _tokens((4, 16), 1)
  new = compress(model, name, windows, log=None)
  old = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  flat_new = dict(nnx.to_flat_state(nnx.State(new)))
  flat_old = dict(nnx.to_flat_state(nnx.State(old)))
  assert flat_new.keys() == flat_old.keys()
  for path, leaf in flat_new.items():
    quantized = path[0] == "layers" and ".".join(map(str, path[2:-1])) in _LINEARS
    assert isinstance(leaf, QTensor) == quantized, path
    if quantized:
      validate(leaf)
      assert leaf.shape == flat_old[path].shape
    else:
      assert leaf is flat_old[path]  # embeddings, norms and the head stay as they were
  assert isinstance(model.layers[0].attn.q_proj.weight.get_value(), jax.Array)  # untouched
  q = new["layers"][1]["mlp"]["down_proj"]["weight"]
  expected = {"rtn": (4, None, 0), "w4a16": (4, None, 0), "w8a8": (8, "int8_token", 0),
              "atom-w4a4": (4, "int4_group", 8), "quarot-w4a4": (4, "int4_group", 0)}[name]
  assert (q.bits, q.act_quant, q.num_outliers) == expected
  if name == "atom-w4a4":
    assert q.act_clip == 0.9 and q.perm is not None and q.zeros is None
  if name == "quarot-w4a4":
    assert (q.input_transform, q.input_seed, q.act_clip) == ("hadamard", 0, 0.9)
    assert q.perm is None and q.zeros is None and q.group_size == 96  # 128 fitted to 96
  reference = model(jnp.asarray(windows))[0]
  load_into(model, new)
  logits = model(jnp.asarray(windows))[0]
  assert bool(jnp.isfinite(logits).all())
  assert 0 < float(jnp.abs(logits - reference).mean()) < float(jnp.abs(reference).mean())


def test_atom_reorders_the_largest_channels_into_the_tail(params):
  model = from_params(_CONFIG, params)
  windows = _tokens((4, 16), 2)
  seen = {}
  quantize = RECIPES["atom-w4a4"].make(64, **RECIPES["atom-w4a4"].defaults)

  def atom(path, w, stats):
    seen[path] = stats
    return quantize(path, w, stats)

  leaves = calibration.calibrate(model, windows, atom, log=None)
  q = leaves["layers.0.mlp.down_proj"]
  diag = seen["layers.0.mlp.down_proj"].diag
  assert set(np.asarray(q.perm)[-8:]) == set(np.argsort(diag)[-8:])
  assert [atom_num_outliers(h) for h in (4096, 576, 64)] == [128, 16, 8]


def test_gptq_through_calibration_beats_rtn_on_held_out_tokens(params):
  # Embeddings near a 16-dimensional subspace: correlated inputs, as in real models, where
  # GPTQ's error propagation pays.
  rng = np.random.default_rng(6)
  low_rank = dict(params)
  low_rank["embed.embedding"] = (rng.standard_normal((256, 16)) @ rng.standard_normal(
      (16, 64)) / 4 + rng.standard_normal((256, 64)) * 0.05).astype(np.float32)
  model = from_params(_CONFIG, low_rank)
  calib, held_out = _tokens((16, 32), 3), jnp.asarray(_tokens((4, 32), 4))
  reference = model(held_out)[0]
  errors = {}
  for name in ("rtn", "w4a16"):  # default settings: 4-bit asymmetric, groups of 128 (fitted)
    quantized = from_params(_CONFIG, low_rank)
    load_into(quantized, compress(model, name, calib, log=None))
    errors[name] = float(jnp.mean((quantized(held_out)[0] - reference)**2))
  assert errors["w4a16"] < 0.5 * errors["rtn"], errors


def test_quarot_gptq_sees_the_rotated_hessian():
  # Correlated inputs with an outlier channel; GPTQ on W M^T must use M H M^T to beat RTN
  # on the layer's output error x (W - Wq)^T (weights only: dequantize undoes M).
  rng = np.random.default_rng(7)
  x = rng.standard_normal((512, 8)) @ rng.standard_normal((8, 64)) + \
      0.1 * rng.standard_normal((512, 64))
  x[:, 5] *= 10
  w = rng.standard_normal((32, 64)).astype(np.float32)
  stats = calibration.LinearStats((x.T @ x).astype(np.float32), 512)
  recipe = RECIPES["quarot-w4a4"]
  errors = {}
  for gptq in (False, True):
    for seed in (None, 4, 0):
      q = recipe.make(64, **dict(recipe.defaults, gptq=gptq, seed=seed))("p", w, stats)
      assert q.input_seed == seed and q.input_transform == "hadamard"
      errors[gptq, seed] = np.linalg.norm(x @ (w - np.asarray(q.dequantize())).T)
  for seed in (None, 4, 0):
    assert errors[True, seed] < 0.7 * errors[False, seed], errors
  # act_order with groups: the GPTQ order becomes perm, applied after the rotation.
  q = recipe.make(64, **dict(recipe.defaults, act_order=True, group_size=32))("p", w, stats)
  assert q.perm is not None and q.input_transform == "hadamard"
  assert np.linalg.norm(x @ (w - np.asarray(q.dequantize())).T) < 0.7 * errors[False, 0]
  xs = jnp.asarray(x[:4], jnp.float32)
  np.testing.assert_allclose(qtensor_linear(xs, dataclasses.replace(q, act_quant=None)),
                             xs @ q.dequantize().T, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("architecture", ["llama", "gemma3"])
def test_fold_norm_scales_keeps_the_float_model(architecture):
  config = for_architecture(architecture, **_DIMS)
  model = from_params(config, _params(config))
  tokens = jnp.asarray(_tokens((2, 12), 3))
  folded = fold_norm_scales(model)
  np.testing.assert_allclose(folded(tokens)[0], model(tokens)[0], rtol=1e-4, atol=1e-4)
  norm = folded.layers[1].pre_mlp_norm
  assert float(jnp.abs(norm.scale.get_value() - (0.0 if norm.plus_one else 1.0)).max()) == 0
  assert float(jnp.abs(model.layers[1].pre_mlp_norm.scale.get_value()
                       - folded.layers[1].pre_mlp_norm.scale.get_value()).max()) > 0
  # compress folds before calibrating: the saved norms are identities, the model untouched.
  params = compress(model, "quarot-w4a4", _tokens((2, 8), 4), {"fold_norms": True}, log=None)
  assert np.all(np.asarray(params["layers"][0]["input_norm"]["scale"]) ==
                (0.0 if norm.plus_one else 1.0))
  assert isinstance(params["layers"][0]["attn"]["q_proj"]["weight"], QTensor)
  load_into(model, compress(model, "rtn", log=None))
  with pytest.raises(TypeError, match="attn.q_proj holds a QTensor; fold norm scales before"):
    fold_norm_scales(model)


def test_activation_clip_is_simulated_and_validated():
  rng = np.random.default_rng(5)
  w = jnp.asarray(rng.standard_normal((8, 32)), jnp.float32)
  x = jnp.asarray(rng.standard_normal((3, 32)), jnp.float32)
  q = dataclasses.replace(quantize_weight(w, bits=4, group_size=8, symmetric=True,
                                          num_outliers=8, act_quant="int4_group"),
                          act_clip=0.9)
  expected = fake_quantize(x, bits=4, group_size=8, num_outliers=8, clip_ratio=0.9) @ \
      q.dequantize().T
  np.testing.assert_allclose(qtensor_linear(x, q), expected, rtol=1e-5, atol=1e-5)
  for bad in (0.0, 1.5):
    with pytest.raises(ValueError, match="act_clip"):
      validate(dataclasses.replace(q, act_clip=bad))


def test_errors(params):
  model = from_params(_CONFIG, params)
  with pytest.raises(ValueError, match="unknown recipe 'gptq3'; known recipes"):
    compress(model, "gptq3")
  with pytest.raises(ValueError, match="has no settings \\['groups'\\]"):
    compress(model, "rtn", settings={"groups": 64})
  with pytest.raises(ValueError, match="needs calibration windows"):
    compress(model, "w4a16")
  with pytest.raises(TypeError, match="cannot be calibrated"):
    compress(object(), "rtn")
  with pytest.raises(ValueError, match="integer token ids"):
    calibration.calibrate(model, np.zeros((2, 3), np.float32), None, log=None)
  broken = dict(params)
  broken["embed.embedding"] = params["embed.embedding"].copy()
  broken["embed.embedding"][7] = np.nan
  with pytest.raises(ValueError, match="entering layers.0 have NaN or Inf"):
    compress(from_params(_CONFIG, broken), "w4a16", np.full((1, 4), 7))
  odd = for_architecture("llama", **dict(_DIMS, intermediate_size=45))
  with pytest.raises(ValueError, match="layers.0.mlp.down_proj: 45 input channels"):
    compress(from_params(odd, _params(odd)), "rtn", log=None)
  with pytest.raises(ValueError, match="down_proj: no Hadamard matrix of order 45"):
    compress(from_params(odd, _params(odd)), "quarot-w4a4", np.zeros((1, 4), np.int64),
             log=None)
  with pytest.raises(ValueError, match="act_quant='int8_token' must be"):
    compress(model, "quarot-w4a4", np.zeros((1, 4), np.int64),
             settings={"act_quant": "int8_token"}, log=None)


def _tiny_hf_folder(folder, params):
  """A Llama folder as transformers writes it: config, safetensors, a byte-level
  tokenizer.json of 256 tokens (one per byte, no merges)."""
  import safetensors.numpy
  import tokenizers
  from models.hf_names import lowbit_to_hf
  folder.mkdir()
  (folder / "config.json").write_text(json.dumps(dict(
      model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=96,
      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
      max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=10000.0,
      tie_word_embeddings=False, bos_token_id=None, eos_token_id=None)))
  safetensors.numpy.save_file(lowbit_to_hf("llama", params), str(folder / "model.safetensors"))
  alphabet = tokenizers.pre_tokenizers.ByteLevel.alphabet()
  tok = tokenizers.Tokenizer(tokenizers.models.BPE(
      {c: i for i, c in enumerate(sorted(alphabet))}, []))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  tok.save(str(folder / "tokenizer.json"))
  return folder


def test_compress_then_eval_through_the_cli(tmp_path, params, capsys):
  from train.cli import main
  model_dir = _tiny_hf_folder(tmp_path / "tiny", params)
  calib, text = tmp_path / "calib.txt", tmp_path / "eval.txt"
  calib.write_text("Calibration text about many things. " * 20)
  text.write_text("A different text, held out for evaluation! " * 20)
  out = tmp_path / "tiny-w4a16"
  assert main(["compress", "--model", str(model_dir), "--recipe", "w4a16", "--calib",
               str(calib), "--calib-samples", "4", "--calib-seq-len", "32", "--set",
               "group_size=32", "--out", str(out)]) == 0
  manifest = json.loads((out / "manifest.json").read_text())
  assert manifest["recipe"] == "w4a16" and manifest["settings"]["group_size"] == 32
  assert manifest["calib_text"] == "calib.txt" and manifest["calib_samples"] == 4
  assert manifest["weight_bytes_after"] < manifest["weight_bytes_before"]
  assert sorted(p.name for p in tmp_path.iterdir()) == [
      "calib.txt", "eval.txt", "tiny", "tiny-w4a16"]  # no partial folder left
  capsys.readouterr()
  records = tmp_path / "records.jsonl"
  for model in (str(model_dir), str(out)):
    assert main(["eval", "--model", model, "--text", str(text), "--seq-len", "32",
                 "--json", "--out", str(records)]) == 0
  float_result, result = map(json.loads, capsys.readouterr().out.splitlines())
  assert (float_result["recipe"], result["recipe"]) == ("float", "w4a16")
  assert result["calib_text"] == "calib.txt" and result["settings"]["group_size"] == 32
  assert result["model"] == str(model_dir) and result["compressed"] == str(out)
  assert result["weight_bytes"] == manifest["weight_bytes_after"]
  assert result["perplexity"] != float_result["perplexity"]
  assert abs(np.log(result["perplexity"] / float_result["perplexity"])) < 0.5
  assert len(records.read_text().splitlines()) == 2

  # Errors: evaluating on the calibration text, an existing --out, a missing --calib.
  assert main(["eval", "--model", str(out), "--text", str(calib), "--seq-len", "32"]) == 2
  assert "evaluate on another text" in capsys.readouterr().err
  assert main(["compress", "--model", str(model_dir), "--recipe", "rtn", "--out",
               str(out)]) == 2
  assert "exists" in capsys.readouterr().err
  assert main(["compress", "--model", str(model_dir), "--recipe", "atom-w4a4", "--out",
               str(tmp_path / "x")]) == 2
  assert "needs --calib" in capsys.readouterr().err
  assert not (tmp_path / "x").exists()


def test_palu_and_composed_recipes(params):
  """`palu` replaces only k/v projections by low-rank leaves; `w4a16+palu` keeps GPTQ
  QTensors elsewhere and the low-rank K/V of Palu; shared settings are refused."""
  from lowbit.lowrank import LowRankKV
  from lowbit.recipes import get_recipe, settings_of
  model = from_params(_CONFIG, params)
  windows = _tokens((4, 16), 1)
  composed = compress(model, "w4a16+palu", windows,
                      {"group_size": 32, "ratio": 0.5, "rank_method": "uniform"}, log=None)
  attn, mlp = composed["layers"][0]["attn"], composed["layers"][0]["mlp"]
  assert isinstance(attn["k_proj"]["weight"], LowRankKV)
  assert isinstance(attn["v_proj"]["weight"], LowRankKV)
  assert isinstance(attn["q_proj"]["weight"], QTensor)
  assert isinstance(mlp["down_proj"]["weight"], QTensor)
  load_into(model, composed)
  assert bool(jnp.isfinite(model(jnp.asarray(windows))[0]).all())
  assert settings_of("w4a16+palu")["ratio"] == 0.5
  with pytest.raises(ValueError, match="share the settings"):
    get_recipe("w4a16+rtn")
  with pytest.raises(ValueError, match="unknown recipe 'palu2'"):
    get_recipe("w4a16+palu2")
