"""The page at ``/`` in a real headless Chromium against a real ``runcast serve``.

Each test drives one or more tabs (each in its own browser context) and compares what
they show with what the server says over HTTP: the run's snapshot is the reference.
Every wait is bounded: Playwright's ``expect`` polls up to its timeout, and waits on the
server read its Server-Sent Events stream under an HTTP timeout.
"""

from __future__ import annotations

import json
import re
import socket
import time
from typing import Any

import httpx
from playwright.sync_api import expect

from tests.conftest import Spawned
from tests.web.conftest import ARTIFACTS, Tab

# While a server is down, Chromium itself logs each refused WebSocket connection attempt.
CONNECTION_REFUSED = (r"WebSocket connection to .* failed: .*net::ERR_CONNECTION_REFUSED",)


def start_run(server: Spawned, agent: str, input: dict[str, Any]) -> str:
    response = httpx.post(f"{server.http_url}/api/runs", json={"agent": agent, "input": input})
    assert response.status_code == 201, response.text
    return str(response.json()["run_id"])


def snapshot(server: Spawned, run_id: str, at: int | None = None) -> dict[str, Any]:
    params = {} if at is None else {"at": at}
    response = httpx.get(f"{server.http_url}/api/runs/{run_id}/snapshot", params=params)
    assert response.status_code == 200, response.text
    return dict(response.json())


def wait_for_index(server: Spawned, run_id: str, index: int, timeout_s: float = 10) -> int:
    """Read the run's event stream until event ``index`` (or the run's end) has been
    appended; returns the last index read."""
    last = 0
    with httpx.stream(
        "GET",
        f"{server.http_url}/api/runs/{run_id}/events",
        headers={"Accept": "text/event-stream"},
        timeout=timeout_s,
    ) as stream:
        for line in stream.iter_lines():
            if line.startswith("id:"):
                last = int(line[3:])
                if last >= index:
                    break
    return last


def by_id(tab: Tab, testid: str) -> Any:
    return tab.page.get_by_test_id(testid)


def connected(tab: Tab) -> None:
    expect(by_id(tab, "conn")).to_have_attribute("data-state", "connected")


MODEL = """(id) => {
  const m = window.runcast.runs.models.get(id).model;
  return { cursor: m.cursor, from: m.from, delivered: m.delivered, gaps: m.gaps,
           tail: m.tail.map((e) => e.i), state: m.state };
}"""


def held(tab: Tab, run_id: str) -> dict[str, Any]:
    """What the page's model of ``run_id`` holds: its cursor (the last index folded),
    the snapshot index it opened from, how many events were delivered since (and how
    many out of order), the indexes of its tail of latest events, and its state."""
    model: dict[str, Any] = tab.page.evaluate(MODEL, run_id)
    return model


def cursor(tab: Tab, run_id: str) -> int:
    """The last index the page's client delivered for ``run_id``."""
    return int(held(tab, run_id)["cursor"])


def assert_whole(tab: Tab, run_id: str, snap: dict[str, Any]) -> None:
    """The page shows the run's final text, it got every event after the snapshot it
    opened from exactly once and in order, its tail of latest events ends at the last
    index, and its fold (runcast.js, on the server's snapshot) is the server's state."""
    assert by_id(tab, "run-text").text_content() == snap["state"]["message"]["content"]
    model = held(tab, run_id)
    assert model["cursor"] == snap["index"]
    assert model["gaps"] == 0
    assert model["delivered"] == model["cursor"] - model["from"]
    tail = model["tail"]
    assert tail == list(range(snap["index"] - len(tail) + 1, snap["index"] + 1))
    assert len(tail) <= 1000  # the page holds the latest events only
    assert model["state"] == snap["state"]


def test_two_pages_show_the_same_text_as_the_snapshot(open_tab: Any, web_server: Spawned) -> None:
    a = open_tab("/")
    connected(a)
    # Start from the form generated from the agent's input schema.
    a.page.get_by_test_id("agent-select").select_option("demo")
    a.page.locator("#agent-input [name=tokens]").fill("90")
    a.page.locator("#agent-input [name=speed]").fill("30")
    a.page.get_by_test_id("start").click()
    expect(a.page).to_have_url(re.compile(r"#/runs/run_[\w-]+$"))
    run_id = a.page.url.rsplit("/", 1)[1]

    b = open_tab(f"/#/runs/{run_id}", width=390)  # a phone-width second tab
    for tab in (a, b):
        expect(by_id(tab, "watchers")).to_have_text("2 watching")
    expect(by_id(a, "run-tools").get_by_test_id("tool-card")).to_contain_text("completed")
    expect(by_id(a, "run-text")).to_have_text(re.compile(r"\w+ \w+ \w+"))
    expect(a.page.get_by_test_id("recent-runs").locator(f"[data-run-id={run_id}]")).to_be_visible()
    ARTIFACTS.mkdir(exist_ok=True)
    a.page.screenshot(path=str(ARTIFACTS / "run-view.png"), full_page=True)

    for tab in (a, b):
        expect(by_id(tab, "run-status")).to_have_text("completed")
    snap = snapshot(web_server, run_id)
    assert snap["state"]["status"] == "completed"
    assert_whole(a, run_id, snap)
    assert_whole(b, run_id, snap)
    # The narrow page fits its window: nothing scrolls sideways.
    assert b.page.evaluate("document.documentElement.scrollWidth") <= 390


def test_stop_in_one_page_ends_the_run_in_the_other_within_a_second(
    open_tab: Any, web_server: Spawned
) -> None:
    run_id = start_run(web_server, "demo", {"tokens": 2000, "speed": 20})
    a = open_tab(f"/#/runs/{run_id}")
    b = open_tab(f"/#/runs/{run_id}")
    for tab in (a, b):
        expect(by_id(tab, "run-text")).not_to_be_empty()
        expect(by_id(tab, "run-status")).to_have_text("running")

    by_id(b, "stop").click()
    started = time.monotonic()
    expect(by_id(a, "run-status")).to_have_text("stopped", timeout=1000)
    assert time.monotonic() - started < 1.0
    expect(by_id(b, "run-status")).to_have_text("stopped")
    expect(by_id(b, "run-ending")).to_have_text("Stopped from this tab.")
    expect(by_id(a, "run-ending")).to_contain_text("Stopped from another connection")
    expect(by_id(a, "stop")).to_be_disabled()
    snap = snapshot(web_server, run_id)
    assert snap["state"]["status"] == "stopped"
    assert_whole(a, run_id, snap)


def test_a_page_that_goes_offline_resumes_without_a_gap_or_a_duplicate(
    open_tab: Any, web_server: Spawned
) -> None:
    run_id = start_run(web_server, "demo", {"tokens": 300, "speed": 50})
    a = open_tab(f"/#/runs/{run_id}")
    connected(a)
    expect(by_id(a, "run-text")).not_to_be_empty()
    connects = a.page.evaluate("window.runcast.client.stats.connects")

    a.context.set_offline(True)
    expect(by_id(a, "conn")).to_have_attribute("data-state", "offline")
    before = cursor(a, run_id)
    # The run goes on without the page: let it write 25 more events.
    assert wait_for_index(web_server, run_id, before + 25) >= before + 25
    assert cursor(a, run_id) == before  # the page really heard nothing meanwhile

    a.context.set_offline(False)
    connected(a)
    assert a.page.evaluate("window.runcast.client.stats.connects") == connects + 1
    expect(by_id(a, "run-status")).to_have_text("completed")
    snap = snapshot(web_server, run_id)
    assert_whole(a, run_id, snap)


def test_reloading_a_deep_link_resumes_the_run(open_tab: Any, web_server: Spawned) -> None:
    run_id = start_run(web_server, "demo", {"tokens": 300, "speed": 50})
    a = open_tab(f"/#/runs/{run_id}")
    expect(by_id(a, "run-text")).to_have_text(re.compile(r"\w+ \w+"))
    expect(by_id(a, "run-status")).to_have_text("running")

    a.page.reload()
    expect(a.page.get_by_test_id("run-view")).to_have_attribute("data-run-id", run_id)
    connected(a)
    expect(by_id(a, "run-status")).to_have_text("running")  # it resumed mid-run
    expect(by_id(a, "run-status")).to_have_text("completed")
    assert_whole(a, run_id, snapshot(web_server, run_id))


def test_answering_the_input_form_in_one_page_resumes_the_run_in_both(
    open_tab: Any, web_server: Spawned
) -> None:
    run_id = start_run(web_server, "ask", {"prompt": "Your name?"})
    a = open_tab(f"/#/runs/{run_id}")
    b = open_tab(f"/#/runs/{run_id}")
    for tab in (a, b):
        expect(by_id(tab, "run-status")).to_have_text("requires action")
        expect(by_id(tab, "input-form")).to_contain_text("Your name?")

    form = by_id(b, "input-form")
    form.get_by_label("Answer").fill("Ada")
    form.get_by_label("Answer").press("Tab")
    b.page.keyboard.press("Enter")  # the submit button has the focus: keyboard only
    for tab in (a, b):
        expect(by_id(tab, "run-status")).to_have_text("completed")
        expect(by_id(tab, "run-text")).to_have_text("You said: Ada")
        expect(by_id(tab, "input-form")).to_have_count(0)
    assert_whole(a, run_id, snapshot(web_server, run_id))


def test_the_time_travel_slider_shows_the_snapshot_at_its_index(
    open_tab: Any, web_server: Spawned
) -> None:
    run_id = start_run(web_server, "demo", {"tokens": 12, "speed": 400})
    wait_for_index(web_server, run_id, 10**9)  # to the run's end
    a = open_tab(f"/#/runs/{run_id}")
    expect(by_id(a, "run-status")).to_have_text("completed")
    slider = by_id(a, "tt-slider")
    panel = by_id(a, "tt-panel")

    def shows(index: int) -> None:
        expect(panel).to_have_attribute("data-at", str(index))
        expect(panel).not_to_have_attribute("data-loading", "true")
        shown = json.loads(by_id(a, "tt-json").text_content())
        assert shown == snapshot(web_server, run_id, at=index)["state"]

    slider.fill("9")
    shows(9)
    slider.press("ArrowLeft")  # the keyboard moves it too
    shows(8)
    slider.fill("5")
    shows(5)
    # The inspector marks the event at the slider's index.
    expect(a.page.locator("[data-testid=inspector] tr.at")).to_have_attribute("data-i", "5")


def test_a_conversation_send_regenerate_and_switch_branches(
    open_tab: Any, web_server: Spawned
) -> None:
    a = open_tab("/#/threads")
    connected(a)
    by_id(a, "new-thread").click()
    expect(a.page).to_have_url(re.compile(r"#/threads/thr_[\w-]+$"))
    by_id(a, "thread-agent").select_option("echo")
    composer = by_id(a, "composer")
    composer.fill("hello there")
    composer.press("Enter")
    turns = by_id(a, "turns").get_by_test_id("turn")
    expect(turns).to_have_count(2)
    expect(turns.nth(1)).to_have_attribute("data-role", "assistant")
    expect(turns.nth(1).get_by_test_id("turn-content")).to_have_text("hello there")
    first_answer = turns.nth(1).get_attribute("data-turn-id")

    by_id(a, "regenerate").click()
    switcher = turns.nth(1).get_by_test_id("branch-label")
    expect(switcher).to_have_text("2 / 2")
    expect(turns.nth(1).get_by_test_id("turn-content")).to_have_text("hello there")
    second_answer = turns.nth(1).get_attribute("data-turn-id")
    assert second_answer != first_answer

    turns.nth(1).get_by_role("button", name="previous branch").click()
    expect(switcher).to_have_text("1 / 2")
    expect(turns.nth(1)).to_have_attribute("data-turn-id", first_answer)
    turns.nth(1).get_by_role("button", name="next branch").click()
    expect(switcher).to_have_text("2 / 2")
    expect(turns.nth(1)).to_have_attribute("data-turn-id", second_answer)

    # Edit the question: a sibling user turn, answered anew; the old one stays a branch.
    turns.nth(0).get_by_role("button", name="Edit").click()
    by_id(a, "edit-box").fill("goodbye")
    by_id(a, "edit-send").click()
    expect(turns.nth(0).get_by_test_id("turn-content")).to_have_text("goodbye")
    expect(turns.nth(0).get_by_test_id("branch-label")).to_have_text("2 / 2")
    expect(turns.nth(1).get_by_test_id("turn-content")).to_have_text("goodbye")
    # Rewind to the question: the answer leaves the active path.
    turns.nth(0).get_by_role("button", name="Rewind here").click()
    expect(turns).to_have_count(1)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_server_crash_resets_the_page_to_what_the_server_kept(open_tab: Any, spawn: Any) -> None:
    # A slow flush (one a second), so that the page holds events that the crash loses.
    port = free_port()
    first = spawn("--port", str(port), "--flush-interval", "1")
    run_id = start_run(first, "demo", {"tokens": 400, "speed": 50})
    a = open_tab(f"/#/runs/{run_id}", base=first.http_url, allow=CONNECTION_REFUSED)
    a.page.evaluate(
        "() => { window.resets = 0; window.runcast.client.on('frame', (f) => {"
        "  if (f.type === 'reset') window.resets++; }); }"
    )
    a.page.wait_for_function(  # past the first flush
        "(id) => window.runcast.runs.models.get(id)?.model.cursor >= 70", arg=run_id
    )

    first.process.kill()
    first.wait(timeout_s=10)
    expect(by_id(a, "conn")).to_have_attribute("data-state", "reconnecting")
    second = spawn("--port", str(port), db=first.db)
    connected(a)
    expect(by_id(a, "run-status")).to_have_text("interrupted")
    expect(by_id(a, "run-ending")).to_have_text("Interrupted (crash).")
    assert a.page.evaluate("window.resets") == 1
    snap = snapshot(second, run_id)
    assert snap["state"]["status"] == "interrupted"
    # The reset replaced what the page held by the server's snapshot and log.
    expect(by_id(a, "run-text")).to_have_text(snap["state"]["message"]["content"])
    assert_whole(a, run_id, snap)
    # The inspector shows the server's log as it is now, up to its terminal event.
    last = a.page.locator("[data-testid=inspector] tbody tr:not([hidden])").last
    expect(last).to_have_attribute("data-i", str(snap["index"]))
    expect(last.locator("td").nth(1)).to_have_text("status")
