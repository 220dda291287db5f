"""Saving and restoring parameter states with QTensor leaves (lowbit.checkpoint)."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lowbit import checkpoint
from lowbit.qtensor import QTensor
from lowbit.quantize import quantize_weight
from models.config import for_architecture
from models.loading import from_params, parameter_shapes

_CONFIG = for_architecture("llama", vocab_size=37, hidden_size=32, intermediate_size=48,
                           num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                           max_position_embeddings=64)


def _quantized_model(seed):
  """A tiny model with k/v projections in 4-bit asym (outliers, perm), the head in 8-bit sym,
  one bfloat16 norm scale and float32 arrays elsewhere (settings as in tests/test_qtensor)."""
  rng = np.random.default_rng(seed)
  model = from_params(_CONFIG, {
      name: (rng.standard_normal(shape) * 0.2 + (len(shape) == 1)).astype(np.float32)
      for name, shape in parameter_shapes(_CONFIG).items()})
  for layer in model.layers:
    for proj in (layer.attn.k_proj, layer.attn.v_proj):
      proj.weight.set_value(quantize_weight(
          proj.weight.get_value(), bits=4, group_size=8, symmetric=False, num_outliers=8,
          perm=rng.permutation(32), act_quant="int4_group"))
  head = model.lm_head.weight
  head.set_value(quantize_weight(head.get_value(), bits=8, group_size=None, symmetric=True))
  norm = model.layers[0].pre_mlp_norm.scale
  norm.set_value(norm.get_value().astype(jnp.bfloat16))
  return model


def _assert_bitwise_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)  # keys, QTensor static fields
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    assert x.dtype == y.dtype and x.shape == y.shape
    assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


def test_round_trip_is_bitwise(tmp_path):
  state = nnx.state(_quantized_model(0))
  checkpoint.save(tmp_path / "ckpt", state)
  restored = checkpoint.restore(tmp_path / "ckpt")
  _assert_bitwise_equal(restored, nnx.to_pure_dict(state))
  q = restored["layers"][1]["attn"]["k_proj"]["weight"]
  assert isinstance(q, QTensor) and q.act_quant == "int4_group" and q.perm is not None
  assert isinstance(q.codes, jax.Array)
  # Loaded into another model's state, it replaces every value.
  fresh_state = nnx.state(_quantized_model(1))
  nnx.replace_by_pure_dict(fresh_state, restored)
  _assert_bitwise_equal(nnx.to_pure_dict(fresh_state), nnx.to_pure_dict(state))
  # Nothing but the checkpoint is left in the parent folder.
  assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_plain_nested_dict(tmp_path):
  params = {"a": {"w": jnp.arange(6, dtype=jnp.int8).reshape(2, 3)},
            "layers": {0: jnp.ones(4), 1: {"b": np.float32([1.5, -2.0])}}}
  checkpoint.save(tmp_path / "c", params)
  _assert_bitwise_equal(checkpoint.restore(tmp_path / "c"), params)


def test_refuses_to_overwrite(tmp_path):
  checkpoint.save(tmp_path / "c", {"x": jnp.ones(3)})
  with pytest.raises(FileExistsError, match="overwrite=True"):
    checkpoint.save(tmp_path / "c", {"x": jnp.zeros(3)})
  checkpoint.save(tmp_path / "c", {"x": jnp.zeros(3)}, overwrite=True)
  np.testing.assert_array_equal(checkpoint.restore(tmp_path / "c")["x"], np.zeros(3))
  assert [p.name for p in tmp_path.iterdir()] == ["c"]


def test_interrupted_save_leaves_nothing(tmp_path, monkeypatch):
  def crash(*args, **kwargs):
    raise RuntimeError("power cut")

  checkpoint.save(tmp_path / "old", {"x": jnp.ones(3)})
  # Crash after the arrays are written, before the index is.
  monkeypatch.setattr(checkpoint, "json", types.SimpleNamespace(dumps=crash))
  for name, overwrite in (("new", False), ("old", True)):
    with pytest.raises(RuntimeError, match="power cut"):
      checkpoint.save(tmp_path / name, {"x": jnp.zeros(3)}, overwrite=overwrite)
  monkeypatch.undo()
  assert [p.name for p in tmp_path.iterdir()] == ["old"]
  np.testing.assert_array_equal(checkpoint.restore(tmp_path / "old")["x"], np.ones(3))


def test_unsavable_leaves(tmp_path):
  with pytest.raises(TypeError, match="leaf at \\('a', 'f'\\) is a str"):
    checkpoint.save(tmp_path / "c", {"a": {"f": "text"}})
  with pytest.raises(ValueError, match="int64"):
    checkpoint.save(tmp_path / "c", {"a": np.arange(3, dtype=np.int64)})
  assert not (tmp_path / "c").exists()


def test_missing_and_damaged(tmp_path):
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    checkpoint.restore(tmp_path / "nothing")
  params = {"x": jnp.arange(1000, dtype=jnp.float32)}
  checkpoint.save(tmp_path / "no_index", params)
  (tmp_path / "no_index" / "lowbit.json").unlink()
  with pytest.raises(ValueError, match="not a readable lowbit checkpoint"):
    checkpoint.restore(tmp_path / "no_index")
  checkpoint.save(tmp_path / "bad_index", params)
  (tmp_path / "bad_index" / "lowbit.json").write_text("{")
  with pytest.raises(ValueError, match="not a readable lowbit checkpoint"):
    checkpoint.restore(tmp_path / "bad_index")
  checkpoint.save(tmp_path / "damaged", params)
  for f in (tmp_path / "damaged" / "arrays").rglob("*"):
    if f.is_file() and f.parent.name == "d":  # the array data files
      f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
  with pytest.raises(ValueError, match="damaged"):
    checkpoint.restore(tmp_path / "damaged")
