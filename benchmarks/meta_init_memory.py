"""Peak CPU memory of building a model: the ordinary build against build_on_meta + materialize per expert-parallel
rank, beside each rank's expected share (the dense tensors whole plus 1/P of every expert tensor).

Every measurement runs in a fresh process (``resource.getrusage`` peak RSS above the process's resident size after its
imports), one at a time, on one thread; the ranks of one run are measured one after the other, as each would be
alone on its machine. Fresh initialisation in every mode, so the materialised tensors are those of the ordinary
build (see :mod:`moe_lightning.models.materialize`).

    python benchmarks/meta_init_memory.py                       # configs/olmoe-like-1b.yaml's model, bf16, 2 ranks
    python benchmarks/meta_init_memory.py --ep-size 4 --skip-full
    python benchmarks/meta_init_memory.py --num-layers 2        # a quicker look
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from moe_lightning.models import MoETransformer, MoETransformerConfig
from moe_lightning.models.materialize import build_on_meta, expert_rows, materialize
from moe_lightning.routing import TopKRouter

GiB = 1024**3
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def olmoe_like_1b(**overrides) -> MoETransformerConfig:
    """The model of configs/olmoe-like-1b.yaml (the preset of that name)."""
    return MoETransformerConfig.from_preset("olmoe-like-1b", **overrides)


def build(config: MoETransformerConfig) -> MoETransformer:
    return MoETransformer(config, router=lambda dim, num_experts: TopKRouter(dim, num_experts, num_experts_per_token=8))


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:  # Linux: pages in all, then resident
        return int(statm.read().split()[1]) * resource.getpagesize()


def child(config: dict, mode: str, ep_rank: int, ep_size: int, dtype: str) -> dict:
    """In this process: build the model one way and report peak RSS growth, bytes held and seconds."""
    torch.set_num_threads(1)
    model_config = MoETransformerConfig(**config)
    before = _rss_bytes()  # not the peak: the imports' transient peak would hide part of the build
    start = time.perf_counter()
    torch.set_default_dtype(DTYPES[dtype])
    torch.manual_seed(0)
    if mode == "full":
        model = build(model_config)
    else:
        model, record = build_on_meta(lambda: build(model_config))
        materialize(model, record, ep_rank=ep_rank, ep_size=ep_size)
    seconds = time.perf_counter() - start
    held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    return {"peak_bytes": _peak_rss_bytes() - before, "held_bytes": held, "seconds": seconds}


def expected_share_bytes(config: MoETransformerConfig, ep_size: int, dtype: str) -> int:
    """Dense tensors whole plus 1/P of the expert tensors, counted on a meta build."""
    torch.set_default_dtype(DTYPES[dtype])
    with torch.device("meta"):
        model = build(config)
    torch.set_default_dtype(torch.float32)
    experts = expert_rows(model)
    total = 0
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        size = tensor.numel() * tensor.element_size()
        total += size // ep_size if name in experts else size
    return total


def measure(config: MoETransformerConfig, mode: str, ep_rank: int = 0, ep_size: int = 1, dtype: str = "bf16") -> dict:
    """:func:`child` in a fresh process."""
    command = [sys.executable, __file__, "--child", json.dumps(dataclasses.asdict(config)), mode, str(ep_rank),
               str(ep_size), dtype]
    root = str(Path(__file__).resolve().parents[1])
    result = subprocess.run(command, capture_output=True, text=True, cwd=root, env={"PYTHONPATH": root, "OMP_NUM_THREADS": "1"})
    if result.returncode != 0:
        raise RuntimeError(f"{mode} build failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ep-size", type=int, default=2)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--num-layers", type=int, default=None, help="fewer blocks than the preset's 16")
    parser.add_argument("--skip-full", action="store_true", help="leave out the ordinary build (all of the model)")
    options = parser.parse_args()
    overrides = {} if options.num_layers is None else {"num_layers": options.num_layers}
    config = olmoe_like_1b(**overrides)
    share = expected_share_bytes(config, options.ep_size, options.dtype)
    whole = expected_share_bytes(config, 1, options.dtype)
    print(f"olmoe-like-1b (dim {config.dim}, {config.num_layers} layers, {config.num_experts} experts of hidden "
          f"{config.expert_hidden_dim}), {options.dtype}, expert_parallel_size={options.ep_size}; "
          f"the whole model holds {whole / GiB:.2f} GiB")
    rows = [] if options.skip_full else [("ordinary build (whole model)", measure(config, "full", dtype=options.dtype), whole)]
    for rank in range(options.ep_size):
        result = measure(config, "meta", rank, options.ep_size, options.dtype)
        rows.append((f"meta + materialize, rank {rank} of {options.ep_size}", result, share))
    print(f"| {'build':<36} | peak RSS (GiB) | held (GiB) | expected (GiB) | peak / expected | seconds |")
    print(f"|{'-' * 38}|----------------|------------|----------------|-----------------|---------|")
    for label, result, expected in rows:
        print(f"| {label:<36} | {result['peak_bytes'] / GiB:>14.2f} | {result['held_bytes'] / GiB:>10.2f} | "
              f"{expected / GiB:>14.2f} | {result['peak_bytes'] / expected:>15.3f} | {result['seconds']:>7.1f} |")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        config_json, mode, ep_rank, ep_size, dtype = sys.argv[2:]
        print(json.dumps(child(json.loads(config_json), mode, int(ep_rank), int(ep_size), dtype)))
    else:
        main()
