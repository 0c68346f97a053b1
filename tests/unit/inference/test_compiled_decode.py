"""StaticKVCache and CompiledDecoder against the eager KVCache path (CPU: the static-shape step without graphs)."""

import pytest
import torch

from moe_lightning.inference import CompiledDecoder, EagerDecoder, generate
from moe_lightning.models import StaticKVCache
from tests.unit.inference.conftest import tiny_model

PROMPTS = [[5, 9, 13, 2, 40], [7], [1, 2, 3]]


@torch.no_grad()
def test_static_cache_prefill_then_steps_match_the_full_forward_with_padding(model):
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, :4] = False  # row 1 is left-padded: its real tokens are ids[1, 4:]
    cache = StaticKVCache.for_model(model, batch_size=2, max_len=20)
    pieces = [model(ids[:, :6], padding_mask=mask[:, :6], cache=cache).logits]
    pieces += [model(ids[:, t : t + 1], cache=cache).logits for t in range(6, 12)]
    got = torch.cat(pieces, dim=1)
    torch.testing.assert_close(got[0], model(ids[:1]).logits[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1, 4:], model(ids[1:, 4:]).logits[0], rtol=1e-5, atol=1e-5)
    assert cache.length == 12
    cache.reset()
    assert cache.length == 0 and not cache.key_mask_BS.any()


@torch.no_grad()
def test_teacher_forced_logits_equal_the_eager_decoder(model):
    ids = torch.tensor([[0, 0, 5, 9], [3, 4, 5, 6], [0, 0, 0, 7]])
    mask = ids != 0
    eager = EagerDecoder(model).start(3, 10)
    compiled = CompiledDecoder(model).start(3, 10)  # bucket 4: one padding row
    torch.testing.assert_close(compiled.prefill(ids, mask), eager.prefill(ids, mask), rtol=1e-5, atol=1e-5)
    for token in ([1, 2, 3], [4, 5, 6], [7, 8, 9]):
        token_B, real_B = torch.tensor(token), torch.tensor([True, False, True])
        torch.testing.assert_close(compiled.step(token_B, real_B), eager.step(token_B, real_B), rtol=1e-5, atol=1e-5)


def test_generate_with_the_compiled_decoder_equals_eager(model):
    decoder = CompiledDecoder(model)
    assert generate(model, PROMPTS, 10, decoder=decoder) == generate(model, PROMPTS, 10)
    sampled = dict(temperature=0.8, top_k=20, seed=4, stop_tokens=[11])
    assert generate(model, PROMPTS, 10, decoder=decoder, **sampled) == generate(model, PROMPTS, 10, **sampled)
    # A second generation reuses the bucket's cache from a clean state.
    assert generate(model, PROMPTS[:2], 6, decoder=decoder) == generate(model, PROMPTS[:2], 6)


def test_a_newer_session_on_the_same_bucket_ends_the_older(model):
    decoder = CompiledDecoder(model)
    old = decoder.start(1, 8)
    decoder.start(1, 8)
    with pytest.raises(RuntimeError, match="ended by a newer session"):
        old.step(torch.tensor([1]), torch.tensor([True]))


@pytest.mark.slow
@torch.no_grad()
def test_torch_compiled_step_equals_eager_on_cpu():
    # bf16: the CPU grouped_mm kernel that a compiled graph uses takes bf16 only.
    torch._dynamo.reset()
    model = tiny_model().to(torch.bfloat16)
    ids = torch.tensor([[0, 5, 9], [3, 4, 5]])
    eager = EagerDecoder(model).start(2, 8)
    compiled = CompiledDecoder(model, compile=True, batch_buckets=(2,)).start(2, 8)
    torch.testing.assert_close(compiled.prefill(ids, ids != 0), eager.prefill(ids, ids != 0), rtol=2e-2, atol=2e-2)
    for token in ([1, 2], [4, 5], [7, 8]):
        token_B, real_B = torch.tensor(token), torch.tensor([True, True])
        torch.testing.assert_close(compiled.step(token_B, real_B), eager.step(token_B, real_B), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(cuda_graphs=True), ValueError, "needs the model on a CUDA device"),
        (dict(max_len=49), ValueError, r"max_len must be in \[1, max_seq_len=48\], got 49"),
        (dict(batch_buckets=()), ValueError, "batch_buckets must be positive"),
    ],
)
def test_bad_settings_are_named(model, kwargs, error, match):
    with pytest.raises(error, match=match):
        CompiledDecoder(model, **kwargs)


def test_sessions_beyond_the_decoder_are_refused(model):
    decoder = CompiledDecoder(model, max_len=16, batch_buckets=(1, 2))
    with pytest.raises(ValueError, match="batch_size=3 exceeds the largest batch bucket 2"):
        decoder.start(3, 8)
    with pytest.raises(ValueError, match="max_len=20 does not fit this decoder's max_len=16"):
        decoder.start(1, 20)
    with pytest.raises(ValueError, match="built for another model"):
        generate(tiny_model(), PROMPTS, 4, decoder=decoder)
