"""Read a :class:`MoETransformer` out of a Lightning ``.ckpt`` written by ``MoELightningModule`` training.

The ``.ckpt`` holds the weights but not the architecture (``MoELightningModule`` keeps ``model`` out of its
hyper-parameters), so the architecture comes from the ``config.yaml`` that LightningCLI saves in the run's log
directory (``<log_dir>/config.yaml`` beside ``<log_dir>/checkpoints/*.ckpt``). The ``.ckpt`` is read with
``torch.load(weights_only=True)`` and the YAML with ``yaml.safe_load``: no pickled code runs.

A config.yaml only describes the run when it is that run's; a router setting that changes no tensor shape
(``num_experts_per_token``, ``score_func``) cannot be checked against the weights. For serving, prefer a
:func:`export_safetensors` file, which carries its architecture with its weights.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import yaml

from moe_lightning.checkpoint.reading import load_torch_file
from moe_lightning.inference.export import build_model, load_weights
from moe_lightning.models import MoETransformer

MODEL_PREFIX = "model."


def load_lightning_checkpoint(path: str | Path, config: str | Path | None = None) -> MoETransformer:
    """The model of ``MoELightningModule`` checkpoint ``path``, on the CPU.

    Args:
        path: a ``.ckpt`` file.
        config: the LightningCLI ``config.yaml`` of the run; default: ``config.yaml`` in the checkpoint's directory
            or the one above it (LightningCLI's layout).
    """
    path = Path(path)
    config_path = Path(config) if config is not None else find_run_config(path)
    model_args = model_init_args(read_run_config(config_path), config_path)
    model = build_model(model_args.get("config"), model_args.get("router"))
    checkpoint = load_torch_file(path)
    state = {
        key.removeprefix(MODEL_PREFIX): value
        for key, value in checkpoint.get("state_dict", {}).items()
        if key.startswith(MODEL_PREFIX)
    }
    load_weights(model, state, f"{path} (architecture from {config_path})")
    return model


def read_run_config(path: Path) -> Any:
    """The parsed YAML of a run's ``config.yaml``; a file that is not YAML is named in the error."""
    try:
        return yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid YAML ({str(error).splitlines()[0]}): give the run's config.yaml, "
                         "as LightningCLI wrote it") from error


def find_run_config(checkpoint: Path) -> Path:
    candidates = [checkpoint.parent / "config.yaml", checkpoint.parent.parent / "config.yaml"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ValueError(
        f"{checkpoint} does not hold the model's architecture and no LightningCLI config.yaml was found at "
        f"{[str(c) for c in candidates]}: pass config=<the run's config.yaml>, or load a file written by "
        "export_safetensors"
    )


def model_init_args(run_config: Any, source: Path) -> dict[str, Any]:
    """``model.init_args.model.init_args`` of a LightningCLI config, checked to describe a :class:`MoETransformer`."""
    try:
        model = run_config["model"]["init_args"]["model"]
        class_path = model["class_path"]
    except (KeyError, TypeError) as error:
        raise ValueError(
            f"{source} has no model.init_args.model.class_path: it does not describe a MoELightningModule's model "
            "(a model built in configure_model() must be exported with export_safetensors)"
        ) from error
    module_name, _, class_name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name, None) if module_name else None
    if cls is not MoETransformer:
        raise ValueError(f"{source} describes model class_path={class_path!r}; only MoETransformer can be loaded")
    return model.get("init_args") or {}
