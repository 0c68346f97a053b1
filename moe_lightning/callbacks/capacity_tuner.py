"""CapacityAutoTuner: sets each top-k MoE layer's capacity factor from the per-expert load it measures, so that
training drops a chosen share of the routed rows.

Shape legend: S samples (one optimizer step on one rank), E experts, F flattened columns of all tuned layers.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor
from typing_extensions import override

from moe_lightning.callbacks.sampling import StepSampler, step_routings
from moe_lightning.callbacks.validation import check_number
from moe_lightning.routing import TopKRouter
from moe_lightning.strategies.sharding import moe_layers


def imputed_requested_load(kept_SE: Tensor, dropped_S: Tensor) -> Tensor:
    """The rows each expert was asked for, from the rows it kept: a sample's dropped rows all go to one of its full
    experts (the first at the sample's largest load, which is the capacity), the most one expert can have asked for.

    At or below the current capacity the drop these loads give is the true one, whichever experts overflowed.
    Above it they give the most the true loads can drop (the drop is convex in the load, so an overflow split over
    several full experts drops less), so a factor solved from them to raise the capacity drops at most the target.
    """
    kept_SE, dropped_S = kept_SE.double(), dropped_S.double()
    return kept_SE.scatter_add(1, kept_SE.argmax(dim=1, keepdim=True), dropped_S[:, None])


def capacity_factor_for_drop_rate(load_SE: Tensor, drop_rate: float) -> float | None:
    """The capacity factor ``f`` at which samples of requested per-expert loads ``load_SE`` drop ``drop_rate`` of
    their rows, or ``None`` when they hold no row.

    A sample with mean load ``u`` (its rows over E) keeps ``f * u`` rows per expert and drops
    ``sum_e max(load_e - f * u, 0)``. Summed over samples this is ``sum_n w_n * max(x_n - f, 0)`` over every
    normalised load ``x_n = load / u`` with weight ``w_n = u``: piecewise linear and decreasing in ``f``, with kinks
    at the ``x_n``. Walking the ``x_n`` from the largest finds the piece that crosses the target and solves it
    exactly (the router's rounding up to whole rows left out: it can only drop less).
    """
    load_SE = load_SE.double()
    mean_S1 = load_SE.mean(dim=1, keepdim=True)
    x_N = (load_SE / mean_S1.clamp_min(1e-12)).flatten()
    w_N = mean_S1.expand_as(load_SE).flatten()
    total = float(w_N.sum())
    if total == 0:
        return None
    order = x_N.argsort(descending=True)
    x_N, w_N = x_N[order], w_N[order]
    weight_above_N, area_above_N = w_N.cumsum(0), (w_N * x_N).cumsum(0)
    # Rows dropped at the next kink down, with the n + 1 largest loads over capacity; at f = 0 every row drops.
    next_x_N = torch.cat([x_N[1:], x_N.new_zeros(1)])
    dropped_at_next_N = area_above_N - weight_above_N * next_x_N
    budget = drop_rate * total
    n = int((dropped_at_next_N > budget).nonzero()[0])  # exists: drop_rate < 1
    return float((area_above_N[n] - budget) / weight_above_N[n])


class CapacityAutoTuner(Callback):
    """Every ``check_every_n_steps`` optimizer steps, measures each top-k MoE layer's dropped fraction over the last
    ``window_steps`` steps of every rank; when it lies outside ``target_drop_rate ± tolerance`` for ``patience``
    checks in a row, sets the router's ``capacity_factor`` to the one that would have dropped exactly the target
    share of that window's rows (see :func:`capacity_factor_for_drop_rate`), clamped to the bounds.

    The rule is solved, not stepped. Lowering the factor is exact: the drop at a smaller capacity follows from the
    loads the experts kept and the dropped count. Raising it cannot be exact (the rows that did not fit are not
    seen), so it assumes the worst split of the overflow (:func:`imputed_requested_load`): the window after a raise
    drops at most the target, with no expert or few at capacity, and the next check lowers the factor exactly. On
    loads that do not change, the dropped fraction is in the band after at most two updates and stays there; a
    dropless router (``capacity_factor=None``) is measured exactly and tuned at the first check. Training moves the
    loads, so later checks track them; the dead band and the patience keep a window's noise from retuning. A later
    MoE layer's loads also move when an earlier layer's factor changes (its inputs do), which can take it one more
    update.

    Each rank's per-step loads are all-gathered in one call per check, so every rank solves the same numbers and
    sets the same factor (under expert parallelism each rank's router caps its own tokens). Rank zero logs
    ``capacity/layer{l}/capacity_factor`` (after the check) and ``capacity/layer{l}/dropped_fraction`` (the window
    measured) to every logger. The factors are in this callback's checkpoint state and set again on resume: the
    router's ``capacity_factor`` is a plain attribute, not in the model's ``state_dict``. ``eval_capacity_factor``
    is left as configured. Layers with other routers (expert choice, hash, ...) are left alone.

    Args:
        target_drop_rate: the share of routed rows to drop, in ``[0, 1)``; 0 sizes the capacity to the busiest
            expert of the window.
        tolerance: the dead band's half-width around the target (absolute, in dropped fraction).
        min_capacity_factor: the smallest factor set (> 0).
        max_capacity_factor: the largest factor set (``>= min_capacity_factor``).
        check_every_n_steps: optimizer steps between checks (each costs one all-gather and a host sync).
        window_steps: the steps before each check that are measured; ``None``: all ``check_every_n_steps``.
        patience: consecutive checks outside the band before the factor changes.
    """

    def __init__(
        self,
        target_drop_rate: float = 0.01,
        tolerance: float = 0.005,
        min_capacity_factor: float = 1.0,
        max_capacity_factor: float = 4.0,
        check_every_n_steps: int = 20,
        window_steps: int | None = None,
        patience: int = 1,
    ) -> None:
        self.target_drop_rate = check_number("target_drop_rate", target_drop_rate)
        self.tolerance = check_number("tolerance", tolerance)
        self.min_capacity_factor = check_number("min_capacity_factor", min_capacity_factor)
        self.max_capacity_factor = check_number("max_capacity_factor", max_capacity_factor)
        if not 0 <= target_drop_rate < 1:
            raise ValueError(f"target_drop_rate must be in [0, 1), got target_drop_rate={target_drop_rate}")
        if tolerance < 0:
            raise ValueError(f"tolerance must be >= 0, got tolerance={tolerance}")
        if not min_capacity_factor > 0:
            raise ValueError(f"min_capacity_factor must be > 0, got min_capacity_factor={min_capacity_factor}")
        if not max_capacity_factor >= min_capacity_factor:
            raise ValueError(
                "max_capacity_factor must be >= min_capacity_factor, got "
                f"min_capacity_factor={min_capacity_factor} and max_capacity_factor={max_capacity_factor}"
            )
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got patience={patience}")
        self.check_every_n_steps = check_every_n_steps
        self.window_steps = check_every_n_steps if window_steps is None else window_steps
        self.patience = patience
        self._sampler = StepSampler(check_every_n_steps, self.window_steps)
        self.capacity_factors: dict[int, float | None] = {}
        """MoE layer index -> the factor its router has (tuned, or as built until the first change)."""
        self.strikes: dict[int, int] = {}
        self._routers: dict[int, TopKRouter] = {}
        self._window: list[Tensor] = []  # one flat [F] row per sampled step: each layer's kept load, then its drops

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Here, not in on_fit_start: strategies that restore after setup load this callback's state after that hook.
        layers = [layer for _, layer in moe_layers(pl_module)]
        self._routers = {i: layer.router for i, layer in enumerate(layers) if isinstance(layer.router, TopKRouter)}
        if not self._routers:
            found = sorted({type(layer.router).__name__ for layer in layers})
            raise ValueError(f"CapacityAutoTuner tunes TopKRouter layers; the model has none (routers: {found})")
        unknown = sorted(set(self.capacity_factors) - set(self._routers))
        if unknown:
            raise ValueError(
                f"the checkpoint tuned MoE layers {unknown}, which are not TopKRouter layers of this model "
                f"(those are {sorted(self._routers)})"
            )
        for layer, router in self._routers.items():
            if layer in self.capacity_factors:
                router.capacity_factor = self.capacity_factors[layer]
            else:
                self.capacity_factors[layer] = router.capacity_factor
            self.strikes.setdefault(layer, 0)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if not self._sampler.sample(step):
            return
        routings = step_routings(outputs)
        self._window.append(torch.cat([
            torch.cat([routings[layer].tokens_per_expert_E, routings[layer].num_dropped.reshape(1)])
            for layer in self._routers
        ]))
        if self._sampler.is_boundary(step):
            self._check(trainer, step)

    def _check(self, trainer: Trainer, step: int) -> None:
        device = self._window[-1].device
        window_SF = torch.stack([row.to(device) for row in self._window]).double()  # restored rows are on the CPU
        self._window = []
        gathered_SF = trainer.strategy.all_gather(window_SF).reshape(-1, window_SF.shape[-1]).cpu()
        widths = [self._routers[layer].num_experts + 1 for layer in self._routers]
        metrics = {}
        for (layer, router), columns_SF in zip(self._routers.items(), gathered_SF.split(widths, dim=1)):
            kept_SE, dropped_S = columns_SF[:, :-1], columns_SF[:, -1]
            measured = float(dropped_S.sum() / (kept_SE.sum() + dropped_S.sum()).clamp_min(1))
            in_band = abs(measured - self.target_drop_rate) <= self.tolerance
            self.strikes[layer] = 0 if in_band else self.strikes[layer] + 1
            if self.strikes[layer] >= self.patience:
                self.strikes[layer] = 0
                self._set(layer, router, imputed_requested_load(kept_SE, dropped_S))
            metrics[f"capacity/layer{layer}/dropped_fraction"] = measured
            factor = self.capacity_factors[layer]
            metrics[f"capacity/layer{layer}/capacity_factor"] = math.inf if factor is None else factor
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)

    def _set(self, layer: int, router: TopKRouter, load_SE: Tensor) -> None:
        solved = capacity_factor_for_drop_rate(load_SE, self.target_drop_rate)
        if solved is not None:
            factor = min(max(solved, self.min_capacity_factor), self.max_capacity_factor)
            router.capacity_factor = self.capacity_factors[layer] = factor

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "capacity_factors": dict(self.capacity_factors),
            "strikes": dict(self.strikes),
            "window": [row.cpu() for row in self._window],
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.capacity_factors = dict(state_dict["capacity_factors"])
        self.strikes = dict(state_dict["strikes"])
        self._window = list(state_dict["window"])
