"""Layer-by-layer calibration: each linear layer's input statistics, and GPTQ's "feed the
quantized outputs forward".

Motivation: GPTQ and Atom's reorder need H = sum over calibration tokens of x x^T for the
input x of every linear layer, and the inputs of block i should come from the already
quantized blocks 0..i-1 (so later layers correct the error of earlier ones). Streaming block
by block keeps memory at one block's statistics plus the calibration activations [S, T, D],
whatever the depth of the model.

Per block: (1) run it in float over all windows, capturing the inputs of its `Linear` calls
(`lowbit.nn.capture_linear_inputs`) and summing H per layer; (2) hand each layer's weight and
statistics to the caller's quantize function; (3) run the block again with the new weights
to produce the next block's inputs. All linears of a block see float-block inputs in (1)
(no sequential update inside a block).

lowbit never imports `models`: a model serves calibration through `CalibrationModel`.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import time
from typing import Callable, Protocol, Sequence, TextIO

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lowbit.nn import Linear, capture_linear_inputs


class CalibrationModel(Protocol):
  """What calibration needs of a model: the first block's input and the list of blocks,
  each `block(x [B, T, D], positions [T], cache=None, prefill=False) -> (x, cache)`. (The
  head is not needed: recipes leave it in float.)"""

  layers: Sequence[nnx.Module]

  def embed_inputs(self, tokens: jax.Array) -> jax.Array:
    """tokens [B, T] -> the first block's input [B, T, D]."""


@dataclasses.dataclass(frozen=True)
class LinearStats:
  """Input statistics of one linear layer over the calibration tokens."""

  hessian: np.ndarray  # [K, K] float32: sum of x x^T
  tokens: int

  @property
  def diag(self) -> np.ndarray:
    """[K] float32: sum of x^2 per input channel (Atom's reorder metric)."""
    return np.diag(self.hessian)


# (path such as "layers.3.attn.q_proj", weight [N, K], stats) -> the leaf that replaces it.
QuantizeFn = Callable[[str, jax.Array, LinearStats], object]


def linear_modules(block: nnx.Module) -> dict[str, Linear]:
  """Dotted path inside `block` -> each `Linear` it holds (sorted by path)."""
  return {".".join(str(p) for p in path): node for path, node in nnx.iter_graph(block)
          if isinstance(node, Linear)}


def check_model(model) -> None:
  """Raises TypeError unless `model` implements `CalibrationModel`."""
  missing = [name for name in ("layers", "embed_inputs") if not hasattr(model, name)]
  if missing:
    raise TypeError(f"{type(model).__name__} cannot be calibrated: it lacks {missing} "
                    f"(see lowbit.calibration.CalibrationModel)")


def calibrate(model: CalibrationModel, windows, quantize: QuantizeFn, *, batch_size: int = 8,
              log: TextIO | None = sys.stderr) -> dict[str, object]:
  """Quantizes every linear layer of every block of `model` (not modified) with `quantize`,
  block by block on the calibration token ids `windows` [S, T].

  Returns {path: new leaf}, path as "layers.{i}.attn.q_proj" (the leaf replaces that
  module's weight). Progress goes to `log` (None: silent).
  """
  check_model(model)
  windows = np.asarray(windows)
  if windows.ndim != 2 or windows.size == 0 or not np.issubdtype(windows.dtype, np.integer):
    raise ValueError(f"calibration windows must be non-empty integer token ids [S, T], got "
                     f"{windows.dtype}{list(windows.shape)}")
  if batch_size <= 0:
    raise ValueError(f"{batch_size=} must be positive")
  positions = jnp.arange(windows.shape[1], dtype=jnp.int32)
  batches = [slice(s, s + batch_size) for s in range(0, len(windows), batch_size)]
  x = jnp.concatenate([model.embed_inputs(jnp.asarray(windows[b])) for b in batches])
  tokens = windows.size
  out = {}
  for i, block in enumerate(model.layers):
    start = time.perf_counter()
    if not bool(jnp.isfinite(x).all()):
      raise ValueError(f"calibration activations entering layers.{i} have NaN or Inf "
                       f"entries")
    graphdef, state = nnx.split(block)
    sums = None
    for b in batches:
      h = _block_hessians(graphdef, state, x[b], positions)
      sums = h if sums is None else jax.tree.map(jnp.add, sums, h)
    # A copy of the Variables (not of the arrays), so `block` keeps its weights.
    quantized = nnx.merge(graphdef, jax.tree.map(lambda a: a, state))
    for path, module in linear_modules(quantized).items():
      name = f"layers.{i}.{path}"
      hessian = np.asarray(sums[path])
      if not np.isfinite(hessian).all():
        raise ValueError(f"calibration inputs of {name} have NaN or Inf entries")
      leaf = quantize(name, module.weight.get_value(), LinearStats(hessian, tokens))
      module.weight.set_value(leaf)
      out[name] = leaf
    graphdef_q, state_q = nnx.split(quantized)
    x = jnp.concatenate([_block_forward(graphdef_q, state_q, x[b], positions)
                         for b in batches])
    if log is not None:
      print(f"calibrated layers.{i} ({len(sums)} linears, {tokens} tokens) in "
            f"{time.perf_counter() - start:.1f} s", file=log, flush=True)
  return out


@functools.partial(jax.jit, static_argnums=(0,))
def _block_hessians(graphdef, state, x, positions):
  """x [B, T, D] -> {path: sum over tokens of x x^T [K, K] float32} for the block's
  linears (a linear called twice sums both inputs)."""
  block = nnx.merge(graphdef, state)
  names = {id(m): path for path, m in linear_modules(block).items()}
  sums = {}

  def record(module, inputs):
    flat = inputs.reshape(-1, inputs.shape[-1]).astype(jnp.float32)  # [B*T, K]
    h = jnp.einsum("tk,tl->kl", flat, flat, precision=jax.lax.Precision.HIGHEST)
    path = names[id(module)]
    sums[path] = sums[path] + h if path in sums else h

  with capture_linear_inputs(record):
    block(x, positions, None, False)
  return sums


@functools.partial(jax.jit, static_argnums=(0,))
def _block_forward(graphdef, state, x, positions):
  return nnx.merge(graphdef, state)(x, positions, None, False)[0]
