"""DeepSeek-V3 against transformers' own modules: latent attention, the whole imported model, generation, export."""

import functools
import re

import pytest
import torch
from safetensors.torch import load_file

ds = pytest.importorskip("transformers.models.deepseek_v3.modeling_deepseek_v3")

from moe_lightning.inference import generate  # noqa: E402
from moe_lightning.models import MoETransformer, MoETransformerConfig  # noqa: E402
from moe_lightning.models.hf.checkpoint import load_hf_model  # noqa: E402
from moe_lightning.models.hf.deepseek_v3 import fit_problems, latent_attention_map, to_config  # noqa: E402
from moe_lightning.models.hf.export import export_hf  # noqa: E402
from moe_lightning.models.latent_attention import LatentAttention  # noqa: E402
from moe_lightning.models.transformer import RotaryEmbedding  # noqa: E402
from moe_lightning.routing import TopKRouter  # noqa: E402

# Odd sizes on purpose: rotary and position-free parts differ, values are narrower than keys, dim % heads != 0.
ATTENTION_SIZES = dict(
    hidden_size=40, num_attention_heads=3, num_key_value_heads=3, kv_lora_rank=10, qk_nope_head_dim=6,
    qk_rope_head_dim=4, v_head_dim=5, max_position_embeddings=32,
)
# 8 experts, top-3, in 4 groups of which each token keeps 2; the first layer dense; two shared experts.
MODEL_SIZES = dict(
    **ATTENTION_SIZES, vocab_size=96, num_hidden_layers=3, first_k_dense_replace=1, intermediate_size=36,
    moe_intermediate_size=12, n_routed_experts=8, num_experts_per_tok=3, n_group=4, topk_group=2,
    n_shared_experts=2, routed_scaling_factor=2.5, norm_topk_prob=True, num_nextn_predict_layers=0,
    rope_parameters={"rope_type": "default", "rope_theta": 500.0}, initializer_range=0.2, tie_word_embeddings=False,
)


def randomize(module: torch.nn.Module) -> None:
    """Every parameter and buffer away from its initial value, so each must land in the right place: norm weights
    around one, router weights and correction biases large enough that no top-k or group choice is a near-tie."""
    with torch.no_grad():
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if name.endswith("e_score_correction_bias"):
                tensor.copy_(torch.randn_like(tensor) * 0.5)
            elif name.endswith("gate.weight"):
                tensor.copy_(torch.randn_like(tensor) * 0.5)
            elif tensor.dim() == 1 and tensor.is_floating_point() and "inv_freq" not in name:
                tensor.copy_(1 + torch.randn_like(tensor) * 0.3)
            elif tensor.dim() > 1:
                tensor.copy_(torch.randn_like(tensor) * 0.3)


def hf_attention(q_lora_rank, rope_interleave):
    config = ds.DeepseekV3Config(
        **ATTENTION_SIZES, q_lora_rank=q_lora_rank, rope_interleave=rope_interleave,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0},
    )
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    attention = ds.DeepseekV3Attention(config, layer_idx=0)
    randomize(attention)
    return config, attention


def ours_from_hf(hf_tensors, config: MoETransformerConfig, rope_interleave: bool) -> dict:
    """Our LatentAttention's tensors from a DeepseekV3Attention's, through the family's tensor map."""
    attention_map = latent_attention_map("attn", "self_attn", config, rope_interleave)
    read = lambda name, rows: hf_tensors[name.removeprefix("self_attn.")]  # noqa: E731
    return {name.removeprefix("attn."): sources[0].read(read) for name, sources in attention_map.items()}


@pytest.mark.parametrize("q_lora_rank, rope_interleave", [(7, True), (None, True), (7, False)])
def test_latent_attention_matches_transformers_forward_and_backward(q_lora_rank, rope_interleave):
    config, hf = hf_attention(q_lora_rank, rope_interleave)
    ours = LatentAttention(40, 3, 10, 6, 4, 5, q_lora_rank)
    ours_config = MoETransformerConfig(
        dim=40, num_heads=3, attention="latent", q_lora_rank=q_lora_rank, kv_lora_rank=10, qk_nope_head_dim=6,
        qk_rope_head_dim=4, v_head_dim=5,
    )
    ours.load_state_dict(ours_from_hf(hf.state_dict(), ours_config, rope_interleave))
    rope = RotaryEmbedding(4, 32, 500.0)

    batch, length = 2, 9
    x = torch.randn(batch, length, 40, generator=torch.Generator().manual_seed(1))
    x_hf, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    positions = torch.arange(length)
    cos_sin = ds.DeepseekV3RotaryEmbedding(config)(x, positions[None])
    causal = torch.full((length, length), float("-inf")).triu(1).expand(batch, 1, length, length)
    expected, _ = hf(x_hf, cos_sin, causal)
    actual = ours(x_ours, rope, positions)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)

    grad = torch.randn_like(expected)
    expected.backward(grad)
    actual.backward(grad)
    torch.testing.assert_close(x_ours.grad, x_hf.grad, rtol=1e-5, atol=1e-5)
    hf_grads = {name: param.grad for name, param in hf.named_parameters()}
    ours_grads = ours_from_hf(hf_grads, ours_config, rope_interleave)
    for name, param in ours.named_parameters():
        torch.testing.assert_close(param.grad, ours_grads[name], rtol=1e-5, atol=1e-5, msg=name)


@torch.no_grad()
def test_group_limited_sigmoid_routing_matches_transformers_router():
    config = ds.DeepseekV3Config(**MODEL_SIZES)
    torch.manual_seed(0)
    hf = ds.DeepseekV3TopkRouter(config)
    randomize(hf)
    ours = TopKRouter(40, 8, 3, score_func="sigmoid", routed_scaling_factor=2.5, expert_bias=True,
                      num_expert_groups=4, num_groups_per_token=2)
    ours.gate.weight.copy_(hf.weight)
    ours.expert_bias_E.copy_(hf.e_score_correction_bias)
    x_TD = torch.randn(64, 40, generator=torch.Generator().manual_seed(5))
    _, hf_weight_TK, hf_expert_TK = hf(x_TD)
    routing = ours(x_TD)
    expected_TE = torch.zeros(64, 8).scatter_(1, hf_expert_TK, hf_weight_TK)
    actual_TE = torch.zeros(64, 8).index_put_((routing.token_idx_N, routing.expert_idx_N), routing.weight_N)
    torch.testing.assert_close(actual_TE, expected_TE, rtol=1e-6, atol=1e-6)
    # The case tells whether the bias enters the group scores: some tokens pick an expert of a group that the
    # unbiased scores (groups of 2 experts: their sum) would not have kept.
    group_score_TG = torch.sigmoid(x_TD @ hf.weight.T).view(64, 4, 2).sum(-1)
    unbiased_keep_TG = torch.zeros(64, 4, dtype=torch.bool).scatter_(1, group_score_TG.topk(2, dim=-1).indices, True)
    assert (~unbiased_keep_TG.gather(1, hf_expert_TK // 2)).any()


def saved_hf_model(directory, q_lora_rank):
    torch.manual_seed(0)
    hf = ds.DeepseekV3ForCausalLM(ds.DeepseekV3Config(**MODEL_SIZES, q_lora_rank=q_lora_rank)).eval()
    randomize(hf)
    hf.save_pretrained(directory)
    return hf


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm())


@pytest.mark.parametrize("q_lora_rank", [7, None])
@torch.no_grad()
def test_imported_model_computes_transformers_logits_and_greedy_tokens(tmp_path, q_lora_rank):
    hf = saved_hf_model(tmp_path / "hf", q_lora_rank)
    model = load_hf_model(tmp_path / "hf")
    router = model.moe_layers[0].router
    assert isinstance(router, TopKRouter) and router.score_func == "sigmoid" and router.num_expert_groups == 4
    assert len(model.moe_layers) == 2 and model.blocks[0].ffn.down_proj.in_features == 36
    ids = torch.randint(0, 96, (2, 13), generator=torch.Generator().manual_seed(3))
    expected = hf(ids).logits
    assert relative_error(model(ids).logits, expected) <= 1e-5

    hf_new = hf.generate(
        ids[:1], attention_mask=torch.ones_like(ids[:1]), max_new_tokens=10, min_new_tokens=10, do_sample=False,
        pad_token_id=0,
    )[0, 13:].tolist()
    assert generate(model, ids[:1], 10) == [hf_new]


@torch.no_grad()
def test_export_loads_in_transformers_with_the_same_logits_and_tensors(tmp_path):
    saved_hf_model(tmp_path / "hf", 7)
    model = load_hf_model(tmp_path / "hf")
    assert fit_problems(model) == []
    out = tmp_path / "out"
    export_hf(model, out)
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded).__name__ == "DeepseekV3ForCausalLM"
    ids = torch.randint(0, 96, (2, 13), generator=torch.Generator().manual_seed(4))
    assert relative_error(model(ids).logits, reloaded(ids).logits) <= 1e-5
    # The interleaved rotary rows are put back: the files hold exactly the tensors transformers saved.
    original, exported = load_file(tmp_path / "hf" / "model.safetensors"), load_file(out / "model.safetensors")
    assert original.keys() == exported.keys()
    for name, tensor in original.items():
        torch.testing.assert_close(exported[name], tensor, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 40.0,
                               "original_max_position_embeddings": 4}), "rope_type='yarn'"),
        (dict(rope_interleave=False), "rope_interleave=False"),
        (dict(num_key_value_heads=1), "num_key_value_heads=1 != num_attention_heads=3"),
        (dict(attention_bias=True), "attention_bias=True"),
        (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    ],
)
def test_unsupported_configs_are_refused_by_name_and_value(overrides, match):
    with pytest.raises(ValueError, match=match):
        to_config(ds.DeepseekV3Config(**{**MODEL_SIZES, **overrides}))


def test_quantized_configs_are_refused_by_name():
    config = ds.DeepseekV3Config(**MODEL_SIZES)
    config.quantization_config = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    with pytest.raises(ValueError, match="quantization_config="):
        to_config(config)


LATENT = dict(
    vocab_size=64, dim=40, num_layers=3, num_heads=3, num_experts=8, expert_hidden_dim=12, num_shared_experts=1,
    first_k_dense=1, attention="latent", kv_lora_rank=10, qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=5,
)
DEEPSEEK_ROUTER = functools.partial(TopKRouter, num_experts_per_token=3, score_func="sigmoid", expert_bias=True)


@pytest.mark.parametrize(
    "overrides, router, match",
    [
        (dict(attention="softmax", dim=42, kv_lora_rank=None, qk_nope_head_dim=None, qk_rope_head_dim=None,
              v_head_dim=None), DEEPSEEK_ROUTER, "attention='softmax'"),
        (dict(num_shared_experts=0), DEEPSEEK_ROUTER, "num_shared_experts=0"),
        (dict(shared_expert_gate=True), DEEPSEEK_ROUTER, "shared_expert_gate=True"),
        (dict(first_k_dense=0, moe_every=2), DEEPSEEK_ROUTER, r"MoE blocks \[0, 2\] do not all follow the dense"),
        ({}, functools.partial(DEEPSEEK_ROUTER, score_func="softmax"), "layer 0 router score_func='softmax'"),
        ({}, functools.partial(DEEPSEEK_ROUTER, expert_bias=False), "layer 1 router expert_bias=False"),
    ],
)
def test_models_outside_deepseek_v3_are_refused_naming_the_setting(overrides, router, match):
    model = MoETransformer(MoETransformerConfig(**{**LATENT, **overrides}), router=router)
    assert any(re.search(match, problem) for problem in fit_problems(model)), fit_problems(model)
