"""Unguessable identifiers (PROTOCOL.md: at least 96 random bits, safe in URLs)."""

from __future__ import annotations

import secrets


def _new(prefix: str) -> str:
    # 16 bytes = 128 random bits; token_urlsafe uses only [A-Za-z0-9_-].
    return f"{prefix}_{secrets.token_urlsafe(16)}"


def new_run_id() -> str:
    return _new("run")


def new_thread_id() -> str:
    return _new("thr")


def new_turn_id() -> str:
    return _new("turn")


def new_request_id() -> str:
    return _new("req")


def new_connection_id() -> str:
    return _new("conn")


def new_epoch() -> str:
    """A fresh epoch: opaque, short, and different from every earlier one with certainty
    for practical purposes (64 random bits)."""
    return secrets.token_hex(8)


def new_share_id() -> str:
    return _new("shr")
