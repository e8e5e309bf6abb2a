"""Optional API keys: `Authorization: Bearer KEY`, compared by sha256 digest (never stored plain).

The owner id derived from a key scopes jobs: a job of another key reads as 404.
"""

from __future__ import annotations

import hashlib
import hmac

from shared.errors import Unauthorized


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class ApiKeys:
    def __init__(self, digests: list[str]) -> None:
        self.digests = [d.strip().lower() for d in digests if d.strip()]

    @property
    def enabled(self) -> bool:
        return bool(self.digests)

    def owner(self, authorization: str | None) -> str:
        """The caller's owner id ('' when authentication is off); Unauthorized otherwise."""
        if not self.enabled:
            return ""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
        digest = key_digest(token.strip())
        if not any(hmac.compare_digest(digest, d) for d in self.digests):
            raise Unauthorized("unknown API key")
        return digest[:24]
