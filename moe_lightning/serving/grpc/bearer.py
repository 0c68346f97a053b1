"""The API key of a gRPC call: its ``authorization: Bearer KEY`` metadata, as REST reads the header of that name."""

from __future__ import annotations

from collections.abc import Iterable

from moe_lightning.serving.errors import ApiError

AUTHORIZATION = "authorization"
"""The metadata key (gRPC metadata keys are lower case)."""


def bearer_key(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The key of the call's ``authorization: Bearer KEY`` metadata, None when the call has none; raises ApiError 401
    for any other form (the value itself is never echoed: it may be a key)."""
    values = [value for key, value in metadata or () if key.lower() == AUTHORIZATION]
    if not values:
        return None
    if len(values) > 1:
        raise ApiError(401, f"the call has {len(values)} '{AUTHORIZATION}' metadata entries: send one, "
                            "'Bearer <key>'", code="invalid_api_key")
    value = values[0].decode("utf-8", errors="replace") if isinstance(values[0], bytes) else values[0]
    scheme, _, key = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise ApiError(401, f"'{AUTHORIZATION}' metadata must read 'Bearer <key>'", code="invalid_api_key")
    return key.strip()
