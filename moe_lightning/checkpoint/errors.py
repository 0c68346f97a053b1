"""ArtifactError: what every check of a checkpoint or export file raises."""

from __future__ import annotations

from pathlib import Path


class ArtifactError(ValueError):
    """An artifact file is truncated, corrupt, altered since its manifest was written, unsigned, or signed by a key
    that is not trusted. ``path`` is the file at fault; the message names it and says what to do.

    A ``ValueError``, so every command line reports it as one error line."""

    def __init__(self, path: str | Path, message: str) -> None:
        super().__init__(message)
        self.path = Path(path)

