"""The installed DeepSpeed plugin as the core sees it: its entry point and records, its strategy names in Lightning's
registry, no deepspeed import before a name is used, and the strategy's argument checks (before any process starts)."""

import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("moe_lightning_deepspeed")

from lightning.pytorch import Trainer  # noqa: E402

from moe_lightning import plugins  # noqa: E402
from moe_lightning_deepspeed import DeepSpeedExpertParallelStrategy  # noqa: E402
from moe_lightning_deepspeed.strategy import check_deepspeed_accelerator  # noqa: E402


def test_the_entry_point_is_found_and_matches_what_the_core_expects_of_it():
    [installed] = [p for p in plugins.installed_plugins() if p.name == "deepspeed"]
    assert installed.distribution == "moe-lightning-deepspeed" and installed.error is None
    [known] = [k for k in plugins.KNOWN_PLUGINS if k.name == "deepspeed"]
    for kind in plugins.KINDS:
        assert tuple(r.name for r in installed.plugin.registrations if r.kind == kind) == known.provides.get(kind, ())
    for registration in installed.plugin.registrations:
        plugins.load_target(registration.target)  # every target imports


@pytest.mark.parametrize(
    "name,stage", [("deepspeed_moe", 2), ("deepspeed_moe_stage_1", 1), ("deepspeed_moe_stage_3", 3)]
)
def test_strategy_names_give_the_strategy(name, stage):
    trainer = Trainer(strategy=name, accelerator="cpu", devices=1, logger=False)
    assert type(trainer.strategy) is DeepSpeedExpertParallelStrategy and trainer.strategy.stage == stage


def test_other_kinds_resolve_by_name():
    from moe_lightning_deepspeed.experts import DeepSpeedMoELayer
    from moe_lightning_deepspeed.routing import routing_from_gate

    assert plugins.resolve("experts", "deepspeed_moe") is DeepSpeedMoELayer
    assert plugins.resolve("router_adapter", "deepspeed_top_k_gate") is routing_from_gate


def test_registering_and_listing_import_no_deepspeed():
    code = textwrap.dedent("""
        import sys
        import moe_lightning.strategies, moe_lightning_deepspeed
        from moe_lightning.plugins import describe_plugins
        assert "deepspeed_moe_stage_3" in describe_plugins()
        assert "deepspeed" not in sys.modules, sorted(m for m in sys.modules if m.startswith("deepspeed"))
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match=r"stage must be one of the ZeRO stages \(1, 2, 3\), got stage=4"):
        DeepSpeedExpertParallelStrategy(stage=4)
    with pytest.raises(ValueError, match="zero_optimization.stage=3 conflicts with stage=2"):
        DeepSpeedExpertParallelStrategy(stage=2, config={"zero_optimization": {"stage": 3}})
    with pytest.raises(ValueError, match=r"zero_optimization.stage must be one of \(1, 2, 3\), got stage=0"):
        DeepSpeedExpertParallelStrategy(config={"zero_optimization": {"stage": 0}})
    with pytest.raises(ValueError, match="ZeRO stage 3 runs with expert_parallel_size=1 .*got expert_parallel_size=2"):
        DeepSpeedExpertParallelStrategy(stage=3, expert_parallel_size=2)
    autoep = {"zero_optimization": {"stage": 2}, "expert_parallel": {"autoep_size": 2}}
    with pytest.raises(ValueError, match=r"sets expert_parallel=\{'autoep_size': 2\} \(DeepSpeed's AutoEP"):
        DeepSpeedExpertParallelStrategy(config=autoep)
    with pytest.raises(ValueError, match="must be 'auto' or an int >= 1, got expert_parallel_size=0"):
        DeepSpeedExpertParallelStrategy(expert_parallel_size=0)


def test_the_stage_comes_from_the_config_when_not_given():
    strategy = DeepSpeedExpertParallelStrategy(config={"zero_optimization": {"stage": 1}})
    assert strategy.stage == 1 and strategy.config["zero_allow_untested_optimizer"] is True
    assert DeepSpeedExpertParallelStrategy().stage == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="DeepSpeed picks its CUDA accelerator where there is a GPU")
def test_a_deepspeed_accelerator_other_than_the_trainers_device_is_named():
    check_deepspeed_accelerator(torch.device("cpu"))
    with pytest.raises(ValueError, match="DeepSpeed runs on its 'cpu' accelerator but the Trainer's device is cuda:0"):
        check_deepspeed_accelerator(torch.device("cuda", 0))


def test_expert_groups_are_tagged_and_a_mixed_group_is_refused():
    from moe_lightning_deepspeed.engine import tag_expert_param_groups

    expert, dense = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    expert.allreduce, expert.group_name = False, "ep_size_2"
    optimizer = torch.optim.AdamW([{"params": [dense]}, {"params": [expert]}])
    tag_expert_param_groups(optimizer)
    assert "moe" not in optimizer.param_groups[0]
    assert (optimizer.param_groups[1]["moe"], optimizer.param_groups[1]["name"]) == (True, "ep_size_2")
    with pytest.raises(ValueError, match=r"param group 0 mixes expert parameters \(groups \['ep_size_2'\]\) with"):
        tag_expert_param_groups(torch.optim.AdamW([expert, dense]))


def test_moe_lightning_module_gives_marked_experts_groups_of_their_own():
    from moe_lightning_deepspeed.engine import mark_expert_parameters
    from tests.distributed.lm_cases import build_module

    module = build_module()
    unmarked = module.param_groups()
    experts = [name for name, _ in module.named_parameters() if ".experts." in name]
    mark_expert_parameters(module, experts, "ep_size_1")
    marked = module.param_groups()
    assert len(marked) == len(unmarked) + 1
    [expert_group] = [g for g in marked if any(not getattr(p, "allreduce", True) for p in g["params"])]
    assert {id(p) for p in expert_group["params"]} == {id(module.get_parameter(n)) for n in experts}
    assert expert_group["weight_decay"] == module.hparams.weight_decay  # the same settings as the other matrices


def test_the_converter_names_a_directory_that_is_not_a_deepspeed_checkpoint(tmp_path, capsys):
    from moe_lightning_deepspeed.convert import main

    with pytest.raises(SystemExit):
        main([str(tmp_path), str(tmp_path / "out.ckpt")])
    assert f"{tmp_path} is not a DeepSpeed checkpoint directory: it has none of checkpoint/" in capsys.readouterr().err
    assert not (tmp_path / "out.ckpt").exists()


def test_yaml_names_the_strategy_by_short_name_or_by_class_path():
    # LightningCLI's trainer.strategy is Union[str, Strategy]: a name stays a string for Trainer's registry lookup.
    from typing import Union

    from jsonargparse import ArgumentParser
    from lightning.pytorch.strategies import Strategy

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--strategy", type=Union[str, Strategy])
    by_path = {"class_path": "moe_lightning_deepspeed.DeepSpeedExpertParallelStrategy", "init_args": {"stage": 1}}
    strategy = parser.instantiate(parser.parse_object({"strategy": by_path})).strategy
    assert type(strategy) is DeepSpeedExpertParallelStrategy and strategy.stage == 1
    assert parser.parse_object({"strategy": "deepspeed_moe_stage_3"}).strategy == "deepspeed_moe_stage_3"
