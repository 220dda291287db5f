"""Saving and restoring compressed parameter states (arrays, QTensors, LowRankKVs) with orbax.

Motivation: compressing a large model takes hours of calibration; its output must be saved
once and reloaded bit for bit (Atom never saved its quantized weights, SPEC.md 1.4 #14).

Folder layout:
  <path>/arrays/       orbax checkpoint of a flat dict "00000" -> {array fields}
  <path>/lowbit.json   what each entry is: its key path in the state, the dtype and shape of
                       every array, and for a structured leaf its type's key ("qtensor",
                       "lowrank") holding its static fields (absent for a plain array)
The save is written to a hidden sibling folder and renamed to <path> only when complete,
so an interrupted save never leaves a half-written <path>. Single-process only for now.

To load into a model: `state = nnx.state(model); nnx.replace_by_pure_dict(state,
restore(path)); nnx.update(model, state)`.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

import lowbit.lowrank
import lowbit.qtensor

FORMAT = "lowbit.params"
VERSION = 1
_ARRAYS, _INDEX = "arrays", "lowbit.json"


@dataclasses.dataclass(frozen=True)
class LeafType:
  """A structured leaf the checkpoint stores: its array fields, its static fields (JSON
  values; lists come back as tuples) and the check run on every restored leaf."""

  cls: type
  data_fields: tuple[str, ...]
  meta_fields: tuple[str, ...]
  validate: Callable[[Any], None]


# Index key -> leaf type. Importing the module that defines a type also registers its
# `Linear` implementation, so restored leaves run.
LEAF_TYPES: dict[str, LeafType] = {
    "qtensor": LeafType(lowbit.qtensor.QTensor, lowbit.qtensor.DATA_FIELDS,
                        lowbit.qtensor.META_FIELDS, lowbit.qtensor.validate),
    "lowrank": LeafType(lowbit.lowrank.LowRankKV, lowbit.lowrank.DATA_FIELDS,
                        lowbit.lowrank.META_FIELDS, lowbit.lowrank.validate),
}


def _leaf_type(leaf) -> tuple[str, LeafType] | None:
  return next(((k, t) for k, t in LEAF_TYPES.items() if isinstance(leaf, t.cls)), None)


def save(path, params, *, overwrite: bool = False) -> None:
  """Writes params (a nested dict, or an nnx.State, whose leaves are arrays or leaves of
  `LEAF_TYPES`)."""
  if jax.process_count() > 1:
    raise NotImplementedError("lowbit.checkpoint.save is single-process for now")
  path = Path(path).absolute()
  if path.exists() and not overwrite:
    raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
  if isinstance(params, nnx.State):
    params = nnx.to_pure_dict(params)
  entries, arrays = [], {}
  for key_path, leaf in _leaves(params, ()):
    name = f"{len(entries):05d}"
    kind = _leaf_type(leaf)
    fields = ({f: getattr(leaf, f) for f in kind[1].data_fields if getattr(leaf, f) is not None}
              if kind else {"value": leaf})
    arrays[name] = fields  # jax or numpy arrays, as they are: orbax writes both
    for f, a in fields.items():
      if jax.dtypes.canonicalize_dtype(a.dtype) != a.dtype:
        raise ValueError(f"{key_path} {f} is {a.dtype}, which jax (without x64) would "
                         f"restore as {jax.dtypes.canonicalize_dtype(a.dtype)}")
    entry = {"name": name, "path": list(key_path),
             "arrays": {f: [np.dtype(a.dtype).name, list(a.shape)] for f, a in fields.items()}}
    if kind:
      entry[kind[0]] = {f: getattr(leaf, f) for f in kind[1].meta_fields}
    entries.append(entry)

  partial = path.parent / f".{path.name}.partial-{uuid.uuid4().hex[:8]}"
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(partial / _ARRAYS, arrays)
      checkpointer.wait_until_finished()
    (partial / _INDEX).write_text(
        json.dumps({"format": FORMAT, "version": VERSION, "entries": entries}, indent=1))
    _replace(partial, path)
  finally:
    shutil.rmtree(partial, ignore_errors=True)


def restore(path) -> dict:
  """The nested dict `save` wrote, with the same keys, leaf types and bits, as jax arrays
  on the default device."""
  path = Path(path).absolute()
  if not path.is_dir():
    raise FileNotFoundError(f"no checkpoint at {path}")
  try:
    index = json.loads((path / _INDEX).read_text())
  except (OSError, ValueError) as e:
    raise ValueError(f"{path} is not a readable lowbit checkpoint: {e}") from e
  if index.get("format") != FORMAT or index.get("version") != VERSION:
    raise ValueError(f"{path / _INDEX} is not a {FORMAT} version {VERSION} index")
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = {e["name"]: {f: jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype), sharding=device)
                        for f, (dtype, shape) in e["arrays"].items()}
            for e in index["entries"]}
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      arrays = checkpointer.restore(path / _ARRAYS, target)
  except Exception as e:  # orbax and tensorstore raise many types for damaged files
    raise ValueError(f"checkpoint {path} is damaged: cannot read its arrays ({e})") from e

  params: dict = {}
  for entry in index["entries"]:
    fields = arrays[entry["name"]]
    kinds = [k for k in LEAF_TYPES if k in entry]
    if kinds:
      kind = LEAF_TYPES[kinds[0]]
      meta = {f: tuple(v) if isinstance(v, list) else v for f, v in entry[kinds[0]].items()}
      leaf = kind.cls(**fields, **meta)
      kind.validate(leaf)
    else:
      leaf = fields["value"]
    *parents, last = entry["path"]
    node = params
    for key in parents:
      node = node.setdefault(key, {})
    node[last] = leaf
  return params


def _leaves(tree: Mapping, prefix: tuple) -> list[tuple[tuple, Any]]:
  """(key path, leaf) of a nested mapping, leaves being arrays or of `LEAF_TYPES`."""
  out = []
  for key, value in tree.items():
    key_path = prefix + (key,)
    if not isinstance(key, (str, int)):
      raise TypeError(f"key {key!r} at {prefix} is not a str or int")
    if isinstance(value, Mapping):
      out.extend(_leaves(value, key_path))
    elif _leaf_type(value) or hasattr(value, "__array__"):
      out.append((key_path, value))
    else:
      raise TypeError(f"leaf at {key_path} is a {type(value).__name__}, not an array or "
                      f"one of {[t.cls.__name__ for t in LEAF_TYPES.values()]}")
  return out


def _replace(new: Path, path: Path) -> None:
  """Renames `new` to `path`, moving an existing `path` aside first and deleting it after."""
  if not path.exists():
    new.rename(path)
    return
  old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
  path.rename(old)
  try:
    new.rename(path)
  except BaseException:
    old.rename(path)
    raise
  shutil.rmtree(old)
