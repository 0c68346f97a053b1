"""HTTPS through uvicorn's TLS options, with a self-signed certificate for 127.0.0.1 made here."""

import datetime
import ipaddress
import ssl

import httpx
import pytest
import uvicorn

from moe_lightning.inference import export_safetensors
from moe_lightning.serving.app import create_app
from moe_lightning.serving.cli import serve_main
from tests.unit.serving.conftest import AUTH, live_server, settings, tiny_model

x509 = pytest.importorskip("cryptography.x509")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1 and its key, as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "moe-lightning test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    folder = tmp_path_factory.mktemp("tls")
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


def test_the_server_speaks_https_with_the_given_certificate(engine, certificate):
    cert_file, key_file = certificate
    trusting = ssl.create_default_context(cafile=str(cert_file))
    with live_server(create_app(engine, settings()), ssl_certfile=str(cert_file), ssl_keyfile=str(key_file)) as url:
        assert url.startswith("https://")
        with httpx.Client(base_url=url, headers=AUTH, verify=trusting, timeout=30) as client:
            response = client.post("/v1/generate", json={"prompts": ["hi"], "max_new_tokens": 2})
            assert response.status_code == 200 and len(response.json()["outputs"][0]["tokens"]) == 2
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(f"{url}/health", verify=ssl.create_default_context(), timeout=30)  # an untrusted certificate
        with pytest.raises(httpx.HTTPError):  # plain HTTP to the TLS port gets no answer
            httpx.get(url.replace("https://", "http://") + "/health", timeout=30)


def test_serve_passes_the_certificate_to_uvicorn_and_checks_the_files(certificate, tmp_path, monkeypatch, capsys):
    checkpoint = tmp_path / "tiny.safetensors"
    export_safetensors(tiny_model(), checkpoint)
    cert_file, key_file = certificate
    monkeypatch.setenv("MOE_LIGHTNING_API_KEYS", "env-key-0123456789")
    served = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: served.append(kwargs))
    serve_main(["--checkpoint", str(checkpoint), "--ssl-certfile", str(cert_file), "--ssl-keyfile", str(key_file)])
    assert (served[0]["ssl_certfile"], served[0]["ssl_keyfile"]) == (str(cert_file), str(key_file))
    assert "on https://127.0.0.1:8000" in capsys.readouterr().out
    for argv, message in [(["--ssl-keyfile", str(key_file)], "--ssl-keyfile needs --ssl-certfile"),
                          (["--ssl-certfile", str(tmp_path / "none.pem")], "none.pem does not exist")]:
        with pytest.raises(SystemExit):
            serve_main(["--checkpoint", str(checkpoint), *argv])
        assert message in capsys.readouterr().err
