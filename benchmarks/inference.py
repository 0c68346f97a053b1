"""Generation speed of our MoETransformer against transformers' generate, with the same dims and weights.

    PYTHONPATH=. python benchmarks/inference.py [--layers 16] [--prompt-len 128] [--new-tokens 64]
        [--batch-sizes 1 32] [--sections decoders offload quant] [--json PATH]

The model has configs/olmoe-like-1b.yaml's dims (d 2048, 16 layers of 16 heads, 64 experts top-8 of hidden 1024,
vocab 50304) in bf16 with random weights; its router renormalises the top-8 weights so that transformers'
MixtralForCausalLM can hold the very same function (``mixtral_from_moe_transformer``), which is checked first
(greedy tokens of both from one prompt).

Prefill: the median time of a forward over the prompts. Decode tokens/s: B x (N - 1) / (t(N) - t(1)), where t(n)
is the median wall time of a whole generation of n new tokens with no stop token, so prefill and set-up cancel.
Sections: ``decoders`` (ours eager, ours with CompiledDecoder, HF generate with grouped_mm experts),
``quant`` (bitsandbytes int8 and nf4 experts: memory, decode speed, logits error against bf16), ``offload``
(batch 1 with the experts in pinned CPU memory behind a 25 % GPU cache: LRU, LFU with hot experts pinned, and that
with pre-gated prefetch; the hot experts come from a training run's router_stats.jsonl with ``--pin-hot-from``, else
from a calibration pass over the largest batch of prompts).

A trained model instead of random weights: ``--checkpoint`` (an export or a Lightning ``.ckpt``, see
``moe_lightning.inference.load_model``) with ``--sections offload quant`` (the decoders section compares against a
Mixtral holding the same weights, which needs olmoe-like routing), and ``--prompt-data RUN/config.yaml`` to cut
the prompts from that run's validation data instead of drawing random tokens, e.g. the synthetic task:

    PYTHONPATH=. python benchmarks/inference.py --checkpoint RUN/checkpoints/last.ckpt --sections offload \
        --pin-hot-from RUN/router_stats.jsonl --prompt-data RUN/config.yaml --prompt-len 64 --new-tokens 32
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import importlib
import json
import statistics
import time
from collections.abc import Callable, Iterator

import torch
import yaml

from moe_lightning.analytics import RoutingCounts
from moe_lightning.inference import (
    CompiledDecoder,
    ExpertOffload,
    expert_weight_bytes,
    generate,
    hot_experts_from_stats,
    offload_experts,
    quantize_model,
)
from moe_lightning.inference.engine import load_model
from moe_lightning.models import MoETransformer, MoETransformerConfig
from moe_lightning.models.hf import mixtral_from_moe_transformer
from moe_lightning.routing import TopKRouter

TOP_K = 8


DIMS = {
    "olmoe-like": dict(vocab_size=50304, dim=2048, num_heads=16, num_experts=64, expert_hidden_dim=1024),
    "smoke": dict(vocab_size=512, dim=64, num_heads=4, num_experts=16, expert_hidden_dim=64),  # a CPU dry run
}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def build_model(args: argparse.Namespace) -> MoETransformer:
    """The trained ``--checkpoint`` in bf16, or the random-weight benchmark model, built on the device (a CPU init of
    7B parameters takes minutes); same seed, same weights."""
    if args.checkpoint:
        return load_model(args.checkpoint).to(DEVICE, torch.bfloat16).eval()
    torch.manual_seed(0)
    config = MoETransformerConfig(**DIMS[args.dims], num_layers=args.layers,
                                  max_seq_len=args.prompt_len + args.new_tokens)
    router = functools.partial(TopKRouter, num_experts_per_token=TOP_K, normalize_weights=True)
    with torch.device(DEVICE):
        return MoETransformer(config, router=router).bfloat16().eval()


def prompts_from_data(config_path: str, batch: int, prompt_len: int) -> torch.Tensor:
    """The first ``prompt_len`` tokens of ``batch`` validation sequences of the datamodule a LightningCLI config names
    (``data.class_path`` with plain ``init_args``)."""
    with open(config_path) as file:
        data = yaml.safe_load(file)["data"]
    module_name, _, class_name = data["class_path"].rpartition(".")
    datamodule = getattr(importlib.import_module(module_name), class_name)(**(data.get("init_args") or {}))
    datamodule.setup("fit")
    rows = []
    for loader_batch in datamodule.val_dataloader():
        rows += list(loader_batch["input_ids"][:, :prompt_len])
        if len(rows) >= batch:
            return torch.stack(rows[:batch]).to(DEVICE)
    raise ValueError(f"{config_path}'s validation data has {len(rows)} sequences, fewer than batch {batch}")


def synchronize() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def wall_seconds(fn: Callable[[], object], reps: int) -> float:
    fn()  # warm-up: compiles, captures, allocates
    times = []
    for _ in range(reps):
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(generate_n: Callable[[int], object], batch: int, new_tokens: int, reps: int = 3) -> dict[str, float]:
    """Prefill latency (ms: a generation of one token) and decode tokens/s of a ``generate_n(n)`` function."""
    one, full = wall_seconds(lambda: generate_n(1), reps), wall_seconds(lambda: generate_n(new_tokens), reps)
    return {"prefill_ms": one * 1e3, "decode_tok_s": batch * (new_tokens - 1) / (full - one)}


def ours_fn(model: MoETransformer, prompts: torch.Tensor, decoder=None) -> Callable[[int], object]:
    return lambda n: generate(model, prompts, n, decoder=decoder)


def hf_fn(hf, prompts: torch.Tensor) -> Callable[[int], object]:
    mask = torch.ones_like(prompts)
    return lambda n: hf.generate(
        prompts, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0
    )


def check_same_function(model: MoETransformer, hf, prompt: torch.Tensor, new_tokens: int) -> int:
    """How many greedy tokens ours and HF agree on before they first differ (bf16 near-ties may flip late ones)."""
    ours_tokens = generate(model, prompt, new_tokens)[0]
    hf_tokens = hf_fn(hf, prompt)(new_tokens)[0, prompt.shape[1]:].tolist()
    return next((i for i, (a, b) in enumerate(zip(ours_tokens, hf_tokens)) if a != b), new_tokens)


def decoders_section(model, args, prompts_by_batch) -> list[dict]:
    rows = []
    # CUDA graphs without torch.compile by default: a decode step is launch-bound, and each bucket's compile of a
    # 16-layer model costs minutes of device time for a few per cent.
    compiled = CompiledDecoder(model, compile=args.compile, batch_buckets=args.batch_sizes)
    for batch, prompts in prompts_by_batch.items():
        rows.append({"batch": batch, "run": "ours eager", **measure(ours_fn(model, prompts), batch, args.new_tokens)})
        rows.append({"batch": batch, "run": "ours CUDA graphs" + (" + torch.compile" if args.compile else ""),
                     **measure(ours_fn(model, prompts, compiled), batch, args.new_tokens)})
    del compiled
    hf = mixtral_from_moe_transformer(model, "grouped_mm").eval()
    agreed = check_same_function(model, hf, prompts_by_batch[min(prompts_by_batch)][:1], args.new_tokens)
    print(f"greedy tokens equal in ours and HF before the first difference: {agreed} of {args.new_tokens}")
    for batch, prompts in prompts_by_batch.items():
        rows.append({"batch": batch, "run": "HF generate (grouped_mm)", **measure(hf_fn(hf, prompts), batch,
                                                                               args.new_tokens)})
    del hf
    gc.collect()
    return rows


def offload_section(model, args, prompts_by_batch) -> list[dict]:
    """Batch 1 with the experts in pinned host memory behind a 25 % device cache; last, as it moves the experts."""
    prompts = prompts_by_batch[min(prompts_by_batch)][:1]
    batch, num_experts = 1, model.config.num_experts
    rows = [{"batch": batch, "run": "ours eager, experts resident", **measure(ours_fn(model, prompts), batch,
                                                                           args.slow_new_tokens)}]
    resident = rows[0]["decode_tok_s"]
    capacity, top_k = num_experts // 4, model.moe_layers[0].router.k
    # Pin all but top_k / 2 slots, which stay free for the experts a token needs beyond the pinned ones.
    pinned = capacity - top_k // 2
    if args.pin_hot_from:
        hot = hot_experts_from_stats(args.pin_hot_from, pinned, model=model)
    else:  # stand-in for training statistics: the routing of a calibration batch
        counts = RoutingCounts.zeros(len(model.moe_layers), num_experts, device=DEVICE)
        with torch.no_grad():
            counts.add_routings(model(prompts_by_batch[max(prompts_by_batch)]).routings)
        hot = hot_experts_from_stats(counts, pinned)
    for name, settings in (("LRU", dict(policy="lru")), ("LFU + hot pinned", dict(policy="lfu", pin=hot)),
                           ("LFU + hot pinned + prefetch", dict(policy="lfu", pin=hot, prefetch=True))):
        with experts_replaced(model, lambda: offload_experts(model, capacity, **settings)) as offload:
            row = measure(ours_fn(model, prompts), batch, args.slow_new_tokens, reps=1)
            stats = offload.stats()
            # measure() ran two generations of 1 and two of N new tokens; their prefills' loads are included.
        tokens = 2 * (1 + args.slow_new_tokens)
        rows.append({"batch": batch, "run": f"offloaded, 25% cache, {name}", **row,
                     "x_resident": round(row["decode_tok_s"] / resident, 3), "hit_rate": round(stats.hit_rate, 3),
                     "MB_per_new_token": round(stats.bytes_loaded / tokens / 1e6, 1)})
    return rows


def quant_section(model, args, prompts_by_batch) -> list[dict]:
    """bitsandbytes experts: memory against bf16, decode speed, and how far the logits move."""
    rows = []
    bf16_bytes = expert_weight_bytes(model)
    probe = prompts_by_batch[min(prompts_by_batch)]
    with torch.no_grad():
        reference = model(probe).logits.float()
    for mode in ("int8", "nf4"):
        with experts_replaced(model, lambda: quantize_model(model, mode)):
            with torch.no_grad():
                error = (model(probe).logits.float() - reference).norm() / reference.norm()
            memory = {"expert_GB": round(expert_weight_bytes(model) / 1e9, 2),
                      "x_bf16_memory": round(expert_weight_bytes(model) / bf16_bytes, 3),
                      "logits_rel_err": round(float(error), 4)}
            for batch, prompts in prompts_by_batch.items():
                rows.append({"batch": batch, "run": f"ours eager, {mode} experts",
                             **measure(ours_fn(model, prompts), batch, args.slow_new_tokens, reps=1), **memory})
    return rows


@contextlib.contextmanager
def experts_replaced(model: MoETransformer, replace: Callable[[], object]) -> Iterator[object]:
    """The model with its experts replaced by ``replace()`` (offloaded, quantised) for the block, then as it was."""
    resident = [layer.experts for layer in model.moe_layers]
    handle = replace()
    try:
        yield handle
    finally:
        if isinstance(handle, ExpertOffload):
            handle.remove_prefetch()
        for layer, experts in zip(model.moe_layers, resident):
            layer.experts = experts


SECTIONS: dict[str, Callable] = {"decoders": decoders_section, "quant": quant_section, "offload": offload_section}


def print_table(rows: list[dict]) -> None:
    print(f"{'batch':>5}  {'run':<48} {'prefill ms':>11} {'decode tok/s':>13} {'x HF':>6}")
    hf = {row["batch"]: row["decode_tok_s"] for row in rows if row["run"].startswith("HF generate")}
    for row in rows:
        ratio = row["decode_tok_s"] / hf[row["batch"]] if row["batch"] in hf else float("nan")
        extra = "  ".join(f"{k}={v}" for k, v in row.items() if k not in ("batch", "run", "prefill_ms", "decode_tok_s"))
        print(f"{row['batch']:>5}  {row['run']:<48} {row['prefill_ms']:>11.1f} {row['decode_tok_s']:>13.1f} "
              f"{ratio:>6.2f}  {extra}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dims", choices=list(DIMS), default="olmoe-like")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--compile", action="store_true", help="torch.compile the CompiledDecoder's step too")
    parser.add_argument("--slow-new-tokens", type=int, default=16,
                        help="new tokens for the quant and offload rows, whose per-expert loops and copies are slow")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--checkpoint", help="a trained model instead of random --dims weights")
    parser.add_argument("--pin-hot-from", help="a training run's router_stats.jsonl: the hot experts to pin")
    parser.add_argument("--prompt-data", help="a LightningCLI config.yaml whose validation data gives the prompts")
    args = parser.parse_args()
    if args.checkpoint and "decoders" in args.sections:
        parser.error("--checkpoint needs --sections offload and/or quant (the decoders section needs olmoe-like "
                     "routing to build the HF peer)")

    device_name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    model = build_model(args)
    print(f"{device_name}, torch {torch.__version__}, {args.checkpoint or args.dims + ' dims'}, "
          f"{model.config.num_layers} layers, prompt {args.prompt_len}, {args.new_tokens} new tokens")
    generator = torch.Generator().manual_seed(0)
    prompts_by_batch = {
        batch: prompts_from_data(args.prompt_data, batch, args.prompt_len) if args.prompt_data else
        torch.randint(1, model.config.vocab_size, (batch, args.prompt_len), generator=generator).to(DEVICE)
        for batch in args.batch_sizes
    }
    rows = []
    for section in args.sections:
        rows += SECTIONS[section](model, args, prompts_by_batch)
    print_table(rows)
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"device": device_name, "torch": torch.__version__, "args": vars(args),
                       "rows": rows}, file, indent=2)


if __name__ == "__main__":
    main()
