"""Each expert's measured share of its layer's expert time: the measured half of the cost per expert activation.

A grouped GEMM runs every expert's rows at once and cannot be timed per expert. Here each expert runs alone on its
own rows (the experts module called with one non-empty group, so any module keeping the experts contract works:
grouped, quantised, offloaded), timed with CUDA events on a GPU and the wall clock elsewhere. That is slower than
the layer's own call, so it runs only when asked and on a probe batch (see ``RouterStatsMonitor(time_experts=True)``).

Shape legend: N routed rows (sorted by expert), D model dim, E experts.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from moe_lightning.layer import MoELayer


@torch.no_grad()
def expert_seconds(experts: nn.Module, x_ND: Tensor, tokens_per_expert_E: Tensor, repeats: int = 3) -> Tensor:
    """``[E]`` mean seconds of one forward of each expert on its own rows (0 for an expert without rows).

    Each expert is called once to warm up, then ``repeats`` times under the clock.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got repeats={repeats}")
    counts = tokens_per_expert_E.tolist()
    seconds_E = torch.zeros(len(counts), dtype=torch.float64)
    for expert, (x_nD, count) in enumerate(zip(x_ND.split(counts), counts)):
        if count == 0:
            continue
        alone_E = torch.zeros_like(tokens_per_expert_E)
        alone_E[expert] = count
        experts(x_nD, alone_E)
        seconds_E[expert] = _timed(lambda: experts(x_nD, alone_E), repeats, x_ND.device) / repeats
    return seconds_E


def time_share(seconds_E: Tensor) -> Tensor:
    """Each expert's share of the summed time (all zeros when nothing ran)."""
    total = seconds_E.sum()
    return seconds_E / total if total > 0 else torch.zeros_like(seconds_E)


@contextmanager
def recorded_expert_inputs(model: nn.Module) -> Iterator[list[tuple[Tensor, Tensor] | None]]:
    """Within the block, every forward leaves each MoE layer's last experts input ``(x_ND, tokens_per_expert_E)``
    (detached) in the yielded list, one entry per :class:`MoELayer` in model order (None until it runs)."""
    layers = [module for module in model.modules() if isinstance(module, MoELayer)]
    inputs: list[tuple[Tensor, Tensor] | None] = [None] * len(layers)

    def keep(index: int):
        def hook(module: nn.Module, args: tuple) -> None:
            inputs[index] = (args[0].detach(), args[1].detach())
        return hook

    handles = [layer.experts.register_forward_pre_hook(keep(i)) for i, layer in enumerate(layers)]
    try:
        yield inputs
    finally:
        for handle in handles:
            handle.remove()


def _timed(fn, repeats: int, device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    return time.perf_counter() - started
