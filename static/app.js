// The runcast page: the shell (connection state, access token, start form, recent runs),
// the router (#/, #/runs/{run_id}, #/threads, #/threads/{thread_id}) and the glue between
// views and the client.
//
// On load the page reads GET /api/health. A server in token mode (PROTOCOL.md §8) gets
// the token of a share link (#/runs/{id}?token=..., taken out of the address bar at
// once) or the one this tab kept; without either the page asks for one and shows nothing
// else until the server takes it. A token refused later (revoked, expired: close 4401)
// brings the form back.

import { RuncastClient } from "./runcast.js";
import { checkToken, roleAllows, storedToken, storeToken, takeLinkToken, tokenGrant } from "./access.js";
import { RunRegistry } from "./model.js";
import { mountRunView } from "./run-view.js";
import { mountThreadList } from "./thread-list.js";
import { mountThreadView } from "./thread-view.js";
import { errorText, h, schemaForm, shortId, statusBadge, timeAgo } from "./ui.js";

const linkToken = takeLinkToken(); // first: before anything reads or records the address
const client = new RuncastClient({ autoConnect: false });
const runs = new RunRegistry(client);
let resolveAgents;

/** What the views share. */
const app = {
  client,
  runs,
  agents: [],
  agentsReady: new Promise((resolve) => {
    resolveAgents = resolve;
  }),
  threadId: null, // the current thread: its runs update live in the recent list
  auth: null, // "open" | "token", from GET /api/health (null until it answered)
  role: null, // the token's role when the page knows it ("viewer", ...), else null
  scope: null, // what a share token reaches ({kind, id}); null: everything its role allows
  flash: null, // a result for the next view to announce (e.g. "Deleted ..." after leaving a view)
  _threadListeners: new Set(),

  /** May this page's token `action` ("stop", "share", ...)? Unknown roles may try. */
  can(action) {
    if (app.auth !== "token") return true;
    // A share reaches one run or thread, never the server: no new thread, no new run there.
    if (app.scope && (action === "start" || action === "create")) return false;
    return roleAllows(app.role, action);
  },

  /** A read-only share link of a run (PROTOCOL.md §8): {share_id, token, url, ...}. */
  share(runId, { role = "viewer", expiresInS = 86_400 } = {}) {
    return client.api(`/api/runs/${runId}/share`, { method: "POST", body: { role, expires_in: expiresInS } });
  },

  revokeShare(shareId) {
    return client.api(`/api/shares/${shareId}`, { method: "DELETE" });
  },

  /** Rename a run (PATCH, PROTOCOL.md §5): its RunInfo, also noted where the page shows it. */
  async renameRun(runId, title) {
    const info = await client.updateRun(runId, { title });
    runs.models.get(runId)?.model.updateInfo(info);
    noteRun(info);
    return info;
  },

  /** Delete a run for good (admin); every view of it here says so. */
  async deleteRun(runId) {
    await client.deleteRun(runId);
    forgetRun(runId);
  },

  /** Delete a thread, its turns and its runs for good (admin). */
  async deleteThread(threadId) {
    await client.deleteThread(threadId);
    forgetThread(threadId);
  },

  navigate(hash) {
    if (location.hash === hash) route();
    else location.hash = hash;
  },

  /** Stop over the socket; over HTTP when the socket is down. Any tab may stop any run. */
  async stop(runId) {
    try {
      return await client.stop(runId);
    } catch (err) {
      if (err.code !== "disconnected") throw err;
      return client.api(`/api/runs/${runId}/stop`, { method: "POST" });
    }
  },

  async respond(runId, requestId, value) {
    try {
      return await client.respond(runId, requestId, value);
    } catch (err) {
      if (err.code !== "disconnected") throw err;
      return client.api(`/api/runs/${runId}/respond`, { method: "POST", body: { request_id: requestId, value } });
    }
  },

  /** Make `threadId` the current thread: watch it (one watch at a time). */
  setThread(threadId) {
    if (!threadId || threadId === app.threadId) return;
    app._watch?.close();
    app.threadId = threadId;
    app._watch = client.watchThread(threadId, {
      onChange: (frame) => {
        if (frame.run) noteRun(frame.run);
        for (const fn of app._threadListeners) fn(frame);
        if (frame.change === "deleted") forgetThread(frame.thread_id);
      },
      onWatch: (thread) => {
        for (const fn of app._threadListeners) fn({ type: "watch", thread_id: thread.thread_id, thread });
      },
      onError: () => {
        if (app.threadId !== threadId) return;
        app.threadId = null; // no such thread: nothing to show as current
        renderThreadBox();
        renderStartThreadChoice();
      },
    });
    renderThreadBox();
    renderStartThreadChoice();
  },

  /** Listen to the current thread's frames (and re-watch replies); returns an off function. */
  onThread(fn) {
    app._threadListeners.add(fn);
    return () => app._threadListeners.delete(fn);
  },

  noteRun(info) {
    noteRun(info);
    app.setThread(info.thread_id);
  },
};
window.runcast = app; // for the console, and for the browser tests

// -- connection state --------------------------------------------------------------------

const conn = document.getElementById("conn");
const connLabel = conn.querySelector(".label");
const retryNow = conn.querySelector("button");
let countdown = null;
retryNow.addEventListener("click", () => client.connect());

client.on("state", ({ state, retryAt, attempt }) => {
  conn.dataset.state = state;
  clearInterval(countdown);
  retryNow.hidden = state !== "reconnecting";
  if (state === "reconnecting") {
    const tick = () => {
      const seconds = Math.max(0, (retryAt - Date.now()) / 1000);
      connLabel.textContent = `Reconnecting in ${seconds.toFixed(1)} s (attempt ${attempt})`;
    };
    tick();
    countdown = setInterval(tick, 100);
  } else {
    connLabel.textContent = {
      idle: "Not connected",
      connecting: "Connecting…",
      connected: "Connected",
      offline: "Offline: waiting for the network",
      unauthorized: "Token refused",
      closed: "Closed",
    }[state];
  }
  // The server was out of reach when the page loaded: learn its mode when it is back.
  if (state === "reconnecting" && app.auth === null) {
    readHealth().then(() => {
      if (app.auth !== "token" || client.token || !authBox.hidden) return;
      client.disconnect();
      askForToken("This runcast server asks for an access token.");
    });
  }
});

// A run this tab subscribed to was deleted (PROTOCOL.md §10).
client.on("deleted", (frame) => forgetRun(frame.run_id));

client.on("welcome", (frame) => {
  if (typeof frame.role === "string" && frame.role !== app.role) {
    app.role = frame.role;
    renderAccess();
    route();
  }
  refreshRecent();
});

// -- access: the token ---------------------------------------------------------------------

const layout = document.getElementById("layout");
const authBox = document.getElementById("auth");
const authWhy = document.getElementById("auth-why");
const tokenForm = document.getElementById("token-form");
const tokenInput = document.getElementById("token-input");
const tokenSubmit = document.getElementById("token-submit");
const tokenError = document.getElementById("token-error");
const forgetToken = document.getElementById("forget-token");
const startSection = document.getElementById("start-form").closest("section");

async function readHealth() {
  let health = null;
  try {
    // Read as it is: a degraded store answers 503, with the mode all the same.
    const response = await fetch(`${client.httpBase}/api/health`, { cache: "no-store" });
    health = await response.json();
  } catch {
    health = null;
  }
  if (typeof health?.auth !== "string") return null; // out of reach: the client retries
  app.auth = health.auth === "token" ? "token" : "open";
  return health;
}

async function boot() {
  const health = await readHealth();
  if (health && app.auth === "open") {
    storeToken(null); // a token from a link or an earlier session is of no use here
    begin(null);
    return;
  }
  const token = linkToken || storedToken();
  if (token) begin(token);
  else if (app.auth === "token") askForToken("This runcast server asks for an access token.");
  else begin(null); // the server is out of reach: connect, and learn its mode when it answers
}

/** Use `token` (null: none): connect, load what the page shows, show the route. */
function begin(token) {
  storeToken(token);
  client.setToken(token);
  const grant = tokenGrant(token);
  app.role = grant?.role ?? null;
  app.scope = grant?.scope ?? null;
  authBox.hidden = true;
  layout.hidden = false;
  renderAccess();
  if (client.state === "idle" || client.state === "unauthorized") client.connect();
  loadAgents();
  route();
}

/** Hide everything but the token form, which says `why`. */
function askForToken(why, error = "") {
  unmount?.();
  unmount = null;
  main.replaceChildren();
  app._watch?.close();
  app._watch = null;
  app.threadId = null;
  recent.clear();
  runs.collect();
  renderRecent();
  renderThreadBox();
  layout.hidden = true;
  authBox.hidden = false;
  forgetToken.hidden = true;
  authWhy.textContent = why;
  tokenError.textContent = error;
  tokenInput.removeAttribute("aria-invalid");
  tokenSubmit.disabled = false;
  document.title = "Access token · runcast";
  tokenInput.focus();
}

function renderAccess() {
  forgetToken.hidden = !client.token;
  startSection.hidden = !app.can("start");
}

tokenForm.addEventListener("submit", async (e) => {
  e.preventDefault();
  const token = tokenInput.value.trim();
  tokenError.textContent = "";
  if (!token) {
    tokenInput.setAttribute("aria-invalid", "true");
    tokenError.textContent = "Enter a token.";
    tokenInput.focus();
    return;
  }
  tokenSubmit.disabled = true;
  const check = await checkToken(client.httpBase, token);
  tokenSubmit.disabled = false;
  if (!check.ok) {
    tokenInput.setAttribute("aria-invalid", "true");
    tokenError.textContent = check.message;
    tokenInput.focus();
    return;
  }
  tokenInput.value = "";
  tokenInput.removeAttribute("aria-invalid");
  begin(token);
});

forgetToken.addEventListener("click", () => {
  storeToken(null);
  client.disconnect();
  client.setToken(null);
  app.role = null;
  app.scope = null;
  askForToken("The token is forgotten: this tab no longer holds one.");
});

client.on("auth", ({ code, closeCode, message }) => {
  if (app.auth === "open") return;
  if (code === "unauthorized") storeToken(null); // unknown, expired or revoked: of no use
  if (!authBox.hidden) return;
  // An HTTP 401 may leave the socket up: nothing more goes out without a token.
  if (client.state !== "unauthorized") client.disconnect();
  if (closeCode === 4401) askForToken("Your access token expired or was revoked. Enter another one to go on.");
  else if (code === "forbidden") askForToken("The server refused the connection.", message || "");
  else askForToken("The server no longer takes this tab's token. Enter another one to go on.");
});

// -- recent runs -------------------------------------------------------------------------

const recentList = document.getElementById("recent-runs");
const recent = new Map(); // run_id -> RunInfo

function noteRun(info) {
  const known = recent.get(info.run_id);
  const sameTitle = info.title === undefined || known?.title === info.title;
  if (known && known.status === info.status && known.updated_at >= info.updated_at && sameTitle) return;
  recent.set(info.run_id, { ...known, ...info });
  renderRecent();
}

function forgetRun(runId) {
  runs.markDeleted(runId);
  if (recent.delete(runId)) renderRecent();
}

function forgetThread(threadId) {
  runs.markThreadDeleted(threadId);
  for (const info of [...recent.values()]) if (info.thread_id === threadId) recent.delete(info.run_id);
  if (app.threadId === threadId) {
    app._watch?.close();
    app._watch = null;
    app.threadId = null;
    renderThreadBox();
    renderStartThreadChoice();
  }
  renderRecent();
}

async function refreshRecent() {
  try {
    const { runs: list } = await client.api("/api/runs", { query: { limit: 20 } });
    for (const info of list) recent.set(info.run_id, { ...recent.get(info.run_id), ...info });
    renderRecent();
  } catch (err) {
    recentList.replaceChildren(h("li", { class: "hint" }, `Could not list runs: ${errorText(err)}`));
  }
}

function renderRecent() {
  const items = [...recent.values()].sort((a, b) => b.created_at - a.created_at).slice(0, 20);
  const current = currentRunId();
  if (!items.length) {
    recentList.replaceChildren(h("li", { class: "hint" }, "No runs yet."));
    return;
  }
  recentList.replaceChildren(
    ...items.map((info) =>
      h(
        "li",
        { dataset: { runId: info.run_id }, class: info.thread_id === app.threadId ? "in-thread" : null },
        h(
          "a",
          { href: `#/runs/${info.run_id}`, "aria-current": info.run_id === current ? "page" : null },
          statusBadge(info.status),
          info.title ? h("span", { class: "run-name", dataset: { testid: "recent-title" } }, info.title) : null,
          h("span", { class: "agent" }, info.agent),
          h("code", {}, shortId(info.run_id)),
          h("time", { class: "hint" }, timeAgo(info.created_at)),
        ),
      ),
    ),
  );
}
setInterval(renderRecent, 30_000); // keeps "2 min ago" honest

// -- current thread ----------------------------------------------------------------------

const threadBox = document.getElementById("thread-box");

function renderThreadBox() {
  if (!app.threadId) {
    threadBox.replaceChildren(h("p", { class: "hint" }, "Runs you start or open join a thread; its runs update live here."));
    return;
  }
  threadBox.replaceChildren(
    h(
      "p",
      {},
      "Thread ",
      h("code", { title: app.threadId }, shortId(app.threadId)),
      " · ",
      h("a", { href: `#/threads/${app.threadId}` }, "open as conversation"),
    ),
  );
}

// -- the start form ----------------------------------------------------------------------

const startForm = document.getElementById("start-form");
const agentSelect = document.getElementById("agent");
const agentHelp = document.getElementById("agent-help");
const inputSlot = document.getElementById("agent-input");
const threadChoice = document.getElementById("thread-choice");
const startError = document.getElementById("start-error");
const startButton = document.getElementById("start");
const startTitle = document.getElementById("new-run-title");
let inputForm = null;

async function loadAgents() {
  try {
    const { agents } = await client.api("/api/agents");
    app.agents = agents;
    agentSelect.replaceChildren(...agents.map((a) => h("option", { value: a.name, selected: a.name === "demo" }, a.name)));
    agentSelect.disabled = false;
    startButton.disabled = false;
    agentHelp.textContent = "";
    renderAgentInput();
  } catch (err) {
    agentHelp.textContent = `Could not load agents: ${errorText(err)}`;
    if (err.status === 401) return; // the token form is shown; loaded again after it
  }
  resolveAgents();
}

// Input fields that only mean something for a run in a thread (the user turn it answers):
// shown when the run starts in the current thread, hidden otherwise.
const THREAD_FIELDS = ["content"];

function renderAgentInput() {
  const agent = app.agents.find((a) => a.name === agentSelect.value);
  agentHelp.textContent = agent?.description || "";
  inputForm = schemaForm(agent?.input_schema || { type: "object", properties: {} }, { prefix: "start", hidden: THREAD_FIELDS });
  inputSlot.replaceChildren(inputForm.element);
  showThreadFields();
}
agentSelect.addEventListener("change", renderAgentInput);

function inCurrentThread() {
  return Boolean(app.threadId) && threadChoice.querySelector("input[name=thread]:checked")?.value === "current";
}

/** The thread-only fields, and the choice of what to do with an active run, as they apply. */
function showThreadFields() {
  const inThread = inCurrentThread();
  for (const name of THREAD_FIELDS) inputForm?.show(name, inThread);
  const multitask = threadChoice.querySelector(".multitask");
  if (multitask) multitask.hidden = !inThread;
}
threadChoice.addEventListener("change", showThreadFields);

function renderStartThreadChoice() {
  if (!app.threadId) {
    threadChoice.replaceChildren();
    showThreadFields();
    return;
  }
  const checked = threadChoice.querySelector("input[name=thread]:checked")?.value ?? "new";
  threadChoice.replaceChildren(
    h(
      "fieldset",
      {},
      h("legend", {}, "Thread"),
      h("label", {}, h("input", { type: "radio", name: "thread", value: "new", checked: checked === "new" }), " a new thread"),
      h(
        "label",
        {},
        h("input", { type: "radio", name: "thread", value: "current", checked: checked === "current" }),
        " the current thread ",
        h("code", {}, shortId(app.threadId)),
      ),
      h(
        "label",
        { class: "multitask" },
        "If a run is active there: ",
        h(
          "select",
          { name: "multitask" },
          ["reject", "interrupt", "enqueue", "rollback"].map((m) => h("option", { value: m }, m)),
        ),
      ),
    ),
  );
  showThreadFields();
}

startForm.addEventListener("submit", async (e) => {
  e.preventDefault();
  startError.textContent = "";
  const read = inputForm.read();
  if (read.error) {
    startError.textContent = read.error;
    return;
  }
  const options = {};
  const title = startTitle.value.trim();
  if (title) options.title = title;
  if (inCurrentThread()) {
    options.threadId = app.threadId;
    options.multitask = threadChoice.querySelector("select[name=multitask]").value;
  }
  startButton.disabled = true;
  try {
    const { run } = await runs.start(agentSelect.value, read.value, options);
    noteRun(run);
    startTitle.value = "";
    app.navigate(`#/runs/${run.run_id}`);
  } catch (err) {
    startError.textContent =
      err.code === "run_in_progress"
        ? "A run is active in this thread: stop it, or choose what to do with it."
        : `Could not start: ${errorText(err)}`;
  } finally {
    startButton.disabled = false;
  }
});

// -- the router --------------------------------------------------------------------------

const main = document.getElementById("main");
let unmount = null;
let firstRoute = true;

function currentRunId() {
  const m = location.hash.match(/^#\/runs\/([\w-]+)/);
  return m ? m[1] : null;
}

function route() {
  if (!authBox.hidden) return; // nothing is shown until the server takes a token
  unmount?.();
  unmount = null;
  const hash = location.hash || "#/";
  let m;
  document.body.dataset.route = "home";
  if ((m = hash.match(/^#\/runs\/([\w-]+)\/?$/))) {
    document.body.dataset.route = "run";
    unmount = mountRunView(main, app, m[1]);
  } else if (/^#\/threads\/?$/.test(hash)) {
    document.body.dataset.route = "threads";
    unmount = mountThreadList(main, app);
  } else if ((m = hash.match(/^#\/threads\/([\w-]+)\/?$/))) {
    document.body.dataset.route = "thread";
    unmount = mountThreadView(main, app, m[1]);
  } else {
    document.title = "runcast";
    main.replaceChildren(
      h("h1", { tabindex: "-1" }, "Watch agent runs live"),
      h(
        "p",
        {},
        "Start a run, then open this page in a second tab: both stream the same run, either can stop it or answer it, ",
        "and a dropped connection picks up exactly where it left off.",
      ),
      h("p", {}, "Or ", h("a", { href: "#/threads" }, "start a conversation"), " with turns you can edit, regenerate and rewind."),
      ...(hash === "#/" || hash === "#" ? [] : [h("p", { class: "run-error" }, `Nothing at ${hash}.`)]),
    );
  }
  runs.collect();
  renderRecent();
  if (!firstRoute) main.querySelector("h1")?.focus();
  firstRoute = false;
}

window.addEventListener("hashchange", () => {
  // A share link opened in this tab: its token replaces the one held.
  const token = takeLinkToken();
  if (token && token !== client.token && app.auth !== "open") begin(token);
  else route();
});
renderThreadBox();
boot();

