"""A tiny MoE model, labelled batches and a logger that remembers, for short CPU Trainer runs."""

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger
from torch.utils.data import DataLoader

from moe_lightning.models import MoETransformer, MoETransformerConfig
from moe_lightning.module import MoELightningModule
from tests.unit.helpers import RepeatingPatternDataset

CONFIG = MoETransformerConfig(vocab_size=32, dim=16, num_layers=2, num_heads=2, num_experts=4, expert_hidden_dim=16)
BATCH, LENGTH, TOP_K = 4, 16, 2
ROWS_PER_STEP = BATCH * LENGTH * TOP_K


class LabelledPatterns(RepeatingPatternDataset):
    """Pattern sequences whose per-token label is the token's parity, as ``task_ids``."""

    def __getitem__(self, idx):
        sample = super().__getitem__(idx)
        return {**sample, "task_ids": sample["input_ids"] % 2}


def loader():
    return DataLoader(LabelledPatterns(num_samples=64, seq_len=LENGTH), batch_size=BATCH)


def tiny_module():
    return MoELightningModule(MoETransformer(CONFIG), warmup_steps=1)


def trainer(tmp_path, callbacks, logger=False, **kwargs):
    kwargs = {"enable_checkpointing": False, **kwargs}
    return Trainer(
        accelerator="cpu", logger=logger, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path, callbacks=callbacks, **kwargs,
    )


class RecordingLogger(Logger):
    def __init__(self):
        super().__init__()
        self.metrics = {}

    @property
    def name(self):
        return "recording"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.metrics.setdefault(step, {}).update(metrics)


class StepRecorder(Callback):
    """Keeps each optimizer step's routings and batch, as the callbacks under test saw them."""

    def __init__(self):
        self.steps = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps[trainer.global_step] = (outputs["routings"], {k: v.clone() for k, v in batch.items()})


def plain_load(routing, num_experts):
    load = [0] * num_experts
    for expert in routing.expert_idx_N.tolist():
        load[expert] += 1
    return load
