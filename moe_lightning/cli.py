"""``moe-lightning``: LightningCLI for MoE models, with TensorBoard, checkpoints and a routing summary by default."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint, ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_only
from rich.console import Console
from rich.table import Table
from typing_extensions import override

from moe_lightning.analytics import LayerSummary, summarize_routings
from moe_lightning.callbacks.crash_safe_checkpoint import CrashSafeCheckpoint
from moe_lightning.checkpoint.cli_options import add_trusted_key_argument, exit_on_artifact_error
from moe_lightning.checkpoint.errors import ArtifactError
from moe_lightning.module import MoELightningModule, unpack_output
from moe_lightning.strategies.process_groups import release_process_groups

if TYPE_CHECKING:
    from moe_lightning.inference.plan import ServingPlan

DEBUG_ENV = "MOE_LIGHTNING_DEBUG"
DEBUG_HELP = (
    f"A configuration mistake prints one line naming the values (no traceback); set {DEBUG_ENV}=1 for the full "
    "traceback. A run that fails before writing anything but its saved config leaves no log directory behind."
)

TRAINER_DEFAULTS = {
    "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": "runs", "name": "moe"}},
}


def default_callbacks(trainer_config: dict[str, Any], callbacks: list[Callback]) -> list[Callback]:
    """A crash-safe checkpoint (``last.ckpt`` links the newest; see :class:`CrashSafeCheckpoint`), a rich progress bar
    and the learning rate, each only where the trainer allows it."""
    chosen = callbacks + list(trainer_config.get("callbacks") or [])
    defaults: list[Callback] = []
    if trainer_config.get("enable_checkpointing") is not False and not _has(chosen, ModelCheckpoint):
        defaults.append(CrashSafeCheckpoint())
    if trainer_config.get("enable_progress_bar") is not False and not _has(chosen, ProgressBar):
        defaults.append(RichProgressBar())
    if trainer_config.get("logger") not in (False, None) and not _has(chosen, LearningRateMonitor):
        defaults.append(LearningRateMonitor(logging_interval="step"))
    return defaults


def _has(callbacks: list[Callback], kind: type) -> bool:
    return any(isinstance(c, kind) for c in callbacks)


class MoELightningCLI(LightningCLI):
    """``fit | validate | test | predict`` over any LightningModule and LightningDataModule chosen by ``class_path``.

    After ``fit`` it routes one validation batch and prints, on rank zero, where the TensorBoard logs and the
    checkpoint went and a per-layer routing summary (also saved as ``routing_summary.json`` in the log dir).
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("model_class", MoELightningModule)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("datamodule_class", LightningDataModule)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("trainer_defaults", TRAINER_DEFAULTS)
        kwargs.setdefault(
            "parser_kwargs", {"epilog": DEBUG_HELP, **{name: {"epilog": DEBUG_HELP} for name in self.subcommands()}}
        )
        super().__init__(*args, **kwargs)

    @override
    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        return super()._instantiate_trainer(config, callbacks + default_callbacks(config, callbacks))

    @override
    def _run_subcommand(self, subcommand: str) -> None:
        log_dir = None if self.trainer.log_dir is None else Path(self.trainer.log_dir).absolute()
        created_here = log_dir is not None and not log_dir.exists()
        existing_parent = next(parent for parent in log_dir.parents if parent.exists()) if created_here else None
        try:
            super()._run_subcommand(subcommand)
        except Exception:
            if created_here and self.trainer.is_global_zero:
                config_filename = self.save_config_kwargs.get("config_filename", "config.yaml")
                remove_unstarted_log_dir(log_dir, config_filename, existing_parent)
            raise

    def after_fit(self) -> None:
        datamodule = self.trainer.datamodule
        summaries = routing_summary_on_validation_batch(self.model, datamodule) if datamodule is not None else []
        log_dir = self.trainer.log_dir
        if self.trainer.is_global_zero and log_dir is not None and summaries:
            path = Path(log_dir) / "routing_summary.json"
            path.write_text(json.dumps([s.as_dict() for s in summaries], indent=2))
        checkpoint = self.trainer.checkpoint_callback
        print_fit_report(
            log_dir,
            checkpoint.best_model_path or checkpoint.last_model_path if checkpoint is not None else None,
            summaries,
        )


def remove_unstarted_log_dir(log_dir: Path, config_filename: str, existing_parent: Path) -> None:
    """Remove the log directory of a failed run if it holds only what every run writes before it starts: the saved
    config and TensorBoard event files without a single event, then its parents up to ``existing_parent`` while they
    are empty. Anything else in it keeps it (and all its files)."""
    if not log_dir.is_dir():
        return
    event_files = list(log_dir.glob("events.out.tfevents.*"))
    startup_files = {log_dir / config_filename, *event_files}
    if set(log_dir.iterdir()) - startup_files or not all(map(holds_no_events, event_files)):
        return
    for path in startup_files:
        path.unlink(missing_ok=True)
    log_dir.rmdir()
    for parent in log_dir.parents:
        if parent == existing_parent or any(parent.iterdir()):
            return
        parent.rmdir()


def holds_no_events(event_file: Path) -> bool:
    """Whether a TensorBoard event file holds nothing but its file-version header."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    return all(event.WhichOneof("what") == "file_version" for event in EventFileLoader(str(event_file)).Load())


def user_error(error: BaseException) -> BaseException:
    """The error a class's own check raised, out of the "Does not validate against any of the Union subtypes" errors
    jsonargparse wraps it in, one per Union type hint on the way; ``error`` itself if no such error is inside."""
    cause = error
    while cause.__cause__ is not None and raised_in_jsonargparse(cause):
        cause = cause.__cause__
    return error if raised_in_jsonargparse(cause) else cause


def raised_in_jsonargparse(error: BaseException) -> bool:
    frame = error.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    return frame is not None and frame.tb_frame.f_globals.get("__name__", "").startswith("jsonargparse")


@torch.no_grad()
def routing_summary_on_validation_batch(module: MoELightningModule, datamodule: LightningDataModule) -> list[LayerSummary]:
    batch = next(iter(datamodule.val_dataloader()))
    batch = {key: value.to(module.device) for key, value in batch.items()}
    was_training = module.training
    module.eval()
    _, routings = unpack_output(module(batch))
    module.train(was_training)
    return summarize_routings(routings)


@rank_zero_only
def print_fit_report(log_dir: str | None, checkpoint_path: str | None, summaries: list[LayerSummary]) -> None:
    console = Console()
    console.print(f"[bold]TensorBoard logs:[/bold] {log_dir}   (tensorboard --logdir {Path(log_dir).parent if log_dir else '.'})")
    console.print(f"[bold]Checkpoint:[/bold] {checkpoint_path or 'none saved'}")
    if not summaries:
        return
    console.print(f"[bold]Routing summary[/bold] (one validation batch; also in {Path(log_dir) / 'routing_summary.json'})")
    table = Table("layer", "experts", "imbalance max/mean", "min share", "max share", "idle", "dropped", "load entropy")
    for s in summaries:
        table.add_row(
            str(s.layer), str(s.num_experts), f"{s.imbalance:.2f}", f"{s.min_share:.3f}", f"{s.max_share:.3f}",
            str(s.idle_experts), f"{s.dropped_fraction:.3f}", f"{s.load_entropy:.3f}",
        )
    console.print(table)


def report_main(args: list[str]) -> None:
    """``moe-lightning report RUN_DIR [--out DIR]``: the static router report of a finished or running run."""
    parser = argparse.ArgumentParser(prog="moe-lightning report", description=report_main.__doc__)
    parser.add_argument("run_dir", help="a directory holding router_stats.jsonl (and routing_traces/), searched recursively")
    parser.add_argument("--out", default=None, help="where to write the report (default: RUN_DIR/report)")
    options = parser.parse_args(args)
    from moe_lightning.analytics.report import build_report  # matplotlib only for this subcommand

    print(f"report: {build_report(options.run_dir, options.out)}")


def dashboard_main(args: list[str]) -> None:
    """``moe-lightning dashboard RUN_DIR [--host H] [--port P]``: a live web view of a run's router statistics."""
    parser = argparse.ArgumentParser(prog="moe-lightning dashboard", description=dashboard_main.__doc__)
    parser.add_argument("run_dir", help="where router_stats.jsonl is or will be written (searched recursively)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    parser.add_argument("--port", type=int, default=8008, help="port to serve on (default: 8008)")
    options = parser.parse_args(args)
    if not 0 < options.port < 65536:
        parser.error(f"--port must be in 1..65535, got --port {options.port}")
    try:  # FastAPI and uvicorn only for this subcommand
        import uvicorn

        from moe_lightning.dashboard.app import create_app
    except ModuleNotFoundError as error:
        parser.error(f"{error.name} is missing: pip install 'moe-lightning[dashboard]'")
    try:
        app = create_app(options.run_dir)
    except ValueError as error:
        parser.error(str(error))
    print(f"dashboard: http://{options.host}:{options.port}/ over {options.run_dir}", flush=True)
    uvicorn.run(app, host=options.host, port=options.port, log_level="warning")


def export_main(args: list[str]) -> None:
    """``moe-lightning export CHECKPOINT OUT [--config config.yaml]``: a trained ``.ckpt`` as one self-describing
    safetensors file (weights, model config and router spec; loads without unpickling)."""
    parser = argparse.ArgumentParser(prog="moe-lightning export", description=export_main.__doc__)
    parser.add_argument("checkpoint", help="a Lightning .ckpt of MoELightningModule training")
    parser.add_argument("out", help="the .safetensors file to write")
    parser.add_argument("--config", default=None, help="the run's config.yaml (default: found beside the checkpoint)")
    options = parser.parse_args(args)
    from moe_lightning.inference import export_safetensors, load_lightning_checkpoint

    try:
        export_safetensors(load_lightning_checkpoint(options.checkpoint, options.config), options.out)
    except ArtifactError as error:
        exit_on_artifact_error(parser, error)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    print(f"exported: {options.out}")


def generate_main(args: list[str]) -> None:
    """``moe-lightning generate CHECKPOINT (--prompt TEXT | --prompt-ids 1,2,3) [sampling options]``."""
    parser = argparse.ArgumentParser(prog="moe-lightning generate", description=generate_main.__doc__)
    parser.add_argument("checkpoint", help="a .safetensors export or a Lightning .ckpt")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="text, fed as its UTF-8 bytes (for byte-level models such as configs/tiny.yaml)")
    prompt.add_argument("--prompt-ids", help="comma-separated token ids")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    add_trusted_key_argument(parser)
    options = parser.parse_args(args)
    from moe_lightning.inference import InferenceEngine

    try:
        ids = list(options.prompt.encode()) if options.prompt is not None else [int(t) for t in options.prompt_ids.split(",")]
        engine = InferenceEngine.from_checkpoint(options.checkpoint, trusted_key=options.trusted_key)
        (new_ids,) = engine.generate(
            [ids], options.max_new_tokens, temperature=options.temperature, top_k=options.top_k, top_p=options.top_p,
            seed=options.seed,
        )
    except ArtifactError as error:
        exit_on_artifact_error(parser, error)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    print(options.prompt + bytes(new_ids).decode(errors="replace") if options.prompt is not None else new_ids)


HF_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def import_hf_main(args: list[str]) -> None:
    """``moe-lightning import-hf DIR OUT [--dtype D]``: a transformers checkpoint directory (Mixtral, Qwen3-MoE,
    Qwen2-MoE, OLMoE, Llama, Qwen2, Mistral) as one self-describing safetensors file for ``generate`` and ``serve``."""
    parser = argparse.ArgumentParser(prog="moe-lightning import-hf", description=import_hf_main.__doc__)
    parser.add_argument("directory", help="a save_pretrained directory: config.json and *.safetensors shards")
    parser.add_argument("out", help="the .safetensors file to write")
    parser.add_argument("--dtype", choices=sorted(HF_DTYPES), default=None, help="default: the checkpoint's")
    options = parser.parse_args(args)
    if Path(options.out).suffix != ".safetensors":
        parser.error(f"OUT must be a .safetensors file, got {options.out}")
    from moe_lightning.inference import export_safetensors

    try:
        from moe_lightning.models.hf import load_hf_model

        model = load_hf_model(options.directory, HF_DTYPES.get(options.dtype))
    except ModuleNotFoundError as error:
        parser.error(f"{error.name} is missing: pip install 'moe-lightning[hf]'")
    except ValueError as error:
        parser.error(str(error))
    export_safetensors(model, options.out)
    print(f"imported: {options.directory} ({model.config.hf_model_type}) -> {options.out}")


def export_hf_main(args: list[str]) -> None:
    """``moe-lightning export-hf CHECKPOINT OUT_DIR [--family F]``: a model as a transformers checkpoint directory
    (config.json + safetensors shards) that ``AutoModelForCausalLM.from_pretrained`` loads."""
    parser = argparse.ArgumentParser(prog="moe-lightning export-hf", description=export_hf_main.__doc__)
    parser.add_argument("checkpoint", help="a .safetensors export (e.g. from import-hf) or a Lightning .ckpt")
    parser.add_argument("out_dir", help="the directory to write (must not exist or be empty)")
    parser.add_argument("--family", default=None,
                        help="the transformers model_type to write (default: the one the model was imported from)")
    parser.add_argument("--config", default=None, help="a .ckpt run's config.yaml (default: found beside it)")
    parser.add_argument("--max-shard-bytes", type=int, default=None, help="start a new shard past this size (5 GiB)")
    options = parser.parse_args(args)
    from moe_lightning.checkpoint.integrity import write_manifest
    from moe_lightning.inference.engine import load_model
    from moe_lightning.inference.quantization.export import is_quantized_file

    checkpoint = Path(options.checkpoint)
    try:
        if checkpoint.suffix == ".safetensors" and checkpoint.is_file() and is_quantized_file(checkpoint):
            parser.error(f"{checkpoint} is quantized: export-hf writes float weights; export the unquantized model")
        from moe_lightning.models.hf import export_hf
        from moe_lightning.models.hf.export import DEFAULT_MAX_SHARD_BYTES

        model = load_model(checkpoint, options.config)
        max_shard_bytes = DEFAULT_MAX_SHARD_BYTES if options.max_shard_bytes is None else options.max_shard_bytes
        export_hf(model, options.out_dir, options.family, max_shard_bytes)
        write_manifest(options.out_dir)
    except ModuleNotFoundError as error:
        parser.error(f"{error.name} is missing: pip install 'moe-lightning[hf]'")
    except ArtifactError as error:
        exit_on_artifact_error(parser, error)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    print(f"exported: {options.out_dir}")


def quantize_main(args: list[str]) -> None:
    """``moe-lightning quantize CHECKPOINT --mode nf4 --output OUT.safetensors`` (see ``--help``)."""
    from moe_lightning.inference.quantization.cli import quantize_main as run

    run(args)


def plan_main(args: list[str]) -> None:
    """``moe-lightning plan CHECKPOINT --stats router_stats.jsonl --budget 2GiB --output plan.json``: per MoE layer and
    expert, the format to serve it in (bf16, int8, NF4 variants) and the experts to pin, from the training run's
    routing statistics, within a memory budget for the experts; ``quantize --plan`` and ``serve --plan`` take the
    file. The rule: the hottest experts get the most bits (see moe_lightning.inference.plan_allocation)."""
    from moe_lightning.inference.plan import count_or_fraction
    from moe_lightning.inference.plan_allocation import DEFAULT_FORMATS

    parser = argparse.ArgumentParser(prog="moe-lightning plan", description=plan_main.__doc__)
    parser.add_argument("checkpoint", help="the trained float model: a .safetensors export or a Lightning .ckpt")
    parser.add_argument("--stats", required=True, help="its training run's router_stats.jsonl (RouterStatsMonitor)")
    parser.add_argument("--budget", required=True,
                        help="device memory for all experts: bytes, a size such as 512MiB or 2GB, or a format name "
                             "(nf4: what every expert in uniform nf4 takes)")
    parser.add_argument("--output", required=True, help="the plan file to write (JSON)")
    parser.add_argument("--formats", default=",".join(DEFAULT_FORMATS),
                        help=f"comma-separated candidate formats, MODE[-bBLOCKSIZE][-dq] or bf16 "
                             f"(default: {','.join(DEFAULT_FORMATS)})")
    parser.add_argument("--pin", type=count_or_fraction, default=0,
                        help="experts per layer to pin (in bf16; in the expert cache when serving offloaded), hottest "
                             "first: a count, or a fraction of the experts below 1 (default: 0)")
    parser.add_argument("--last-n", type=int, default=None, help="use the last N records of --stats (default: all)")
    parser.add_argument("--config", default=None, help="the run's config.yaml, for a .ckpt (default: found beside it)")
    options = parser.parse_args(args)
    from moe_lightning.inference.engine import load_model
    from moe_lightning.inference.plan_allocation import propose_plan

    try:
        model = load_model(options.checkpoint, options.config)
        plan = propose_plan(model, options.stats, options.budget, options.formats.split(","), options.pin,
                            options.last_n)
        plan.save(options.output)
    except ArtifactError as error:
        exit_on_artifact_error(parser, error)
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as error:  # bitsandbytes measures the errors
        parser.error(str(error))
    print_plan(plan)
    print(f"wrote {options.output}")


def print_plan(plan: ServingPlan) -> None:
    """Per MoE layer: how many experts each format got, the pinned experts, the bytes; then the total."""
    names = list(dict.fromkeys(f for formats in plan.expert_formats for f in formats))
    table = Table("layer", *names, "pinned", "MiB", title="serving plan")
    for layer in plan.layers:
        formats = layer.expert_formats
        table.add_row(f"{layer.layer} ({layer.name})", *(str(formats.count(name)) for name in names),
                      str(layer.pinned or "-"), f"{layer.bytes / 2**20:.3f}")
    Console().print(table)
    print(f"experts: {plan.total_bytes} bytes ({plan.total_bytes / 2**20:.3f} MiB) of the budget "
          f"{plan.budget_bytes} bytes ({plan.budget_bytes / 2**20:.3f} MiB)")


def serve_main(args: list[str]) -> None:
    """``moe-lightning serve --checkpoint CHECKPOINT`` (see ``--help``)."""
    from moe_lightning.serving.cli import serve_main as run

    run(args)


def keygen_main(args: list[str]) -> None:
    """``moe-lightning keygen OUT``: a new Ed25519 key pair, the private key in OUT (mode 0600), the public one in
    OUT.pub."""
    parser = argparse.ArgumentParser(prog="moe-lightning keygen", description=keygen_main.__doc__)
    parser.add_argument("out", help="the private key file to write (it must not exist)")
    options = parser.parse_args(args)
    signing = _signing_module(parser)
    try:
        private_path, public_path = signing.generate_key_pair(options.out)
    except ValueError as error:
        parser.error(str(error))
    print(f"private key: {private_path} (keep it secret)\npublic key: {public_path} "
          f"(key id {signing.key_id(signing.load_public_key(public_path))})")


def sign_main(args: list[str]) -> None:
    """``moe-lightning sign ARTIFACT --key PRIVATE_KEY``: sign the hash manifest of a .safetensors file or a
    directory of shards (written first when the artifact has none; an artifact that no longer matches its
    manifest is refused)."""
    parser = argparse.ArgumentParser(prog="moe-lightning sign", description=sign_main.__doc__)
    parser.add_argument("artifact", help="a .safetensors file, or a directory (transformers export, sharded checkpoint)")
    parser.add_argument("--key", required=True, help="the Ed25519 private key file (moe-lightning keygen)")
    options = parser.parse_args(args)
    signing = _signing_module(parser)
    try:
        key = signing.load_private_key(options.key)
        signature = signing.sign_artifact(options.artifact, key)
    except ArtifactError as error:
        exit_on_artifact_error(parser, error)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    print(f"signed: {options.artifact} -> {signature} (key id {signing.key_id(key.public_key())})")


def verify_main(args: list[str]) -> None:
    """``moe-lightning verify ARTIFACT [--public-key PUB]``: check every file against the artifact's hash manifest
    and, with --public-key, that the key signed the manifest. Exits non-zero naming the file that failed."""
    parser = argparse.ArgumentParser(prog="moe-lightning verify", description=verify_main.__doc__)
    parser.add_argument("artifact", help="a .safetensors file or a directory")
    parser.add_argument("--public-key", default=None, help="the signer's Ed25519 public key file (keygen's OUT.pub)")
    options = parser.parse_args(args)
    from moe_lightning.checkpoint.integrity import read_manifest, verify_manifest

    try:
        if options.public_key is None:
            verify_manifest(options.artifact, required=True)
            signed_by = "unsigned check: give --public-key to check the signature"
        else:
            signed_by = f"signed by key {_signing_module(parser).verify_signed(options.artifact, options.public_key)}"
        count = len(read_manifest(options.artifact)["files"])
    except ArtifactError as error:
        exit_on_artifact_error(parser, error)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    print(f"verified: {options.artifact} ({count} file(s) match the manifest; {signed_by})")


def _signing_module(parser: argparse.ArgumentParser) -> Any:
    try:  # cryptography only for these subcommands
        from moe_lightning.checkpoint import signing
    except ModuleNotFoundError as error:
        parser.error(f"{error.name} is missing: pip install 'moe-lightning[sign]'")
    return signing


def plugins_main(args: list[str]) -> None:
    """``moe-lightning plugins``: the installed backend plugins, what each registers, and what is not installed."""
    from moe_lightning.plugins import plugins_main as run

    run(args)


SUBCOMMANDS = {
    "plugins": plugins_main, "report": report_main, "dashboard": dashboard_main, "export": export_main, "generate": generate_main,
    "quantize": quantize_main, "plan": plan_main, "serve": serve_main, "import-hf": import_hf_main,
    "export-hf": export_hf_main,
    "keygen": keygen_main, "sign": sign_main, "verify": verify_main,
}


def main(args: list[str] | None = None) -> None:
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] and argv[0] in SUBCOMMANDS:
        return SUBCOMMANDS[argv[0]](argv[1:])
    try:
        MoELightningCLI(args=args)
    except (ValueError, TypeError) as error:
        if os.environ.get(DEBUG_ENV, "0") not in ("", "0"):
            raise
        sys.exit(f"moe-lightning: error: {user_error(error)}\n({DEBUG_ENV}=1 shows the traceback)")
    finally:
        release_process_groups()
