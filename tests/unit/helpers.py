"""Small training fixtures shared by the unit tests."""

import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, Dataset


class RepeatingPatternDataset(Dataset):
    """Sequences of a fixed repeating token pattern with a random phase: easy to learn, so the loss must fall."""

    def __init__(self, num_samples=64, seq_len=16, period=5, vocab_size=32):
        self.num_samples, self.seq_len, self.period, self.vocab_size = num_samples, seq_len, period, vocab_size

    def __len__(self):
        return self.num_samples

    def __getitem__(self, idx):
        tokens = (torch.arange(self.seq_len + 1) + idx) % self.period + 1
        return {"input_ids": tokens[:-1], "labels": tokens[1:]}


def pattern_loader(batch_size=8, **kwargs):
    return DataLoader(RepeatingPatternDataset(**kwargs), batch_size=batch_size)


class LossRecorder(Callback):
    """Keeps the training loss of every step."""

    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].item())
