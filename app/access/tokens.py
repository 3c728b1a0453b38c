"""Tokens: server tokens (``ROLE SECRET``) and signed share tokens, turned into Principals.

A server token is compared with every configured secret in constant time. A share token
is ``rs1.<payload>.<signature>``: the payload (base64url JSON: share id, scope, role,
expiry) signed with HMAC-SHA256 under the server's secret, so it is checked with no
database read and survives a restart; revocation is a set of share ids, loaded from the
share table when the server starts and added to as shares are revoked.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from app.access.policy import OPEN, Principal, Role, Scope
from app.core.events import decode, encode

SHARE_PREFIX: Final = "rs1."
MIN_SECRET_CHARS: Final = 16
# Characters a token may hold: those of an HTTP header token (RFC 9110 tchar), so that a
# browser can offer it as the subprotocol ``runcast.bearer.TOKEN``.
_TOKEN_CHARS: Final = frozenset(
    "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
)


@dataclass(frozen=True, slots=True)
class ServerToken:
    role: Role
    secret: str

    @property
    def fingerprint(self) -> str:
        """A name for the token that gives nothing of it away (logs, ``created_by``)."""
        return "token:" + hashlib.sha256(self.secret.encode()).hexdigest()[:12]


def parse_server_tokens(env_items: Iterable[str], file_text: str | None) -> list[ServerToken]:
    """Server tokens from ``RUNCAST_TOKENS`` items (``ROLE:SECRET``) and a token file
    (``ROLE SECRET`` a line; blank lines and ``#`` comments are skipped).

    Raises:
        ValueError: a malformed entry (named by its place, never by its secret).
    """
    entries: list[tuple[str, str, str]] = []
    for number, item in enumerate(env_items, 1):
        role, sep, secret = item.strip().partition(":")
        entries.append((f"RUNCAST_TOKENS entry {number}", role, secret if sep else ""))
    for number, line in enumerate((file_text or "").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        role, _, secret = line.replace("\t", " ").partition(" ")
        entries.append((f"token file line {number}", role, secret.strip()))
    tokens = []
    for where, role_name, secret in entries:
        try:
            parsed = Role.parse(role_name)
        except ValueError:
            # Not the text itself: with the role forgotten, it is the secret.
            raise ValueError(
                f"{where}: not a role; expected viewer, operator or admin, then the secret"
            ) from None
        if len(secret) < MIN_SECRET_CHARS:
            raise ValueError(f"{where}: a secret needs at least {MIN_SECRET_CHARS} characters")
        if not set(secret) <= _TOKEN_CHARS:
            raise ValueError(f"{where}: a secret may hold letters, digits and !#$%&'*+-.^_`|~ only")
        if secret.startswith(SHARE_PREFIX):
            # It would be read as a share token and never matched.
            raise ValueError(f"{where}: a secret may not begin with {SHARE_PREFIX!r}")
        tokens.append(ServerToken(parsed, secret))
    return tokens


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True, slots=True)
class ShareGrant:
    """What a share token says: which share, what it reaches, with what role, until when,
    and the shares it was made with (``via``: it lives only as long as they do)."""

    share_id: str
    scope: Scope
    role: Role
    expires_at: float
    via: tuple[str, ...] = ()

    def principal(self) -> Principal:
        return Principal(
            f"share:{self.share_id}",
            self.role,
            self.scope,
            self.share_id,
            self.expires_at,
            self.via,
        )


class Authenticator:
    """Turns a presented token into a Principal. No token configured: open mode, where
    every request is the ``OPEN`` principal (an admin)."""

    def __init__(
        self, tokens: Iterable[ServerToken], secret: bytes, revoked: Iterable[str] = ()
    ) -> None:
        self._tokens = [(token.secret.encode(), token) for token in tokens]
        self._secret = secret
        self._revoked = set(revoked)

    @property
    def open_mode(self) -> bool:
        return not self._tokens

    def authenticate(self, token: str | None, now: float) -> Principal | None:
        """The principal ``token`` stands for; None when it stands for nobody (missing,
        unknown, badly signed, expired or revoked). Constant time in the secret."""
        if self.open_mode:
            return OPEN
        if not token:
            return None
        if token.startswith(SHARE_PREFIX):
            grant = self.verify(token)
            if grant is None:
                return None
            principal = grant.principal()
            return principal if self.still_valid(principal, now) else None
        presented = token.encode()
        found: ServerToken | None = None
        for secret, server_token in self._tokens:  # every one: the time says nothing
            if hmac.compare_digest(presented, secret):
                found = server_token
        if found is None:
            return None
        return Principal(found.fingerprint, found.role)

    def still_valid(self, principal: Principal, now: float) -> bool:
        """False once the share behind ``principal`` expired or was revoked."""
        if principal.expires_at is not None and now >= principal.expires_at:
            return False
        if principal.share_id is None:
            return True
        return principal.share_id not in self._revoked and self._revoked.isdisjoint(principal.via)

    def revoke(self, share_id: str) -> None:
        self._revoked.add(share_id)

    def sign(self, grant: ShareGrant) -> str:
        fields: dict[str, object] = {
            "s": grant.share_id,
            "k": grant.scope.kind,
            "i": grant.scope.id,
            "r": grant.role.label,
            "e": grant.expires_at,
        }
        if grant.via:
            fields["p"] = list(grant.via)
        payload = encode(fields).encode()
        body = _b64(payload)
        return f"{SHARE_PREFIX}{body}.{self._signature(body)}"

    def verify(self, token: str) -> ShareGrant | None:
        """The grant of a well-signed share token (expiry and revocation not checked)."""
        body, _, signature = token.removeprefix(SHARE_PREFIX).partition(".")
        if not hmac.compare_digest(signature.encode(), self._signature(body).encode()):
            return None
        try:
            fields = decode(_unb64(body))
            kind = fields["k"]
            via = fields.get("p", [])
            if kind not in ("run", "thread") or not isinstance(via, list):
                return None
            return ShareGrant(
                str(fields["s"]),
                Scope(kind, str(fields["i"])),
                Role.parse(str(fields["r"])),
                float(fields["e"]),
                tuple(str(share_id) for share_id in via),
            )
        except (ValueError, KeyError, TypeError, binascii.Error):
            return None

    def _signature(self, body: str) -> str:
        return _b64(hmac.new(self._secret, body.encode(), hashlib.sha256).digest())
