"""AtomicCheckpointIO: Lightning's ``torch.save`` checkpoint files written through :func:`atomic_write`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO
from typing_extensions import override

from moe_lightning.checkpoint.atomic import atomic_torch_save


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local files are written beside their target, fsynced and renamed into place.

    Lightning's own atomic save stages the file in the system's temporary directory and moves it, which is a copy
    (not atomic) when that directory is on another file system, and never fsyncs. Remote paths keep Lightning's
    write (an object store's upload is already all or nothing).
    """

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if not _is_local_file_protocol(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got storage_options={storage_options!r}")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(checkpoint, path)
