"""Import of transformers checkpoints into MoETransformer and export back, against transformers' own forward.

"Relative" error below is max |ours - theirs| over all logits divided by max |theirs|.
"""

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM  # noqa: E402

from moe_lightning.inference import generate  # noqa: E402
from moe_lightning.layer import MoELayer  # noqa: E402
from moe_lightning.models.hf import HFCheckpoint, export_hf, load_hf_model  # noqa: E402
from tests.parity.hf_tiny import save, tiny_hf_model  # noqa: E402

MOE_FAMILIES = ["mixtral", "qwen3_moe", "olmoe", "qwen2_moe"]
DENSE_FAMILIES = ["llama", "qwen2", "mistral"]
IDS = torch.randint(3, 263, (2, 9), generator=torch.Generator().manual_seed(1))


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


def all_tensors(directory) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        out.update(load_file(path))
    return out


@pytest.mark.parametrize("model_type", MOE_FAMILIES + DENSE_FAMILIES)
@torch.no_grad()
def test_imported_model_computes_transformers_logits_and_exports_the_same_checkpoint(model_type, tmp_path):
    hf = tiny_hf_model(model_type)
    source = save(hf, tmp_path / "hf")
    ours = load_hf_model(source)
    expected = hf(IDS).logits
    assert relative_error(ours(IDS).logits, expected) <= 1e-5

    exported = export_hf(ours, tmp_path / "exported")
    # Same tensor names, shapes and values as transformers' own save_pretrained wrote.
    original, written = all_tensors(source), all_tensors(exported)
    assert sorted(written) == sorted(original)
    assert all(torch.equal(written[name], original[name]) for name in original)
    reloaded = AutoModelForCausalLM.from_pretrained(exported).eval()
    assert type(reloaded) is type(hf)
    assert relative_error(reloaded(IDS).logits, expected) <= 1e-5


@pytest.mark.parametrize("model_type", MOE_FAMILIES)
@torch.no_grad()
def test_greedy_generation_with_the_kv_cache_matches_transformers_generate(model_type, tmp_path):
    hf = tiny_hf_model(model_type)
    ours = load_hf_model(save(hf, tmp_path))
    prompt = IDS[:1]
    theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10, min_new_tokens=10,
                         do_sample=False, pad_token_id=0)[0, prompt.shape[1]:].tolist()
    assert generate(ours, prompt, 10) == [theirs]


def test_import_maps_the_families_settings(tmp_path):
    qwen2_moe = load_hf_model(save(tiny_hf_model("qwen2_moe"), tmp_path / "q2"))
    config = qwen2_moe.config
    assert [isinstance(block.ffn, MoELayer) for block in qwen2_moe.blocks] == [False, True, False, True]
    assert (config.head_dim, config.qkv_bias, config.shared_hidden_dim, config.hf_model_type) == (16, True, 36,
                                                                                                   "qwen2_moe")
    qwen3 = HFCheckpoint(save(tiny_hf_model("qwen3_moe"), tmp_path / "q3"))
    config, router = qwen3.config()
    assert (config.moe_layers, config.qk_norm, config.dense_hidden_dim) == ([0, 1], "head", 56)
    assert router["init_args"] == {"num_experts_per_token": 3, "normalize_weights": True, "load_balance_coef": 0.001}
    llama = load_hf_model(save(tiny_hf_model("llama"), tmp_path / "llama"))
    assert llama.moe_layers == [] and llama.head.weight is llama.embed.weight


@torch.no_grad()
def test_sharded_checkpoint_loads_expert_ranges_lazily(tmp_path):
    hf = tiny_hf_model("mixtral")
    directory = save(hf, tmp_path, max_shard_size="40KB")
    assert (directory / "model.safetensors.index.json").is_file() and len(list(directory.glob("*.safetensors"))) > 3
    checkpoint = HFCheckpoint(directory)
    name = "blocks.1.ffn.experts.w_in_EDH"
    whole = checkpoint.load(name)
    # Expert e of ours is [w1_e; w3_e] transposed, straight from the stored per-expert matrices.
    stored = all_tensors(directory)
    expert_3 = torch.cat([stored[f"model.layers.1.block_sparse_moe.experts.3.{w}.weight"] for w in ("w1", "w3")]).T
    assert torch.equal(whole[3], expert_3)
    assert torch.equal(checkpoint.load(name, experts=range(2, 5)), whole[2:5])
    assert checkpoint.is_expert_tensor(name) and not checkpoint.is_expert_tensor("blocks.1.attn.q_proj.weight")
    assert relative_error(load_hf_model(directory)(IDS).logits, hf(IDS).logits) <= 1e-5


@torch.no_grad()
def test_fused_expert_layout_loads_too(tmp_path):
    hf = tiny_hf_model("qwen2_moe")
    directory = save(hf, tmp_path, save_original_format=False)
    assert "model.layers.1.mlp.experts.gate_up_proj" in all_tensors(directory)
    checkpoint = HFCheckpoint(directory)
    experts = checkpoint.load("blocks.1.ffn.experts.w_down_EFD", experts=range(1, 3))
    assert torch.equal(experts, hf.model.layers[1].mlp.experts.down_proj[1:3].transpose(1, 2))
    assert relative_error(load_hf_model(directory)(IDS).logits, hf(IDS).logits) <= 1e-5


def test_dtype_converts_on_load(tmp_path):
    model = load_hf_model(save(tiny_hf_model("olmoe"), tmp_path), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
