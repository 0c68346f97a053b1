"""SafetensorsShards: the tensors of a checkpoint directory's ``*.safetensors`` shards, read lazily.

Every shard's header is read up front (which also finds missing and truncated shards before anything is loaded);
tensor data is read only when asked for, and for a range of rows only those rows (``safe_open``'s ``get_slice``).
Nothing is unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError, safe_open
from torch import Tensor

INDEX_FILE = "model.safetensors.index.json"


class SafetensorsShards:
    """The tensors of ``directory``: the shards its ``model.safetensors.index.json`` lists, else every
    ``*.safetensors`` file in it. Errors name the directory, shard and tensor concerned."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        files, weight_map = self._shard_files()
        self._handles = {}
        self._file_of: dict[str, str] = {}
        for file in files:
            handle = self._open(file)
            for name in handle.keys():
                if name in self._file_of:
                    raise ValueError(f"{self.directory}: tensor {name} is in both {self._file_of[name]} and {file}")
                self._file_of[name] = file
        if weight_map is not None:
            self._check_index(weight_map)

    def _shard_files(self) -> tuple[list[str], dict[str, str] | None]:
        """The shard file names, and the index's tensor -> shard map where there is an index."""
        index = self.directory / INDEX_FILE
        if not index.is_file():
            files = sorted(path.name for path in self.directory.glob("*.safetensors"))
            if not files:
                raise ValueError(f"{self.directory} holds no *.safetensors files")
            return files, None
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"{index} is not a safetensors index (no weight_map): {error}") from error
        files = sorted(set(weight_map.values()))
        missing = [file for file in files if not (self.directory / file).is_file()]
        if missing:
            raise ValueError(f"{self.directory}: shards listed in {INDEX_FILE} are missing: {missing}")
        return files, weight_map

    def _check_index(self, weight_map: dict[str, str]) -> None:
        wrong = [f"{name} (index: {file}, found: {self._file_of.get(name)})" for name, file in weight_map.items()
                 if self._file_of.get(name) != file]
        if wrong:
            raise ValueError(f"{self.directory}: {INDEX_FILE} does not match its shards: {wrong[:8]}")

    def _open(self, file: str):
        try:
            handle = safe_open(str(self.directory / file), "pt")
        except (SafetensorError, OSError) as error:
            raise ValueError(f"shard {self.directory / file} cannot be read (truncated or not safetensors?): {error}"
                             ) from error
        self._handles[file] = handle
        return handle

    def names(self) -> set[str]:
        return set(self._file_of)

    def file_of(self, name: str) -> str:
        return self._file_of[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self._file_of[name]].get_slice(name).get_shape())

    def read(self, name: str, rows: range | None = None) -> Tensor:
        """Tensor ``name``, or only its rows ``rows`` (of dim 0)."""
        handle = self._handles[self._file_of[name]]
        if rows is None:
            return handle.get_tensor(name)
        return handle.get_slice(name)[rows.start:rows.stop]
