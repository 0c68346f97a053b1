"""A whole training step (forward, backward, AdamW) of our MoETransformer against transformers' Qwen3-MoE.

    PYTHONPATH=. python benchmarks/train_throughput.py [--layers 8] [--batch 8] [--seq 2048]

Both models: d 2048, 16 query heads and 4 KV heads of dim 128, 64 experts top-8 of hidden 1024, vocab 32000,
bf16 parameters, the same batch of random tokens. Each model trains as its users would: ours with
``MoELightningModule``'s loss (``cross_entropy``, fused with fp32 math, plus the load-balancing loss) and optimizer
(``TritonAdamW``), HF with its ``ForCausalLMLoss`` (an fp32 copy of the logits; router loss off, its default) and
torch's fused AdamW. A third row gives HF our optimizer, which separates the model's share of the speed-up from the
optimizer's. Each model runs alone on the card (the other is freed first), so peak memory is its own.

MFU = tokens/s x FLOPs per token / the card's dense bf16 peak (989 TFLOP/s on H100 and H200), where
FLOPs per token = 6 x (active parameters: attention, norms, router, k experts, output head; the input embedding
is a lookup) + 12 x layers x d x seq (attention scores and values, fwd + bwd, causal mask not discounted).
"""

from __future__ import annotations

import argparse
import functools
import gc
from collections.abc import Callable

import torch
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from benchmarks.timing import back_to_back_ms, gemm_tflops, median_ms, peak_memory_gib
from moe_lightning.kernels.adamw import TritonAdamW
from moe_lightning.models import MoETransformer, MoETransformerConfig
from moe_lightning.module import MoELightningModule
from moe_lightning.routing import TopKRouter

PEAK_BF16_TFLOPS = 989.0
DIM, HEADS, KV_HEADS, HEAD_DIM, EXPERTS, TOP_K, EXPERT_HIDDEN, VOCAB = 2048, 16, 4, 128, 64, 8, 1024, 32000


def flops_per_token(layers: int, seq: int) -> float:
    attention = DIM * HEADS * HEAD_DIM * 2 + DIM * KV_HEADS * HEAD_DIM * 2
    active_experts = TOP_K * 3 * DIM * EXPERT_HIDDEN
    active = layers * (attention + active_experts + DIM * EXPERTS) + DIM * VOCAB
    return 6 * active + 12 * layers * DIM * seq


def ours(layers: int, seq: int, experts_implementation: str = "grouped_mm") -> tuple[torch.nn.Module, Callable]:
    config = MoETransformerConfig(
        vocab_size=VOCAB, dim=DIM, num_layers=layers, num_heads=HEADS, num_kv_heads=KV_HEADS, num_experts=EXPERTS,
        expert_hidden_dim=EXPERT_HIDDEN, max_seq_len=seq, experts_implementation=experts_implementation,
    )
    model = MoETransformer(config, router=functools.partial(TopKRouter, num_experts_per_token=TOP_K))
    model = model.cuda().bfloat16()

    def loss_fn(input_ids, labels):
        logits, routings = model(input_ids)
        return MoELightningModule.cross_entropy(logits, labels) + sum(sum(r.aux_losses.values()) for r in routings)

    return model, loss_fn


def huggingface(layers: int, seq: int, implementation: str) -> tuple[torch.nn.Module, Callable]:
    config = Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=DIM, num_hidden_layers=layers, num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, num_experts=EXPERTS, num_experts_per_tok=TOP_K,
        moe_intermediate_size=EXPERT_HIDDEN, max_position_embeddings=seq, norm_topk_prob=True,
        experts_implementation=implementation, attn_implementation="sdpa",
    )
    model = Qwen3MoeForCausalLM(config).cuda().bfloat16()

    def loss_fn(input_ids, labels):
        # transformers' own causal-LM loss (an fp32 copy of the logits), as its users train.
        return model(input_ids=input_ids, labels=labels, shift_labels=labels).loss

    return model, loss_fn


def torch_fused_adamw(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-4, fused=True)


def triton_adamw(params) -> torch.optim.Optimizer:
    return TritonAdamW(params, lr=1e-4)


def make_step(
    model: torch.nn.Module, loss_fn: Callable, batch: int, seq: int, optimizer_fn: Callable = triton_adamw,
) -> Callable[[], None]:
    """One training step (forward, backward, optimizer) on a fixed batch of random tokens."""
    model.train()
    optimizer = optimizer_fn(model.parameters())
    tokens = torch.randint(0, VOCAB, (batch, seq + 1), device="cuda")
    input_ids, labels = tokens[:, :-1], tokens[:, 1:].contiguous()

    def step() -> None:
        loss_fn(input_ids, labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def measure(build: Callable, optimizer_fn: Callable, batch: int, seq: int) -> tuple[float, float, float]:
    """Tokens/s of steps run back to back, tokens/s of steps each started on an idle card, peak memory."""
    step = make_step(*build(), batch, seq, optimizer_fn)
    back_to_back = back_to_back_ms(step, warmup=3, calls=8)
    synced = median_ms(step, warmup=0, reps=6)
    peak = peak_memory_gib(step)
    del step  # frees the model and its optimizer before the next peer is built
    gc.collect()
    torch.cuda.empty_cache()
    return batch * seq / (back_to_back * 1e-3), batch * seq / (synced * 1e-3), peak


def profile_ours(layers: int, batch: int, seq: int, rows: int = 30) -> None:
    from torch.profiler import ProfilerActivity, profile

    step = make_step(*ours(layers, seq), batch, seq)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=70))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--skip-hf-eager", action="store_true", help="the eager HF loop is the slowest peer")
    parser.add_argument("--profile", action="store_true", help="print where our step's CUDA time goes, then exit")
    args = parser.parse_args()
    if args.profile:
        return profile_ours(args.layers, args.batch, args.seq)
    torch.manual_seed(0)
    print(f"card: {torch.cuda.get_device_name()}  torch {torch.__version__}  8192^3 GEMM {gemm_tflops():.0f} TFLOP/s")
    hf_grouped = functools.partial(huggingface, args.layers, args.seq, "grouped_mm")
    runs = {
        "ours": (functools.partial(ours, args.layers, args.seq), triton_adamw),
        "HF grouped_mm": (hf_grouped, torch_fused_adamw),
        "HF grouped_mm + our AdamW": (hf_grouped, triton_adamw),
        "ours, Triton grouped GEMM": (functools.partial(ours, args.layers, args.seq, "triton"), triton_adamw),
    }
    if not args.skip_hf_eager:
        runs["HF eager"] = (functools.partial(huggingface, args.layers, args.seq, "eager"), torch_fused_adamw)
    results = {name: measure(build, optimizer_fn, args.batch, args.seq) for name, (build, optimizer_fn) in runs.items()}

    per_token = flops_per_token(args.layers, args.seq)
    ours_rate, ours_synced, _ = results["ours"]
    print(f"\n{args.layers} layers, batch {args.batch} x {args.seq}, {per_token / 1e9:.1f} GFLOP per token; "
          "tokens/s of 8 steps back to back, and of single steps each started on an idle card (synced)")
    print(f"| {'model':<26} | {'tokens/s':>9} | {'MFU':>6} | {'ours speed-up':>13} | {'synced tokens/s':>15} "
          f"| {'synced speed-up':>15} | {'peak GiB':>8} |")
    print(f"|{'-' * 28}|{'-' * 11}|{'-' * 8}|{'-' * 15}|{'-' * 17}|{'-' * 17}|{'-' * 10}|")
    for name, (rate, synced, peak) in results.items():
        mfu = rate * per_token / (PEAK_BF16_TFLOPS * 1e12)
        print(f"| {name:<26} | {rate:9.0f} | {mfu:6.1%} | {ours_rate / rate:12.2f}x | {synced:15.0f} "
              f"| {ours_synced / synced:14.2f}x | {peak:8.1f} |")


if __name__ == "__main__":
    main()
