"""DeepSeek-V3 against transformers' own modules: latent attention, the whole imported model, generation, export."""

import pytest
import torch

ds = pytest.importorskip("transformers.models.deepseek_v3.modeling_deepseek_v3")

from moe_lightning.models.hf.deepseek_v3 import latent_attention_state  # noqa: E402
from moe_lightning.models.latent_attention import LatentAttention  # noqa: E402
from moe_lightning.models.transformer import RotaryEmbedding  # noqa: E402

# Odd sizes on purpose: rotary and position-free parts differ, values are narrower than keys.
ATTENTION_SIZES = dict(
    hidden_size=40, num_attention_heads=3, num_key_value_heads=3, kv_lora_rank=10, qk_nope_head_dim=6,
    qk_rope_head_dim=4, v_head_dim=5, max_position_embeddings=32,
)


def hf_attention(q_lora_rank, rope_interleave):
    config = ds.DeepseekV3Config(
        **ATTENTION_SIZES, q_lora_rank=q_lora_rank, rope_interleave=rope_interleave,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0},
    )
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    attention = ds.DeepseekV3Attention(config, layer_idx=0)
    with torch.no_grad():
        for name, tensor in attention.named_parameters():
            # Norm weights away from one: every tensor must land in the right place.
            tensor.copy_(torch.randn_like(tensor) * (0.3 if tensor.dim() > 1 else 0.5) + (tensor.dim() == 1))
    return config, attention


@pytest.mark.parametrize("q_lora_rank, rope_interleave", [(7, True), (None, True), (7, False)])
def test_latent_attention_matches_transformers_forward_and_backward(q_lora_rank, rope_interleave):
    config, hf = hf_attention(q_lora_rank, rope_interleave)
    ours = LatentAttention(
        config.hidden_size, config.num_attention_heads, config.kv_lora_rank, config.qk_nope_head_dim,
        config.qk_rope_head_dim, config.v_head_dim, q_lora_rank,
    )
    hf_tensors = {name: tensor.detach() for name, tensor in hf.state_dict().items()}
    ours.load_state_dict(latent_attention_state(hf_tensors, ours, rope_interleave))
    rope = RotaryEmbedding(config.qk_rope_head_dim, config.max_position_embeddings, 500.0)

    batch, length = 2, 9
    x = torch.randn(batch, length, config.hidden_size, generator=torch.Generator().manual_seed(1))
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
    ours_grads = latent_attention_state(hf_grads, ours, rope_interleave)
    for name, param in ours.named_parameters():
        torch.testing.assert_close(param.grad, ours_grads[name], rtol=1e-5, atol=1e-5, msg=name)
