"""StatsTail: follows ``router_stats.jsonl`` (or ``alarms.jsonl``) as training appends to it, reading only what is
new."""

from __future__ import annotations

from pathlib import Path

from moe_lightning.analytics.report import STATS_FILE, find_one, parse_records

ALARMS_FILE = "alarms.jsonl"
"""What :class:`RoutingAlarms` appends a line to for each fired alarm."""


class StatsTail:
    """The records of the newest ``filename`` (JSON lines) under ``run_dir``, kept up to date by :meth:`poll`.

    The file may not exist yet (the dashboard can start before training): each poll looks for it until it appears.
    A line still being written is left for the next poll. When the file shrinks or vanishes (a run was deleted or
    restarted in place), everything is read again from the start and :attr:`generation` goes up, so that readers
    holding a cursor into :attr:`records` know to start over.
    """

    def __init__(self, run_dir: str | Path, filename: str = STATS_FILE) -> None:
        self.run_dir = Path(run_dir)
        if not self.run_dir.is_dir():
            raise ValueError(f"RUN_DIR {str(run_dir)!r} is not a directory: pass the log dir of a run (e.g. runs/moe)")
        self.filename = filename
        self.path: Path | None = None
        self.records: list[dict] = []
        self.generation = 0
        self._offset = 0

    def poll(self) -> list[dict]:
        """Read the lines completed since the last poll; return their records (also added to :attr:`records`)."""
        if self.path is None:
            self.path = find_one(self.run_dir, self.filename)
            if self.path is None:
                return []
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            size = -1
        if size < self._offset:
            self._start_over()
            return []
        if size == self._offset:
            return []
        with self.path.open("rb") as file:
            file.seek(self._offset)
            chunk = file.read(size - self._offset)
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self._offset += len(complete)
        new = parse_records(complete.decode())
        self.records.extend(new)
        return new

    def _start_over(self) -> None:
        self.path = None
        self.records = []
        self.generation += 1
        self._offset = 0


class TailCursor:
    """One reader's place in a :class:`StatsTail` (e.g. a WebSocket's): :meth:`take` tells whether the file started
    over since the last call, and returns the records not taken yet (all of them after a start over)."""

    def __init__(self, tail: StatsTail) -> None:
        self.tail = tail
        self._generation: int | None = None
        self._taken = 0

    def take(self) -> tuple[bool, list[dict]]:
        reset = self._generation != self.tail.generation
        if reset:
            self._generation, self._taken = self.tail.generation, 0
        new = self.tail.records[self._taken:]
        self._taken += len(new)
        return reset, new
