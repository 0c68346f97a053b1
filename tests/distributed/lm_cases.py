"""A tiny MoE language model and data for the Trainer-level tests; deterministic in the seed."""

import torch
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from moe_lightning import MoELightningModule
from moe_lightning.models import MoETransformer
from moe_lightning.models.config import MoETransformerConfig
from moe_lightning.routing import TopKRouter

VOCAB, SEQ, BATCH, STEPS = 32, 8, 2, 3


class RandomTokens(Dataset):
    def __init__(self, num_samples: int) -> None:
        self.tokens = torch.randint(0, VOCAB, (num_samples, SEQ + 1), generator=torch.Generator().manual_seed(7))

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, idx):
        return {"input_ids": self.tokens[idx, :-1], "labels": self.tokens[idx, 1:]}


def loader(batch_size: int, world_size: int, rank: int | None = None) -> DataLoader:
    """``STEPS`` batches per rank. With ``rank``, rank r of W reads samples r, r + W, ... in order (Lightning's own
    sampler would shuffle), so the global batch of a step is the one-process batch of that step."""
    dataset = RandomTokens(STEPS * BATCH * world_size)
    sampler = None if rank is None else DistributedSampler(dataset, world_size, rank, shuffle=False)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler)


def build_model() -> MoETransformer:
    config = MoETransformerConfig(vocab_size=VOCAB, dim=16, num_layers=2, num_heads=2, num_experts=4, expert_hidden_dim=24)
    # No balance loss: it is computed over each rank's tokens, so only dropless, loss-free routing is
    # comparable with an unsplit global batch (the layer tests cover the per-rank losses).
    return MoETransformer(config, router=lambda d, e: TopKRouter(d, e, num_experts_per_token=2, load_balance_coef=0.0))


def build_module(lazy: bool = False) -> MoELightningModule:
    """``lazy``: pass the function that builds the model, which the module calls on the meta device."""
    torch.manual_seed(3)
    model = build_model if lazy else build_model()
    return MoELightningModule(model, lr=1e-2, warmup_steps=0, max_steps=STEPS, log_layer_stats=False, meta_init=lazy)


def trainer(strategy, devices: int, max_steps: int = STEPS, **kwargs) -> Trainer:
    return Trainer(
        accelerator="cpu", devices=devices, strategy=strategy, max_steps=max_steps, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        **kwargs,
    )


def probe_batch() -> torch.Tensor:
    return torch.randint(0, VOCAB, (3, SEQ), generator=torch.Generator().manual_seed(11))


# Adam divides by sqrt(v): near-zero gradients turn fp32 summation-order noise into ~1e-5 weight differences.
TOL = dict(rtol=1e-4, atol=2e-5)


def snapshot(module, optimizer):
    """Weights, optimizer state keyed by parameter name, and outputs on a fixed batch (a collective call)."""
    names = {id(p): n for n, p in module.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    state = {order[pid]: s for pid, s in optimizer.state_dict()["state"].items()}
    with torch.no_grad():
        logits = module.model(probe_batch()).logits
    return {"params": {n: p.detach().clone() for n, p in module.named_parameters()}, "optim": state, "logits": logits}


def _local(full, name, rank, ep):
    """Rank ``rank``'s slice of an expert tensor of the one-process model (other tensors, Adam's step: whole)."""
    if "experts." not in name or full.dim() == 0:
        return full
    size = full.shape[0] // ep
    return full[rank * size : (rank + 1) * size]


def assert_matches(snapshot, reference, rank, ep):
    torch.testing.assert_close(snapshot["logits"], reference["logits"], **TOL)
    for name, param in reference["params"].items():
        torch.testing.assert_close(snapshot["params"][name], _local(param, name, rank, ep), **TOL, msg=lambda m: f"{name}: {m}")
    assert snapshot["optim"].keys() == reference["optim"].keys()
    for name, state in reference["optim"].items():
        for key, value in state.items():
            torch.testing.assert_close(snapshot["optim"][name][key], _local(value, name, rank, ep), **TOL, msg=lambda m: f"{name} {key}: {m}")
