// The run view (#/runs/{run_id}): the message streaming live, status, watchers, usage,
// Stop, the input form of a run in requires_action, a read-only share link (token mode),
// and the replay panel: the raw event log with indexes (a virtual list paged from the
// server, event-log.js) and a time-travel slider that shows the server's snapshot at its
// index. The view opens from the run's snapshot (model.js), so a run of a million events
// shows its status and text at once, and what the page holds does not grow with the run.
// The title is renamed in place (operator and above); an admin may delete an ended run,
// after a confirmation. A read-only token sees the run without Stop, answer, Share or
// Rename. A deleted run's view says so (PROTOCOL.md §10).

import { confirmDialog, eyeIcon, h, json, MessageView, schemaForm, shortId, statusBadge, errorText, timeAgo, titleEditor } from "./ui.js";
import { initialState, TERMINAL_STATUSES } from "./runcast.js";
import { EventLog } from "./event-log.js";

const SNAPSHOT_DELAY_MS = 80; // the slider asks for a snapshot once it rests this long
// Keyboard: the slider (arrow keys, Home, End) moves through the events; the index
// buttons in the inspector are for the mouse and stay out of the tab order.

/** Mounts the view of `runId` into `root`; returns a function that unmounts it. */
export function mountRunView(root, app, runId) {
  const model = app.runs.acquire(runId);
  const { client } = app;

  // -- header ----------------------------------------------------------------------------
  const title = h("h1", { id: "run-title", tabindex: "-1", dataset: { testid: "run-title" } }, "Run");
  const titling = titleEditor({
    display: title,
    value: null,
    canEdit: app.can("rename"),
    label: "Run title",
    placeholder: "Untitled run",
    name: () => "this run",
    announce: (text) => (notice.textContent = text),
    save: (value) => app.renameRun(runId, value),
  });
  const badge = h("span", { dataset: { testid: "run-status" }, class: "badge status-loading" }, "loading");
  const watchers = h("span", { class: "watchers", dataset: { testid: "watchers" }, title: "tabs watching this run" });
  const usage = h("span", { class: "usage", dataset: { testid: "usage" } });
  const stop = h(
    "button",
    { type: "button", class: "danger", dataset: { testid: "stop" }, onclick: onStop, hidden: !app.can("stop") },
    "Stop",
  );
  const readOnly = h("span", { class: "read-only", dataset: { testid: "read-only" }, hidden: app.can("stop") }, "Read-only");
  const shareButton = h(
    "button",
    {
      type: "button",
      dataset: { testid: "share" },
      onclick: onShare,
      hidden: !(app.auth === "token" && app.can("share")),
    },
    "Share read-only link",
  );
  const remove = h(
    "button",
    {
      type: "button",
      class: "danger",
      dataset: { testid: "delete-run" },
      title: "erase this run for good (an ended run only)",
      onclick: onDelete,
      hidden: !app.can("delete"),
    },
    "Delete",
  );
  const sharePanel = h("div", { class: "share-panel", dataset: { testid: "share-panel" }, hidden: true });
  const threadLink = h("a", { class: "thread-link" });
  const meta = h("p", { class: "meta" }, h("code", { title: runId }, shortId(runId)), " · ", threadLink, " · ", h("span", { class: "created" }));
  const notice = h("div", { class: "notice", role: "status", "aria-live": "polite" });

  // -- the message and the input form ----------------------------------------------------
  const message = new MessageView({ testid: "run" });
  const ending = h("p", { class: "ending", dataset: { testid: "run-ending" } });
  const inputSlot = h("div", { class: "input-slot" });
  let inputRequestId = null;

  // -- replay: inspector + time travel ---------------------------------------------------
  const slider = h("input", {
    type: "range",
    min: "0",
    max: "0",
    value: "0",
    step: "1",
    id: "tt-slider",
    dataset: { testid: "tt-slider" },
    "aria-label": "event index",
    oninput: () => pick(Number(slider.value)),
  });
  const ttIndex = h("output", { for: "tt-slider", dataset: { testid: "tt-index" } }, "0");
  const ttTotal = h("span", {}, "0");
  const ofIndex = h("span", {}, "0 "); // the slider's position, beside it
  const live = h("button", { type: "button", class: "small", onclick: () => follow(), "aria-pressed": "true" }, "Live");
  const back = h("button", { type: "button", class: "small", "aria-label": "previous event", onclick: () => step(-1) }, "◀");
  const fwd = h("button", { type: "button", class: "small", "aria-label": "next event", onclick: () => step(1) }, "▶");
  const ttMessage = new MessageView({ testid: "tt", live: false });
  const ttStatus = h("span", { dataset: { testid: "tt-status" } });
  const ttJson = h("pre", { class: "json", dataset: { testid: "tt-json", raw: "" } });
  // At "Live" the run is what the view above shows: the panel says so instead of
  // repeating it (its JSON is written only while someone reads it).
  const ttLive = h(
    "p",
    { class: "hint tt-live", dataset: { testid: "tt-live" } },
    "Live: the run as shown above. Move the slider, or click an index, to see it as it was at that event.",
  );
  const ttRaw = h("details", { class: "tt-raw", ontoggle: () => ttRaw.open && following && (ttJson.textContent = json(model.state)) }, h("summary", {}, "State as JSON"), ttJson);
  const ttPanel = h(
    "div",
    { class: "tt-panel", dataset: { testid: "tt-panel" } },
    h("div", { class: "tt-head" }, h("strong", {}, "Snapshot at "), ttIndex, " ", ttStatus),
    ttLive,
    ttMessage.element,
    ttRaw,
  );
  const log = new EventLog({ client, model, onPick: (i) => pick(i) });
  const replay = h(
    "section",
    { class: "replay", "aria-labelledby": "replay-title" },
    h("h2", { id: "replay-title" }, "Replay"),
    h(
      "div",
      { class: "tt-controls" },
      h("label", { for: "tt-slider" }, "Index"),
      back,
      slider,
      fwd,
      h("span", { class: "tt-of" }, ofIndex, "of ", ttTotal),
      live,
    ),
    h("div", { class: "replay-grid" }, log.element, ttPanel),
  );

  const view = h(
    "article",
    { class: "run-view", dataset: { testid: "run-view", runId } },
    h(
      "header",
      { class: "run-head" },
      h("div", { class: "run-title" }, titling.element, badge),
      h("div", { class: "run-stats" }, watchers, usage, readOnly, shareButton, stop, remove),
    ),
    meta,
    notice,
    sharePanel,
    message.element,
    ending,
    inputSlot,
    replay,
  );
  root.replaceChildren(view);

  // -- rendering -------------------------------------------------------------------------
  let following = true;
  let at = 0; // the slider's index when not following

  function render() {
    if (model.deleted || model.error) log.destroy(); // nothing more to read
    if (model.deleted) {
      if (view.dataset.deleted) return;
      view.dataset.deleted = "true";
      document.title = "run deleted · runcast";
      const heading = h("h1", { tabindex: "-1" }, "Run deleted");
      const hadFocus = view.contains(document.activeElement);
      view.replaceChildren(
        heading,
        h("p", { class: "run-error", role: "alert", dataset: { testid: "run-deleted" } }, `Run ${runId} was deleted: its events are gone for good.`),
        h("p", {}, h("a", { href: "#/" }, "Back to the start page")),
      );
      if (hadFocus || document.activeElement === document.body) heading.focus();
      return;
    }
    if (model.error) {
      const forbidden = model.error.code === "forbidden";
      title.textContent = forbidden ? "Run not available" : "Run not found";
      view.replaceChildren(
        h("h1", { tabindex: "-1" }, title.textContent),
        h(
          "p",
          { class: "run-error", role: "alert" },
          model.error.code === "not_found"
            ? `There is no run ${runId}.`
            : forbidden
              ? `This page's token does not reach run ${runId}.`
              : errorText(model.error),
        ),
        h("p", {}, h("a", { href: "#/" }, "Back to the start page")),
      );
      return;
    }
    const { state, info } = model;
    const status = shownStatus();
    if (info) {
      title.textContent = info.title || info.agent;
      titling.set(info.title);
      threadLink.textContent = `thread ${shortId(info.thread_id)}`;
      threadLink.href = `#/threads/${info.thread_id}`;
      meta.querySelector(".created").textContent = `started ${timeAgo(info.created_at)}`;
      app.noteRun(info);
    }
    badge.className = `badge status-${status ?? "loading"}`;
    badge.textContent = status ? status.replace("_", " ") : "loading";
    const ended = TERMINAL_STATUSES.has(status);
    const watching = ended || model.watchers === null ? "" : `${model.watchers} watching`;
    if (watchers.dataset.text !== watching) {
      watchers.dataset.text = watching;
      watchers.replaceChildren(...(watching ? [eyeIcon(), watching] : []));
    }
    const parts = Object.entries(state.usage).map(([k, v]) => `${k.replace(/_tokens$/, "").replace(/_/g, " ")} ${v}`);
    usage.textContent = parts.length ? `tokens: ${parts.join(" · ")}` : "";
    stop.disabled = ended || !info;
    remove.disabled = !ended || !info;
    if (ended && stop.textContent !== "Stop") stop.textContent = "Stop";
    message.update(state);
    ending.textContent = endingText(model);
    renderInput(state);
    renderReplay();
    document.title = `${status ?? "run"} · ${info?.agent ?? "run"} · runcast`;
  }

  /** The run's status, once its state is the server's (null while the snapshot is on
   * its way: the view shows a status and a slider only with the state that goes with them). */
  function shownStatus() {
    return model.opened ? model.state.status : null;
  }

  function renderInput(state) {
    const pending = state.status === "requires_action" ? state.pending_input : null;
    if (!pending) {
      if (inputRequestId !== null) inputSlot.replaceChildren();
      inputRequestId = null;
      return;
    }
    if (pending.request_id === inputRequestId) return; // keep what the user is typing
    inputRequestId = pending.request_id;
    if (!app.can("respond")) {
      inputSlot.replaceChildren(
        h(
          "p",
          { class: "input-form read-only", dataset: { testid: "input-read-only" } },
          h("strong", {}, "The run asks: "),
          pending.prompt || "input",
          " (this token may watch, not answer)",
        ),
      );
      return;
    }
    const form = schemaForm(pending.schema || { type: "string" }, { prefix: "input" });
    const send = h("button", { type: "submit", class: "primary" }, "Send answer");
    const error = h("p", { class: "run-error", role: "alert" });
    const el = h(
      "form",
      {
        class: "input-form",
        dataset: { testid: "input-form" },
        onsubmit: async (e) => {
          e.preventDefault();
          const read = form.read();
          if (read.error) {
            error.textContent = read.error;
            return;
          }
          send.disabled = true;
          send.textContent = "Sending…";
          try {
            await app.respond(runId, pending.request_id, read.value);
            error.textContent = "";
          } catch (err) {
            error.textContent = err.code === "not_waiting" ? "This request was already answered." : errorText(err);
            send.disabled = false;
            send.textContent = "Send answer";
          }
        },
      },
      h("p", { class: "prompt" }, h("strong", {}, "The run asks: "), pending.prompt || "input"),
      form.element,
      h("div", { class: "actions" }, send),
      error,
    );
    inputSlot.replaceChildren(el);
  }

  function renderReplay() {
    const last = model.lastIndex;
    slider.max = String(last);
    ttTotal.textContent = String(last);
    log.update();
    if (following) {
      slider.value = String(last);
      showLive(last);
    }
  }

  /** The panel at "Live": the index, and no second copy of the run's text. */
  function showLive(index) {
    setIndex(index);
    const status = shownStatus();
    ttStatus.replaceChildren(status ? statusBadge(status) : "", h("span", { class: "hint" }, " live"));
    ttLive.hidden = false;
    ttMessage.element.hidden = true;
    if (ttRaw.open) ttJson.textContent = json(model.state);
    live.setAttribute("aria-pressed", "true");
    rowsTraveling(false);
  }

  /** The panel showing the server's snapshot at `index`. */
  function showAt(index, state) {
    setIndex(index);
    ttStatus.replaceChildren(statusBadge(state.status));
    ttLive.hidden = true;
    ttMessage.element.hidden = false;
    ttMessage.update(state);
    ttJson.textContent = json(state);
    live.setAttribute("aria-pressed", "false");
    rowsTraveling(true);
  }

  function setIndex(index) {
    ttIndex.value = String(index);
    ttIndex.textContent = String(index);
    ofIndex.textContent = `${index} `;
    ttPanel.dataset.at = String(index);
  }

  function rowsTraveling(traveling) {
    log.element.classList.toggle("traveling", traveling);
  }

  // -- time travel -----------------------------------------------------------------------
  let fetchSeq = 0;
  let fetchTimer = null;

  function follow() {
    following = true;
    clearTimeout(fetchTimer);
    fetchSeq++;
    delete ttPanel.dataset.loading;
    log.mark(null);
    renderReplay();
  }

  function step(delta) {
    pick(Math.max(0, Math.min(model.lastIndex, (following ? model.lastIndex : at) + delta)));
  }

  /** Show the snapshot at `index`, read from GET /api/runs/{id}/snapshot?at=index. */
  function pick(index) {
    following = false;
    at = index;
    slider.value = String(index);
    ofIndex.textContent = `${index} `;
    live.setAttribute("aria-pressed", "false");
    ttPanel.dataset.loading = "true";
    log.mark(index);
    // Debounced: while the slider is dragged only its resting place is asked for.
    clearTimeout(fetchTimer);
    const seq = ++fetchSeq;
    fetchTimer = setTimeout(async () => {
      try {
        const snap =
          index === 0
            ? { index: 0, state: initialState() }
            : await client.api(`/api/runs/${encodeURIComponent(runId)}/snapshot`, { query: { at: index } });
        if (seq !== fetchSeq || following) return;
        delete ttPanel.dataset.loading;
        showAt(snap.index, snap.state);
      } catch (err) {
        if (seq !== fetchSeq) return;
        delete ttPanel.dataset.loading;
        ttStatus.textContent = errorText(err);
      }
    }, SNAPSHOT_DELAY_MS);
  }

  // -- actions ---------------------------------------------------------------------------
  async function onShare() {
    shareButton.disabled = true;
    try {
      const share = await app.share(runId);
      showShare(share);
    } catch (err) {
      notice.textContent = `Could not share: ${errorText(err)}`;
    } finally {
      shareButton.disabled = false;
    }
  }

  /** The share link, absolute, with Copy and Revoke. */
  function showShare(share) {
    const url = new URL(share.url, location.href).href;
    const input = h("input", {
      type: "url",
      id: "share-url",
      readonly: true,
      value: url,
      dataset: { testid: "share-url" },
      onfocus: () => input.select(),
    });
    const status = h("span", { class: "hint", role: "status", "aria-live": "polite", dataset: { testid: "share-status" } });
    const copy = h(
      "button",
      {
        type: "button",
        dataset: { testid: "share-copy" },
        onclick: async () => {
          try {
            await navigator.clipboard.writeText(url);
            status.textContent = "Copied.";
          } catch {
            input.focus();
            input.select();
            // The older way, where the clipboard API is not allowed (a page over plain http).
            status.textContent = document.execCommand("copy") ? "Copied." : "Select the link and copy it.";
          }
        },
      },
      "Copy",
    );
    const revoke = h(
      "button",
      {
        type: "button",
        class: "danger",
        dataset: { testid: "share-revoke" },
        onclick: async () => {
          revoke.disabled = true;
          try {
            await app.revokeShare(share.share_id);
            input.disabled = true;
            copy.disabled = true;
            status.textContent = "Revoked: the link no longer opens this run.";
          } catch (err) {
            revoke.disabled = false;
            status.textContent = `Could not revoke: ${errorText(err)}`;
          }
        },
      },
      "Revoke",
    );
    const expires = new Date(share.expires_at * 1000).toLocaleString();
    sharePanel.replaceChildren(
      h("label", { for: "share-url" }, `Read-only link (${share.role}): whoever holds it can watch this run until it expires`),
      h("div", { class: "share-row" }, input, copy, revoke),
      h("small", { class: "hint" }, `Expires ${expires}.`),
      status,
    );
    sharePanel.hidden = false;
    input.focus();
  }

  async function onDelete() {
    const name = model.info?.title ? `“${model.info.title}”` : `This ${model.info?.agent ?? ""} run`.replace("  ", " ");
    const confirmed = await confirmDialog({
      title: "Delete this run?",
      body: `${name} and its events will be erased for good. This cannot be undone.`,
      confirmLabel: "Delete for good",
    });
    if (!confirmed) return;
    remove.disabled = true;
    try {
      await app.deleteRun(runId); // the model is marked deleted: render() says so
    } catch (err) {
      remove.disabled = false;
      notice.textContent =
        err.code === "run_in_progress" ? "The run is still live: stop it first, then delete." : `Could not delete: ${errorText(err)}`;
      remove.focus();
    }
  }

  async function onStop() {
    stop.disabled = true;
    stop.textContent = "Stopping…";
    try {
      const result = await app.stop(runId);
      if (!result.stopping) notice.textContent = `The run had already ended (${result.status}).`;
    } catch (err) {
      notice.textContent =
        err.code === "forbidden" ? "This page's token may watch this run, not stop it." : `Stop failed: ${errorText(err)}`;
      stop.disabled = false;
      stop.textContent = "Stop";
    }
  }

  const off = model.listen(render);
  render();
  return () => {
    off();
    clearTimeout(fetchTimer);
    log.destroy();
    app.runs.release(model);
  };
}

/** Why a run ended, from its terminal status event (stopped and interrupted runs). */
function endingText(model) {
  const data = model.ending?.data;
  if (!data) return "";
  if (data.status === "stopped") {
    if (!data.by) return "Stopped.";
    if (data.by === model.client.connectionId) return "Stopped from this tab.";
    if (data.by === "http") return "Stopped over HTTP.";
    return `Stopped from another connection (${shortId(String(data.by))}).`;
  }
  if (data.status === "interrupted") return `Interrupted${data.reason ? ` (${data.reason})` : ""}.`;
  return "";
}
