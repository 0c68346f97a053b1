"""Export of a :class:`MoETransformer` in a transformers family's own layout: a ``save_pretrained``-style directory
(``config.json`` + safetensors shards + index) that ``AutoModelForCausalLM.from_pretrained`` loads, or an
in-memory transformers model for comparisons."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from moe_lightning.models.hf.family import FAMILIES, HFFamily, check_fits, family_for
from moe_lightning.models.hf.shards import INDEX_FILE
from moe_lightning.models.transformer import MoETransformer

DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
"""Shard size above which export starts a new file (transformers' default is 5 GB too)."""


def export_family(model: MoETransformer, family: str | None) -> HFFamily:
    """The family to export ``model`` as: ``family``, else the one it was imported from; checked to fit."""
    name = family or model.config.hf_model_type
    if name is None:
        raise ValueError(f"the model was not imported from transformers (config.hf_model_type is None): pass "
                         f"family= one of {sorted(FAMILIES)}")
    chosen = family_for(name, "export_hf")
    check_fits(model, chosen)
    return chosen


def hf_state_dict(model: MoETransformer, family: HFFamily, layout: str = "files") -> dict[str, Tensor]:
    """``model``'s tensors under the family's names: ``layout="files"`` as checkpoints store them (per-expert
    matrices), ``"modules"`` as a transformers v5 model holds them (fused 3-D experts)."""
    if layout not in ("files", "modules"):
        raise ValueError(f"layout must be 'files' or 'modules', got layout={layout!r}")
    state = model.state_dict()
    out = {}
    for name, candidates in family.tensor_map(model.config).items():
        source = candidates[0] if layout == "files" else candidates[-1]
        out.update(source.split(state[name].detach()))
    return out


def hf_config_of(model: MoETransformer, family: HFFamily) -> Any:
    """The family's transformers config object describing ``model``."""
    from transformers import CONFIG_MAPPING

    config = CONFIG_MAPPING[family.model_type](**family.to_hf_config(model))
    config.architectures = [family.architecture_class]
    return config


@torch.no_grad()
def hf_model_from_moe_transformer(
    model: MoETransformer, family: str | None = None, experts_implementation: str = "grouped_mm",
) -> nn.Module:
    """The family's transformers ``*ForCausalLM`` holding ``model``'s weights, on its device and in its dtype."""
    from transformers import AutoModelForCausalLM

    chosen = export_family(model, family)
    hf_config = hf_config_of(model, chosen)
    hf_config.experts_implementation = experts_implementation
    hf_config._attn_implementation = "sdpa"
    hf = AutoModelForCausalLM.from_config(hf_config, dtype=model.embed.weight.dtype)
    hf.load_state_dict(hf_state_dict(model, chosen, layout="modules"), strict=not model.config.tie_embeddings)
    if model.config.tie_embeddings:
        hf.tie_weights()
    return hf.to(device=model.embed.weight.device).eval()


@torch.no_grad()
def export_hf(
    model: MoETransformer, out_dir: str | Path, family: str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write ``model`` as a transformers checkpoint directory of ``family`` (default: the family it was imported
    from), sharded at ``max_shard_bytes``; returns ``out_dir``.

    Raises:
        ValueError: the model does not fit the family (each setting named), no family is known, or ``out_dir``
            exists and is not empty; nothing is written then.
    """
    out_dir = Path(out_dir)
    chosen = export_family(model, family)
    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be >= 1, got max_shard_bytes={max_shard_bytes}")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ValueError(f"{out_dir} exists and is not an empty directory")
    hf_config = hf_config_of(model, chosen)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_config.to_json_file(str(out_dir / "config.json"))
    write_shards(hf_state_dict(model, chosen), out_dir, max_shard_bytes)
    return out_dir


def write_shards(tensors: dict[str, Tensor], out_dir: Path, max_shard_bytes: int) -> None:
    """``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json`` when
    the tensors exceed ``max_shard_bytes`` (a tensor larger than that gets a shard of its own). ``tensors`` may be
    views of the model's weights: each shard is copied to contiguous CPU memory only while it is written."""
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    files = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)
    ]
    weight_map = {}
    for file, shard in zip(files, shards):
        copies = {name: t.to("cpu").clone(memory_format=torch.contiguous_format) for name, t in shard.items()}
        save_file(copies, str(out_dir / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    if len(shards) == 1:
        return
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
