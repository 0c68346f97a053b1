"""ExpertParallelStrategy(dense_parallel="fully_shard"): dense parameters sharded by FSDP2, experts by expert
parallelism, in a Lightning Trainer on 2 and 4 gloo processes against a one-process Trainer on the same global
batches (losses, gradients, weights, AdamW state, outputs), and checkpoints that move between dense layouts and
expert-parallel sizes."""

import pytest
import torch
import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, DistributedSampler

from moe_lightning import ExpertParallelStrategy, GroupedExperts, MoELayer
from moe_lightning.routing import TopKRouter
from moe_lightning.strategies.dense import shard_units
from tests.distributed.launch import run_workers
from tests.distributed.lm_cases import BATCH, STEPS, build_module, loader, probe_batch, trainer

# As in test_strategy_trainer: Adam turns fp32 summation-order noise of near-zero gradients into ~1e-5.
TOL = {"rtol": 1e-4, "atol": 2e-5}
FULLY_SHARD = {"dense_parallel": "fully_shard"}


class LossTrace(Callback):
    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].detach().clone())


def _full(tensor):
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _snapshot(module, optimizer, grads=False):
    """Whole weights (and gradients), AdamW state by parameter name, outputs on a fixed batch (a collective call)."""
    names = {id(p): n for n, p in module.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    state = {order[pid]: {k: _full(v) for k, v in s.items()} for pid, s in optimizer.state_dict()["state"].items()}
    snapshot = {"params": {n: _full(p).detach().clone() for n, p in module.named_parameters()}, "optim": state}
    if grads:
        snapshot["grads"] = {n: _full(p.grad) for n, p in module.named_parameters() if p.grad is not None}
    if hasattr(module, "model"):
        with torch.no_grad():
            snapshot["logits"] = module.model(probe_batch()).logits
    return snapshot


def _fit(rank, world_size, batch_size=BATCH, ckpt_path=None, save=None, accumulate=1, **strategy_kwargs):
    """Train (or, with ``ckpt_path`` at ``max_steps``, only restore) and return the snapshot and the mean loss trace."""
    module, trace = build_module(), LossTrace()
    strategy = ExpertParallelStrategy(**strategy_kwargs)
    fit = trainer(strategy, world_size, callbacks=[trace], accumulate_grad_batches=accumulate)
    fit.fit(module, loader(batch_size, world_size, rank), ckpt_path=ckpt_path)
    if save is not None:
        fit.save_checkpoint(save)
    snapshot = _snapshot(module, fit.optimizers[0], grads=ckpt_path is None)
    if trace.losses:
        losses = torch.stack(trace.losses)
        dist.all_reduce(losses)
        snapshot["losses"] = losses / world_size
    return snapshot


def _world4(rank, world_size, tmp):
    out = {"trained": _fit(rank, world_size, expert_parallel_size=2, data_parallel_size=2, **FULLY_SHARD)}
    # The chain of layouts starts at the one-process checkpoint: -> EP=4 fully_shard -> EP=2 replicate -> ...
    out["chain4"] = _fit(
        rank, world_size, ckpt_path=f"{tmp}/reference.ckpt", save=f"{tmp}/chain4", expert_parallel_size=4, **FULLY_SHARD
    )
    torch.save(out, f"{tmp}/world4_{rank}.pt")


def _world2(rank, world_size, tmp):
    out = {"trained": _fit(rank, world_size, save=f"{tmp}/fs2", **FULLY_SHARD)}
    out["chain2"] = _fit(rank, world_size, ckpt_path=f"{tmp}/chain4", save=f"{tmp}/chain2")
    out["chain2fs"] = _fit(
        rank, world_size, ckpt_path=f"{tmp}/chain2", save=f"{tmp}/chain2fs", expert_parallel_size=1, **FULLY_SHARD
    )
    out["fs2_replicate"] = _fit(rank, world_size, ckpt_path=f"{tmp}/fs2")
    # Two micro-batches of one sequence per step: FSDP holds back the reduce-scatter until the second.
    out["accumulated"] = _fit(rank, world_size, batch_size=BATCH // 2, accumulate=2, **FULLY_SHARD)
    out["custom"] = _fit_custom(rank, world_size)
    torch.save(out, f"{tmp}/world2_{rank}.pt")


def _world1(rank, world_size, tmp):
    out = {name: _fit(rank, world_size, ckpt_path=f"{tmp}/{name}") for name in ("chain2fs", "fs2")}
    clipping = trainer(ExpertParallelStrategy(**FULLY_SHARD), world_size, gradient_clip_val=1.0)
    with pytest.raises(ValueError, match="dense_parallel='fully_shard', got gradient_clip_val=1.0"):
        clipping.fit(build_module(), loader(BATCH, world_size, rank))
    torch.save(out, f"{tmp}/world1_{rank}.pt")


def _local(full, name, ep_rank, ep):
    """Expert-parallel rank ``ep_rank``'s slice of an expert tensor of the one-process model (others: whole)."""
    if "experts." not in name or full.dim() == 0:
        return full
    size = full.shape[0] // ep
    return full[ep_rank * size : (ep_rank + 1) * size]


def _assert_matches(snapshot, reference, ep_rank, ep, grads=False):
    if "logits" in reference:
        torch.testing.assert_close(snapshot["logits"], reference["logits"], **TOL)
    for kind in ["params", "grads"] if grads else ["params"]:
        assert snapshot[kind].keys() == reference[kind].keys()
        for name, value in reference[kind].items():
            _close(snapshot[kind][name], _local(value, name, ep_rank, ep), f"{kind} {name}")
    assert snapshot["optim"].keys() == reference["optim"].keys()
    for name, state in reference["optim"].items():
        for key, value in state.items():
            _close(snapshot["optim"][name][key], _local(value, name, ep_rank, ep), f"{name} {key}")


def _close(actual, expected, what):
    torch.testing.assert_close(actual, expected, **TOL, msg=lambda message: f"{what}: {message}")


# ----------------------------------------------------------------- a LightningModule without MoETransformer
DIM, TOKENS = 16, 4


class TinyMoEModule(LightningModule):
    """A linear layer and an MoELayer straight in the LightningModule; ``training_step`` skips ``forward``.

    Its AdamW asks for the multi-tensor kernels, which refuse groups that mix DTensor and plain parameters.
    """

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.proj = nn.Linear(DIM, DIM)
        router = TopKRouter(DIM, 4, num_experts_per_token=2, load_balance_coef=0.0)
        self.moe = MoELayer(router, GroupedExperts(4, DIM, 24, init_std=0.2))

    def training_step(self, batch, batch_idx):
        y, _ = self.moe(self.proj(batch))
        return (y - batch).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2, foreach=True)


def _custom_data(world_size):
    return torch.randn(STEPS * BATCH * world_size, TOKENS, DIM, generator=torch.Generator().manual_seed(9))


def _fit_custom(rank, world_size):
    """One process on the global batches (``rank=None``) or rank ``rank`` of ``world_size`` on its share."""
    module, data = TinyMoEModule(), _custom_data(2)
    if rank is None:
        strategy, devices, data_loader = "auto", 1, DataLoader(data, batch_size=BATCH * 2)
    else:
        strategy, devices = ExpertParallelStrategy(**FULLY_SHARD), world_size
        sampler = DistributedSampler(data, world_size, rank, shuffle=False)
        data_loader = DataLoader(data, batch_size=BATCH, sampler=sampler)
    fit = trainer(strategy, devices)
    fit.fit(module, data_loader)
    if rank is not None:
        assert isinstance(module.proj.weight, DTensor) and not isinstance(module.moe.experts.w_in_EDH, DTensor)
        # Stepped one tensor at a time, but checkpoints keep the module's own choice.
        assert fit.optimizers[0].param_groups[0]["foreach"] is False
        assert fit.strategy.optimizer_state(fit.optimizers[0])["param_groups"][0]["foreach"] is True
    return _snapshot(module, fit.optimizers[0], grads=True)


# ----------------------------------------------------------------- runs
def _reference(tmp, world_size, save=False):
    module, trace = build_module(), LossTrace()
    one = trainer("auto", 1, callbacks=[trace])
    one.fit(module, loader(world_size * BATCH, world_size))  # the global batch of world_size ranks, unsplit
    if save:
        one.save_checkpoint(tmp / "reference.ckpt")
    return {**_snapshot(module, one.optimizers[0], grads=True), "losses": torch.stack(trace.losses)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fully_shard")
    references = {2: _reference(tmp, 2, save=True), 4: _reference(tmp, 4), "custom": _fit_custom(None, 1)}
    for world_size, worker in ((4, _world4), (2, _world2), (1, _world1)):
        run_workers(worker, world_size, str(tmp))
    results = {w: [torch.load(tmp / f"world{w}_{r}.pt") for r in range(w)] for w in (4, 2, 1)}
    return references, results


def test_training_at_ep2_matches_one_process(runs):
    references, results = runs
    for rank, out in enumerate(results[2]):
        torch.testing.assert_close(out["trained"]["losses"], references[2]["losses"], **TOL)
        _assert_matches(out["trained"], references[2], rank, ep=2, grads=True)


def test_training_at_ep2_dp2_matches_one_process(runs):
    references, results = runs
    for rank, out in enumerate(results[4]):
        torch.testing.assert_close(out["trained"]["losses"], references[4]["losses"], **TOL)
        _assert_matches(out["trained"], references[4], rank % 2, ep=2, grads=True)


def test_gradient_accumulation_matches_one_process(runs):
    references, results = runs
    for rank, out in enumerate(results[2]):
        _assert_matches(out["accumulated"], references[2], rank, ep=2, grads=True)


def test_lightning_module_without_a_block_list_matches_one_process(runs):
    references, results = runs
    for rank, out in enumerate(results[2]):
        _assert_matches(out["custom"], references["custom"], rank, ep=2, grads=True)


def test_fully_shard_checkpoint_resumes_with_replicate_at_world_2_and_in_one_process(runs):
    references, results = runs
    for rank, out in enumerate(results[2]):
        _assert_matches(out["fs2_replicate"], references[2], rank, ep=2)
    _assert_matches(results[1][0]["fs2"], references[2], 0, ep=1)


def test_checkpoint_moves_along_1_to_4fs_to_2_to_2fs_to_1(runs):
    """EP sizes 1 -> 4 -> 2 -> 1 (at world 2, data-parallel experts) -> 1, switching the dense layout each time."""
    references, results = runs
    for rank, out in enumerate(results[4]):
        _assert_matches(out["chain4"], references[2], rank, ep=4)
    for rank, out in enumerate(results[2]):
        _assert_matches(out["chain2"], references[2], rank, ep=2)
        _assert_matches(out["chain2fs"], references[2], 0, ep=1)
    _assert_matches(results[1][0]["chain2fs"], references[2], 0, ep=1)


def test_invalid_dense_parallel_is_refused():
    message = r"dense_parallel must be one of \('replicate', 'fully_shard'\), got dense_parallel='fsdp'"
    with pytest.raises(ValueError, match=message):
        ExpertParallelStrategy(dense_parallel="fsdp")


def test_shard_units_are_the_block_list_elements_then_the_roots():
    module = build_module()
    experts = [p for n, p in module.named_parameters() if ".experts." in n]
    assert shard_units(module, experts) == ["model.blocks.0", "model.blocks.1", "model"]
    tiny = TinyMoEModule()
    assert shard_units(tiny, tiny.moe.experts.parameters()) == ["proj", "moe"]
    tiny.scale = nn.Parameter(torch.ones(1))  # a parameter of the LightningModule itself: it is the one root
    assert shard_units(tiny, tiny.moe.experts.parameters()) == [""]


def test_weights_tied_across_two_roots_are_refused():
    tiny = TinyMoEModule()
    tiny.head = nn.Linear(DIM, DIM)
    tiny.head.weight = tiny.proj.weight
    with pytest.raises(ValueError, match=r"'proj.weight' \(unit 'proj'\) is also 'head.weight' \(unit 'head'\)"):
        shard_units(tiny, tiny.moe.experts.parameters())
