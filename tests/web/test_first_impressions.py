"""What a new user sees first (issue 14): no stray text in any view (``null``,
``undefined``, ``NaN``, ``[object Object]``), the snapshot panel at "Live" does not repeat
the run's text, and the start form shows only the fields that matter for the chosen
agent (``content``, which answers a thread's user turn, only for a run in a thread).
"""

from __future__ import annotations

import re
from typing import Any

import httpx
from playwright.sync_api import expect

from tests.conftest import Spawned
from tests.web.conftest import ARTIFACTS, Tab
from tests.web.test_big_run import wait_ended
from tests.web.test_page import by_id, connected, snapshot, start_run

# Every text node and every attribute people read, except raw JSON shown as such
# (elements marked data-raw: the inspector's data column, tool arguments and output,
# the state as JSON), where `null` is a value.
STRAY = r"\b(null|undefined|NaN)\b|\[object \w+\]"
FIND_STRAY = """(pattern) => {
  const bad = new RegExp(pattern);
  const found = [];
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    const el = node.parentElement;
    if (!el || el.closest("[data-raw], script, style")) continue;
    if (bad.test(node.data)) found.push(`<${el.tagName.toLowerCase()}> ${node.data.slice(0, 120)}`);
  }
  for (const el of document.body.querySelectorAll("*")) {
    for (const name of ["title", "aria-label", "placeholder", "alt", "value", "href"]) {
      const value = el.getAttribute(name);
      if (value && bad.test(value)) found.push(`<${el.tagName.toLowerCase()} ${name}="${value}">`);
    }
    if ("value" in el && typeof el.value === "string" && bad.test(el.value)) {
      found.push(`<${el.tagName.toLowerCase()}> value ${el.value.slice(0, 120)}`);
    }
  }
  return found;
}"""
WIDTHS = {"phone": 390, "desktop": 1280}
# Chromium logs the 404 of an unknown run's RunInfo (the view says there is no such run).
NOT_FOUND = (r"Failed to load resource: the server responded with a status of 404",)


def no_stray_text(tab: Tab, where: str) -> None:
    found = tab.page.evaluate(FIND_STRAY, STRAY)
    assert found == [], f"stray text in {where}: {found}"


def shoot(tab: Tab, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    tab.page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def test_no_view_shows_stray_text(open_tab: Any, web_server: Spawned) -> None:
    demo = start_run(web_server, "demo", {"tokens": 15, "speed": 500})
    counter = start_run(web_server, "counter", {"n": 3000})
    ask = start_run(web_server, "ask", {"prompt": "Your name?"})
    stopped = start_run(web_server, "demo", {"tokens": 5000, "speed": 20})
    for run_id in (demo, counter):
        wait_ended(web_server, run_id, timeout_s=30)
    stop = httpx.post(f"{web_server.http_url}/api/runs/{stopped}/stop")
    assert stop.status_code == 200, stop.text
    wait_ended(web_server, stopped, timeout_s=30)

    for device, width in WIDTHS.items():
        a = open_tab("/", width=width, allow=NOT_FOUND)
        connected(a)
        expect(by_id(a, "recent-runs").locator(f"[data-run-id={demo}]")).to_be_visible()
        expect(by_id(a, "agent-select")).to_be_enabled()
        no_stray_text(a, "the home page")
        shoot(a, f"home-{device}")
        for agent in ("counter", "demo", "ask", "echo"):
            by_id(a, "agent-select").select_option(agent)
            no_stray_text(a, f"the start form of {agent}")

        a.page.goto(f"{web_server.http_url}/#/nowhere")
        expect(a.page.locator("#main")).to_contain_text("Nothing at #/nowhere")
        no_stray_text(a, "an unknown address")

        for run_id, status in ((demo, "completed"), (counter, "completed"), (stopped, "stopped")):
            a.page.goto(f"{web_server.http_url}/#/runs/{run_id}")
            expect(by_id(a, "run-status")).to_have_text(status)
            expect(a.page.locator("[data-testid=inspector] tbody tr").first).to_have_attribute(
                "data-type", re.compile(r"\w")
            )
            no_stray_text(a, f"the {status} run view")
            by_id(a, "tt-slider").fill("2")
            expect(by_id(a, "tt-panel")).to_have_attribute("data-at", "2")
            expect(by_id(a, "tt-panel")).not_to_have_attribute("data-loading", "true")
            no_stray_text(a, "the run view at a slider stop")
        shoot(a, f"run-view-{device}")
        a.page.goto(f"{web_server.http_url}/#/runs/{ask}")
        expect(by_id(a, "input-form")).to_contain_text("Your name?")
        no_stray_text(a, "a run that asks for input")
        a.page.goto(f"{web_server.http_url}/#/runs/run_none")
        expect(a.page.locator("#main")).to_contain_text("There is no run run_none")
        no_stray_text(a, "an unknown run")

        a.page.goto(f"{web_server.http_url}/#/threads")
        by_id(a, "new-thread").click()
        expect(a.page).to_have_url(re.compile(r"#/threads/thr_[\w-]+$"))
        expect(by_id(a, "thread-revision")).to_have_text("revision 0")  # loaded
        by_id(a, "thread-agent").select_option("demo")
        by_id(a, "composer").fill("hello")
        by_id(a, "composer").press("Enter")
        turns = by_id(a, "turns").get_by_test_id("turn")
        expect(turns).to_have_count(2)
        expect(turns.nth(1).get_by_test_id("turn-content")).not_to_be_empty()
        no_stray_text(a, "a conversation")
        shoot(a, f"conversation-{device}")
        a.page.goto(f"{web_server.http_url}/#/threads")
        expect(by_id(a, "thread-list").locator("li").first).to_be_visible()
        no_stray_text(a, "the list of conversations")

    # A run deleted from its view, behind the confirmation dialog.
    b = open_tab(f"/#/runs/{counter}")
    expect(by_id(b, "run-status")).to_have_text("completed")
    by_id(b, "delete-run").click()
    no_stray_text(b, "the confirmation dialog")
    by_id(b, "confirm-ok").click()
    expect(by_id(b, "run-deleted")).to_be_visible()
    no_stray_text(b, "a deleted run")


def test_at_live_the_snapshot_panel_does_not_repeat_the_runs_text(
    open_tab: Any, web_server: Spawned
) -> None:
    run_id = start_run(web_server, "demo", {"tokens": 20, "speed": 500})
    wait_ended(web_server, run_id, timeout_s=30)
    text = snapshot(web_server, run_id)["state"]["message"]["content"]
    assert text
    a = open_tab(f"/#/runs/{run_id}")
    expect(by_id(a, "run-text")).to_have_text(text)
    panel = by_id(a, "tt-panel")
    expect(by_id(a, "tt-live")).to_be_visible()
    expect(by_id(a, "tt-text")).to_be_hidden()
    assert text not in panel.inner_text()
    # Away from Live the panel shows the run as it was; back at Live, not again.
    by_id(a, "tt-slider").fill("10")
    expect(panel).to_have_attribute("data-at", "10")
    expect(by_id(a, "tt-live")).to_be_hidden()
    expect(by_id(a, "tt-text")).to_be_visible()
    a.page.get_by_role("button", name="Live").click()
    expect(by_id(a, "tt-live")).to_be_visible()
    expect(by_id(a, "tt-text")).to_be_hidden()
    assert text not in panel.inner_text()


def shown_fields(tab: Tab) -> list[str]:
    names: list[str] = tab.page.evaluate(
        """() => [...document.querySelectorAll("#agent-input .field")]
                 .filter((f) => f.checkVisibility()).map((f) => f.dataset.field)"""
    )
    return names


def test_the_start_form_shows_the_fields_of_the_chosen_agent(
    open_tab: Any, web_server: Spawned
) -> None:
    a = open_tab("/")
    connected(a)
    expect(by_id(a, "agent-select")).to_be_enabled()
    expected = {
        "counter": ["n", "delay_s", "start_delay_s"],
        "demo": ["prompt", "tokens", "speed"],
        "ask": ["prompt"],
        "echo": ["text"],
    }
    for agent, fields in expected.items():
        by_id(a, "agent-select").select_option(agent)
        assert shown_fields(a) == fields, agent
    expect(by_id(a, "start-form").locator("select[name=multitask]")).to_have_count(0)

    # Started from the form, the run makes its thread current: a run in that thread
    # answers a user turn, so `content` is offered there, and what to do with a busy run.
    by_id(a, "agent-select").select_option("echo")
    a.page.locator("#agent-input [name=text]").fill("first")
    by_id(a, "start").click()
    expect(by_id(a, "run-status")).to_have_text("completed")
    form = by_id(a, "start-form")
    form.get_by_label("a new thread").check()
    assert shown_fields(a) == ["text"]
    expect(form.locator("select[name=multitask]")).to_be_hidden()
    form.get_by_label("the current thread").check()
    assert shown_fields(a) == ["content", "text"]
    expect(form.locator("select[name=multitask]")).to_be_visible()
    a.page.locator("#agent-input [name=content]").fill("in the thread")
    a.page.locator("#agent-input [name=text]").fill("")
    by_id(a, "start").click()
    expect(by_id(a, "run-status")).to_have_text("completed")
    expect(by_id(a, "run-text")).to_have_text("in the thread")
    # Switching agents keeps the choice: `content` stays offered in the thread.
    by_id(a, "agent-select").select_option("demo")
    assert shown_fields(a) == ["content", "prompt", "tokens", "speed"]
