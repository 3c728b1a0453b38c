"""Share links: create one (a signed token for one run or thread), revoke one."""

from __future__ import annotations

from dataclasses import dataclass

from app.access.policy import Principal, Role, Scope
from app.access.tokens import Authenticator, ShareGrant
from app.core.events import JsonObject
from app.core.ids import new_share_id
from app.errors import ForbiddenError, NotFoundError
from app.store.base import ShareRecord, Store

DEFAULT_EXPIRES_IN_S = 86_400
MAX_EXPIRES_IN_S = 30 * 86_400


@dataclass(frozen=True, slots=True)
class Shares:
    store: Store
    authenticator: Authenticator

    async def create(
        self, principal: Principal, scope: Scope, role: Role, expires_in_s: float, now: float
    ) -> JsonObject:
        """A new share of ``scope`` (already authorized for SHARE) with ``role``; on disk
        before it is returned. It never outlives nor outranks the principal's own access.

        Raises:
            ForbiddenError: ``role`` is above the principal's own, or above operator.
        """
        if role > principal.role or role > Role.OPERATOR:
            raise ForbiddenError(
                f"a share may grant viewer or operator, at most the caller's own role "
                f"({principal.role.label})",
                field="role",
            )
        expires_at = now + expires_in_s
        if principal.expires_at is not None:
            expires_at = min(expires_at, principal.expires_at)
        share = ShareRecord(
            new_share_id(), scope.kind, scope.id, role.label, principal.id, now, expires_at
        )
        await self.store.create_share(share)
        # Made with a share: it ends when that one (or any it was made with) is revoked.
        via = principal.via if principal.share_id is None else (*principal.via, principal.share_id)
        token = self.authenticator.sign(ShareGrant(share.share_id, scope, role, expires_at, via))
        return {
            "share_id": share.share_id,
            "token": token,
            "role": share.role,
            "expires_at": expires_at,
            "url": f"/#/{scope.kind}s/{scope.id}?token={token}",
        }

    async def get(self, share_id: str) -> ShareRecord:
        """Raises: NotFoundError."""
        share = await self.store.get_share(share_id)
        if share is None:
            raise NotFoundError(f"no share {share_id}")
        return share

    async def revoke(self, share: ShareRecord, now: float) -> None:
        """Revoke ``share`` (its revocation already authorized): its token is refused
        from now on, here and after a restart."""
        await self.store.revoke_share(share.share_id, now)
        self.authenticator.revoke(share.share_id)
