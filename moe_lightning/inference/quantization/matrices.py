"""QuantizedMatrices: a stack of E same-shaped weight matrices, each quantised on its own with bitsandbytes.

The quantised experts hold two stacks (one matrix per expert and projection) and a quantised linear layer holds
a stack of one. Every part of the quantisation state is a plain buffer stacked over E, so ``state_dict``,
safetensors, ``.to(device)`` and expert slicing need nothing bitsandbytes-specific; the bitsandbytes
``QuantState`` (4-bit) or ``MatmulLtState`` (int8) of one matrix is a view assembled per call.

Shape legend: E matrices, N rows (output features), K columns (input features), M input rows,
P packed bytes per matrix (two 4-bit codes per byte), B absmax blocks per matrix, C second-level absmax blocks
per matrix (double quantisation), Q 4-bit code values (16), S 8-bit code values of the absmax (256).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

from moe_lightning.inference.quantization.config import QuantizationConfig

NESTED_BLOCKSIZE = 256
"""Block size bitsandbytes uses for the second-level (double) quantisation of the absmax scales."""


def import_bitsandbytes() -> ModuleType:
    """bitsandbytes, or a ``ModuleNotFoundError`` saying how to install it."""
    try:
        import bitsandbytes
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            "quantised weights need bitsandbytes: pip install 'moe-lightning[quant]'", name=error.name
        ) from error
    return bitsandbytes


class QuantizedMatrices(nn.Module):
    """E weight matrices ``[N, K]`` (``nn.Linear``'s ``out_features x in_features`` layout), quantised per matrix.

    Built empty (zeros, the right shapes for ``config``) so a saved state can be loaded into it; filled from float
    weights by :meth:`from_weights`. ``matmul(x_MK, e)`` is ``x_MK @ W_e.T`` through bitsandbytes
    (``matmul_4bit``, or LLM.int8's ``matmul``); :meth:`dequantize` gives ``W_e`` back as floats.

    ``.to(dtype)`` and ``.half()`` move these buffers but never recast them: the scales stay float32.

    Args:
        num_matrices: E.
        out_features: N.
        in_features: K.
        config: the quantisation format.
        device: where to allocate the buffers.
    """

    def __init__(
        self, num_matrices: int, out_features: int, in_features: int, config: QuantizationConfig,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if min(num_matrices, out_features, in_features) < 1:
            raise ValueError(
                f"num_matrices, out_features and in_features must be >= 1, got {num_matrices=}, {out_features=}, "
                f"{in_features=}"
            )
        self.num_matrices, self.out_features, self.in_features = num_matrices, out_features, in_features
        self.config = config
        E, N, K = num_matrices, out_features, in_features
        if not config.is_4bit:
            self.register_buffer("int8_ENK", torch.zeros(E, N, K, dtype=torch.int8, device=device))
            self.register_buffer("scale_EN", torch.zeros(E, N, device=device))  # bitsandbytes' SCB: each row's absmax
            return
        blocks = math.ceil(N * K / config.blocksize)
        self.register_buffer("packed_EP", torch.zeros(E, math.ceil(N * K / 2), dtype=torch.uint8, device=device))
        self.register_buffer("code_Q", torch.zeros(16, device=device))
        if config.double_quant:
            # absmax_EB holds 8-bit codes of (absmax - offset_E), scaled per NESTED_BLOCKSIZE block.
            self.register_buffer("absmax_EB", torch.zeros(E, blocks, dtype=torch.uint8, device=device))
            nested_blocks = math.ceil(blocks / NESTED_BLOCKSIZE)
            self.register_buffer("nested_absmax_EC", torch.zeros(E, nested_blocks, device=device))
            self.register_buffer("offset_E", torch.zeros(E, device=device))
            self.register_buffer("nested_code_S", torch.zeros(256, device=device))
        else:
            self.register_buffer("absmax_EB", torch.zeros(E, blocks, device=device))

    @classmethod
    def from_weights(cls, w_ENK: Tensor, config: QuantizationConfig) -> QuantizedMatrices:
        """Float matrices ``w_ENK`` (fp32, bf16 or fp16) quantised on their device."""
        if w_ENK.dim() != 3:
            raise ValueError(f"from_weights expects matrices [E, N, K], got shape {tuple(w_ENK.shape)}")
        return cls(*w_ENK.shape, config, device=w_ENK.device).quantize_(w_ENK)

    @torch.no_grad()
    def quantize_(self, w_ENK: Tensor) -> QuantizedMatrices:
        """Replace the stored matrices by ``w_ENK`` (float, ``[E, N, K]``) quantised; returns ``self``."""
        expected = (self.num_matrices, self.out_features, self.in_features)
        if tuple(w_ENK.shape) != expected or w_ENK.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(
                f"quantize_ expects float32/bfloat16/float16 matrices of shape {expected}, got {w_ENK.dtype} of shape "
                f"{tuple(w_ENK.shape)}"
            )
        functional = import_bitsandbytes().functional
        self.to(w_ENK.device)
        for e in range(self.num_matrices):
            w_NK = w_ENK[e].contiguous()
            if not self.config.is_4bit:
                # As bitsandbytes' Int8Params: row-wise absmax quantisation of the fp16 weight.
                self.int8_ENK[e], self.scale_EN[e], _ = functional.int8_vectorwise_quant(w_NK.to(torch.float16))
                continue
            packed, state = functional.quantize_4bit(
                w_NK, blocksize=self.config.blocksize, compress_statistics=self.config.double_quant,
                quant_type=self.config.mode,
            )
            self.packed_EP[e] = packed.view(-1)
            self.absmax_EB[e] = state.absmax
            self.code_Q.copy_(state.code)
            if self.config.double_quant:
                self.nested_absmax_EC[e] = state.state2.absmax
                self.offset_E[e] = state.offset
                self.nested_code_S.copy_(state.state2.code)
        return self

    def quant_state(self, e: int, shape: tuple[int, ...] | None = None) -> Any:
        """bitsandbytes' ``QuantState`` of 4-bit matrix ``e`` (views of the buffers; dequantises to float32), for the
        matrix's ``[N, K]`` shape or another ``shape`` of the same elements."""
        functional = import_bitsandbytes().functional
        nested = None
        if self.config.double_quant:
            nested = functional.QuantState(
                absmax=self.nested_absmax_EC[e], code=self.nested_code_S, blocksize=NESTED_BLOCKSIZE,
                dtype=torch.float32,
            )
        return functional.QuantState(
            absmax=self.absmax_EB[e], shape=torch.Size(shape or (self.out_features, self.in_features)), code=self.code_Q,
            blocksize=self.config.blocksize, quant_type=self.config.mode, dtype=torch.float32,
            offset=self.offset_E[e] if nested is not None else None, state2=nested,
        )

    def dequantize(self, e: int) -> Tensor:
        """Matrix ``e`` as float32 ``[N, K]``: exactly the weight the matmul uses (up to the compute dtype)."""
        functional = import_bitsandbytes().functional
        if self.config.is_4bit:
            # quantize_4bit blocks the flattened matrix; bitsandbytes' CPU dequantisation kernel (0.50) blocks each row
            # on its own when K is not a multiple of the block size. A flat shape gives the same blocks everywhere.
            flat = (self.out_features * self.in_features,)
            w_flat = functional.dequantize_4bit(self.packed_EP[e].view(-1, 1), self.quant_state(e, flat))
            return w_flat.view(self.out_features, self.in_features)
        return functional.int8_vectorwise_dequant(self.int8_ENK[e], self.scale_EN[e])

    def matmul(self, x_MK: Tensor, e: int) -> Tensor:
        """``x_MK @ W_e.T`` through bitsandbytes; ``[M, N]`` in the compute dtype (int8: float16, LLM.int8's)."""
        if x_MK.dim() != 2 or x_MK.shape[-1] != self.in_features:
            raise ValueError(f"matmul expects [M, {self.in_features}] inputs, got shape {tuple(x_MK.shape)}")
        bnb = import_bitsandbytes()
        if self.config.is_4bit:
            x_MK = x_MK.to(self.config.torch_compute_dtype or x_MK.dtype)
            if x_MK.device.type == "cpu" and self.in_features % self.config.blocksize != 0:
                return x_MK @ self.dequantize(e).to(x_MK.dtype).T  # the CPU kernel's row blocking, see dequantize()
            return bnb.matmul_4bit(x_MK, self.packed_EP[e].view(-1, 1), self.quant_state(e))
        state = bnb.MatmulLtState()
        state.CB, state.SCB = self.int8_ENK[e], self.scale_EN[e]
        state.has_fp16_weights, state.threshold, state.is_training = False, self.config.threshold, self.training
        # LLM.int8 quantises activations from fp16 (bitsandbytes casts, and warns on every call, otherwise).
        return bnb.matmul(x_MK.to(torch.float16), self.int8_ENK[e], state=state)

    def keep(self, start: int, stop: int) -> None:
        """Keep only matrices ``[start, stop)`` (expert parallelism gives each rank one slice)."""
        if not 0 <= start < stop <= self.num_matrices:
            raise ValueError(f"matrix slice [{start}, {stop}) is outside [0, {self.num_matrices})")
        for name, buffer in list(self._buffers.items()):
            if name.endswith(("_ENK", "_EN", "_EP", "_EB", "_EC", "_E")):
                self._buffers[name] = buffer[start:stop].clone()
        self.num_matrices = stop - start

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> QuantizedMatrices:
        # Module.to(dtype) would recast the float32 scales and code tables; take only the device from fn.
        for name, buffer in self._buffers.items():
            if buffer is not None:
                moved = fn(buffer)
                self._buffers[name] = moved if moved.dtype == buffer.dtype else buffer.to(moved.device)
        return self

    def extra_repr(self) -> str:
        options = ", ".join(f"{k}={v}" for k, v in self.config.as_dict().items() if v not in (None, False))
        shape = f"num_matrices={self.num_matrices}, out_features={self.out_features}, in_features={self.in_features}"
        return f"{shape}, {options}"
