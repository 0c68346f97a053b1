"""GrpcServer: the ``Generation`` service and the standard ``grpc.health.v1.Health`` service on one port, and
:func:`serve_grpc_beside`, which runs it inside a REST app's lifespan: same process, same event loop, same model,
queue, limits, API keys and rate limits, recorded by the same metrics and audit log.

Health is open to all, like REST's ``/health``: SERVING once the server has started (the app's batcher runs by then),
NOT_SERVING from the moment it starts stopping.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
from fastapi import FastAPI
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from moe_lightning.serving.access import AccessControl
from moe_lightning.serving.grpc.generation_pb2_grpc import add_GenerationServicer_to_server
from moe_lightning.serving.grpc.servicer import SERVICE_NAME, GenerationServicer
from moe_lightning.serving.request_records import RequestObserver
from moe_lightning.serving.service import GenerationService

STOP_GRACE_S = 5.0
"""At shutdown, how long calls in flight may run on before they are cancelled (new calls are refused at once)."""


class GrpcServer:
    """Serves ``service`` over gRPC at ``host:port`` (port 0: any free port, see :attr:`port` once started), over TLS
    with ``credentials`` (see :func:`tls_credentials`).

    Requests larger than the service's ``max_body_bytes`` are refused (RESOURCE_EXHAUSTED) before they are parsed,
    as REST refuses such bodies. Call :meth:`start` and :meth:`stop` on the event loop that runs the service's batcher.
    """

    def __init__(
        self, service: GenerationService, access: AccessControl, host: str, port: int, *,
        observers: Sequence[RequestObserver] = (), credentials: grpc.ServerCredentials | None = None,
        stop_grace_s: float = STOP_GRACE_S,
    ) -> None:
        if not 0 <= port < 65536:
            raise ValueError(f"a gRPC port must be in 0..65535 (0: any free port), got port={port}")
        if stop_grace_s < 0:
            raise ValueError(f"stop_grace_s must be >= 0, got stop_grace_s={stop_grace_s}")
        self.service, self.access, self.observers = service, access, tuple(observers)
        self.host, self.credentials, self.stop_grace_s = host, credentials, stop_grace_s
        self._requested_port = port
        self._port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._health: health.aio.HealthServicer | None = None

    @property
    def port(self) -> int:
        """The port the server listens on; raises until :meth:`start`."""
        if self._port is None:
            raise RuntimeError("the gRPC server has not started: no port is bound yet")
        return self._port

    @property
    def address(self) -> str:
        """``host:port`` as a gRPC target (IPv6 hosts bracketed)."""
        return _target(self.host, self.port if self._port is not None else self._requested_port)

    async def start(self) -> None:
        if self._server is not None:
            raise RuntimeError(f"the gRPC server at {self.address} is already running")
        server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", self.service.settings.max_body_bytes),
            ("grpc.so_reuseport", 0),  # a port in use is an error, not a second server sharing it
        ])
        add_GenerationServicer_to_server(GenerationServicer(self.service, self.access, self.observers), server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        address = _target(self.host, self._requested_port)
        try:
            if self.credentials is None:
                port = server.add_insecure_port(address)
            else:
                port = server.add_secure_port(address, self.credentials)
        except RuntimeError as error:
            raise RuntimeError(f"cannot serve gRPC on {address}: the port is taken, or the host is not an address "
                               f"of this machine ({error})") from error
        await server.start()
        for name in (health.OVERALL_HEALTH, SERVICE_NAME):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._server, self._health, self._port = server, health_servicer, port

    async def stop(self) -> None:
        """Report NOT_SERVING, refuse new calls, give calls in flight ``stop_grace_s``, then cancel them."""
        if self._server is None:
            return
        server, health_servicer = self._server, self._health
        self._server = self._health = None
        if health_servicer is not None:
            await health_servicer.enter_graceful_shutdown()
        await server.stop(self.stop_grace_s)


def serve_grpc_beside(app: FastAPI, host: str, port: int, **options: Any) -> GrpcServer:
    """Serve ``app``'s generation service over gRPC too, while the app runs: its lifespan starts the gRPC server once
    the app (and its batcher) has started, and stops it before the app stops. The server is also ``app.state.grpc``.
    Its calls are counted in the app's metrics and written to its audit log (when it has one) like REST requests.

    ``app`` is one of :func:`~moe_lightning.serving.app.create_app`; ``options`` go to :class:`GrpcServer`.
    """
    state = app.state
    server = GrpcServer(state.service, state.access, host, port, observers=state.observers, **options)
    app_lifespan = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[Any]:
        async with app_lifespan(app) as app_state:
            await server.start()
            try:
                yield app_state
            finally:
                await server.stop()

    app.router.lifespan_context = lifespan
    state.grpc = server
    return server


def tls_credentials(certfile: str | Path, keyfile: str | Path | None = None) -> grpc.ServerCredentials:
    """TLS from the PEM files REST's ``--ssl-certfile``/``--ssl-keyfile`` take (the key may sit in ``certfile``)."""
    chain = Path(certfile).read_bytes()
    key = chain if keyfile is None else Path(keyfile).read_bytes()
    if b"PRIVATE KEY-----" not in key:
        raise ValueError(f"no PEM private key in {keyfile or certfile}: pass the certificate's key (--ssl-keyfile)")
    return grpc.ssl_server_credentials([(key, chain)])


def _target(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
