"""The `lowbit` command line: evaluate perplexity and generate text.

It lives in `train/` because it stands on everything below it (models, importers, the
perplexity protocol); `lowbit/` itself never imports models.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import subprocess
import sys
import time

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


def cmd_eval(args) -> int:
  from lowbit.data import read_text, text_path
  from train.perplexity import perplexity
  text = read_text(args.text)  # before loading the model: a bad text fails fast
  model, tokenizer = _load(args)
  ids = tokenizer.encode(text)
  start = time.perf_counter()
  result = perplexity(model, ids, args.seq_len, max_tokens=args.max_tokens,
                      batch_size=args.batch_size, progress=not args.json)
  result.update(model=args.model, recipe="float", text=text_path(args.text).name,
                calib_text=None, dtype=args.dtype, text_tokens=len(ids),
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


def cmd_generate(args) -> int:
  from models.generate import Generator, Sampling
  sampling = Sampling(args.temperature, args.top_k, args.top_p)
  model, tokenizer = _load(args)
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
                   help="a known name (smollm2-135m, gemma3-270m), a .gguf file or a "
                        "Hugging Face folder (config.json + safetensors)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")

  p = sub.add_parser("eval", help="perplexity of a model on a text")
  add_model_args(p)
  p.add_argument("--text", default="pride-and-prejudice",
                 help="a shipped text (pride-and-prejudice, emma) or a UTF-8 file")
  p.add_argument("--seq-len", type=int, default=512)
  p.add_argument("--max-tokens", type=int, default=None,
                 help="cap on text tokens before windowing")
  p.add_argument("--batch-size", type=int, default=1)
  p.add_argument("--json", action="store_true", help="print one JSON object")
  p.add_argument("--out", default=None,
                 help="append the result, with date, commit and command, to this JSONL file")
  p.set_defaults(func=cmd_eval)

  p = sub.add_parser("generate", help="stream a completion")
  add_model_args(p)
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


def main(argv=None) -> int:
  from models.hub import ModelFetchError
  args = build_parser().parse_args(argv)
  try:
    return args.func(args)
  except (ValueError, FileNotFoundError, ModelFetchError) as error:
    print(f"lowbit {args.command}: error: {error}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
