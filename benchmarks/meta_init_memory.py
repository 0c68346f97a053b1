"""Peak CPU memory of building a model: the ordinary build against build_on_meta + materialize per expert-parallel
rank, beside each rank's expected share (the dense tensors whole plus 1/P of every expert tensor).

Every measurement runs in a fresh process (peak RSS, ``VmHWM``, above the process's resident size after its
imports), one at a time, on one thread; the ranks of one run are measured one after the other, as each would be
alone on its machine. Fresh initialisation in every mode, so the materialised tensors are those of the ordinary
build (see :mod:`moe_lightning.models.materialize`).

    python benchmarks/meta_init_memory.py                       # configs/olmoe-like-1b.yaml's model, bf16, 2 ranks
    python benchmarks/meta_init_memory.py --ep-size 4 --skip-full
    python benchmarks/meta_init_memory.py --num-layers 2        # a quicker look
    python benchmarks/meta_init_memory.py --cli --skip-full     # the recipe itself through moe-lightning's CLI

``--cli`` measures what ``moe-lightning fit --config configs/olmoe-like-1b.yaml --trainer.strategy expert_parallel
--trainer.devices P`` does on each rank before training: parse the YAML (``meta_init: true`` builds the model on the
meta device) and run the module's ``configure_model`` as rank ``p`` of ``P`` (a stand-in for the device mesh: no
process group, so the ranks need not run at once). The recipe's ``bf16-mixed`` keeps fp32 parameters: its rows hold
fp32 whatever ``--dtype`` says.
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
import torch._dynamo  # noqa: F401  torch imports it (about 70 MB) on a module's first build under a device context:
# loaded here, it is not counted as build memory (importing moe_lightning no longer loads it through Lightning)

from moe_lightning.models import MoETransformer, MoETransformerConfig
from moe_lightning.models.materialize import build_on_meta, expert_rows, materialize
from moe_lightning.routing import TopKRouter

GiB = 1024**3
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
RECIPE = Path(__file__).resolve().parents[1] / "configs" / "olmoe-like-1b.yaml"


def olmoe_like_1b(**overrides) -> MoETransformerConfig:
    """The model of configs/olmoe-like-1b.yaml (the preset of that name)."""
    return MoETransformerConfig.from_preset("olmoe-like-1b", **overrides)


def build(config: MoETransformerConfig) -> MoETransformer:
    return MoETransformer(config, router=lambda dim, num_experts: TopKRouter(dim, num_experts, num_experts_per_token=8))


def peak_rss_bytes() -> int:
    """This process's peak resident size since it started its program (Linux). Not ``getrusage``'s ``ru_maxrss``: that
    keeps the peak from before ``exec``, where a forked child counted all of its parent's resident pages."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))  # in kB


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
    return {"peak_bytes": peak_rss_bytes() - before, "held_bytes": held, "seconds": seconds}


class ExpertParallelRank:
    """What ``configure_model`` reads of a device mesh (its ``expert_parallel`` dimension), for one rank of ``size``
    without a process group."""

    mesh_dim_names = ("expert_parallel",)

    def __init__(self, rank: int, size: int) -> None:
        self.rank, self.ranks = rank, size

    def __getitem__(self, name: str) -> ExpertParallelRank:
        return self

    def get_local_rank(self) -> int:
        return self.rank

    def size(self) -> int:
        return self.ranks


def child_cli(num_layers: int | None, ep_rank: int, ep_size: int) -> dict:
    """In this process: the recipe through MoELightningCLI, parse and ``configure_model`` as rank ``ep_rank``."""
    from moe_lightning.cli import MoELightningCLI

    torch.set_num_threads(1)
    args = ["--config", str(RECIPE), "--trainer.accelerator=cpu", "--trainer.strategy=expert_parallel",
            f"--trainer.devices={ep_size}", "--trainer.logger=false"]
    if num_layers is not None:
        args.append(f"--model.init_args.model.init_args.config.num_layers={num_layers}")
    before = _rss_bytes()
    start = time.perf_counter()
    module = MoELightningCLI(run=False, args=args).model
    parsed_peak = peak_rss_bytes() - before
    module._device_mesh = ExpertParallelRank(ep_rank, ep_size)  # what the strategy sets before configure_model
    module.configure_model()
    seconds = time.perf_counter() - start
    held = sum(t.numel() * t.element_size() for t in [*module.model.parameters(), *module.model.buffers()])
    return {"peak_bytes": peak_rss_bytes() - before, "held_bytes": held, "seconds": seconds,
            "parsed_peak_bytes": parsed_peak}


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
    return _in_fresh_process(["--child", json.dumps(dataclasses.asdict(config)), mode, str(ep_rank), str(ep_size), dtype])


def measure_cli(num_layers: int | None, ep_rank: int, ep_size: int) -> dict:
    """:func:`child_cli` in a fresh process."""
    return _in_fresh_process(["--child-cli", json.dumps(num_layers), str(ep_rank), str(ep_size)])


def _in_fresh_process(args: list[str]) -> dict:
    command = [sys.executable, __file__, *args]
    mode = args[0]
    root = str(Path(__file__).resolve().parents[1])
    result = subprocess.run(command, capture_output=True, text=True, cwd=root, env={"PYTHONPATH": root, "OMP_NUM_THREADS": "1"})
    if result.returncode != 0:
        raise RuntimeError(f"{mode} build failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ep-size", type=int, default=2)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16; fp32 with --cli")
    parser.add_argument("--num-layers", type=int, default=None, help="fewer blocks than the preset's 16")
    parser.add_argument("--skip-full", action="store_true", help="leave out the ordinary build (all of the model)")
    parser.add_argument("--cli", action="store_true", help=f"the ranks through MoELightningCLI and {RECIPE.name}")
    options = parser.parse_args()
    if options.cli and options.dtype not in (None, "fp32"):
        parser.error(f"--cli measures the recipe's fp32 parameters (bf16-mixed), got --dtype {options.dtype}")
    options.dtype = options.dtype or ("fp32" if options.cli else "bf16")
    overrides = {} if options.num_layers is None else {"num_layers": options.num_layers}
    config = olmoe_like_1b(**overrides)
    share = expected_share_bytes(config, options.ep_size, options.dtype)
    whole = expected_share_bytes(config, 1, options.dtype)
    print(f"olmoe-like-1b (dim {config.dim}, {config.num_layers} layers, {config.num_experts} experts of hidden "
          f"{config.expert_hidden_dim}), {options.dtype}, expert_parallel_size={options.ep_size}; "
          f"the whole model holds {whole / GiB:.2f} GiB")
    rows = [] if options.skip_full else [("ordinary build (whole model)", measure(config, "full", dtype=options.dtype), whole)]
    for rank in range(options.ep_size):
        if options.cli:
            result = measure_cli(options.num_layers, rank, options.ep_size)
            print(f"CLI rank {rank}: peak RSS {result['parsed_peak_bytes'] / GiB:.2f} GiB after parsing the YAML")
            rows.append((f"CLI + configure_model, rank {rank} of {options.ep_size}", result, share))
        else:
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
    elif sys.argv[1:2] == ["--child-cli"]:
        num_layers, ep_rank, ep_size = sys.argv[2:]
        print(json.dumps(child_cli(json.loads(num_layers), int(ep_rank), int(ep_size))))
    else:
        main()
