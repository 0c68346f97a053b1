"""Who is calling, and may they: :class:`Authenticator` turns a presented API key into a :class:`Principal` (401
otherwise), :func:`check_role` checks its roles (403). Transport-free: the HTTP app and a gRPC servicer share them
(through :class:`moe_lightning.serving.access.AccessControl`)."""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from dataclasses import dataclass

from moe_lightning.serving.errors import ApiError
from moe_lightning.serving.keys import ApiKeyRecord, RateLimit, hash_key
from moe_lightning.serving.roles import ANY_ROLE, Role

ANONYMOUS = "anonymous"
"""The principal of every caller of a server run without authentication (``insecure_no_auth``)."""


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: the name of its key (never the key), its roles and rate limit."""

    name: str
    roles: frozenset[Role]
    rate_limit: RateLimit | None = None


class Authenticator:
    """The server's keys; with none (``insecure_no_auth``) every caller is :data:`ANONYMOUS` with every role."""

    def __init__(self, records: Sequence[ApiKeyRecord], insecure_no_auth: bool = False) -> None:
        if not records and not insecure_no_auth:
            raise ValueError("an Authenticator needs API key records, or insecure_no_auth=True")
        self.required = not insecure_no_auth
        self._records = [(bytes.fromhex(record.sha256), record) for record in records]

    def authenticate(self, key: str | None) -> Principal:
        """The principal holding ``key``; 401 (with ``WWW-Authenticate: Bearer``) for a missing or unknown key.

        The key's hash is compared with every known hash in constant time, so timing reveals neither which key
        matched nor how much of one did."""
        if not self.required:
            return Principal(ANONYMOUS, ANY_ROLE)
        if not key:
            raise _unauthenticated("missing API key")
        digest = bytes.fromhex(hash_key(key))
        found = None
        for known, record in self._records:
            if hmac.compare_digest(known, digest):
                found = record
        if found is None:
            raise _unauthenticated("invalid API key")
        return Principal(found.name, found.roles, found.rate_limit)


def check_role(principal: Principal, allowed: frozenset[Role]) -> None:
    """403 unless ``principal`` holds one of the ``allowed`` roles."""
    if not principal.roles & allowed:
        raise ApiError(403, f"the key {principal.name!r} has roles {_names(principal.roles)}; this needs one of "
                            f"{_names(allowed)}", code="forbidden")


def _names(roles: frozenset[Role]) -> list[str]:
    return sorted(role.value for role in roles)


def _unauthenticated(reason: str) -> ApiError:
    return ApiError(401, f"{reason}: send 'Authorization: Bearer <key>'", code="invalid_api_key",
                    headers={"WWW-Authenticate": 'Bearer realm="moe-lightning"'})
