"""The page's records (issue 11, PROTOCOL.md §5, §6, §10): the conversation list paged by
cursor as it scrolls and searched by title, titles renamed in place and seen in other
tabs, deleting after a confirmation (admin only; watchers are told), Reflect as a side
branch that leaves the head where it was, and Save of an edit that starts no run.

Tabs open on the module's open server (``web_server``) unless they name ``token_server``.
What the page shows is checked against what the server says over HTTP.
"""

from __future__ import annotations

import re
from typing import Any

import httpx
from playwright.sync_api import expect

from tests.conftest import Spawned
from tests.web.conftest import ADMIN_TOKEN, VIEWER_TOKEN, Tab
from tests.web.test_access import sign_in
from tests.web.test_page import by_id, connected, wait_for_index

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
PAGE_SIZE = 30  # static/thread-list.js
REFLECT_PROMPT = (
    "Reflect on the conversation so far: what went well, what went wrong, "
    "and what would you do differently?"
)  # static/thread-view.js
# Chromium logs every HTTP answer >= 400 to a fetch as a console error: reading a deleted
# thread is meant to answer 404.
NOT_FOUND = (r"Failed to load resource: the server responded with a status of 404",)


def api(server: Spawned, method: str, path: str, **kwargs: Any) -> Any:
    response = httpx.request(method, f"{server.http_url}{path}", timeout=10, **kwargs)
    assert response.status_code < 300, f"{method} {path}: {response.status_code} {response.text}"
    return response.json()


def new_thread(server: Spawned, title: str | None = None, headers: Any = None) -> str:
    body = {"title": title} if title is not None else {}
    return str(api(server, "POST", "/api/threads", json=body, headers=headers)["thread_id"])


def every_thread_id(server: Spawned, headers: Any = None) -> list[str]:
    """Every thread the server lists, newest first, paged by its cursor."""
    ids: list[str] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 50}
        if cursor:
            params["cursor"] = cursor
        page = api(server, "GET", "/api/threads", params=params, headers=headers)
        ids += [t["thread_id"] for t in page["threads"]]
        cursor = page["next_cursor"]
        if cursor is None:
            return ids


def thread(server: Spawned, thread_id: str, headers: Any = None) -> dict[str, Any]:
    return dict(
        api(server, "GET", f"/api/threads/{thread_id}", params={"all": "true"}, headers=headers)
    )


def listed(tab: Tab) -> list[str]:
    ids: list[str] = tab.page.evaluate(
        "() => [...document.querySelectorAll('[data-testid=thread-item]')]"
        ".map((li) => li.dataset.threadId)"
    )
    return ids


def row(tab: Tab, thread_id: str) -> Any:
    return by_id(tab, "thread-list").locator(f"[data-thread-id={thread_id}]")


def send(tab: Tab, text: str, turns_after: int) -> Any:
    """Send ``text`` to the echo agent; returns the turns once its answer is written."""
    by_id(tab, "composer").fill(text)
    by_id(tab, "composer").press("Enter")
    turns = by_id(tab, "turns").get_by_test_id("turn")
    expect(turns).to_have_count(turns_after)
    for k in (turns_after - 2, turns_after - 1):  # the question, and the echo of it
        expect(turns.nth(k).get_by_test_id("turn-content")).to_have_text(text)
    expect(turns.nth(turns_after - 1)).not_to_contain_text("running")
    return turns


# -- the list -------------------------------------------------------------------------------


def test_the_list_pages_by_cursor_as_it_scrolls_and_searches_by_title(
    open_tab: Any, web_server: Spawned
) -> None:
    created = [new_thread(web_server, f"topic {k:03d}") for k in range(2 * PAGE_SIZE + 10)]
    a = open_tab("/#/threads")
    connected(a)
    items = by_id(a, "thread-item")
    expect(items).to_have_count(PAGE_SIZE)  # one page: the rest waits below the fold
    expect(by_id(a, "thread-list-end")).to_be_hidden()
    assert listed(a) == created[::-1][:PAGE_SIZE]  # newest first
    expect(row(a, created[-1]).get_by_test_id("thread-link")).to_have_text(
        f"topic {len(created) - 1:03d}"
    )

    # A thread created meanwhile is newer than the cursor: no page shows it twice or
    # shifts the others.
    newcomer = new_thread(web_server, "a newcomer")
    by_id(a, "load-more").scroll_into_view_if_needed()
    expect(items).to_have_count(2 * PAGE_SIZE)
    by_id(a, "load-more").scroll_into_view_if_needed()
    expect(items).to_have_count(len(created))
    expect(by_id(a, "thread-list-end")).to_be_visible()
    expect(by_id(a, "load-more")).to_be_hidden()
    assert listed(a) == created[::-1]
    assert every_thread_id(web_server) == [newcomer, *created[::-1]]
    expect(by_id(a, "thread-list-status")).to_have_text(f"{len(created)} conversations loaded.")

    # Search by title, over what is loaded.
    search = a.page.get_by_label("Search by title")
    search.fill("topic 05")
    expect(items.filter(visible=True)).to_have_count(10)
    expect(by_id(a, "thread-list-status")).to_have_text(
        f"10 of {len(created)} conversations loaded match “topic 05”."
    )
    search.fill("")
    expect(items.filter(visible=True)).to_have_count(len(created))

    # A search for what is not loaded yet loads older pages by itself.
    b = open_tab("/#/threads")
    expect(by_id(b, "thread-item")).to_have_count(PAGE_SIZE)
    b.page.get_by_label("Search by title").fill("topic 001")
    visible = by_id(b, "thread-item").filter(visible=True)
    expect(visible).to_have_count(1)
    expect(visible.get_by_test_id("thread-link")).to_have_text("topic 001")
    expect(by_id(b, "thread-list-end")).to_be_visible()


def test_rename_in_place_and_see_it_in_other_tabs(open_tab: Any, web_server: Spawned) -> None:
    thread_id = new_thread(web_server, "before")
    a = open_tab("/#/threads")
    b = open_tab(f"/#/threads/{thread_id}")
    c = open_tab("/#/threads")
    for tab in (a, b, c):
        connected(tab)
    expect(by_id(b, "thread-title")).to_have_text("before")
    expect(row(c, thread_id).get_by_test_id("thread-link")).to_have_text("before")

    rename = row(a, thread_id).get_by_role("button", name="Rename “before”")
    rename.click()
    field = a.page.get_by_role("textbox", name="Conversation title")
    expect(field).to_be_focused()
    expect(field).to_have_value("before")
    field.fill("never saved")
    field.press("Escape")  # cancels
    expect(field).to_have_count(0)
    expect(rename).to_be_focused()
    expect(row(a, thread_id).get_by_test_id("thread-link")).to_have_text("before")

    rename.press("Enter")  # the keyboard opens it too
    field.fill("after")
    field.press("Enter")  # saves
    expect(row(a, thread_id).get_by_test_id("thread-link")).to_have_text("after")
    expect(by_id(a, "thread-list-status")).to_have_text("Renamed to “after”.")
    expect(row(a, thread_id).get_by_role("button", name="Rename “after”")).to_be_focused()
    assert thread(web_server, thread_id)["title"] == "after"
    # The other tabs: the conversation's heading, and the other list (both watch it).
    expect(by_id(b, "thread-title")).to_have_text("after")
    expect(row(c, thread_id).get_by_test_id("thread-link")).to_have_text("after")

    # Renamed in the conversation view, it shows in the lists.
    by_id(b, "rename").click()
    field = b.page.get_by_role("textbox", name="Conversation title")
    field.fill("from the conversation")
    field.press("Enter")
    expect(by_id(b, "thread-title")).to_have_text("from the conversation")
    for tab in (a, c):
        expect(row(tab, thread_id).get_by_test_id("thread-link")).to_have_text(
            "from the conversation"
        )

    # A run's title: renamed in the run view, shown in the recent runs.
    run = api(web_server, "POST", "/api/runs", json={"agent": "counter", "input": {"n": 2}})
    wait_for_index(web_server, run["run_id"], 10**9)
    a.page.goto(f"{web_server.http_url}/#/runs/{run['run_id']}")
    expect(by_id(a, "run-status")).to_have_text("completed")
    expect(by_id(a, "run-title")).to_have_text("counter")
    by_id(a, "rename").click()
    field = a.page.get_by_role("textbox", name="Run title")
    field.fill("two ticks")
    field.press("Enter")
    expect(by_id(a, "run-title")).to_have_text("two ticks")
    recent = by_id(a, "recent-runs").locator(f"[data-run-id={run['run_id']}]")
    expect(recent.get_by_test_id("recent-title")).to_have_text("two ticks")
    assert api(web_server, "GET", f"/api/runs/{run['run_id']}")["title"] == "two ticks"


# -- deleting -------------------------------------------------------------------------------


def test_delete_asks_first_and_the_thread_leaves_the_list(
    open_tab: Any, token_server: Spawned
) -> None:
    keep = new_thread(token_server, "keep me", headers=ADMIN)
    doomed = new_thread(token_server, "delete me", headers=ADMIN)
    run = api(
        token_server,
        "POST",
        "/api/runs",
        json={"agent": "counter", "input": {"n": 2}, "thread_id": doomed},
        headers=ADMIN,
    )
    assert read_to_end(token_server, run["run_id"]) > 0

    a = open_tab("/", base=token_server.http_url, allow=NOT_FOUND)
    sign_in(a, ADMIN_TOKEN)
    a.page.goto(f"{token_server.http_url}/#/threads")
    # Another tab shows a run of the thread, a third the thread itself.
    b = open_tab(f"/#/runs/{run['run_id']}?token={ADMIN_TOKEN}", base=token_server.http_url)
    c = open_tab(f"/#/threads/{doomed}?token={ADMIN_TOKEN}", base=token_server.http_url)
    expect(by_id(b, "run-status")).to_have_text("completed")
    expect(by_id(c, "thread-title")).to_have_text("delete me")
    expect(row(a, doomed)).to_be_visible()

    delete = row(a, doomed).get_by_role("button", name="Delete “delete me”")
    delete.click()
    dialog = a.page.get_by_role("dialog", name="Delete this conversation?")
    expect(dialog).to_be_visible()
    expect(dialog).to_contain_text("erased for good")
    expect(dialog.get_by_role("button", name="Cancel")).to_be_focused()
    a.page.keyboard.press("Escape")  # nothing happens
    expect(dialog).to_have_count(0)
    expect(delete).to_be_focused()
    assert thread(token_server, doomed, headers=ADMIN)["title"] == "delete me"

    delete.click()
    dialog.get_by_role("button", name="Delete for good").click()
    expect(row(a, doomed)).to_have_count(0)
    expect(by_id(a, "thread-list-status")).to_have_text("“delete me” was deleted.")
    expect(row(a, keep).get_by_test_id("thread-link")).to_be_focused()  # the next row
    gone = httpx.get(f"{token_server.http_url}/api/threads/{doomed}", headers=ADMIN)
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "not_found"
    assert doomed not in every_thread_id(token_server, headers=ADMIN)
    # The watchers were told: the open conversation and the open run say so.
    expect(by_id(c, "thread-gone")).to_have_attribute("data-reason", "deleted")
    expect(c.page.get_by_role("heading", name="Conversation deleted")).to_be_visible()
    expect(by_id(b, "run-deleted")).to_be_visible()
    expect(by_id(b, "recent-runs").locator(f"[data-run-id={run['run_id']}]")).to_have_count(0)
    # Its address now shows that there is no such conversation.
    a.page.goto(f"{token_server.http_url}/#/threads/{doomed}")
    expect(by_id(a, "thread-gone")).to_have_attribute("data-reason", "not_found")
    expect(a.page.get_by_role("heading", name="Conversation not found")).to_be_visible()


def test_an_admin_deletes_from_the_run_view_and_the_conversation_view(
    open_tab: Any, token_server: Spawned
) -> None:
    run = api(
        token_server,
        "POST",
        "/api/runs",
        json={"agent": "counter", "input": {"n": 3}},
        headers=ADMIN,
    )
    assert read_to_end(token_server, run["run_id"]) > 0
    a = open_tab(f"/#/runs/{run['run_id']}?token={ADMIN_TOKEN}", base=token_server.http_url)
    expect(by_id(a, "run-status")).to_have_text("completed")
    by_id(a, "delete-run").click()
    dialog = a.page.get_by_role("dialog", name="Delete this run?")
    dialog.get_by_role("button", name="Delete for good").click()
    expect(by_id(a, "run-deleted")).to_be_visible()
    gone = httpx.get(f"{token_server.http_url}/api/runs/{run['run_id']}", headers=ADMIN)
    assert gone.status_code == 404

    thread_id = new_thread(token_server, "from its view", headers=ADMIN)
    a.page.goto(f"{token_server.http_url}/#/threads/{thread_id}")
    expect(by_id(a, "thread-title")).to_have_text("from its view")
    by_id(a, "delete-thread").click()
    a.page.get_by_role("dialog").get_by_role("button", name="Delete for good").click()
    expect(a.page).to_have_url(f"{token_server.http_url}/#/threads")
    expect(by_id(a, "thread-list-status")).to_contain_text("“from its view” was deleted.")
    expect(row(a, thread_id)).to_have_count(0)
    gone = httpx.get(f"{token_server.http_url}/api/threads/{thread_id}", headers=ADMIN)
    assert gone.status_code == 404


def test_a_viewer_sees_no_control_that_would_change_anything(
    open_tab: Any, token_server: Spawned
) -> None:
    thread_id = new_thread(token_server, "read me", headers=ADMIN)
    api(
        token_server,
        "POST",
        f"/api/threads/{thread_id}/messages",
        json={"content": "hello", "agent": "echo"},
        headers=ADMIN,
    )
    v = open_tab(f"/#/threads/{thread_id}?token={VIEWER_TOKEN}", base=token_server.http_url)
    connected(v)
    turns = by_id(v, "turns").get_by_test_id("turn")
    expect(turns.nth(1).get_by_test_id("turn-content")).to_have_text("hello")
    expect(by_id(v, "read-only")).to_be_visible()
    for testid in ("composer", "reflect", "rename", "delete-thread", "regenerate"):
        expect(by_id(v, testid)).to_be_hidden()
    for name in ("Edit", "Rewind here", "Undo last exchange"):
        expect(v.page.get_by_role("button", name=name)).to_have_count(0)

    v.page.goto(f"{token_server.http_url}/#/threads")
    expect(row(v, thread_id)).to_be_visible()
    expect(row(v, thread_id).get_by_role("button")).to_have_count(0)  # no rename, no delete
    expect(by_id(v, "new-thread")).to_be_hidden()


# -- Reflect and Save -------------------------------------------------------------------------


def test_reflect_makes_a_side_branch_and_the_head_stays(open_tab: Any, web_server: Spawned) -> None:
    thread_id = new_thread(web_server, "reflect on me")
    a = open_tab(f"/#/threads/{thread_id}")
    connected(a)
    by_id(a, "thread-agent").select_option("echo")
    turns = send(a, "hello there", 2)
    before = thread(web_server, thread_id)

    by_id(a, "reflect").click()
    side = by_id(a, "side-branches")
    expect(side).to_be_visible()
    side_turns = side.get_by_test_id("side-turn")
    expect(side_turns).to_have_count(2)
    expect(side_turns.nth(0).get_by_test_id("turn-content")).to_have_text(REFLECT_PROMPT)
    expect(side_turns.nth(1).get_by_test_id("turn-content")).to_have_text(REFLECT_PROMPT)
    expect(turns).to_have_count(2)  # the conversation itself did not move

    after = thread(web_server, thread_id)
    assert after["head"] == before["head"]
    assert after["revision"] == before["revision"] + 1
    by_turn = {t["turn_id"]: t for t in after["turns"]}
    aside_user = next(
        t for t in after["turns"] if t["content"] == REFLECT_PROMPT and t["role"] == "user"
    )
    assert aside_user["parent_id"] == before["head"]
    answer = next(t for t in after["turns"] if t["parent_id"] == aside_user["turn_id"])
    assert by_turn[answer["turn_id"]]["status"] == "completed"
    # The side run saw the active path and its own question (the echo agent says so).
    state = api(web_server, "GET", f"/api/runs/{answer['run_id']}/snapshot")["state"]
    assert state["data"]["history"] == [
        {"role": "user", "content": "hello there"},
        {"role": "assistant", "content": "hello there"},
        {"role": "user", "content": REFLECT_PROMPT},
    ]

    # The conversation goes on from the head; the reflection stays a branch beside it,
    # reached with the branch switcher.
    turns = send(a, "and then?", 4)
    expect(side).to_be_hidden()
    label = turns.nth(2).get_by_test_id("branch-label")
    expect(label).to_have_text("2 / 2")
    turns.nth(2).get_by_role("button", name="previous branch").click()
    expect(label).to_have_text("1 / 2")
    expect(turns.nth(2).get_by_test_id("turn-content")).to_have_text(REFLECT_PROMPT)
    expect(turns).to_have_count(4)
    expect(turns.nth(3)).to_have_attribute("data-turn-id", answer["turn_id"])


def test_save_keeps_an_edit_without_starting_a_run(open_tab: Any, web_server: Spawned) -> None:
    thread_id = new_thread(web_server)
    a = open_tab(f"/#/threads/{thread_id}")
    connected(a)
    by_id(a, "thread-agent").select_option("echo")
    turns = send(a, "first draft", 2)
    runs_before = api(web_server, "GET", "/api/runs", params={"thread_id": thread_id})["runs"]

    turns.nth(0).get_by_role("button", name="Edit").click()
    edit_box = by_id(a, "edit-box")
    expect(edit_box).to_be_focused()
    expect(by_id(a, "edit-send")).to_be_visible()  # Save sits beside Send
    edit_box.fill("second draft")
    by_id(a, "edit-save").click()
    expect(turns).to_have_count(1)
    expect(turns.nth(0).get_by_test_id("turn-content")).to_have_text("second draft")
    expect(turns.nth(0).get_by_test_id("branch-label")).to_have_text("2 / 2")
    expect(by_id(a, "thread-notice")).to_have_text("Saved: no answer was asked for.")

    saved = thread(web_server, thread_id)
    head = next(t for t in saved["turns"] if t["turn_id"] == saved["head"])
    assert head["role"] == "user" and head["content"] == "second draft"
    assert saved["active_run_id"] is None
    runs_after = api(web_server, "GET", "/api/runs", params={"thread_id": thread_id})["runs"]
    assert len(runs_after) == len(runs_before)


def read_to_end(server: Spawned, run_id: str) -> int:
    """The run's last index once it ended (its event stream read to the end, as admin)."""
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


def test_a_run_started_with_a_title_shows_it(open_tab: Any, web_server: Spawned) -> None:
    a = open_tab("/")
    connected(a)
    by_id(a, "agent-select").select_option("echo")
    a.page.get_by_label("Title (optional)").fill("named at the start")
    by_id(a, "start").click()
    expect(a.page).to_have_url(re.compile(r"#/runs/run_[\w-]+$"))
    run_id = a.page.url.rsplit("/", 1)[1]
    expect(by_id(a, "run-title")).to_have_text("named at the start")
    recent = by_id(a, "recent-runs").locator(f"[data-run-id={run_id}]")
    expect(recent.get_by_test_id("recent-title")).to_have_text("named at the start")
    assert api(web_server, "GET", f"/api/runs/{run_id}")["title"] == "named at the start"


def test_a_deleted_frame_ends_the_run_view(open_tab: Any, web_server: Spawned) -> None:
    # The server sends {"type": "deleted"} to a run's subscribers (PROTOCOL.md §10); only
    # ended runs can be deleted, and a reader that has the terminal event is no longer
    # subscribed, so the frame reaches readers still behind. Hand the page one as the
    # server would, after deleting the run for real.
    run = api(web_server, "POST", "/api/runs", json={"agent": "counter", "input": {"n": 3}})
    wait_for_index(web_server, run["run_id"], 10**9)
    a = open_tab(f"/#/runs/{run['run_id']}", allow=NOT_FOUND)
    expect(by_id(a, "run-status")).to_have_text("completed")
    expect(by_id(a, "recent-runs").locator(f"[data-run-id={run['run_id']}]")).to_be_visible()
    api(web_server, "DELETE", f"/api/runs/{run['run_id']}")
    a.page.evaluate(
        "(id) => window.runcast.client._dispatch({type: 'deleted', run_id: id})", run["run_id"]
    )
    expect(by_id(a, "run-deleted")).to_be_visible()
    expect(a.page.get_by_role("heading", name="Run deleted")).to_be_focused()
    expect(by_id(a, "recent-runs").locator(f"[data-run-id={run['run_id']}]")).to_have_count(0)
    a.page.reload()  # and its address now finds nothing
    expect(a.page.get_by_role("heading", name="Run not found")).to_be_visible()
