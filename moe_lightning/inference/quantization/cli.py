"""``moe-lightning quantize``: a trained model's experts in int8 / NF4 / FP4 (or each in the format a serving plan
gives it), saved as one safetensors file, with the memory saved and the validation perplexity before and after."""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from moe_lightning.data.windows import IGNORE_INDEX, ContiguousWindows
from moe_lightning.experts.grouped import GroupedExperts
from moe_lightning.inference.engine import load_model
from moe_lightning.inference.plan import ServingPlan, apply_plan
from moe_lightning.inference.quantization.config import COMPUTE_DTYPES, MODES, QuantizationConfig
from moe_lightning.inference.quantization.export import save_quantized
from moe_lightning.inference.quantization.quantize import expert_weight_bytes, quantize_model, weight_bytes
from moe_lightning.models import MoETransformer

BYTE_VOCAB = 256


def quantize_main(args: list[str]) -> None:
    """``moe-lightning quantize CHECKPOINT (--mode nf4 | --plan PLAN) --output OUT.safetensors [--dense] [options]``:
    quantise a trained model's experts (and with ``--dense`` its dense linear layers) with bitsandbytes, or each expert
    to the format of a serving plan (``moe-lightning plan``), save it as one self-describing safetensors file, and
    print the memory and validation perplexity before and after."""
    parser = argparse.ArgumentParser(prog="moe-lightning quantize", description=quantize_main.__doc__)
    parser.add_argument("checkpoint", help="a .safetensors export or a Lightning .ckpt")
    how = parser.add_mutually_exclusive_group(required=True)
    how.add_argument("--mode", choices=MODES, help="int8 (LLM.int8), nf4 or fp4")
    how.add_argument("--plan", help="a serving plan: each expert in its own format (the plan's formats carry their "
                                    "block size and double quantisation; --dense and the format options do not apply)")
    parser.add_argument("--output", required=True, help="the .safetensors file to write")
    parser.add_argument("--dense", action="store_true",
                        help="also quantise dense linear layers (attention, dense FFNs, shared experts); never "
                             "routers, norms, embeddings or the LM head")
    parser.add_argument("--blocksize", type=int, default=None, help="4-bit: weights per absmax scale (default 64)")
    parser.add_argument("--double-quant", action="store_true", help="4-bit: quantise the absmax scales too")
    parser.add_argument("--compute-dtype", choices=sorted(COMPUTE_DTYPES), default=None,
                        help="4-bit: the matmul dtype (default: the input's)")
    parser.add_argument("--threshold", type=float, default=None, help="int8: outlier threshold (default 6.0; 0: off)")
    parser.add_argument("--config", default=None, help="the run's config.yaml, for a .ckpt (default: found beside it)")
    parser.add_argument("--eval-text", default=None,
                        help="a text file whose bytes to measure perplexity on (default: the validation split of "
                             "ByteTextDataModule's standard-library corpus); byte-level models (vocab 256) only")
    parser.add_argument("--eval-batches", type=int, default=8, help="batches of perplexity evaluation; 0 skips it")
    parser.add_argument("--eval-batch-size", type=int, default=8)
    parser.add_argument("--eval-seq-len", type=int, default=None, help="default: min(256, the model's max_seq_len)")
    parser.add_argument("--device", default=None, help="where to quantise and evaluate (default: cuda if available)")
    options = parser.parse_args(args)
    device = torch.device(options.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        plan, config = _plan_or_config(options)
        output = Path(options.output)
        if output.suffix != ".safetensors":
            raise ValueError(f"--output {output} must end in .safetensors")
        model = load_model(Path(options.checkpoint), options.config).to(device).eval()
        if plan is not None:
            plan.check_model(model)
        batches = eval_batches(model, options) if options.eval_batches > 0 else None
        rows = {"expert weights": [expert_weight_bytes(model)], "all weights": [weight_bytes(model)]}
        bf16_expert_bytes = 2 * sum(
            p.numel() for m in model.modules() if isinstance(m, GroupedExperts) for p in m.parameters()
        )
        perplexities = [perplexity(model, batches)] if batches else []
        if plan is not None:
            apply_plan(model, plan)
        else:
            quantize_model(model, config, dense=options.dense)
        rows["expert weights"].append(expert_weight_bytes(model))
        rows["all weights"].append(weight_bytes(model))
        if batches:
            perplexities.append(perplexity(model, batches))
        save_quantized(model, output)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    print(format_report(rows, bf16_expert_bytes, perplexities))
    if plan is not None:
        described = f"plan={options.plan}"
    else:
        options_set = ", ".join(f"{k}={v}" for k, v in config.as_dict().items() if v is not None)
        described = f"{options_set}, dense={options.dense}"
    print(f"wrote {output} ({described})")


def _plan_or_config(options: argparse.Namespace) -> tuple[ServingPlan | None, QuantizationConfig | None]:
    """``--plan`` as a loaded plan, or the ``--mode`` options as a config."""
    if options.plan is not None:
        format_options = {"--dense": options.dense, "--blocksize": options.blocksize is not None,
                          "--double-quant": options.double_quant, "--compute-dtype": options.compute_dtype is not None,
                          "--threshold": options.threshold is not None}
        given = [flag for flag, value in format_options.items() if value]
        if given:
            raise ValueError(f"{given} do not apply with --plan: the plan names each expert's format")
        return ServingPlan.load(options.plan), None
    return None, QuantizationConfig(
        options.mode, blocksize=options.blocksize, double_quant=options.double_quant,
        compute_dtype=options.compute_dtype, threshold=options.threshold,
    )


def eval_batches(model: MoETransformer, options: argparse.Namespace) -> list[dict[str, torch.Tensor]]:
    """The first ``--eval-batches`` batches of byte windows, the same before and after quantisation."""
    vocab = model.config.vocab_size
    if vocab != BYTE_VOCAB:
        if options.eval_text is not None:
            raise ValueError(
                f"--eval-text is read as bytes and needs a byte-level model (vocab_size=256), got vocab_size={vocab}"
            )
        return []
    seq_len = options.eval_seq_len or min(256, model.config.max_seq_len)
    if not 1 <= seq_len <= model.config.max_seq_len:
        raise ValueError(f"--eval-seq-len must be in [1, max_seq_len={model.config.max_seq_len}], got {seq_len}")
    if options.eval_batch_size < 1:
        raise ValueError(f"--eval-batch-size must be >= 1, got {options.eval_batch_size}")
    if options.eval_text is None:
        from moe_lightning.data.text import ByteTextDataModule  # Lightning only when the default corpus is read

        data = ByteTextDataModule(seq_len=seq_len, batch_size=options.eval_batch_size)
        data.setup("validate")
        loader = data.val_dataloader()
    else:
        text = Path(options.eval_text)
        if not text.is_file():
            raise FileNotFoundError(f"--eval-text {text} does not exist")
        windows = ContiguousWindows(np.frombuffer(text.read_bytes(), dtype=np.uint8), seq_len)
        if len(windows) == 0:
            raise ValueError(
                f"--eval-text {text} holds {text.stat().st_size} bytes, fewer than one window of {seq_len + 1}"
            )
        loader = DataLoader(windows, batch_size=options.eval_batch_size, shuffle=False)
    batches = []
    for batch in loader:
        if len(batches) == options.eval_batches:
            break
        batches.append({key: batch[key] for key in ("input_ids", "labels")})
    return batches


@torch.no_grad()
def perplexity(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> float:
    """``exp`` of the mean next-token cross-entropy over every labelled position of ``batches``."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch in batches:
        logits = model(batch["input_ids"].to(device)).logits
        labels = batch["labels"].to(device)
        total += F.cross_entropy(
            logits.flatten(0, -2).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        ).item()
        count += int((labels != IGNORE_INDEX).sum())
    return math.exp(total / count)


def format_report(rows: dict[str, list[int]], bf16_expert_bytes: int, perplexities: list[float]) -> str:
    """A small table: bytes before / after and their ratio per row, then perplexity before / after."""
    lines = [f"{'':<16}{'before':>12}{'after':>12}{'ratio':>9}"]
    for name, (before, after) in rows.items():
        lines.append(f"{name:<16}{_mib(before):>12}{_mib(after):>12}{after / before:>9.3f}")
    lines.append(f"{'expert vs bf16':<16}{_mib(bf16_expert_bytes):>12}{_mib(rows['expert weights'][1]):>12}"
                 f"{rows['expert weights'][1] / bf16_expert_bytes:>9.3f}")
    if perplexities:
        before, after = perplexities
        lines.append(f"{'val perplexity':<16}{before:>12.4f}{after:>12.4f}{after / before:>9.3f}")
    else:
        lines.append("val perplexity: not measured (--eval-batches 0, or the model is not byte-level)")
    return "\n".join(lines)


def _mib(num_bytes: int) -> str:
    return f"{num_bytes / 2**20:.3f} MiB"
