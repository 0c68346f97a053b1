"""Forward + backward of one MoE layer: ours against transformers' Qwen3-MoE block and a dense ceiling.

    PYTHONPATH=. python benchmarks/moe_layer.py [--shapes mixtral-like fine-grained small]

Every implementation runs on the same weights (ours are converted from the HF block), bf16, on the same card in
one process. TFLOP/s counts only the routed rows' expert GEMMs: 3 GEMMs x 2*d*f per routed row, x 3 for fwd+bwd.
Outputs are checked against each family's eager reference before anything is timed.
"""

from __future__ import annotations

import argparse
import copy
import sys
from dataclasses import dataclass

import torch
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeConfig, Qwen3MoeSparseMoeBlock

from benchmarks.timing import back_to_back_ms, gemm_tflops, median_ms, peak_memory_gib
from moe_lightning.experts import FeedForward
from moe_lightning.models.hf import moe_layer_from_qwen3_moe_block

SHAPES = {  # tokens, d, f, experts, k
    "mixtral-like": (8192, 4096, 14336, 8, 2),
    "fine-grained": (16384, 2048, 1408, 64, 6),
    "small": (8192, 1024, 2816, 16, 2),
}


@dataclass
class Result:
    name: str
    ms: float  # median of single steps, each started on an idle card
    tflops: float  # of the single steps
    back_to_back_ms: float  # mean of steps queued with no synchronisation between them, as training runs
    peak_gib: float


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def run_shape(name: str, tokens: int, d: int, f: int, experts: int, k: int) -> list[Result]:
    torch.manual_seed(0)
    hf_configs = {
        impl: Qwen3MoeConfig(
            hidden_size=d, moe_intermediate_size=f, num_experts=experts, num_experts_per_tok=k, norm_topk_prob=True,
            experts_implementation=impl,
        )
        for impl in ("eager", "grouped_mm")
    }
    hf_eager = Qwen3MoeSparseMoeBlock(hf_configs["eager"])
    for param in hf_eager.parameters():
        torch.nn.init.normal_(param, std=0.02)
    hf_eager = hf_eager.cuda().bfloat16()
    hf_grouped = Qwen3MoeSparseMoeBlock(hf_configs["grouped_mm"]).cuda().bfloat16()
    hf_grouped.load_state_dict(hf_eager.state_dict())

    ours = moe_layer_from_qwen3_moe_block(hf_eager, hf_configs["eager"]).bfloat16()
    ours.experts.implementation = "grouped_mm"
    ours_triton = copy.deepcopy(ours)
    ours_triton.experts.implementation = "triton"
    ours_loop = copy.deepcopy(ours)
    ours_loop.experts.implementation = "loop"
    dense = FeedForward(d, f * k).cuda().bfloat16()

    x = torch.randn(1, tokens, d, device="cuda", dtype=torch.bfloat16)
    grad = torch.randn_like(x)
    candidates = {
        "ours (torch grouped_mm)": lambda inp: ours(inp)[0],
        "ours (Triton grouped GEMM)": lambda inp: ours_triton(inp)[0],
        "ours loop reference": lambda inp: ours_loop(inp)[0],
        "HF eager": hf_eager,
        "HF grouped_mm": hf_grouped,
        "dense SwiGLU, same FLOPs": dense,
    }

    # Ours is held to our loop reference; HF grouped_mm to HF eager (HF routes from bf16 logits, ours from fp32,
    # so near-tie tokens may pick other experts: ours vs HF is checked in fp32 by tests/parity instead).
    with torch.no_grad():
        for label, reference in (
            ("ours (torch grouped_mm)", "ours loop reference"),
            ("ours (Triton grouped GEMM)", "ours loop reference"),
            ("HF grouped_mm", "HF eager"),
        ):
            err = relative_error(candidates[label](x), candidates[reference](x))
            print(f"[{name}] {label} vs {reference}: relative error {err:.2e}", file=sys.stderr)
            if not err < 1e-2:
                raise SystemExit(f"{label} disagrees with {reference} at {name}: {err:.2e}")

    flops = tokens * k * 3 * 2 * d * f * 3
    modules = (ours, ours_triton, ours_loop, hf_eager, hf_grouped, dense)
    results = []
    for label, fn in candidates.items():
        def step(fn=fn):
            inp = x.detach().requires_grad_()
            fn(inp).backward(grad)
            for module in modules:  # as a training step would, so no run pays for accumulating into old grads
                module.zero_grad(set_to_none=True)

        ms, peak = median_ms(step), peak_memory_gib(step)  # peak first: queued steps can leave more allocated
        results.append(Result(label, ms, flops / (ms * 1e-3) / 1e12, back_to_back_ms(step), peak))
        torch.cuda.empty_cache()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    args = parser.parse_args()
    print(f"card: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    print(f"8192^3 bf16 GEMM: {gemm_tflops():.0f} TFLOP/s")
    for name in args.shapes:
        results = run_shape(name, *SHAPES[name])
        ours = results[0]
        print(f"\n{name}: tokens, d, f, experts, k = {SHAPES[name]}")
        print("single steps (each from an idle card) and steps back to back; TFLOP/s of the single steps")
        print(
            f"| {'implementation':<26} | {'ms':>7} | {'TFLOP/s':>7} | {'ours speed-up':>13} "
            f"| {'b2b ms':>7} | {'b2b speed-up':>12} | {'peak GiB':>8} |"
        )
        print(f"|{'-' * 28}|{'-' * 9}|{'-' * 9}|{'-' * 15}|{'-' * 9}|{'-' * 14}|{'-' * 10}|")
        for r in results:
            print(
                f"| {r.name:<26} | {r.ms:7.2f} | {r.tflops:7.1f} | {r.ms / ours.ms:12.2f}x "
                f"| {r.back_to_back_ms:7.2f} | {r.back_to_back_ms / ours.back_to_back_ms:11.2f}x | {r.peak_gib:8.2f} |"
            )


if __name__ == "__main__":
    main()
