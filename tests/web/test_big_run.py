"""A run of a million events in the page: it opens at once from the server's snapshot,
its inspector pages through the log from the server, the slider shows the server's
snapshot at each stop, and the page's JavaScript heap stays bounded however long the run
(issue 14). The figures measured go to ``artifacts/web-big-run.json``.

The heap is read through the DevTools protocol (``Runtime.getHeapUsage`` after
``HeapProfiler.collectGarbage``), so it is what the page holds, not garbage not yet
collected.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from playwright.sync_api import expect

from tests.conftest import Spawned
from tests.web.conftest import ARTIFACTS, Tab
from tests.web.test_page import by_id, connected, held, snapshot, start_run

BIG_N = 1_000_000
LIVE_N = 200_000
OPEN_WITHIN_S = 3.0
HEAP_BOUND_BYTES = 60 * 2**20
FIGURES: dict[str, Any] = {}

pytestmark = pytest.mark.timeout(300)


def wait_ended(server: Spawned, run_id: str, timeout_s: float) -> dict[str, Any]:
    """Poll the run's RunInfo until it ended (a counter of a million events takes a few
    seconds, more on a busy machine); returns it."""
    deadline = time.monotonic() + timeout_s
    while True:
        info: dict[str, Any] = httpx.get(f"{server.http_url}/api/runs/{run_id}").json()
        if info["status"] in ("completed", "failed", "stopped", "interrupted"):
            return info
        assert time.monotonic() < deadline, f"the run did not end within {timeout_s} s: {info}"
        time.sleep(0.25)


@pytest.fixture(scope="module")
def big_run(web_server: Spawned) -> Iterator[dict[str, Any]]:
    """A finished ``counter`` run of 1,000,000 ticks: its RunInfo."""
    run_id = start_run(web_server, "counter", {"n": BIG_N})
    info = wait_ended(web_server, run_id, timeout_s=240)
    assert info["status"] == "completed" and info["last_index"] == BIG_N + 2
    yield info
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "web-big-run.json").write_text(json.dumps(FIGURES, indent=2) + "\n")


def heap_bytes(tab: Tab) -> int:
    """The page's JavaScript heap in use, after a full garbage collection."""
    cdp = tab.context.new_cdp_session(tab.page)
    try:
        cdp.send("HeapProfiler.collectGarbage")
        return int(cdp.send("Runtime.getHeapUsage")["usedSize"])
    finally:
        cdp.detach()


def visible_rows(tab: Tab) -> list[dict[str, str]]:
    """The inspector's rows in sight: index, type and data as shown."""
    rows: list[dict[str, str]] = tab.page.evaluate(
        """() => [...document.querySelectorAll("[data-testid=inspector] tbody tr:not([hidden])")]
              .map((tr) => ({ i: tr.dataset.i, type: tr.cells[1].textContent,
                              data: tr.cells[2].textContent }))"""
    )
    return rows


def scroll_inspector(tab: Tab, fraction: float) -> None:
    """Scroll the inspector to ``fraction`` of its height, as a user would; returns once
    the browser has handled the scroll (two animation frames later)."""
    tab.page.evaluate(
        """async (f) => {
             const e = document.querySelector("[data-testid=inspector]");
             e.scrollTop = (e.scrollHeight - e.clientHeight) * f;
             await new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)));
           }""",
        fraction,
    )


def rows_loaded(tab: Tab) -> None:
    """Wait until every row in sight shows its event (no placeholder left)."""
    tab.page.wait_for_function(
        """() => { const rows = document.querySelectorAll(
                     "[data-testid=inspector] tbody tr:not([hidden])");
                   return rows.length > 0 && [...rows].every((tr) => tr.dataset.type); }"""
    )


def assert_ticks(rows: list[dict[str, str]]) -> None:
    """Rows of the counter's ticks: event i is tick n = i - 1 (event 1 is the status
    running), in order with no gap."""
    indexes = [int(row["i"]) for row in rows]
    assert indexes == list(range(indexes[0], indexes[0] + len(rows))), indexes
    for row in rows:
        assert row["type"] == "tick", row
        assert json.loads(row["data"]) == {"n": int(row["i"]) - 1}, row


# Notes, in the page, when it first shows the run completed with its last event in the
# inspector: performance.now(), the time since the navigation started (in a tab, the
# time that a person waits; Playwright's own polling is not counted).
NOTE_SHOWN = """
(last) => {
  const shown = () => {
    const status = document.querySelector("[data-testid=run-status]");
    const rows = document.querySelectorAll("[data-testid=inspector] tbody tr:not([hidden])");
    const newest = rows[rows.length - 1];
    return status?.textContent === "completed" && newest?.dataset.i === String(last)
      && newest.dataset.type === "status";
  };
  const observer = new MutationObserver(() => {
    if (window.shownAt === undefined && shown()) window.shownAt = performance.now();
  });
  const all = { subtree: true, childList: true, characterData: true, attributes: true };
  observer.observe(document, all);
}
"""


def test_a_finished_run_of_a_million_events_opens_at_once(
    open_tab: Any, web_server: Spawned, big_run: dict[str, Any]
) -> None:
    run_id, last = big_run["run_id"], big_run["last_index"]
    # A deep link, loaded as a new page with an empty HTTP cache.
    a = open_tab("/")
    connected(a)
    a.context.add_init_script(f"({NOTE_SHOWN})({last})")
    a.page.goto("about:blank")  # so that the deep link loads a new document
    cdp = a.context.new_cdp_session(a.page)
    cdp.send("Network.clearBrowserCache")
    cdp.detach()
    a.page.goto(f"{web_server.http_url}/#/runs/{run_id}")
    a.page.wait_for_function("() => window.shownAt !== undefined")
    FIGURES["open_1m_deep_link_s"] = deep_link_s = round(
        a.page.evaluate("window.shownAt") / 1000, 3
    )
    # From the page already open (a link followed): from the click to the run shown.
    a.page.goto(f"{web_server.http_url}/#/")
    connected(a)
    started = a.page.evaluate("() => { window.shownAt = undefined; return performance.now(); }")
    a.page.evaluate("(id) => { location.hash = `#/runs/${id}`; }", run_id)
    a.page.wait_for_function("() => window.shownAt !== undefined")
    FIGURES["open_1m_in_page_s"] = in_page_s = round(
        (a.page.evaluate("window.shownAt") - started) / 1000, 3
    )
    assert deep_link_s < OPEN_WITHIN_S and in_page_s < OPEN_WITHIN_S, FIGURES
    expect(by_id(a, "tt-panel")).to_have_attribute("data-at", str(last))

    # The page's state is the server's, read from one snapshot: no event was replayed.
    model = held(a, run_id)
    assert model["state"] == snapshot(web_server, run_id)["state"]
    assert model["cursor"] == last
    assert model["delivered"] <= 1 and len(model["tail"]) <= 1
    assert by_id(a, "tt-slider").get_attribute("max") == str(last)
    # Every row is as tall as the virtual list reckons (event-log.js: ROW_PX).
    heights = a.page.evaluate(
        """() => [...document.querySelectorAll("[data-testid=inspector] tbody tr:not([hidden])")]
                 .map((tr) => tr.getBoundingClientRect().height)"""
    )
    assert heights and all(abs(height - 24) < 0.5 for height in heights), heights
    # At "Live" the panel says so and does not repeat the run's text.
    expect(by_id(a, "tt-live")).to_be_visible()
    expect(by_id(a, "tt-text")).to_be_hidden()
    ARTIFACTS.mkdir(exist_ok=True)
    a.page.screenshot(path=str(ARTIFACTS / "run-view-1m.png"), full_page=True)


def test_the_inspector_pages_through_the_log_and_the_heap_stays_bounded(
    open_tab: Any, web_server: Spawned, big_run: dict[str, Any]
) -> None:
    run_id, last = big_run["run_id"], big_run["last_index"]
    a = open_tab(f"/#/runs/{run_id}")
    expect(by_id(a, "run-status")).to_have_text("completed")
    rows_loaded(a)
    opened = heap_bytes(a)

    # The middle of the log: the rows show events read from the server, in order.
    scroll_inspector(a, 0.5)
    a.page.wait_for_function(
        """(mid) => { const tr = document.querySelector(
                        "[data-testid=inspector] tbody tr:not([hidden])");
                      return tr && Math.abs(Number(tr.dataset.i) - mid) < 1000; }""",
        arg=last // 2,
    )
    rows_loaded(a)
    middle = visible_rows(a)
    assert abs(int(middle[0]["i"]) - last // 2) < 1000
    assert_ticks(middle)

    # Through the whole run, a window at a time: what the page holds does not grow.
    for step in range(41):
        scroll_inspector(a, step / 40)
        rows_loaded(a)
    rows = visible_rows(a)
    assert int(rows[-1]["i"]) == last and rows[-1]["type"] == "status"
    assert_ticks(rows[:-1])
    scrolled = heap_bytes(a)
    FIGURES["heap_1m_opened_bytes"] = opened
    FIGURES["heap_1m_scrolled_bytes"] = scrolled
    assert opened < HEAP_BOUND_BYTES and scrolled < HEAP_BOUND_BYTES
    assert scrolled - opened < 4 * 2**20, (opened, scrolled)


def test_the_slider_shows_the_servers_snapshot_at_each_stop(
    open_tab: Any, web_server: Spawned, big_run: dict[str, Any]
) -> None:
    run_id, last = big_run["run_id"], big_run["last_index"]
    a = open_tab(f"/#/runs/{run_id}")
    expect(by_id(a, "run-status")).to_have_text("completed")
    slider, panel = by_id(a, "tt-slider"), by_id(a, "tt-panel")

    def shows(index: int, status: str) -> None:
        expect(panel).to_have_attribute("data-at", str(index))
        expect(panel).not_to_have_attribute("data-loading", "true")
        expect(by_id(a, "tt-status")).to_have_text(status)
        shown = json.loads(by_id(a, "tt-json").text_content() or "")
        assert shown == snapshot(web_server, run_id, at=index)["state"]
        # The inspector brings the slider's event in sight and marks it.
        mark = a.page.locator("[data-testid=inspector] tr.at")
        expect(mark).to_have_attribute("data-i", str(index))

    # A drag: 59 positions, 10 ms apart; one snapshot is asked for, where it rests.
    asked: list[str] = []
    a.page.on("request", lambda r: asked.append(r.url) if "/snapshot" in r.url else None)
    a.page.evaluate(
        """async () => {
             const slider = document.querySelector("[data-testid=tt-slider]");
             for (let k = 1; k < 60; k++) {
               slider.value = String(k * 10000);
               slider.dispatchEvent(new Event("input", { bubbles: true }));
               await new Promise((resolve) => setTimeout(resolve, 10));
             }
           }"""
    )
    shows(590_000, "running")
    assert len(asked) == 1 and asked[0].endswith("at=590000"), asked
    for index in (1, 500_001, last - 1):
        slider.fill(str(index))
        shows(index, "running")
    slider.fill(str(last))
    shows(last, "completed")
    by_id(a, "tt-live").wait_for(state="hidden")
    a.page.get_by_role("button", name="Live").click()
    expect(by_id(a, "tt-live")).to_be_visible()
    expect(a.page.locator("[data-testid=inspector] tr.at")).to_have_count(0)


def test_a_live_run_watched_for_its_whole_life_keeps_the_heap_bounded(
    open_tab: Any, web_server: Spawned
) -> None:
    a = open_tab("/")
    connected(a)
    run_id = start_run(web_server, "counter", {"n": LIVE_N, "start_delay_s": 1.0})
    a.page.evaluate("(id) => { location.hash = `#/runs/${id}`; }", run_id)
    expect(by_id(a, "run-status")).to_have_text("running")
    info = wait_ended(web_server, run_id, timeout_s=120)
    expect(by_id(a, "run-status")).to_have_text("completed", timeout=60_000)
    model = held(a, run_id)
    assert model["cursor"] == info["last_index"] == LIVE_N + 2
    assert model["gaps"] == 0 and model["delivered"] == model["cursor"] - model["from"]
    assert model["from"] <= 1  # it watched the run from its start
    assert model["state"] == snapshot(web_server, run_id)["state"]
    rows_loaded(a)
    assert visible_rows(a)[-1]["i"] == str(info["last_index"])
    heap = heap_bytes(a)
    FIGURES["heap_200k_live_bytes"] = heap
    assert heap < HEAP_BOUND_BYTES
