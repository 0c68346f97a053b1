"""Checkpoints we cannot import, and models we cannot export, are refused before any weight is read or written,
naming what is wrong."""

import functools
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

pytest.importorskip("transformers")

from moe_lightning.models import MoETransformer, MoETransformerConfig  # noqa: E402
from moe_lightning.models.hf import HFCheckpoint, export_hf, load_hf_model  # noqa: E402
from moe_lightning.routing import TopKRouter  # noqa: E402
from tests.parity.hf_tiny import save, tiny_hf_model  # noqa: E402


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    return save(tiny_hf_model("mixtral"), tmp_path_factory.mktemp("sharded"), max_shard_size="40KB")


def copy_of(directory, tmp_path):
    for path in directory.iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    return tmp_path


def test_a_directory_without_config_json(tmp_path):
    with pytest.raises(ValueError, match=f"{tmp_path} has no config.json"):
        HFCheckpoint(tmp_path)


def test_an_unsupported_model_type_is_named_with_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match=r"model_type='gpt2' is not supported; supported: \[.*'mixtral', 'olmoe', 'qwen2', 'qwen2_moe'"):
        HFCheckpoint(tmp_path)


def test_a_missing_shard_is_named(sharded, tmp_path):
    directory = copy_of(sharded, tmp_path)
    (directory / "model-00002-of-00014.safetensors").unlink()
    with pytest.raises(ValueError, match=r"missing: \['model-00002-of-00014.safetensors'\]"):
        HFCheckpoint(directory)


def test_a_truncated_shard_is_named(sharded, tmp_path):
    directory = copy_of(sharded, tmp_path)
    shard = directory / "model-00003-of-00014.safetensors"
    shard.write_bytes(shard.read_bytes()[:-64])
    with pytest.raises(ValueError, match="model-00003-of-00014.safetensors cannot be read"):
        HFCheckpoint(directory)


def test_a_tensor_of_the_wrong_shape_is_named_with_both_shapes(tmp_path):
    directory = save(tiny_hf_model("qwen3_moe"), tmp_path)
    tensors = load_file(directory / "model.safetensors")
    name = "model.layers.1.self_attn.k_norm.weight"
    tensors[name] = torch.ones(12)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"tensor {name} has shape \[12\], the config implies \[16\]"):
        HFCheckpoint(directory)


def test_a_missing_tensor_is_named(tmp_path):
    directory = save(tiny_hf_model("olmoe"), tmp_path)
    tensors = load_file(directory / "model.safetensors")
    del tensors["model.layers.2.mlp.experts.5.up_proj.weight"]
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks tensor\(s\) \['model.layers.2.mlp.experts.5.up_proj.weight'\]"):
        HFCheckpoint(directory)


@pytest.mark.parametrize(
    "model_type, overrides, match",
    [
        ("mistral", dict(sliding_window=16), "sliding_window=16 with max_position_embeddings=64"),
        ("llama", dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}), "'linear'"),
        ("olmoe", dict(clip_qkv=8.0), "clip_qkv=8.0"),
        ("llama", dict(attention_bias=True), "attention_bias=True"),
        ("llama", dict(hidden_act="gelu"), "hidden_act='gelu'"),
    ],
)
def test_settings_we_do_not_compute_are_refused_by_name(model_type, overrides, match, tmp_path):
    directory = save(tiny_hf_model(model_type, **overrides), tmp_path)
    with pytest.raises(ValueError, match=match):
        load_hf_model(directory)


SMALL = dict(vocab_size=64, dim=32, num_layers=2, num_heads=4, num_experts=4, expert_hidden_dim=16, max_seq_len=32)


@pytest.mark.parametrize(
    "family, overrides, router, match",
    [
        ("mixtral", dict(num_shared_experts=1), None, "num_shared_experts=1"),
        ("olmoe", dict(attention_head_dim=16), None, "head_dim=16 \\* num_heads=4 != dim=32"),
        ("qwen3_moe", {}, None, "qk_norm='none' \\(the family has 'head'\\)"),
        ("qwen2_moe", {}, None, "num_shared_experts=0, shared_expert_gate=False"),
        ("llama", {}, None, "2 of 2 blocks are MoE"),
        ("qwen2", dict(moe_layers=[]), None, "qkv_bias=False"),
        ("mixtral", {}, functools.partial(TopKRouter, expert_bias=True), "layer 0 router expert_bias=True"),
        ("mixtral", dict(attention="latent", kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4),
         None, "attention='latent' \\(the family has softmax attention\\)"),
    ],
)
def test_export_refuses_a_model_outside_the_family_and_writes_nothing(family, overrides, router, match, tmp_path):
    model = MoETransformer(MoETransformerConfig(**{**SMALL, **overrides}), router=router)
    with pytest.raises(ValueError, match=match):
        export_hf(model, tmp_path / "out", family=family)
    assert not (tmp_path / "out").exists()


def test_export_needs_a_family_when_the_model_was_not_imported(tmp_path):
    with pytest.raises(ValueError, match=r"pass family= one of \["):
        export_hf(MoETransformer(MoETransformerConfig(**SMALL)), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_refuses_a_non_empty_directory(tmp_path):
    (tmp_path / "keep.txt").write_text("")
    with pytest.raises(ValueError, match="exists and is not an empty directory"):
        export_hf(MoETransformer(MoETransformerConfig(**SMALL)), tmp_path, family="mixtral")
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
