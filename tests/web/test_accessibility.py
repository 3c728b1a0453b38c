"""Accessibility (issue 14): axe-core, run in the page, finds no serious or critical
violation on the home page, a run view and a conversation.

axe-core comes from the npm registry; ``.ci/run`` installs it into ``.cache/axe``
(``npm install --prefix .cache/axe axe-core@4``), or ``RUNCAST_AXE`` names its
``axe.min.js``. A missing axe-core fails the test, never skips it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from playwright.sync_api import expect

from tests.conftest import Spawned
from tests.web.conftest import Tab
from tests.web.test_big_run import wait_ended
from tests.web.test_page import by_id, connected, start_run

ROOT = Path(__file__).resolve().parents[2]
AXE = Path(os.environ.get("RUNCAST_AXE", ROOT / ".cache/axe/node_modules/axe-core/axe.min.js"))
RUN_AXE = """async () => {
  const result = await axe.run(document);
  return result.violations
    .filter((v) => v.impact === "serious" || v.impact === "critical")
    .map((v) => ({ id: v.id, impact: v.impact, help: v.help,
                   nodes: v.nodes.map((n) => `${n.target.join(" ")}: ${n.failureSummary}`) }));
}"""


def axe_source() -> str:
    assert AXE.is_file(), (
        f"axe-core is missing ({AXE}): npm install --prefix .cache/axe axe-core@4"
        " (or set RUNCAST_AXE to its axe.min.js)"
    )
    return AXE.read_text(encoding="utf-8")


def no_serious_violation(tab: Tab, where: str) -> None:
    # The page's CSP blocks inline scripts, so axe is not injected as a <script>: the
    # DevTools protocol evaluates its source, which the CSP does not govern.
    tab.page.evaluate(axe_source() + "\n;0")
    found: list[dict[str, Any]] = tab.page.evaluate(RUN_AXE)
    report = "\n".join(
        f"[{v['impact']}] {v['id']}: {v['help']}\n" + "\n".join(f"    {n}" for n in v["nodes"])
        for v in found
    )
    assert not found, f"axe found serious or critical violations in {where}:\n{report}"


def test_no_serious_accessibility_violation(open_tab: Any, web_server: Spawned) -> None:
    axe_source()  # fail first, and plainly, when axe-core is missing
    demo = start_run(web_server, "demo", {"tokens": 15, "speed": 500})
    wait_ended(web_server, demo, timeout_s=30)

    a = open_tab("/")
    connected(a)
    expect(by_id(a, "recent-runs").locator(f"[data-run-id={demo}]")).to_be_visible()
    expect(by_id(a, "agent-select")).to_be_enabled()
    no_serious_violation(a, "the home page")

    b = open_tab(f"/#/runs/{demo}")
    expect(by_id(b, "run-status")).to_have_text("completed")
    expect(b.page.locator("[data-testid=inspector] tbody tr").first).to_have_attribute(
        "data-type", re.compile(r"\w")
    )
    no_serious_violation(b, "the run view")

    c = open_tab("/#/threads")
    by_id(c, "new-thread").click()
    expect(c.page).to_have_url(re.compile(r"#/threads/thr_[\w-]+$"))
    expect(by_id(c, "thread-revision")).to_have_text("revision 0")
    by_id(c, "thread-agent").select_option("demo")
    by_id(c, "composer").fill("hello")
    by_id(c, "composer").press("Enter")
    turns = by_id(c, "turns").get_by_test_id("turn")
    expect(turns).to_have_count(2)
    expect(turns.nth(1).get_by_test_id("turn-content")).not_to_be_empty()
    no_serious_violation(c, "a conversation")
