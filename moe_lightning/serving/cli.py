"""``moe-lightning serve``: load a checkpoint and serve it with uvicorn (over TLS with ``--ssl-certfile``), and
``moe-lightning serve add-key``: add a key to a key file."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

import torch

from moe_lightning.checkpoint.cli_options import add_trusted_key_argument, exit_on_artifact_error
from moe_lightning.checkpoint.errors import ArtifactError
from moe_lightning.inference.plan import ServingPlan, apply_plan, count_or_fraction
from moe_lightning.serving.keys import (
    API_KEYS_ENV, MIN_SUPPLIED_KEY_LENGTH, ApiKeyRecord, RateLimit, add_key, load_api_keys, new_key,
)
from moe_lightning.serving.roles import Role
from moe_lightning.serving.settings import ServerSettings

_DEFAULTS = {field.name: field.default for field in fields(ServerSettings)}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_LIMITS = ("max_prompt_tokens", "max_new_tokens", "max_prompts_per_request", "max_batch_size", "max_queue_size",
           "batch_window_ms", "request_timeout_s", "max_body_bytes")
_LIMIT_HELP = {
    "max_prompt_tokens": "the most tokens in one prompt (413 beyond)",
    "max_new_tokens": "the most new tokens a request may ask per prompt (422 beyond)",
    "max_prompts_per_request": "the most prompts in one request (413 beyond)",
    "max_batch_size": "the most prompts decoded together",
    "max_queue_size": "the most requests waiting for the model (429 beyond)",
    "batch_window_ms": "how long an idle model waits for more requests to batch",
    "request_timeout_s": "seconds from a request's arrival to its last token (503 beyond)",
    "max_body_bytes": "the largest request body (413 beyond)",
}


def serve_main(argv: list[str]) -> None:
    """``moe-lightning serve --checkpoint PATH [--host H] [--port P] [--grpc-port G] [limits]``: the
    REST/WebSocket/OpenAI-compatible server of a trained model, and with --grpc-port its gRPC API. API keys come
    from --api-key-file (see ``moe-lightning serve add-key``) and ``$MOE_LIGHTNING_API_KEYS`` (comma-separated plain
    keys with the admin role)."""
    if argv[:1] == ["add-key"]:
        add_key_main(argv[1:])
        return
    parser = _parser()
    options = parser.parse_args(argv)
    if not 0 < options.port < 65536:
        parser.error(f"--port must be in 1..65535, got --port {options.port}")
    if options.grpc_port is not None and not 0 < options.grpc_port < 65536:
        parser.error(f"--grpc-port must be in 1..65535, got --grpc-port {options.grpc_port}")
    if options.grpc_port == options.port:
        parser.error(f"--grpc-port {options.grpc_port} is --port too: gRPC needs a port of its own")
    if options.ssl_keyfile is not None and options.ssl_certfile is None:
        parser.error("--ssl-keyfile needs --ssl-certfile (the certificate the key belongs to)")
    for flag, path in (("--ssl-certfile", options.ssl_certfile), ("--ssl-keyfile", options.ssl_keyfile)):
        if path is not None and not Path(path).is_file():
            parser.error(f"{flag} {path} does not exist or is not a file")
    try:
        settings = ServerSettings(
            api_keys=load_api_keys(options.api_key_file), insecure_no_auth=options.insecure_no_auth,
            model_name=options.model_name, audit_log=options.audit_log, audit_prompts=options.audit_prompts,
            **{name: getattr(options, name) for name in _LIMITS},
        )
    except ValueError as error:
        parser.error(str(error))
    import uvicorn  # the serve extra, only once the arguments are known to be good

    from moe_lightning.inference import InferenceEngine
    from moe_lightning.serving.app import create_app

    if options.cuda_graphs and options.offload_capacity is not None:
        parser.error("--cuda-graphs and --offload-capacity exclude each other: the expert cache decides on the host "
                     "which experts to load, which a captured CUDA graph cannot do")
    if options.pin_hot_from is not None and options.offload_capacity is None:
        parser.error("--pin-hot-from pins experts in the expert cache: give --offload-capacity too")
    if options.plan is not None and options.pin_hot_from is not None:
        parser.error("--plan and --pin-hot-from both choose the pinned experts: give one")
    try:
        engine = InferenceEngine.from_checkpoint(options.checkpoint, options.config, options.device,
                                                 DTYPES[options.dtype] if options.dtype else None,
                                                 trusted_key=options.trusted_key)
        decoder, hit_rate = _run_options(engine, options, settings)
    except ArtifactError as error:  # a truncated, corrupt, unsigned or untrusted checkpoint
        exit_on_artifact_error(parser, error)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    try:
        app = create_app(engine, settings, decoder=decoder, expert_cache_hit_rate=hit_rate)
    except ValueError as error:  # e.g. an audit log that can't be written
        parser.error(str(error))
    if options.grpc_port is not None:
        _serve_grpc(parser, app, options)
    auth = "WITHOUT authentication (--insecure-no-auth)" if settings.insecure_no_auth else (
        f"{len(settings.api_keys)} API key(s)")
    scheme = "http" if options.ssl_certfile is None else "https"
    print(f"serving {options.checkpoint} as {settings.model_name!r} on {scheme}://{options.host}:{options.port} "
          f"with {auth}", flush=True)
    uvicorn.run(app, host=options.host, port=options.port, log_level=options.log_level,
                ssl_certfile=options.ssl_certfile, ssl_keyfile=options.ssl_keyfile)


def add_key_main(argv: list[str]) -> None:
    """``moe-lightning serve add-key --key-file FILE --name NAME --role ROLE [...]``: add a key to a key file (made if
    missing) and print it, once: the file keeps only its hash. Without --key-from-stdin the key is generated."""
    parser = argparse.ArgumentParser(prog="moe-lightning serve add-key", description=add_key_main.__doc__)
    parser.add_argument("--key-file", required=True, help="the JSON key file to add to (pass it to --api-key-file)")
    parser.add_argument("--name", required=True, help="who holds the key (the audit log shows this name)")
    parser.add_argument("--role", action="append", required=True, choices=[role.value for role in Role],
                        help="a role of the key (repeatable): user generates, metrics reads /metrics, admin both")
    parser.add_argument("--rate", type=float, default=None, help="requests per second the key may sustain")
    parser.add_argument("--burst", type=int, default=None, help="requests the key may send at once (with --rate)")
    parser.add_argument("--key-from-stdin", action="store_true",
                        help=f"hash the key read from stdin (an existing one, at least {MIN_SUPPLIED_KEY_LENGTH} "
                             "characters) instead of generating one")
    options = parser.parse_args(argv)
    if (options.rate is None) != (options.burst is None):
        parser.error(f"--rate and --burst go together, got --rate {options.rate} and --burst {options.burst}")
    if options.key_from_stdin:
        key = sys.stdin.readline().strip()
        if len(key) < MIN_SUPPLIED_KEY_LENGTH or not key.isprintable():
            parser.error(f"the key on stdin has {len(key)} characters: keys need at least {MIN_SUPPLIED_KEY_LENGTH} "
                         "printable ones (a short key is guessable from its hash)")
    else:
        key = new_key()
    try:
        rate_limit = None if options.rate is None else RateLimit(requests_per_second=options.rate,
                                                                  burst=options.burst)
        add_key(options.key_file, ApiKeyRecord.of_key(key, options.name, options.role, rate_limit))
    except ValueError as error:  # pydantic's ValidationError is one
        parser.error(str(error))
    print(f"added the key {options.name!r} ({', '.join(sorted(set(options.role)))}) to {options.key_file}; it is "
          "shown once, here, and stored only as its hash", file=sys.stderr)
    if not options.key_from_stdin:
        print(key, flush=True)


def _serve_grpc(parser: argparse.ArgumentParser, app, options: argparse.Namespace) -> None:
    """Serve ``app``'s model over gRPC too (``--grpc-port``), in its process and event loop, over TLS with REST's
    certificate."""
    try:
        from moe_lightning.serving.grpc.server import serve_grpc_beside, tls_credentials
    except ImportError as error:
        parser.error(f"--grpc-port needs the grpc extra (pip install 'moe-lightning[grpc]'): {error}")
    try:
        credentials = None if options.ssl_certfile is None else tls_credentials(options.ssl_certfile,
                                                                                options.ssl_keyfile)
    except ValueError as error:
        parser.error(str(error))
    server = serve_grpc_beside(app, options.host, options.grpc_port, credentials=credentials)
    security = "plaintext" if credentials is None else "TLS"
    print(f"serving gRPC ({security}) on {server.address}, with the same keys, limits and queue", flush=True)


def _run_options(engine, options: argparse.Namespace, settings: ServerSettings):
    """Apply ``--plan``; the decoder and the expert-cache hit-rate reader that ``--cuda-graphs`` and ``--offload-*``
    ask for."""
    from moe_lightning.inference import CompiledDecoder, hot_experts_from_stats, offload_experts

    decoder = hit_rate = pin = None
    if options.plan is not None:
        plan = ServingPlan.load(options.plan)
        if options.offload_capacity is None:
            apply_plan(engine.model, plan)
        else:  # the expert cache holds float experts: the plan's pins apply, its formats cannot
            plan.check_model(engine.model)
            pin = plan.pins
            print(f"--plan with --offload-capacity: pinning the plan's experts {plan.pins} in the expert cache; the "
                  "plan's formats are not applied (the cache holds float experts)", flush=True)
    if options.cuda_graphs:
        buckets = [size for size in (1, 2, 4, 8, 16, 32, 64, 128) if size < settings.max_batch_size]
        decoder = CompiledDecoder(engine.model, cuda_graphs=True, batch_buckets=[*buckets, settings.max_batch_size])
    if options.offload_capacity is not None:
        if options.pin_hot_from is not None:
            pin = hot_experts_from_stats(options.pin_hot_from, options.pin_hot, model=engine.model)
        offload = offload_experts(engine.model, options.offload_capacity, options.offload_policy, pin=pin,
                                  prefetch=options.prefetch)

        def hit_rate() -> float | None:
            stats = offload.stats()
            return stats.hit_rate if stats.total.accesses else None

    return decoder, hit_rate


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-lightning serve", description=serve_main.__doc__)
    parser.add_argument("--checkpoint", required=True, help="a .safetensors export or a Lightning .ckpt")
    parser.add_argument("--config", default=None, help="the run's config.yaml for a .ckpt (default: found beside it)")
    add_trusted_key_argument(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port to serve on (default: 8000)")
    parser.add_argument("--grpc-port", type=int, default=None,
                        help="serve the gRPC API (moe_lightning.serving.v1.Generation and grpc.health.v1.Health) on "
                             "this port too, in the same process (default: no gRPC; needs the grpc extra)")
    parser.add_argument("--device", default=None, help="where to run the model, e.g. cuda:0 (default: cpu)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="weights dtype (default: as saved)")
    parser.add_argument("--model-name", default=_DEFAULTS["model_name"],
                        help=f"the model id of the OpenAI-compatible API (default: {_DEFAULTS['model_name']})")
    parser.add_argument("--api-key-file", default=None,
                        help="a JSON key file of hashed keys with roles and rate limits (see `moe-lightning serve "
                             f"add-key`), added to ${API_KEYS_ENV}'s comma-separated plain admin keys")
    parser.add_argument("--insecure-no-auth", action="store_true",
                        help="serve without API keys: anyone who reaches the port can use the model")
    parser.add_argument("--ssl-certfile", default=None, help="serve HTTPS with this PEM certificate (chain)")
    parser.add_argument("--ssl-keyfile", default=None, help="the certificate's PEM private key (if not in it)")
    parser.add_argument("--audit-log", default=None,
                        help="append one JSON line per request to this file (key name, route, time, status, latency)")
    parser.add_argument("--audit-prompts", action="store_true",
                        help="write each request's prompts into the audit log too (they may be confidential)")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="decode with CompiledDecoder: one CUDA graph per batch-size bucket (needs --device cuda)")
    parser.add_argument("--offload-capacity", type=count_or_fraction, default=None,
                        help="keep the experts in host memory behind a device cache of this many experts per layer "
                             "(an int, or a fraction of the layer's experts below 1)")
    parser.add_argument("--offload-policy", choices=["lru", "lfu"], default="lru", help="expert cache eviction")
    parser.add_argument("--pin-hot-from", default=None,
                        help="a training run's router_stats.jsonl: pin each layer's hottest experts in the cache")
    parser.add_argument("--pin-hot", type=count_or_fraction, default=0.125,
                        help="how many hot experts to pin per layer: a count, or a fraction of the experts below 1")
    parser.add_argument("--prefetch", action="store_true", help="prefetch the next layer's predicted experts")
    parser.add_argument("--plan", default=None,
                        help="a serving plan (moe-lightning plan) for this float checkpoint: its experts are quantised "
                             "to the plan's formats as they load; with --offload-capacity the experts stay float in "
                             "the expert cache and the plan's pinned experts are pinned there instead")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    for name in _LIMITS:
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(_DEFAULTS[name]), default=_DEFAULTS[name],
                            help=f"{_LIMIT_HELP[name]} (default: {_DEFAULTS[name]})")
    return parser
