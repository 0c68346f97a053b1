"""Ed25519 signatures of artifact manifests (``moe-lightning keygen``, ``sign``, ``verify``).

A signature covers the exact bytes of an artifact's manifest (see :mod:`moe_lightning.checkpoint.integrity`), which
lists every file's SHA-256, size and safetensors metadata; so a valid signature plus files matching the manifest
means the files are the ones the key's holder signed. The signature file (the manifest's path plus ``.sig``) is
JSON: the format, the algorithm, the signer's raw public key (to say *whose* signature it is when it is not the
trusted key's) and the 64-byte signature, both base64.

Keys are PEM files: the private key unencrypted PKCS#8 (written with mode 0600: keep it off the serving machines),
the public key SubjectPublicKeyInfo.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from moe_lightning.checkpoint.atomic import atomic_write
from moe_lightning.checkpoint.errors import ArtifactError
from moe_lightning.checkpoint.integrity import (
    TRUSTED_KEY_ENV,
    manifest_path,
    parse_manifest,
    signature_path,
    verify_manifest,
    write_manifest,
)

SIGNATURE_FORMAT = "moe_lightning.signature/1"
ALGORITHM = "Ed25519"
PUBLIC_KEY_SUFFIX = ".pub"


def generate_key_pair(out: str | Path) -> tuple[Path, Path]:
    """Write a new Ed25519 private key to ``out`` (mode 0600) and its public key to ``out.pub``; returns both
    paths. Refuses to overwrite either file."""
    private_path = Path(out)
    public_path = private_path.with_name(private_path.name + PUBLIC_KEY_SUFFIX)
    existing = [str(p) for p in (private_path, public_path) if p.exists()]
    if existing:
        raise ValueError(f"{existing} already exist(s): keygen never overwrites a key; choose another OUT")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    descriptor = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as f:
        f.write(private_pem)
    public_path.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return private_path, public_path


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    """The Ed25519 private key in PEM file ``path``; ValueError naming the file when it is not one."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"private key {path} does not exist: make a key pair with `moe-lightning keygen {path}`")
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as error:
        raise ValueError(f"{path} is not an unencrypted PEM private key ({error}): give the file keygen wrote") from error
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} holds a {type(key).__name__}, not an Ed25519 private key: make one with keygen")
    return key


def load_public_key(key: str | Path | Ed25519PublicKey) -> Ed25519PublicKey:
    """``key`` itself, or the Ed25519 public key in PEM file ``key``; ValueError naming the file otherwise."""
    if isinstance(key, Ed25519PublicKey):
        return key
    path = Path(key)
    if not path.is_file():
        raise ValueError(f"trusted public key {path} does not exist (from --trusted-key, --public-key or "
                         f"${TRUSTED_KEY_ENV}): give the .pub file keygen wrote")
    try:
        public = serialization.load_pem_public_key(path.read_bytes())
    except ValueError as error:
        raise ValueError(f"{path} is not a PEM public key ({error}): give the .pub file keygen wrote") from error
    if not isinstance(public, Ed25519PublicKey):
        raise ValueError(f"{path} holds a {type(public).__name__}, not an Ed25519 public key")
    return public


def key_id(public_key: Ed25519PublicKey) -> str:
    """A short name of a public key: the first 16 hex digits of the SHA-256 of its 32 raw bytes."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def sign_artifact(artifact: str | Path, private_key: str | Path | Ed25519PrivateKey) -> Path:
    """Sign ``artifact`` (a ``.safetensors`` file or a directory); returns the signature's path.

    An artifact with a manifest must still match it (a corrupted file is never signed); one without (written by
    another tool) gets a manifest first.

    Raises:
        ArtifactError: the artifact no longer matches its manifest.
        ValueError: ``artifact`` is neither a ``.safetensors`` file nor a directory, or the key is unusable.
    """
    artifact = Path(artifact)
    if not (artifact.is_dir() or (artifact.is_file() and artifact.suffix == ".safetensors")):
        raise ValueError(f"{artifact} is not a .safetensors file or a directory of one artifact: sign the export "
                         "(a Lightning .ckpt takes its architecture from an unsigned config.yaml: export it first)")
    key = private_key if isinstance(private_key, Ed25519PrivateKey) else load_private_key(private_key)
    if not verify_manifest(artifact):
        write_manifest(artifact)
    manifest = manifest_path(artifact).read_bytes()
    document = {
        "format": SIGNATURE_FORMAT,
        "algorithm": ALGORITHM,
        "public_key": _b64(key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)),
        "signature": _b64(key.sign(manifest)),
    }
    path = signature_path(artifact)
    text = json.dumps(document, indent=1) + "\n"
    atomic_write(path, lambda temporary: temporary.write_text(text))
    return path


def verify_signed(artifact: str | Path, trusted_key: str | Path | Ed25519PublicKey) -> str:
    """Check that ``trusted_key`` signed ``artifact``'s manifest and that every file matches it; returns the key's
    :func:`key_id`.

    Raises:
        ArtifactError: unsigned, signed by another key, manifest altered after signing, or a file that does not
            match the signed manifest; each names the file and says what to do.
    """
    artifact = Path(artifact)
    if not artifact.exists():
        raise FileNotFoundError(f"artifact {artifact} does not exist")
    public_key = load_public_key(trusted_key)
    manifest_file, signature_file = manifest_path(artifact), signature_path(artifact)
    if not signature_file.is_file():
        raise ArtifactError(signature_file, (
            f"{artifact} is not signed ({signature_file} does not exist) and a trusted key is configured: sign it "
            f"with `moe-lightning sign {artifact} --key PRIVATE_KEY`, or load it without a trusted key"))
    if not manifest_file.is_file():
        raise ArtifactError(manifest_file, f"{artifact} has a signature but no manifest ({manifest_file} is missing): "
                                           "copy the artifact again with its manifest")
    signer, signature = _read_signature(signature_file)
    manifest = manifest_file.read_bytes()
    try:
        public_key.verify(signature, manifest)
    except InvalidSignature:
        if signer != public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw):
            raise ArtifactError(signature_file, (
                f"{artifact} is signed by key {_signer_id(signer)}, not by the trusted key {key_id(public_key)}: "
                "get it signed by the trusted key's holder, or trust the signer's key")) from None
        raise ArtifactError(manifest_file, (
            f"{manifest_file} was altered after it was signed (the signature by the trusted key "
            f"{key_id(public_key)} does not match it): copy the artifact again from its signer")) from None
    verify_manifest(artifact, parse_manifest(manifest_file, manifest), required=True)
    return key_id(public_key)


def _read_signature(path: Path) -> tuple[bytes, bytes]:
    """The signer's raw public key and the signature in signature file ``path``."""
    try:
        document: Any = json.loads(path.read_bytes())
        if document.get("format") != SIGNATURE_FORMAT or document.get("algorithm") != ALGORITHM:
            raise ValueError(f"format {document.get('format')!r}, algorithm {document.get('algorithm')!r}")
        return base64.b64decode(document["public_key"], validate=True), base64.b64decode(document["signature"], validate=True)
    except (ValueError, KeyError, TypeError, AttributeError, binascii.Error) as error:
        raise ArtifactError(path, f"signature file {path} is corrupt or not a {SIGNATURE_FORMAT} {ALGORITHM} "
                                  f"signature ({error}): sign the artifact again") from error


def _signer_id(raw: bytes) -> str:
    try:
        return key_id(Ed25519PublicKey.from_public_bytes(raw))
    except ValueError:
        return f"<invalid {len(raw)}-byte key>"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
