"""Web chat session tokens: signed, expiring, binding one session id (no I/O).

A token is an ``itsdangerous`` signed JSON object::

    {"v": 1, "sid": "<session id>", "site": "default", "sub": "demo:web:<sid>",
     "iat": 1767225600, "exp": 1767229200}

``sid`` names the conversation (``ConversationKey("web", site, sid)``) and
``sub`` is the customer identity the engine sees; both come from the token
only, never from what a socket sends later. The demo issues ``sub =
"demo:web:<sid>"`` to anonymous browsers; a production site that knows its
customer mints the token on its own backend (same secret) with its own
customer id in ``sub`` (see :meth:`SessionSigner.issue`).

The secret is ``settings.secret_key``; without one, a random secret is made
per process, so tokens (and with them the browsers' sessions) do not survive
a restart. Set it in production.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from itsdangerous import BadSignature, URLSafeSerializer

__all__ = [
    "DEFAULT_RENEW_WITHIN",
    "DEFAULT_TTL",
    "SessionClaims",
    "SessionSigner",
    "TokenError",
    "demo_customer",
    "new_session_id",
    "valid_site",
]

logger = logging.getLogger(__name__)

#: Seconds a token can open sockets. An open socket outlives its token.
DEFAULT_TTL = 3600.0
#: Seconds after issue during which an (expired) token may be traded for a new
#: one for the same session: how long a returning browser keeps its conversation.
DEFAULT_RENEW_WITHIN = 30 * 24 * 3600.0

_SALT = "helpline.web.session.v1"
_SESSION_RE = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
_SITE_RE = re.compile(r"^[A-Za-z0-9_.-]{1,40}$")


def new_session_id() -> str:
    """A fresh, unguessable session id (128 random bits)."""
    return secrets.token_urlsafe(16)


def valid_site(site: str) -> bool:
    return bool(_SITE_RE.match(site))


def demo_customer(session: str) -> str:
    """The customer identity of an anonymous demo browser."""
    return f"demo:web:{session}"


@dataclass(frozen=True, slots=True)
class SessionClaims:
    session: str
    site: str
    customer: str
    issued_at: int
    expires_at: int


class TokenError(Exception):
    """A token that cannot open a socket; ``code`` is the protocol error code."""

    def __init__(self, code: Literal["auth_failed", "token_expired"], reason: str) -> None:
        self.code = code
        self.reason = reason
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"{self.code}: {self.reason}"


class SessionSigner:
    """Issues and verifies session tokens. ``clock`` returns Unix seconds (tests pass one)."""

    def __init__(self, secret: str | None, *, ttl: float = DEFAULT_TTL,
                 renew_within: float = DEFAULT_RENEW_WITHIN,
                 clock: Callable[[], float] = time.time) -> None:
        if not secret:
            logger.warning("no secret_key set: web chat sessions end when the server restarts")
            secret = secrets.token_urlsafe(32)
        self._serializer = URLSafeSerializer(secret, salt=_SALT)
        self.ttl = ttl
        self.renew_within = renew_within
        self.clock = clock

    def issue(self, *, site: str = "default", session: str | None = None,
              customer: str | None = None) -> tuple[str, SessionClaims]:
        """A new token for ``session`` (a new session when None).

        ``customer`` defaults to the demo identity; a site that authenticates its
        customers passes its own id here, on its backend.
        """
        if not valid_site(site):
            raise ValueError(f"invalid site id {site!r}: use 1-40 of A-Z a-z 0-9 _ . -")
        session = session or new_session_id()
        if not _SESSION_RE.match(session):
            raise ValueError("invalid session id")
        now = int(self.clock())
        claims = SessionClaims(session=session, site=site,
                               customer=customer or demo_customer(session),
                               issued_at=now, expires_at=now + int(self.ttl))
        token = self._serializer.dumps({"v": 1, "sid": claims.session, "site": claims.site,
                                        "sub": claims.customer, "iat": claims.issued_at,
                                        "exp": claims.expires_at})
        return token, claims

    def verify(self, token: str) -> SessionClaims:
        """The claims of a valid, unexpired token.

        Raises:
            TokenError: ``auth_failed`` (bad signature or shape) or ``token_expired``.
        """
        claims = self._decode(token)
        if self.clock() >= claims.expires_at:
            raise TokenError("token_expired", "the session token has expired")
        return claims

    def renewable(self, token: str) -> SessionClaims | None:
        """The claims of a token we issued within the renewal window, expired or not."""
        try:
            claims = self._decode(token)
        except TokenError:
            return None
        if self.clock() - claims.issued_at > self.renew_within:
            return None
        return claims

    def _decode(self, token: str) -> SessionClaims:
        try:
            data: Any = self._serializer.loads(token)
        except BadSignature:
            raise TokenError("auth_failed", "the session token is not valid") from None
        try:
            if data["v"] != 1:
                raise ValueError("version")
            claims = SessionClaims(session=str(data["sid"]), site=str(data["site"]),
                                   customer=str(data["sub"]), issued_at=int(data["iat"]),
                                   expires_at=int(data["exp"]))
        except (KeyError, TypeError, ValueError):
            raise TokenError("auth_failed", "the session token is malformed") from None
        return claims
