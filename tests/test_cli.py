"""The `lowbit` command line: eval's JSON output and records, generate, and its errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from train.cli import main


@pytest.mark.real_model
def test_eval_json_and_record(tmp_path, capsys):
  out = tmp_path / "records.jsonl"
  assert main(["eval", "--model", "smollm2-135m", "--seq-len", "128", "--max-tokens", "300",
               "--json", "--out", str(out)]) == 0
  result = json.loads(capsys.readouterr().out)
  # 2 windows of 128 tokens, the first token of each has no context.
  assert result["tokens"] == 254 and result["windows"] == 2
  assert 5 < result["perplexity"] < 100
  record = json.loads(out.read_text())
  for field in ("model", "recipe", "text", "seq_len", "tokens", "perplexity", "weight_bytes",
                "date", "commit", "command"):
    assert field in record


@pytest.mark.real_model
def test_generate_streams_the_greedy_answer(capsys):
  assert main(["generate", "--model", "smollm2-135m", "--prompt",
               "What is the capital of France?", "--max-new-tokens", "12"]) == 0
  assert "Paris" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["eval", "--model", "no-such-model"], "known names: smollm2-135m"),
    (["eval", "--model", "smollm2-135m", "--text", "/no/such/file.txt"], "neither a shipped"),
])
def test_errors_are_reported_not_raised(argv, message, capsys):
  assert main(argv) == 2
  assert message in capsys.readouterr().err


def test_empty_text_is_an_error(tmp_path, capsys):
  empty = tmp_path / "empty.txt"
  empty.write_text("  \n")
  assert main(["eval", "--model", "smollm2-135m", "--text", str(empty)]) == 2
  assert "is empty" in capsys.readouterr().err


def test_the_command_keeps_compiled_programs_in_the_lowbit_cache(tmp_path):
  """`run` (the console script) points JAX's persistent cache into $LOWBIT_CACHE, unless
  JAX_COMPILATION_CACHE_DIR names another folder. A fresh process: the setting is global."""
  probe = ("from train.cli import use_compilation_cache; import jax; "
           "use_compilation_cache(); print(jax.config.jax_compilation_cache_dir)")
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  env["LOWBIT_CACHE"] = str(tmp_path / "lb")

  def cache_dir_in(env):
    return subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                          text=True, check=True).stdout.strip()

  assert cache_dir_in(env) == str(tmp_path / "lb" / "jax")
  assert cache_dir_in({**env, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "x")}) == \
      str(tmp_path / "x")
