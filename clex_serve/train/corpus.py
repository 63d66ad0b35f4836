"""The training text: the Python standard library's own source and docstrings, available on every machine.

Selection (deterministic for a given Python version):

- every ``*.py`` file under ``sysconfig.get_paths()["stdlib"]``, in sorted order of its path relative to
  that folder;
- excluding any path with a component ``site-packages``, ``test``, ``tests``, ``idle_test`` or
  ``__pycache__`` (third-party code and the huge, repetitive test suites), the ``encodings`` package
  (codec tables, mostly numbers) and ``_sysconfigdata*`` (describes the machine, not Python);
- held out: a file whose relative path hashes (SHA-256, first 8 bytes as an integer) to 0 modulo 20, about
  5% of the files. The split depends on the path only, so it is stable when files are added or removed.

A different Python version gives a somewhat different corpus; the shipped model was trained on Python 3.11.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

EXCLUDED_DIRS = frozenset({"site-packages", "test", "tests", "idle_test", "__pycache__", "encodings"})
HELD_OUT_MODULUS = 20  # 1 file in 20 (~5%) goes to the held-out split


@dataclass(frozen=True)
class SourceFile:
    relative_path: str  # e.g. "json/__init__.py", with forward slashes on every platform
    path: Path

    @property
    def module_name(self) -> str:
        parts = self.relative_path[: -len(".py")].split("/")
        if parts[-1] == "__init__":
            parts = parts[:-1]
        return ".".join(parts)

    def read(self) -> str:
        # A few stdlib files are Latin-1; replacing undecodable bytes keeps the selection fixed.
        return self.path.read_text(encoding="utf-8", errors="replace")


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def is_held_out(relative_path: str) -> bool:
    digest = hashlib.sha256(relative_path.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % HELD_OUT_MODULUS == 0


def list_source_files(root: Path | None = None) -> list[SourceFile]:
    root = stdlib_root() if root is None else root
    files = []
    for path in root.rglob("*.py"):
        relative = path.relative_to(root)
        if EXCLUDED_DIRS.intersection(relative.parts[:-1]) or relative.name.startswith("_sysconfigdata"):
            continue
        files.append(SourceFile(relative.as_posix(), path))
    if not files:
        raise ValueError(f"no Python source found under {root}; the corpus needs the standard library's .py files")
    return sorted(files, key=lambda f: f.relative_path)


def split_files(root: Path | None = None) -> tuple[list[SourceFile], list[SourceFile]]:
    """(training files, held-out files), each in sorted path order."""
    files = list_source_files(root)
    train = [f for f in files if not is_held_out(f.relative_path)]
    held_out = [f for f in files if is_held_out(f.relative_path)]
    return train, held_out
