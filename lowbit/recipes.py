"""Named compression recipes: (model, calibration windows, settings) -> a new parameter state
with QTensor leaves at the paths of the weights they replace.

Every recipe quantizes the linear layers of the blocks (attention q/k/v/o, MLP gate/up/down)
and leaves the embeddings, the norms and the output head in float: the embedding is a
gather (no matmul to speed up), a tied head shares its table, and the head is the layer
most sensitive to quantization (GPTQ, Atom and UniQL keep it in 16 bits too).

Recipes (defaults; change them by `settings`):
  * rtn: weights only, round to nearest; 4 bits, asymmetric, groups of 128. No calibration.
  * w4a16: weights only, GPTQ; 4 bits, asymmetric, groups of 128, damp 0.01.
  * w8a8: int8 weights per output channel (symmetric, RTN) and dynamic symmetric int8
    activations per token (`act_quant="int8_token"`). No calibration.
  * atom-w4a4 (SPEC.md 1.1): each linear's input channels sorted by the calibration Hessian
    diagonal ascending (`perm`), the largest `num_outliers` kept in int8 (weights per row,
    activations per token); the rest 4-bit symmetric in groups of 128, weights by GPTQ with
    clip 0.85 (our absmax/7 grid, not Atom's GPTQ grid with zero point 8), activations per
    token clipped at 0.9 (`act_quant="int4_group"`, `act_clip`).
  * quarot-w4a4 (QuaRot, online rotations only): every linear's input is rotated by the
    orthonormal randomized Hadamard M of its width (seeded signs; `seed=None`: plain) at
    run time (`input_transform="hadamard"`), and the weight is stored as W M^T, so the
    product is unchanged and the outliers are spread over all channels before 4-bit
    quantization. Weights: GPTQ on W M^T with the rotated Hessian M H M^T, 4-bit
    symmetric, clip `weight_clip` 0.85, groups of `group_size` 128 (None: one per row),
    columns in decreasing Hessian order with `act_order` (the order becomes the QTensor's
    perm);
    activations: symmetric 4-bit per token in the weight's groups (`act_quant="int4_group"`;
    "int4_token": one scale per token over the whole width), clipped at `act_clip`. No
    outlier tail (pointless after rotation).
    QuaRot's offline residual-stream rotation (norms fused, one Q through the embedding) is
    not done: every linear pays one online Hadamard of its input width. `fold_norms=True`
    folds the pre-norms' scales into q/k/v and gate/up first (`lowbit.norm_fold`, QuaRot's
    norm fusion); off by default: on SmolLM2 it costs perplexity (results/accuracy/recipes.md).

KV cache: every recipe takes the setting `kv_cache`, the format the compressed model's KV
cache stores (a name in `lowbit.kv_cache.KV_FORMATS`: dense, kv8, kv4 (KIVI: keys per
channel over groups of 32 tokens with a float window, values per token), kv4-token,
kv4-atom (per token, keys before RoPE), kv2); the default is dense, kv4-atom for
atom-w4a4 (SPEC.md 1.1 step 6) and kv4 for quarot-w4a4 (lowbit's W4A4 recipe with its best
4-bit cache: 27.39 on SmolLM2 against Atom's 31.98 with its own, recipes.md). The recipes named like a format (kv8, kv4, ...) change no
weight and only set the cache. The format is saved in the compressed folder's manifest.

A group size that does not divide a layer's width is replaced by
`fit_group_size(width, group_size)` (576 channels, 128 -> 96).

Atom's outlier tail: Atom keeps 128 of Llama-7B's 4096 hidden channels (1/32) in int8. Here
the tail is `num_outliers = max(8, round(hidden / 32 / 8) * 8)` channels of every linear
input (hidden = the model's width; SmolLM2: 576 -> 16, leaving groups of 112 on 560 channels
and of 80 on down_proj's 1520), unless `num_outliers` is given. q/k/v (and gate/up) see the
same input, so they get the same `perm`; Atom's runtime layout tricks (gate/up rows permuted
by down_proj's order, norms fused with the gather) change no value in this simulation.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from typing import Any, Callable, Mapping, TextIO

import jax
import numpy as np
from flax import nnx

from lowbit.calibration import LinearStats, calibrate, check_model, linear_modules
from lowbit.gptq import gptq_quantize
from lowbit.hadamard import hadamard_matrix, has_hadamard
from lowbit.kv_cache import KV_FORMATS, KVFormat, kv_format
from lowbit.norm_fold import fold_norm_scales
from lowbit.qtensor import QTensor, validate
from lowbit.quantize import fit_group_size, quantize_weight


@dataclasses.dataclass(frozen=True)
class Recipe:
  """`make(hidden, **settings)` -> the per-layer quantize function of `lowbit.calibration`
  (None: the recipe changes no weight), or `transform(model, windows, log=, **settings)`
  -> params for recipes that need the whole model at once (Palu's Fisher ranks);
  `kv_cache`: the default KV format."""

  name: str
  make: Callable[..., Callable[[str, jax.Array, LinearStats | None], QTensor]] | None
  defaults: Mapping[str, Any]
  needs_calibration: bool
  summary: str
  kv_cache: str = "dense"
  transform: Callable[..., dict] | None = None


def _group(path: str, width: int, group_size: int | None) -> int | None:
  """The group size to use on `width` channels (None / -1: one group per row)."""
  if group_size is None or group_size == -1:
    return None
  g = fit_group_size(width, group_size)
  if g % 2:
    raise ValueError(f"{path}: {width} input channels have no even group size <= "
                     f"{group_size} for 4-bit packing")
  return g


def _rtn(hidden, *, bits, group_size, symmetric, clip_ratio):
  def quantize(path, w, stats):
    return quantize_weight(w, bits=bits, group_size=_group(path, w.shape[1], group_size),
                           symmetric=symmetric, clip_ratio=clip_ratio)
  return quantize


def _w4a16(hidden, *, bits, group_size, symmetric, damp, act_order):
  def quantize(path, w, stats):
    return gptq_quantize(w, stats.hessian, bits=bits,
                         group_size=_group(path, w.shape[1], group_size), symmetric=symmetric,
                         damp=damp, act_order=act_order)
  return quantize


def _w8a8(hidden, *, act_clip):
  def quantize(path, w, stats):
    q = quantize_weight(w, bits=8, group_size=None, symmetric=True, act_quant="int8_token")
    return dataclasses.replace(q, act_clip=act_clip)
  return quantize


def atom_num_outliers(hidden: int) -> int:
  """Atom's 128 of 4096 channels, scaled to a model of width `hidden` (module docstring)."""
  return max(8, round(hidden / 32 / 8) * 8)


def _atom(hidden, *, group_size, num_outliers, act_clip, weight_clip, damp, gptq):
  tail = atom_num_outliers(hidden) if num_outliers is None else num_outliers

  def quantize(path, w, stats):
    k = w.shape[1]
    if not 0 <= tail < k:
      raise ValueError(f"{path}: num_outliers={tail} out of range for {k} input channels")
    # Ascending Hessian diagonal: the largest channels land in the int8 tail.
    perm = np.argsort(stats.diag, kind="stable").astype(np.int32)
    args = dict(bits=4, group_size=_group(path, k - tail, group_size), symmetric=True,
                clip_ratio=weight_clip, num_outliers=tail, perm=perm, act_quant="int4_group")
    q = (gptq_quantize(w, stats.hessian, damp=damp, **args) if gptq
         else quantize_weight(w, **args))
    q = dataclasses.replace(q, act_clip=act_clip)
    validate(q)
    return q
  return quantize


def _quarot(hidden, *, group_size, act_quant, act_clip, weight_clip, damp, gptq, act_order,
            seed, fold_norms):
  del fold_norms  # a change of the model, not of each layer: `compress` folds first
  if act_quant not in ("int4_token", "int4_group"):
    raise ValueError(f"quarot-w4a4 {act_quant=} must be 'int4_token' or 'int4_group'")
  seed = None if seed is None else int(seed)

  def quantize(path, w, stats):
    k = w.shape[1]
    if not has_hadamard(k):
      raise ValueError(f"{path}: no Hadamard matrix of order {k} (its input width) for "
                       f"quarot-w4a4")
    m = np.asarray(hadamard_matrix(k, seed=seed), np.float64)  # x -> x M^T online
    w_rot = (np.asarray(w, np.float64) @ m.T).astype(np.float32)
    args = dict(bits=4, group_size=_group(path, k, group_size), symmetric=True,
                clip_ratio=weight_clip, act_quant=act_quant)
    if gptq:
      hessian = m @ np.asarray(stats.hessian, np.float64) @ m.T  # of the rotated inputs
      q = gptq_quantize(w_rot, hessian, damp=damp, act_order=act_order, **args)
    else:
      q = quantize_weight(w_rot, **args)
    q = dataclasses.replace(q, act_clip=act_clip, input_transform="hadamard",
                            input_seed=seed, dtype=jax.dtypes.canonicalize_dtype(
                                w.dtype).name)
    validate(q)
    return q
  return quantize


RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("rtn", _rtn, dict(bits=4, group_size=128, symmetric=False, clip_ratio=1.0), False,
           "weights only, round to nearest"),
    Recipe("w4a16", _w4a16, dict(bits=4, group_size=128, symmetric=False, damp=0.01,
                                 act_order=False), True, "weights only, GPTQ"),
    Recipe("w8a8", _w8a8, dict(act_clip=1.0), False,
           "int8 per-channel weights, dynamic int8 per-token activations"),
    Recipe("atom-w4a4", _atom, dict(group_size=128, num_outliers=None, act_clip=0.9,
                                    weight_clip=0.85, damp=0.01, gptq=True), True,
           "Atom: reorder, 4-bit weights and activations, int8 outlier tail, GPTQ, "
           "4-bit KV cache per token with keys before RoPE", kv_cache="kv4-atom"),
    Recipe("quarot-w4a4", _quarot, dict(group_size=128, act_quant="int4_group",
                                         act_clip=0.9, weight_clip=0.85, damp=0.01,
                                         gptq=True, act_order=True, seed=0,
                                         fold_norms=False), True,
           "QuaRot: online Hadamard of every linear input, 4-bit weights (GPTQ) and "
           "activations, 4-bit KV cache with keys per channel", kv_cache="kv4"),
)}


RECIPES.update({name: Recipe(name, None, {}, False, f"KV cache only: {name}", kv_cache=name)
                for name in KV_FORMATS if name != "dense"})


def _palu(model, windows, *, log, **settings):
  from lowbit.palu import palu_compress  # scipy and the Fisher pass load only when used
  return palu_compress(model, windows, log=log, **settings)


RECIPES["palu"] = Recipe(
    "palu", None, dict(ratio=0.5, group_heads="all", rank_method="fisher", latent_bits=None,
                       hadamard=False, fisher_windows=4, rank_multiple=8), True,
    "Palu: K/V projections as whitened low-rank factors (head groups, Fisher ranks)",
    transform=_palu)


def get_recipe(name: str) -> Recipe:
  """A recipe by name; "a+b" composes recipes (each later one replaces the leaves it
  changes, e.g. w4a16+palu: GPTQ weights with low-rank K/V projections)."""
  if "+" in name:
    parts = [get_recipe(part) for part in name.split("+")]
    defaults = {}
    for part in parts:
      shared = sorted(set(defaults) & set(part.defaults))
      if shared:
        raise ValueError(f"recipes in {name!r} share the settings {shared}; compose "
                         f"recipes whose settings differ")
      defaults.update(part.defaults)
    kv = next((p.kv_cache for p in reversed(parts) if p.kv_cache != "dense"), "dense")
    return Recipe(name, None, defaults, any(p.needs_calibration for p in parts),
                  " + ".join(p.summary for p in parts), kv_cache=kv,
                  transform=functools.partial(_compose, parts))
  if name not in RECIPES:
    raise ValueError(f"unknown recipe {name!r}; known recipes: {sorted(RECIPES)}")
  return RECIPES[name]


def _compose(parts, model, windows, *, log, **settings):
  """Each part compresses the float model with its own settings; a later part's changed
  leaves replace an earlier part's."""
  merged = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  # The float leaves: `compress` returns these same array objects where it changes nothing.
  float_leaves = dict(nnx.to_flat_state(nnx.State(nnx.to_pure_dict(nnx.state(model, nnx.Param)))))
  for part in parts:
    own = {k: v for k, v in settings.items() if k in part.defaults}
    params = compress(model, part.name, windows, own, log=log)
    for path, leaf in nnx.to_flat_state(nnx.State(params)):
      if leaf is not float_leaves[path]:
        node = merged
        for key in path[:-1]:
          node = node[key]
        node[path[-1]] = leaf
  return merged


def settings_of(name: str, settings: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """The recipe's defaults updated by `settings`; an unknown setting is an error."""
  recipe = get_recipe(name)
  defaults = {**recipe.defaults, "kv_cache": recipe.kv_cache}
  settings = dict(settings or {})
  unknown = sorted(set(settings) - set(defaults))
  if unknown:
    raise ValueError(f"recipe {name!r} has no settings {unknown}; its settings: {defaults}")
  settings = {**defaults, **settings}
  kv_format(settings["kv_cache"])  # an unknown format fails here, before any work
  return settings


def recipe_kv_format(name: str, settings: Mapping[str, Any] | None = None) -> KVFormat:
  """The KV format a model compressed by recipe `name` with `settings` runs with."""
  return kv_format(settings_of(name, settings)["kv_cache"])


def compress(model, name: str, calib_windows=None, settings: Mapping[str, Any] | None = None,
             *, batch_size: int = 8, log: TextIO | None = sys.stderr) -> dict:
  """The model's parameters as a nested dict (`nnx.to_pure_dict`) with the block linears'
  weights replaced by the recipe's QTensors; `model` is not modified. Load the result with
  `nnx.replace_by_pure_dict` on the model's state, then `nnx.update`."""
  recipe = get_recipe(name)
  settings = settings_of(name, settings)
  del settings["kv_cache"]  # not a weight setting: see recipe_kv_format
  check_model(model)
  if settings.get("fold_norms"):
    model = fold_norm_scales(model)
  if recipe.needs_calibration and calib_windows is None:
    raise ValueError(f"recipe {name!r} needs calibration windows")
  if recipe.transform is not None:
    return recipe.transform(model, calib_windows, log=log, **settings)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  if recipe.make is None:
    return params
  hidden = int(model.embed_inputs(np.zeros((1, 1), np.int32)).shape[-1])
  quantize = recipe.make(hidden, **settings)
  if recipe.needs_calibration:
    leaves = calibrate(model, calib_windows, quantize, batch_size=batch_size, log=log)
  else:
    leaves = {}
    for i, block in enumerate(model.layers):
      for path, module in linear_modules(block).items():
        leaves[f"layers.{i}.{path}"] = quantize(f"layers.{i}.{path}",
                                                module.weight.get_value(), None)
      if log is not None:
        print(f"quantized layers.{i}", file=log, flush=True)
  for path, leaf in leaves.items():
    node = params
    for key in path.split("."):
      node = node[int(key) if key.isdigit() else key]
    node["weight"] = leaf
  return params


def load_into(model, params: Mapping) -> None:
  """Replaces `model`'s parameters in place by `params` (as `compress` returns them)."""
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, params)
  nnx.update(model, state)
