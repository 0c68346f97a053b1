"""A callback that records how a CLI run built its model, for tests that run the CLI (in-process or as processes)."""

import json
from pathlib import Path

from lightning.pytorch.callbacks import Callback

from benchmarks.meta_init_memory import peak_rss_bytes
from moe_lightning.models.materialize import expert_rows


class BuildProbe(Callback):
    """Whether the model was still on the meta device at ``setup`` (before ``configure_model``), the experts each
    MoE layer holds and the process's peak RSS at ``on_fit_start`` (built, not trained yet), and the loss of every
    step. With ``out``, each rank writes them to ``out`` with ``{rank}`` replaced, at the end of fit."""

    def __init__(self, out: str | None = None) -> None:
        self.out = out
        self.report: dict = {"losses": []}

    def setup(self, trainer, pl_module, stage) -> None:
        model = pl_module.model
        self.report["meta_at_setup"] = None if model is None else all(p.is_meta for p in model.parameters())

    def on_fit_start(self, trainer, pl_module) -> None:
        model = pl_module.model
        self.report["meta_at_fit_start"] = any(p.is_meta for p in model.parameters())
        self.report["expert_rows"] = {name: model.get_parameter(name).shape[0] for name in expert_rows(model)}
        self.report["peak_rss_bytes"] = peak_rss_bytes()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.report["losses"].append(outputs["loss"].item())

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.out is not None:
            Path(self.out.format(rank=trainer.global_rank)).write_text(json.dumps(self.report))
