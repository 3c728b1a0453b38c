"""app/core/ids.py: identifiers are unique, URL-safe and carry >= 96 random bits."""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Callable

import pytest

from app.core import ids

GENERATORS: list[tuple[str, Callable[[], str]]] = [
    ("run", ids.new_run_id),
    ("thr", ids.new_thread_id),
    ("turn", ids.new_turn_id),
    ("req", ids.new_request_id),
    ("conn", ids.new_connection_id),
]
SAMPLES = 1000
# base64url carries 6 bits per character.
BITS_PER_CHAR = 6
URL_SAFE = re.compile(r"[A-Za-z0-9_-]+")


def _random_part(value: str, prefix: str) -> str:
    head, sep, tail = value.partition("_")
    assert (head, sep) == (prefix, "_"), value
    return tail


@pytest.mark.parametrize(("prefix", "new"), GENERATORS, ids=[p for p, _ in GENERATORS])
def test_ids_are_unique_and_url_safe(prefix: str, new: Callable[[], str]) -> None:
    values = [new() for _ in range(SAMPLES)]
    assert len(set(values)) == SAMPLES
    for value in values:
        assert URL_SAFE.fullmatch(value), value
        assert urllib.parse.quote(value, safe="") == value
        _random_part(value, prefix)


@pytest.mark.parametrize(("prefix", "new"), GENERATORS, ids=[p for p, _ in GENERATORS])
def test_ids_carry_at_least_96_random_bits(prefix: str, new: Callable[[], str]) -> None:
    parts = [_random_part(new(), prefix) for _ in range(SAMPLES)]
    length = len(parts[0])
    assert all(len(part) == length for part in parts)
    assert length * BITS_PER_CHAR >= 96
    # A position that carries 6 random bits shows (nearly) all 64 characters in 1000
    # draws; a counter, a clock or a short random part would not. At least 16 positions
    # (16 x 6 = 96 bits) must look uniformly random.
    random_positions = sum(
        1 for position in range(length) if len({part[position] for part in parts}) >= 56
    )
    assert random_positions * BITS_PER_CHAR >= 96, random_positions


def test_ids_of_different_kinds_do_not_collide() -> None:
    values = [new() for _, new in GENERATORS for _ in range(100)]
    assert len(set(values)) == len(values)


def test_epochs_are_unique_short_hex() -> None:
    epochs = [ids.new_epoch() for _ in range(SAMPLES)]
    assert len(set(epochs)) == SAMPLES
    for epoch in epochs:
        assert re.fullmatch(r"[0-9a-f]{16}", epoch), epoch
    # 16 hex digits: every position takes all 16 values over 1000 draws.
    assert all(len({epoch[k] for epoch in epochs}) == 16 for k in range(16))
