"""LoRA and QLoRA on an MoE model: peft adapters on the chosen ``nn.Linear`` layers, :class:`LoRAExperts` on the
routed experts, everything else frozen; and the merge back into plain weights."""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType

from torch import nn

from moe_lightning.experts.grouped import GroupedExperts
from moe_lightning.finetune.freezing import freeze, moe_layers
from moe_lightning.finetune.lora_experts import LoRAExperts, check_rank_alpha
from moe_lightning.inference.quantization.config import MODES
from moe_lightning.inference.quantization.quantize import quantize_model

DEFAULT_TARGET_MODULES = ("q_proj", "kv_proj", "o_proj")
"""The attention projections of :class:`MoETransformer`."""


def import_peft() -> ModuleType:
    """peft, or a ``ModuleNotFoundError`` saying how to install it."""
    try:
        import peft
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError("LoRA needs peft: pip install 'moe-lightning[finetune]'", name=error.name) from error
    return peft


def matching_linear_names(model: nn.Module, target_modules: Sequence[str]) -> list[str]:
    """Full names of the ``nn.Linear`` layers ``target_modules`` name (a target matches a layer named exactly so or
    ending in ``.target``, peft's rule); ValueError naming every target that matches no ``nn.Linear``."""
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    matched, unmatched = [], []
    for target in target_modules:
        hits = [name for name in linears if name == target or name.endswith("." + target)]
        if hits:
            matched.extend(hits)
        else:
            unmatched.append(target)
    if unmatched:
        suffixes = sorted({name.rpartition(".")[2] for name in linears})
        raise ValueError(f"LoRA target modules {unmatched} match no nn.Linear of the model; its nn.Linear layers are "
                         f"named {suffixes}")
    return sorted(set(matched))


def check_lora_arguments(
    rank: int, alpha: float, target_modules: Sequence[str], experts: bool, quantize: str | None
) -> None:
    """The checks of :func:`apply_lora`'s arguments that need no model."""
    check_rank_alpha(rank, alpha)
    if quantize is not None and quantize not in MODES:
        raise ValueError(f"quantize must be one of {MODES} or None, got quantize={quantize!r}")
    if not target_modules and not experts:
        raise ValueError("nothing to adapt: pass target_modules, or experts=True")


def apply_lora(
    model: nn.Module, rank: int = 8, alpha: float = 16.0, target_modules: Sequence[str] = DEFAULT_TARGET_MODULES,
    experts: bool = True, quantize: str | None = None,
) -> nn.Module:
    """Freeze ``model`` and add trainable float32 LoRA adapters, in place; returns ``model``.

    Args:
        model: any module, e.g. a :class:`MoETransformer`.
        rank: adapter rank R.
        alpha: adapter scale numerator: each adapter adds ``alpha / rank * x A B``.
        target_modules: ``nn.Linear`` layers to adapt with peft, by name or name suffix (see
            :func:`matching_linear_names`); empty for none.
        experts: wrap every MoE layer's routed experts in :class:`LoRAExperts`.
        quantize: QLoRA: first store the routed experts in this bitsandbytes format (``"nf4"``, ``"fp4"`` or
            ``"int8"``, see :func:`quantize_model`) as the frozen base. The ``nn.Linear`` layers stay float (peft
            adapts bitsandbytes' own 4-bit layers, not ours).
    """
    check_lora_arguments(rank, alpha, target_modules, experts, quantize)
    linear_names = matching_linear_names(model, target_modules)
    layers = moe_layers(model)
    if (experts or quantize) and not layers:
        raise ValueError(f"experts=True / quantize={quantize!r} need MoE layers; {type(model).__name__} has none")
    for index, layer in enumerate(layers):
        if not isinstance(layer.experts, GroupedExperts):
            raise TypeError(f"MoE layer {index} holds {type(layer.experts).__name__}, not GroupedExperts")

    freeze(model)
    if quantize is not None:
        quantize_model(model, quantize)
    if linear_names:
        peft = import_peft()
        # Exact full names, so that peft adapts precisely the layers checked above.
        config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=linear_names, lora_dropout=0.0)
        peft.inject_adapter_in_model(config, model)
    if experts:
        for layer in layers:
            layer.experts = LoRAExperts(layer.experts, rank, alpha)
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight, in place, and return ``model`` with plain modules again: peft's
    layers become their ``nn.Linear``, :class:`LoRAExperts` become :class:`GroupedExperts` (a quantised base is
    dequantised to float32 first). ValueError if ``model`` holds no adapter."""
    lora_experts = [layer for layer in moe_layers(model) if isinstance(layer.experts, LoRAExperts)]
    peft_layers = peft_lora_layers(model)
    if not lora_experts and not peft_layers:
        raise ValueError(f"{type(model).__name__} holds no LoRA adapter to merge")
    for layer in lora_experts:
        layer.experts = layer.experts.merged_experts()
    for name, module in peft_layers:
        module.merge()
        model.set_submodule(name, module.get_base_layer())
    return model


def has_lora_adapters(model: nn.Module) -> bool:
    """Whether ``model`` holds a :class:`LoRAExperts` or a peft LoRA layer."""
    return any(isinstance(module, LoRAExperts) for module in model.modules()) or bool(peft_lora_layers(model))


def peft_lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """peft's LoRA layers in ``model`` by name (none where peft is not installed: nothing could have added them)."""
    try:
        from peft.tuners.lora import LoraLayer
    except ModuleNotFoundError:
        return []
    return [(name, module) for name, module in model.named_modules() if isinstance(module, LoraLayer)]
