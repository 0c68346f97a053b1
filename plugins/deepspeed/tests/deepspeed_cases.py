"""Runs shared by the DeepSpeed strategy tests: the tiny LM of tests/distributed/lm_cases trained for a number of steps
by a strategy, with each step's loss, the trained weights and the logits on a fixed batch (all on the CPU)."""

import contextlib

import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, DistributedSampler

from tests.distributed.lm_cases import BATCH, RandomTokens, build_module, probe_batch, trainer

STEPS = 20


class LossTrace(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.losses.append(outputs["loss"].item())


def loader(batch_size: int, world_size: int, rank: int) -> DataLoader:
    """``STEPS`` batches per rank; rank r of W reads samples r, r + W, ... (the global batch of a step is the
    one-process batch of that step, W times larger)."""
    dataset = RandomTokens(STEPS * batch_size * world_size)
    sampler = DistributedSampler(dataset, world_size, rank, shuffle=False)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler)


def fit(strategy, world_size: int, rank: int, batch_size: int = BATCH, ckpt_path=None, **trainer_kwargs):
    """Train ``build_module()`` for STEPS steps; returns (the trainer, its result: loss trace, params, logits)."""
    module = build_module()
    trace = LossTrace()
    run = trainer(strategy, world_size, max_steps=STEPS, callbacks=[trace], **trainer_kwargs)
    run.fit(module, loader(batch_size, world_size, rank), ckpt_path=ckpt_path)
    with torch.no_grad():
        logits = module.model(probe_batch()).logits
    with gathered(run, module):
        params = {name: p.detach().clone() for name, p in module.named_parameters()}
    return run, {"losses": trace.losses, "params": params, "logits": logits}


def gathered(run, module):
    """ZeRO-3 keeps each rank's partition of the parameters only: gather them whole."""
    if getattr(run.strategy, "stage", None) != 3:
        return contextlib.nullcontext()
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters

    return GatheredParameters(list(module.parameters()))


def local(full, name, rank, ep):
    """Rank ``rank``'s slice of an expert tensor of the one-process model (expert-parallel rank ``rank % ep`` of the
    ``(data_parallel, expert_parallel)`` mesh); other tensors whole."""
    if "experts." not in name:
        return full
    size = full.shape[0] // ep
    return full[rank % ep * size : (rank % ep + 1) * size]
