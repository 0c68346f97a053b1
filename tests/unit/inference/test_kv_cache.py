"""MoETransformer with a KVCache computes the full-sequence logits, chunk by chunk, padded or not."""

import pytest
import torch

from moe_lightning.models import KVCache
from tests.unit.inference.conftest import tiny_model


@torch.no_grad()
def test_prefill_then_single_tokens_match_the_full_forward(model):
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    full = model(ids).logits
    cache = KVCache.for_model(model, batch_size=2, max_len=16)
    pieces = [model(ids[:, :5], cache=cache).logits]
    pieces += [model(ids[:, t : t + 1], cache=cache).logits for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.length == 12


@torch.no_grad()
def test_left_padded_rows_match_each_row_alone(model):
    gen = torch.Generator().manual_seed(2)
    rows = [torch.randint(0, 64, (n,), generator=gen) for n in (9, 4, 1)]
    ids = torch.stack([torch.cat([torch.full((9 - len(r),), 7), r]) for r in rows])
    mask = torch.stack([torch.arange(9) >= 9 - len(r) for r in rows])
    cache = KVCache.for_model(model, batch_size=3, max_len=10)
    prefill = model(ids, padding_mask=mask, cache=cache).logits
    step = model(torch.tensor([[3], [5], [11]]), cache=cache).logits
    for i, row in enumerate(rows):
        alone = model(torch.cat([row, torch.tensor([[3], [5], [11]][i])])[None]).logits[0]
        torch.testing.assert_close(prefill[i, 9 - len(row) :], alone[:-1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(step[i, 0], alone[-1], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_explicit_positions_per_row_equal_the_default():
    model = tiny_model()
    ids = torch.randint(0, 64, (2, 6))
    default = model(ids).logits
    torch.testing.assert_close(model(ids, positions=torch.arange(6)).logits, default)
    torch.testing.assert_close(model(ids, positions=torch.arange(6).expand(2, 6)).logits, default)
    with pytest.raises(ValueError, match=r"positions must have shape \(6,\) or \(2, 6\), got \(5,\)"):
        model(ids, positions=torch.arange(5))


def test_cache_refuses_overflow_and_a_different_batch(model):
    cache = KVCache.for_model(model, batch_size=2, max_len=4)
    model(torch.zeros(2, 3, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match=r"3 slots used \+ 2 new tokens > max_len=4"):
        model(torch.zeros(2, 2, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="batch_size=2 rows, got a batch of 3"):
        model(torch.zeros(3, 1, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="max_len must be >= 1, got max_len=0"):
        KVCache(1, 1, 1, 2, max_len=0)


def test_cache_buffers_follow_the_model_dtype_and_config():
    model = tiny_model().to(torch.bfloat16)
    cache = KVCache.for_model(model, batch_size=3, max_len=7)
    assert len(cache.k_BGSDh) == 3
    assert cache.k_BGSDh[0].shape == (3, 2, 7, 8) and cache.k_BGSDh[0].dtype == torch.bfloat16
