"""Which weight layout gets torch grouped_mm its fastest kernels: each GEMM of an expert layer's step, both layouts.

    PYTHONPATH=. python benchmarks/grouped_mm_layouts.py

Ours stores expert weights as [E, in, out] (``w_in_EDH``, ``w_down_EFD``); nn.Linear and transformers store
[E, out, in] and pass a transposed view. Rows are spread evenly over the experts. Forward ``x @ w``, input gradient
``dy @ w.T`` and weight gradient ``x.T @ dy`` (groups along the rows) are timed for the whole-model benchmark's shape
(train_throughput.py: 16384 tokens x top-8) and the fine-grained layer shape (moe_layer.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from benchmarks.timing import median_ms
from moe_lightning.kernels.grouped_gemm import torch_grouped_mm as grouped_mm

EXPERTS = 64
SHAPES = {  # rows (tokens x k), in, out
    "whole model, gate+up": (131072, 2048, 2048),
    "whole model, down": (131072, 1024, 2048),
    "fine-grained, gate+up": (98304, 2048, 2816),
    "fine-grained, down": (98304, 1408, 2048),
}


def gemms(rows: int, k: int, n: int) -> dict[str, Callable[[], torch.Tensor]]:
    offsets = torch.full((EXPERTS,), rows // EXPERTS, device="cuda").cumsum(0).to(torch.int32)
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(rows, n, device="cuda", dtype=torch.bfloat16)
    w_in_out = torch.randn(EXPERTS, k, n, device="cuda", dtype=torch.bfloat16)
    w_out_in = w_in_out.transpose(1, 2).contiguous()
    return {
        "forward, w [E, in, out]": lambda: grouped_mm(x, w_in_out, offs=offsets),
        "forward, w [E, out, in].mT": lambda: grouped_mm(x, w_out_in.mT, offs=offsets),
        "input grad, w [E, in, out].mT": lambda: grouped_mm(dy, w_in_out.mT, offs=offsets),
        "input grad, w [E, out, in]": lambda: grouped_mm(dy, w_out_in, offs=offsets),
        "weight grad -> [E, in, out]": lambda: grouped_mm(x.mT, dy, offs=offsets),
        "weight grad -> [E, out, in]": lambda: grouped_mm(dy.mT, x, offs=offsets),
    }


def main() -> None:
    print(f"card: {torch.cuda.get_device_name()}  torch {torch.__version__}  experts {EXPERTS}")
    print(f"| {'shape (rows, in, out)':<44} | {'GEMM':<30} | {'ms':>6} | {'TFLOP/s':>7} |")
    print(f"|{'-' * 46}|{'-' * 32}|{'-' * 8}|{'-' * 9}|")
    for name, (rows, k, n) in SHAPES.items():
        label = f"{name} ({rows}, {k}, {n})"
        for gemm, fn in gemms(rows, k, n).items():
            ms = median_ms(fn, warmup=3, reps=10)
            print(f"| {label:<44} | {gemm:<30} | {ms:6.3f} | {2 * rows * k * n / (ms * 1e-3) / 1e12:7.0f} |")
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
