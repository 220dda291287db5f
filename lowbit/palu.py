"""Palu (SPEC.md 2): low-rank K/V projections by whitened SVD in head groups, with ranks
chosen by Fisher information, so the KV cache holds small latents per token.

Steps (SPEC.md 2.1):
  1. Whitening statistics: X^T X of the inputs of every k_proj / v_proj over calibration
     windows, from `lowbit.calibration` on the float model (every layer sees float inputs, as
     Palu's whitening does). S = lower Cholesky factor of X^T X; when Cholesky fails, X^T X is
     shifted by (|lambda_min| + 1e-3) I and factored again (Palu, SVD-LLM).
  2. Fisher scores (rank_method="fisher", Palu's `fisher_uniform`): gradients of the LM loss
     w.r.t. every k_proj / v_proj weight on a few calibration windows; per element
     sqrt(mean over windows of grad^2), per module the mean over elements.
  3. Ranks: the budget is `ratio` (the fraction of K/V cache entries kept: 30% compression is
     ratio 0.7) of the full ranks. `uniform`: every group of every module keeps
     ratio * full rank, rounded to a multiple of `rank_multiple`. `fisher`: the same total
     (so both cost the same cache bytes) split over the 2 x num_layers modules (K and V of
     each layer compete) in proportion to their scores, each capped at its full rank and
     at least one multiple; then split evenly over the module's head groups. Ranks are
     multiples of `rank_multiple` (default 8; Palu uses 32, too coarse for 64-dim heads).
  4. Per head group g (rows of `group_heads` KV heads): SVD(W_g S) = U Sigma V^T, keep r:
     up_g = U_r Sigma_r^(1/2), down_g = Sigma_r^(1/2) V_r^T S^-1 (Palu's split). Optionally a
     Hadamard matrix of order r is folded in and latents are fake-quantized per token
     (lowbit.lowrank).

The result is a parameter dict with `LowRankKV` leaves at the k_proj / v_proj weight paths;
`lowbit.nn.Linear` runs them as x -> latent -> (quantize) -> heads, which is what a latent
cache returns. Biases (Qwen2) stay separate parameters of the Linear, untouched.

Models serve this module through `lowbit.calibration.CalibrationModel` plus, for Fisher
scores, `model(tokens [B, T]) -> (logits [B, T, V], cache)`; each block's `attn` names its
`num_kv_heads` and `head_dim`. lowbit does not import `models`.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import time
from typing import Mapping, TextIO

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
from flax import nnx

from lowbit.calibration import calibrate, check_model
from lowbit.hadamard import has_hadamard, hadamard_matrix
from lowbit.lowrank import LATENT_BITS, LowRankKV, validate

PROJECTIONS = ("k_proj", "v_proj")
RANK_METHODS = ("fisher", "uniform")
# Palu's eigenvalue shift when Cholesky of X^T X fails (decomposition.py).
_CHOLESKY_SHIFT = 1e-3


@dataclasses.dataclass(frozen=True)
class PaluStatistics:
  """What the transform needs from calibration, computed once for any ratio or grouping.

  grams: "layers.{i}.attn.{k,v}_proj" -> X^T X float64 [in, in] of that linear's inputs.
  fisher: the same paths -> Fisher score (float), or None when not computed.
  """

  grams: Mapping[str, np.ndarray]
  fisher: Mapping[str, float] | None
  tokens: int
  fisher_windows: int


def _kv_paths(model) -> list[str]:
  return [f"layers.{i}.attn.{p}" for i in range(len(model.layers)) for p in PROJECTIONS]


def _attn_dims(model, i: int) -> tuple[int, int]:
  attn = model.layers[i].attn
  try:
    return int(attn.num_kv_heads), int(attn.head_dim)
  except AttributeError as e:
    raise TypeError(f"layers.{i}.attn must name num_kv_heads and head_dim for Palu") from e


def _dense_weight(model, path: str) -> jax.Array:
  _, i, _, proj = path.split(".")
  w = getattr(model.layers[int(i)].attn, proj).weight.get_value()
  if not isinstance(w, (jax.Array, np.ndarray)):
    raise TypeError(f"{path}.weight is a {type(w).__name__}; Palu needs the float weight")
  return w


# ------------------------------------------------------------------------------------------
# Statistics
# ------------------------------------------------------------------------------------------

def kv_input_grams(model, calib_windows, *, batch_size: int = 8,
                   log: TextIO | None = sys.stderr) -> tuple[dict[str, np.ndarray], int]:
  """X^T X (float64 [in, in]) of the inputs of every k_proj / v_proj, streaming the float
  model layer by layer over `calib_windows` [S, T]; returns (grams, tokens)."""
  grams = {}
  tokens = 0

  def keep(path, w, stats):
    nonlocal tokens
    if path.rsplit(".", 1)[-1] in PROJECTIONS:
      grams[path] = stats.hessian.astype(np.float64)
      tokens = stats.tokens
    return w  # the float weight: the next layer sees float inputs

  calibrate(model, calib_windows, keep, batch_size=batch_size, log=log)
  return grams, tokens


def _is_kv_weight(path, value) -> bool:
  return (isinstance(value, nnx.Param) and len(path) >= 2 and path[-1] == "weight"
          and path[-2] in PROJECTIONS)


@functools.partial(jax.jit, static_argnums=(0,))
def _squared_grads(graphdef, kv, rest, tokens):
  """tokens [B, T] -> grad^2 of the mean next-token NLL w.r.t. each k/v weight."""

  def loss(kv):
    model = nnx.merge(graphdef, kv, rest)
    logits, _ = model(tokens[:, :-1])
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

  return jax.tree.map(jnp.square, jax.grad(loss)(kv))


def fisher_scores(model, windows, *, log: TextIO | None = sys.stderr) -> dict[str, float]:
  """Palu's per-module Fisher score of every k_proj / v_proj: the mean over the weight's
  elements of sqrt(mean over `windows` [S, T] (one at a time) of grad^2)."""
  windows = np.asarray(windows)
  if windows.ndim != 2 or len(windows) == 0 or windows.shape[1] < 2:
    raise ValueError(f"Fisher windows must be token ids [S >= 1, T >= 2], got "
                     f"{list(windows.shape)}")
  graphdef, kv, rest = nnx.split(model, _is_kv_weight, ...)
  total = None
  for s in range(len(windows)):
    start = time.perf_counter()
    g = _squared_grads(graphdef, kv, rest, jnp.asarray(windows[s:s + 1]))
    total = g if total is None else jax.tree.map(jnp.add, total, g)
    if log is not None:
      print(f"Fisher window {s + 1}/{len(windows)} in {time.perf_counter() - start:.1f} s",
            file=log, flush=True)
  scores = {}
  for path, value in nnx.to_flat_state(total):
    name = ".".join(str(p) for p in path[:-1])
    scores[name] = float(jnp.mean(jnp.sqrt(value.get_value() / len(windows))))
  return scores


def palu_statistics(model, calib_windows, *, fisher_windows: int = 4, batch_size: int = 8,
                    log: TextIO | None = sys.stderr) -> PaluStatistics:
  """Whitening Grams over all `calib_windows` [S, T] and Fisher scores over the first
  `fisher_windows` of them (0: none, then only rank_method="uniform" can use them)."""
  check_model(model)
  grams, tokens = kv_input_grams(model, calib_windows, batch_size=batch_size, log=log)
  fisher = None
  if fisher_windows:
    fisher = fisher_scores(model, np.asarray(calib_windows)[:fisher_windows], log=log)
  return PaluStatistics(grams, fisher, tokens, fisher_windows)


# ------------------------------------------------------------------------------------------
# Whitened SVD
# ------------------------------------------------------------------------------------------

def whitening_factor(gram: np.ndarray) -> np.ndarray:
  """Lower-triangular S (float64) with S S^T = X^T X, shifted by (|lambda_min| + 1e-3) I
  when X^T X is not positive definite enough for Cholesky (Palu / SVD-LLM)."""
  gram = np.asarray(gram, np.float64)
  if gram.ndim != 2 or gram.shape[0] != gram.shape[1] or not np.isfinite(gram).all():
    raise ValueError(f"X^T X must be a finite square matrix, got shape {gram.shape}")
  try:
    return np.linalg.cholesky(gram)
  except np.linalg.LinAlgError:
    shift = abs(float(np.linalg.eigvalsh(gram)[0])) + _CHOLESKY_SHIFT
    return np.linalg.cholesky(gram + shift * np.eye(len(gram)))


def factorize(w, gram: np.ndarray | None, *, group_heads: int, head_dim: int, rank: int,
              latent_bits: int | None = None, hadamard: bool = False,
              whitening: np.ndarray | None = None) -> LowRankKV:
  """W [out, in] -> LowRankKV by (whitened) SVD per head group of `group_heads` heads.

  gram: X^T X [in, in] of the linear's inputs; None for plain SVD (no whitening).
  whitening: its Cholesky factor when already computed (k and v share one input).
  """
  w64 = np.asarray(w, np.float64)
  out, k = w64.shape
  rows = group_heads * head_dim
  if latent_bits not in LATENT_BITS:
    raise ValueError(f"{latent_bits=} is not one of {LATENT_BITS}")
  if out % rows:
    raise ValueError(f"{out} output rows are not groups of {group_heads=} x {head_dim=}")
  if not 1 <= rank <= min(rows, k):
    raise ValueError(f"{rank=} out of range 1..{min(rows, k)}")
  if hadamard and not has_hadamard(rank):
    raise ValueError(f"hadamard=True needs a Hadamard matrix of order {rank=}, which "
                     f"lowbit.hadamard does not build (use a rank_multiple of 16)")
  s = None
  if gram is not None:
    s = whitening if whitening is not None else whitening_factor(gram)
  downs, ups = [], []
  for g in range(out // rows):
    wg = w64[g * rows:(g + 1) * rows]
    u, sigma, vt = np.linalg.svd(wg if s is None else wg @ s, full_matrices=False)
    root = np.sqrt(sigma[:rank])
    down = root[:, None] * vt[:rank]  # [R, in], still in the whitened basis
    if s is not None:
      # down S^-1: solve S^T down'^T = down^T (S lower, so S^T is upper triangular).
      down = scipy.linalg.solve_triangular(s, down.T, trans="T", lower=True).T
    downs.append(down)
    ups.append(u[:, :rank] * root)
  down, up = np.stack(downs), np.stack(ups)  # [G, R, in], [G, rows, R]
  if hadamard:
    m = np.asarray(hadamard_matrix(rank), np.float64)
    down = np.einsum("sr,gsi->gri", m, down)  # M^T down: the latent is rotated
    up = up @ m
  leaf = LowRankKV(down=jnp.asarray(down, jnp.float32), up=jnp.asarray(up, jnp.float32),
                   shape=(out, k), group_heads=group_heads, head_dim=head_dim, rank=rank,
                   latent_bits=latent_bits, hadamard=bool(hadamard),
                   dtype=jax.dtypes.canonicalize_dtype(w.dtype).name)
  validate(leaf)
  return leaf


# ------------------------------------------------------------------------------------------
# Ranks
# ------------------------------------------------------------------------------------------

def _check_args(ratio, rank_method, latent_bits):
  if not (isinstance(ratio, (int, float)) and 0.0 < ratio <= 1.0):
    raise ValueError(f"{ratio=} (the fraction of the K/V cache kept) must be in (0, 1]")
  if rank_method not in RANK_METHODS:
    raise ValueError(f"{rank_method=} is not one of {RANK_METHODS}")
  if latent_bits not in LATENT_BITS:
    raise ValueError(f"{latent_bits=} is not one of {LATENT_BITS}")


def group_heads_of(group_heads, num_kv_heads: int) -> int:
  """`group_heads` as an int ("all" -> num_kv_heads); it must divide num_kv_heads."""
  g = num_kv_heads if group_heads in ("all", None) else group_heads
  if not isinstance(g, (int, np.integer)) or g <= 0 or num_kv_heads % g:
    raise ValueError(f"group_heads={group_heads!r} must be 'all' or a positive divisor of "
                     f"num_kv_heads={num_kv_heads}")
  return int(g)


def allocate_units(budget: int, scores: np.ndarray, caps: np.ndarray) -> np.ndarray:
  """Integer units per module summing to `budget`, each in 1..caps[m], in proportion to
  `scores` (water-filling: modules at their cap hand their share to the others; the units
  left by rounding down go one at a time to the largest remainders)."""
  scores = np.maximum(np.asarray(scores, np.float64), 1e-30)
  caps = np.asarray(caps, np.int64)
  if not len(caps) <= budget <= caps.sum():
    raise ValueError(f"rank budget of {budget} units cannot give {len(caps)} modules "
                     f"1..cap units each (caps sum to {caps.sum()})")
  share = np.ones(len(caps))  # one unit each, then the rest in proportion to the scores
  room = caps - 1.0
  free = np.ones(len(caps), bool)
  left = budget - len(caps)
  while left > 1e-9 and free.any():
    give = left * scores * free / scores[free].sum()
    over = free & (give >= room)
    if not over.any():
      share += give
      break
    share[over] += room[over]
    left -= room[over].sum()
    room[over] = 0
    free &= ~over
  units = np.minimum(np.floor(share + 1e-9).astype(np.int64), caps)
  for m in np.argsort(-(share - units), kind="stable"):
    if units.sum() >= budget:
      break
    if units[m] < caps[m]:
      units[m] += 1
  while units.sum() < budget:  # remainders all at capped modules: any module with room
    units[np.argmax((units < caps) * scores)] += 1
  return units


def palu_ranks(model, *, ratio: float, group_heads=1, rank_method: str = "fisher",
               fisher: Mapping[str, float] | None = None,
               rank_multiple: int = 8) -> dict[str, int]:
  """The rank of each head group of every k_proj / v_proj ("layers.{i}.attn.k_proj" ->
  rank per group), for the module docstring's `uniform` or `fisher` search."""
  _check_args(ratio, rank_method, None)
  if rank_multiple <= 0:
    raise ValueError(f"{rank_multiple=} must be positive")
  paths = _kv_paths(model)
  full, groups = [], []
  for path in paths:
    heads, head_dim = _attn_dims(model, int(path.split(".")[1]))
    gh = group_heads_of(group_heads, heads)
    in_features = _dense_weight(model, path).shape[1]
    f = min(gh * head_dim, in_features)
    if f % rank_multiple:
      raise ValueError(f"{path}: full group rank {f} is not a multiple of {rank_multiple=}")
    full.append(f // rank_multiple)
    groups.append(heads // gh)
  caps = np.array(full)
  uniform = np.clip(np.round(ratio * caps), 1, caps).astype(np.int64)
  if rank_method == "uniform":
    units = uniform
  else:
    if fisher is None or set(paths) - set(fisher):
      raise ValueError("rank_method='fisher' needs Fisher scores for every k_proj / v_proj "
                       "(palu_statistics with fisher_windows > 0)")
    # One unit is `rank_multiple` in every group of a module, so units count cache
    # entries alike only when every module has as many groups.
    if len(set(groups)) != 1:
      raise NotImplementedError(f"Fisher ranks with different numbers of head groups per "
                                f"layer ({sorted(set(groups))})")
    units = allocate_units(int(uniform.sum()), np.array([fisher[p] for p in paths]), caps)
  return {p: int(u) * rank_multiple for p, u in zip(paths, units)}


# ------------------------------------------------------------------------------------------
# The transform
# ------------------------------------------------------------------------------------------

def palu_compress(model, calib_windows=None, *, ratio: float, group_heads=1,
                  rank_method: str = "fisher", latent_bits: int | None = None,
                  hadamard: bool = False, fisher_windows: int = 4, whiten: bool = True,
                  rank_multiple: int = 8, statistics: PaluStatistics | None = None,
                  batch_size: int = 8, log: TextIO | None = sys.stderr) -> dict:
  """The model's parameters (nested dict, as `lowbit.recipes.compress`) with every k_proj /
  v_proj weight replaced by a `LowRankKV`; `model` is not modified.

  Args:
    calib_windows: calibration token ids [S, T] (never the evaluation text); not needed when
      `statistics` (from `palu_statistics`) is given.
    ratio: fraction of the K/V cache kept, in (0, 1] (30% compression = 0.7).
    group_heads: KV heads per group, a divisor of num_kv_heads, or "all" (joint).
    rank_method: "fisher" (Palu's fisher_uniform) or "uniform".
    latent_bits: None, or 2 / 3 / 4 for per-token asymmetric fake-quantized latents.
    hadamard: fold a Hadamard rotation into the factors (rotated latents).
    fisher_windows: how many of the calibration windows the Fisher scores use.
    whiten: False gives plain SVD of W (for comparison only).
    rank_multiple: every rank is a multiple of this.
  """
  _check_args(ratio, rank_method, latent_bits)
  check_model(model)
  for i in range(len(model.layers)):
    group_heads_of(group_heads, _attn_dims(model, i)[0])
  if statistics is None:
    if calib_windows is None:
      raise ValueError("palu_compress needs calib_windows or statistics")
    statistics = palu_statistics(model, calib_windows, batch_size=batch_size, log=log,
                                 fisher_windows=fisher_windows if rank_method == "fisher" else 0)
  ranks = palu_ranks(model, ratio=ratio, group_heads=group_heads, rank_method=rank_method,
                     fisher=statistics.fisher, rank_multiple=rank_multiple)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  factors = {}  # layer -> (Gram, S): k and v of a layer share their input, one Cholesky
  for path in _kv_paths(model):
    start = time.perf_counter()
    i = int(path.split(".")[1])
    heads, head_dim = _attn_dims(model, i)
    gram = statistics.grams[path] if whiten else None
    s = None
    if gram is not None:
      if i not in factors or not np.array_equal(factors[i][0], gram):
        factors = {i: (gram, whitening_factor(gram))}
      s = factors[i][1]
    leaf = factorize(_dense_weight(model, path), gram, group_heads=group_heads_of(
        group_heads, heads), head_dim=head_dim, rank=ranks[path], latent_bits=latent_bits,
                     hadamard=hadamard, whitening=s)
    node = params
    for key in path.split("."):
      node = node[int(key) if key.isdigit() else key]
    node["weight"] = leaf
    if log is not None:
      print(f"palu {path}: rank {ranks[path]} x {leaf.num_groups} groups in "
            f"{time.perf_counter() - start:.2f} s", file=log, flush=True)
  return params


def kv_cache_fraction(params) -> float:
  """Kept fraction of K/V cache entries: sum of latent sizes over sum of K/V widths."""
  latent = full = 0
  for leaf in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, LowRankKV)):
    if isinstance(leaf, LowRankKV):
      latent += leaf.latent_size
      full += leaf.shape[0]
  if not full:
    raise ValueError("no LowRankKV leaves found")
  return latent / full
