"""A MoETransformer exported to transformers' MixtralForCausalLM computes the same logits and greedy text."""

import functools

import pytest
import torch

pytest.importorskip("transformers.models.mixtral")

from moe_lightning.inference import generate  # noqa: E402
from moe_lightning.models import MoETransformer, MoETransformerConfig  # noqa: E402
from moe_lightning.models.hf import mixtral_from_moe_transformer  # noqa: E402
from moe_lightning.routing import TopKRouter  # noqa: E402

CONFIG = dict(
    vocab_size=64, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, num_experts=4, expert_hidden_dim=24,
    max_seq_len=32, init_std=0.2,
)


def tiny(**overrides) -> MoETransformer:
    torch.manual_seed(0)
    return MoETransformer(MoETransformerConfig(**{**CONFIG, **overrides})).eval()


@pytest.mark.parametrize("experts_implementation", ["eager", "grouped_mm"])
@torch.no_grad()
def test_logits_and_greedy_generation_match(experts_implementation):
    model = tiny()
    hf = mixtral_from_moe_transformer(model, experts_implementation).eval()
    ids = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(hf(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    hf_new = hf.generate(
        ids[:1], attention_mask=torch.ones_like(ids[:1]), max_new_tokens=8, min_new_tokens=8, do_sample=False,
        pad_token_id=0,
    )[0, 11:].tolist()
    assert generate(model, ids[:1], 8) == [hf_new]


@pytest.mark.parametrize(
    "overrides, router, match",
    [
        (dict(first_k_dense=1), None, "only 1 of 2 blocks are MoE"),
        (dict(num_shared_experts=1), None, "num_shared_experts=1"),
        ({}, functools.partial(TopKRouter, normalize_weights=False), "normalize_weights=False"),
        ({}, functools.partial(TopKRouter, score_func="sigmoid"), "score_func='sigmoid'"),
    ],
)
def test_models_outside_mixtral_are_refused_naming_the_setting(overrides, router, match):
    torch.manual_seed(0)
    model = MoETransformer(MoETransformerConfig(**{**CONFIG, **overrides}), router=router)
    with pytest.raises(ValueError, match=match):
        mixtral_from_moe_transformer(model)
