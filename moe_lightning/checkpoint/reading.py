"""Readers of safetensors and ``torch.save`` files whose errors name the file: a truncated or corrupt file otherwise
ends in the reader's own message (``incomplete metadata, file not fully covered``, ``failed finding central
directory``, ``[Errno 22] Invalid argument``), which says neither which file nor what to do."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import Tensor

from moe_lightning.checkpoint.errors import ArtifactError

TORCH_LOAD_ERRORS = (RuntimeError, OSError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile)
"""What ``torch.load`` raises on a truncated or corrupt file (a missing file is checked for first)."""


def corrupt_file_error(path: str | Path, error: BaseException) -> ArtifactError:
    """The error for a file its reader refused: which file, that it is truncated or corrupt, and what to do."""
    detail = str(error).splitlines()[0] if str(error) else "no detail"
    return ArtifactError(path, f"{path} is truncated or corrupt ({type(error).__name__}: {detail}): write it again "
                               "(export or save it anew, or copy it again from its source)")


def safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's header."""
    _require_file(path)
    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata() or {}
    except SafetensorError as error:
        raise corrupt_file_error(path, error) from error


def load_safetensors_file(path: str | Path) -> dict[str, Tensor]:
    """Every tensor of a safetensors file, on the CPU."""
    _require_file(path)
    try:
        return load_file(str(path))
    except SafetensorError as error:
        raise corrupt_file_error(path, error) from error


def load_torch_file(path: str | Path) -> Any:
    """A ``torch.save`` file (a Lightning ``.ckpt``) read with ``weights_only=True`` onto the CPU: no pickled code
    runs."""
    _require_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights_only" in str(error).replace(" ", "_").lower():
            raise ArtifactError(path, f"{path} holds objects that loading without running pickled code refuses "
                                      f"({str(error).splitlines()[0]}): save only tensors and plain values") from error
        raise corrupt_file_error(path, error) from error
    except TORCH_LOAD_ERRORS as error:
        raise corrupt_file_error(path, error) from error


def _require_file(path: str | Path) -> None:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} does not exist or is not a file")
