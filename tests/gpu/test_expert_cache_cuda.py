"""On the GPU: experts served from pinned host memory (or disk) through side-stream copies equal the resident model."""

import copy

import pytest
import torch

from moe_lightning.inference import generate
from moe_lightning.inference.offload import offload_experts
from tests.unit.inference.conftest import tiny_model

pytestmark = pytest.mark.gpu

PROMPTS = [[5, 17, 3, 42, 8, 1, 9], [33], [2, 60, 12, 7]]
# 8 experts, top-2, sizes that suit the bf16 grouped GEMM (multiples of 16).
SIZES = dict(num_experts=8, dim=64, expert_hidden_dim=64, num_layers=4)


def relative_error(got, want):
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


@pytest.mark.parametrize(
    "options",
    [dict(capacity=3, policy="lru"), dict(capacity=2, policy="lfu", prefetch=True), dict(capacity=0.5, prefetch=True)],
    ids=["lru", "lfu-prefetch", "half-prefetch"],
)
def test_pinned_side_stream_loads_match_the_resident_model_in_bf16(options):
    resident = tiny_model(**SIZES).cuda().bfloat16()
    offloaded = copy.deepcopy(resident)
    handle = offload_experts(offloaded, **options)
    cache = handle.caches[0]
    assert cache.store.pinned and cache.device.type == "cuda" and cache._copy_stream is not None
    # Many tokens and few slots: every forward loads, evicts and reloads in chunks while earlier compute is queued.
    ids = torch.randint(0, 64, (8, 48), device="cuda")
    with torch.no_grad():
        for _ in range(2):
            want, got = resident(ids).logits, offloaded(ids).logits
            assert relative_error(got, want) < 1e-3
    assert generate(offloaded, PROMPTS, max_new_tokens=10) == generate(resident, PROMPTS, max_new_tokens=10)
    stats = handle.stats()
    assert stats.total.misses > 0 and stats.bytes_loaded > 0 and stats.load_seconds > 0
    if options.get("prefetch"):
        assert stats.total.prefetch_loads > 0


def test_disk_store_and_fp32_loop_path_on_cuda(tmp_path):
    resident = tiny_model(**SIZES).cuda()  # fp32 on CUDA: GroupedExperts' "auto" takes the loop
    offloaded = copy.deepcopy(resident)
    handle = offload_experts(offloaded, capacity=2, store=tmp_path / "experts", prefetch=True)
    assert handle.caches[0].store.pinned
    ids = torch.randint(0, 64, (4, 32), device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(offloaded(ids).logits, resident(ids).logits, rtol=1e-5, atol=1e-5)


def test_cache_built_on_cpu_follows_the_model_to_cuda():
    resident = tiny_model(**SIZES).bfloat16()
    offloaded = copy.deepcopy(resident)
    handle = offload_experts(offloaded, capacity=2, pin=[[0], [1], [2]])
    resident.cuda()
    offloaded.cuda()
    ids = torch.randint(0, 64, (2, 16), device="cuda")
    with torch.no_grad():
        assert relative_error(offloaded(ids).logits, resident(ids).logits) < 1e-3
    assert all(cache.device.type == "cuda" and cache.is_resident(cache.pinned[0]) for cache in handle.caches)
