"""Crash-safe writes: a file or a checkpoint directory appears at its name complete, or not at all.

A file is written to a temporary name beside its target, flushed to disk (``fsync``) and renamed over the target;
the rename is atomic on POSIX file systems, and fsyncing the parent directory makes the new name itself durable.
A checkpoint directory is built under its :func:`partial_path` (a hidden ``.NAME.partial`` sibling, which says
what it is) and renamed to its name once every file and its manifest are written; one is removed by renaming it
to ``.NAME.removed`` first. A process killed part-way leaves the previous file or directory as it was, plus at most
a hidden temporary name (:data:`INCOMPLETE_SUFFIXES`) that the next write or removal of the same name clears.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

PARTIAL_SUFFIX = ".partial"
REPLACED_SUFFIX = ".replaced"
REMOVED_SUFFIX = ".removed"
INCOMPLETE_SUFFIXES = (PARTIAL_SUFFIX, REPLACED_SUFFIX, REMOVED_SUFFIX)
"""A hidden ``.NAME`` ending in one of these is being written, replaced or removed: never a checkpoint to load."""


def partial_path(target: str | Path) -> Path:
    """Where ``target`` is assembled before it is renamed into place; a path of this form is never complete."""
    target = Path(target)
    return target.with_name(f".{target.name}{PARTIAL_SUFFIX}")


def fsync_file(path: str | Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_directory(path: str | Path) -> None:
    """Make the names in directory ``path`` (a rename into it, a new file) durable."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def remove(path: Path) -> None:
    """Remove a file, a symbolic link or a directory tree at ``path``, if there is one."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def remove_atomically(path: str | Path) -> None:
    """Remove a checkpoint file or directory so that its name is gone at once: a directory is first renamed to a
    hidden ``.NAME.removed`` (deleting its files one by one at its own name, a kill would leave a part of it there)."""
    path = Path(path)
    if not path.is_dir() or path.is_symlink():
        remove(path)
        return
    removed = path.with_name(f".{path.name}{REMOVED_SUFFIX}")
    remove(removed)
    os.rename(path, removed)
    fsync_directory(path.parent)
    shutil.rmtree(removed)


def atomic_write(target: str | Path, write: Callable[[Path], None]) -> None:
    """``write(path)`` to a temporary path beside ``target``, fsync it, then rename it to ``target``."""
    target = Path(target)
    temporary = partial_path(target)
    remove(temporary)
    try:
        write(temporary)
        fsync_file(temporary)
        os.replace(temporary, target)
    except BaseException:
        remove(temporary)
        raise
    fsync_directory(target.parent)


def atomic_torch_save(obj: Any, target: str | Path) -> None:
    atomic_write(target, lambda path: torch.save(obj, path))


def publish_directory(partial: Path, target: Path) -> None:
    """Rename the finished directory ``partial`` to ``target``, replacing what is there, after fsyncing its files.

    A directory cannot be renamed over a non-empty one, so an existing ``target`` first moves aside; a kill in the
    instant between the two renames leaves it under ``.NAME.replaced``. Callers never replace the directory that
    ``last`` points at (see :class:`moe_lightning.callbacks.CrashSafeCheckpoint`).
    """
    for path in partial.rglob("*"):
        if path.is_file():
            fsync_file(path)
    fsync_directory(partial)
    replaced = target.with_name(f".{target.name}{REPLACED_SUFFIX}")
    remove(replaced)
    if target.exists() or target.is_symlink():
        os.rename(target, replaced)
    os.rename(partial, target)
    fsync_directory(target.parent)
    remove(replaced)


def replace_symlink(link: str | Path, points_to: str) -> None:
    """Make ``link`` a symbolic link to ``points_to`` in one rename: it names the old or the new target, never
    nothing (a real file or directory at ``link``, e.g. an older full copy, is removed first)."""
    link = Path(link)
    if not link.is_symlink() and link.exists():
        remove(link)
    temporary = partial_path(link)
    remove(temporary)
    os.symlink(points_to, temporary)
    os.replace(temporary, link)
    fsync_directory(link.parent)
