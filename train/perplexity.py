"""The perplexity protocol that every accuracy number in lowbit uses.

1. Tokenize the whole text once, without special tokens.
2. Keep at most `max_tokens` tokens, cut consecutive non-overlapping windows of `seq_len`
   tokens and drop the remainder.
3. Prepend BOS to each window only for models that expect it (Gemma); then every window
   token is predicted. Without BOS the first token of a window has no context and is not
   predicted.
4. Score every window independently; perplexity = exp(mean NLL over all predicted tokens).
"""

from __future__ import annotations

import functools
import math
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.transformer import DecoderLM

# Tokens per slice of the output head: bounds the float32 logits held at once
# ([B, 256, V]: 256 MiB for Gemma's 262k vocabulary at B=1).
_HEAD_CHUNK = 256


def make_windows(token_ids: Sequence[int], seq_len: int, *, max_tokens: int | None = None,
                 bos_id: int | None = None) -> np.ndarray:
  """Token ids -> int32 windows [num_windows, seq_len (+1 with BOS)]."""
  if seq_len < 2:
    raise ValueError(f"seq_len must be >= 2, got {seq_len}")
  ids = np.asarray(token_ids, np.int32)
  if max_tokens is not None:
    if max_tokens < 1:
      raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    ids = ids[:max_tokens]
  num_windows = len(ids) // seq_len
  if num_windows == 0:
    raise ValueError(f"the text has {len(ids)} tokens, fewer than one window of "
                     f"seq_len={seq_len}")
  windows = ids[:num_windows * seq_len].reshape(num_windows, seq_len)
  if bos_id is not None:
    windows = np.concatenate([np.full((num_windows, 1), bos_id, np.int32), windows], axis=1)
  return windows


@functools.partial(jax.jit, static_argnums=(0,))
def _window_nll(graphdef, state, windows):
  """windows [B, L] -> summed NLL of tokens 1..L-1 given their prefixes, per window [B]."""
  model = nnx.merge(graphdef, state)
  hidden, _ = model.hidden_states(windows[:, :-1])  # [B, L-1, D]
  targets = windows[:, 1:]
  b, t, d = hidden.shape
  pad = (-t) % _HEAD_CHUNK
  hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
  targets = jnp.pad(targets, ((0, 0), (0, pad)))
  valid = jnp.arange(t + pad) < t
  chunks = (t + pad) // _HEAD_CHUNK

  def chunk_nll(total, inputs):
    h, y, ok = inputs  # [B, C, D], [B, C], [C]
    logits = model.logits(h)
    nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(
        logits, y[..., None], axis=-1)[..., 0]
    return total + jnp.sum(jnp.where(ok, nll, 0.0), axis=-1), None

  split = lambda a, axis: jnp.moveaxis(
      a.reshape(a.shape[:axis] + (chunks, _HEAD_CHUNK) + a.shape[axis + 1:]), axis, 0)
  total, _ = jax.lax.scan(chunk_nll, jnp.zeros((b,), jnp.float32),
                          (split(hidden, 1), split(targets, 1), split(valid, 0)))
  return total


def perplexity(model: DecoderLM, token_ids: Sequence[int], seq_len: int, *,
               max_tokens: int | None = None, batch_size: int = 1,
               progress: bool = True) -> dict:
  """Scores `token_ids` by the protocol above -> {perplexity, nll, tokens, windows}."""
  config = model.config
  bos_id = config.bos_token_id if config.add_bos else None
  if config.add_bos and bos_id is None:
    raise ValueError(f"{config.architecture} expects BOS but the config has no bos_token_id")
  window_len = seq_len + (bos_id is not None)
  if window_len > config.max_position_embeddings:
    raise ValueError(f"seq_len={seq_len} exceeds the model's context of "
                     f"{config.max_position_embeddings} tokens")
  windows = make_windows(token_ids, seq_len, max_tokens=max_tokens, bos_id=bos_id)
  graphdef, state = nnx.split(model)
  total_nll = 0.0
  bar = _progress(len(windows), progress)
  for start in range(0, len(windows), batch_size):
    batch = windows[start:start + batch_size]
    total_nll += float(jnp.sum(_window_nll(graphdef, state, jnp.asarray(batch))))
    bar(len(batch))
  predicted = len(windows) * (window_len - 1)
  mean_nll = total_nll / predicted
  return {"perplexity": math.exp(mean_nll), "nll": mean_nll, "tokens": predicted,
          "windows": len(windows), "seq_len": seq_len}


def _progress(total: int, enabled: bool):
  """A tqdm bar on stderr, or nothing; returns an update(n) function."""
  if not enabled:
    return lambda n: None
  from tqdm import tqdm
  bar = tqdm(total=total, unit="window", file=sys.stderr, leave=False)
  return bar.update
