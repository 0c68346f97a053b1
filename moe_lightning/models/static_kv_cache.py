"""StaticKVCache: a :class:`KVCache` whose forward calls never change shape, for compiled and CUDA-graph decoding.

:class:`KVCache` slices its buffers to the slots filled so far, so every decode step has a new attention shape
and reads its position from a Python int. Here the next slot lives in a device tensor, keys and values are
written with ``index_copy_`` and attention always spans all S slots (unfilled ones are masked). A decode step
therefore has the same shapes and tensor addresses every time: it compiles once and replays as one CUDA graph.
The price is attention over all S slots at every step, which is small next to the expert weights a step reads.

Shape legend: B batch, G key/value heads, S cache slots (``max_len``), Dh key head dim, Dv value head dim, L tokens
of one forward call.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe_lightning.models.kv_cache import KVCache


class StaticKVCache(KVCache):
    """A :class:`KVCache` with device-side slot bookkeeping and full-length attention (same arguments).

    Unlike :class:`KVCache`, :meth:`extend` does not check that the tokens fit: the check would have to read the
    device-side slot counter on the host, which a captured step cannot do. Whoever drives the cache sizes it for
    the whole generation first (as :class:`moe_lightning.inference.CompiledDecoder` does).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        device = self.key_mask_BS.device
        self.next_slot = torch.zeros((), dtype=torch.long, device=device)
        """The first free slot, on the device (``length``'s device-side twin)."""
        self._slots_L = torch.zeros(0, dtype=torch.long, device=device)
        self._slots_S = torch.arange(self.max_len, device=device)

    def reset(self) -> None:
        """Forget every token (buffers keep their addresses, so captured graphs stay valid)."""
        self.key_mask_BS.zero_()
        self.num_real_B.zero_()
        self.next_slot.zero_()

    @property
    def length(self) -> int:
        """Slots filled so far (reads the device counter: host code only)."""
        return int(self.next_slot)

    def extend(self, padding_mask_BL: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`KVCache.extend`, except that the mask spans all S slots (``attn_mask_B1LS`` has S columns)."""
        mask_BL = self._checked_mask(padding_mask_BL)
        slots_L = self.next_slot + torch.arange(mask_BL.shape[1], device=mask_BL.device)
        self.key_mask_BS.index_copy_(1, slots_L, mask_BL)
        positions_BL, attn_mask_B1LS = self._positions_and_attention(mask_BL, self.key_mask_BS, self._slots_S, slots_L)
        self.next_slot.add_(mask_BL.shape[1])
        self._slots_L = slots_L
        return positions_BL, attn_mask_B1LS

    def update(self, layer_idx: int, k_BGLDh: Tensor, v_BGLDv: Tensor) -> tuple[Tensor, Tensor]:
        """Store one layer's keys and values at the slots of the last :meth:`extend`; return all S slots."""
        self.k_BGSDh[layer_idx].index_copy_(2, self._slots_L, k_BGLDh.to(self.k_BGSDh[layer_idx].dtype))
        self.v_BGSDv[layer_idx].index_copy_(2, self._slots_L, v_BGLDv.to(self.v_BGSDv[layer_idx].dtype))
        return self.k_BGSDh[layer_idx], self.v_BGSDv[layer_idx]
