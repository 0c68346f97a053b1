"""KVCache: preallocated attention keys and values of every layer, for incremental decoding.

Shape legend: B batch, G key/value heads, S cache slots (``max_len``), Dh key head dim, Dv value head dim, L tokens
of one forward call.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class KVCache:
    """Keys and values of ``num_layers`` attention layers for ``batch_size`` rows of up to ``max_len`` tokens.

    Every forward call appends ``L`` slots to all rows at once (slot ``s`` of every row is filled by the same
    call). Rows that are shorter are left-padded: padded slots are kept out of attention as keys, and each token's
    rotary position counts only the real tokens before it in its row, so a padded row computes what the same
    tokens compute alone.

    Args:
        num_layers: attention layers (one key and one value buffer each).
        batch_size: B.
        num_kv_heads: G.
        head_dim: Dh, of the keys.
        max_len: S, the slots per row: prompt (padded) plus generated tokens.
        dtype, device: of the buffers.
        value_head_dim: Dv, of the values (latent attention's differ from its keys'); None: ``head_dim``.
    """

    def __init__(
        self, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int, max_len: int,
        dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
        value_head_dim: int | None = None,
    ) -> None:
        value_head_dim = head_dim if value_head_dim is None else value_head_dim
        for name, value in (("num_layers", num_layers), ("batch_size", batch_size), ("num_kv_heads", num_kv_heads),
                            ("head_dim", head_dim), ("value_head_dim", value_head_dim), ("max_len", max_len)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {name}={value}")
        self.k_BGSDh = [
            torch.zeros(batch_size, num_kv_heads, max_len, head_dim, dtype=dtype, device=device)
            for _ in range(num_layers)
        ]
        self.v_BGSDv = [
            torch.zeros(batch_size, num_kv_heads, max_len, value_head_dim, dtype=dtype, device=device)
            for _ in range(num_layers)
        ]
        self.key_mask_BS = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        """True for slots holding a real (not padding) token."""
        self.num_real_B = torch.zeros(batch_size, dtype=torch.long, device=device)
        """Real tokens seen so far per row: the rotary position of the row's next real token."""
        self._length = 0
        self._start = 0

    @classmethod
    def for_model(
        cls, model: nn.Module, batch_size: int, max_len: int,
        dtype: torch.dtype | None = None, device: torch.device | str | None = None,
    ) -> KVCache:
        """A cache sized for a :class:`MoETransformer`, by default in the dtype and on the device of its weights."""
        config, weight = model.config, model.embed.weight
        heads, key_dim, value_dim = config.kv_cache_dims
        return cls(
            config.num_layers, batch_size, heads, key_dim, max_len,
            dtype=dtype or weight.dtype, device=device or weight.device, value_head_dim=value_dim,
        )

    @property
    def batch_size(self) -> int:
        return self.key_mask_BS.shape[0]

    @property
    def max_len(self) -> int:
        return self.key_mask_BS.shape[1]

    @property
    def length(self) -> int:
        """Slots filled so far (the same for every row)."""
        return self._length

    def extend(self, padding_mask_BL: Tensor) -> tuple[Tensor, Tensor]:
        """Reserve the next ``L`` slots of every row for one forward call.

        ``padding_mask_BL`` is True for real tokens. Returns the new tokens' rotary ``positions_BL`` and the boolean
        ``attn_mask_B1LS`` (True: may attend) over every slot up to and including them: causal, padded keys masked.
        A padded query always sees its own slot, so no softmax row is empty (its output is never used).
        """
        mask_BL = self._checked_mask(padding_mask_BL)
        length = mask_BL.shape[1]
        if self.length + length > self.max_len:
            raise ValueError(
                f"the cache is full: {self.length} slots used + {length} new tokens > max_len={self.max_len}"
            )
        start, end = self.length, self.length + length
        self.key_mask_BS[:, start:end] = mask_BL
        device = mask_BL.device
        positions_BL, attn_mask_B1LS = self._positions_and_attention(
            mask_BL, self.key_mask_BS[:, :end], torch.arange(end, device=device), torch.arange(start, end, device=device)
        )
        self._start, self._length = start, end
        return positions_BL, attn_mask_B1LS

    def _checked_mask(self, padding_mask_BL: Tensor) -> Tensor:
        batch = padding_mask_BL.shape[0]
        if batch != self.batch_size:
            raise ValueError(f"the cache holds batch_size={self.batch_size} rows, got a batch of {batch}")
        return padding_mask_BL.to(device=self.key_mask_BS.device, dtype=torch.bool)

    def _positions_and_attention(
        self, mask_BL: Tensor, key_mask_BS: Tensor, slots_S: Tensor, query_slots_L: Tensor
    ) -> tuple[Tensor, Tensor]:
        """The new tokens' rotary positions (counting each row's real tokens) and their attention mask over
        ``slots_S`` (keys already marked in ``key_mask_BS``); counts the new real tokens."""
        positions_BL = (self.num_real_B[:, None] + mask_BL.long().cumsum(dim=1) - 1).clamp_min(0)
        self.num_real_B.add_(mask_BL.sum(dim=1))
        causal_LS = slots_S[None, :] <= query_slots_L[:, None]
        own_LS = slots_S[None, :] == query_slots_L[:, None]
        attn_mask_BLS = (key_mask_BS[:, None, :] & causal_LS) | own_LS
        return positions_BL, attn_mask_BLS[:, None]

    def update(self, layer_idx: int, k_BGLDh: Tensor, v_BGLDv: Tensor) -> tuple[Tensor, Tensor]:
        """Store one layer's keys and values of the slots reserved by the last :meth:`extend`; return the keys and
        values of every slot so far (``[B, G, length, Dh]`` and ``[B, G, length, Dv]`` views)."""
        assert k_BGLDh.shape[2] == self.length - self._start, "update() must follow extend() for the same tokens"
        self.k_BGSDh[layer_idx][:, :, self._start : self.length] = k_BGLDh
        self.v_BGSDv[layer_idx][:, :, self._start : self.length] = v_BGLDv
        return self.k_BGSDh[layer_idx][:, :, : self.length], self.v_BGSDv[layer_idx][:, :, : self.length]
