"""app/access/tokens.py: server tokens from the environment and a file, share tokens
signed and checked, and the Authenticator that turns either into a Principal."""

from __future__ import annotations

import pytest

from app.access.policy import OPEN, Role, Scope
from app.access.tokens import (
    Authenticator,
    ServerToken,
    ShareGrant,
    _b64,
    _unb64,
    parse_server_tokens,
)

VIEWER = "viewer-secret-0123456789"
OPERATOR = "operator-secret-0123456789"
ADMIN = "admin-secret-0123456789"
SECRET = b"k" * 32
NOW = 1_000_000.0


# -- parse_server_tokens -----------------------------------------------------------------


def test_tokens_from_the_environment_and_a_file() -> None:
    file_text = f"""
# a comment, then a blank line

admin {ADMIN}
   # an indented comment
operator    {OPERATOR}
"""
    tokens = parse_server_tokens([f"viewer:{VIEWER}", f" Admin:{ADMIN}x "], file_text)
    assert tokens == [
        ServerToken(Role.VIEWER, VIEWER),
        ServerToken(Role.ADMIN, ADMIN + "x"),
        ServerToken(Role.ADMIN, ADMIN),
        ServerToken(Role.OPERATOR, OPERATOR),
    ]


def test_no_tokens_at_all() -> None:
    assert parse_server_tokens([], None) == []
    assert parse_server_tokens([], "# only a comment\n\n") == []


def test_a_tab_separates_role_and_secret_in_the_file() -> None:
    assert parse_server_tokens([], f"admin\t{ADMIN}\n") == [ServerToken(Role.ADMIN, ADMIN)]


SECRETISH = "S3cr3t-do-not-print-0123456789"


@pytest.mark.parametrize(
    ("env_items", "file_text", "place", "why"),
    [
        ([f"superuser:{SECRETISH}"], None, "RUNCAST_TOKENS entry 1", "not a role"),
        ([f"viewer:{VIEWER}", f"root:{SECRETISH}"], None, "RUNCAST_TOKENS entry 2", "not a role"),
        ([SECRETISH], None, "RUNCAST_TOKENS entry 1", "role"),  # no ROLE: at all
        (["viewer:short"], None, "RUNCAST_TOKENS entry 1", "16 characters"),
        (["viewer:"], None, "RUNCAST_TOKENS entry 1", "16 characters"),
        ([f"viewer:{SECRETISH}/é"], None, "RUNCAST_TOKENS entry 1", "letters, digits"),
        ([f"viewer:{SECRETISH}:x"], None, "RUNCAST_TOKENS entry 1", "letters, digits"),
        ([], f"# c\n\nwizard {SECRETISH}\n", "token file line 3", "not a role"),
        ([], f"{SECRETISH}\n", "token file line 1", "role"),  # the role forgotten
        ([], f"{SECRETISH} viewer\n", "token file line 1", "role"),  # the wrong way round
        ([], f"admin {SECRETISH} # note\n", "token file line 1", "letters, digits"),
        ([], f"admin {ADMIN}\nviewer tiny\n", "token file line 2", "16 characters"),
        ([], f'admin {SECRETISH}"<>\n', "token file line 1", "letters, digits"),
        # A secret shaped like a share token could never be matched as a server token.
        ([f"admin:rs1.{SECRETISH}"], None, "RUNCAST_TOKENS entry 1", "rs1."),
    ],
)
def test_a_bad_entry_is_named_by_its_place_never_by_its_secret(
    env_items: list[str], file_text: str | None, place: str, why: str
) -> None:
    with pytest.raises(ValueError) as caught:
        parse_server_tokens(env_items, file_text)
    message = str(caught.value)
    assert message.startswith(f"{place}: "), message
    assert why in message, message
    assert SECRETISH not in message
    assert "S3cr3t" not in message.replace(SECRETISH, "")
    assert "short" not in message and "tiny" not in message


def test_a_fingerprint_names_a_token_without_giving_it_away() -> None:
    token = ServerToken(Role.ADMIN, ADMIN)
    assert token.fingerprint.startswith("token:")
    assert ADMIN not in token.fingerprint
    assert token.fingerprint == ServerToken(Role.VIEWER, ADMIN).fingerprint
    assert token.fingerprint != ServerToken(Role.ADMIN, ADMIN + "x").fingerprint


# -- Authenticator: server tokens --------------------------------------------------------


def authenticator(revoked: tuple[str, ...] = ()) -> Authenticator:
    tokens = parse_server_tokens(
        [f"viewer:{VIEWER}", f"operator:{OPERATOR}", f"admin:{ADMIN}"], None
    )
    return Authenticator(tokens, SECRET, revoked)


def test_open_mode_is_everyone_as_admin() -> None:
    auth = Authenticator([], SECRET)
    assert auth.open_mode
    for token in (None, "", "anything", ADMIN):
        assert auth.authenticate(token, NOW) is OPEN
    assert OPEN.role is Role.ADMIN and OPEN.scope is None


def test_each_server_token_is_found_with_its_role() -> None:
    auth = authenticator()
    assert not auth.open_mode
    for secret, role in ((VIEWER, Role.VIEWER), (OPERATOR, Role.OPERATOR), (ADMIN, Role.ADMIN)):
        principal = auth.authenticate(secret, NOW)
        assert principal is not None
        assert principal.role is role
        assert principal.scope is None and principal.share_id is None
        assert principal.id == ServerToken(role, secret).fingerprint
        assert secret not in principal.id
        assert auth.still_valid(principal, NOW + 10**9)


@pytest.mark.parametrize(
    "token",
    [None, "", "nope", VIEWER[:-1], VIEWER + "x", " " + VIEWER, VIEWER.upper(), "rs1.", "rs1.a.b"],
)
def test_an_unknown_token_is_nobody(token: str | None) -> None:
    assert authenticator().authenticate(token, NOW) is None


# -- Authenticator: share tokens ---------------------------------------------------------


def grant(**overrides: object) -> ShareGrant:
    fields: dict[str, object] = {
        "share_id": "shr_1",
        "scope": Scope("run", "run_1"),
        "role": Role.OPERATOR,
        "expires_at": NOW + 60,
    }
    fields.update(overrides)
    return ShareGrant(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "made",
    [
        grant(),
        grant(scope=Scope("thread", "thr_1"), role=Role.VIEWER),
        grant(share_id="shr_2", expires_at=NOW + 0.5),
        grant(share_id="shr_3", via=("shr_1", "shr_2")),
    ],
)
def test_a_share_token_round_trips(made: ShareGrant) -> None:
    auth = authenticator()
    token = auth.sign(made)
    assert token.startswith("rs1.")
    assert auth.verify(token) == made
    principal = auth.authenticate(token, NOW)
    assert principal is not None
    assert principal.id == f"share:{made.share_id}"
    assert (principal.role, principal.scope) == (made.role, made.scope)
    assert (principal.share_id, principal.expires_at) == (made.share_id, made.expires_at)
    assert principal.via == made.via
    assert auth.still_valid(principal, NOW)


def test_a_share_token_works_in_open_mode_as_everything_does() -> None:
    auth = Authenticator([], SECRET)
    assert auth.authenticate(auth.sign(grant()), NOW) is OPEN


def flip(text: str, position: int) -> str:
    return text[:position] + ("A" if text[position] != "A" else "B") + text[position + 1 :]


def test_a_tampered_token_is_refused() -> None:
    auth = authenticator()
    token = auth.sign(grant())
    body, signature = token.removeprefix("rs1.").split(".")
    tampered = [
        "rs1." + flip(body, 0) + "." + signature,
        "rs1." + flip(body, len(body) // 2) + "." + signature,
        "rs1." + body + "." + flip(signature, 0),
        "rs1." + body + "." + signature[:-1],
        "rs1." + body + "." + signature + "x",
        "rs1." + body + "." + signature + ".x",
        "rs1." + body,
        "rs1." + body + ".",
        "rs2." + body + "." + signature,
        token + " ",
    ]
    for token_ in tampered:
        assert auth.authenticate(token_, NOW) is None, token_
    # A payload rewritten to reach further (admin, another run) fails its signature.
    forged = _b64(_unb64(body).replace(b'"operator"', b'"admin"'))
    assert forged != body
    assert auth.authenticate("rs1." + forged + "." + signature, NOW) is None


@pytest.mark.parametrize(
    "payload",
    [
        b"not json",
        b"[1, 2]",
        b'"text"',
        b'{"s": "shr_1", "k": "server", "i": "x", "r": "viewer", "e": 1e12}',
        b'{"s": "shr_1", "k": "run", "i": "x", "r": "root", "e": 1e12}',
        b'{"s": "shr_1", "k": "run", "i": "x", "r": "viewer", "e": "soon"}',
        b'{"s": "shr_1", "k": "run", "i": "x", "r": "viewer"}',
        b'{"s": "shr_1", "k": "run", "i": "x", "r": null, "e": 1e12}',
        b'{"s": "shr_1", "k": "run", "i": "x", "r": "viewer", "e": 1e12, "p": "shr_0"}',
    ],
)
def test_a_well_signed_but_malformed_payload_is_refused(payload: bytes) -> None:
    auth = authenticator()
    body = _b64(payload)
    token = f"rs1.{body}.{auth._signature(body)}"
    assert auth.verify(token) is None
    assert auth.authenticate(token, NOW) is None


def test_a_token_signed_with_another_secret_is_refused() -> None:
    other = Authenticator([ServerToken(Role.ADMIN, ADMIN)], b"z" * 32)
    token = other.sign(grant())
    assert other.authenticate(token, NOW) is not None
    assert authenticator().verify(token) is None
    assert authenticator().authenticate(token, NOW) is None


def test_an_expired_token_is_refused() -> None:
    auth = authenticator()
    token = auth.sign(grant(expires_at=NOW + 60))
    principal = auth.authenticate(token, NOW + 59.999)
    assert principal is not None
    assert auth.still_valid(principal, NOW + 59.999)
    assert not auth.still_valid(principal, NOW + 60)
    assert auth.authenticate(token, NOW + 60) is None
    assert auth.authenticate(token, NOW + 10**6) is None


def test_a_revoked_token_is_refused_from_then_on() -> None:
    auth = authenticator()
    token = auth.sign(grant())
    principal = auth.authenticate(token, NOW)
    assert principal is not None
    other = auth.sign(grant(share_id="shr_other"))
    auth.revoke("shr_1")
    assert auth.authenticate(token, NOW) is None
    assert not auth.still_valid(principal, NOW)
    assert auth.authenticate(other, NOW) is not None
    # Revocations handed over at start (read from the share table) count as well.
    restarted = authenticator(revoked=("shr_1",))
    assert restarted.authenticate(token, NOW) is None
    assert restarted.authenticate(other, NOW) is not None


def test_a_share_made_with_a_share_is_revoked_with_it() -> None:
    auth = authenticator()
    child = auth.sign(grant(share_id="shr_child", via=("shr_root", "shr_mid")))
    principal = auth.authenticate(child, NOW)
    assert principal is not None
    auth.revoke("shr_root")
    assert auth.authenticate(child, NOW) is None
    assert not auth.still_valid(principal, NOW)
    assert authenticator(revoked=("shr_mid",)).authenticate(child, NOW) is None
    assert authenticator(revoked=("shr_other",)).authenticate(child, NOW) is not None
