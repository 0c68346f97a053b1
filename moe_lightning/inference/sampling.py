"""Next-token choice from logits: greedy, or temperature sampling restricted by top-k and top-p (nucleus).

Shape legend: B batch, V vocab.
"""

from __future__ import annotations

import torch
from torch import Tensor


def next_tokens(
    logits_BV: Tensor, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One token id per row (``[B]``, int64).

    ``temperature=0`` is greedy (argmax; ``top_k`` and ``top_p`` are then moot). Otherwise the logits are divided
    by ``temperature``, only the ``top_k`` best tokens are kept (all if None or larger than V), then only the smallest
    set of best tokens whose probability reaches ``top_p`` (all if None or 1), and one token is drawn from what is
    left with ``generator``. The best token always survives both filters, so ``top_k=1`` and a tiny ``top_p`` are
    greedy.
    """
    if temperature == 0:
        return logits_BV.argmax(dim=-1)
    # Shift so the best logit is 0 first: a tiny temperature then sends the others to -inf, never to inf or NaN.
    logits_BV = logits_BV.float()
    logits_BV = (logits_BV - logits_BV.amax(dim=-1, keepdim=True)) / temperature
    if top_k is not None and top_k < logits_BV.shape[-1]:
        kth_best_B1 = logits_BV.topk(top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_best_B1, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_BV, order_BV = logits_BV.sort(dim=-1, descending=True)
        probs_BV = sorted_BV.softmax(dim=-1)
        # Drop a token when the better tokens before it already reach top_p; the best one never goes.
        drop_sorted_BV = probs_BV.cumsum(dim=-1) - probs_BV >= top_p
        drop_sorted_BV[:, 0] = False  # even when top_p rounds to 0 in float32
        drop_BV = torch.zeros_like(drop_sorted_BV).scatter(1, order_BV, drop_sorted_BV)
        logits_BV = logits_BV.masked_fill(drop_BV, float("-inf"))
    return torch.multinomial(logits_BV.softmax(dim=-1), 1, generator=generator).squeeze(1)
