"""The page against a server in token mode (PROTOCOL.md §8): the token form, share links
made by the page and opened in fresh browsers, read-only views, revocation, and the
page under the server's Content-Security-Policy.

Every tab here opens on ``token_server`` (the module's ``web_server`` is that server).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from playwright.sync_api import expect

from tests.conftest import Spawned
from tests.web.conftest import ADMIN_TOKEN, VIEWER_TOKEN, Tab
from tests.web.test_page import assert_whole, by_id, connected

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
# Chromium logs every HTTP answer >= 400 to a fetch as a console error.
REFUSED_401 = (r"Failed to load resource: the server responded with a status of 401",)
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)


@pytest.fixture(scope="module")
def web_server(token_server: Spawned) -> Iterator[Spawned]:
    """``open_tab`` opens its tabs on the server in token mode."""
    yield token_server


def start_run(server: Spawned, agent: str, input: dict[str, Any]) -> str:
    response = httpx.post(
        f"{server.http_url}/api/runs", json={"agent": agent, "input": input}, headers=ADMIN
    )
    assert response.status_code == 201, response.text
    return str(response.json()["run_id"])


def snapshot(server: Spawned, run_id: str) -> dict[str, Any]:
    response = httpx.get(f"{server.http_url}/api/runs/{run_id}/snapshot", headers=ADMIN)
    assert response.status_code == 200, response.text
    return dict(response.json())


def share(server: Spawned, run_id: str) -> dict[str, Any]:
    response = httpx.post(
        f"{server.http_url}/api/runs/{run_id}/share",
        json={"role": "viewer", "expires_in": 3600},
        headers=ADMIN,
    )
    assert response.status_code == 201, response.text
    return dict(response.json())


def sign_in(tab: Tab, token: str) -> None:
    """Enter ``token`` in the page's token form, as a person would."""
    expect(by_id(tab, "auth")).to_be_visible()
    by_id(tab, "token-input").fill(token)
    by_id(tab, "token-submit").click()
    expect(by_id(tab, "auth")).to_be_hidden()
    connected(tab)


def held_token(tab: Tab) -> str | None:
    token: str | None = tab.page.evaluate("sessionStorage.getItem('runcast.token')")
    return token


def path_of(url: str) -> str:
    parts = urlsplit(url)
    return parts.path + ("#" + parts.fragment if parts.fragment else "")


def test_health_says_token_mode(token_server: Spawned) -> None:
    health = httpx.get(f"{token_server.http_url}/api/health").json()
    assert health["ok"] is True and health["auth"] == "token"
    refused = httpx.get(f"{token_server.http_url}/api/runs")
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthorized"


def test_the_page_asks_for_a_token_and_works_once_it_is_entered(
    open_tab: Any, token_server: Spawned
) -> None:
    a = open_tab("/", allow=REFUSED_401)
    expect(by_id(a, "auth")).to_be_visible()
    expect(by_id(a, "token-input")).to_be_focused()
    expect(by_id(a, "start-form")).to_be_hidden()  # nothing else until a token is taken
    expect(by_id(a, "conn")).to_have_attribute("data-state", "idle")
    expect(a.page.get_by_label("Access token", exact=True)).to_be_visible()

    by_id(a, "token-input").fill("not-a-token-of-this-server")
    by_id(a, "token-input").press("Enter")
    expect(by_id(a, "token-error")).to_contain_text("does not take this token")
    expect(by_id(a, "token-input")).to_have_attribute("aria-invalid", "true")
    assert held_token(a) is None

    sign_in(a, ADMIN_TOKEN)
    assert held_token(a) == ADMIN_TOKEN
    expect(by_id(a, "forget-token")).to_be_visible()
    # Start a run from the form: over the socket (token as subprotocol) and HTTP (header).
    by_id(a, "agent-select").select_option("demo")
    a.page.locator("#agent-input [name=tokens]").fill("12")
    a.page.locator("#agent-input [name=speed]").fill("200")
    by_id(a, "start").click()
    expect(a.page).to_have_url(re.compile(r"#/runs/run_[\w-]+$"))
    run_id = a.page.url.rsplit("/", 1)[1]
    expect(by_id(a, "run-status")).to_have_text("completed")
    assert_whole(a, run_id, snapshot(token_server, run_id))
    expect(by_id(a, "recent-runs").locator(f"[data-run-id={run_id}]")).to_be_visible()

    # The tab keeps its token across a reload, and forgets it when asked.
    a.page.reload()
    connected(a)
    expect(by_id(a, "run-status")).to_have_text("completed")
    by_id(a, "forget-token").click()
    expect(by_id(a, "auth")).to_be_visible()
    expect(by_id(a, "auth-why")).to_contain_text("forgotten")
    expect(by_id(a, "run-view")).to_have_count(0)
    assert held_token(a) is None
    a.page.reload()
    expect(by_id(a, "auth")).to_be_visible()


def test_a_share_link_opens_the_run_read_only_and_leaves_the_address_bar(
    open_tab: Any, token_server: Spawned
) -> None:
    run_id = start_run(token_server, "ask", {"prompt": "Your name?"})
    link = share(token_server, run_id)
    assert link["url"] == f"/#/runs/{run_id}?token={link['token']}"

    b = open_tab(link["url"])
    expect(b.page).to_have_url(f"{token_server.http_url}/#/runs/{run_id}")
    assert "token" not in b.page.evaluate("location.href")
    expect(by_id(b, "auth")).to_be_hidden()  # no form: the link carried the token
    connected(b)
    expect(by_id(b, "run-view")).to_have_attribute("data-run-id", run_id)
    expect(by_id(b, "run-status")).to_have_text("requires action")
    # Read-only: no Stop, no answer form, no Share, no start form.
    expect(by_id(b, "read-only")).to_be_visible()
    expect(by_id(b, "stop")).to_be_hidden()
    expect(by_id(b, "share")).to_be_hidden()
    expect(by_id(b, "input-form")).to_have_count(0)
    expect(by_id(b, "input-read-only")).to_contain_text("Your name?")
    expect(by_id(b, "start-form")).to_be_hidden()
    # ... and the server says the same to this token.
    code = b.page.evaluate(
        "(id) => window.runcast.client.stop(id).then(() => 'stopped', (e) => e.code)", run_id
    )
    assert code == "forbidden"
    assert held_token(b) == link["token"]  # in this tab's session, out of the address bar

    # The run goes on for the link's holder: answered elsewhere, it ends here too.
    request_id = snapshot(token_server, run_id)["state"]["pending_input"]["request_id"]
    answered = httpx.post(
        f"{token_server.http_url}/api/runs/{run_id}/respond",
        json={"request_id": request_id, "value": "Ada"},
        headers=ADMIN,
    )
    assert answered.status_code == 200, answered.text
    expect(by_id(b, "run-status")).to_have_text("completed")
    expect(by_id(b, "run-text")).to_have_text("You said: Ada")
    assert_whole(b, run_id, snapshot(token_server, run_id))


def test_the_share_button_makes_a_link_that_a_fresh_browser_opens(
    open_tab: Any, token_server: Spawned
) -> None:
    run_id = start_run(token_server, "demo", {"tokens": 4000, "speed": 40})  # stopped at the end
    a = open_tab(f"/#/runs/{run_id}")
    sign_in(a, ADMIN_TOKEN)
    expect(by_id(a, "run-view")).to_have_attribute("data-run-id", run_id)
    expect(by_id(a, "stop")).to_be_visible()
    by_id(a, "share").click()
    url = by_id(a, "share-url")
    expect(url).to_have_value(
        re.compile(re.escape(f"{token_server.http_url}/#/runs/{run_id}?token=") + r"\S+")
    )
    link = url.input_value()
    a.context.grant_permissions(["clipboard-read", "clipboard-write"])
    by_id(a, "share-copy").click()
    expect(by_id(a, "share-status")).to_have_text("Copied.")
    assert a.page.evaluate("navigator.clipboard.readText()") == link

    # A fresh context: no cookie, no storage, only the link.
    b = open_tab(path_of(link))
    expect(b.page).to_have_url(f"{token_server.http_url}/#/runs/{run_id}")
    connected(b)
    expect(by_id(b, "run-view")).to_have_attribute("data-run-id", run_id)
    expect(by_id(b, "run-text")).not_to_be_empty()
    expect(by_id(b, "read-only")).to_be_visible()
    for tab in (a, b):
        expect(by_id(tab, "watchers")).to_have_text("2 watching")

    # Revoked, the link's socket is closed (4401) within 5 s and the page asks for a token.
    by_id(a, "share-revoke").click()
    expect(by_id(a, "share-status")).to_contain_text("Revoked")
    expect(by_id(b, "auth")).to_be_visible(timeout=8000)
    expect(by_id(b, "auth-why")).to_contain_text("expired or was revoked")
    expect(by_id(b, "conn")).to_have_attribute("data-state", "unauthorized")
    assert held_token(b) is None
    by_id(a, "stop").click()
    expect(by_id(a, "run-status")).to_have_text("stopped")


def test_every_view_runs_under_the_content_security_policy(
    open_tab: Any, token_server: Spawned
) -> None:
    page_response = httpx.get(f"{token_server.http_url}/")
    assert page_response.status_code == 200  # the page itself needs no token
    # The contract's directives, each as it says (the server may add stricter ones).
    directives = dict(
        d.strip().split(" ", 1) for d in page_response.headers["content-security-policy"].split(";")
    )
    for directive in CSP.split(";"):
        name, value = directive.strip().split(" ", 1)
        assert directives.get(name) == value, name
    for asset in ("/app.js", "/runcast.js", "/access.js", "/style.css"):
        assert httpx.get(f"{token_server.http_url}{asset}").status_code == 200, asset

    # The token form, the home page, a run with its share panel and replay, a conversation:
    # a violation anywhere is a console error, and console errors fail the test.
    run_id = start_run(token_server, "demo", {"tokens": 8, "speed": 400})
    assert read_to_the_end(token_server, run_id) > 0
    a = open_tab("/")
    sign_in(a, ADMIN_TOKEN)
    a.page.goto(f"{token_server.http_url}/#/runs/{run_id}")
    expect(by_id(a, "run-status")).to_have_text("completed")
    by_id(a, "share").click()
    expect(by_id(a, "share-url")).to_be_visible()
    by_id(a, "tt-slider").fill("3")
    expect(by_id(a, "tt-panel")).to_have_attribute("data-at", "3")
    a.page.goto(f"{token_server.http_url}/#/threads")
    by_id(a, "new-thread").click()
    expect(a.page).to_have_url(re.compile(r"#/threads/thr_[\w-]+$"))
    by_id(a, "thread-agent").select_option("echo")
    by_id(a, "composer").fill("under a strict policy")
    by_id(a, "composer").press("Enter")
    turns = by_id(a, "turns").get_by_test_id("turn")
    expect(turns.nth(1).get_by_test_id("turn-content")).to_have_text("under a strict policy")
    b = open_tab(f"/#/runs/{run_id}?token={VIEWER_TOKEN}")  # a server token in a link works too
    expect(by_id(b, "run-status")).to_have_text("completed")
    assert a.errors == [] and b.errors == []


def read_to_the_end(server: Spawned, run_id: str) -> int:
    """The run's last index once it ended (its event stream, read to the end)."""
    last = 0
    with httpx.stream(
        "GET",
        f"{server.http_url}/api/runs/{run_id}/events",
        headers={"Accept": "text/event-stream", **ADMIN},
        timeout=10,
    ) as stream:
        for line in stream.iter_lines():
            if line.startswith("id:"):
                last = int(line[3:])
    return last
