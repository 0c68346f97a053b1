"""build_on_meta + materialize against the ordinary CPU build: the same tensors bit for bit, whole or per
expert-parallel rank, from the recorded initialisation or from a checkpoint."""

import functools

import pytest
import torch
from torch import nn

from moe_lightning import GroupedExperts, MoELayer
from moe_lightning.models import MoETransformer, MoETransformerConfig
from moe_lightning.models import materialize as materialize_module
from moe_lightning.models.materialize import build_on_meta, expert_rows, materialize
from moe_lightning.routing import AttentionRouter, HashRouter, TopKRouter

SMALL = dict(vocab_size=32, dim=16, num_layers=2, num_heads=2, num_experts=4, expert_hidden_dim=24)
CASES = {
    "moe": (MoETransformerConfig(**SMALL), TopKRouter),
    # Odd sizes: expert rows of 12 * 10 and 5 * 12 elements, not multiples of 16, so chunks and tails both matter.
    "odd_sizes": (MoETransformerConfig(**{**SMALL, "dim": 12, "num_heads": 3, "expert_hidden_dim": 5}), TopKRouter),
    "shared_bias_qknorm_dense": (
        MoETransformerConfig(**SMALL, num_shared_experts=1, shared_expert_gate=True, qkv_bias=True, qk_norm="head",
                             first_k_dense=1, tie_embeddings=True),
        functools.partial(TopKRouter, expert_bias=True),
    ),
    "attention_router": (MoETransformerConfig(**SMALL), AttentionRouter),  # keys from torch.randn, a random factory
    "hash_router": (MoETransformerConfig(**SMALL), HashRouter),
}


def ordinary(config, router, seed=3) -> MoETransformer:
    torch.manual_seed(seed)
    return MoETransformer(config, router)


def on_meta(config, router, seed=3):
    torch.manual_seed(seed)
    return build_on_meta(lambda: MoETransformer(config, router))


def all_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and every buffer, persistent or not (the rotary tables are not in the state_dict)."""
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    # Draws that are not kept run in chunks: make them small so that every tensor here is drawn in several.
    monkeypatch.setattr(materialize_module, "CHUNK_ELEMENTS", 48)


@pytest.mark.parametrize("case", sorted(CASES))
def test_meta_build_then_materialize_equals_the_ordinary_build(case):
    config, router = CASES[case]
    reference = ordinary(config, router)
    model, record = on_meta(config, router)
    assert all(t.is_meta for t in all_tensors(model).values())
    materialize(model, record)
    got, expected = all_tensors(model), all_tensors(reference)
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
    if config.tie_embeddings:
        assert model.head.weight is model.embed.weight


@pytest.mark.parametrize("case", ["moe", "odd_sizes", "shared_bias_qknorm_dense"])
@pytest.mark.parametrize("ep_size", [2, 4])
def test_each_rank_materializes_its_slice_of_the_ordinary_builds_experts(case, ep_size):
    config, router = CASES[case]
    reference = all_tensors(ordinary(config, router))
    pieces: dict[str, list[torch.Tensor]] = {}
    for ep_rank in range(ep_size):
        model, record = on_meta(config, router)
        materialize(model, record, ep_rank=ep_rank, ep_size=ep_size)
        local = config.num_experts // ep_size
        for layer in (m for m in model.modules() if isinstance(m, MoELayer)):
            assert layer.experts.num_experts == local and layer.router.num_experts == config.num_experts
        for name, tensor in all_tensors(model).items():
            if ".experts.w_" in name:
                assert tensor.shape[0] == local, name
                pieces.setdefault(name, []).append(tensor)
            else:
                assert torch.equal(tensor, reference[name]), name
    assert pieces
    for name, rank_pieces in pieces.items():
        assert torch.equal(torch.cat(rank_pieces), reference[name]), name


def test_materialize_casts_to_the_requested_dtype_and_device():
    config, router = CASES["moe"]
    reference = ordinary(config, router)
    model, record = on_meta(config, router)
    materialize(model, record, device="cpu", dtype=torch.bfloat16, ep_rank=1, ep_size=2)
    expert = model.blocks[0].ffn.experts.w_in_EDH
    assert expert.dtype == torch.bfloat16 and isinstance(expert, nn.Parameter)
    assert torch.equal(expert, reference.blocks[0].ffn.experts.w_in_EDH[2:].to(torch.bfloat16))
    assert torch.equal(model.embed.weight, reference.embed.weight.to(torch.bfloat16))


def test_build_on_meta_leaves_the_global_generator_alone():
    torch.manual_seed(5)
    before = torch.get_rng_state()
    model, record = build_on_meta(lambda: MoETransformer(MoETransformerConfig(**SMALL)))
    materialize(model, record)
    assert torch.equal(torch.get_rng_state(), before)


class DictSource:
    """A checkpoint held in memory, keyed by state_dict names (slices cut on request)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors
        self.loaded: list[tuple[str, range | None]] = []

    def names(self):
        return self.tensors.keys()

    def load(self, name, experts=None):
        self.loaded.append((name, experts))
        tensor = self.tensors[name]
        return tensor if experts is None else tensor[experts.start : experts.stop]


def test_a_source_provides_what_it_holds_and_the_record_the_rest():
    config, router = CASES["moe"]
    trained = ordinary(config, router, seed=11)  # other values than the record would give
    source = DictSource({name: t.detach() for name, t in trained.state_dict().items()})
    model, record = on_meta(config, router)
    materialize(model, record, source=source, ep_rank=1, ep_size=2)
    rows = expert_rows(trained, 1, 2)
    for name, tensor in trained.state_dict().items():
        expected = tensor[rows[name].start : rows[name].stop] if name in rows else tensor
        assert torch.equal(model.state_dict()[name], expected), name
    # Only this rank's experts were read; the rotary tables (not in a state_dict) came from the record.
    assert {experts for name, experts in source.loaded if name in rows} == {range(2, 4)}
    assert torch.equal(model.rope.cos_LF, trained.rope.cos_LF)


def test_without_a_record_every_tensor_must_come_from_the_source():
    config, router = CASES["moe"]
    model, _ = on_meta(config, router)
    source = DictSource({name: t for name, t in ordinary(config, router).state_dict().items() if "embed" not in name})
    with pytest.raises(ValueError, match=r"no record to initialise tensors the source lacks: \['embed.weight'"):
        materialize(model, None, source=source)
    assert source.loaded == []  # refused before reading anything
    assert model.embed.weight.is_meta


def test_source_names_the_model_lacks_are_refused_before_reading():
    config, router = CASES["moe"]
    model, record = on_meta(config, router)
    tensors = dict(ordinary(config, router).state_dict())
    tensors["blocks.9.attn.q_proj.weight"] = torch.zeros(1)
    source = DictSource(tensors)
    with pytest.raises(ValueError, match=r"tensors the model does not have: \['blocks.9.attn.q_proj.weight'\]"):
        materialize(model, record, source=source)
    assert source.loaded == []


def test_a_source_tensor_of_the_wrong_shape_is_refused():
    config, router = CASES["moe"]
    model, record = on_meta(config, router)
    tensors = dict(ordinary(config, router).state_dict())
    tensors["norm.weight"] = torch.ones(3)
    with pytest.raises(ValueError, match=r"'norm.weight' has shape \(3,\), the model needs \(16,\)"):
        materialize(model, record, source=DictSource(tensors))


def test_an_expert_count_the_ranks_do_not_divide_is_refused():
    config, router = CASES["moe"]
    model, record = on_meta(config, router)
    with pytest.raises(ValueError, match=r"expert_parallel_size=3 must divide .* num_experts=4 in 'blocks.0.ffn'"):
        materialize(model, record, ep_rank=0, ep_size=3)


def test_a_random_op_on_a_real_tensor_during_the_meta_build_is_refused():
    def build():
        model = nn.Linear(4, 4)
        model.noise = torch.randn(3, device="cpu")  # would draw out of the ordinary build's order
        return model

    with pytest.raises(ValueError, match="randn.* during build_on_meta"):
        build_on_meta(build)


class CopiedExperts(GroupedExperts):
    """Experts initialised from another tensor: no slice of them can be made without the whole source."""

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.w_in_EDH.copy_(torch.ones_like(self.w_in_EDH).cumsum(0))
            self.w_down_EFD.zero_()


def test_expert_initialisation_that_is_not_row_local_cannot_be_sliced():
    def build():
        return MoELayer(TopKRouter(8, 4), CopiedExperts(4, 8, 6))

    model, record = build_on_meta(build)
    with pytest.raises(ValueError, match=r"cannot build a slice of the experts of 'experts.w_in_EDH'.*copy_"):
        materialize(model, record, ep_rank=0, ep_size=2)
    whole, record = build_on_meta(build)
    materialize(whole, record)  # one process replays it whole
    assert torch.equal(whole.experts.w_in_EDH, torch.ones(4, 8, 12).cumsum(0))


def test_a_build_that_seeds_itself_is_refused():
    def build():
        torch.manual_seed(1)
        return nn.Linear(4, 4)

    torch.manual_seed(2)
    with pytest.raises(ValueError, match="seed before build_on_meta"):
        build_on_meta(build)
