"""DeepSpeedExpertParallelStrategy's checkpoints, and their conversion to moe_lightning's.

A checkpoint is DeepSpeed's own directory (``engine.save_checkpoint``, tag ``checkpoint``, as Lightning's
``DeepSpeedStrategy`` writes it): ``checkpoint/mp_rank_00_model_states.pt`` (global rank 0's module state and the
Lightning loop state) and one ``zero_pp_rank_{r}_mp_rank_00_optim_states.pt`` per rank (its ZeRO partitions,
experts' included). DeepSpeed resumes from it as it is. With sharded experts, rank 0's module state holds only rank 0's
slice of them, so each expert-parallel rank also writes its slice, as moe_lightning's sharded checkpoints do
(``checkpoint/experts-{p}-of-{P}.safetensors``, keys ``model/<parameter name>``).

:func:`convert_to_lightning` turns the directory into one ordinary Lightning checkpoint file with every expert: what
:func:`moe_lightning.checkpoint.export_consolidated` writes, which ``moe_lightning.inference`` loads (with the run's
``config.yaml``) and every moe_lightning strategy resumes the weights of. The other way, the strategy loads
moe_lightning checkpoints (files or sharded directories, at any expert-parallel size) directly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from moe_lightning.checkpoint.atomic import atomic_torch_save
from moe_lightning.checkpoint.reading import load_safetensors_file, load_torch_file, safetensors_metadata
from moe_lightning.checkpoint.sharded import save_sharded

TAG = "checkpoint"
"""The tag Lightning's DeepSpeedStrategy saves under."""
MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
"""Global rank 0's model-states file: ZeRO-1/2 name, ZeRO-3 name."""
LIGHTNING_KEYS = "lightning_keys"
"""Model-states entry naming the entries that are Lightning's (DeepSpeed stores its own beside them)."""


def is_deepspeed_checkpoint(path: str | Path) -> bool:
    return model_states_file(Path(path)) is not None


def model_states_file(path: Path) -> Path | None:
    return next((path / TAG / name for name in MODEL_STATES if (path / TAG / name).is_file()), None)


def to_lightning_checkpoint(path: str | Path) -> dict[str, Any]:
    """The Lightning checkpoint dict of DeepSpeed checkpoint directory ``path``: its Lightning state (loops,
    hyper-parameters, ...) and ``state_dict`` with every tensor whole. Optimizer state is left out: it exists only
    as ZeRO partitions, which only DeepSpeed resumes from."""
    path = Path(path)
    states_file = model_states_file(path)
    if states_file is None:
        raise ValueError(f"{path} is not a DeepSpeed checkpoint directory: it has none of {TAG}/{MODEL_STATES}")
    states = load_torch_file(states_file)
    zero_stage = states["ds_config"].get("zero_optimization", {}).get("stage", 0)
    if zero_stage == 3:
        # Rank 0's module holds placeholders; DeepSpeed's own tool reassembles the fp32 weights from the partitions.
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state_dict = dict(get_fp32_state_dict_from_zero_checkpoint(str(path), tag=TAG))
    else:
        state_dict = dict(states["module"])
    state_dict.update(read_expert_shards(path / TAG))
    return {**{key: states[key] for key in states[LIGHTNING_KEYS]}, "state_dict": state_dict}


def convert_to_lightning(path: str | Path, output_file: str | Path) -> None:
    """Write :func:`to_lightning_checkpoint` of ``path`` to one ``torch.save`` file (atomically)."""
    atomic_torch_save(to_lightning_checkpoint(path), output_file)


def save_expert_shard(
    directory: Path, experts: dict[str, Tensor], ep_rank: int, ep_size: int,
) -> None:
    """Write this expert-parallel rank's slice of every expert tensor (``state_dict`` keys) into ``directory``."""
    save_sharded(directory, {}, {f"model/{name}": value for name, value in experts.items()}, {}, ep_rank, ep_size,
                 write_meta=False, write_experts=True)


def read_expert_shards(directory: Path) -> dict[str, Tensor]:
    """Every expert tensor whole (``state_dict`` keys), from the ``experts-*.safetensors`` the strategy wrote."""
    shards: dict[int, Path] = {}
    sizes = set()
    for file in sorted(directory.glob("experts-*.safetensors")):
        metadata = safetensors_metadata(file)
        shards[int(metadata["ep_rank"])] = file
        sizes.add(int(metadata["ep_size"]))
    if not shards:
        return {}
    (ep_size,) = sizes if len(sizes) == 1 else (None,)
    if ep_size is None or sorted(shards) != list(range(ep_size)):
        raise ValueError(
            f"{directory} holds expert shards of ranks {sorted(shards)} of sizes {sorted(sizes)}: it needs every rank "
            "of one expert-parallel size"
        )
    pieces = [load_safetensors_file(shards[rank]) for rank in range(ep_size)]
    return {key.removeprefix("model/"): torch.cat([piece[key] for piece in pieces]) for key in pieces[0]}
