"""Seeded single-byte corruption of artifact files, split between safetensors headers and tensor data."""

from __future__ import annotations

import random
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def header_bytes(path: Path) -> int:
    """The length of a safetensors file's header: the 8-byte length prefix plus the JSON it announces."""
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
    return 8 + length


def seeded_flips(files: list[Path], count: int, seed: int) -> list[tuple[Path, int, int]]:
    """``count`` (file, offset, xor mask) triples: even ones in a header, odd ones in tensor data, files and
    offsets drawn from ``random.Random(seed)``; every mask is non-zero, so every flip changes a byte."""
    rng = random.Random(seed)
    flips = []
    for i in range(count):
        file = rng.choice(files)
        header, size = header_bytes(file), file.stat().st_size
        offset = rng.randrange(0, header) if i % 2 == 0 else rng.randrange(header, size)
        flips.append((file, offset, rng.randrange(1, 256)))
    return flips


@contextmanager
def flipped(file: Path, offset: int, mask: int) -> Iterator[None]:
    """``file`` with the byte at ``offset`` XOR-ed with ``mask``, restored afterwards."""
    original = file.read_bytes()
    corrupted = bytearray(original)
    corrupted[offset] ^= mask
    file.write_bytes(bytes(corrupted))
    try:
        yield
    finally:
        file.write_bytes(original)


def truncate(file: Path, keep: float = 0.5) -> None:
    """Cut ``file`` to ``keep`` of its bytes, as an interrupted copy or download leaves it."""
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * keep)])
