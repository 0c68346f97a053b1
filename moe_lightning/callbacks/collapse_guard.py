"""ExpertCollapseGuard: notices dead experts or a collapsed load and warns, stops, or re-initialises them."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from moe_lightning.analytics import dead_experts, load_entropy
from moe_lightning.callbacks.expert_reinit import reinit_dead_experts
from moe_lightning.callbacks.sampling import StepSampler, step_routings
from moe_lightning.layer import MoELayer

ACTIONS = ("warn", "stop", "reinit")


class ExpertCollapseGuard(Callback):
    """Every ``check_every_n_steps`` optimizer steps, sums each MoE layer's load over ranks; a layer fails the check
    when an expert's load is at most ``dead_threshold`` times the mean, or the load entropy over ``log(E)`` is under
    ``min_load_entropy``. After ``patience`` failed checks in a row it acts:

    - ``"warn"``: a warning naming the layer, the dead experts and the entropy;
    - ``"stop"``: the warning, then ``trainer.should_stop``;
    - ``"reinit"``: the warning, then each dead expert becomes a noisy copy of the layer's busiest expert
      (see :func:`reinit_dead_experts`); a collapse without dead experts is only warned about.

    Args:
        check_every_n_steps: optimizer steps between checks (each costs one all-reduce and a host sync).
        dead_threshold: load at most this times the mean load counts as dead.
        min_load_entropy: normalised load entropy (1 is uniform) below which a layer has collapsed.
        patience: consecutive failed checks before acting.
        action: ``"warn"``, ``"stop"`` or ``"reinit"``.
        reinit_noise: noise of a re-initialised expert, relative to the donor weights' std.
        seed: seeds the re-initialisation noise (with the step), the same on every rank.
    """

    def __init__(
        self,
        check_every_n_steps: int = 50,
        dead_threshold: float = 0.05,
        min_load_entropy: float = 0.5,
        patience: int = 3,
        action: Literal["warn", "stop", "reinit"] = "warn",
        reinit_noise: float = 0.01,
        seed: int = 0,
    ) -> None:
        if check_every_n_steps < 1:
            raise ValueError(f"check_every_n_steps must be >= 1, got check_every_n_steps={check_every_n_steps}")
        if dead_threshold < 0:
            raise ValueError(f"dead_threshold must be >= 0, got dead_threshold={dead_threshold}")
        if not 0 <= min_load_entropy <= 1:
            raise ValueError(f"min_load_entropy must be in [0, 1], got min_load_entropy={min_load_entropy}")
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got patience={patience}")
        if action not in ACTIONS:
            raise ValueError(f"action must be one of {ACTIONS}, got action={action!r}")
        if reinit_noise < 0:
            raise ValueError(f"reinit_noise must be >= 0, got reinit_noise={reinit_noise}")
        self.check_every_n_steps = check_every_n_steps
        self.dead_threshold = dead_threshold
        self.min_load_entropy = min_load_entropy
        self.patience = patience
        self.action = action
        self.reinit_noise = reinit_noise
        self.seed = seed
        self.strikes: list[int] = []
        self.num_reinits = 0
        self._sampler = StepSampler(check_every_n_steps)

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(check_every_n_steps=self.check_every_n_steps, action=self.action)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if not self._sampler.sample(step):
            return
        load_LE = torch.stack([r.tokens_per_expert_E for r in step_routings(outputs)]).double()
        load_LE = trainer.strategy.reduce(load_LE, reduce_op="sum").cpu()
        if len(self.strikes) != len(load_LE):
            self.strikes = [0] * len(load_LE)
        for layer, load_E in enumerate(load_LE):
            dead_E = dead_experts(load_E, self.dead_threshold)
            entropy = float(load_entropy(load_E)) / math.log(len(load_E)) if len(load_E) > 1 else 1.0
            collapsed = bool(dead_E.any()) or entropy < self.min_load_entropy
            self.strikes[layer] = self.strikes[layer] + 1 if collapsed else 0
            if self.strikes[layer] >= self.patience:
                self.strikes[layer] = 0
                self._act(trainer, pl_module, step, layer, load_E, dead_E, entropy)

    def _act(self, trainer: Trainer, pl_module: LightningModule, step: int, layer: int, load_E, dead_E, entropy: float) -> None:
        rank_zero_warn(
            f"expert collapse at step {step}, MoE layer {layer}: dead experts {dead_E.nonzero().flatten().tolist()} "
            f"(load <= {self.dead_threshold} x mean), normalised load entropy {entropy:.3f} "
            f"(minimum {self.min_load_entropy}) for {self.patience} checks; action={self.action!r}"
        )
        if self.action == "stop":
            trainer.should_stop = True
        elif self.action == "reinit" and dead_E.any() and load_E.sum() > 0:
            layers = [m for m in pl_module.modules() if isinstance(m, MoELayer)]
            if len(layers) != len(self.strikes):
                raise ValueError(f"reinit needs one MoELayer per routing: found {len(layers)} layers, {len(self.strikes)} routings")
            generator = torch.Generator().manual_seed(self.seed + step * 1009 + layer)
            reinit_dead_experts(layers[layer], dead_E, int(load_E.argmax()), self.reinit_noise, generator, trainer.optimizers)
            self.num_reinits += 1

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"strikes": list(self.strikes), "num_reinits": self.num_reinits}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.strikes = list(state_dict["strikes"])
        self.num_reinits = state_dict["num_reinits"]
