"""Palu: the LowRankKV leaf (lowbit.lowrank) and the whitened-SVD transform with uniform and
Fisher ranks (lowbit.palu), on tiny random models."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowbit import checkpoint, palu
from lowbit.hadamard import hadamard_matrix
from lowbit.lowrank import LowRankKV, dense_weight, lowrank_linear, validate
from lowbit.nn import linear
from lowbit.quantize import fake_quantize
from lowbit.recipes import load_into
from models.config import for_architecture
from models.loading import from_params, parameter_shapes

# 4 KV heads so that groups of 1, 2 and all (4) are all possible.
_DIMS = dict(vocab_size=128, hidden_size=48, intermediate_size=64, num_layers=2,
             num_heads=8, num_kv_heads=4, head_dim=8, max_position_embeddings=64)
_CONFIG = for_architecture("llama", **_DIMS)


def _params(seed=0):
  rng = np.random.default_rng(seed)
  return {name: (rng.standard_normal(shape) * (0.5 if len(shape) == 1 else 0.2)
                 + (len(shape) == 1)).astype(np.float32)
          for name, shape in parameter_shapes(_CONFIG).items()}


@pytest.fixture(scope="module")
def model():
  return from_params(_CONFIG, _params())


@pytest.fixture(scope="module")
def windows():
  return np.random.default_rng(1).integers(0, _DIMS["vocab_size"], (4, 16))


@pytest.fixture(scope="module")
def stats(model, windows):
  return palu.palu_statistics(model, windows, fisher_windows=2, log=None)


def _inputs(n=512, k=48, seed=0):
  """Calibration-like inputs [n, k] with a few large channels (as LLM activations have)."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((n, k))
  x[:, :3] *= 30.0
  x += 0.5 * rng.standard_normal((n, 1)) * rng.standard_normal(k)  # correlated channels
  return x


@pytest.mark.parametrize("group_heads", [1, 2, 4])
def test_full_rank_reproduces_the_projection(group_heads):
  x = _inputs()
  w = np.random.default_rng(2).standard_normal((32, 48)).astype(np.float32) * 0.2
  leaf = palu.factorize(w, x.T @ x, group_heads=group_heads, head_dim=8,
                        rank=group_heads * 8)
  np.testing.assert_allclose(dense_weight(leaf), w, atol=2e-5)
  xs = jnp.asarray(x[:20], jnp.float32)
  np.testing.assert_allclose(lowrank_linear(xs, leaf), linear(xs, jnp.asarray(w)),
                             rtol=1e-4, atol=1e-3)


def test_whitened_svd_beats_plain_svd_on_the_calibration_outputs():
  x = _inputs()
  w = np.random.default_rng(3).standard_normal((32, 48)) * 0.2
  errors = {}
  for name, gram in (("whitened", x.T @ x), ("plain", None)):
    leaf = palu.factorize(w.astype(np.float32), gram, group_heads=4, head_dim=8, rank=12)
    errors[name] = np.linalg.norm(x @ w.T - x @ np.asarray(dense_weight(leaf), np.float64).T)
  # Whitened SVD minimizes exactly this error at rank 12 (Eckart-Young in the X basis).
  assert errors["whitened"] < 0.8 * errors["plain"], errors


def test_cholesky_falls_back_to_an_eigenvalue_shift():
  x = _inputs(n=10)  # 10 tokens, 48 channels: X^T X is singular
  gram = x.T @ x
  s = palu.whitening_factor(gram)
  assert np.allclose(s, np.tril(s)) and np.isfinite(s).all()
  shift = s @ s.T - gram
  assert np.allclose(shift, shift[0, 0] * np.eye(48), atol=1e-6 * np.abs(gram).max())
  assert shift[0, 0] > 0


def test_grouping_shapes_and_paths(model, stats):
  for group_heads, groups in ((1, 4), (2, 2), ("all", 1)):
    params = palu.palu_compress(model, ratio=0.5, group_heads=group_heads,
                                rank_method="uniform", rank_multiple=4, statistics=stats,
                                log=None)
    for i in range(_DIMS["num_layers"]):
      attn = params["layers"][i]["attn"]
      assert isinstance(attn["q_proj"]["weight"], jax.Array)
      for proj in ("k_proj", "v_proj"):
        leaf = attn[proj]["weight"]
        rows = 32 // groups
        assert isinstance(leaf, LowRankKV) and leaf.num_groups == groups
        assert leaf.down.shape == (groups, rows // 2, 48)
        assert leaf.up.shape == (groups, rows, rows // 2)
        assert leaf.latent_size == 16 and leaf.shape == (32, 48)
    assert palu.kv_cache_fraction(params) == 0.5
  # The model object is untouched.
  assert isinstance(model.layers[0].attn.k_proj.weight.get_value(), jax.Array)


def test_rank_budget(model, stats):
  for group_heads in (1, 2, "all"):
    for ratio in (0.3, 0.5, 0.7):
      uniform = palu.palu_ranks(model, ratio=ratio, group_heads=group_heads,
                                rank_method="uniform")
      fisher = palu.palu_ranks(model, ratio=ratio, group_heads=group_heads,
                               rank_method="fisher", fisher=stats.fisher)
      full = (4 if group_heads == "all" else group_heads) * 8
      assert sum(fisher.values()) == sum(uniform.values())  # same cache bytes
      assert all(r % 8 == 0 and 8 <= r <= full for r in fisher.values())
      assert len(set(uniform.values())) == 1
  # Ranks follow the scores: the module with the largest score gets the largest rank.
  fisher = palu.palu_ranks(model, ratio=0.5, group_heads="all", rank_method="fisher",
                           fisher=stats.fisher)
  top = max(stats.fisher, key=stats.fisher.get)
  assert fisher[top] == max(fisher.values())


def test_allocate_units_water_fills():
  rng = np.random.default_rng(0)
  for _ in range(50):
    m = rng.integers(1, 12)
    caps = rng.integers(1, 10, m)
    budget = int(rng.integers(m, caps.sum() + 1))
    scores = rng.exponential(size=m) ** 3
    units = palu.allocate_units(budget, scores, caps)
    assert units.sum() == budget and (units >= 1).all() and (units <= caps).all()
  # Hand-checked: scores 3:1 over 8 units, caps 4: the first saturates at 4, the rest go on.
  np.testing.assert_array_equal(palu.allocate_units(8, [3.0, 1.0, 0.0], [4, 8, 8]), [4, 3, 1])


def test_fisher_scores_are_positive_per_module(stats):
  assert sorted(stats.fisher) == sorted(f"layers.{i}.attn.{p}" for i in range(2)
                                        for p in ("k_proj", "v_proj"))
  assert all(np.isfinite(v) and v > 0 for v in stats.fisher.values())


def test_latent_quantization_and_hadamard():
  x = _inputs()
  w = (np.random.default_rng(4).standard_normal((32, 48)) * 0.2).astype(np.float32)
  plain = palu.factorize(w, x.T @ x, group_heads=2, head_dim=8, rank=8)
  rotated = palu.factorize(w, x.T @ x, group_heads=2, head_dim=8, rank=8, hadamard=True)
  # The folded rotation leaves the product unchanged and rotates the latent.
  np.testing.assert_allclose(dense_weight(rotated), dense_weight(plain), atol=1e-5)
  h = np.asarray(hadamard_matrix(8))
  np.testing.assert_allclose(rotated.down, np.einsum("sr,gsi->gri", h, plain.down), atol=1e-5)
  xs = jnp.asarray(x[:16], jnp.float32)
  for bits in (2, 3, 4):
    q = dataclasses.replace(rotated, latent_bits=bits)
    latent = jnp.einsum("ti,gri->tgr", xs, q.down)
    expected = jnp.einsum("tgr,gor->tgo", fake_quantize(latent, bits=bits, symmetric=False),
                          q.up).reshape(16, 32)
    np.testing.assert_allclose(lowrank_linear(xs, q), expected, rtol=1e-5, atol=1e-5)
  exact = lowrank_linear(xs, plain)
  err = [float(jnp.abs(lowrank_linear(xs, dataclasses.replace(plain, latent_bits=b)) - exact)
               .mean()) for b in (4, 3, 2)]
  assert 0 < err[0] < err[1] < err[2]


def test_checkpoint_round_trip_is_exact(model, stats, windows, tmp_path):
  params = palu.palu_compress(model, ratio=0.5, group_heads=2, rank_method="fisher",
                              latent_bits=3, hadamard=True, statistics=stats, log=None)
  checkpoint.save(tmp_path / "ckpt", params)
  restored = checkpoint.restore(tmp_path / "ckpt")
  for i in range(_DIMS["num_layers"]):
    for proj in ("k_proj", "v_proj"):
      a = params["layers"][i]["attn"][proj]["weight"]
      b = restored["layers"][i]["attn"][proj]["weight"]
      assert type(b) is LowRankKV
      assert jax.tree.structure(a) == jax.tree.structure(b)  # same static metadata
      for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  m1, m2 = from_params(_CONFIG, _params()), from_params(_CONFIG, _params())
  load_into(m1, params)
  load_into(m2, restored)
  tokens = jnp.asarray(windows[:1])
  np.testing.assert_array_equal(m1(tokens)[0], m2(tokens)[0])
  assert not np.allclose(m1(tokens)[0], model(tokens)[0])


def test_bad_inputs_raise_clear_errors(model, stats):
  kw = dict(statistics=stats, log=None)
  with pytest.raises(ValueError, match=r"group_heads=3 .*num_kv_heads=4"):
    palu.palu_compress(model, ratio=0.5, group_heads=3, **kw)
  for ratio in (0.0, -0.2, 1.5):
    with pytest.raises(ValueError, match=r"ratio=.* must be in \(0, 1\]"):
      palu.palu_compress(model, ratio=ratio, group_heads=1, **kw)
  for bits in (1, 5, 8):
    with pytest.raises(ValueError, match=rf"latent_bits={bits} is not one of"):
      palu.palu_compress(model, ratio=0.5, group_heads=1, latent_bits=bits, **kw)
  with pytest.raises(ValueError, match="rank_method="):
    palu.palu_compress(model, ratio=0.5, group_heads=1, rank_method="svd", **kw)
  with pytest.raises(ValueError, match="needs Fisher scores"):
    palu.palu_ranks(model, ratio=0.5, group_heads=1, rank_method="fisher", fisher=None)
  leaf = palu.factorize(np.ones((32, 48), np.float32), None, group_heads=2, head_dim=8,
                        rank=4)
  validate(leaf)
  with pytest.raises(ValueError, match=r"LowRankKV.down is float32\[2, 3, 48\]"):
    validate(dataclasses.replace(leaf, down=leaf.down[:, :3]))
  with pytest.raises(ValueError, match="rank=20 out of range"):
    validate(dataclasses.replace(leaf, rank=20))
  with pytest.raises(ValueError, match="not a multiple of group_heads"):
    validate(dataclasses.replace(leaf, shape=(30, 48)))
  with pytest.raises(ValueError, match="latent_bits=8"):
    validate(dataclasses.replace(leaf, latent_bits=8))
