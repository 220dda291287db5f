"""The `lowbit` command line: compress a model, evaluate perplexity and generate text.

It lives in `train/` because it stands on everything below it (models, importers, the
perplexity protocol); `lowbit/` itself never imports models.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import jax
import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _load(args):
  from models.loading import load_pretrained
  start = time.perf_counter()
  model, tokenizer = load_pretrained(args.model, dtype=DTYPES[args.dtype])
  print(f"loaded {args.model} ({model.config.architecture}, {model.config.num_layers} layers) "
        f"in {time.perf_counter() - start:.1f} s", file=sys.stderr)
  return model, tokenizer


MANIFEST = "manifest.json"
_PARAMS = "params"


def _load_compressed(folder: Path, dtype: str):
  """(model with the compressed parameters and KV format, tokenizer, manifest) of a
  `compress` folder."""
  from lowbit import checkpoint
  from lowbit.kv_cache import kv_format
  from lowbit.recipes import load_into
  from models.loading import load_pretrained
  manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
  start = time.perf_counter()
  model, tokenizer = load_pretrained(manifest["model"], dtype=DTYPES[dtype])
  load_into(model, checkpoint.restore(folder / _PARAMS))
  model.set_kv_format(kv_format(manifest.get("kv_cache", "dense")))
  print(f"loaded {folder} ({manifest['recipe']} of {manifest['model']}) in "
        f"{time.perf_counter() - start:.1f} s", file=sys.stderr)
  return model, tokenizer, manifest


def cmd_eval(args) -> int:
  from lowbit.data import read_text, text_path
  from train.perplexity import perplexity
  text = read_text(args.text)  # before loading the model: a bad text fails fast
  folder = Path(args.model)
  provenance = {"model": args.model, "recipe": "float", "calib_text": None}
  if (folder / MANIFEST).is_file():
    model, tokenizer, manifest = _load_compressed(folder, args.dtype)
    calib = manifest.get("calib_text_path")
    if calib and Path(calib).resolve() == text_path(args.text).resolve():
      raise ValueError(f"{args.model} was calibrated on {calib}: evaluate on another text")
    provenance = {k: manifest[k] for k in ("model", "recipe", "settings", "calib_text",
                                           "calib_samples", "calib_seq_len",
                                           "compress_seconds")}
    provenance["compressed"] = str(folder)
  else:
    model, tokenizer = _load(args)
  _set_kv_cache(model, args.kv_cache)
  provenance["kv_cache"] = model.kv_format.to_dict()
  ids = tokenizer.encode(text)
  start = time.perf_counter()
  result = perplexity(model, ids, args.seq_len, max_tokens=args.max_tokens,
                      batch_size=args.batch_size, progress=not args.json)
  result.update(**provenance, text=text_path(args.text).name,
                dtype=args.dtype, text_tokens=len(ids),
                max_tokens=args.max_tokens, weight_bytes=parameter_bytes(model),
                seconds=round(time.perf_counter() - start, 2))
  if args.out:
    _append_record(args.out, result)
  if args.json:
    print(json.dumps(result))
  else:
    print(f"perplexity {result['perplexity']:.4f} over {result['tokens']} predicted tokens "
          f"({result['windows']} windows of {args.seq_len}) in {result['seconds']} s")
  return 0


def _set_kv_cache(model, name: str | None) -> None:
  """--kv-cache: the format the model's KV cache stores from now on (None: unchanged)."""
  if name is not None:
    from lowbit.kv_cache import kv_format
    model.set_kv_format(kv_format(name))


def parameter_bytes(model) -> int:
  """Bytes of every parameter leaf as stored (packed formats count their real bytes)."""
  from flax import nnx
  return int(sum(leaf.nbytes for leaf in jax.tree.leaves(nnx.state(model))))


def _append_record(path: str, result: dict) -> None:
  """Appends one results/accuracy record (DESIGN.md format) with provenance."""
  record = dict(result, date=datetime.date.today().isoformat(), commit=_git_commit(),
                command="lowbit " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
  with open(path, "a", encoding="utf-8") as f:
    f.write(json.dumps(record) + "\n")


def _git_commit() -> str:
  try:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def cmd_compress(args) -> int:
  """Compresses a model by a recipe into a folder: `params/` (lowbit.checkpoint) and
  `manifest.json`; the folder appears whole or not at all."""
  from lowbit import checkpoint
  from lowbit.data import read_text, text_path
  from lowbit.recipes import compress, get_recipe, recipe_kv_format, settings_of
  from train.perplexity import make_windows
  out = Path(args.out).absolute()
  if out.exists():
    raise ValueError(f"--out {out} exists; choose a new folder")
  recipe = get_recipe(args.recipe)
  settings = settings_of(args.recipe, dict(_parse_setting(s) for s in args.set))
  if recipe.needs_calibration and args.calib is None:
    raise ValueError(f"recipe {args.recipe!r} needs --calib (a text file or a shipped text)")
  text = None if args.calib is None else read_text(args.calib)
  model, tokenizer = _load(args)
  windows = None
  if text is not None and recipe.needs_calibration:
    config = model.config
    bos = config.bos_token_id if config.add_bos else None
    windows = make_windows(tokenizer.encode(text), args.calib_seq_len,
                           max_tokens=args.calib_samples * args.calib_seq_len, bos_id=bos)
    if len(windows) < args.calib_samples:
      raise ValueError(f"--calib {args.calib} has {len(windows)} windows of "
                       f"{args.calib_seq_len} tokens, fewer than --calib-samples "
                       f"{args.calib_samples}")
  before = parameter_bytes(model)
  start = time.perf_counter()
  params = compress(model, args.recipe, windows, settings)
  seconds = time.perf_counter() - start
  after = int(sum(leaf.nbytes for leaf in jax.tree.leaves(params)))
  model_ref = args.model
  if Path(args.model).exists():
    model_ref = str(Path(args.model).absolute())
  manifest = dict(
      format="lowbit.compressed", model=model_ref, recipe=args.recipe, settings=settings,
      kv_cache=recipe_kv_format(args.recipe, settings).to_dict(),
      calib_text=None if windows is None else text_path(args.calib).name,
      calib_text_path=None if windows is None else str(text_path(args.calib).absolute()),
      calib_samples=None if windows is None else int(windows.shape[0]),
      calib_seq_len=None if windows is None else int(windows.shape[1]),
      dtype=args.dtype, weight_bytes_before=before, weight_bytes_after=after,
      compress_seconds=round(seconds, 1), date=datetime.datetime.now(
          datetime.timezone.utc).isoformat(timespec="seconds"), commit=_git_commit(),
      command="lowbit " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
  partial = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
  try:
    checkpoint.save(partial / _PARAMS, params)
    (partial / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    partial.rename(out)
  finally:
    if partial.exists():
      shutil.rmtree(partial)
  print(f"compressed {args.model} with {args.recipe} in {seconds:.1f} s: weights {before} -> "
        f"{after} bytes, written to {out}", file=sys.stderr)
  return 0


def _parse_setting(text: str) -> tuple[str, object]:
  """KEY=VALUE with VALUE as JSON (64, false, null, 0.9), else as a string."""
  key, sep, value = text.partition("=")
  if not sep or not key:
    raise ValueError(f"--set {text!r} is not KEY=VALUE")
  try:
    return key, json.loads(value)
  except json.JSONDecodeError:
    return key, value


def cmd_generate(args) -> int:
  from models.generate import Generator, Sampling
  sampling = Sampling(args.temperature, args.top_k, args.top_p)
  if (Path(args.model) / MANIFEST).is_file():
    model, tokenizer, _ = _load_compressed(Path(args.model), args.dtype)
  else:
    model, tokenizer = _load(args)
  _set_kv_cache(model, args.kv_cache)
  prompt = args.prompt
  if not args.no_chat_template and tokenizer.chat_template is not None:
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
  ids = tokenizer.encode(prompt)
  if model.config.add_bos and (not ids or ids[0] != tokenizer.bos_id):
    ids = [tokenizer.bos_id] + ids
  generator = Generator(model, min(len(ids) + args.max_new_tokens,
                                   model.config.max_position_embeddings))
  decoder = tokenizer.stream_decoder()
  for token in generator.stream(ids, args.max_new_tokens, sampling=sampling, seed=args.seed,
                                stop_ids=tokenizer.eos_ids):
    if token in tokenizer.eos_ids:
      break
    sys.stdout.write(decoder.push(token))
    sys.stdout.flush()
  sys.stdout.write("\n")
  return 0


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="lowbit", description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="command", required=True)

  def add_model_args(p):
    p.add_argument("--model", required=True,
                   help="a known name (smollm2-135m, gemma3-270m), a .gguf file, a "
                        "Hugging Face folder (config.json + safetensors) or, for eval and "
                        "generate, a folder written by compress")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")

  def add_kv_cache_arg(p):
    p.add_argument("--kv-cache", default=None, metavar="FORMAT",
                   help="run with this KV cache format (dense, kv8, kv4, kv4-token, "
                        "kv4-atom, kv2); default: a compressed folder's, else dense")

  p = sub.add_parser("compress", help="compress a model by a recipe into a folder")
  add_model_args(p)
  p.add_argument("--recipe", required=True,
                 help="rtn, w4a16, w8a8, atom-w4a4, quarot-w4a4, palu, a KV cache format "
                      "(kv8, kv4, kv4-token, kv4-atom, kv2), or recipes joined by + "
                      "(w4a16+palu); any recipe takes --set kv_cache=FORMAT")
  p.add_argument("--calib", default=None,
                 help="calibration text: a shipped text (emma) or a UTF-8 file; never the "
                      "evaluation text")
  p.add_argument("--calib-samples", type=int, default=32, help="calibration windows")
  p.add_argument("--calib-seq-len", type=int, default=512, help="tokens per window")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="a recipe setting, e.g. --set group_size=64 --set symmetric=false")
  p.add_argument("--out", required=True, help="the folder to create")
  p.set_defaults(func=cmd_compress)

  p = sub.add_parser("eval", help="perplexity of a model on a text")
  add_model_args(p)
  p.add_argument("--text", default="pride-and-prejudice",
                 help="a shipped text (pride-and-prejudice, emma) or a UTF-8 file")
  p.add_argument("--seq-len", type=int, default=512)
  add_kv_cache_arg(p)
  p.add_argument("--max-tokens", type=int, default=None,
                 help="cap on text tokens before windowing")
  p.add_argument("--batch-size", type=int, default=1)
  p.add_argument("--json", action="store_true", help="print one JSON object")
  p.add_argument("--out", default=None,
                 help="append the result, with date, commit and command, to this JSONL file")
  p.set_defaults(func=cmd_eval)

  p = sub.add_parser("generate", help="stream a completion")
  add_model_args(p)
  add_kv_cache_arg(p)
  p.add_argument("--prompt", required=True)
  p.add_argument("--max-new-tokens", type=int, default=64)
  p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
  p.add_argument("--top-k", type=int, default=None)
  p.add_argument("--top-p", type=float, default=None)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--no-chat-template", action="store_true",
                 help="send the prompt as raw text even if the model has a chat template")
  p.set_defaults(func=cmd_generate)
  return parser


def use_compilation_cache() -> None:
  """Keeps compiled XLA programs (Mosaic GPU kernels included) in the lowbit cache
  ($LOWBIT_CACHE/jax), so that a command run again skips most of its compilation: on an
  H200 a 4-layer W8A8 model's first forward took 22.3 s cold and 6.1 s from the cache
  (bench/results/quantized_model.md). JAX_COMPILATION_CACHE_DIR, where set, wins."""
  if jax.config.jax_compilation_cache_dir is None:
    from models.hub import cache_dir
    jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "jax"))


def run() -> None:
  """The `lowbit` console script: `main` with the persistent compilation cache on (not
  `main` itself, which tests call in a process they share)."""
  use_compilation_cache()
  sys.exit(main())


def main(argv=None) -> int:
  from models.hub import ModelFetchError
  args = build_parser().parse_args(argv)
  try:
    return args.func(args)
  except (ValueError, FileNotFoundError, ModelFetchError) as error:
    print(f"lowbit {args.command}: error: {error}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  run()
