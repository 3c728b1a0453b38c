"""The documentation holds together and matches the code.

- Every relative link in README.md and docs/*.md names a file of the repository (and,
  with an anchor, a heading of that file); no link leads out of the repository.
- Every ```json block is valid JSON. An object with ``op`` is a client frame and must
  parse with ``app.transport.wire.parse_op``; an object with ``type`` (and no ``i``) is a
  server frame and must fit the model of a frame the server sends
  (``app.transport.frames``); events, runs, threads, turns, snapshots and errors, alone
  or inside those, must fit their models.
- docs/protocol.md has an example of every op and of every server frame.
"""

from __future__ import annotations

import functools
import json
import re
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
from pydantic import BaseModel, ValidationError

from app.transport import frames, wire

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PROTOCOL = ROOT / "docs" / "protocol.md"

_FENCE = re.compile(r"^\s*(```|~~~)(.*)$")
_CODE_SPAN = re.compile(r"(`+)(.+?)\1")
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int
    info: str
    text: str

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def _blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a Markdown file."""
    blocks: list[Block] = []
    fence: str | None = None
    info, start = "", 0
    body: list[str] = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        match = _FENCE.match(line)
        if fence is None and match:
            fence, info, start, body = match.group(1), match.group(2).strip(), number, []
        elif fence is not None and match and line.strip() == fence:
            blocks.append(Block(path, start, info, "\n".join(body)))
            fence = None
        elif fence is not None:
            body.append(line)
    assert fence is None, f"{path.relative_to(ROOT)}:{start}: a code block is never closed"
    return blocks


def _prose(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) of a Markdown file outside its fenced code blocks, with inline
    code spans reduced to plain words (a link's text may be code; a link in code is not
    a link)."""
    fence: str | None = None
    for number, line in enumerate(path.read_text().splitlines(), 1):
        match = _FENCE.match(line)
        if fence is None and match:
            fence = match.group(1)
        elif fence is not None:
            if match and line.strip() == fence:
                fence = None
        else:
            yield number, _CODE_SPAN.sub(lambda m: re.sub(r"[\[\]()]", "", m.group(2)), line)


def _slug(heading: str) -> str:
    """The anchor GitHub gives a heading: its text, without markup, lower case, with
    every character that is not a word character, a space or a hyphen dropped, and
    spaces made hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = text.replace("`", "").replace("*", "")
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


@functools.cache
def _anchors(path: Path) -> frozenset[str]:
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    for _, line in _prose(path):
        match = _HEADING.match(line)
        if match is None:
            continue
        slug = _slug(match.group(2))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return frozenset(anchors)


def _links(path: Path) -> Iterator[tuple[int, str]]:
    for number, line in _prose(path):
        for match in _LINK.finditer(line):
            yield number, match.group(1)


@pytest.mark.parametrize("path", DOCS, ids=[str(p.relative_to(ROOT)) for p in DOCS])
def test_every_relative_link_resolves_inside_the_repository(path: Path) -> None:
    problems = []
    for number, target in _links(path):
        where = f"{path.relative_to(ROOT)}:{number}: {target}"
        if _SCHEME.match(target):
            continue  # a URL: not a file of the repository
        parts = urlsplit(target)
        name, anchor = unquote(parts.path), unquote(parts.fragment)
        if name.startswith("/"):
            resolved = (ROOT / name.lstrip("/")).resolve()
        else:
            resolved = (path.parent / name).resolve() if name else path
        if not resolved.is_relative_to(ROOT):
            problems.append(f"{where}: leads out of the repository")
            continue
        if not resolved.exists():
            problems.append(f"{where}: no such file")
            continue
        if anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            problems.append(f"{where}: no heading #{anchor} in {resolved.relative_to(ROOT)}")
    assert not problems, "\n".join(problems)


def test_the_readme_links_to_the_docs() -> None:
    targets = {target for _, target in _links(ROOT / "README.md")}
    assert {"docs/protocol.md", "docs/operations.md"} <= targets


# -- JSON examples ----------------------------------------------------------------------

# Keys whose value is a payload of the protocol (an agent's data, a state, an input):
# anything may be in it, so it is not read as runs, threads or errors.
_PAYLOADS = frozenset(
    {"data", "state", "input", "metadata", "value", "args", "output", "input_schema", "schema"}
)


def _frame_types(model: type[BaseModel]) -> tuple[Any, ...]:
    return typing.get_args(model.model_fields["type"].annotation)


def _check_client_frame(value: dict[str, Any], seen: set[str]) -> None:
    wire.parse_op(json.dumps(value))
    seen.add(f"op {value['op']}")


def _check_server_frame(value: dict[str, Any], seen: set[str]) -> None:
    models = [m for m in frames.SERVER_FRAMES if value["type"] in _frame_types(m)]
    assert models, f"the server sends no frame of type {value['type']!r}"
    errors = []
    for model in models:
        try:
            model.model_validate(value)
        except ValidationError as exc:
            errors.append(exc)
        else:
            seen.add(model.__name__)
            break
    else:
        raise errors[-1]
    _check_parts(value)


def _check_parts(value: Any) -> None:
    """Runs, threads, turns, events and errors inside ``value`` fit their models."""
    if isinstance(value, list):
        for item in value:
            _check_parts(item)
        return
    if not isinstance(value, dict):
        return
    by_key: dict[str, type[BaseModel]] = {
        "run": frames.RunInfo,
        "runs": frames.RunInfo,
        "thread": frames.ThreadInfo,
        "threads": frames.ThreadInfo,
        "turns": frames.Turn,
        "events": frames.Event,
        "error": frames.Error,
    }
    for key, item in value.items():
        if key in _PAYLOADS:
            continue
        model = by_key.get(key)
        if model is not None:
            for part in item if isinstance(item, list) else [item]:
                if isinstance(part, dict):
                    model.model_validate(part)
        _check_parts(item)


def _check_alone(value: dict[str, Any]) -> None:
    """An object that is not a frame: an event, a RunInfo, a ThreadInfo, a turn or a
    snapshot when it has their keys; anything else (a body, an answer) for its parts."""
    keys = set(value)
    shapes: list[tuple[set[str], type[BaseModel]]] = [
        ({"i", "type", "data", "ts"}, frames.Event),
        ({"run_id", "agent", "watchers"}, frames.RunInfo),
        ({"thread_id", "revision", "head"}, frames.ThreadInfo),
        ({"turn_id", "role", "parent_id"}, frames.Turn),
        ({"run_id", "index", "epoch", "state"}, frames.Snapshot),
    ]
    for needed, model in shapes:
        if needed <= keys:
            model.model_validate(value)
    _check_parts(value)


def _check_example(value: Any, seen: set[str]) -> None:
    """Check one example (a list: each of its items); ``seen`` gets ``op NAME`` for a
    client frame and the model's name for a server frame."""
    if isinstance(value, list):
        for item in value:
            _check_example(item, seen)
    elif isinstance(value, dict):
        if "op" in value:
            _check_client_frame(value, seen)
        elif "type" in value and "i" not in value:
            _check_server_frame(value, seen)
        else:
            _check_alone(value)


JSON_BLOCKS = [block for path in DOCS for block in _blocks(path) if block.info == "json"]


@pytest.mark.parametrize("block", JSON_BLOCKS, ids=[block.where for block in JSON_BLOCKS])
def test_each_json_example_is_valid_and_fits_the_code(block: Block) -> None:
    try:
        value = json.loads(block.text)
    except ValueError as exc:
        pytest.fail(f"{block.where}: not valid JSON: {exc}")
    _check_example(value, set())


def test_the_protocol_has_an_example_of_every_op_and_every_server_frame() -> None:
    seen: set[str] = set()
    for block in _blocks(PROTOCOL):
        if block.info == "json":
            _check_example(json.loads(block.text), seen)
    every = {f"op {name}" for name in wire.OPS} | {m.__name__ for m in frames.SERVER_FRAMES}
    assert not every - seen, f"docs/protocol.md has no example of {sorted(every - seen)}"


def test_the_slug_of_a_heading_is_githubs() -> None:
    assert _slug("1. Runs, events and statuses") == "1-runs-events-and-statuses"
    assert _slug("watch_thread and unwatch_thread") == "watch_thread-and-unwatch_thread"
    assert _slug("Behind a proxy with TLS (`nginx`)") == "behind-a-proxy-with-tls-nginx"
