"""HFCheckpoint: a transformers checkpoint directory as a lazy source of our model's tensors, and load_hf_model.

``HFCheckpoint(dir)`` reads ``config.json`` (plain JSON, then the family's own transformers config class for its
defaults; never remote code), every shard's header, and checks every tensor's name and shape against the model the
config describes, so a bad checkpoint fails before any weight is read. Then ``load(name)`` reads one of our
tensors, and ``load(name, experts=range(a, b))`` only those experts' slices: a model built on the meta device can be
materialised tensor by tensor, one expert-parallel rank's experts at a time.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from moe_lightning.models.config import MoETransformerConfig
from moe_lightning.models.hf.family import HFFamily, family_for
from moe_lightning.models.hf.shards import SafetensorsShards
from moe_lightning.models.hf.tensor_map import Source, is_expert_source
from moe_lightning.models.router_spec import router_factory_from_spec
from moe_lightning.models.transformer import MoETransformer

CONFIG_FILE = "config.json"


class HFCheckpoint:
    """The checkpoint in ``directory`` (``config.json`` and one or many ``*.safetensors`` shards), validated.

    Raises:
        ValueError: no ``config.json``, an unsupported ``model_type`` or setting, a missing or truncated shard, a
            missing tensor, a tensor of the wrong shape, or a tensor the model would not use; each names it.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        raw = read_config_json(self.directory)
        self.family: HFFamily = family_for(raw.get("model_type"), str(self.directory / CONFIG_FILE))
        self.hf_config = hf_config_from_dict(raw)
        self._config, self._router = self.family.to_config(self.hf_config)
        self.shards = SafetensorsShards(self.directory)
        with torch.device("meta"):
            skeleton = self.build_model()
        shapes = {name: tuple(t.shape) for name, t in skeleton.state_dict().items()}
        if self._config.tie_embeddings:
            del shapes["head.weight"]
        self._shapes = shapes
        self._sources = self._choose_sources(self.family.tensor_map(self._config))

    def config(self) -> tuple[MoETransformerConfig, dict[str, Any] | None]:
        """Our model config and router spec (``{"class_path", "init_args"}``; None for a dense model)."""
        return self._config, self._router

    def build_model(self) -> MoETransformer:
        """A freshly initialised model of this checkpoint's architecture (on the current default device)."""
        router = router_factory_from_spec(self._router) if self._router else None
        return MoETransformer(self._config, router)

    def names(self) -> list[str]:
        """Our ``state_dict`` names this checkpoint provides (all of them; the tied head excepted)."""
        return list(self._shapes)

    def is_expert_tensor(self, name: str) -> bool:
        """Whether ``name`` is an ``[E, ...]`` routed-expert tensor, loadable one range of experts at a time."""
        return is_expert_source((self._source(name),))

    def load(self, name: str, experts: range | None = None) -> Tensor:
        """Our tensor ``name`` in the checkpoint's dtype, on the CPU; for an expert tensor, ``experts`` (a range of
        expert indices) reads only those experts, giving ``[len(experts), ...]``."""
        source = self._source(name)
        num_experts = self._shapes[name][0]
        if not is_expert_source((source,)):
            if experts is not None:
                raise ValueError(f"{name} is not an expert tensor: load it with experts=None")
            return source.read(self.shards.read)
        experts = range(num_experts) if experts is None else experts
        if experts.step != 1 or not 0 <= experts.start < experts.stop <= num_experts:
            raise ValueError(f"experts must be a non-empty contiguous range within [0, {num_experts}), got {experts}")
        return source.read(self.shards.read, experts)

    def _source(self, name: str) -> Source:
        if name not in self._sources:
            raise ValueError(f"{name} is not a tensor of this model; its tensors are {self.names()[:8]}...")
        return self._sources[name]

    def _choose_sources(self, tensor_map: dict[str, tuple[Source, ...]]) -> dict[str, Source]:
        """For each of our tensors the first candidate source the shards hold entirely, every HF shape checked;
        then no shard tensor may be left unread."""
        where = str(self.directory)
        unmapped = sorted(set(self._shapes) - set(tensor_map))
        if unmapped:  # a family module that forgot a tensor
            raise ValueError(f"{self.family.model_type} maps none of our tensors {unmapped[:8]}")
        available, chosen = self.shards.names(), {}
        for name, candidates in tensor_map.items():
            shape = self._shapes[name]
            num_experts = shape[0] if is_expert_source(candidates) else None
            for source in candidates:
                expected = source.hf_shapes(shape, num_experts)
                if set(expected) <= available:
                    break
            else:
                missing = sorted(set(candidates[0].hf_shapes(shape, num_experts)) - available)
                raise ValueError(f"{where}: the checkpoint lacks tensor(s) {missing[:8]} (for our {name})")
            for hf_name, hf_shape in expected.items():
                actual = self.shards.shape(hf_name)
                if actual != hf_shape:
                    raise ValueError(
                        f"{where}/{self.shards.file_of(hf_name)}: tensor {hf_name} has shape {list(actual)}, the "
                        f"config implies {list(hf_shape)}"
                    )
            chosen[name] = source
        used = {hf_name for name, source in chosen.items()
                for hf_name in source.hf_shapes(self._shapes[name], self._shapes[name][0])}
        ignored = [re.compile(pattern) for pattern in (r".*rotary_emb\.inv_freq$", *self.family.ignored_tensors)]
        unused = sorted(n for n in available - used if not any(p.fullmatch(n) for p in ignored))
        if unused:
            raise ValueError(f"{where}: tensors {unused[:8]} would be ignored: the config describes a model without "
                             "them (a setting we do not implement?)")
        return chosen


def read_config_json(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_FILE
    if not directory.is_dir():
        raise ValueError(f"{directory} is not a directory")
    if not path.is_file():
        raise ValueError(f"{directory} has no {CONFIG_FILE}: not a transformers checkpoint directory")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return raw


def hf_config_from_dict(raw: dict[str, Any]) -> Any:
    """The family's own transformers config class filled from ``raw`` (its defaults and legacy spellings handled by
    transformers); only built-in classes, so no code from the checkpoint runs."""
    try:
        from transformers import CONFIG_MAPPING
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError("importing transformers checkpoints needs transformers: "
                                  "pip install 'moe-lightning[hf]'") from error
    return CONFIG_MAPPING[raw["model_type"]].from_dict(raw)


def load_hf_model(directory: str | Path, dtype: torch.dtype | None = None) -> MoETransformer:
    """The transformers checkpoint in ``directory`` as our :class:`MoETransformer`, on the CPU in eval mode.

    Args:
        directory: a ``save_pretrained`` directory of a supported family (see ``FAMILIES``).
        dtype: the floating dtype of the weights; None keeps the checkpoint's.
    """
    checkpoint = HFCheckpoint(directory)
    model = checkpoint.build_model()
    state = {name: checkpoint.load(name) for name in checkpoint.names()}
    if dtype is not None:
        state = {name: tensor.to(dtype) for name, tensor in state.items()}
    model.load_state_dict(state, strict=not model.config.tie_embeddings, assign=True)
    if model.config.tie_embeddings:
        model.head.weight = model.embed.weight
    return model.eval()
