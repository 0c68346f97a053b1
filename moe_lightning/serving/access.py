"""AccessControl: the server's authenticator and rate limiter together, and :func:`require`, the FastAPI dependency
that guards a route with them: 401 without a valid key, 403 without a needed role, 429 over the key's rate limit."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from moe_lightning.serving.auth import Authenticator, Principal, check_role
from moe_lightning.serving.rate_limit import RateLimiter
from moe_lightning.serving.request_records import note_principal
from moe_lightning.serving.roles import Role

bearer_scheme = HTTPBearer(auto_error=False, description="an API key of the server, as `Authorization: Bearer KEY`")


@dataclass
class AccessControl:
    """Who may call, and how often. One per server, shared by every transport, so a key's budget is shared too."""

    authenticator: Authenticator
    rate_limiter: RateLimiter = field(default_factory=RateLimiter)

    def admit(self, key: str | None, allowed: frozenset[Role],
              on_identified: Callable[[Principal], None] | None = None) -> Principal:
        """The principal holding ``key`` if it has one of the ``allowed`` roles and budget left: 401, 403 or 429
        otherwise. ``on_identified`` learns who it is before a 403 or 429 (e.g. for the audit log)."""
        principal = self.authenticator.authenticate(key)
        if on_identified is not None:
            on_identified(principal)
        check_role(principal, allowed)
        self.rate_limiter.acquire(principal)
        return principal


def require(allowed: frozenset[Role]) -> Callable[..., Awaitable[Principal]]:
    """The dependency admitting a request to a route that needs one of the ``allowed`` roles, through the app's
    ``app.state.access``."""

    async def admit_request(
        request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
    ) -> Principal:
        access: AccessControl = request.app.state.access
        key = None if credentials is None else credentials.credentials
        return access.admit(key, allowed, lambda principal: note_principal(request, principal))

    return admit_request
