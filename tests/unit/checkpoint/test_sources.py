"""Pretrained sources: our safetensors export read per tensor and per expert range, and MoELightningModule's
``pretrained=`` building from it on meta; the mistakes a user can make with the path."""

import pytest
import torch
from safetensors.torch import save_file

from moe_lightning import MoELightningModule
from moe_lightning.checkpoint.sources import ExportedModel, open_pretrained
from moe_lightning.inference import export_safetensors
from moe_lightning.models import MoETransformer, MoETransformerConfig
from moe_lightning.routing import TopKRouter

CONFIG = MoETransformerConfig(vocab_size=32, dim=16, num_layers=2, num_heads=2, num_experts=4, expert_hidden_dim=24,
                              tie_embeddings=True)


@pytest.fixture
def exported(tmp_path):
    torch.manual_seed(0)
    model = MoETransformer(CONFIG, TopKRouter)
    path = tmp_path / "model.safetensors"
    export_safetensors(model, path)
    return model, path


def test_exported_model_reads_whole_tensors_and_expert_ranges(exported):
    model, path = exported
    source = open_pretrained(path)
    assert isinstance(source, ExportedModel)
    state = model.state_dict()
    assert set(source.names()) == set(state) - {"head.weight"}  # tied: written once
    assert torch.equal(source.load("embed.weight"), state["embed.weight"])
    name = "blocks.1.ffn.experts.w_down_EFD"
    assert torch.equal(source.load(name, range(1, 3)), state[name][1:3])


def test_pretrained_export_builds_on_meta_and_equals_the_exported_model(exported):
    model, path = exported
    module = MoELightningModule(pretrained=str(path))
    assert module.model is None  # nothing read before configure_model
    module.configure_model()
    assert module.model.head.weight is module.model.embed.weight
    got, expected = module.model.state_dict(), model.state_dict()
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
    assert torch.equal(module.model.rope.cos_LF, model.rope.cos_LF)


def test_a_missing_path_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"pretrained='.*nowhere' does not exist: give a transformers checkpoint"):
        MoELightningModule(pretrained=str(tmp_path / "nowhere"))


def test_a_directory_without_config_json_is_refused_by_the_transformers_reader(tmp_path):
    pytest.importorskip("transformers")
    with pytest.raises(ValueError, match="has no config.json: not a transformers checkpoint directory"):
        MoELightningModule(pretrained=str(tmp_path))


def test_a_safetensors_file_that_is_not_our_export_is_refused(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="is not an export_safetensors file"):
        MoELightningModule(pretrained=str(path))
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="cannot read .*junk.safetensors as a safetensors file"):
        MoELightningModule(pretrained=str(tmp_path / "junk.safetensors"))


def test_model_and_pretrained_together_are_refused(exported):
    model, path = exported
    with pytest.raises(ValueError, match="pass either model or pretrained, not both"):
        MoELightningModule(model, pretrained=str(path))
