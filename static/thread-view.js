// The conversation view (#/threads/{thread_id}, PROTOCOL.md §6): the active path as
// turns, the assistant's turn streaming live from its run, edit (send it, or only save
// it), regenerate, rewind, undo, a branch switcher wherever a turn has siblings, and
// Reflect: a side run (`aside`) whose turns hang under the head on a branch of their own,
// shown below the conversation while the head stays where it is. The title is renamed in
// place; an admin may delete the conversation. A read-only token sees no control that
// would change it.

import { TERMINAL_STATUSES } from "./runcast.js";
import { confirmDialog, errorText, h, MessageView, shortId, statusBadge, titleEditor } from "./ui.js";

/** What Reflect asks, as the user turn of its side run. */
export const REFLECT_PROMPT =
  "Reflect on the conversation so far: what went well, what went wrong, and what would you do differently?";

/** Mounts the conversation `threadId`; returns a function that unmounts it. */
export function mountThreadView(root, app, threadId) {
  const { client } = app;
  app.setThread(threadId);
  document.title = "conversation · runcast";
  const canChange = app.can("change");

  let thread = null; // ThreadInfo
  let turns = new Map(); // turn_id -> turn (every turn, branches included)
  let children = new Map(); // parent_id ("" for the root) -> [turn], oldest first
  let path = []; // the active path, oldest first
  let busy = false;
  const live = new Map(); // turn_id -> {model, view, off}: assistant turns being written

  let sideChoice = null; // the side branch shown, by its user turn's id (null: the newest)
  let gone = false; // not found, or deleted: nothing more to read

  const title = h("h1", { tabindex: "-1", dataset: { testid: "thread-title" } }, "Conversation");
  const notice = h("p", { class: "notice", role: "status", "aria-live": "polite", dataset: { testid: "thread-notice" } });
  const titling = titleEditor({
    display: title,
    value: null,
    canEdit: app.can("rename"),
    label: "Conversation title",
    placeholder: "Untitled conversation",
    name: () => "this conversation",
    announce: (text) => (notice.textContent = text),
    save: async (value) => {
      await client.updateThread(threadId, { title: value });
      await load();
    },
  });
  const revision = h("span", { class: "hint", dataset: { testid: "thread-revision" } });
  const stop = h("button", { type: "button", class: "danger", hidden: true, onclick: onStop }, "Stop");
  const undo = h("button", { type: "button", hidden: !canChange, onclick: () => op("undo") }, "Undo last exchange");
  const reflect = h(
    "button",
    {
      type: "button",
      hidden: !canChange,
      title: "ask for a reflection on a side branch; the conversation stays where it is",
      dataset: { testid: "reflect" },
      onclick: () => op("aside", { content: REFLECT_PROMPT, ...agentField() }),
    },
    "Reflect",
  );
  const remove = h(
    "button",
    { type: "button", class: "danger", hidden: !app.can("delete"), dataset: { testid: "delete-thread" }, onclick: onDelete },
    "Delete",
  );
  const readOnly = h("span", { class: "read-only", dataset: { testid: "read-only" }, hidden: canChange }, "Read-only");
  const list = h("ol", { class: "turns", dataset: { testid: "turns" }, "aria-live": "polite" });
  const sides = h("section", {
    class: "side-branches",
    "aria-label": "side branches",
    "aria-live": "polite",
    dataset: { testid: "side-branches" },
    hidden: true,
  });
  const agent = h("select", { id: "thread-agent", dataset: { testid: "thread-agent" } }, h("option", { value: "" }, "server default"));
  const textarea = h("textarea", {
    id: "composer",
    rows: 2,
    required: true,
    placeholder: "Write a message (Enter sends, Shift+Enter for a new line)",
    dataset: { testid: "composer" },
    onkeydown: (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
        e.preventDefault();
        composer.requestSubmit();
      }
    },
  });
  const send = h("button", { type: "submit", class: "primary", dataset: { testid: "send" } }, "Send");
  const composer = h(
    "form",
    {
      class: "composer",
      hidden: !canChange,
      onsubmit: async (e) => {
        e.preventDefault();
        const content = textarea.value.trim();
        if (!content) return;
        if (await op("send", { content, ...agentField() })) textarea.value = "";
        textarea.focus();
      },
    },
    h("label", { for: "composer", class: "visually-hidden" }, "Message"),
    textarea,
    h("div", { class: "actions" }, h("label", { for: "thread-agent" }, "Agent "), agent, send),
  );
  const view = h(
    "article",
    { class: "thread-view", dataset: { testid: "thread-view", threadId } },
    h(
      "header",
      { class: "run-head" },
      h("div", { class: "run-title" }, titling.element, h("code", { title: threadId }, shortId(threadId)), revision),
      h("div", { class: "run-stats" }, readOnly, reflect, stop, undo, remove),
    ),
    notice,
    list,
    sides,
    composer,
  );
  root.replaceChildren(view);

  app.agentsReady.then(() => {
    agent.append(...app.agents.map((a) => h("option", { value: a.name }, a.name)));
  });

  function agentField() {
    return agent.value ? { agent: agent.value } : {};
  }

  // -- reading the thread ----------------------------------------------------------------
  let loading = null;
  let again = false;

  /** Read the thread with every turn; coalesces calls made while a read is in flight. */
  function load() {
    if (gone) return Promise.resolve();
    if (loading) {
      again = true;
      return loading;
    }
    loading = (async () => {
      try {
        do {
          again = false;
          const body = await client.api(`/api/threads/${threadId}`, { query: { all: "true" } });
          if (gone) return;
          setThread(body);
        } while (again);
      } catch (err) {
        if (err.code === "not_found") showGone("not_found");
        else notice.textContent = `Could not read the conversation: ${errorText(err)}`;
      } finally {
        loading = null;
      }
    })();
    return loading;
  }

  function setThread(body) {
    thread = body;
    turns = new Map((body.turns || []).map((t) => [t.turn_id, t]));
    children = new Map();
    for (const t of turns.values()) {
      const key = t.parent_id ?? "";
      if (!children.has(key)) children.set(key, []);
      children.get(key).push(t);
    }
    for (const siblings of children.values()) siblings.sort(byCreated);
    path = [];
    for (let id = body.head; id && turns.has(id); id = turns.get(id).parent_id) path.push(turns.get(id));
    path.reverse();
    render();
  }

  // -- rendering -------------------------------------------------------------------------
  const rendered = new Map(); // turn_id -> {key, element}: unchanged turns keep their DOM

  function render() {
    revision.textContent = `revision ${thread.revision}`;
    revision.dataset.revision = String(thread.revision);
    title.textContent = thread.title || "Conversation";
    title.classList.toggle("untitled", !thread.title);
    titling.set(thread.title);
    document.title = `${thread.title || "conversation"} · runcast`;
    stop.hidden = !thread.active_run_id || !app.can("stop");
    undo.disabled = !path.some((t) => t.role === "user");
    reflect.disabled = !path.length;
    const lastAssistant = lastAssistantPosition();
    const items = path.map((turn, position) => {
      const siblings = (children.get(turn.parent_id ?? "") || []).filter((t) => t.role === turn.role);
      const key = JSON.stringify([turn, siblings.map((t) => t.turn_id), position === lastAssistant]);
      let entry = rendered.get(turn.turn_id);
      if (!entry || entry.key !== key) {
        entry = { key, element: renderTurn(turn, siblings, position === lastAssistant) };
        rendered.set(turn.turn_id, entry);
      }
      return entry.element;
    });
    const onPath = new Set(path.map((t) => t.turn_id));
    for (const turnId of rendered.keys()) if (!onPath.has(turnId)) rendered.delete(turnId);
    const shown = renderSides(onPath);
    for (const [turnId, entry] of live) {
      if (shown.has(turnId) && !TERMINAL_STATUSES.has(turns.get(turnId)?.status)) continue;
      entry.off();
      app.runs.release(entry.model);
      live.delete(turnId);
    }
    if (!path.length) items.push(h("li", { class: "hint empty" }, "No messages yet. Say something below."));
    const current = [...list.children];
    if (items.length === current.length && items.every((el, k) => el === current[k])) return;
    // Keep the keyboard where it was: the same action on the turn at the same position.
    const memory = rememberFocus();
    list.replaceChildren(...items);
    if (busy) setBusy(true); // new buttons wait for the op too
    else if (memory && !memory.element.isConnected) restoreFocus(memory);
  }

  /**
   * The side branches under the head: user turns hanging from it off the active path
   * (what Reflect makes; also what a rewind leaves). The newest shows, with the branch
   * switcher between them; the head does not move until "Continue on this branch".
   * Returns the ids of every turn on the page (the path and the side branch shown).
   */
  function renderSides(onPath) {
    const shown = new Set(onPath);
    const branches = (children.get(thread.head ?? "") || []).filter((t) => t.role === "user" && !onPath.has(t.turn_id));
    if (!branches.length) {
      sideChoice = null;
      if (!sides.hidden) sides.replaceChildren();
      sides.hidden = true;
      return shown;
    }
    let position = branches.findIndex((t) => t.turn_id === sideChoice);
    if (position < 0) position = branches.length - 1;
    const question = branches[position];
    const answers = (children.get(question.turn_id) || []).filter((t) => t.role === "assistant");
    const answer = answers[answers.length - 1] || null;
    shown.add(question.turn_id);
    if (answer) shown.add(answer.turn_id);
    const key = JSON.stringify([question, answer, branches.map((t) => t.turn_id), position]);
    sides.hidden = false;
    if (sides.dataset.key === key) return shown;
    sides.dataset.key = key;
    const had = sides.contains(document.activeElement) ? document.activeElement.dataset.action : null;
    const pick = (k) => {
      sideChoice = branches[k].turn_id;
      render();
    };
    const switcher =
      branches.length > 1
        ? h(
            "span",
            { class: "branches", dataset: { testid: "branch-switcher" }, role: "group", "aria-label": "side branches" },
            h("button", { type: "button", class: "small", dataset: { action: "previous-branch" }, "aria-label": "previous side branch", disabled: position === 0, onclick: () => pick(position - 1) }, "‹"),
            h("span", { dataset: { testid: "branch-label" } }, `${position + 1} / ${branches.length}`),
            h("button", { type: "button", class: "small", dataset: { action: "next-branch" }, "aria-label": "next side branch", disabled: position === branches.length - 1, onclick: () => pick(position + 1) }, "›"),
          )
        : null;
    const answerBody = !answer
      ? h("p", { class: "hint" }, "No answer yet.")
      : answer.run_id && !TERMINAL_STATUSES.has(answer.status)
        ? liveBody(answer)
        : h("div", { class: "content", dataset: { testid: "turn-content" } }, answer.content || "");
    const actions = h("div", { class: "turn-actions" });
    if (canChange) {
      actions.append(
        h(
          "button",
          { type: "button", class: "small", dataset: { action: "continue-branch", testid: "continue-branch" }, onclick: () => switchTo(question) },
          "Continue on this branch",
        ),
      );
    }
    if (answer?.run_id) actions.append(h("a", { href: `#/runs/${answer.run_id}`, class: "small" }, "run"));
    sides.replaceChildren(
      h(
        "div",
        { class: "turn-head" },
        h("h2", {}, "Side branch"),
        switcher,
        h("span", { class: "hint" }, "off the conversation: it goes on from the last turn above"),
      ),
      h(
        "div",
        { class: "turn role-user", dataset: { testid: "side-turn", turnId: question.turn_id, role: "user" } },
        h("div", { class: "turn-head" }, h("span", { class: "role" }, "You")),
        h("div", { class: "content", dataset: { testid: "turn-content" } }, question.content || ""),
      ),
      answer
        ? h(
            "div",
            { class: "turn role-assistant", dataset: { testid: "side-turn", turnId: answer.turn_id, role: "assistant" } },
            h("div", { class: "turn-head" }, h("span", { class: "role" }, "Assistant"), answer.status !== "completed" ? statusBadge(answer.status) : null),
            answerBody,
          )
        : answerBody,
      actions,
    );
    if (busy) setBusy(true);
    if (had) (sides.querySelector(`[data-action="${had}"]:not(:disabled)`) || sides.querySelector("button:not(:disabled)"))?.focus();
    return shown;
  }

  function lastAssistantPosition() {
    for (let k = path.length - 1; k >= 0; k--) if (path[k].role === "assistant") return k;
    return -1;
  }

  function renderTurn(turn, siblings, isLastAssistant) {
    const position = siblings.findIndex((t) => t.turn_id === turn.turn_id);
    // Switching branches moves the head (a rewind): a read-only token sees where it is only.
    const switcher =
      siblings.length > 1
        ? h(
            "span",
            { class: "branches", dataset: { testid: "branch-switcher" }, role: "group", "aria-label": "branches" },
            h(
              "button",
              { type: "button", class: "small", hidden: !canChange, dataset: { action: "previous-branch" }, "aria-label": "previous branch", disabled: position === 0, onclick: () => switchTo(siblings[position - 1]) },
              "‹",
            ),
            h("span", { dataset: { testid: "branch-label" } }, `${position + 1} / ${siblings.length}`),
            h(
              "button",
              { type: "button", class: "small", hidden: !canChange, dataset: { action: "next-branch" }, "aria-label": "next branch", disabled: position === siblings.length - 1, onclick: () => switchTo(siblings[position + 1]) },
              "›",
            ),
          )
        : null;
    const running = turn.role === "assistant" && turn.run_id && !TERMINAL_STATUSES.has(turn.status);
    let body;
    if (running) {
      body = liveBody(turn);
    } else {
      body = h("div", { class: "content", dataset: { testid: "turn-content" } }, turn.content || "");
    }
    const actions = h("div", { class: "turn-actions" });
    if (canChange) appendTurnActions(actions, turn, isLastAssistant);
    if (turn.run_id) actions.append(h("a", { href: `#/runs/${turn.run_id}`, class: "small" }, "run"));
    return h(
      "li",
      { class: `turn role-${turn.role}`, dataset: { testid: "turn", turnId: turn.turn_id, role: turn.role } },
      h(
        "div",
        { class: "turn-head" },
        h("span", { class: "role" }, turn.role === "user" ? "You" : "Assistant"),
        switcher,
        turn.role === "assistant" && turn.status !== "completed" ? statusBadge(turn.status) : null,
      ),
      body,
      actions,
    );
  }

  function appendTurnActions(actions, turn, isLastAssistant) {
    if (turn.role === "user") {
      actions.append(h("button", { type: "button", class: "small", dataset: { action: "edit" }, onclick: (e) => startEdit(e.target.closest("li"), turn) }, "Edit"));
    }
    if (isLastAssistant) {
      actions.append(
        h("button", { type: "button", class: "small", dataset: { testid: "regenerate", action: "regenerate" }, onclick: () => op("regenerate", agentField()) }, "Regenerate"),
      );
    }
    actions.append(
      h("button", { type: "button", class: "small", dataset: { action: "rewind" }, title: "make this turn the end of the conversation", onclick: () => op("rewind", { turn_id: turn.turn_id }) }, "Rewind here"),
    );
  }

  /** The body of an assistant turn whose run is still writing it: streamed from the run. */
  function liveBody(turn) {
    let entry = live.get(turn.turn_id);
    if (!entry) {
      const model = app.runs.acquire(turn.run_id);
      const view = new MessageView({ testid: "turn" });
      const off = model.listen(() => {
        view.update(model.state);
        if (model.ended) load(); // the turn's final content and status
      });
      entry = { model, view, off };
      live.set(turn.turn_id, entry);
      view.update(model.state);
    }
    return entry.view.element;
  }

  /** Edit a user turn: Send (a sibling turn, answered by a new run) or Save (a sibling
   * turn that becomes the head, and no run: `edit` with `run: false`). */
  function startEdit(item, turn) {
    const box = h("textarea", { rows: 2, "aria-label": "edited message", dataset: { testid: "edit-box" } }, turn.content);
    let answer = true; // which button submitted the form
    const form = h(
      "form",
      {
        class: "edit-form",
        onsubmit: async (e) => {
          e.preventDefault();
          const fields = answer ? { ...agentField() } : { run: false };
          if (await op("edit", { turn_id: turn.turn_id, content: box.value, ...fields })) {
            if (!answer) notice.textContent = "Saved: no answer was asked for.";
            return;
          }
          box.focus();
        },
        onkeydown: (e) => {
          if (e.key === "Escape") cancel();
        },
      },
      box,
      h(
        "div",
        { class: "actions" },
        h("button", { type: "submit", class: "primary", dataset: { testid: "edit-send" }, onclick: () => (answer = true) }, "Send"),
        h(
          "button",
          { type: "submit", dataset: { testid: "edit-save" }, title: "keep the edited message without asking for an answer", onclick: () => (answer = false) },
          "Save",
        ),
        h("button", { type: "button", onclick: () => cancel() }, "Cancel"),
      ),
    );
    function cancel() {
      rendered.delete(turn.turn_id); // drop the element holding the form
      render();
      list.querySelector(`[data-turn-id="${turn.turn_id}"] [data-action="edit"]`)?.focus();
    }
    item.querySelector(".content").replaceWith(form);
    item.querySelector(".turn-actions").hidden = true;
    box.focus();
  }

  /** Show sibling `turn`'s branch: rewind to the newest end of the branch under it. */
  function switchTo(turn) {
    let end = turn;
    for (;;) {
      const next = children.get(end.turn_id);
      if (!next?.length) break;
      end = next[next.length - 1];
    }
    return op("rewind", { turn_id: end.turn_id });
  }

  // -- operations ------------------------------------------------------------------------
  /** Run a thread op at the revision shown; true when it was applied. */
  async function op(name, fields = {}) {
    if (!busy && !thread && !gone) await load(); // sent before the first read came back
    if (busy || !thread) return false;
    setBusy(true);
    notice.textContent = "";
    try {
      const result = await client.threadOp(name, threadId, { ...fields, expected_revision: thread.revision });
      if (result.run) app.noteRun(result.run);
      await load();
      return true;
    } catch (err) {
      notice.textContent =
        err.code === "conflict"
          ? "The conversation changed in another tab; it is up to date now. Try again."
          : err.code === "run_in_progress"
            ? "A run is still answering: wait for it, or stop it."
            : errorText(err);
      await load();
      return false;
    } finally {
      setBusy(false);
    }
  }

  /** While an op and the read after it are under way, its buttons are disabled: a second
   * click would act on a revision about to change. */
  let focusMemory = null; // where the keyboard was when the op began

  function setBusy(flag) {
    if (flag && !busy) focusMemory = rememberFocus();
    busy = flag;
    view.setAttribute("aria-busy", String(flag));
    for (const button of view.querySelectorAll("button")) {
      if (flag && !button.disabled) {
        button.disabled = true;
        button.dataset.busy = "";
      } else if (!flag && "busy" in button.dataset) {
        button.disabled = false;
        delete button.dataset.busy;
      }
    }
    if (!flag && focusMemory) {
      restoreFocus(focusMemory);
      focusMemory = null;
    }
  }

  /** The focused control as (turn position, action), which survives a re-render. */
  function rememberFocus() {
    const focused = document.activeElement;
    if (!focused || !list.contains(focused)) return null;
    return { element: focused, at: [...list.children].indexOf(focused.closest("li")), action: focused.dataset.action };
  }

  function restoreFocus(memory) {
    if (memory.element.isConnected && !memory.element.disabled) {
      memory.element.focus();
      return;
    }
    const item = list.children[Math.min(memory.at, list.children.length - 1)];
    const target =
      item?.querySelector(`[data-action="${memory.action}"]:not(:disabled)`) || item?.querySelector("button:not(:disabled)");
    target?.focus();
  }

  async function onDelete() {
    const name = thread?.title ? `“${thread.title}”` : "This conversation";
    const confirmed = await confirmDialog({
      title: "Delete this conversation?",
      body: `${name}, its turns and its runs will be erased for good. This cannot be undone.`,
      confirmLabel: "Delete for good",
    });
    if (!confirmed || gone) return;
    remove.disabled = true;
    try {
      await app.deleteThread(threadId);
      app.flash = `${name} was deleted.`;
      app.navigate("#/threads");
    } catch (err) {
      remove.disabled = false;
      notice.textContent =
        err.code === "run_in_progress" ? "A run is active in this conversation: stop it first, then delete." : `Could not delete: ${errorText(err)}`;
      remove.focus();
    }
  }

  /** The conversation is not there (any more): say so instead of showing it. */
  function showGone(reason) {
    if (gone) return;
    gone = true;
    const deleted = reason === "deleted";
    document.title = `conversation ${deleted ? "deleted" : "not found"} · runcast`;
    const heading = h("h1", { tabindex: "-1" }, deleted ? "Conversation deleted" : "Conversation not found");
    view.replaceChildren(
      heading,
      h(
        "p",
        { class: "run-error", role: "alert", dataset: { testid: "thread-gone", reason } },
        deleted ? "This conversation was deleted: its turns and runs are gone for good." : `There is no conversation ${threadId}.`,
      ),
      h("p", {}, h("a", { href: "#/threads" }, "Back to the conversations")),
    );
    view.removeAttribute("aria-busy");
    for (const entry of live.values()) {
      entry.off();
      app.runs.release(entry.model);
    }
    live.clear();
    if (document.activeElement === document.body || !document.activeElement?.isConnected) heading.focus();
  }

  async function onStop() {
    if (!thread?.active_run_id) return;
    try {
      await app.stop(thread.active_run_id);
    } catch (err) {
      notice.textContent = `Stop failed: ${errorText(err)}`;
    }
  }

  const off = app.onThread((frame) => {
    if (frame.thread_id !== threadId) return;
    if (frame.change === "deleted") showGone("deleted");
    else load();
  });
  load();
  return () => {
    off();
    for (const entry of live.values()) {
      entry.off();
      app.runs.release(entry.model);
    }
    live.clear();
  };
}

function byCreated(a, b) {
  return a.created_at - b.created_at || (a.turn_id < b.turn_id ? -1 : 1);
}
