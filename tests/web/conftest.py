"""Fixtures for the browser tests: one ``runcast serve`` process and one headless
Chromium per module, and pages that fail their test on any console error (a violation of
the page's Content-Security-Policy included).

Chromium is the Debian package (``/usr/bin/chromium``, or ``RUNCAST_CHROMIUM``); the
browser that Playwright downloads is not used. Without it the tests skip, except in CI
(``CI=true``), where a missing browser is a failure.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Spawned, spawn_server

CHROMIUM = Path(os.environ.get("RUNCAST_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 10_000
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"
# The tokens of ``token_server`` (PROTOCOL.md §8: RUNCAST_TOKENS is ROLE:SECRET, ...).
ADMIN_TOKEN = "admin-secret-web-0123456789"
VIEWER_TOKEN = "viewer-secret-web-0123456789"
# Every CSP violation reaches the console as an error, whatever Chromium itself logs.
REPORT_CSP_VIOLATIONS = """
document.addEventListener("securitypolicyviolation", (e) => {
  console.error(`CSP violation: ${e.violatedDirective} blocked ${e.blockedURI || "inline"}`
    + ` at ${e.sourceFile || "?"}:${e.lineNumber}`);
});
"""


def _stop(spawned: Spawned) -> None:
    if spawned.process.poll() is None:
        spawned.process.terminate()
    try:
        spawned.wait(timeout_s=10)
    except Exception:
        spawned.process.kill()
        spawned.wait(timeout_s=10)
    if spawned.process.stdout is not None:
        spawned.process.stdout.close()


@pytest.fixture(scope="module")
def web_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Spawned]:
    """A ``runcast serve`` process on a fresh SQLite file, serving ``static/``."""
    spawned = spawn_server(tmp_path_factory.mktemp("web") / "runcast.db")
    try:
        yield spawned
    finally:
        _stop(spawned)


@pytest.fixture(scope="module")
def token_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Spawned]:
    """A ``runcast serve`` process in token mode: ``ADMIN_TOKEN`` (admin) and
    ``VIEWER_TOKEN`` (viewer)."""
    tokens = f"admin:{ADMIN_TOKEN},viewer:{VIEWER_TOKEN}"
    spawned = spawn_server(
        tmp_path_factory.mktemp("web-token") / "runcast.db", env={"RUNCAST_TOKENS": tokens}
    )
    try:
        yield spawned
    finally:
        _stop(spawned)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    # A missing browser fails the tests, never skips them: install Debian's chromium
    # package (.ci/run does when it is missing).
    assert CHROMIUM.exists(), f"{CHROMIUM} is missing: apt-get install -y chromium"
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=TIMEOUT_MS)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@dataclass
class Tab:
    """A page in its own browser context (so it can go offline alone), with the errors
    its console reported."""

    page: Any
    context: Any
    errors: list[str] = field(default_factory=list)


@pytest.fixture
def open_tab(browser: Any, web_server: Spawned) -> Iterator[Callable[..., Tab]]:
    """``open_tab(path="/", allow=(regex, ...), base=None)`` opens the page at ``path``
    (of ``base``, by default the module's server) in a new context. At teardown, any
    console error or uncaught exception not matched by one of the ``allow`` patterns
    fails the test."""
    tabs: list[tuple[Tab, tuple[str, ...]]] = []

    def open_(
        path: str = "/", *, allow: tuple[str, ...] = (), width: int = 1280, base: str | None = None
    ) -> Tab:
        context = browser.new_context(viewport={"width": width, "height": 900})
        context.set_default_timeout(TIMEOUT_MS)
        context.add_init_script(REPORT_CSP_VIOLATIONS)
        page = context.new_page()
        tab = Tab(page, context)
        page.on(
            "console",
            lambda message: (
                tab.errors.append(f"console: {message.text}") if message.type == "error" else None
            ),
        )
        page.on("pageerror", lambda error: tab.errors.append(f"uncaught: {error}"))
        tabs.append((tab, allow))
        page.goto((base or web_server.http_url) + path)
        return tab

    yield open_
    problems: list[str] = []
    for tab, allow in tabs:
        problems += [e for e in tab.errors if not any(re.search(p, e) for p in allow)]
        tab.context.close()
    assert not problems, "the page reported errors:\n" + "\n".join(problems)
