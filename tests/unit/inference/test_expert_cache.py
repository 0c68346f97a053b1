"""Expert cache and offload: cached == resident (forward and greedy generation), eviction order and stats by hand,
hot experts from training statistics, the disk store, and the errors."""

import functools
import json

import pytest
import torch

from moe_lightning.analytics.counts import RoutingCounts
from moe_lightning.experts.grouped import GroupedExperts
from moe_lightning.inference import generate
from moe_lightning.inference.offload import hot_experts_from_stats, offload_experts
from moe_lightning.inference.offload.cache import CacheStats, ExpertCache
from moe_lightning.inference.offload.cached_experts import CachedExperts
from moe_lightning.inference.offload.store import (
    DiskExpertStore,
    HostExpertStore,
    load_expert_stores,
    save_expert_stores,
)
from moe_lightning.layer import MoELayer
from moe_lightning.routing import HashRouter, TopKRouter
from tests.unit.inference.conftest import tiny_model

PROMPTS = [[5, 17, 3, 42, 8, 1, 9], [33], [2, 60, 12, 7]]
# tiny_model: 3 blocks, the first dense, so 2 MoE layers of 4 experts, top-2.


def resident_outputs(**model_overrides):
    """Logits of a fixed batch and greedy tokens of PROMPTS from the resident tiny model (computed once per config)."""
    return _resident_outputs(tuple(sorted(model_overrides.items())))


@functools.cache
def _resident_outputs(model_overrides):
    model = tiny_model(**dict(model_overrides))
    ids = torch.randint(0, 64, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(ids).logits
    return ids, logits, generate(model, PROMPTS, max_new_tokens=8)


def small_store(num_experts=4, dim=2, hidden=2):
    """fp32 experts of D=2, F=2 (SwiGLU, H=4): one expert is (2*4 + 2*2) * 4 = 48 bytes."""
    torch.manual_seed(0)
    return HostExpertStore(torch.randn(num_experts, dim, 2 * hidden), torch.randn(num_experts, hidden, dim), pin=False)


EXPERT_BYTES = 48


# ---- cached == resident ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        dict(capacity=2, policy="lru"),
        dict(capacity=2, policy="lfu"),
        dict(capacity=1, policy="lru"),  # every multi-expert forward runs in chunks
        dict(capacity=0.75, policy="lfu", pin=[[2], [0]]),
        dict(capacity=2, prefetch=True),
        dict(capacity=4, policy="lru", pin=[[0, 1, 2, 3], []]),
    ],
    ids=["lru", "lfu", "one-slot", "pinned", "prefetch", "all-resident"],
)
def test_cached_model_equals_resident_model_forward_and_greedy(options):
    ids, want_logits, want_tokens = resident_outputs()
    model = tiny_model()
    handle = offload_experts(model, **options)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want_logits)
    assert generate(model, PROMPTS, max_new_tokens=8) == want_tokens
    stats = handle.stats()
    assert stats.total.accesses > 0 and stats.bytes_loaded > 0
    if options.get("prefetch"):
        assert stats.total.prefetch_loads > 0 and stats.prefetch_hits > 0


def test_disk_store_model_equals_resident_model_and_reloads_from_the_directory(tmp_path):
    ids, want_logits, want_tokens = resident_outputs()
    model = tiny_model()
    offload_experts(model, capacity=2, store=tmp_path / "experts", prefetch=True)
    assert sorted(p.name for p in (tmp_path / "experts" / "layer-001").iterdir())[:2] == [
        "expert-00000.safetensors", "expert-00001.safetensors"
    ]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want_logits)
    assert generate(model, PROMPTS, max_new_tokens=8) == want_tokens

    again = tiny_model()  # serve the written directory as is
    offload_experts(again, capacity=1, policy="lfu", store=load_expert_stores(tmp_path / "experts"))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, want_logits)


@pytest.mark.parametrize(
    "overrides",
    [dict(activation="gelu"), dict(experts_implementation="loop"), dict(num_shared_experts=1)],
    ids=["gelu", "loop", "shared"],
)
def test_other_expert_configurations_stay_identical(overrides):
    ids, want_logits, want_tokens = resident_outputs(**overrides)
    model = tiny_model(**overrides)
    offload_experts(model, capacity=1, prefetch=True)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want_logits)
    assert generate(model, PROMPTS, max_new_tokens=8) == want_tokens


def test_bf16_model_on_cpu_stays_identical():
    model = tiny_model().bfloat16()
    ids = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        want = model(ids).logits
        offload_experts(model, capacity=2, policy="lfu", prefetch=True)
        assert torch.equal(model(ids).logits, want)


def test_hash_router_prefetch_uses_the_token_ids_and_predicts_exactly():
    router = functools.partial(HashRouter, num_experts_per_token=2)
    want_tokens = resident_outputs(router=router)[2]
    model = tiny_model(router=router)
    handle = offload_experts(model, capacity=2, prefetch=True)
    assert generate(model, PROMPTS, max_new_tokens=8) == want_tokens
    second = handle.stats().per_layer[1]
    # Hash routing depends on the token id alone, so the prediction is exact: every prefetch is used.
    assert second.prefetch_unused == 0 and second.prefetch_hits == second.prefetch_loads > 0


@pytest.mark.parametrize("implementation", ["grouped_mm", "loop"])
@pytest.mark.parametrize("capacity", [1, 2, 3, 5])
def test_cached_experts_equal_grouped_experts_for_any_counts(implementation, capacity):
    torch.manual_seed(0)
    experts = GroupedExperts(5, 8, 16, implementation=implementation, init_std=0.5)
    cached = CachedExperts.from_grouped(experts, capacity=capacity, policy="lru")
    for counts in ([3, 0, 2, 0, 4], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1], [0, 6, 0, 0, 0], [2, 0, 0, 3, 1]):
        tokens_per_expert_E = torch.tensor(counts)
        x_ND = torch.randn(sum(counts), 8)
        with torch.no_grad():
            assert torch.equal(cached(x_ND, tokens_per_expert_E), experts(x_ND, tokens_per_expert_E))


def test_offloaded_model_holds_no_expert_weights_and_reports_per_layer_stats():
    model = tiny_model()
    handle = offload_experts(model, capacity=2)
    assert not any(".experts." in key for key in model.state_dict())
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3, 4]]))
    stats = handle.stats()
    assert stats.layer_names == ["blocks.1.ffn", "blocks.2.ffn"]
    assert stats.total == stats.per_layer[0] + stats.per_layer[1]
    assert stats.as_dict()["layers"]["blocks.2.ffn"]["hits"] == stats.per_layer[1].hits
    handle.reset_stats()
    assert handle.stats().total == CacheStats()


# ---- policy and stats by hand -------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy, evicted", [("lru", 0), ("lfu", 1)])
def test_policy_victim_on_a_hand_computed_sequence(policy, evicted):
    cache = ExpertCache(small_store(), capacity=2, policy=policy)
    for expert in (0, 0, 1):
        cache.slots_for([expert])
    # LRU: 0 was used at t=2, 1 at t=3 -> evict 0. LFU: 0 used twice, 1 once -> evict 1.
    cache.slots_for([2])
    assert sorted(cache.resident) == sorted({0, 1, 2} - {evicted})
    assert cache.resident[2] == (0 if evicted == 0 else 1)  # the victim's slot is reused


def test_lfu_remembers_frequency_across_evictions_and_breaks_ties_by_recency():
    cache = ExpertCache(small_store(), capacity=2, policy="lfu")
    for request in ([0], [0], [0], [1], [2]):  # [2] evicts 1 (used once; 0 three times)
        cache.slots_for(request)
    assert sorted(cache.resident) == [0, 2]
    cache.slots_for([1])  # 1 comes back with 2 uses and evicts 2 (1 use)
    cache.slots_for([3])  # evicts 1 (2 uses < 3)
    assert sorted(cache.resident) == [0, 3]
    cache.slots_for([2])  # 2 now has 2 uses; evicts 3 (1 use)
    cache.slots_for([1])  # 1 now has 3 uses; evicts 2 (2 < 3)
    assert sorted(cache.resident) == [0, 1]

    ties = ExpertCache(small_store(), capacity=2, policy="lfu")
    for request in ([1], [0], [2]):  # 1 and 0 both used once: the older one, 1, goes
        ties.slots_for(request)
    assert sorted(ties.resident) == [0, 2]


def test_pinned_experts_are_loaded_up_front_and_never_evicted():
    cache = ExpertCache(small_store(), capacity=2, policy="lru", pinned=[3])
    assert cache.resident == {3: 0}
    assert cache.stats == CacheStats(bytes_loaded=EXPERT_BYTES, load_seconds=cache.stats.load_seconds)
    for expert in (0, 1, 2, 0):
        cache.slots_for([expert])
        assert 3 in cache.resident
    stats = cache.stats
    assert (stats.hits, stats.misses, stats.evictions) == (0, 4, 3)
    cache.slots_for([3, 0])
    assert cache.stats.hits == 2


def test_stats_counted_by_hand_on_a_known_sequence():
    cache = ExpertCache(small_store(), capacity=2, policy="lru")
    assert cache.stats == CacheStats()
    cache.slots_for([0, 1])  # 2 misses
    cache.slots_for([1])  # hit
    cache.slots_for([2])  # miss, evicts 0 (least recent)
    cache.slots_for([0, 2])  # hit 2, miss 0, evicts 1
    stats = cache.stats
    assert (stats.hits, stats.misses, stats.evictions) == (2, 4, 2)
    assert stats.bytes_loaded == 4 * EXPERT_BYTES
    assert stats.hit_rate == pytest.approx(2 / 6)
    assert stats.load_seconds > 0
    assert sorted(cache.resident) == [0, 2]


def test_slots_hold_the_store_weights():
    store = small_store()
    cache = ExpertCache(store, capacity=3)
    for expert, slot in zip([2, 0], cache.slots_for([2, 0])):
        assert torch.equal(cache.w_in_SDH[slot], store.w_in_EDH[expert])
        assert torch.equal(cache.w_down_SFD[slot], store.w_down_EFD[expert])


def test_prefetch_hits_and_unused_prefetches():
    cache = ExpertCache(small_store(), capacity=2, policy="lru")
    assert cache.prefetch([1, 2, 3]) == [1, 2]  # only two free slots
    cache.slots_for([1])  # a prefetch hit
    cache.slots_for([0])  # evicts 2 (prefetched at t=2, 1 used at t=3): an unused prefetch
    stats = cache.stats
    assert (stats.prefetch_loads, stats.prefetch_hits, stats.prefetch_unused) == (2, 1, 1)
    assert (stats.hits, stats.misses, stats.evictions) == (1, 1, 1)
    assert stats.bytes_loaded == 3 * EXPERT_BYTES
    cache.slots_for([1])
    assert cache.stats.prefetch_hits == 1  # only the first use of a prefetched expert counts


def test_plan_splits_a_request_larger_than_the_cache():
    cache = ExpertCache(small_store(num_experts=6), capacity=3, policy="lru", pinned=[5])
    cache.slots_for([1])
    # free slots: 2; resident unpinned 1 takes one, so the first chunk adds one missing expert.
    assert cache.plan([0, 1, 2, 3, 4, 5]) == [[0, 1, 5], [2, 3], [4]]
    assert cache.plan([1, 5]) == [[1, 5]]
    assert cache.plan([]) == []


def test_capacity_fraction_rounds_up_and_large_counts_clamp():
    assert ExpertCache(small_store(), capacity=0.3).capacity == 2
    assert ExpertCache(small_store(), capacity=1.0).capacity == 4
    assert ExpertCache(small_store(), capacity=9).capacity == 4


# ---- disk store ---------------------------------------------------------------------------------------------------


def test_disk_store_reads_one_expert_file(tmp_path):
    store = small_store()
    disk = DiskExpertStore.write(tmp_path / "layer", store.w_in_EDH, store.w_down_EFD, pin=False)
    (tmp_path / "layer" / "expert-00001.safetensors").unlink()  # reading expert 2 must not need expert 1's file
    w_in_DH, w_down_FD = disk.get(2)
    assert torch.equal(w_in_DH, store.w_in_EDH[2]) and torch.equal(w_down_FD, store.w_down_EFD[2])
    assert disk.expert_nbytes == EXPERT_BYTES
    with pytest.raises(FileNotFoundError):
        disk.get(1)


def test_save_expert_stores_refuses_a_foreign_directory_and_rewrites_its_own(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="non-empty directory"):
        save_expert_stores(tiny_model(), tmp_path)
    root = tmp_path / "store"
    save_expert_stores(tiny_model(), root)
    stores = save_expert_stores(tiny_model(), root)
    assert len(stores) == 2 and stores[0].num_experts == 4


# ---- hot experts --------------------------------------------------------------------------------------------------


def write_stats(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def stats_record(step, loads):
    return {"step": step, "layers": [{"layer": i, "load": load, "max_mean": 1.0} for i, load in enumerate(loads)]}


def test_hot_experts_from_a_hand_written_stats_file(tmp_path):
    path = write_stats(tmp_path / "router_stats.jsonl", [
        stats_record(50, [[1, 5, 0, 2], [3, 3, 0, 1]]),
        stats_record(100, [[1, 0, 0, 6], [0, 0, 4, 1]]),
    ])
    # Sums: layer 0 [2, 5, 0, 8]; layer 1 [3, 3, 4, 2] (ties broken by lower id).
    assert hot_experts_from_stats(path, 2) == [[3, 1], [2, 0]]
    assert hot_experts_from_stats(path, 0.25, model=tiny_model()) == [[3], [2]]
    assert hot_experts_from_stats(path, 1, last_n=1) == [[3], [2]]
    assert hot_experts_from_stats(path, 0) == [[], []]


def test_hot_experts_from_routing_counts_pin_an_offload():
    counts = RoutingCounts.zeros(2, 4)
    counts.load_LE += torch.tensor([[0.0, 9, 1, 2], [7, 0, 0, 8]])
    pin = hot_experts_from_stats(counts, 1, model=tiny_model())
    assert pin == [[1], [3]]
    ids, want_logits, _ = resident_outputs()
    model = tiny_model()
    handle = offload_experts(model, capacity=2, pin=pin)
    assert [cache.pinned for cache in handle.caches] == [(1,), (3,)]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want_logits)


def test_hot_experts_refuse_stats_of_another_model(tmp_path):
    three_layers = write_stats(tmp_path / "a.jsonl", [stats_record(1, [[1, 2, 3, 4]] * 3)])
    with pytest.raises(ValueError, match="statistics for 3 MoE layers, the model has 2 MoE layers"):
        hot_experts_from_stats(three_layers, 1, model=tiny_model())
    eight_experts = write_stats(tmp_path / "b.jsonl", [stats_record(1, [[1] * 8, [1] * 8])])
    with pytest.raises(ValueError, match="8 experts for MoE layer 0, the model's 'blocks.1.ffn' has 4"):
        hot_experts_from_stats(eight_experts, 1, model=tiny_model())
    changing = write_stats(tmp_path / "c.jsonl", [stats_record(1, [[1, 2]]), stats_record(2, [[1, 2, 3]])])
    with pytest.raises(ValueError, match="line 2 has experts per layer \\[3\\], line 1 \\[2\\]"):
        hot_experts_from_stats(changing, 1)
    (tmp_path / "d.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(ValueError, match="line 1 is not a router statistics record"):
        hot_experts_from_stats(tmp_path / "d.jsonl", 1)
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="holds no router statistics records"):
        hot_experts_from_stats(tmp_path / "e.jsonl", 1)
    with pytest.raises(ValueError, match="fraction_or_count must be in \\[0, 4\\]"):
        hot_experts_from_stats(RoutingCounts.zeros(2, 4), 5)


# ---- errors -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, error, message",
    [
        (dict(capacity=0), ValueError, "capacity must be >= 1 slot, got capacity=0"),
        (dict(capacity=1.5), ValueError, "capacity as a fraction must be in \\(0, 1\\], got .*capacity=1.5"),
        (dict(capacity=True), TypeError, "capacity=True"),
        (dict(capacity=2, policy="fifo"), ValueError, "policy must be one of \\('lru', 'lfu'\\), got policy='fifo'"),
        (dict(capacity=2, pin=[[0, 1], []]), ValueError, "2 pinned experts \\[0, 1\\] leave no slot for the other 2"),
        (dict(capacity=2, pin=[[7], []]), ValueError, "pinned experts \\[7\\] are outside \\[0, num_experts=4\\)"),
        (dict(capacity=2, pin=[[1]]), ValueError, "pin has 1 lists of experts, the model has 2 MoE layers"),
        (dict(capacity=2, pin={5: [0]}), ValueError, "pin has keys \\[5\\]"),
        (dict(capacity=2, store=[small_store()] * 2), ValueError, "MoE layer 0: the expert store has"),
        (dict(capacity=2, store=42), TypeError, "store must be 'cpu', a directory path or one ExpertStore"),
    ],
)
def test_offload_refuses_bad_arguments_before_touching_the_model(options, error, message):
    model = tiny_model()
    with pytest.raises(error, match=message):
        offload_experts(model, **options)
    assert all(isinstance(layer.experts, GroupedExperts) for layer in model.moe_layers)


def test_offload_refuses_twice_and_models_without_moe_layers():
    model = tiny_model()
    offload_experts(model, capacity=2)
    with pytest.raises(ValueError, match="'blocks.1.ffn' is already offloaded"):
        offload_experts(model, capacity=2)
    with pytest.raises(ValueError, match="Linear holds no MoELayer"):
        offload_experts(torch.nn.Linear(2, 2), capacity=1)


def test_prefetch_needs_transformer_shaped_blocks_but_plain_offload_does_not():
    layer = MoELayer(TopKRouter(8, 4), GroupedExperts(4, 8, 16))
    with pytest.raises(ValueError, match="prefetch needs every MoELayer held as `.ffn`"):
        offload_experts(torch.nn.Sequential(layer), capacity=2, prefetch=True)
    x = torch.randn(5, 8)
    with torch.no_grad():
        want, _ = layer(x)
        offload_experts(torch.nn.Sequential(layer), capacity=2)
        got, _ = layer(x)
    assert torch.equal(got, want)


def test_cache_requests_are_checked():
    cache = ExpertCache(small_store(), capacity=2)
    with pytest.raises(ValueError, match="3 unpinned experts \\[0, 1, 2\\] do not fit the 2 free slots"):
        cache.slots_for([0, 1, 2])
    with pytest.raises(ValueError, match="experts must be distinct, got \\[1, 1\\]"):
        cache.slots_for([1, 1])
    with pytest.raises(ValueError, match="experts \\[4\\] are outside \\[0, num_experts=4\\)"):
        cache.plan([4])
    with pytest.raises(ValueError, match="tokens_per_expert_E must have shape \\(4,\\)"):
        CachedExperts(cache)(torch.randn(2, 2), torch.tensor([1, 1]))
