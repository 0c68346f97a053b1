"""Our Triton grouped GEMM against torch's grouped_mm, each GEMM of an expert layer's step, in one job.

    PYTHONPATH=. python benchmarks/grouped_gemm.py

For each shape: the forward ``x @ w[g]``, the input gradient ``dy @ w[g].T`` and the weight gradient
``x[g].T @ dy[g]``, with rows split evenly over the experts and by a skewed random draw (expert e drawn with
probability proportional to 1 + e / E). Each of ours is checked against torch's on the same inputs first. "dense"
is one ordinary GEMM of the forward's shape and FLOPs, the rate a grouped GEMM is read against.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from benchmarks.timing import median_ms
from moe_lightning.kernels.grouped_gemm import (
    _grouped_rows,
    _grouped_rows_kernel,
    _grouped_weight_grad,
    _grouped_weight_grad_kernel,
    torch_grouped_mm,
)

SHAPES = {  # rows (tokens x k), in, out, experts
    "fine-grained, gate+up": (98304, 2048, 2816, 64),
    "fine-grained, down": (98304, 1408, 2048, 64),
    "mixtral-like, gate+up": (16384, 4096, 28672, 8),
    "mixtral-like, down": (16384, 14336, 4096, 8),
    "whole model, gate+up": (131072, 2048, 2048, 64),
    "whole model, down": (131072, 1024, 2048, 64),
}


def splits(rows: int, experts: int) -> dict[str, torch.Tensor]:
    even = torch.full((experts,), rows // experts)
    drawn = torch.multinomial(
        1 + torch.arange(experts) / experts,
        rows,
        replacement=True,
        generator=torch.Generator().manual_seed(0),
    )
    return {"even": even, "random": torch.bincount(drawn, minlength=experts)}


def gemms(rows: int, k: int, n: int, counts: torch.Tensor) -> dict[str, tuple[Callable, Callable]]:
    ends = counts.cumsum(0).to(torch.int32).cuda()
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(rows, n, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(len(counts), k, n, device="cuda", dtype=torch.bfloat16)
    return {
        "forward": (
            lambda: torch_grouped_mm(x, w, offs=ends),
            lambda: _grouped_rows(x, w, ends, transpose_w=False),
        ),
        "input grad": (
            lambda: torch_grouped_mm(dy, w.mT, offs=ends),
            lambda: _grouped_rows(dy, w, ends, transpose_w=True),
        ),
        "weight grad": (
            lambda: torch_grouped_mm(x.mT, dy, offs=ends),
            lambda: _grouped_weight_grad(x, dy, ends),
        ),
    }


def dense_tflops(rows: int, k: int, n: int) -> float:
    a = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(k, n, device="cuda", dtype=torch.bfloat16)
    return 2 * rows * k * n / (median_ms(lambda: a @ b) * 1e-3) / 1e12


def main() -> None:
    print(f"card: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    header = f"| {'shape (rows, in, out, experts)':<46} | {'split':<6} | {'GEMM':<11} | {'torch ms':>8} | {'ours ms':>8} | {'torch TF/s':>10} | {'ours TF/s':>9} | {'ours speed-up':>13} | {'dense fwd TF/s':>14} | {'rel err':>8} |"
    print(header)
    print("|" + "|".join("-" * (len(cell) + 2) for cell in header.split("|")[1:-1]) + "|")
    for name, (rows, k, n, experts) in SHAPES.items():
        flops = 2 * rows * k * n
        dense = dense_tflops(rows, k, n)
        for split, counts in splits(rows, experts).items():
            for gemm, (theirs, ours) in gemms(rows, k, n, counts).items():
                reference = theirs().float()
                error = ((ours().float() - reference).norm() / reference.norm()).item()
                if not error < 1e-2:
                    raise SystemExit(f"{name} {split} {gemm}: ours disagrees with torch grouped_mm ({error:.2e})")
                torch_ms, ours_ms = median_ms(theirs, reps=20), median_ms(ours, reps=20)
                label = f"{name} ({rows}, {k}, {n}, {experts})"
                print(
                    f"| {label:<46} | {split:<6} | {gemm:<11} | {torch_ms:8.3f} | {ours_ms:8.3f} "
                    f"| {flops / torch_ms / 1e9:10.0f} | {flops / ours_ms / 1e9:9.0f} | {torch_ms / ours_ms:12.2f}x "
                    f"| {dense:14.0f} | {error:8.1e} |",
                    flush=True,
                )
            torch.cuda.empty_cache()
    print("\nautotuned configs (key: config)")
    for kernel in (_grouped_rows_kernel, _grouped_weight_grad_kernel):
        for key, config in kernel.cache.items():
            print(f"  {kernel.fn.__name__} {key}: {config}")


if __name__ == "__main__":
    main()
