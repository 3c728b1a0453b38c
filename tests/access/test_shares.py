"""app/access/shares.py: share links created on a real SQLite file, checked by the
Authenticator, revoked (also across a restart), never above their creator's access."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from app.access.policy import Principal, Role, Scope
from app.access.shares import Shares
from app.access.tokens import Authenticator, ServerToken
from app.errors import ForbiddenError, NotFoundError
from app.store.sqlite import SqliteStore

NOW = 1_000_000.0
SECRET = b"s" * 32
TOKENS = [ServerToken(Role.OPERATOR, "operator-secret-0123456789")]
OPERATOR = Principal("token:op", Role.OPERATOR)
ADMIN = Principal("token:ad", Role.ADMIN)
VIEWER = Principal("token:vi", Role.VIEWER)
RUN = Scope("run", "run_1")
THREAD = Scope("thread", "thr_1")


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    store = SqliteStore(tmp_path / "shares.db")
    async with asyncio.timeout(5):
        await store.open()
    try:
        yield store
    finally:
        await store.close()


def shares_on(store: SqliteStore, revoked: tuple[str, ...] = ()) -> Shares:
    return Shares(store, Authenticator(TOKENS, SECRET, revoked))


async def test_a_share_is_on_disk_and_its_token_reaches_its_scope(
    store: SqliteStore, tmp_path: Path
) -> None:
    shares = shares_on(store)
    async with asyncio.timeout(5):
        made = await shares.create(OPERATOR, RUN, Role.VIEWER, 60, NOW)
    assert set(made) == {"share_id", "token", "role", "expires_at", "url"}
    assert made["role"] == "viewer"
    assert made["expires_at"] == NOW + 60
    assert made["url"] == f"/#/runs/run_1?token={made['token']}"
    principal = shares.authenticator.authenticate(made["token"], NOW)
    assert principal == Principal(
        f"share:{made['share_id']}", Role.VIEWER, RUN, made["share_id"], NOW + 60
    )
    # On disk before it is returned: another connection to the file reads it.
    other = SqliteStore(tmp_path / "shares.db")
    async with asyncio.timeout(5):
        await other.open()
        try:
            record = await other.get_share(made["share_id"])
        finally:
            await other.close()
    assert record is not None
    assert (record.kind, record.resource_id, record.role) == ("run", "run_1", "viewer")
    assert (record.created_by, record.created_at, record.expires_at) == (
        "token:op",
        NOW,
        NOW + 60,
    )
    assert record.revoked_at is None


async def test_a_thread_share_links_to_the_thread(store: SqliteStore) -> None:
    async with asyncio.timeout(5):
        made = await shares_on(store).create(ADMIN, THREAD, Role.OPERATOR, 60, NOW)
    assert made["url"] == f"/#/threads/thr_1?token={made['token']}"
    assert made["role"] == "operator"


@pytest.mark.parametrize(
    ("creator", "role"),
    [(VIEWER, Role.OPERATOR), (OPERATOR, Role.ADMIN), (ADMIN, Role.ADMIN)],
)
async def test_a_share_never_outranks_its_creator_nor_operator(
    store: SqliteStore, creator: Principal, role: Role
) -> None:
    with pytest.raises(ForbiddenError) as caught:
        async with asyncio.timeout(5):
            await shares_on(store).create(creator, RUN, role, 60, NOW)
    assert caught.value.details == {"field": "role"}


async def test_a_share_made_with_a_share_never_outlives_it(store: SqliteStore) -> None:
    shares = shares_on(store)
    async with asyncio.timeout(5):
        parent = await shares.create(OPERATOR, THREAD, Role.OPERATOR, 60, NOW)
        holder = shares.authenticator.authenticate(parent["token"], NOW)
        assert holder is not None
        child = await shares.create(holder, THREAD, Role.VIEWER, 3600, NOW)
        grandchild_holder = shares.authenticator.authenticate(child["token"], NOW)
        assert grandchild_holder is not None
        grandchild = await shares.create(grandchild_holder, THREAD, Role.VIEWER, 3600, NOW)
    assert child["expires_at"] == grandchild["expires_at"] == NOW + 60
    assert shares.authenticator.authenticate(child["token"], NOW + 60) is None
    # Revoking the share it was made with ends it too, here and after a restart.
    async with asyncio.timeout(5):
        await shares.revoke(await shares.get(parent["share_id"]), NOW)
    for made in (parent, child, grandchild):
        assert shares.authenticator.authenticate(made["token"], NOW) is None, made
    assert not shares.authenticator.still_valid(grandchild_holder, NOW)
    async with asyncio.timeout(5):
        restarted = shares_on(store, tuple(await store.revoked_shares(NOW)))
    for made in (parent, child, grandchild):
        assert restarted.authenticator.authenticate(made["token"], NOW) is None, made


async def test_revoked_here_and_after_a_restart(store: SqliteStore) -> None:
    shares = shares_on(store)
    async with asyncio.timeout(5):
        kept = await shares.create(OPERATOR, RUN, Role.VIEWER, 60, NOW)
        gone = await shares.create(OPERATOR, RUN, Role.VIEWER, 60, NOW)
        await shares.revoke(await shares.get(gone["share_id"]), NOW + 1)
        record = await shares.get(gone["share_id"])
        revoked = await store.revoked_shares(NOW + 1)
    assert record.revoked_at == NOW + 1
    assert shares.authenticator.authenticate(gone["token"], NOW + 1) is None
    assert shares.authenticator.authenticate(kept["token"], NOW + 1) is not None
    assert revoked == [gone["share_id"]]
    restarted = shares_on(store, tuple(revoked))
    assert restarted.authenticator.authenticate(gone["token"], NOW + 1) is None
    assert restarted.authenticator.authenticate(kept["token"], NOW + 1) is not None


async def test_an_unknown_share_is_not_found(store: SqliteStore) -> None:
    with pytest.raises(NotFoundError):
        async with asyncio.timeout(5):
            await shares_on(store).get("shr_nope")
