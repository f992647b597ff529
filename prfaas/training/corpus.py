"""The training corpus: the Python standard library's own sources (code, comments, docstrings),
which every machine with Python has offline.

Files are taken in sorted order of their path relative to the stdlib directory; tests, vendored
packages, generated tables and machine-specific files are left out. A file is held out (for
measuring quality later) by a hash of its relative path, so the split of a file never depends
on which other files a Python version has. The text differs between Python versions; the
shipped models record the version they were trained on (docs/models.md).
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "encodings", "__pycache__", "__phello__"}
)
EXCLUDED_PREFIXES = ("config-", "_sysconfigdata")
MAX_FILE_BYTES = 1 << 20
HELDOUT_EVERY = 20  # one file in 20 (by path hash) is held out
DOC_SEPARATOR = "<|endoftext|>"


@dataclass(frozen=True)
class Corpus:
    root: Path
    train: tuple[str, ...]  # relative paths, sorted
    heldout: tuple[str, ...]

    def read(self, rel: str) -> str:
        return (self.root / rel).read_text(encoding="utf-8", errors="replace")

    def texts(self, split: str) -> list[str]:
        return [self.read(rel) for rel in self._split(split)]

    def _split(self, split: str) -> tuple[str, ...]:
        if split == "train":
            return self.train
        if split == "heldout":
            return self.heldout
        raise ValueError(f"unknown split {split!r}: 'train' or 'heldout'")

    def num_bytes(self, split: str) -> int:
        return sum((self.root / rel).stat().st_size for rel in self._split(split))


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def is_heldout(rel: str) -> bool:
    digest = hashlib.sha256(rel.encode()).digest()
    return int.from_bytes(digest[:8], "big") % HELDOUT_EVERY == 0


def _wanted(rel: Path, size: int) -> bool:
    if any(part in EXCLUDED_DIRS or part.startswith(EXCLUDED_PREFIXES) for part in rel.parts):
        return False
    return 0 < size <= MAX_FILE_BYTES


def stdlib_corpus(root: str | Path | None = None) -> Corpus:
    """The corpus of the standard library at `root` (default: this interpreter's)."""
    base = Path(root) if root is not None else stdlib_root()
    if not base.is_dir():
        raise FileNotFoundError(f"{base}: no standard library directory")
    files = []
    for p in base.rglob("*.py"):
        rel = p.relative_to(base)
        if p.is_file() and _wanted(rel, p.stat().st_size):
            files.append(rel.as_posix())
    files.sort()
    if not files:
        raise FileNotFoundError(f"{base}: no Python sources")
    train = tuple(f for f in files if not is_heldout(f))
    heldout = tuple(f for f in files if is_heldout(f))
    return Corpus(base, train, heldout)
