"""DeepSpeedExpertParallelStrategy against our native path on the same model, data and seed: ZeRO-1/2/3 in one
process give the native 20-step loss trace; ZeRO-2 on 2 gloo processes (experts sharded, EP=2) and ZeRO-3 on 2
(EP=1) equal one process; its checkpoints load in our inference engine, ours load into it, and its own resume."""

import pytest
import torch
import yaml

pytest.importorskip("moe_lightning_deepspeed")

from deepspeed_cases import fit, local  # noqa: E402
from moe_lightning.inference import InferenceEngine  # noqa: E402
from moe_lightning_deepspeed import DeepSpeedExpertParallelStrategy, convert  # noqa: E402
from moe_lightning_deepspeed.checkpoint import convert_to_lightning  # noqa: E402
from tests.distributed.launch import run_workers  # noqa: E402
from tests.distributed.lm_cases import BATCH, probe_batch  # noqa: E402

pytestmark = pytest.mark.slow

# fp32 throughout. ZeRO steps the same AdamW on flat partitions (one tensor per group) instead of per parameter:
# measured differences after 20 steps are at most ~1e-6 on losses and weights; Adam's division by sqrt(v) turns
# summation-order noise of near-zero gradients into weight differences, hence lm_cases' tolerance on weights.
LOSS_TOL = dict(rtol=1e-5, atol=1e-5)
WEIGHT_TOL = dict(rtol=1e-4, atol=2e-5)

RUN_CONFIG = {"model": {"class_path": "moe_lightning.MoELightningModule", "init_args": {"model": {
    "class_path": "moe_lightning.models.MoETransformer",
    "init_args": {
        "config": {"vocab_size": 32, "dim": 16, "num_layers": 2, "num_heads": 2, "num_experts": 4,
                   "expert_hidden_dim": 24},
        "router": {"class_path": "moe_lightning.routing.TopKRouter",
                   "init_args": {"num_experts_per_token": 2, "load_balance_coef": 0.0}},
    },
}}}}
"""The LightningCLI config.yaml of lm_cases.build_model, for the inference engine."""


def _one_process(rank, world_size, tmp):
    results = {}
    for stage in (1, 2, 3):
        run, results[stage] = fit(DeepSpeedExpertParallelStrategy(stage=stage), world_size, rank)
        run.save_checkpoint(f"{tmp}/stage{stage}")
    torch.save(results, f"{tmp}/one.pt")


def _two_processes(rank, world_size, tmp):
    results = {}
    run, results["zero2"] = fit(DeepSpeedExpertParallelStrategy(stage=2), world_size, rank)
    run.save_checkpoint(f"{tmp}/zero2")
    # DeepSpeed's own directory, and our one-process checkpoint (both at max_steps: restored, nothing trains).
    _, results["resumed"] = fit(DeepSpeedExpertParallelStrategy(stage=2), world_size, rank, ckpt_path=f"{tmp}/zero2")
    _, results["ours"] = fit(DeepSpeedExpertParallelStrategy(stage=2), world_size, rank, ckpt_path=f"{tmp}/native.ckpt")
    _, results["zero3"] = fit(DeepSpeedExpertParallelStrategy(stage=3), world_size, rank)
    try:
        fit(DeepSpeedExpertParallelStrategy(stage=2), world_size, rank, gradient_clip_val=1.0)
    except ValueError as error:
        results["clip_error"] = str(error)
    torch.save(results, f"{tmp}/two{rank}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("deepspeed")
    native_run, native = fit("auto", 1, 0)
    wide_run, wide = fit("auto", 1, 0, batch_size=2 * BATCH)  # the global batch of 2 ranks, unsplit
    wide_run.save_checkpoint(tmp / "native.ckpt")
    (tmp / "config.yaml").write_text(yaml.safe_dump(RUN_CONFIG))
    run_workers(_one_process, 1, str(tmp))
    run_workers(_two_processes, 2, str(tmp))
    two = [torch.load(tmp / f"two{rank}.pt") for rank in range(2)]
    return tmp, native, wide, torch.load(tmp / "one.pt"), two


def assert_same_run(result, reference, rank=0, ep=1):
    torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(reference["losses"]), **LOSS_TOL)
    torch.testing.assert_close(result["logits"], reference["logits"], **WEIGHT_TOL)
    for name, param in reference["params"].items():
        torch.testing.assert_close(result["params"][name], local(param, name, rank, ep), **WEIGHT_TOL,
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_each_zero_stage_gives_the_native_20_step_loss_trace(runs, stage):
    _, native, _, one, _ = runs
    assert len(native["losses"]) == 20 and native["losses"][-1] < native["losses"][0]
    assert_same_run(one[stage], native)


def test_zero2_on_2_processes_with_experts_sharded_equals_one_process(runs):
    _, _, wide, _, two = runs
    for rank, result in enumerate(two):
        # Each rank logs the loss of its own half of the global batch; their mean is the one-process loss.
        result = {**result["zero2"], "losses": list(torch.tensor([r["zero2"]["losses"] for r in two]).mean(0))}
        assert_same_run(result, wide, rank, ep=2)


def test_zero3_on_2_processes_equals_one_process(runs):
    _, _, wide, _, two = runs
    for rank, result in enumerate(two):
        result = {**result["zero3"], "losses": list(torch.tensor([r["zero3"]["losses"] for r in two]).mean(0))}
        assert_same_run(result, wide, rank, ep=1)


def test_deepspeed_resumes_its_own_checkpoint_with_every_ranks_experts(runs):
    _, _, _, _, two = runs
    for rank, result in enumerate(two):
        torch.testing.assert_close(result["resumed"]["logits"], result["zero2"]["logits"], rtol=0, atol=0)
        for name, param in result["zero2"]["params"].items():
            torch.testing.assert_close(result["resumed"]["params"][name], param, rtol=0, atol=0, msg=name)


def test_our_checkpoint_loads_into_the_deepspeed_strategy_at_ep2(runs):
    _, _, wide, _, two = runs
    for rank, result in enumerate(two):
        torch.testing.assert_close(result["ours"]["logits"], wide["logits"], rtol=0, atol=0)
        for name, param in wide["params"].items():
            torch.testing.assert_close(result["ours"]["params"][name], local(param, name, rank, 2), rtol=0, atol=0)


@pytest.mark.parametrize("source,trained", [("zero2", "two"), ("stage1", 1), ("stage3", 3)])
def test_a_deepspeed_checkpoint_converts_to_one_our_inference_engine_loads(runs, source, trained):
    tmp, _, _, one, two = runs
    convert_to_lightning(tmp / source, tmp / f"{source}.ckpt")
    engine = InferenceEngine.from_checkpoint(tmp / f"{source}.ckpt", config=tmp / "config.yaml")
    expected = two[0]["zero2"]["logits"] if trained == "two" else one[trained]["logits"]
    with torch.no_grad():
        torch.testing.assert_close(engine.model(probe_batch()).logits, expected, rtol=0, atol=0)
    converted = torch.load(tmp / f"{source}.ckpt", weights_only=True)
    assert converted["global_step"] == 20 and "optimizer_states" not in converted


def test_gradient_clipping_with_sharded_experts_is_refused(runs):
    _, _, _, _, two = runs
    assert "gradient clipping needs expert_parallel_size=1 with DeepSpeed" in two[0]["clip_error"]
    assert "gradient_clip_val=1.0 and expert_parallel_size=2" in two[0]["clip_error"]


def _four_processes(rank, world_size, tmp):
    run, result = fit(DeepSpeedExpertParallelStrategy(stage=2, expert_parallel_size=2), world_size, rank)
    run.save_checkpoint(f"{tmp}/dp2_ep2")
    torch.save(result, f"{tmp}/four{rank}.pt")


def test_zero2_on_4_processes_with_2_replicas_of_the_experts_equals_one_process(tmp_path):
    # Experts are reduced over their data-parallel replicas (ranks 0, 2 and 1, 3), dense parameters over all four.
    _, reference = fit("auto", 1, 0, batch_size=4 * BATCH)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(RUN_CONFIG))
    run_workers(_four_processes, 4, str(tmp_path))
    four = [torch.load(tmp_path / f"four{rank}.pt") for rank in range(4)]
    losses = list(torch.tensor([result["losses"] for result in four]).mean(0))
    for rank, result in enumerate(four):
        assert_same_run({**result, "losses": losses}, reference, rank, ep=2)
    convert.main([str(tmp_path / "dp2_ep2"), str(tmp_path / "dp2_ep2.ckpt")])  # the command line
    engine = InferenceEngine.from_checkpoint(tmp_path / "dp2_ep2.ckpt", config=tmp_path / "config.yaml")
    with torch.no_grad():
        torch.testing.assert_close(engine.model(probe_batch()).logits, four[0]["logits"], rtol=0, atol=0)
