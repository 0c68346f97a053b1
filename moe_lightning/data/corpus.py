"""Finding and reading the documents of a byte-level text corpus."""

from __future__ import annotations

import json
import os
import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

DOCUMENT_END = b"\x00"
"""Ends every document in the byte stream: NUL never occurs in UTF-8 text, so it marks the end unambiguously."""

_INSTALLED_PACKAGE_DIRS = {"site-packages", "dist-packages"}


def stdlib_source_files() -> list[Path]:
    """The standard library's own ``.py`` files (installed packages excluded), sorted by path inside it."""
    root = Path(sysconfig.get_paths()["stdlib"])
    relative = []
    for directory, subdirectories, names in os.walk(root):
        # Prune rather than filter: the installed packages can be far larger than the library itself.
        subdirectories[:] = [name for name in subdirectories if name not in _INSTALLED_PACKAGE_DIRS]
        relative += [Path(directory, name).relative_to(root) for name in names if name.endswith(".py")]
    return [root / path for path in sorted(relative)]


def expand_paths(paths: Sequence[str]) -> list[Path]:
    """The files of ``paths`` in order: a file as is, a directory as its non-hidden files, recursively, sorted."""
    files = []
    for path in map(Path, paths):
        if not path.is_dir():
            files.append(path)
            continue
        relative = (file.relative_to(path) for file in path.rglob("*") if file.is_file())
        files += [path / file for file in sorted(relative) if not any(part.startswith(".") for part in file.parts)]
    return files


def read_documents(file: Path, jsonl_field: str) -> Iterator[bytes]:
    """A ``.jsonl`` file yields the UTF-8 text of each line's ``jsonl_field``; another file is one document."""
    if file.suffix != ".jsonl":
        yield file.read_bytes()
        return
    with file.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{file}:{number} is not valid JSON: {error}") from error
            text = record.get(jsonl_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise ValueError(f"{file}:{number} has no string field {jsonl_field!r}")
            yield text.encode("utf-8")


def read_byte_corpus(files: Sequence[Path], jsonl_field: str, max_bytes: int | None) -> np.ndarray:
    """The non-empty documents of ``files``, each followed by ``DOCUMENT_END``, as ``uint8``, cut at ``max_bytes``."""
    documents, total = [], 0
    for file in files:
        for document in read_documents(file, jsonl_field):
            if document:
                documents += [document, DOCUMENT_END]
                total += len(document) + len(DOCUMENT_END)
            if max_bytes is not None and total >= max_bytes:
                return np.frombuffer(b"".join(documents)[:max_bytes], dtype=np.uint8)
    return np.frombuffer(b"".join(documents), dtype=np.uint8)
