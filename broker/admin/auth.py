"""Bearer tokens and roles of the admin API.

The configuration holds only each token's SHA-256 (``[[admin.tokens]]``): tokens are 256-bit
random strings made by :func:`new_token`, so a plain hash is as strong as a slow KDF would be and
costs nothing per request. A presented token is hashed and compared with *every* stored hash in
constant time, so the response time says nothing about which token, if any, nearly matched.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable

from broker.config import AdminToken

#: What each role may do. ``read``: status, nodes, queues, policy, metrics, checkpoint;
#: ``audit``: audit entries, proofs and export; ``operate``: suspend, resume, revoke, reload.
PERMISSIONS: dict[str, frozenset[str]] = {
    "viewer": frozenset({"read"}),
    "auditor": frozenset({"read", "audit"}),
    "operator": frozenset({"read", "operate"}),
}

TOKEN_PREFIX = "cbt_"


def new_token() -> str:
    """A fresh bearer token (256 bits from the OS)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> bytes:
    """The SHA-256 stored in the configuration for ``token``."""
    return hashlib.sha256(token.encode("utf-8")).digest()


class TokenTable:
    """The configured tokens; identifies the holder of a presented ``Authorization`` header."""

    def __init__(self, tokens: Iterable[AdminToken]) -> None:
        self.tokens = tuple(tokens)

    def identify(self, authorization: str | None) -> AdminToken | None:
        """The token an ``Authorization: Bearer …`` header presents, or ``None``."""
        if authorization is None or not authorization.startswith("Bearer "):
            return None
        presented = hash_token(authorization[len("Bearer "):].strip())
        found = None
        for token in self.tokens:  # no early exit: the time does not depend on the match
            if hmac.compare_digest(presented, token.sha256):
                found = token
        return found

    @staticmethod
    def allows(token: AdminToken, permission: str) -> bool:
        return permission in PERMISSIONS.get(token.role, frozenset())
