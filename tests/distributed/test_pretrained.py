"""A transformers checkpoint (``pretrained=DIR``) and a fresh model built on meta, each trained with expert
parallelism on 2 gloo processes that materialise only their own experts, against a one-process run on the same
global batches: the loss of every step, the trained weights, and a sharded checkpoint that resumes."""

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from moe_lightning import ExpertParallelStrategy, MoELightningModule
from tests.distributed.launch import run_workers
from tests.distributed.lm_cases import BATCH, STEPS, TOL, assert_matches, build_module, loader, snapshot, trainer

pytest.importorskip("transformers")
from tests.parity.hf_tiny import save, tiny_hf_model  # noqa: E402

NUM_EXPERTS = 8


class LossTrace(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(outputs["loss"].item())


def pretrained_module(directory) -> MoELightningModule:
    return MoELightningModule(pretrained=str(directory), lr=1e-2, warmup_steps=0, max_steps=2 * STEPS,
                              log_layer_stats=False)


def _fit(module, world_size, rank, max_steps, **kwargs):
    trace = LossTrace()
    fit = trainer(ExpertParallelStrategy() if rank is not None else "auto", world_size if rank is not None else 1,
                  max_steps=max_steps, callbacks=[trace])
    fit.fit(module, loader(BATCH if rank is not None else 2 * BATCH, 2, rank), **kwargs)
    return fit, trace.losses


def _workers(rank, world_size, tmp):
    module = pretrained_module(f"{tmp}/hf")
    fit, losses = _fit(module, world_size, rank, STEPS)
    held = {layer.experts.num_experts for layer in module.model.moe_layers}
    fit.save_checkpoint(f"{tmp}/ep2")
    trained = snapshot(module, fit.optimizers[0])
    resumed = pretrained_module(f"{tmp}/hf")
    resume, resumed_losses = _fit(resumed, world_size, rank, 2 * STEPS, ckpt_path=f"{tmp}/ep2")
    lazy = build_module(lazy=True)
    lazy_fit, _ = _fit(lazy, world_size, rank, STEPS)
    torch.save({"losses": losses, "held": held, "trained": trained, "resumed_losses": resumed_losses,
                "resumed": snapshot(resumed, resume.optimizers[0]), "lazy": snapshot(lazy, lazy_fit.optimizers[0])},
               f"{tmp}/pretrained{rank}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pretrained")
    # No balance loss: it is computed over each rank's tokens (see lm_cases.build_model).
    save(tiny_hf_model("olmoe", num_experts=NUM_EXPERTS, router_aux_loss_coef=0.0), tmp / "hf")
    one = pretrained_module(tmp / "hf")
    fit, losses = _fit(one, 1, None, STEPS)
    fit.save_checkpoint(tmp / "one.ckpt")
    reference = snapshot(one, fit.optimizers[0])
    # Resumed the same way in one process (a resumed run need not retrace an uninterrupted one, even there).
    continued = pretrained_module(tmp / "hf")
    continued_fit, continued_losses = _fit(continued, 1, None, 2 * STEPS, ckpt_path=tmp / "one.ckpt")
    plain = build_module()
    plain_fit, _ = _fit(plain, 1, None, STEPS)
    run_workers(_workers, 2, str(tmp))
    return {
        "losses": losses, "reference": reference,
        "continued_losses": continued_losses, "continued": snapshot(continued, continued_fit.optimizers[0]),
        "plain": snapshot(plain, plain_fit.optimizers[0]),
        "ranks": [torch.load(tmp / f"pretrained{r}.pt", weights_only=False) for r in range(2)],
    }


def _mean_of_ranks(runs, key):
    """Each rank's loss is the mean over its half of the global batch (same token counts, no padding)."""
    return torch.tensor([sum(pair) / 2 for pair in zip(*(r[key] for r in runs["ranks"]))])


def test_each_rank_holds_only_its_experts(runs):
    for rank in runs["ranks"]:
        assert rank["held"] == {NUM_EXPERTS // 2}


def test_imported_checkpoint_at_ep2_has_the_one_process_loss_trace_and_weights(runs):
    for rank, result in enumerate(runs["ranks"]):
        assert_matches(result["trained"], runs["reference"], rank, ep=2)
    torch.testing.assert_close(_mean_of_ranks(runs, "losses"), torch.tensor(runs["losses"]), **TOL)


def test_its_sharded_checkpoint_resumes_and_continues_like_one_process(runs):
    assert len(runs["continued_losses"]) == STEPS
    torch.testing.assert_close(_mean_of_ranks(runs, "resumed_losses"), torch.tensor(runs["continued_losses"]), **TOL)
    for rank, result in enumerate(runs["ranks"]):
        assert_matches(result["resumed"], runs["continued"], rank, ep=2)


def test_a_fresh_model_built_on_meta_at_ep2_trains_like_the_ordinary_build_in_one_process(runs):
    for rank, result in enumerate(runs["ranks"]):
        assert_matches(result["lazy"], runs["plain"], rank, ep=2)
