"""Expert formats by name: ``bf16`` (kept in floats), or a :class:`QuantizationConfig` spelled ``MODE[-bBLOCK][-dq]``.

``int8`` is LLM.int8; ``nf4`` / ``fp4`` are 4-bit blocks of 64 weights; ``-b32`` .. ``-b4096`` picks another block
size and ``-dq`` turns on double quantisation of the absmax scales (4-bit only): ``nf4-b32-dq`` is NF4 in blocks of 32
with 8-bit scales. A serving plan (:mod:`moe_lightning.inference.plan`) names each expert's format this way.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from moe_lightning.inference.quantization.config import MODES, QuantizationConfig

FLOAT_FORMAT = "bf16"
"""The expert kept unquantised, in bfloat16."""
_FORMAT_NAME = re.compile(r"(?P<mode>[a-z0-9]+)(?:-b(?P<blocksize>\d+))?(?P<dq>-dq)?")


def format_config(name: str) -> QuantizationConfig | None:
    """The config a format name stands for; None for :data:`FLOAT_FORMAT`."""
    if name == FLOAT_FORMAT:
        return None
    match = _FORMAT_NAME.fullmatch(name) if isinstance(name, str) else None
    if match is None or match["mode"] not in MODES:
        raise ValueError(
            f"unknown expert format {name!r}: expected {FLOAT_FORMAT!r} or MODE[-bBLOCKSIZE][-dq] with MODE one of "
            f"{MODES}, e.g. 'nf4', 'nf4-b32-dq', 'int8'"
        )
    blocksize = None if match["blocksize"] is None else int(match["blocksize"])
    try:
        return QuantizationConfig(match["mode"], blocksize=blocksize, double_quant=match["dq"] is not None)
    except ValueError as error:
        raise ValueError(f"expert format {name!r}: {error}") from None


def format_configs(names: Iterable[str]) -> dict[str, QuantizationConfig | None]:
    """``{name: format_config(name)}`` of the distinct names, in order of first appearance."""
    return {name: format_config(name) for name in dict.fromkeys(names)}
