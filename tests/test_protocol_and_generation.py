"""The perplexity protocol, generation and config validation on a small random model."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.config import for_architecture, gemma3_layer_types
from models.generate import Generator, Sampling, sample_tokens
from models.loading import from_params, parameter_shapes
from models.transformer import DecoderLM
from train.perplexity import make_windows, perplexity

VOCAB = 37


def _model(architecture="llama", **overrides):
  fields = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_layers=2,
                num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=320)
  if architecture == "gemma3":
    fields.update(layer_types=gemma3_layer_types(2, 2), sliding_window=8,
                  rope_local_theta=10000.0, bos_token_id=2)
  fields.update(overrides)
  return DecoderLM(for_architecture(architecture, **fields), rngs=nnx.Rngs(0))


def _reference_perplexity(model, windows, first_predicted):
  """Direct log-softmax over the full logits: the oracle for the chunked implementation."""
  logits, _ = model(jnp.asarray(windows))
  logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
  nll = -jnp.take_along_axis(logp, jnp.asarray(windows)[:, 1:, None], axis=-1)[..., 0]
  return math.exp(float(jnp.mean(nll[:, first_predicted:])))


def test_windows_drop_remainder_and_cap():
  ids = np.arange(1000)
  w = make_windows(ids, 128, max_tokens=700)
  assert w.shape == (5, 128) and w[1, 0] == 128 and w[-1, -1] == 639


def test_windows_with_bos():
  w = make_windows(np.arange(10, 30), 5, bos_id=1)
  assert w.shape == (4, 6) and (w[:, 0] == 1).all() and list(w[1, 1:]) == [15, 16, 17, 18, 19]


@pytest.mark.parametrize("bad", [dict(seq_len=1), dict(seq_len=64, max_tokens=0),
                                 dict(seq_len=500)])
def test_windows_errors(bad):
  with pytest.raises(ValueError, match="seq_len|max_tokens"):
    make_windows(np.arange(100), **bad)


def test_perplexity_matches_direct_computation():
  model = _model()
  ids = np.random.RandomState(0).randint(0, VOCAB, 1100)
  result = perplexity(model, ids, 300, batch_size=2, progress=False)
  # 3 windows (200 tokens dropped), 299 predicted tokens each: the first has no context.
  assert result["tokens"] == 3 * 299 and result["windows"] == 3
  expected = _reference_perplexity(model, ids[:900].reshape(3, 300), 0)
  assert result["perplexity"] == pytest.approx(expected, rel=1e-5)


def test_perplexity_with_bos_predicts_every_window_token():
  model = _model("gemma3")
  ids = np.random.RandomState(1).randint(3, VOCAB, 400)
  result = perplexity(model, ids, 100, progress=False)
  assert result["tokens"] == 400
  windows = make_windows(ids, 100, bos_id=2)
  assert result["perplexity"] == pytest.approx(_reference_perplexity(model, windows, 0),
                                               rel=1e-5)


def test_perplexity_rejects_windows_beyond_context():
  with pytest.raises(ValueError, match="exceeds the model's context"):
    perplexity(_model(), np.arange(1000) % VOCAB, 400, progress=False)


def test_greedy_generation_is_argmax_of_full_forward():
  model = _model()
  prompt = jnp.asarray([[3, 5, 7, 11, 13]])
  new = Generator(model, 32).generate(prompt, 10)
  logits, _ = model(jnp.concatenate([prompt, new], axis=1))
  assert (jnp.argmax(logits[0, 4:-1], -1) == new[0]).all()
  assert list(Generator(model, 32).stream([3, 5, 7, 11, 13], 10)) == new[0].tolist()


def test_stream_stops_at_stop_token():
  model = _model()
  tokens = list(Generator(model, 64).stream([1, 2, 3], 20))
  stop = tokens[3]
  stopped = list(Generator(model, 64).stream([1, 2, 3], 20, stop_ids=(stop,)))
  assert stopped == tokens[:tokens.index(stop) + 1]


def test_sampling_respects_top_k():
  logits = jnp.tile(jnp.arange(10.0)[None], (500, 1))
  drawn = sample_tokens(logits, jax.random.key(0), Sampling(temperature=5.0, top_k=3))
  assert set(np.asarray(drawn).tolist()) == {7, 8, 9}
  drawn = sample_tokens(logits * 10, jax.random.key(1), Sampling(temperature=1.0, top_p=0.5))
  assert set(np.asarray(drawn).tolist()) == {9}


@pytest.mark.parametrize("bad", [dict(temperature=-1.0), dict(top_k=0), dict(top_p=1.5)])
def test_sampling_validation(bad):
  with pytest.raises(ValueError):
    Sampling(**bad)


def test_generation_length_checks():
  generator = Generator(_model(), 16)
  with pytest.raises(ValueError, match="exceeds max_len"):
    generator.generate(jnp.ones((1, 10), jnp.int32), 7)
  with pytest.raises(ValueError, match="exceeds the model's context"):
    Generator(_model(), 1000)


@pytest.mark.parametrize("bad,match", [
    (dict(architecture="gpt2"), "unknown architecture"),
    (dict(num_kv_heads=3), "not a multiple"),
    (dict(head_dim=7), "even"),
    (dict(layer_types=("full",)), "layer_types"),
    (dict(layer_types=("sliding", "full")), "sliding_window"),
    (dict(hidden_size=0), "positive"),
])
def test_config_validation(bad, match):
  fields = dict(architecture="llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                max_position_embeddings=320)
  fields.update(bad)
  with pytest.raises(ValueError, match=match):
    for_architecture(fields.pop("architecture"), **fields)


def test_from_params_errors_name_the_tensor():
  model = _model()
  params = {".".join(map(str, k)): np.asarray(v.get_value())
            for k, v in nnx.to_flat_state(nnx.state(model))}
  assert set(params) == set(parameter_shapes(model.config))
  with pytest.raises(ValueError, match="missing .*final_norm.scale"):
    from_params(model.config, {k: v for k, v in params.items() if k != "final_norm.scale"})
  bad = dict(params, **{"layers.1.mlp.up_proj.weight": np.zeros((48, 31), np.float32)})
  with pytest.raises(ValueError, match=r"layers.1.mlp.up_proj.weight has shape \(48, 31\)"):
    from_params(model.config, bad)
