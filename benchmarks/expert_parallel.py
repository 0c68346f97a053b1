"""Expert-parallel training throughput per GPU at several expert-parallel sizes, in one launch.

    NCCL_NVLS_ENABLE=0 PYTHONPATH=. torchrun --nproc-per-node 4 benchmarks/expert_parallel.py [--ep-sizes 1 2 4]
        [--layers 4] [--batch 8] [--seq 2048] [--warmup 3] [--steps 10] [--json FILE]
    PYTHONPATH=. torchrun --nproc-per-node 2 benchmarks/expert_parallel.py --tiny      # CPU, gloo, tiny sizes

One process per GPU (torchrun; plain ``python`` runs one process). Model: MoETransformer with the
olmoe-like-1b shape (d 2048, 16 heads, 64 experts top-8 of hidden 1024, vocab 50304) but ``--layers`` blocks,
bf16 parameters, AdamW, random tokens, cross-entropy plus the routers' aux losses; every rank gets
``--batch`` x ``--seq`` tokens of its own at every configuration. The configurations, one after another:

- baseline (EP 1, DP -): every GPU trains a whole model alone with the ordinary LocalDispatcher, no
  communication at all, i.e. one GPU's throughput; the "vs 1 GPU" ratios refer to it.
- for each P in ``--ep-sizes``: EP=P x DP=N/P over all N ranks, set up with the building blocks of
  ``ExpertParallelStrategy._parallelize`` (check_same_layout, broadcast_module_states, shard_experts, which
  gives every MoE layer an AllToAllDispatcher, and GradientReducer, called after backward as the strategy's
  post_backward does): the code path of ``Trainer(strategy="expert_parallel")``, without the Trainer's own
  per-step work. EP=1 here still routes through a one-rank AllToAllDispatcher, as the strategy does.

Timing: step time = CUDA events around forward + backward + gradient reduction + AdamW step + zero_grad, median
of ``--steps`` after ``--warmup``; tokens/s per GPU = tokens per rank / the slowest rank's median step.
Dispatch + combine: the rows' all-to-all, ``moe_lightning.dispatch.all_to_all._exchange`` (called once by
dispatch and once by combine; autograd runs one more all-to-all for each in backward), is wrapped with CUDA events:
forward around the call, backward by tensor hooks on its output (the gradient has arrived: the backward
all-to-all comes next) and its input (its gradient is out). Share = those 4 x layers spans / step time, mean
over steps and ranks. The spans include waiting for the slowest peer (load imbalance); they leave out the
split-size exchange, the local sort and the host sync on split sizes (``.tolist()``). The gradient all-reduce
of GradientReducer is timed the same way ("grad reduce"). GB/s = bytes of this rank's send buffers / time in
those exchanges (nccl-tests' "algbw"); raw = ``all_to_all_single`` with equal splits on the same EP group for a
send buffer of the mean exchange size (= one layer's dispatch, on average over ranks), median of 20: the ceiling.
On the CPU the same marks are host clocks (the ops are synchronous there).

Memory at the default 4 layers, batch 8 x 2048 (1.88 G parameters: 1.61 G in experts, 0.27 G dense, of which
0.21 G embedding and head): bf16 weights 3.8 GB + grads 3.8 GB + AdamW's two bf16 states 7.5 GB = 15 GB;
GradientReducer's flat all-reduce buffer copies the gradients (up to +3.8 GB at EP=1); activations of 16k tokens
about 2.6 GB per layer (8 routed rows per token: 131k x 2048 bf16 = 0.5 GB per saved copy) + the logits and their
fp32 cross-entropy (16k x 50k: ~8 GB) => ~35-40 GB peak at EP=1, so one 80 GB H100 fits it (the table prints the
measured peak). At EP=P a rank keeps 1/P of the experts and their AdamW state.

EP sizes must divide the world size and the 64 experts. To run sizes in separate launches instead, give one
``--ep-sizes P`` per launch (the one-GPU row comes with each; ``--no-baseline`` drops it).
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import statistics
import time

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from moe_lightning.dispatch import all_to_all
from moe_lightning.models import MoETransformer, MoETransformerConfig
from moe_lightning.module import MoELightningModule
from moe_lightning.routing import TopKRouter
from moe_lightning.strategies.replicas import GradientReducer, broadcast_module_states
from moe_lightning.strategies.sharding import check_same_layout, shard_experts


class Clock:
    """Marks on the device's timeline: CUDA events on GPUs (asynchronous), host time on CPUs (ops are synchronous)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def ms(self, start, end) -> float:
        return start.elapsed_time(end) if self.cuda else (end - start) * 1e3

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def median_ms(self, fn, warmup: int = 5, reps: int = 20) -> float:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(reps):
            start = self.mark()
            fn()
            end = self.mark()
            self.sync()
            times.append(self.ms(start, end))
        return statistics.median(times)


class ExchangeTimer:
    """Times every call of the row all-to-all in both directions. Dispatch and combine look ``_exchange`` up in
    their module at call time, so replacing the module attribute reaches them without touching their code."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.spans: list[list] = []  # [start, end, bytes sent by this rank]
        self._original = all_to_all._exchange
        all_to_all._exchange = self._timed

    def _timed(self, x_SD, send_splits, recv_splits, group):
        span = [self.clock.mark(), None, x_SD.numel() * x_SD.element_size()]
        out_RD = self._original(x_SD, send_splits, recv_splits, group)
        span[1] = self.clock.mark()
        self.spans.append(span)
        if out_RD.requires_grad:
            # Backward sends the output's gradient (out_RD's size) the other way.
            back = [None, None, out_RD.numel() * out_RD.element_size()]
            out_RD.register_hook(lambda grad: back.__setitem__(0, self.clock.mark()))
            x_SD.register_hook(lambda grad: back.__setitem__(1, self.clock.mark()))
            self.spans.append(back)
        return out_RD

    def take(self, expected: int) -> tuple[float, int]:
        """Milliseconds and bytes of the spans since the last call (after a sync); checks their number."""
        done = [s for s in self.spans if s[0] is not None and s[1] is not None]
        if len(done) != expected or len(self.spans) != expected:
            raise RuntimeError(f"timed {len(done)} of {len(self.spans)} all-to-alls in a step, expected {expected}")
        self.spans = []
        return sum(self.clock.ms(s, e) for s, e, _ in done), sum(n for _, _, n in done)

    def close(self) -> None:
        all_to_all._exchange = self._original


def model_config(args) -> tuple[MoETransformerConfig, int]:
    if args.tiny:
        config = MoETransformerConfig(
            vocab_size=256, dim=64, num_layers=args.layers, num_heads=4, num_experts=8, expert_hidden_dim=32,
            max_seq_len=args.seq,
        )
        return config, 2
    config = MoETransformerConfig.from_preset("olmoe-like-1b", num_layers=args.layers, max_seq_len=max(args.seq, 4096))
    return config, 8  # top-8, as configs/olmoe-like-1b.yaml


def build_model(args, device: torch.device) -> MoETransformer:
    config, top_k = model_config(args)
    # As configs/olmoe-like-1b.yaml's router. Same seed on every rank; the broadcast makes sure anyway.
    router = functools.partial(
        TopKRouter, num_experts_per_token=top_k, normalize_weights=False, load_balance_coef=0.01, z_loss_coef=0.001
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = MoETransformer(config, router=router)
    return model.to(torch.bfloat16)


def run_config(args, device: torch.device, clock: Clock, ep: int | None) -> dict:
    """Train ``--warmup`` + ``--steps`` steps at EP=ep x DP=world/ep (``ep=None``: every rank alone)."""
    world = dist.get_world_size()
    model = build_model(args, device)
    reducer = ep_group = None
    if ep is not None:
        mesh = init_device_mesh(device.type, (world // ep, ep), mesh_dim_names=("data_parallel", "expert_parallel"))
        ep_group = mesh["expert_parallel"].get_group()
        # ExpertParallelStrategy._parallelize, step by step.
        check_same_layout(model)
        broadcast_module_states(model)
        expert_names = shard_experts(model, ep_group)
        reducer = GradientReducer(model, expert_names, mesh["data_parallel"].get_group())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    generator = torch.Generator(device=device).manual_seed(1000 + dist.get_rank())
    vocab = model.config.vocab_size
    tokens = torch.randint(0, vocab, (args.batch, args.seq + 1), device=device, generator=generator)
    input_ids, labels = tokens[:, :-1], tokens[:, 1:]

    timer = ExchangeTimer(clock)
    step_ms, exchange_ms, exchange_bytes, reduce_ms = [], [], [], []
    if clock.cuda:
        torch.cuda.reset_peak_memory_stats(device)
    try:
        for step in range(args.warmup + args.steps):
            start = clock.mark()
            logits, routings = model(input_ids)
            aux = sum(sum(r.aux_losses.values()) for r in routings)
            loss = MoELightningModule.cross_entropy(logits, labels) + aux
            loss.backward()
            before_reduce = clock.mark()
            if reducer is not None:
                reducer.reduce()
            after_reduce = clock.mark()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            end = clock.mark()
            clock.sync()
            ms, nbytes = timer.take(expected=0 if ep is None else 4 * len(model.moe_layers))
            if step >= args.warmup:
                step_ms.append(clock.ms(start, end))
                reduce_ms.append(clock.ms(before_reduce, after_reduce))
                exchange_ms.append(ms)
                exchange_bytes.append(nbytes)
            del logits, routings, loss, aux
    finally:
        timer.close()
    peak_gib = torch.cuda.max_memory_allocated(device) / 2**30 if clock.cuda else None

    result = {
        "ep": ep, "dp": None if ep is None else world // ep, "step_ms": statistics.median(step_ms),
        "exchange_share": statistics.mean(e / s for e, s in zip(exchange_ms, step_ms)),
        "reduce_share": statistics.mean(r / s for r, s in zip(reduce_ms, step_ms)),
        "a2a_gbps": sum(exchange_bytes) / sum(exchange_ms) / 1e6 if sum(exchange_ms) > 0 else None,
        "raw_gbps": None, "peak_gib": peak_gib,
    }
    if ep is not None and ep > 1:
        # Equal splits need the same buffer on every rank: the mean exchange over all ranks.
        mean_bytes = torch.tensor(sum(exchange_bytes) / (4 * len(model.moe_layers) * args.steps), device=device)
        dist.all_reduce(mean_bytes)
        result["raw_gbps"] = raw_all_to_all_gbps(mean_bytes.item() / world, ep_group, device, clock)
    del model, optimizer, reducer, tokens, input_ids, labels
    gc.collect()
    if clock.cuda:
        torch.cuda.empty_cache()
    return result


def raw_all_to_all_gbps(nbytes: float, group, device: torch.device, clock: Clock) -> float:
    """GB/s of a plain equal-split ``all_to_all_single`` of ``nbytes`` (this rank's send buffer) on ``group``."""
    size = dist.get_world_size(group)
    numel = max(1, round(nbytes / 2 / size)) * size
    send = torch.randn(numel, device=device, dtype=torch.bfloat16)
    recv = torch.empty_like(send)
    ms = clock.median_ms(lambda: dist.all_to_all_single(recv, send, group=group))
    return numel * 2 / ms / 1e6


def gather(result: dict) -> list[dict]:
    results: list = [None] * dist.get_world_size()
    dist.all_gather_object(results, result)
    return results


def summarize(per_rank: list[dict]) -> dict:
    """One row: the slowest rank's step time, means of the shares and bandwidths, the largest peak."""
    def mean(key):
        values = [r[key] for r in per_rank if r[key] is not None]
        return statistics.mean(values) if values else None

    row = dict(per_rank[0])
    row["step_ms"] = max(r["step_ms"] for r in per_rank)
    row["peak_gib"] = None if per_rank[0]["peak_gib"] is None else max(r["peak_gib"] for r in per_rank)
    for key in ("exchange_share", "reduce_share", "a2a_gbps", "raw_gbps"):
        row[key] = mean(key)
    return row


def print_table(rows: list[dict], tokens_per_gpu: int) -> None:
    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    base = rows[0]["tokens_per_s"] if rows[0]["ep"] is None else None
    lines = [["EP", "DP", "tokens/s/GPU", "vs 1 GPU", "step ms", "dispatch+combine", "grad reduce", "a2a GB/s",
              "raw a2a GB/s", "peak GiB"]]
    for row in rows:
        alone = row["ep"] is None
        lines.append([
            "1" if alone else str(row["ep"]), "-" if alone else str(row["dp"]), f"{row['tokens_per_s']:,.0f}",
            fmt(base and row["tokens_per_s"] / base, ".2f"), f"{row['step_ms']:.1f}",
            fmt(None if alone else row["exchange_share"], ".1%"), fmt(None if alone else row["reduce_share"], ".1%"),
            fmt(row["a2a_gbps"], ".4g"), fmt(row["raw_gbps"], ".4g"), fmt(row["peak_gib"], ".1f"),
        ])
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    for i, line in enumerate(lines):
        print("| " + " | ".join(cell.rjust(width) for cell, width in zip(line, widths)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (width + 2) for width in widths) + "|")
    print(f"{tokens_per_gpu} tokens per GPU per step. EP 1 / DP -: each GPU alone (no communication), the base of "
          f"'vs 1 GPU'. Shares are of the step time; GB/s: send bytes / time (algbw).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ep-sizes", "--expert-parallel-size", type=int, nargs="+", default=None,
                        help="expert-parallel sizes, each with DP = world size / EP (default: every divisor)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=None, help="sequences per GPU (default 8; --tiny: 2)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 2048; --tiny: 32)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--no-baseline", action="store_true", help="skip the one-GPU-alone row")
    parser.add_argument("--tiny", action="store_true", help="tiny model (d 64, 8 experts top-2) for CPU checks")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--json", default=None, help="also write the rows here (rank 0)")
    args = parser.parse_args()
    args.batch = args.batch or (2 if args.tiny else 8)
    args.seq = args.seq or (32 if args.tiny else 2048)

    # Plain `python` (no torchrun): a world of one.
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500"), ("RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)
    # NVLink multicast barely matters here and can wedge a shared host's GPUs: keep it off.
    os.environ["NCCL_NVLS_ENABLE"] = "0"
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if use_cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()

    num_experts = model_config(args)[0].num_experts
    ep_sizes = args.ep_sizes or [p for p in range(1, world + 1) if world % p == 0 and num_experts % p == 0]
    for p in ep_sizes:
        if world % p or num_experts % p:
            raise ValueError(f"each EP size must divide the world size and the experts, got ep={p}, "
                             f"world_size={world}, num_experts={num_experts}")
    clock = Clock(device)
    if rank == 0:
        card = torch.cuda.get_device_name(device) if clock.cuda else "CPU"
        config, top_k = model_config(args)
        print(f"{world} x {card}, torch {torch.__version__}, {dist.get_backend()}; {config.num_layers} layers, "
              f"d {config.dim}, {config.num_experts} experts top-{top_k} of hidden {config.expert_hidden_dim}, "
              f"vocab {config.vocab_size}; batch {args.batch} x {args.seq} per GPU; EP sizes {ep_sizes}", flush=True)

    rows = []
    for ep in ([] if args.no_baseline else [None]) + ep_sizes:
        row = summarize(gather(run_config(args, device, clock, ep)))
        row["tokens_per_s"] = args.batch * args.seq / (row["step_ms"] / 1e3)
        rows.append(row)
        if rank == 0:
            print(f"done: EP {row['ep'] or 1} x DP {row['dp'] or '-'}: {row['step_ms']:.1f} ms/step", flush=True)
    if rank == 0:
        print()
        print_table(rows, args.batch * args.seq)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"world_size": world, "args": vars(args), "rows": rows}, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
