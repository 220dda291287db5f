"""The `lowbit` command line: eval's JSON output and records, generate, and its errors."""

from __future__ import annotations

import json

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
