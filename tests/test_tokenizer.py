"""Tokenizers rebuilt from GGUF metadata (against transformers' GGUF tokenizer on real text),
Hugging Face folders, chat templates and streaming decode."""

import functools
import json
from pathlib import Path

import pytest
import tokenizers

from models.gguf_import import read_gguf
from models.tokenizer import Tokenizer

CORPORA = Path(__file__).resolve().parents[1].parent / "shared/data/corpora"
_CHARS = 200_000
# Mixed scripts, accents, emoji and a private-use character that no vocabulary holds whole.
_MIXED = "Grüße, naïve café — 東京 🚀 \U0010fffd ok\n\n  x"


def _corpus_texts():
  if not CORPORA.is_dir():
    pytest.skip(f"no corpora at {CORPORA}")
  files = sorted(CORPORA.glob("*"))
  return [(f.name, f.read_text(encoding="utf-8")[:_CHARS]) for f in files]


@pytest.fixture(scope="module")
def ours(real_model_path):
  @functools.cache
  def load(name):
    return Tokenizer.from_gguf_metadata(read_gguf(real_model_path(name))[0])
  return load


def _mismatches(a, a_ends, b, b_ends):
  """(i1, i2, j1, j2) of each stretch where two tokenizations of one text differ.

  Tokens are aligned by the character offset where they end: a stretch closes as soon as
  both sides end at the same offset again (linear, unlike difflib on 45k-token lists).
  """
  i = j = 0
  while i < len(a) and j < len(b):
    if a[i] == b[j] and a_ends[i] == b_ends[j]:
      i, j = i + 1, j + 1
      continue
    i1, j1 = i, j
    i, j = i + 1, j + 1
    while a_ends[i - 1] != b_ends[j - 1]:
      if a_ends[i - 1] < b_ends[j - 1]:
        i += 1
      else:
        j += 1
    yield i1, i, j1, j
  assert (i, j) == (len(a), len(b))


@pytest.mark.real_model
def test_gemma3_matches_transformers_exactly(ours, hf_gguf_tokenizer):
  tok, reference = ours("gemma3-270m"), hf_gguf_tokenizer("gemma3-270m")
  for name, text in _corpus_texts():
    ids = tok.encode(text)
    assert ids == reference(text, add_special_tokens=False).input_ids, name
    assert tok.decode(ids) == text, name


@pytest.mark.real_model
def test_smollm2_differs_only_where_digits_split(ours, hf_gguf_tokenizer, record_property):
  """transformers skips SmolLM2's digit pre-split; that shows only as whitespace before a
  digit ("  1990": ours "ĠĠ" "1"..., as llama.cpp and SmolLM2's tokenizer.json do; theirs
  "Ġ" "Ġ" "1"...)."""
  tok, reference = ours("smollm2-135m"), hf_gguf_tokenizer("smollm2-135m")
  total = differing = 0
  for name, text in _corpus_texts():
    mine = tok.backend.encode(text, add_special_tokens=False)
    ids, ends = mine.ids, [end for _, end in mine.offsets]
    assert ids == tok.encode(text) and tok.decode(ids) == text, name
    theirs = reference(text, add_special_tokens=False, return_offsets_mapping=True)
    total += len(theirs.input_ids)
    for i1, i2, j1, j2 in _mismatches(ids, ends, theirs.input_ids,
                                      [end for _, end in theirs.offset_mapping]):
      differing += max(i2 - i1, j2 - j1)
      piece = tok.decode(ids[i1:i2])
      assert piece == tok.decode(theirs.input_ids[j1:j2]) and not piece.strip(), (name, piece)
      assert tok.decode(ids[i2:i2 + 1]).isdigit(), (name, piece, tok.decode(ids[i2:i2 + 3]))
  rate = differing / total
  record_property("smollm2_mismatch_rate", rate)
  print(f"SmolLM2: {differing} of {total} tokens differ from transformers ({rate:.4%})")
  assert rate < 0.005


@pytest.mark.real_model
def test_smollm2_splits_digits(ours):
  tok = ours("smollm2-135m")
  pieces = [p for p, _ in tok.backend.pre_tokenizer.pre_tokenize_str("in 2024, 42x")]
  assert pieces == ["in", "Ġ", "2", "0", "2", "4", ",", "Ġ", "4", "2", "x"]
  assert [tok.backend.id_to_token(i) for i in tok.encode("year  1990")] == [
      "year", "ĠĠ", "1", "9", "9", "0"]


@pytest.mark.real_model
@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_stream_decoder_matches_decode(ours, name):
  tok = ours(name)
  ids = tok.encode(_MIXED)
  stream = tok.stream_decoder()
  pieces = [stream.push(i) for i in ids]
  assert "".join(pieces) == tok.decode(ids) == _MIXED
  assert "" in pieces  # some character spanned several tokens and was held back
  assert not any("\ufffd" in p for p in pieces)


@pytest.mark.real_model
def test_special_ids(ours, real_model_import):
  smol, gemma = ours("smollm2-135m"), ours("gemma3-270m")
  assert (smol.bos_id, smol.eos_ids) == (1, (2,))
  assert (gemma.bos_id, gemma.eos_ids) == (2, (1,))
  assert smol.encode("<|im_start|>user") == [1, 4093]
  assert gemma.encode("<start_of_turn>user\n")[0] == 105
  # The model config and the tokenizer agree.
  for name, tok in (("smollm2-135m", smol), ("gemma3-270m", gemma)):
    config = real_model_import(name)[0]
    assert (config.bos_token_id, config.eos_token_ids) == (tok.bos_id, tok.eos_ids)


@pytest.mark.real_model
def test_chat_template_matches_transformers(ours, hf_gguf_tokenizer):
  tok, reference = ours("smollm2-135m"), hf_gguf_tokenizer("smollm2-135m")
  for messages in ([{"role": "user", "content": "What is 2+2?"}],
                   [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello!"},
                    {"role": "user", "content": "Bye"}]):
    prompt = tok.apply_chat_template(messages)
    assert prompt == reference.apply_chat_template(messages, tokenize=False,
                                                   add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    assert tok.encode(prompt) == reference(prompt, add_special_tokens=False).input_ids
  gemma = ours("gemma3-270m")
  assert gemma.chat_template is None  # the base model's GGUF ships none
  with pytest.raises(ValueError, match="no chat template"):
    gemma.apply_chat_template([{"role": "user", "content": "hi"}])


# Small hand-made vocabularies: no download needed.

def _spm_metadata(add_space_prefix):
  byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
  # "bc" comes before "ab": at "abc" the merge b+c wins although its score is lower.
  normal = ["\u2581", "a", "b", "c", "bc", "ab", "\u2581ab", "\u2581a"]
  tokens = ["<pad>", "<eos>", "<bos>", "<unk>", *byte_tokens, *normal, "<start_of_turn>",
            "\n", "  "]
  types = [3, 3, 3, 2, *[6] * 256, *[1] * len(normal), 3, 4, 4]
  return {
      "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
      "tokenizer.ggml.scores": [0.0] * 260 + [-float(i) for i in range(len(normal))][::-1]
                               + [0.0] * 3,
      "tokenizer.ggml.token_type": types, "tokenizer.ggml.bos_token_id": 2,
      "tokenizer.ggml.eos_token_id": 1, "tokenizer.ggml.unknown_token_id": 3,
      "tokenizer.ggml.add_space_prefix": add_space_prefix,
  }


def _pieces(tok, text):
  return [tok.backend.id_to_token(i) for i in tok.encode(text)]


def test_sentencepiece_from_metadata():
  tok = Tokenizer.from_gguf_metadata(_spm_metadata(add_space_prefix=False))
  assert _pieces(tok, "abc ab") == ["a", "bc", "\u2581ab"]
  assert _pieces(tok, "ab<start_of_turn>a\n") == ["ab", "<start_of_turn>", "a", "\n"]
  # Byte fallback for characters outside the vocabulary; multi-space tokens are SentencePiece
  # pieces of U+2581.
  assert _pieces(tok, "é  \n") == ["<0xC3>", "<0xA9>", "\u2581\u2581", "\n"]
  for text in ("abc ab", "é  a\n", " a"):
    assert tok.decode(tok.encode(text)) == text
  assert (tok.bos_id, tok.eos_ids, tok.chat_template) == (2, (1,), None)


def test_sentencepiece_space_prefix():
  tok = Tokenizer.from_gguf_metadata(_spm_metadata(add_space_prefix=True))
  assert _pieces(tok, "ab") == ["\u2581ab"]
  assert tok.decode(tok.encode("ab a")) == "ab a"


def test_byte_level_pre_tokenizers():
  tokens = ["a", "b", "ab", "1", "2", "Ġ", "Ġa", "<|end|>"]
  base = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens,
          "tokenizer.ggml.merges": ["a b", "Ġ a"], "tokenizer.ggml.token_type": [1] * 7 + [3]}
  # How each `pre` splits "ab12 a": single digits, Llama 3's groups of up to 3, GPT-2's runs.
  for pre, split in (("smollm", ["ab", "1", "2", "Ġa"]), ("qwen2", ["ab", "1", "2", "Ġa"]),
                     ("llama-bpe", ["ab", "12", "Ġa"]), ("gpt-2", ["ab", "12", "Ġa"])):
    tok = Tokenizer.from_gguf_metadata({**base, "tokenizer.ggml.pre": pre})
    assert [p for p, _ in tok.backend.pre_tokenizer.pre_tokenize_str("ab12 a")] == split, pre
    assert _pieces(tok, "ab12 a<|end|>")[-1] == "<|end|>"
    assert tok.decode(tok.encode("ab12 a<|end|>")) == "ab12 a<|end|>"
  with pytest.raises(ValueError, match="unsupported tokenizer.ggml.pre='falcon'"):
    Tokenizer.from_gguf_metadata({**base, "tokenizer.ggml.pre": "falcon"})
  with pytest.raises(ValueError, match="unsupported GGUF tokenizer.ggml.model='bert'"):
    Tokenizer.from_gguf_metadata({**base, "tokenizer.ggml.model": "bert"})
  with pytest.raises(ValueError, match="holds no tokenizer"):
    Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": "gpt2"})


def test_from_hf_folder(tmp_path):
  backend = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
  backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  backend.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "<|eot|>"],
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  backend.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, trainer)
  backend.save(str(tmp_path / "tokenizer.json"))
  template = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
              "{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(
      {"bos_token": {"content": "<s>"}, "eos_token": "</s>", "chat_template": template}))
  (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 3]}))
  tok = Tokenizer.from_hf_folder(tmp_path)
  assert (tok.bos_id, tok.eos_ids) == (1, (2, 3))
  text = "the lazy fox</s>"
  assert tok.encode(text) == backend.encode(text, add_special_tokens=False).ids
  assert tok.encode(text)[-1] == 2 and tok.decode(tok.encode(text)) == text
  assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == (
      "<s>user: hi</s>\nassistant:")
  assert tok.apply_chat_template([{"role": "user", "content": "hi"}],
                                 add_generation_prompt=False) == "<s>user: hi</s>\n"
  (tmp_path / "tokenizer.json").unlink()
  with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
    Tokenizer.from_hf_folder(tmp_path)
