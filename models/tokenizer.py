"""Text <-> token ids for the imported models, with chat templates and streaming decode.

A GGUF carries no tokenizer.json, only llama.cpp's description of one (`tokenizer.ggml.*`);
`Tokenizer.from_gguf_metadata` rebuilds it with the `tokenizers` library, the way llama.cpp
tokenizes:
  * `model == "gpt2"`: byte-level BPE with the file's merges, split first by the regex that
    `pre` names (for SmolLM2's "smollm": single digits, then GPT-2's regex);
  * `model == "llama"`: SentencePiece-style BPE (Gemma). The file stores scores but no merges,
    so the merges are rebuilt from the vocabulary: every split of a token into two tokens,
    ranked by the token's position in the vocabulary; spaces are written as U+2581, unknown
    bytes as <0xNN> tokens (byte fallback). Position, not score: for ordinary tokens the two
    agree, but Gemma 3's runs of spaces (user-defined tokens that SentencePiece matches whole)
    score below its top 1000 tokens while they come first by position. Ranking by position
    reproduces transformers' tokenizer for the same file exactly.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

# llama.cpp token types (llama_token_type): control tokens are special (<eos>, <|im_end|>);
# user-defined ones are matched whole in the text but are not special ("\n\n" in Gemma).
_CONTROL, _USER_DEFINED = 3, 4
_SPACE = "\u2581"  # SentencePiece's visible space

# Pre-tokenizer regexes, as in llama.cpp's llama-vocab.cpp and the models' tokenizer.json.
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _byte_level_split(pre: str) -> tuple[pre_tokenizers.PreTokenizer, bool]:
  """(pre-tokenizer, ignore_merges) for a byte-level vocabulary's `tokenizer.ggml.pre`."""
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  if pre == "smollm":
    return pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]), False
  if pre == "qwen2":
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated"), byte_level]), False
  if pre == "llama-bpe":  # Llama 3: whole tokens of the vocabulary skip the merges
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"), byte_level]), True
  if pre in ("default", "gpt-2"):
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True), False
  raise ValueError(f"unsupported tokenizer.ggml.pre={pre!r}; supported: smollm, qwen2, "
                   "llama-bpe, gpt-2, default")


def _sentencepiece_merges(tokens: Sequence[str]) -> list[tuple[str, str]]:
  """Merges implied by a SentencePiece BPE vocabulary, best first.

  Every split of a token into two vocabulary tokens is a merge; merges rank by the position of
  the token they make, and, within a token, longer left pieces first.
  """
  vocab = {t: i for i, t in enumerate(tokens)}
  merges = []
  for token in tokens:
    splits = [(token[:k], token[k:]) for k in range(1, len(token))
              if token[:k] in vocab and token[k:] in vocab]
    splits.sort(key=lambda lr: (-len(lr[0]), vocab[lr[0]], vocab[lr[1]]))
    merges.extend(splits)
  return merges


def _added_tokens(tokens: Sequence[str], types: Sequence[int], vocab: Mapping[str, int]
                  ) -> list[AddedToken]:
  return [AddedToken(t, special=k == _CONTROL, normalized=False)
          for t, k in zip(tokens, types) if k in (_CONTROL, _USER_DEFINED) and t in vocab]


def _from_byte_level(md: Mapping[str, Any]) -> tokenizers.Tokenizer:
  tokens = md["tokenizer.ggml.tokens"]
  if "tokenizer.ggml.merges" not in md:
    raise ValueError("byte-level GGUF tokenizer without tokenizer.ggml.merges")
  merges = [tuple(m.split(" ", 1)) for m in md["tokenizer.ggml.merges"]]
  vocab = {t: i for i, t in enumerate(tokens)}
  pre, ignore_merges = _byte_level_split(md.get("tokenizer.ggml.pre", "default"))
  tok = tokenizers.Tokenizer(BPE(vocab, merges, ignore_merges=ignore_merges))
  tok.pre_tokenizer = pre
  tok.decoder = decoders.ByteLevel()
  tok.add_tokens(_added_tokens(tokens, md.get("tokenizer.ggml.token_type", ()), vocab))
  return tok


def _from_sentencepiece(md: Mapping[str, Any]) -> tokenizers.Tokenizer:
  # Gemma stores its multi-space tokens with real spaces; in the text they appear as U+2581.
  tokens = [_SPACE * len(t) if t and not t.strip(" ") else t
            for t in md["tokenizer.ggml.tokens"]]
  vocab = {t: i for i, t in enumerate(tokens)}
  unk = md.get("tokenizer.ggml.unknown_token_id")
  tok = tokenizers.Tokenizer(BPE(vocab, _sentencepiece_merges(tokens), fuse_unk=True,
                                 byte_fallback=True,
                                 unk_token=tokens[unk] if unk is not None else None))
  # llama.cpp prepends the space to every piece of text between special tokens, as the
  # normalizer does here (it runs on each such piece).
  prefix = bool(md.get("tokenizer.ggml.add_space_prefix", True))
  tok.normalizer = normalizers.Sequence(
      ([normalizers.Prepend(_SPACE)] if prefix else []) + [normalizers.Replace(" ", _SPACE)])
  tok.decoder = decoders.Sequence(
      [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
      + ([decoders.Strip(" ", 1, 0)] if prefix else []))
  tok.add_tokens(_added_tokens(md["tokenizer.ggml.tokens"],
                               md.get("tokenizer.ggml.token_type", ()), vocab))
  return tok


def _render(template: str, messages: Sequence[Mapping[str, Any]], **context) -> str:
  """Renders a Hugging Face chat template the way transformers does (sandboxed jinja2)."""
  import jinja2
  from jinja2.sandbox import ImmutableSandboxedEnvironment

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                      extensions=["jinja2.ext.loopcontrols"])
  # transformers' tojson: no HTML escaping, non-ASCII kept.
  env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
  env.globals.update(raise_exception=raise_exception,
                     strftime_now=lambda fmt: datetime.now().strftime(fmt))
  return env.from_string(template).render(messages=list(messages), **context)


class StreamDecoder:
  """Turns generated ids into text as soon as they form whole characters.

  A character can span tokens (a byte-fallback token or half of a UTF-8 sequence); `push`
  holds such pieces back and returns "" until the character is complete.
  """

  def __init__(self, backend: tokenizers.Tokenizer, skip_special_tokens: bool):
    self._backend = backend
    self._stream = decoders.DecodeStream(skip_special_tokens=skip_special_tokens)

  def push(self, token_id: int) -> str:
    return self._stream.step(self._backend, int(token_id)) or ""


class Tokenizer:
  """A `tokenizers.Tokenizer` plus the model's special ids and chat template.

  `encode` never adds BOS/EOS: whether a prompt starts with BOS is the model's choice
  (`ModelConfig.add_bos`). Special-token text in the input ("<|im_end|>") still maps to its id,
  which is what a rendered chat template needs.
  """

  def __init__(self, backend: tokenizers.Tokenizer, *, bos_id: int | None,
               eos_ids: Iterable[int], chat_template: str | None):
    self.backend = backend
    self.bos_id = bos_id
    self.eos_ids = tuple(eos_ids)
    # None when the model ships no template (Gemma 3 270M base).
    self.chat_template = chat_template

  @property
  def vocab_size(self) -> int:
    return self.backend.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> list[int]:
    return self.backend.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
    return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def stream_decoder(self, skip_special_tokens: bool = False) -> StreamDecoder:
    return StreamDecoder(self.backend, skip_special_tokens)

  def _token(self, token_id: int | None) -> str:
    return "" if token_id is None else self.backend.id_to_token(token_id)

  def apply_chat_template(self, messages: Sequence[Mapping[str, Any]],
                          add_generation_prompt: bool = True) -> str:
    """The prompt text for `messages` ([{"role": ..., "content": ...}]); encode it next."""
    if self.chat_template is None:
      raise ValueError("this tokenizer has no chat template (a base model); format the "
                       "prompt yourself")
    return _render(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                   bos_token=self._token(self.bos_id),
                   eos_token=self._token(self.eos_ids[0] if self.eos_ids else None))

  @classmethod
  def from_gguf_metadata(cls, metadata: Mapping[str, Any]) -> "Tokenizer":
    """From a GGUF's metadata (the third value of `models.gguf_import.load_gguf`)."""
    model = metadata.get("tokenizer.ggml.model")
    if "tokenizer.ggml.tokens" not in metadata:
      raise ValueError("the GGUF metadata holds no tokenizer (no tokenizer.ggml.tokens)")
    if model == "gpt2":
      backend = _from_byte_level(metadata)
    elif model == "llama":
      backend = _from_sentencepiece(metadata)
    else:
      raise ValueError(f"unsupported GGUF tokenizer.ggml.model={model!r}; supported: "
                       "gpt2 (byte-level BPE), llama (SentencePiece BPE)")
    eos = metadata.get("tokenizer.ggml.eos_token_id")
    return cls(backend, bos_id=metadata.get("tokenizer.ggml.bos_token_id"),
               eos_ids=() if eos is None else (eos,),
               chat_template=metadata.get("tokenizer.chat_template"))

  @classmethod
  def from_hf_folder(cls, path: str | os.PathLike) -> "Tokenizer":
    """From a Hugging Face folder: tokenizer.json, tokenizer_config.json, the chat template."""
    path = Path(path)
    file = path / "tokenizer.json"
    if not file.is_file():
      raise FileNotFoundError(f"{path}: no tokenizer.json")
    backend = tokenizers.Tokenizer.from_file(str(file))

    def read(name: str) -> dict[str, Any]:
      p = path / name
      return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else {}

    tok_config, config, generation = (read("tokenizer_config.json"), read("config.json"),
                                      read("generation_config.json"))

    def token_id(key: str) -> int | None:
      token = tok_config.get(key)
      if isinstance(token, dict):  # older files: {"content": "<s>", ...}
        token = token.get("content")
      return backend.token_to_id(token) if token else None

    bos = config.get("bos_token_id", token_id("bos_token"))
    eos = generation.get("eos_token_id", config.get("eos_token_id", token_id("eos_token")))
    eos = () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)
    template = tok_config.get("chat_template")
    if isinstance(template, list):  # named templates: take the default one
      template = {t["name"]: t["template"] for t in template}.get("default")
    jinja_file = path / "chat_template.jinja"  # where transformers 5 saves it
    if template is None and jinja_file.is_file():
      template = jinja_file.read_text(encoding="utf-8")
    return cls(backend, bos_id=bos, eos_ids=eos, chat_template=template)
