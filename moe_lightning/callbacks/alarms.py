"""RoutingAlarms: thresholds on per-layer routing statistics (churn, bf16 near-ties, dead experts, collapse, ...), each
rule warning, stopping training, or acting on the layer when it fires."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from moe_lightning.analytics import BF16_TIE_MARGIN, LayerRoutingStats, RoutingCounts, dead_experts, layer_statistics
from moe_lightning.callbacks.expert_reinit import reinit_dead_experts
from moe_lightning.callbacks.routing_window import ChurnProbe, CountsWindow
from moe_lightning.callbacks.sampling import StepSampler, step_routings
from moe_lightning.callbacks.validation import check_number
from moe_lightning.strategies.sharding import holds_local_experts, moe_layers

Metric = Literal["churn", "near_tie_fraction", "dead_experts", "load_entropy", "imbalance", "cv", "dropped_fraction"]
Action = Literal["warn", "stop", "reinit", "bias_bump"]
METRICS: tuple[str, ...] = get_args(Metric)
ACTIONS: tuple[str, ...] = get_args(Action)
LOW_IS_BAD = ("load_entropy",)
"""Metrics that fire below their threshold; the others fire above it."""
FRACTIONS = ("churn", "near_tie_fraction", "load_entropy", "dropped_fraction")
"""Metrics in [0, 1]; the others are >= 0."""
LOAD_METRICS = ("dead_experts", "load_entropy", "imbalance", "cv")
"""Metrics of the expert load: the acting actions (reinit, bias_bump), which act on dead experts, need one."""


@dataclass(frozen=True)
class AlarmRule:
    """One alarm: fires on an MoE layer when ``metric`` is past ``threshold`` at ``patience`` checks in a row, then
    counts again from zero."""

    metric: Metric
    """``churn`` (share of probe tokens whose top-1 expert changed since the last check), ``near_tie_fraction``
    (tokens whose top-k margin is under the bf16 rounding margin), ``dead_experts`` (how many), ``dropped_fraction``,
    ``imbalance`` (max / mean load) and ``cv`` fire above the threshold; ``load_entropy`` (over ``log E``, 1 is
    uniform: a collapse is low) fires below it."""
    threshold: float
    """In ``[0, 1]`` for the shares and ``load_entropy``, ``>= 0`` for the others."""
    patience: int = 1
    """Consecutive checks past the threshold before it fires."""
    action: Action = "warn"
    """``warn``: a warning; ``stop``: the warning, then training stops; ``reinit``: the warning, then the layer's dead
    experts become noisy copies of its busiest one; ``bias_bump``: the warning, then the dead experts' selection bias
    (aux-loss-free routers, ``expert_bias=True``) goes up by ``RoutingAlarms(bias_bump)``. The last two need a load
    metric (``dead_experts``, ``load_entropy``, ``imbalance``, ``cv``)."""

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"unknown alarm metric {self.metric!r}; choose from {list(METRICS)}")
        where = f"alarm rule {self.metric!r}"
        threshold = check_number("threshold", self.threshold, where)
        if self.metric in FRACTIONS and not 0 <= threshold <= 1:
            raise ValueError(f"{where}: threshold must be in [0, 1], got threshold={self.threshold}")
        if threshold < 0:
            raise ValueError(f"{where}: threshold must be >= 0, got threshold={self.threshold}")
        if isinstance(self.patience, bool) or not isinstance(self.patience, int):
            raise TypeError(f"{where}: patience must be an int, got patience={self.patience!r}")
        if self.patience < 1:
            raise ValueError(f"{where}: patience must be >= 1, got patience={self.patience}")
        if self.action not in ACTIONS:
            raise ValueError(f"{where}: unknown action {self.action!r}; choose from {list(ACTIONS)}")
        if self.action in ("reinit", "bias_bump") and self.metric not in LOAD_METRICS:
            raise ValueError(
                f"{where}: action={self.action!r} acts on the layer's dead experts, so it needs a load metric "
                f"{list(LOAD_METRICS)}, got metric={self.metric!r}"
            )
        object.__setattr__(self, "threshold", threshold)  # an int from Python or YAML is a float like any other

    def is_past(self, value: float) -> bool:
        return value < self.threshold if self.metric in LOW_IS_BAD else value > self.threshold


@dataclass
class FiredAlarm:
    """What :class:`RoutingAlarms` writes to ``alarms.jsonl`` (one line each) when a rule fires."""

    step: int
    layer: int
    metric: str
    value: float
    threshold: float
    patience: int
    action: str
    experts: list[int]
    """The experts the action changed (re-initialised or bias-bumped); empty for ``warn`` and ``stop``."""
    message: str


class RoutingAlarms(Callback):
    """Every ``check_every_n_steps`` optimizer steps, computes each MoE layer's routing statistics over the last
    ``window_steps`` steps (the statistics :class:`RouterStatsMonitor` logs, from the same counts, summed over ranks
    in one all-reduce) and checks every rule on every layer; a rule that fires acts as its ``action`` says. All ranks
    see the same reduced numbers, so they fire, stop and act alike.

    A fired alarm is a rank-zero warning naming the step, layer, metric, value and threshold; a scalar
    ``alarms/layer{l}/{metric}`` (its value) at that step to every logger, and the message as TensorBoard text; and
    a line in ``alarms_filename`` in the log dir, which ``moe-lightning dashboard`` lists beside the statistics.
    Other steps cost one int comparison.

    Args:
        rules: the alarms (:class:`AlarmRule`, or dicts of its fields).
        check_every_n_steps: optimizer steps between checks (each costs one all-reduce and a host sync).
        window_steps: steps summed into each check (dead experts are judged over this window).
        dead_threshold: an expert is dead when its load in the window is at most this times the mean load.
        near_tie_threshold: top-k score margin under which a token counts as a near-tie.
        probe_size: sequences of the first sampled batch kept to measure churn (a churn rule needs it > 0; without
            one, no probe runs).
        reinit_noise: noise of a re-initialised expert, relative to the donor weights' std.
        seed: seeds the re-initialisation noise (with the step and layer), the same on every rank.
        bias_bump: what ``bias_bump`` adds to a dead expert's selection bias (the scores it is added to are
            router probabilities in ``[0, 1]``).
        alarms_filename: the JSON-lines file of fired alarms in the log dir; ``None`` writes none.
    """

    def __init__(
        self,
        rules: list[AlarmRule],
        check_every_n_steps: int = 50,
        window_steps: int = 1,
        dead_threshold: float = 0.05,
        near_tie_threshold: float = BF16_TIE_MARGIN,
        probe_size: int = 4,
        reinit_noise: float = 0.01,
        seed: int = 0,
        bias_bump: float = 0.1,
        alarms_filename: str | None = "alarms.jsonl",
    ) -> None:
        if isinstance(rules, (AlarmRule, dict, str)) or not rules:
            raise ValueError(f"rules must be a non-empty list of alarm rules, got rules={rules!r}")
        self.rules = [_as_rule(rule) for rule in rules]
        if check_every_n_steps < 1:
            raise ValueError(f"check_every_n_steps must be >= 1, got check_every_n_steps={check_every_n_steps}")
        self._sampler = StepSampler(check_every_n_steps, window_steps)
        for name, value in (("dead_threshold", dead_threshold), ("near_tie_threshold", near_tie_threshold),
                            ("probe_size", probe_size), ("reinit_noise", reinit_noise), ("bias_bump", bias_bump)):
            if check_number(name, value) < 0:
                raise ValueError(f"{name} must be >= 0, got {name}={value}")
        measures_churn = any(rule.metric == "churn" for rule in self.rules)
        if measures_churn and probe_size == 0:
            raise ValueError("a churn alarm compares a probe batch's routing between checks: it needs probe_size > 0")
        self.check_every_n_steps = check_every_n_steps
        self.dead_threshold = dead_threshold
        self.reinit_noise = reinit_noise
        self.seed = seed
        self.bias_bump = bias_bump
        self.alarms_filename = alarms_filename
        self.alarms_path: str | None = None
        self.strikes: list[list[int]] = [[] for _ in self.rules]
        """Per rule, per MoE layer: consecutive checks past the threshold."""
        self.fired: list[FiredAlarm] = []
        """The alarms fired in this process's run (rank zero writes them to the file)."""
        self.num_reinits = 0
        self._window = CountsWindow(near_tie_threshold=near_tie_threshold)
        self._probe = ChurnProbe(probe_size) if measures_churn else None

    @property
    @override
    def state_key(self) -> str:
        rules = [(r.metric, r.threshold, r.patience, r.action) for r in self.rules]
        return self._generate_state_key(rules=rules, check_every_n_steps=self.check_every_n_steps)

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        actions = {rule.action for rule in self.rules}
        if "bias_bump" in actions:
            layers = moe_layers(pl_module)
            unbiased = [name for name, layer in layers if getattr(layer.router, "expert_bias_E", None) is None]
            if unbiased:
                raise ValueError(
                    f"a bias_bump alarm needs routers with expert_bias=True; these MoE layers have none: {unbiased}"
                )
        if "reinit" in actions and holds_local_experts(pl_module):
            raise ValueError(
                "a reinit alarm copies a busy expert into the dead ones within one process, but under expert "
                "parallelism each rank holds a slice of the experts: use warn, stop or bias_bump there"
            )
        log_dir = trainer.log_dir  # a collective: every rank asks
        if self.alarms_path is None and self.alarms_filename is not None and log_dir is not None:
            self.alarms_path = str(Path(log_dir) / self.alarms_filename)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if not self._sampler.sample(step):
            return
        counts = self._window.add(step_routings(outputs))
        if not self._sampler.is_boundary(step):
            return
        if self._probe is not None:
            self._probe.add_churn(self._probe.route(pl_module, batch), counts)
        self._check(trainer, pl_module, step, self._window.take_reduced(trainer.strategy))

    def _check(self, trainer: Trainer, pl_module: LightningModule, step: int, counts: RoutingCounts) -> None:
        acted: dict[tuple[str, int], tuple[list[int], str]] = {}  # one reinit / bump per layer, whichever rules fired
        alarms = []
        for rule, layer, value in self._firing(layer_statistics(counts, self.dead_threshold)):
            key = (rule.action, layer)
            if rule.action in ("reinit", "bias_bump") and key not in acted:
                acted[key] = self._act(trainer, pl_module, rule.action, step, layer, counts.load_LE[layer])
            experts, outcome = acted.get(key, ([], "stopping training" if rule.action == "stop" else ""))
            side = "below" if rule.metric in LOW_IS_BAD else "above"
            message = (
                f"routing alarm at step {step}, MoE layer {layer}: {rule.metric}={value:.4g} {side} the threshold "
                f"{rule.threshold} for {rule.patience} check(s); action={rule.action!r}"
            ) + (f": {outcome}" if outcome else "")
            rank_zero_warn(message)
            alarms.append(FiredAlarm(step, layer, rule.metric, value, rule.threshold, rule.patience, rule.action,
                                     experts, message))
            if rule.action == "stop":
                trainer.should_stop = True
        self.fired.extend(alarms)
        if alarms and trainer.is_global_zero:
            self._report(trainer, alarms)

    def _firing(self, stats: list[LayerRoutingStats]) -> list[tuple[AlarmRule, int, float]]:
        """Count each rule's strikes on each layer; the ``(rule, layer, value)`` that reach their patience."""
        firing = []
        for rule, strikes in zip(self.rules, self.strikes):
            strikes.extend([0] * (len(stats) - len(strikes)))
            for s in stats:
                value = getattr(s, rule.metric)
                if value is None:  # churn before the second probe: no evidence either way
                    continue
                strikes[s.layer] = strikes[s.layer] + 1 if rule.is_past(value) else 0
                if strikes[s.layer] >= rule.patience:
                    strikes[s.layer] = 0
                    firing.append((rule, s.layer, float(value)))
        return firing

    def _act(
        self, trainer: Trainer, pl_module: LightningModule, action: str, step: int, layer: int, load_E: Tensor
    ) -> tuple[list[int], str]:
        """Re-initialise or bias-bump the layer's dead experts; returns them and what was done."""
        dead_E = dead_experts(load_E, self.dead_threshold).cpu()
        if not dead_E.any() or load_E.sum() == 0:
            return [], f"no dead expert to {'re-initialise' if action == 'reinit' else 'bump'}"
        moe = moe_layers(pl_module)[layer][1]
        if action == "reinit":
            donor = int(load_E.argmax())
            generator = torch.Generator().manual_seed(self.seed + step * 1009 + layer)
            experts = reinit_dead_experts(moe, dead_E, donor, self.reinit_noise, generator, trainer.optimizers)
            self.num_reinits += 1
            return experts, f"re-initialised experts {experts} from expert {donor}"
        bias_E = moe.router.expert_bias_E
        bias_E[dead_E.to(bias_E.device)] += self.bias_bump
        experts = dead_E.nonzero().flatten().tolist()
        return experts, f"raised the selection bias of experts {experts} by {self.bias_bump}"

    def _report(self, trainer: Trainer, alarms: list[FiredAlarm]) -> None:
        for alarm in alarms:
            for logger in trainer.loggers:
                logger.log_metrics({f"alarms/layer{alarm.layer}/{alarm.metric}": alarm.value}, step=alarm.step)
                if isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_text("alarms", alarm.message, alarm.step)
        if self.alarms_path is not None:
            path = Path(self.alarms_path)
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as file:
                file.writelines(json.dumps(asdict(alarm)) + "\n" for alarm in alarms)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            **self._window.state_dict(),
            **(self._probe.state_dict() if self._probe is not None else {}),
            "strikes": [list(s) for s in self.strikes],
            "num_reinits": self.num_reinits,
            "alarms_path": self.alarms_path,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._window.load_state_dict(state_dict)
        if self._probe is not None:
            self._probe.load_state_dict(state_dict)
        self.strikes = [list(s) for s in state_dict["strikes"]]
        self.num_reinits = state_dict["num_reinits"]
        self.alarms_path = state_dict["alarms_path"]


def _as_rule(rule: AlarmRule | dict) -> AlarmRule:
    if isinstance(rule, AlarmRule):
        return rule
    if isinstance(rule, dict):
        return AlarmRule(**rule)
    raise TypeError(f"an alarm rule must be an AlarmRule or a dict of its fields, got {rule!r}")
