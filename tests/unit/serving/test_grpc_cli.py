"""``moe-lightning serve --grpc-port``: gRPC beside REST in one process, over TLS with REST's certificate."""

import asyncio
import datetime
import ipaddress
import socket

import grpc
import httpx
import pytest
import uvicorn

pytest.importorskip("grpc_health", reason="the grpc extra (grpcio, grpcio-health-checking, grpcio-status) is missing")

from moe_lightning.inference import export_safetensors, generate  # noqa: E402
from moe_lightning.serving.cli import serve_main  # noqa: E402
from moe_lightning.serving.grpc_client import MoELightningGrpcClient, MoELightningGrpcError  # noqa: E402
from tests.unit.serving.conftest import live_server, tiny_model  # noqa: E402

KEY = "cli-key-0123456789"


@pytest.fixture
def checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_LIGHTNING_API_KEYS", KEY)
    path = tmp_path / "tiny.safetensors"
    export_safetensors(tiny_model(), path)
    return path


def served_app(argv, monkeypatch):
    """The app ``serve_main(argv)`` hands uvicorn (not run)."""
    served = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: served.append(app))
    serve_main(argv)
    return served[0]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_grpc_port_serves_the_rest_app_s_model_and_queue(checkpoint, monkeypatch, capsys):
    port = free_port()
    app = served_app(["--checkpoint", str(checkpoint), "--grpc-port", str(port)], monkeypatch)
    assert f"serving gRPC (plaintext) on 127.0.0.1:{port}" in capsys.readouterr().out
    assert app.state.grpc.service is app.state.service  # one model, one queue
    expected = generate(tiny_model(), [list(b"Hi")], 5)[0]
    with live_server(app) as url, MoELightningGrpcClient(f"127.0.0.1:{port}", KEY, timeout=60) as client:
        assert client.generate("Hi", max_new_tokens=5).outputs[0].tokens == expected
        rest = httpx.post(f"{url}/v1/generate", json={"prompts": ["Hi"], "max_new_tokens": 5},
                          headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
        assert rest.json()["outputs"][0]["tokens"] == expected
    with MoELightningGrpcClient(f"127.0.0.1:{port}", KEY, timeout=5) as client, pytest.raises(MoELightningGrpcError) as e:
        client.health()  # stopped with the app
    assert e.value.code == grpc.StatusCode.UNAVAILABLE


def test_with_a_certificate_grpc_is_served_over_tls_only(checkpoint, tmp_path, monkeypatch):
    certfile, keyfile = self_signed_certificate(tmp_path)
    port = free_port()
    app = served_app(["--checkpoint", str(checkpoint), "--grpc-port", str(port), "--ssl-certfile", str(certfile),
                      "--ssl-keyfile", str(keyfile)], monkeypatch)
    target = f"127.0.0.1:{port}"
    with live_server(app):
        with MoELightningGrpcClient(target, KEY, timeout=60, root_certificates=certfile.read_bytes()) as client:
            assert client.health() == "SERVING"
            assert client.generate("Hi", max_new_tokens=2).usage.completion_tokens == 2
        with MoELightningGrpcClient(target, KEY, timeout=5) as plaintext, pytest.raises(MoELightningGrpcError) as e:
            plaintext.health()
        assert e.value.code == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize(("argv", "message"), [
    (["--grpc-port", "0"], "--grpc-port must be in 1..65535, got --grpc-port 0"),
    (["--grpc-port", "8000"], "--grpc-port 8000 is --port too"),
])
def test_bad_grpc_ports_are_named(checkpoint, capsys, argv, message):
    with pytest.raises(SystemExit):
        serve_main(["--checkpoint", str(checkpoint), *argv])
    assert message in capsys.readouterr().err


def test_a_taken_grpc_port_fails_the_start_naming_it(checkpoint, monkeypatch):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        app = served_app(["--checkpoint", str(checkpoint), "--grpc-port", str(port)], monkeypatch)
        with pytest.raises(RuntimeError, match=f"cannot serve gRPC on 127.0.0.1:{port}: the port is taken"):
            asyncio.run(app.state.grpc.start())  # what the app's lifespan does first, failing uvicorn's start


def self_signed_certificate(directory):
    """A certificate for 127.0.0.1 and its key, as PEM files."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    certfile, keyfile = directory / "cert.pem", directory / "key.pem"
    certfile.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return certfile, keyfile
