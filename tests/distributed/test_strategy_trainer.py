"""ExpertParallelStrategy in a Lightning Trainer on 2 gloo processes against a one-process Trainer on the same
global batches: trained weights, outputs, and checkpoints that reload at another expert-parallel size."""

import shutil

import pytest
import torch

from moe_lightning import ExpertParallelStrategy
from moe_lightning.checkpoint import consolidate
from moe_lightning.checkpoint.sharded import load_sharded, shard_file_name
from tests.distributed.launch import run_workers
from tests.distributed.lm_cases import BATCH, TOL, assert_matches, build_module, loader, snapshot, trainer


def _fit_and_save(rank, world_size, tmp):
    module = build_module()
    fit = trainer(ExpertParallelStrategy(), world_size)
    fit.fit(module, loader(BATCH, world_size, rank))
    fit.save_checkpoint(f"{tmp}/ep{world_size}")
    trained = snapshot(module, fit.optimizers[0])
    # 1 -> world_size: resume the one-process run's ordinary checkpoint (already at max_steps: restore only).
    resumed = build_module()
    resume = trainer(ExpertParallelStrategy(), world_size)
    resume.fit(resumed, loader(BATCH, world_size, rank), ckpt_path=f"{tmp}/reference.ckpt")
    torch.save({"trained": trained, "resumed": snapshot(resumed, resume.optimizers[0])}, f"{tmp}/fit{rank}.pt")


def _resume(rank, world_size, tmp, source):
    module = build_module()
    resume = trainer(ExpertParallelStrategy(), world_size)
    resume.fit(module, loader(BATCH, world_size, rank), ckpt_path=f"{tmp}/{source}")
    torch.save(snapshot(module, resume.optimizers[0]), f"{tmp}/resume{world_size}_{rank}.pt")


def _reshard(rank, world_size, tmp, source, target):
    """Restore ``source`` at EP = world_size (already at max_steps: nothing trains), save it as ``target``."""
    module = build_module()
    resume = trainer(ExpertParallelStrategy(), world_size)
    resume.fit(module, loader(BATCH, world_size, rank), ckpt_path=f"{tmp}/{source}")
    resume.save_checkpoint(f"{tmp}/{target}")
    torch.save(snapshot(module, resume.optimizers[0]), f"{tmp}/{target}_{rank}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trainer")
    module = build_module()
    one = trainer("auto", 1)
    one.fit(module, loader(2 * BATCH, 2))  # the global batch of 2 ranks, unsplit
    one.save_checkpoint(tmp / "reference.ckpt")
    reference = snapshot(module, one.optimizers[0])
    run_workers(_fit_and_save, 2, str(tmp))
    run_workers(_resume, 1, str(tmp), "ep2")
    fits = [torch.load(tmp / f"fit{r}.pt") for r in range(2)]
    return tmp, reference, fits, torch.load(tmp / "resume1_0.pt")


def test_training_at_ep2_matches_one_process(runs):
    _, reference, fits, _ = runs
    for rank, fit in enumerate(fits):
        assert_matches(fit["trained"], reference, rank, ep=2)


def test_one_process_checkpoint_resumes_at_ep2(runs):
    _, reference, fits, _ = runs
    for rank, fit in enumerate(fits):
        assert_matches(fit["resumed"], reference, rank, ep=2)


def test_ep2_checkpoint_resumes_at_ep1(runs):
    _, reference, _, resumed = runs
    assert_matches(resumed, reference, rank=0, ep=1)


def test_checkpoint_reshards_along_1_to_4_to_2_to_1(runs):
    tmp, reference, _, _ = runs
    chain = [("reference.ckpt", "chain4", 4), ("chain4", "chain2", 2), ("chain2", "chain1", 1)]
    for source, target, ep in chain:
        run_workers(_reshard, ep, str(tmp), source, target)
        for rank in range(ep):
            assert_matches(torch.load(tmp / f"{target}_{rank}.pt"), reference, rank, ep)


def test_consolidated_export_equals_one_process_checkpoint(runs):
    tmp, _, _, _ = runs
    merged = consolidate(tmp / "ep2")
    expected = torch.load(tmp / "reference.ckpt", weights_only=False)
    for name, value in expected["state_dict"].items():
        torch.testing.assert_close(merged["state_dict"][name], value, **TOL, msg=name)
    for pid, state in expected["optimizer_states"][0]["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(merged["optimizer_states"][0]["state"][pid][key], value, **TOL)
    assert merged["global_step"] == expected["global_step"]


def _broken_copy(tmp, runs_dir, name):
    target = tmp / name
    shutil.copytree(runs_dir / "ep2", target)
    return target


def test_checkpoint_missing_an_expert_shard_is_refused(runs, tmp_path):
    broken = _broken_copy(tmp_path, runs[0], "missing")
    (broken / shard_file_name(1, 2)).unlink()
    with pytest.raises(ValueError, match=r"missing expert shard\(s\) \[1\] of 2.*experts-00001-of-00002"):
        load_sharded(broken, ep_rank=0, ep_size=1)


def test_checkpoint_with_a_duplicated_expert_shard_is_refused(runs, tmp_path):
    broken = _broken_copy(tmp_path, runs[0], "duplicated")
    shutil.copy(broken / shard_file_name(0, 2), broken / "experts-copy.safetensors")
    with pytest.raises(ValueError, match=r"duplicated expert shards .*0: \['experts-00000-of-00002.safetensors', 'experts-copy"):
        load_sharded(broken, ep_rank=0, ep_size=2)


CLIP = 0.05  # small enough that every step of this model clips


def _sgd_module():
    # Plain SGD with a large step: Adam's update hardly changes when a step's gradients are scaled, and a small SGD
    # step would keep a wrong clip factor's effect inside the tolerance.
    module = build_module()
    module.configure_optimizers = lambda: torch.optim.SGD(module.parameters(), lr=20.0)
    return module


def _fit_clipped(rank, world_size, tmp):
    module = _sgd_module()
    fit = trainer(ExpertParallelStrategy(), world_size, gradient_clip_val=CLIP)
    fit.fit(module, loader(BATCH, world_size, rank))
    torch.save(snapshot(module, fit.optimizers[0]), f"{tmp}/clipped{rank}.pt")


def test_gradient_norm_clipping_at_ep2_uses_the_whole_models_norm(tmp_path):
    # Each rank alone would see half the experts, compute a smaller norm and clip its (shared) dense gradients less.
    module = _sgd_module()
    one = trainer("auto", 1, gradient_clip_val=CLIP)
    one.fit(module, loader(2 * BATCH, 2))
    reference = snapshot(module, one.optimizers[0])
    unclipped = _sgd_module()
    trainer("auto", 1).fit(unclipped, loader(2 * BATCH, 2))
    assert not torch.allclose(unclipped.model.embed.weight, module.model.embed.weight, **TOL)
    run_workers(_fit_clipped, 2, str(tmp_path))
    for rank in range(2):
        assert_matches(torch.load(tmp_path / f"clipped{rank}.pt"), reference, rank, ep=2)
