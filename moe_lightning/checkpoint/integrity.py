"""Hash manifests: every artifact we write says what its files must hash to, so corruption is caught on load.

An *artifact* is one file (a ``.safetensors`` export, a quantised export) or a directory (a transformers export, a
sharded training checkpoint). Its manifest is a JSON document listing each file's size, SHA-256 and, for a
``.safetensors`` file, its header metadata (format, model config, router spec):

- one file ``model.safetensors``: ``model.safetensors.manifest.json`` beside it;
- a directory: ``DIR/manifest.json``, covering every other file below ``DIR`` (a checkpoint writes it last, so its
  presence also says the checkpoint is complete).

``moe-lightning sign`` adds a signature of the manifest's bytes (see :mod:`moe_lightning.checkpoint.signing`) at the
manifest's path plus ``.sig``.

Cost of :func:`verify_manifest`: one sequential read of every file through SHA-256 in 1 MiB chunks, on one core
and in constant memory; the loader then reads the file again, usually from the page cache. Measured: 0.62 GiB/s
(1.6 s per GiB) on a shared 2-core Xeon VM with SHA extensions; on a 10 GiB model that is about 16 s more per load,
or the disk's read time if that is slower.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from moe_lightning.checkpoint.atomic import atomic_write
from moe_lightning.checkpoint.errors import ArtifactError
from moe_lightning.checkpoint.reading import safetensors_metadata

MANIFEST_FORMAT = "moe_lightning.manifest/1"
DIRECTORY_MANIFEST = "manifest.json"
FILE_MANIFEST_SUFFIX = ".manifest.json"
SIGNATURE_SUFFIX = ".sig"
_CHUNK_BYTES = 1 << 20


def manifest_path(artifact: str | Path) -> Path:
    """Where the manifest of ``artifact`` (a file or a directory) is."""
    artifact = Path(artifact)
    return artifact / DIRECTORY_MANIFEST if artifact.is_dir() else artifact.with_name(artifact.name + FILE_MANIFEST_SUFFIX)


def signature_path(artifact: str | Path) -> Path:
    """Where the signature of ``artifact``'s manifest is."""
    manifest = manifest_path(artifact)
    return manifest.with_name(manifest.name + SIGNATURE_SUFFIX)


def artifact_files(artifact: str | Path) -> dict[str, Path]:
    """The files a manifest of ``artifact`` covers, by their name relative to the artifact (``/``-separated)."""
    artifact = Path(artifact)
    if artifact.is_file():
        return {artifact.name: artifact}
    if not artifact.is_dir():
        raise FileNotFoundError(f"artifact {artifact} does not exist")
    sidecars = {DIRECTORY_MANIFEST, DIRECTORY_MANIFEST + SIGNATURE_SUFFIX}
    files = {path.relative_to(artifact).as_posix(): path for path in sorted(artifact.rglob("*")) if path.is_file()}
    return {name: path for name, path in files.items() if name not in sidecars}


def file_sha256(path: Path) -> str:
    """The SHA-256 of ``path``'s bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    buffer = bytearray(_CHUNK_BYTES)
    view = memoryview(buffer)
    with path.open("rb", buffering=0) as f:
        while read := f.readinto(buffer):
            digest.update(view[:read])
    return digest.hexdigest()


def build_manifest(artifact: str | Path) -> dict[str, Any]:
    """The manifest of ``artifact`` as it is now on disk (reads every file once)."""
    entries = {}
    for name, path in artifact_files(artifact).items():
        entry: dict[str, Any] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
        if path.suffix == ".safetensors":
            entry["metadata"] = safetensors_metadata(path)
        entries[name] = entry
    return {"format": MANIFEST_FORMAT, "files": entries}


def write_manifest(artifact: str | Path) -> Path:
    """Write the manifest of ``artifact`` (replacing an older one and removing the now stale signature); returns
    its path. Call it after the last file of the artifact is written."""
    manifest = build_manifest(artifact)
    path = manifest_path(artifact)
    text = json.dumps(manifest, indent=1, sort_keys=True) + "\n"
    atomic_write(path, lambda temporary: temporary.write_text(text))
    signature_path(artifact).unlink(missing_ok=True)
    return path


def read_manifest(artifact: str | Path) -> dict[str, Any] | None:
    """The manifest of ``artifact``, or None when it has none; :class:`ArtifactError` when it is unreadable."""
    path = manifest_path(artifact)
    if not path.is_file():
        return None
    return parse_manifest(path, path.read_bytes())


def parse_manifest(path: Path, data: bytes) -> dict[str, Any]:
    """The manifest held in ``data`` (the bytes of ``path``), checked to be one."""
    try:
        manifest = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ArtifactError(path, f"manifest {path} is corrupt ({error}): write the artifact again, or delete "
                                  "the manifest and sign the artifact anew") from error
    if not _well_formed(manifest):
        raise ArtifactError(path, f"{path} is not a {MANIFEST_FORMAT} manifest (another format, or files without "
                                  "sha256 and bytes): write the artifact again, or delete the file and sign anew")
    return manifest


def _well_formed(manifest: Any) -> bool:
    files = manifest.get("files") if isinstance(manifest, dict) else None
    return isinstance(files, dict) and manifest.get("format") == MANIFEST_FORMAT and all(
        isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and isinstance(entry.get("bytes"), int)
        for entry in files.values()
    )


def verify_manifest(artifact: str | Path, manifest: dict[str, Any] | None = None, required: bool = False) -> bool:
    """Check every file of ``artifact`` against its manifest (``manifest``: already read, e.g. a signed one).

    Returns whether a manifest was checked: False when there is none and ``required`` is False.

    Raises:
        ArtifactError: a file is missing, not in the manifest, of another size or another SHA-256; the message
            names the file. Or ``required`` and there is no manifest.
    """
    artifact = Path(artifact)
    if not artifact.exists():
        raise FileNotFoundError(f"artifact {artifact} does not exist")
    path = manifest_path(artifact)
    manifest = manifest if manifest is not None else read_manifest(artifact)
    if manifest is None:
        if required:
            raise ArtifactError(path, f"{artifact} has no manifest ({path} does not exist): write it with "
                                      f"`moe-lightning sign {artifact} --key PRIVATE_KEY`")
        return False
    expected, found = manifest["files"], artifact_files(artifact)
    missing = sorted(set(expected) - set(found))
    if missing:
        raise ArtifactError(artifact / missing[0] if artifact.is_dir() else artifact,
                            f"{artifact} lacks {missing} listed in its manifest {path}: copy the artifact again")
    unlisted = sorted(set(found) - set(expected))
    if unlisted:
        raise ArtifactError(found[unlisted[0]], f"{found[unlisted[0]]} is not in the manifest {path} of {artifact}"
                                                 f"{f' (nor are {unlisted[1:]})' if unlisted[1:] else ''}: remove it, "
                                                 "or write the manifest again by signing the artifact")
    for name, entry in expected.items():
        file = found[name]
        size = file.stat().st_size
        if size != entry["bytes"]:
            raise ArtifactError(file, f"{file} is {size} bytes but its manifest {path} says {entry['bytes']}: it is "
                                      f"{'truncated' if size < entry['bytes'] else 'altered'}; write it again or copy "
                                      "it again from its source")
        digest = file_sha256(file)
        if digest != entry["sha256"]:
            raise ArtifactError(file, f"{file} is corrupt or altered: its SHA-256 is {digest[:16]}..., its manifest "
                                      f"{path} says {entry['sha256'][:16]}...; write it again or copy it again from "
                                      "its source")
    return True


TRUSTED_KEY_ENV = "MOE_LIGHTNING_TRUSTED_KEY"
"""The environment variable naming a trusted Ed25519 public key file, for loaders not given one explicitly."""


def configured_trusted_key(trusted_key: Any = None) -> Any:
    """``trusted_key``, else the file ``$MOE_LIGHTNING_TRUSTED_KEY`` names, else None."""
    return trusted_key if trusted_key is not None else os.environ.get(TRUSTED_KEY_ENV) or None


def check_artifact(artifact: str | Path, trusted_key: Any = None) -> None:
    """The load-time check of ``artifact``: with a trusted key (``trusted_key``: a public key file or an
    ``Ed25519PublicKey``; default: the file named by ``$MOE_LIGHTNING_TRUSTED_KEY``), it must be signed by that key
    and match the signed manifest; without one, it must match its manifest where it has one.

    Raises:
        ArtifactError: naming the file that failed and why.
    """
    trusted_key = configured_trusted_key(trusted_key)
    if trusted_key is None:
        verify_manifest(artifact)
        return
    from moe_lightning.checkpoint.signing import verify_signed  # cryptography only when a key is configured

    verify_signed(artifact, trusted_key)
