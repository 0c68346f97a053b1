"""LatentAttention: incremental decoding through both caches, the rotary layout conversion, validation; an
MoETransformer built with it (config checks, greedy decoding through the eager and the compiled decoder)."""

import math

import pytest
import torch

from moe_lightning.inference import CompiledDecoder, generate
from moe_lightning.models import KVCache, MoETransformer, MoETransformerConfig, StaticKVCache
from moe_lightning.models.hf.deepseek_v3 import half_from_interleaved, permute_rotary_rows
from moe_lightning.models.latent_attention import LatentAttention
from moe_lightning.models.transformer import RotaryEmbedding

HEADS, NOPE, ROPE, VALUE = 3, 6, 4, 5


def attention(q_lora_rank=7) -> LatentAttention:
    torch.manual_seed(0)
    return LatentAttention(24, HEADS, 10, NOPE, ROPE, VALUE, q_lora_rank).eval()


@pytest.mark.parametrize("cache_class", [KVCache, StaticKVCache])
@pytest.mark.parametrize("q_lora_rank", [7, None])
@torch.no_grad()
def test_prefill_then_single_tokens_through_the_cache_match_the_full_forward(cache_class, q_lora_rank):
    module, rope = attention(q_lora_rank), RotaryEmbedding(ROPE, 16, 10000.0)
    x = torch.randn(2, 7, 24, generator=torch.Generator().manual_seed(1))
    expected = module(x, rope, torch.arange(7))
    cache = cache_class(1, 2, HEADS, NOPE + ROPE, 12, value_head_dim=VALUE)
    outputs = []
    for start, end in ((0, 4), (4, 5), (5, 6), (6, 7)):
        positions, mask = cache.extend(torch.ones(2, end - start, dtype=torch.bool))
        outputs.append(module(x[:, start:end], rope, positions, cache, 0, mask))
    torch.testing.assert_close(torch.cat(outputs, dim=1), expected, rtol=1e-5, atol=1e-6)
    assert cache.k_BGSDh[0].shape == (2, HEADS, 12, NOPE + ROPE) and cache.v_BGSDv[0].shape == (2, HEADS, 12, VALUE)


def test_interleaved_rotary_equals_rotate_half_after_the_row_permutation():
    # Interleaved rotary, written out pair by pair: pair (2i, 2i+1) turns by position * theta^(-2i / R).
    rope_dim, position, theta = 6, 5, 10000.0
    x = torch.randn(rope_dim, generator=torch.Generator().manual_seed(2))
    rotated = []
    for i in range(rope_dim // 2):
        angle = position * theta ** (-2 * i / rope_dim)
        a, b = x[2 * i].item(), x[2 * i + 1].item()
        rotated.append((a * math.cos(angle) - b * math.sin(angle), b * math.cos(angle) + a * math.sin(angle)))
    # transformers' interleaved rotary returns the first of each pair, then the second: the rotate-half order.
    expected = torch.tensor([pair[0] for pair in rotated] + [pair[1] for pair in rotated])
    rope = RotaryEmbedding(rope_dim, 8, theta)
    permuted = x[half_from_interleaved(rope_dim)]
    torch.testing.assert_close(rope(permuted.view(1, 1, 1, -1), torch.tensor([position])).flatten(), expected)


def test_permute_rotary_rows_moves_only_the_rotary_rows_of_each_group():
    rows = torch.arange(2 * 5).float()  # two groups of 5 rows, the last 4 of each rotary
    permuted = permute_rotary_rows(rows, 4, 5, half_from_interleaved(4))
    assert permuted.tolist() == [0, 1, 3, 2, 4, 5, 6, 8, 7, 9]
    assert permute_rotary_rows(permuted, 4, 5, half_from_interleaved(4).argsort()).tolist() == rows.tolist()


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(qk_rope_head_dim=3), "even qk_rope_head_dim, got qk_rope_head_dim=3"),
        (dict(kv_lora_rank=0), "kv_lora_rank must be >= 1, got kv_lora_rank=0"),
        (dict(q_lora_rank=0), "q_lora_rank must be >= 1, got q_lora_rank=0"),
        (dict(v_head_dim=-1), "v_head_dim must be >= 1, got v_head_dim=-1"),
    ],
)
def test_bad_sizes_are_refused_by_name(overrides, match):
    sizes = dict(dim=24, num_heads=3, kv_lora_rank=10, qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=5)
    with pytest.raises(ValueError, match=match):
        LatentAttention(**{**sizes, **overrides})


LATENT = dict(
    vocab_size=64, dim=40, num_layers=2, num_heads=3, num_experts=4, expert_hidden_dim=16, first_k_dense=1,
    max_seq_len=32, init_std=0.2, attention="latent", kv_lora_rank=10, qk_nope_head_dim=6, qk_rope_head_dim=4,
    v_head_dim=5,
)


def test_latent_config_builds_latent_attention_with_the_rotary_on_its_rope_part():
    model = MoETransformer(MoETransformerConfig(**LATENT, q_lora_rank=7))
    assert all(isinstance(block.attn, LatentAttention) for block in model.blocks)
    assert model.blocks[0].attn.q_down_proj.out_features == 7
    assert model.rope.cos_LF.shape == (32, 2)
    assert model.config.kv_cache_dims == (3, 10, 5)


@pytest.mark.parametrize("q_lora_rank", [7, None])
def test_greedy_generation_through_both_caches_equals_the_full_forward(q_lora_rank):
    torch.manual_seed(0)
    model = MoETransformer(MoETransformerConfig(**LATENT, q_lora_rank=q_lora_rank)).eval()
    prompts = [[5, 9, 13, 2, 40], [7], [1, 2, 3]]
    expected = []
    with torch.no_grad():
        for prompt in prompts:
            ids = list(prompt)
            for _ in range(6):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
            expected.append(ids[len(prompt):])
    assert generate(model, prompts, 6) == expected
    assert generate(model, prompts, 6, decoder=CompiledDecoder(model)) == expected


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(kv_lora_rank=None, v_head_dim=None), r"attention='latent' needs \['kv_lora_rank', 'v_head_dim'\]"),
        (dict(qk_rope_head_dim=5), "even qk_rope_head_dim, got qk_rope_head_dim=5"),
        (dict(q_lora_rank=0), "q_lora_rank must be >= 1, got q_lora_rank=0"),
        (dict(num_kv_heads=1, qk_norm="head"), r"latent attention has no \{'num_kv_heads': 1, 'qk_norm': 'head'\}"),
        (dict(attention="softmax", dim=48), r"\{'kv_lora_rank': 10, .*\} size latent attention"),
        (dict(attention="linear"), "attention must be one of .*, got attention='linear'"),
    ],
)
def test_latent_config_mistakes_are_refused_by_name(overrides, match):
    with pytest.raises(ValueError, match=match):
        MoETransformerConfig(**{**LATENT, **overrides})
