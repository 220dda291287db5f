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
import sys
from typing import Any, Callable, Mapping, TextIO

import jax
import numpy as np
from flax import nnx

from lowbit.calibration import LinearStats, calibrate, check_model, linear_modules
from lowbit.gptq import gptq_quantize
from lowbit.qtensor import QTensor, validate
from lowbit.quantize import fit_group_size, quantize_weight


@dataclasses.dataclass(frozen=True)
class Recipe:
  """`make(hidden, **settings)` -> the per-layer quantize function of `lowbit.calibration`."""

  name: str
  make: Callable[..., Callable[[str, jax.Array, LinearStats | None], QTensor]]
  defaults: Mapping[str, Any]
  needs_calibration: bool
  summary: str


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


RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("rtn", _rtn, dict(bits=4, group_size=128, symmetric=False, clip_ratio=1.0), False,
           "weights only, round to nearest"),
    Recipe("w4a16", _w4a16, dict(bits=4, group_size=128, symmetric=False, damp=0.01,
                                 act_order=False), True, "weights only, GPTQ"),
    Recipe("w8a8", _w8a8, dict(act_clip=1.0), False,
           "int8 per-channel weights, dynamic int8 per-token activations"),
    Recipe("atom-w4a4", _atom, dict(group_size=128, num_outliers=None, act_clip=0.9,
                                    weight_clip=0.85, damp=0.01, gptq=True), True,
           "Atom: reorder, 4-bit weights and activations, int8 outlier tail, GPTQ"),
)}


def get_recipe(name: str) -> Recipe:
  if name not in RECIPES:
    raise ValueError(f"unknown recipe {name!r}; known recipes: {sorted(RECIPES)}")
  return RECIPES[name]


def settings_of(name: str, settings: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """The recipe's defaults updated by `settings`; an unknown setting is an error."""
  recipe = get_recipe(name)
  settings = dict(settings or {})
  unknown = sorted(set(settings) - set(recipe.defaults))
  if unknown:
    raise ValueError(f"recipe {name!r} has no settings {unknown}; its settings: "
                     f"{dict(recipe.defaults)}")
  return {**recipe.defaults, **settings}


def compress(model, name: str, calib_windows=None, settings: Mapping[str, Any] | None = None,
             *, batch_size: int = 8, log: TextIO | None = sys.stderr) -> dict:
  """The model's parameters as a nested dict (`nnx.to_pure_dict`) with the block linears'
  weights replaced by the recipe's QTensors; `model` is not modified. Load the result with
  `nnx.replace_by_pure_dict` on the model's state, then `nnx.update`."""
  recipe = get_recipe(name)
  settings = settings_of(name, settings)
  check_model(model)
  if recipe.needs_calibration and calib_windows is None:
    raise ValueError(f"recipe {name!r} needs calibration windows")
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
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
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
