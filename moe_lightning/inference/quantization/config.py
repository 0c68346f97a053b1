"""QuantizationConfig: how bitsandbytes stores a weight (LLM.int8, or 4-bit NF4 / FP4 blocks), validated."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import torch

Mode = Literal["int8", "nf4", "fp4"]
MODES = ("int8", "nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
"""The 4-bit block sizes bitsandbytes accepts."""
COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_BLOCKSIZE = 64
DEFAULT_THRESHOLD = 6.0
"""LLM.int8's outlier threshold (Dettmers et al. 2022), as transformers' ``llm_int8_threshold`` defaults to."""


@dataclass
class QuantizationConfig:
    """How each weight matrix is quantised. Options of the other family (4-bit vs int8) must stay unset."""

    mode: Mode = "nf4"
    """``int8``: LLM.int8 (int8 rows with one absmax scale each; activations quantised per row at run time, their
    outlier columns kept in fp16). ``nf4`` / ``fp4``: 4-bit codes in blocks of ``blocksize`` weights, one absmax per
    block (QLoRA); NF4's 16 levels are normal quantiles, FP4's a tiny float format."""
    blocksize: int | None = None
    """4-bit only: weights sharing one absmax scale, one of ``BLOCKSIZES``. None: 64."""
    double_quant: bool = False
    """4-bit only: quantise the absmax scales too (8-bit, blocks of 256), about 0.37 bit less per weight at
    blocksize 64 (QLoRA's double quantisation)."""
    compute_dtype: str | None = None
    """4-bit only: the dtype the input is cast to and the matmul runs in (``float32``, ``bfloat16``, ``float16``).
    None: the input's dtype."""
    threshold: float | None = None
    """int8 only: activations of magnitude >= threshold put their column in the fp16 outlier matmul; 0 turns the
    decomposition off. None: 6.0."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got mode={self.mode!r}")
        if self.is_4bit:
            if self.threshold is not None:
                raise ValueError(
                    f"threshold applies to mode='int8' only, got threshold={self.threshold} with mode={self.mode!r}"
                )
            self.blocksize = DEFAULT_BLOCKSIZE if self.blocksize is None else self.blocksize
            if self.blocksize not in BLOCKSIZES:
                raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got blocksize={self.blocksize}")
            if self.compute_dtype is not None and self.compute_dtype not in COMPUTE_DTYPES:
                raise ValueError(
                    f"compute_dtype must be one of {sorted(COMPUTE_DTYPES)} or None, "
                    f"got compute_dtype={self.compute_dtype!r}"
                )
            return
        set_4bit = {name: getattr(self, name) for name in ("blocksize", "compute_dtype")
                    if getattr(self, name) is not None}
        if self.double_quant:
            set_4bit["double_quant"] = True
        if set_4bit:
            raise ValueError(f"{set_4bit} apply to 4-bit modes (nf4, fp4) only, not mode='int8'")
        self.threshold = DEFAULT_THRESHOLD if self.threshold is None else float(self.threshold)
        if self.threshold < 0:
            raise ValueError(f"threshold must be >= 0, got threshold={self.threshold}")

    @property
    def is_4bit(self) -> bool:
        return self.mode != "int8"

    @property
    def torch_compute_dtype(self) -> torch.dtype | None:
        return None if self.compute_dtype is None else COMPUTE_DTYPES[self.compute_dtype]

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> QuantizationConfig:
        """The config :meth:`as_dict` wrote; unknown keys are refused by name."""
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown QuantizationConfig fields {unknown} (written by a newer moe_lightning?)")
        return cls(**values)


def as_config(mode: str | QuantizationConfig, options: dict[str, Any]) -> QuantizationConfig:
    """``mode`` with keyword ``options`` (the other fields) as a config; a ready config takes no options."""
    if isinstance(mode, QuantizationConfig):
        if options:
            raise TypeError(
                f"pass either a QuantizationConfig or a mode with options, got a config and {sorted(options)}"
            )
        return mode
    unknown = sorted(set(options) - {f.name for f in dataclasses.fields(QuantizationConfig)} - {"mode"})
    if unknown or "mode" in options:
        raise TypeError(f"unknown quantization options {unknown or ['mode']}; choose from blocksize, double_quant, "
                        "compute_dtype, threshold")
    return QuantizationConfig(mode, **options)
