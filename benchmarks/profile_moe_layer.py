"""Where the time of one MoE layer's forward + backward goes: the CUDA kernels, by total time.

    PYTHONPATH=. python benchmarks/profile_moe_layer.py [--shape fine-grained] [--rows 25]
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.moe_layer import SHAPES
from moe_lightning import GroupedExperts, MoELayer, TopKRouter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="fine-grained", choices=list(SHAPES))
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args()
    tokens, d, f, experts, k = SHAPES[args.shape]
    torch.manual_seed(0)
    layer = MoELayer(
        TopKRouter(d, experts, k, load_balance_coef=0.01), GroupedExperts(experts, d, f, implementation="grouped_mm")
    ).cuda().bfloat16()
    x = torch.randn(1, tokens, d, device="cuda", dtype=torch.bfloat16)
    grad = torch.randn_like(x)

    def step():  # as benchmarks/moe_layer.py times it
        inp = x.detach().requires_grad_()
        layer(inp)[0].backward(grad)
        layer.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    print(f"{args.shape} {SHAPES[args.shape]}, 5 steps, {torch.cuda.get_device_name()}")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
