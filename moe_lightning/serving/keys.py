"""API keys at rest: a JSON key file of named, hashed keys with their roles and rate limits; the key itself is never
stored.

A key file looks like::

    {"keys": [{"name": "alice", "sha256": "<64 hex digits>", "roles": ["user"],
               "rate_limit": {"requests_per_second": 2.0, "burst": 10}}]}

Keys are SHA-256 hashed: a generated key holds 256 random bits, which no fast hash makes guessable, and a slow KDF
(scrypt) would add its cost to every request. Keys supplied by hand must therefore be long
(``MIN_SUPPLIED_KEY_LENGTH``).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_serializer, model_validator

from moe_lightning.serving.roles import Role

API_KEYS_ENV = "MOE_LIGHTNING_API_KEYS"
"""The environment variable holding comma-separated plain API keys (each gets the ``admin`` role)."""
KEY_PREFIX = "mlk_"
"""Generated keys start with this, so a leaked one is easy to recognise (e.g. by secret scanners)."""
MIN_SUPPLIED_KEY_LENGTH = 16
"""The shortest key accepted from a person rather than generated: shorter ones are guessable from their hash."""


class RateLimit(BaseModel):
    """A token bucket: ``burst`` requests at once, refilled at ``requests_per_second``."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    requests_per_second: float = Field(gt=0, description="the sustained rate")
    burst: int = Field(ge=1, description="the most requests in a row after an idle while")


class ApiKeyRecord(BaseModel):
    """One key as the server knows it: who holds it, its hash, what it may do, how often."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._@:-]+$",
                      description="who holds the key; written to the audit log instead of the key")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="the SHA-256 hex digest of the key")
    roles: frozenset[Role] = Field(min_length=1, description="admin, user and/or metrics")
    rate_limit: RateLimit | None = Field(None, description="None: unlimited")

    @classmethod
    def of_key(cls, key: str, name: str, roles: Iterable[Role | str], rate_limit: RateLimit | None = None,
               ) -> ApiKeyRecord:
        """The record of a plain ``key`` (hashed here)."""
        return cls(name=name, sha256=hash_key(key), roles=frozenset(roles), rate_limit=rate_limit)

    @field_serializer("roles")
    def _sorted_roles(self, roles: frozenset[Role]) -> list[str]:
        return sorted(role.value for role in roles)


class KeyFile(BaseModel):
    """The contents of a key file."""

    model_config = ConfigDict(extra="forbid")

    keys: list[ApiKeyRecord]

    @model_validator(mode="after")
    def _unique(self) -> KeyFile:
        for field in ("name", "sha256"):
            values = [getattr(record, field) for record in self.keys]
            repeated = sorted({value for value in values if values.count(value) > 1})
            if repeated:
                shown = repeated if field == "name" else [f"{digest[:12]}..." for digest in repeated]
                raise ValueError(f"each key needs its own {field}; repeated: {shown}")
        return self


def hash_key(key: str) -> str:
    """The SHA-256 hex digest of ``key``'s UTF-8 bytes (a lone surrogate, which has none, as its code point's)."""
    return hashlib.sha256(key.encode("utf-8", errors="surrogatepass")).hexdigest()


def new_key() -> str:
    """A fresh key: the prefix and 32 random bytes, URL-safe."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def read_key_file(path: str | Path) -> tuple[ApiKeyRecord, ...]:
    """The records of the key file at ``path``; ``ValueError`` naming the file and what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"API key file {path} does not exist or is not a file")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise ValueError(
            f"API key file {path} is not a JSON key file ({{\"keys\": [...]}}); if it holds plain keys, one a line "
            "(the old format), hash each into a new file with `moe-lightning serve add-key --key-file NEW.json "
            "--name NAME --role user --key-from-stdin < KEY`, or make new keys by leaving out --key-from-stdin"
        )
    try:
        return tuple(KeyFile.model_validate(data).keys)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'file'}: {e['msg']}" for e in error.errors())
        raise ValueError(f"API key file {path}: {problems}") from None


def add_key(path: str | Path, record: ApiKeyRecord) -> None:
    """Add ``record`` to the key file at ``path`` (created if missing), which is replaced atomically, readable by its
    owner only."""
    path = Path(path)
    records = list(read_key_file(path)) if path.exists() else []
    taken = {existing.name for existing in records}
    if record.name in taken:
        raise ValueError(f"API key file {path} already has a key named {record.name!r}")
    if any(existing.sha256 == record.sha256 for existing in records):
        raise ValueError(f"API key file {path} already holds this key (under another name)")
    text = KeyFile(keys=[*records, record]).model_dump_json(indent=2, exclude_none=True) + "\n"
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False,
                                     encoding="utf-8") as tmp:
        tmp.write(text)
    os.chmod(tmp.name, 0o600)
    os.replace(tmp.name, path)


def environment_keys(environ: Mapping[str, str] = os.environ) -> tuple[ApiKeyRecord, ...]:
    """The plain keys of ``$MOE_LIGHTNING_API_KEYS`` (comma-separated) as ``admin`` records named ``env-0``, ``env-1``,
    ...: the operator's own keys, which never touch the disk."""
    keys = list(dict.fromkeys(key.strip() for key in environ.get(API_KEYS_ENV, "").split(",") if key.strip()))
    bad = [index for index, key in enumerate(keys) if not key.isprintable()]
    if bad:
        raise ValueError(f"{API_KEYS_ENV}: keys {bad} (0-based) hold control characters")
    return tuple(ApiKeyRecord.of_key(key, f"env-{index}", [Role.ADMIN]) for index, key in enumerate(keys))


def load_api_keys(api_key_file: str | Path | None = None,
                  environ: Mapping[str, str] = os.environ) -> tuple[ApiKeyRecord, ...]:
    """The keys of ``$MOE_LIGHTNING_API_KEYS`` then of ``api_key_file``; a key in both keeps its file record."""
    from_file = read_key_file(api_key_file) if api_key_file is not None else ()
    in_file = {record.sha256 for record in from_file}
    from_env = [record for record in environment_keys(environ) if record.sha256 not in in_file]
    names = {record.name for record in from_file} & {record.name for record in from_env}
    if names:
        raise ValueError(f"API key file {api_key_file} names keys {sorted(names)}, the names of "
                         f"${API_KEYS_ENV}'s keys: rename them")
    return (*from_env, *from_file)
