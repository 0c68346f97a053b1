"""InferenceEngine.from_checkpoint: a safetensors export or a Lightning .ckpt loads back the same model, no pickle."""

import functools

import pytest
import torch
import yaml
from jsonargparse import ArgumentParser
from lightning.pytorch import Trainer
from safetensors.torch import save_file

from moe_lightning import MoELightningModule
from moe_lightning.inference import InferenceEngine, export_safetensors, generate
from moe_lightning.models import MoETransformer
from moe_lightning.routing import HashRouter, TopKRouter
from tests.unit.helpers import pattern_loader
from tests.unit.inference.conftest import TINY, tiny_model

IDS = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8, 2, 8, 1, 8]])


@torch.no_grad()
def assert_same_model(loaded: MoETransformer, original: MoETransformer) -> None:
    assert torch.equal(loaded(IDS).logits, original.eval()(IDS).logits)


@pytest.mark.parametrize(
    "router, overrides",
    [
        (None, {}),
        (functools.partial(TopKRouter, num_experts_per_token=1, score_func="sigmoid", expert_bias=True), {}),
        (functools.partial(HashRouter, num_experts_per_token=2), dict(tie_embeddings=True, num_shared_experts=1)),
    ],
    ids=["default-router", "top1-sigmoid-bias", "hash-tied-shared"],
)
def test_safetensors_export_roundtrip_gives_identical_logits(tmp_path, router, overrides):
    model = tiny_model(router=router, **overrides)
    for moe in model.moe_layers:  # non-zero buffers must travel too
        if getattr(moe.router, "expert_bias_E", None) is not None:
            moe.router.expert_bias_E.normal_()
    export_safetensors(model, tmp_path / "model.safetensors")
    engine = InferenceEngine.from_checkpoint(tmp_path / "model.safetensors")
    assert_same_model(engine.model, model)
    assert engine.model.router_spec == model.router_spec
    assert engine.generate([[1, 2, 3]], 5) == generate(model, [[1, 2, 3]], 5)
    if model.config.tie_embeddings:
        assert engine.model.head.weight is engine.model.embed.weight


def test_export_keeps_each_tensor_dtype_and_the_engine_casts_on_request(tmp_path):
    model = tiny_model().to(torch.bfloat16)
    export_safetensors(model, tmp_path / "model.safetensors")
    assert InferenceEngine.from_checkpoint(tmp_path / "model.safetensors").model.embed.weight.dtype == torch.bfloat16
    engine = InferenceEngine.from_checkpoint(tmp_path / "model.safetensors", dtype=torch.float32)
    torch.testing.assert_close(engine.model.head.weight, model.head.weight.float())


def test_a_lightning_cli_built_model_records_its_router_and_exports(tmp_path):
    parser = ArgumentParser()
    parser.add_argument("--model", type=MoETransformer)
    config = {"config": TINY, "router": {"class_path": "moe_lightning.TopKRouter",
                                         "init_args": {"num_experts_per_token": 1, "normalize_weights": False}}}
    parsed = parser.parse_object({"model": {"class_path": "moe_lightning.models.MoETransformer", "init_args": config}})
    model = parser.instantiate(parsed).model
    assert model.router_spec["class_path"] == "moe_lightning.routing.topk.TopKRouter"
    assert model.router_spec["init_args"]["num_experts_per_token"] == 1
    export_safetensors(model, tmp_path / "model.safetensors")
    loaded = InferenceEngine.from_checkpoint(tmp_path / "model.safetensors").model
    assert loaded.moe_layers[0].router.k == 1 and not loaded.moe_layers[0].router.normalize_weights
    assert_same_model(loaded, model)


def test_an_opaque_router_factory_needs_an_explicit_spec(tmp_path):
    model = tiny_model(router=lambda dim, num_experts: TopKRouter(dim, num_experts, num_experts_per_token=1))
    with pytest.raises(ValueError, match="pass router="):
        export_safetensors(model, tmp_path / "model.safetensors")
    spec = {"class_path": "moe_lightning.routing.TopKRouter", "init_args": {"num_experts_per_token": 1}}
    export_safetensors(model, tmp_path / "model.safetensors", router=spec)
    assert_same_model(InferenceEngine.from_checkpoint(tmp_path / "model.safetensors").model, model)
    with pytest.raises(ValueError, match="class_path='collections.OrderedDict' is not a moe_lightning Router"):
        export_safetensors(model, tmp_path / "x.safetensors", router={"class_path": "collections.OrderedDict"})


def train_one_step(tmp_path) -> tuple[MoELightningModule, object]:
    model = tiny_model(router=functools.partial(TopKRouter, num_experts_per_token=1)).train()
    module = MoELightningModule(model, warmup_steps=0)
    trainer = Trainer(
        max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=1, default_root_dir=tmp_path,
    )
    trainer.fit(module, pattern_loader(batch_size=2, seq_len=8), pattern_loader(batch_size=2, seq_len=8))
    run = tmp_path / "run"
    trainer.save_checkpoint(run / "checkpoints" / "last.ckpt")
    return module, run


def write_cli_config(path, router_k: int) -> None:
    """The part of LightningCLI's saved config.yaml that describes the model."""
    model = {"class_path": "moe_lightning.models.MoETransformer", "init_args": {
        "config": TINY,
        "router": {"class_path": "moe_lightning.TopKRouter", "init_args": {"num_experts_per_token": router_k}},
    }}
    path.write_text(yaml.safe_dump({"model": {"class_path": "moe_lightning.MoELightningModule",
                                              "init_args": {"model": model, "lr": 0.003}}}))


def test_lightning_checkpoint_loads_with_the_run_config_beside_it(tmp_path):
    module, run = train_one_step(tmp_path)
    with pytest.raises(ValueError, match="no LightningCLI config.yaml was found"):
        InferenceEngine.from_checkpoint(run / "checkpoints" / "last.ckpt")
    write_cli_config(run / "config.yaml", router_k=1)
    engine = InferenceEngine.from_checkpoint(run / "checkpoints" / "last.ckpt")
    assert_same_model(engine.model, module.model)
    elsewhere = tmp_path / "elsewhere.yaml"
    write_cli_config(elsewhere, router_k=1)
    assert_same_model(InferenceEngine.from_checkpoint(run / "checkpoints" / "last.ckpt", config=elsewhere).model,
                      module.model)


def _executed():
    raise AssertionError("pickled code ran while loading a checkpoint")


class Payload:
    def __reduce__(self):
        return (_executed, ())


def test_pickled_code_in_a_checkpoint_is_refused_not_run(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    write_cli_config(tmp_path / "config.yaml", router_k=2)
    torch.save({"state_dict": {"model.embed.weight": torch.zeros(64, 32)}, "payload": Payload()},
               tmp_path / "checkpoints" / "evil.ckpt")
    with pytest.raises(Exception, match="Weights only load failed") as info:
        InferenceEngine.from_checkpoint(tmp_path / "checkpoints" / "evil.ckpt")
    assert not isinstance(info.value, AssertionError)


def test_unloadable_checkpoints_are_named(tmp_path):
    save_file({"w": torch.zeros(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="plain.safetensors is not an export_safetensors file"):
        InferenceEngine.from_checkpoint(tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="is a directory"):
        InferenceEngine.from_checkpoint(tmp_path)
    with pytest.raises(ValueError, match=r"must be a \.safetensors export or a Lightning \.ckpt"):
        InferenceEngine.from_checkpoint(tmp_path / "model.pt")
    bad_config = tmp_path / "config.yaml"
    bad_config.write_text(yaml.safe_dump({"model": {"class_path": "moe_lightning.MoELightningModule",
                                                    "init_args": {"model": None}}}))
    torch.save({"state_dict": {}}, tmp_path / "x.ckpt")
    with pytest.raises(ValueError, match="has no model.init_args.model.class_path"):
        InferenceEngine.from_checkpoint(tmp_path / "x.ckpt")


def test_a_config_that_does_not_fit_the_weights_is_refused(tmp_path):
    _, run = train_one_step(tmp_path)
    model = {"class_path": "moe_lightning.models.MoETransformer", "init_args": {"config": {**TINY, "num_experts": 8}}}
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"init_args": {"model": model}}}))
    with pytest.raises(ValueError, match="does not fit the model built from its config"):
        InferenceEngine.from_checkpoint(run / "checkpoints" / "last.ckpt")
