"""Public-domain texts shipped with lowbit, so evaluation and calibration work offline.

Jane Austen's Pride and Prejudice (evaluation) and Emma (calibration), from the Debian
package r-cran-janeaustenr (public domain). Calibrate on one and evaluate on the other.
"""

from __future__ import annotations

from pathlib import Path

_TEXT_DIR = Path(__file__).parent / "texts"
TEXTS = {
    "pride-and-prejudice": "pride_and_prejudice.txt",
    "emma": "emma.txt",
}


def text_path(name_or_path: str) -> Path:
  """A shipped text by name, or an existing file path."""
  if name_or_path in TEXTS:
    return _TEXT_DIR / TEXTS[name_or_path]
  path = Path(name_or_path).expanduser()
  if not path.is_file():
    raise FileNotFoundError(
        f"text {name_or_path!r} is neither a shipped text {sorted(TEXTS)} nor a file")
  return path


def read_text(name_or_path: str) -> str:
  """The text as a string; an empty (or whitespace-only) text is an error."""
  path = text_path(name_or_path)
  text = path.read_text(encoding="utf-8")
  if not text.strip():
    raise ValueError(f"text {str(path)!r} is empty")
  return text
