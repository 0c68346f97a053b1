"""A statistics-driven serving plan against uniform quantisation at the same memory, and its pins against LRU.

    PYTHONPATH=. python benchmarks/serving_plan.py [--steps 200] [--seed 0] [--budgets 1 1.25 1.5]
        [--capacities 2 4] [--out DIR] [--json PATH]

On the CPU, in a few minutes: trains a small MoE (4 MoE layers of 8 experts, top-2, d 128, expert hidden 256) on the
synthetic tasks of ``moe_lightning.data`` with a weak load-balancing loss, so routing ends up uneven, and writes
``router_stats.jsonl`` with :class:`RouterStatsMonitor`. Then, with the trained model exported:

1. Perplexity, and the mean KL divergence from the float model's next-token distribution (what quantisation changed,
   which perplexity differences this small do not resolve), on held-out synthetic data (the validation split, answer
   tokens only): of the float model, of uniform NF4 (``quantize --mode nf4``: blocks of 64, fp32 scales) and each
   uniform candidate format, and of plans made with ``moe-lightning plan`` at ``--budgets`` multiples of uniform
   NF4's exact expert bytes (1x: the same memory), from the statistics and by the same rule with every expert's share
   set equal (what the statistics add). Every row's expert bytes are measured on the quantised model.
2. Expert-cache hit rate while decoding held-out prompts one token at a time (batch 1, the prefill not counted),
   float experts offloaded behind caches of ``--capacities`` slots per layer: plain LRU, LFU, and LRU with a plan's
   pinned experts (1 .. slots - 1 of them, the hottest by the statistics) taking slots of the same cache.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import tempfile
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer, seed_everything

from moe_lightning import MoELightningModule
from moe_lightning.callbacks import RouterStatsMonitor
from moe_lightning.cli import main as moe_lightning
from moe_lightning.data import SyntheticTasksDataModule
from moe_lightning.data.windows import IGNORE_INDEX
from moe_lightning.inference import export_safetensors, offload_experts, stream_generate
from moe_lightning.inference.engine import load_model
from moe_lightning.inference.plan import ServingPlan, apply_plan
from moe_lightning.inference.plan_allocation import DEFAULT_FORMATS
from moe_lightning.inference.quantization import expert_weight_bytes, format_config, quantize_model
from moe_lightning.models import MoETransformer, MoETransformerConfig
from moe_lightning.routing import TopKRouter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200, help="training steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--load-balance-coef", type=float, default=0.001, help="weak, so routing stays uneven")
    parser.add_argument("--stats-last-n", type=int, default=4, help="records of router_stats.jsonl the plans use")
    parser.add_argument("--eval-batches", type=int, default=16, help="validation batches of 16 for perplexity")
    parser.add_argument("--budgets", type=float, nargs="+", default=[1.0, 1.25, 1.5],
                        help="plan budgets, as multiples of uniform nf4's expert bytes")
    parser.add_argument("--capacities", type=int, nargs="+", default=[2, 4],
                        help="expert-cache slots per layer; each is measured with 1 .. slots-1 pinned experts")
    parser.add_argument("--prompts", type=int, default=16, help="held-out prompts decoded for the hit rate")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--out", default=None, help="where the run, export and plans go (default: a temp dir)")
    parser.add_argument("--reuse", action="store_true",
                        help="take model.safetensors and router_stats.jsonl from an earlier run's --out (no training)")
    parser.add_argument("--json", default=None, help="also write the numbers here")
    options = parser.parse_args()
    out = Path(options.out or tempfile.mkdtemp(prefix="serving_plan_"))
    out.mkdir(parents=True, exist_ok=True)

    data = SyntheticTasksDataModule(seq_len=128, batch_size=16, seed=options.seed)
    checkpoint, stats = out / "model.safetensors", out / "router_stats.jsonl"  # where RouterStatsMonitor writes
    if options.reuse:
        model = load_model(checkpoint).eval()
    else:
        model = train(data, options, out)
        export_safetensors(model, checkpoint)
    data.setup("validate")
    batches = [batch for _, batch in zip(range(options.eval_batches), data.val_dataloader())]
    float_log_probs = log_probs(model, batches)

    # The same rule without the statistics' information: every expert of a layer equally loaded.
    equal_stats = out / "equal_router_stats.jsonl"
    equal_stats.write_text(json.dumps({"step": 0, "layers": [{"layer": i, "load": [1.0] * layer.num_experts}
                                                             for i, layer in enumerate(model.moe_layers)]}) + "\n")

    def measure(quantized: MoETransformer) -> tuple[int, float, float]:
        return expert_weight_bytes(quantized), *quality(float_log_probs, log_probs(quantized, batches), batches)

    rows = {"float32": measure(model)}
    for name in ("nf4", *(f for f in DEFAULT_FORMATS if f not in ("bf16", "nf4"))):
        rows[f"uniform {name}"] = measure(quantize_model(copy.deepcopy(model), format_config(name)))
    nf4_bytes = rows["uniform nf4"][0]
    plans = {}
    for multiple in options.budgets:
        for name, source in (("plan", stats), ("plan, equal shares", equal_stats)):
            label = f"{name} @{multiple:g}x nf4"
            path = out / f"{label.replace(', ', '-').replace(' @', '-').replace(' ', '-')}.json"
            moe_lightning(["plan", str(checkpoint), "--stats", str(source), "--budget", str(int(multiple * nf4_bytes)),
                           "--output", str(path), "--last-n", str(options.stats_last_n)])
            plans[label] = ServingPlan.load(path)
            rows[label] = measure(apply_plan(copy.deepcopy(model), plans[label]))
            assert rows[label][0] == plans[label].total_bytes <= multiple * nf4_bytes
    stats_plan = plans["plan @1x nf4"]
    results = {"stats": str(stats), "shares": [[expert.share for expert in layer.experts]
                                               for layer in stats_plan.layers]}
    results["quality"] = {name: {"expert_bytes": b, "perplexity": p, "kl_from_float": kl}
                          for name, (b, p, kl) in rows.items()}
    results["plan_formats"] = {label: plan.expert_formats for label, plan in plans.items()}
    print_quality(rows, nf4_bytes, plans)

    prompts = [ids[:64].tolist() for batch in batches for ids in batch["input_ids"]][: options.prompts]
    pins = {}
    for count in range(1, max(options.capacities)):
        path = out / f"plan-pin{count}.json"
        moe_lightning(["plan", str(checkpoint), "--stats", str(stats), "--budget", "bf16", "--pin", str(count),
                       "--output", str(path), "--last-n", str(options.stats_last_n)])
        pins[count] = ServingPlan.load(path).pins
    hit_rates = {}
    for capacity in options.capacities:
        hit_rates[capacity] = {policy: hit_rate(model, prompts, capacity, options.new_tokens, policy, None)
                               for policy in ("lru", "lfu")}
        for count in range(1, capacity):
            hit_rates[capacity][f"lru + {count} pinned by the plan"] = hit_rate(
                model, prompts, capacity, options.new_tokens, "lru", pins[count])
    results["hit_rate"] = hit_rates
    print(f"\nExpert-cache hit rate, batch-1 decode of {len(prompts)} held-out prompts x {options.new_tokens} tokens "
          "(prefill not counted), 8 experts per layer")
    print(f"{'policy':<32}" + "".join(f"{f'{c} slots':>10}" for c in options.capacities))
    for policy in hit_rates[max(options.capacities)]:
        print(f"{policy:<32}" + "".join(f"{hit_rates[c][policy]:>10.3f}" if policy in hit_rates[c] else f"{'-':>10}"
                                        for c in options.capacities))
    if options.json:
        Path(options.json).write_text(json.dumps(results, indent=1))


def train(data: SyntheticTasksDataModule, options: argparse.Namespace, out: Path) -> MoETransformer:
    seed_everything(options.seed)
    config = MoETransformerConfig(vocab_size=data.vocab_size, dim=128, num_layers=4, num_heads=4, num_experts=8,
                                  expert_hidden_dim=256, max_seq_len=256)
    router = functools.partial(TopKRouter, num_experts_per_token=2, load_balance_coef=options.load_balance_coef,
                               z_loss_coef=0.001)
    module = MoELightningModule(MoETransformer(config, router=router), lr=3e-3, router_lr=3e-2, warmup_steps=50)
    monitor = RouterStatsMonitor(log_every_n_steps=25, window_steps=25, probe_size=0, log_images=False)
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=options.steps, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, limit_val_batches=0, default_root_dir=str(out), callbacks=[monitor])
    trainer.fit(module, datamodule=data)  # without a logger, the stats go to default_root_dir
    return module.model.eval()


@torch.no_grad()
def log_probs(model: MoETransformer, batches: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
    return [F.log_softmax(model(batch["input_ids"]).logits.float(), -1) for batch in batches]


def quality(reference: list[torch.Tensor], got: list[torch.Tensor], batches: list[dict[str, torch.Tensor]]
            ) -> tuple[float, float]:
    """Perplexity over the labelled (answer) tokens, and the mean KL(float model || this one) over them: the KL
    measures what quantisation changed, which perplexity differences this small cannot resolve."""
    nll = kl = count = 0.0
    for reference_BLV, got_BLV, batch in zip(reference, got, batches):
        labelled_BL = batch["labels"] != IGNORE_INDEX
        nll -= got_BLV[labelled_BL].gather(-1, batch["labels"][labelled_BL][:, None]).sum().item()
        kl += (reference_BLV.exp() * (reference_BLV - got_BLV)).sum(-1)[labelled_BL].sum().item()
        count += labelled_BL.sum().item()
    return math.exp(nll / count), kl / count


@torch.no_grad()
def hit_rate(model: MoETransformer, prompts: list[list[int]], capacity: int, new_tokens: int, policy: str,
             pin: list[list[int]] | None) -> float:
    offloaded = copy.deepcopy(model)
    offload = offload_experts(offloaded, capacity, policy, pin=pin)
    hits = accesses = 0
    for prompt in prompts:
        for step, _ in enumerate(stream_generate(offloaded, [prompt], new_tokens)):
            if step == 0:  # the prefill's experts are not what a decode step asks for
                offload.reset_stats()
        total = offload.stats().total
        hits, accesses = hits + total.hits, accesses + total.accesses
    return hits / accesses


def print_quality(rows: dict[str, tuple[int, float, float]], nf4_bytes: int, plans: dict[str, ServingPlan]) -> None:
    print(f"\nHeld-out answer tokens of the synthetic tasks; uniform nf4's experts take {nf4_bytes} bytes")
    print(f"{'experts':<32}{'MiB':>9}{'vs nf4':>8}{'perplexity':>12}{'KL from float (1e-4 nats)':>27}")
    for name, (num_bytes, ppl, kl) in rows.items():
        print(f"{name:<32}{num_bytes / 2**20:>9.3f}{num_bytes / nf4_bytes:>8.3f}{ppl:>12.4f}{kl * 1e4:>27.3f}")
    for label, plan in plans.items():
        counts = Counter(name for formats in plan.expert_formats for name in formats)
        print(f"{label}: " + ", ".join(f"{count} {name}" for name, count in sorted(counts.items())))


if __name__ == "__main__":
    main()
