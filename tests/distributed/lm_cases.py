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


def build_module() -> MoELightningModule:
    torch.manual_seed(3)
    config = MoETransformerConfig(vocab_size=VOCAB, dim=16, num_layers=2, num_heads=2, num_experts=4, expert_hidden_dim=24)
    # No balance loss: it is computed over each rank's tokens, so only dropless, loss-free routing is
    # comparable with an unsplit global batch (the layer tests cover the per-rank losses).
    model = MoETransformer(config, router=lambda d, e: TopKRouter(d, e, num_experts_per_token=2, load_balance_coef=0.0))
    return MoELightningModule(model, lr=1e-2, warmup_steps=0, max_steps=STEPS, log_layer_stats=False)


def trainer(strategy, devices: int, max_steps: int = STEPS, **kwargs) -> Trainer:
    return Trainer(
        accelerator="cpu", devices=devices, strategy=strategy, max_steps=max_steps, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        **kwargs,
    )


def probe_batch() -> torch.Tensor:
    return torch.randint(0, VOCAB, (3, SEQ), generator=torch.Generator().manual_seed(11))
