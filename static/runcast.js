/**
 * runcast.js: a browser client for the runcast wire protocol, version 1 (PROTOCOL.md).
 *
 * A plain ES module with no dependencies and no build step. A page served by runcast
 * imports it from `/runcast.js`; another web app copies the file next to its own code
 * (a browser imports a module from another origin only with CORS headers) and passes
 * the server's address:
 *
 *     import { RuncastClient } from "./runcast.js";
 *
 *     const client = new RuncastClient({ url: "wss://runcast.example.com/ws", token });
 *     client.on("state", ({ state, retryAt }) => console.log("connection:", state));
 *     client.on("auth", ({ code }) => askForAnotherToken(code)); // then client.setToken(t)
 *     const { run, subscription } = await client.start("demo", { tokens: 20 }, {
 *       onEvent: (event) => console.log(event.i, event.type, event.data),
 *       onEnd: (event) => console.log("ended", event.data.status),
 *     });
 *     await client.stop(run.run_id);               // from any tab, not only the starter
 *
 * One client holds ONE WebSocket (make one per tab) and multiplexes every run
 * subscription and thread watch on it. When the socket drops, the client reconnects
 * with exponential backoff and full jitter and resumes every subscription from its
 * cursor (the index of the last event delivered) and epoch, so a callback sees every
 * event of a run exactly once, in order, with no gap, across any number of reconnects.
 * If the server's log was rewritten by a crash (a new epoch, PROTOCOL.md §4), the
 * subscription gets `onReset`, then `onSnapshot` with the state at the last index, then
 * the events after it.
 *
 * ## new RuncastClient(options?)
 *
 *   url          WebSocket URL (default: ws(s)://<location.host>/ws, the page's own server)
 *   httpBase     base URL of the HTTP API for `api()` (default: derived from `url`;
 *                from another origin, HTTP calls need the server to allow CORS)
 *   backoff      { initialMs: 250, maxMs: 10000, factor: 2 }: the retry delay is a
 *                random value in [d/2, d] with d = min(maxMs, initialMs * factor^attempt)
 *   heartbeatMs  send a `ping` after this long without any frame (default 15000); a
 *                ping unanswered for `heartbeatMs` closes the socket and reconnects
 *   requestTimeoutMs  a request without a reply after this long rejects (default 15000)
 *   token        a bearer token, for a server in token mode (PROTOCOL.md §8); see Access
 *   autoConnect  connect now (default true); otherwise call `connect()`
 *   WebSocket    constructor to use (default: globalThis.WebSocket)
 *
 * ## Connection
 *
 *   client.state        "idle" | "connecting" | "connected" | "reconnecting" | "offline"
 *                       | "unauthorized" | "closed"
 *   client.on(name, fn) listen; returns a function that removes the listener. Names:
 *     "state"    { state, attempt, retryAt (ms since the epoch; when "reconnecting"),
 *                  error? (why the socket went), reconnect (when "connected" again) }
 *     "welcome"  the server's welcome frame (after every (re)connect)
 *     "frame"    every parsed server frame (for inspectors and debugging)
 *     "thread"   every `thread` frame (also delivered to the watch's own callback)
 *     "deleted"  every `deleted` frame {type, run_id}: a run this connection subscribed
 *                to was erased (PROTOCOL.md §10); also delivered to its subscription
 *     "auth"     { code: "unauthorized" | "forbidden", message, closeCode?, status? }:
 *                the server refused this client's token (see Access)
 *   client.connect()    connect now (also: retry now while "reconnecting" or
 *                       "unauthorized")
 *   client.disconnect() close the socket and stay "idle" (no reconnect) until `connect()`;
 *                       subscriptions and watches are kept and resume then
 *   client.close()      close for good; pending requests reject with code "closed"
 *   client.stats        { connects, reconnects, framesIn, framesOut }
 *   client.connectionId the server's id for the current connection, or null
 *
 *   While the browser reports itself offline (`navigator.onLine === false` and the
 *   window's `offline` event) the client closes its socket at once, so that a dead
 *   link is noticed without waiting for TCP, and reconnects when `online` fires.
 *
 * ## Access (PROTOCOL.md §7, §8)
 *
 *   With `token`, the WebSocket offers the subprotocols ["runcast", "runcast.bearer." +
 *   token] (a browser cannot set headers on a WebSocket; the server selects "runcast")
 *   and every `api()` call sends `Authorization: Bearer TOKEN`. Without one, nothing is
 *   offered or sent: a server in open mode needs none.
 *
 *   A refusal is not an outage, so it is not retried: the client goes to state
 *   "unauthorized", rejects pending requests with that code, emits "auth" and waits for
 *   `setToken()` (or `connect()`). It is a refusal when
 *     - the socket is closed with 4401 (its token expired or was revoked) or 1008 (the
 *       handshake was refused by policy; the close reason says why);
 *     - the handshake fails before the socket opens (a browser cannot read the HTTP
 *       status of a refused handshake) and, when the client holds a token, a probe
 *       `GET {httpBase}/api/runs?limit=1` with it answers 401 or 403. A 429 probe waits
 *       its `retry_after` before the next attempt; anything else is an outage, retried
 *       with backoff as usual.
 *   An `api()` answer 401 emits "auth" too (the connection state is not touched).
 *
 *   client.token                 the token in use, or null
 *   client.setToken(token)       use `token` (null: none) from now on; an open or opening
 *                                socket is replaced at once by one that presents it (when
 *                                "idle" or "unauthorized", call `connect()` after it)
 *
 * ## Requests (each op gets exactly one reply, matched by `ref`)
 *
 *   client.request(op, fields?)  -> Promise<result>; rejects with RuncastError
 *                                   (`code`, `message`, `details`). While not connected
 *                                   it rejects at once with code "disconnected".
 *   client.start(agent, input, options?) -> { run, subscription }
 *       options: threadId, multitask, title, metadata, subscribe (default true), and the
 *       subscription callbacks below (used when subscribe is true).
 *   client.stop(runId)                     -> { stopping, status }
 *   client.respond(runId, requestId, value)-> {}
 *   client.ping()                          -> { t }
 *   client.threadOp(op, threadId, fields?) -> { thread, run } for the thread ops of
 *       PROTOCOL.md §6: "send" {content, agent?, multitask?, expected_revision?},
 *       "rewind" {turn_id}, "edit" {turn_id, content, run?} (`run: false` saves the edit
 *       and starts nothing; `run` is then null), "regenerate", "undo", "aside"
 *       {content, agent?} (a side run on its own branch under the head; the head stays).
 *   client.api(path, { method, body, query }?) -> Promise<JSON> over HTTP
 *       (`/api/...`, with the token); non-2xx answers reject with RuncastError (plus
 *       `status`, and `retry_after` on 429).
 *
 * ## Records over HTTP (PROTOCOL.md §5, §10)
 *
 *   client.listThreads({ limit?, cursor?, metadata? }) -> { threads, next_cursor }
 *   client.listRuns({ limit?, cursor?, status?, thread_id?, metadata? })
 *                                          -> { runs, next_cursor }
 *       newest first; pass the answer's `next_cursor` as `cursor` for the next page
 *       (null: that was the last one). `metadata` {KEY: VALUE} filters on metadata.
 *   client.updateThread(threadId, { title?, metadata?, expected_revision? }) -> ThreadInfo
 *   client.updateRun(runId, { title?, metadata? })                          -> RunInfo
 *       `metadata` is a JSON Merge Patch; a title of null clears it.
 *   client.deleteThread(threadId), client.deleteRun(runId) -> { deleted: true }
 *       erased for good (an admin token; a live run or busy thread answers
 *       run_in_progress). Subscribers get onDeleted, thread watchers a "deleted" change.
 *
 * ## Subscriptions
 *
 *   const sub = client.subscribe(runId, {
 *     after: 0,          // cursor: deliver events with i > after ("latest": only new ones)
 *     epoch: undefined,  // the epoch the cursor belongs to, if known
 *     snapshot: false,   // ask for a snapshot frame at `after` first
 *     presence: true,    // receive watcher counts
 *     onInfo(run)        // RunInfo, from each (re)subscribe reply
 *     onSnapshot(frame)  // {run_id, index, epoch, state}
 *     onEvent(event)     // one event {i, type, data, ts}, in order, exactly once
 *     onEvents(events)   // the same events, one array per frame (after onEvent calls)
 *     onPresence(n)      // number of connections watching the run
 *     onReset(epoch)     // the log was rewritten: drop what you hold; a snapshot follows
 *     onEnd(event)       // the terminal status event was delivered (null: the run had
 *                        // ended before a snapshot that said so); subscription is over
 *     onDeleted(frame)   // the run was deleted (PROTOCOL.md §10); subscription is over
 *     onError(error)     // the subscribe was refused (e.g. not_found); subscription over
 *   });
 *   sub.runId, sub.cursor, sub.epoch, sub.ended, sub.info (the latest RunInfo)
 *   sub.ready            // Promise of the first subscribe's RunInfo
 *   sub.close()          // unsubscribe
 *
 *   A client holds at most one subscription per run, as the server does: subscribing
 *   again to a run replaces (and closes) the earlier subscription.
 *
 * ## Thread watches
 *
 *   const watch = client.watchThread(threadId, {
 *     onChange(frame)    // {type: "thread", thread_id, change, run?, revision}; change
 *                        // "deleted" (PROTOCOL.md §10) is the last: the watch is over
 *     onWatch(thread)    // ThreadInfo, from each (re)watch reply: after a reconnect,
 *                        // re-read whatever you show (changes may have been missed)
 *     onError(error)
 *   });
 *   watch.close()
 *
 *   Several parts of a page may watch the same thread: the server holds one watch per
 *   thread and connection, and the client shares it between every open watch of that
 *   thread (it sends `unwatch_thread` when the last one closes).
 *
 * ## Helpers for folding events into a run's state (PROTOCOL.md §1)
 *
 *   initialState()          the state before any event
 *   applyEvent(state, ev)   folds one event into `state` IN PLACE; returns `state`
 *   foldEvents(events, s?)  a new state from events (on a deep copy of `s`)
 *   mergePatch(target, p)   RFC 7386 JSON Merge Patch (returns a new value)
 *   TERMINAL_STATUSES       Set of the terminal run statuses
 */

export const PROTOCOL_VERSION = 1;

export const TERMINAL_STATUSES = new Set(["completed", "failed", "stopped", "interrupted"]);

/** An error reply, an HTTP error, or a local failure ("disconnected", "timeout", "closed"). */
export class RuncastError extends Error {
  constructor(code, message, details = {}) {
    super(message || code);
    this.name = "RuncastError";
    this.code = code;
    this.details = details;
  }

  static fromWire(error, extra = {}) {
    const { code = "internal", message = "", ...details } = error || {};
    return new RuncastError(code, message, { ...details, ...extra });
  }
}

// -- the snapshot reducer ----------------------------------------------------------------

export function initialState() {
  return {
    status: "queued",
    message: { content: "", thinking: "", tools: [] },
    usage: {},
    pending_input: null,
    data: {},
    error: null,
  };
}

function isObject(value) {
  return value !== null && typeof value === "object" && !Array.isArray(value);
}

/** `object[key]` if it is the object's own key (never an inherited one such as "toString"). */
function own(object, key) {
  return Object.hasOwn(object, key) ? object[key] : undefined;
}

/** `object[key] = value` as a plain data key, even for "__proto__" (as in JSON). */
function setOwn(object, key, value) {
  Object.defineProperty(object, key, { value, writable: true, enumerable: true, configurable: true });
}

export function mergePatch(target, patch) {
  if (!isObject(patch)) return patch;
  const result = isObject(target) ? { ...target } : {};
  for (const [key, value] of Object.entries(patch)) {
    if (value === null) delete result[key];
    else setOwn(result, key, mergePatch(own(result, key), value));
  }
  return result;
}

export function applyEvent(state, event) {
  const data = event.data || {};
  const message = state.message;
  switch (event.type) {
    case "text":
      message.content += String(data.text ?? "");
      break;
    case "thinking":
      message.thinking += String(data.text ?? "");
      break;
    case "status":
      state.status = data.status;
      if (Object.hasOwn(data, "error")) state.error = data.error;
      break;
    case "tool_call":
      // A missing field is null, as the server's reducer has it (app/core/snapshot.py).
      message.tools.push({ id: data.id ?? null, name: data.name ?? null, args: data.args ?? null, status: "running" });
      break;
    case "tool_result": {
      // The latest call with this id gets the result; an unknown id changes nothing.
      const id = data.id ?? null;
      for (let k = message.tools.length - 1; k >= 0; k--) {
        const tool = message.tools[k];
        if ((tool.id ?? null) !== id) continue;
        const { output: _o, error: _e, ...rest } = tool;
        const failed = data.error !== undefined && data.error !== null;
        const updated = { ...rest };
        if (Object.hasOwn(data, "output")) updated.output = data.output;
        if (failed) updated.error = data.error;
        updated.status = failed ? "failed" : "completed";
        message.tools[k] = updated;
        break;
      }
      break;
    }
    case "usage":
      for (const [key, value] of Object.entries(data)) {
        if (typeof value === "number") setOwn(state.usage, key, (own(state.usage, key) ?? 0) + value);
      }
      break;
    case "input_required":
      state.pending_input = data;
      break;
    case "input_received":
      state.pending_input = null;
      break;
    case "state":
      state.data = mergePatch(state.data, data);
      break;
    default:
      break; // kept in the log only
  }
  return state;
}

export function foldEvents(events, state) {
  const result = state ? structuredClone(state) : initialState();
  for (const event of events) applyEvent(result, event);
  return result;
}

// -- the client --------------------------------------------------------------------------

const DEFAULT_BACKOFF = { initialMs: 250, maxMs: 10_000, factor: 2 };

function defaultUrl() {
  const loc = globalThis.location;
  if (!loc) throw new Error("RuncastClient: no location; pass options.url");
  return `${loc.protocol === "https:" ? "wss" : "ws"}://${loc.host}/ws`;
}

function httpBaseOf(wsUrl) {
  const url = new URL(wsUrl);
  url.protocol = url.protocol === "wss:" ? "https:" : "http:";
  url.pathname = url.pathname.replace(/\/ws\/?$/, "") || "/";
  url.search = "";
  return url.toString().replace(/\/$/, "");
}

export class RuncastClient {
  constructor(options = {}) {
    this.url = options.url || defaultUrl();
    this.httpBase = options.httpBase ?? httpBaseOf(this.url);
    this.backoff = { ...DEFAULT_BACKOFF, ...(options.backoff || {}) };
    this.heartbeatMs = options.heartbeatMs ?? 15_000;
    this.requestTimeoutMs = options.requestTimeoutMs ?? 15_000;
    this._WebSocket = options.WebSocket || globalThis.WebSocket;
    this._token = options.token || null;

    this.state = "idle";
    this.connectionId = null;
    this.stats = { connects: 0, reconnects: 0, framesIn: 0, framesOut: 0 };

    this._ws = null;
    this._listeners = new Map(); // name -> Set<fn>
    this._pending = new Map(); // ref -> {resolve, reject, timer, onReply}
    this._nextRef = 1;
    this._subs = new Map(); // run_id -> Subscription
    this._watches = new Map(); // thread_id -> WatchGroup (the handles that share one watch)
    this._attempt = 0;
    this._retryTimer = null;
    this._heartbeatTimer = null;
    this._lastFrameAt = 0;
    this._pingOutstanding = false;
    this._closed = false;
    this._attemptSeq = 0; // bumped by every connect(): a late probe of an older attempt is ignored

    this._onOffline = () => {
      if (this._closed || this.state === "idle" || this.state === "unauthorized") return;
      clearTimeout(this._retryTimer);
      this._retryTimer = null;
      this._dropSocket("the browser went offline");
      this._setState("offline");
    };
    this._onOnline = () => {
      if (this._closed || this.state !== "offline") return;
      this._attempt = 0;
      this.connect();
    };
    if (globalThis.addEventListener) {
      globalThis.addEventListener("offline", this._onOffline);
      globalThis.addEventListener("online", this._onOnline);
    }
    if (options.autoConnect !== false) this.connect();
  }

  // -- listeners ---------------------------------------------------------------------------

  on(name, fn) {
    if (!this._listeners.has(name)) this._listeners.set(name, new Set());
    this._listeners.get(name).add(fn);
    return () => this._listeners.get(name)?.delete(fn);
  }

  _emit(name, detail) {
    for (const fn of this._listeners.get(name) || []) {
      try {
        fn(detail);
      } catch (err) {
        reportError(err);
      }
    }
  }

  _setState(state, extra = {}) {
    this.state = state;
    this._emit("state", { state, attempt: this._attempt, ...extra });
  }

  // -- access ------------------------------------------------------------------------------

  get token() {
    return this._token;
  }

  /** Use `token` (null: none) from now on; a live or opening socket is replaced at once. */
  setToken(token) {
    this._token = token || null;
    if (this._closed) return;
    if (this._ws || this.state === "connecting" || this.state === "reconnecting") {
      this._replaceSocket();
      this.connect();
    }
  }

  _authHeaders() {
    return this._token ? { Authorization: `Bearer ${this._token}` } : {};
  }

  /** The server refused this client: no reconnect until setToken() or connect(). */
  _refused(detail) {
    this._stopHeartbeat();
    clearTimeout(this._retryTimer);
    this._retryTimer = null;
    this.connectionId = null;
    const message = detail.message || "the server refused the token";
    this._rejectPending(detail.code, message);
    this._setState("unauthorized", { error: message, code: detail.code });
    this._emit("auth", { ...detail, message });
  }

  /**
   * A handshake failed before the socket opened: an outage, or a refusal whose HTTP status
   * a browser hides. With a token, ask the HTTP API with it to tell which.
   */
  async _probe(seq, reason) {
    let response = null;
    if (this._token) {
      try {
        response = await fetch(`${this.httpBase}/api/runs?limit=1`, {
          headers: { Accept: "application/json", ...this._authHeaders() },
          cache: "no-store",
        });
      } catch {
        response = null; // the server is out of reach: an outage
      }
    }
    if (seq !== this._attemptSeq || this._closed || this._ws) return; // overtaken meanwhile
    const status = response?.status;
    if (status === 401 || status === 403) {
      const error = (await response.json().catch(() => null))?.error || {};
      if (seq !== this._attemptSeq || this._closed || this._ws) return;
      this._refused({
        code: error.code || (status === 401 ? "unauthorized" : "forbidden"),
        message: error.message,
        status,
      });
      return;
    }
    let minDelayMs = 0;
    if (status === 429) {
      const error = (await response.json().catch(() => null))?.error || {};
      const seconds = Number(error.retry_after ?? response.headers.get("Retry-After"));
      if (Number.isFinite(seconds)) minDelayMs = seconds * 1000;
      if (seq !== this._attemptSeq || this._closed || this._ws) return;
    }
    this._onSocketGone(reason, minDelayMs);
  }

  // -- the socket --------------------------------------------------------------------------

  /** Connect now, or retry now if waiting to reconnect. No-op when connected. */
  connect() {
    if (this._closed) throw new RuncastError("closed", "the client was closed");
    if (this._ws) return;
    clearTimeout(this._retryTimer);
    this._retryTimer = null;
    const seq = ++this._attemptSeq;
    if (globalThis.navigator && globalThis.navigator.onLine === false) {
      this._setState("offline");
      return;
    }
    this._setState("connecting");
    let ws;
    try {
      // The token rides as a subprotocol: a browser cannot set headers on a WebSocket.
      ws = this._token
        ? new this._WebSocket(this.url, ["runcast", `runcast.bearer.${this._token}`])
        : new this._WebSocket(this.url);
    } catch (err) {
      if (this._token && err?.name === "SyntaxError") {
        // Not a valid subprotocol: no server could accept this token.
        this._refused({ code: "unauthorized", message: "this token holds characters a WebSocket cannot carry" });
        return;
      }
      this._scheduleReconnect(err);
      return;
    }
    this._ws = ws;
    let opened = false;
    let welcomed = false;
    ws.onopen = () => {
      opened = true;
    };
    ws.onmessage = (message) => {
      if (this._ws !== ws) return; // a late frame of a socket we gave up on
      this._lastFrameAt = Date.now();
      this.stats.framesIn++;
      let frame;
      try {
        frame = JSON.parse(message.data);
      } catch {
        return;
      }
      if (frame.type === "welcome" && !welcomed) {
        welcomed = true;
        this._onWelcome(frame);
      }
      this._emit("frame", frame);
      this._dispatch(frame);
    };
    ws.onclose = (close) => {
      if (this._ws !== ws) return;
      this._ws = null;
      if (close.code === 4401 || close.code === 1008) {
        // A 1008 reason reads "code: message" (PROTOCOL.md §7): too many connections from
        // this address is rate_limited, retried; anything else is a refusal.
        const reason = close.reason || "";
        const named = /^\s*(unauthorized|forbidden|rate_limited)\b/i.exec(reason)?.[1]?.toLowerCase();
        const code = close.code === 4401 ? "unauthorized" : named || "unauthorized";
        if (code === "rate_limited") {
          this._onSocketGone(`refused (${close.code} ${reason})`, 1000);
          return;
        }
        this._refused({
          code,
          message: reason || (close.code === 4401 ? "the token expired or was revoked" : "the server refused the connection"),
          closeCode: close.code,
        });
        return;
      }
      const reason = close.code === 1000 ? null : `closed (${close.code})`;
      if (!opened && !welcomed) {
        this._stopHeartbeat();
        this._setState("connecting", { error: reason });
        this._probe(seq, reason);
        return;
      }
      this._onSocketGone(reason);
    };
    ws.onerror = () => {
      // The close event follows with the details; nothing to do here.
    };
  }

  /** Close the socket and stay "idle" until connect(); subscriptions resume then. */
  disconnect() {
    if (this._closed) return;
    this._replaceSocket();
    this._rejectPending("disconnected", "the client disconnected");
    this._setState("idle");
  }

  /** Drop the socket (if any) and any scheduled retry, with no state change or reconnect. */
  _replaceSocket() {
    clearTimeout(this._retryTimer);
    this._retryTimer = null;
    this._stopHeartbeat();
    this._attemptSeq++;
    this.connectionId = null;
    const ws = this._ws;
    this._ws = null;
    if (ws) {
      try {
        ws.close(1000);
      } catch {
        // already closing
      }
    }
  }

  /** Close for good: no reconnect; pending requests reject with code "closed". */
  close() {
    this._closed = true;
    clearTimeout(this._retryTimer);
    this._stopHeartbeat();
    if (globalThis.removeEventListener) {
      globalThis.removeEventListener("offline", this._onOffline);
      globalThis.removeEventListener("online", this._onOnline);
    }
    const ws = this._ws;
    this._ws = null;
    if (ws) ws.close(1000);
    this._rejectPending("closed", "the client was closed");
    this._setState("closed");
  }

  _dropSocket(reason) {
    const ws = this._ws;
    if (!ws) return;
    this._ws = null;
    try {
      ws.close(4000, reason.slice(0, 100));
    } catch {
      // already closing
    }
    this._onSocketGone(reason);
  }

  _onWelcome(frame) {
    const reconnect = this.stats.connects > 0;
    this.stats.connects++;
    if (reconnect) this.stats.reconnects++;
    this._attempt = 0;
    this.connectionId = frame.connection_id;
    this._setState("connected", { reconnect });
    this._emit("welcome", frame);
    this._startHeartbeat();
    // Resume everything this client holds, each from where it is.
    for (const sub of this._subs.values()) sub._send();
    for (const watch of this._watches.values()) watch._send();
  }

  _onSocketGone(reason, minDelayMs = 0) {
    this._stopHeartbeat();
    this.connectionId = null;
    this._rejectPending("disconnected", `the connection was lost: ${reason || "closed"}`);
    if (this._closed) return;
    if (globalThis.navigator && globalThis.navigator.onLine === false) {
      this._setState("offline");
      return;
    }
    this._scheduleReconnect(reason, minDelayMs);
  }

  _scheduleReconnect(error, minDelayMs = 0) {
    const { initialMs, maxMs, factor } = this.backoff;
    const ceiling = Math.min(maxMs, initialMs * factor ** this._attempt);
    const jittered = Math.round(ceiling / 2 + (Math.random() * ceiling) / 2); // jitter
    const delayMs = Math.max(jittered, minDelayMs);
    this._attempt++;
    const retryAt = Date.now() + delayMs;
    this._retryTimer = setTimeout(() => {
      this._retryTimer = null;
      if (!this._closed) this.connect();
    }, delayMs);
    this._setState("reconnecting", { retryAt, error: error ? String(error) : undefined });
  }

  _rejectPending(code, message) {
    const pending = [...this._pending.values()];
    this._pending.clear();
    for (const p of pending) {
      clearTimeout(p.timer);
      p.reject(new RuncastError(code, message));
    }
  }

  _startHeartbeat() {
    this._stopHeartbeat();
    this._lastFrameAt = Date.now();
    this._pingOutstanding = false;
    const tick = Math.max(250, Math.floor(this.heartbeatMs / 3));
    this._heartbeatTimer = setInterval(() => {
      if (!this._ws || this._pingOutstanding) return;
      if (Date.now() - this._lastFrameAt < this.heartbeatMs) return;
      this._pingOutstanding = true;
      const socket = this._ws;
      this.request("ping", {}, { timeoutMs: this.heartbeatMs })
        .then(() => {
          this._pingOutstanding = false;
        })
        .catch((err) => {
          this._pingOutstanding = false;
          if (err.code === "timeout" && this._ws === socket) this._dropSocket("no answer to ping");
        });
    }, tick);
  }

  _stopHeartbeat() {
    clearInterval(this._heartbeatTimer);
    this._heartbeatTimer = null;
  }

  _sendFrame(frame) {
    const ws = this._ws;
    if (!ws || ws.readyState !== 1 || this.state !== "connected") return false;
    ws.send(JSON.stringify(frame));
    this.stats.framesOut++;
    return true;
  }

  // -- frames in ---------------------------------------------------------------------------

  _dispatch(frame) {
    switch (frame.type) {
      case "reply": {
        const pending = this._pending.get(frame.ref);
        if (!pending) return;
        this._pending.delete(frame.ref);
        clearTimeout(pending.timer);
        if (frame.ok) {
          // onReply runs synchronously, before any later frame is handled: a start
          // registers its subscription before the run's first events frame.
          try {
            pending.onReply?.(frame.result);
          } catch (err) {
            reportError(err);
          }
          pending.resolve(frame.result);
        } else {
          pending.reject(RuncastError.fromWire(frame.error));
        }
        return;
      }
      case "events":
      case "snapshot":
      case "reset":
      case "presence":
        this._subs.get(frame.run_id)?._frame(frame);
        return;
      case "thread":
        this._emit("thread", frame);
        this._watches.get(frame.thread_id)?._frame(frame);
        return;
      case "deleted":
        this._emit("deleted", frame);
        this._subs.get(frame.run_id)?._deleted(frame);
        return;
      default:
        return; // welcome, and frame types newer than this client
    }
  }

  // -- requests ----------------------------------------------------------------------------

  /**
   * Send `{op, ...fields, ref}` and resolve with the reply's result.
   * `options.timeoutMs` overrides the client's request timeout; `options.onReply` runs
   * synchronously on success, before the next frame is handled.
   */
  request(op, fields = {}, options = {}) {
    const ref = this._nextRef++;
    return new Promise((resolve, reject) => {
      if (!this._sendFrame({ ...fields, op, ref })) {
        reject(new RuncastError("disconnected", `not connected (${this.state})`));
        return;
      }
      const timeoutMs = options.timeoutMs ?? this.requestTimeoutMs;
      const timer = setTimeout(() => {
        if (this._pending.delete(ref)) {
          reject(new RuncastError("timeout", `no reply to ${op} after ${timeoutMs} ms`));
        }
      }, timeoutMs);
      this._pending.set(ref, { resolve, reject, timer, onReply: options.onReply });
    });
  }

  ping() {
    return this.request("ping");
  }

  stop(runId) {
    return this.request("stop", { run_id: runId });
  }

  respond(runId, requestId, value) {
    return this.request("respond", { run_id: runId, request_id: requestId, value });
  }

  threadOp(op, threadId, fields = {}) {
    return this.request(op, { ...fields, thread_id: threadId });
  }

  /**
   * Start a run. With `subscribe` (the default) the server subscribes this connection
   * from index 0 before the run can emit, and the returned subscription gets every event.
   */
  async start(agent, input = {}, options = {}) {
    const { threadId, multitask, title, metadata, subscribe = true, ...callbacks } = options;
    const fields = { agent, input, subscribe };
    if (threadId) fields.thread_id = threadId;
    if (multitask) fields.multitask = multitask;
    if (title) fields.title = title;
    if (metadata) fields.metadata = metadata;
    let subscription = null;
    const result = await this.request("start", fields, {
      onReply: (res) => {
        if (subscribe) {
          subscription = this._subscription(res.run.run_id, { ...callbacks, after: 0 });
          subscription._acknowledged(res.run);
        }
      },
    });
    return { run: result.run, subscription };
  }

  subscribe(runId, options = {}) {
    const sub = this._subscription(runId, options);
    sub._send();
    return sub;
  }

  _subscription(runId, options) {
    this._subs.get(runId)?._replaced();
    const sub = new Subscription(this, runId, options);
    this._subs.set(runId, sub);
    return sub;
  }

  watchThread(threadId, callbacks = {}) {
    let group = this._watches.get(threadId);
    const watch = new ThreadWatch(this, threadId, callbacks);
    if (group) {
      group.watches.add(watch);
      group.welcome(watch);
    } else {
      group = new WatchGroup(this, threadId);
      group.watches.add(watch);
      this._watches.set(threadId, group);
      group._send();
    }
    return watch;
  }

  // -- records over HTTP -------------------------------------------------------------------

  listThreads({ limit, cursor, metadata } = {}) {
    return this.api("/api/threads", { query: { limit, cursor, ...metadataQuery(metadata) } });
  }

  listRuns({ limit, cursor, status, thread_id, metadata } = {}) {
    return this.api("/api/runs", { query: { limit, cursor, status, thread_id, ...metadataQuery(metadata) } });
  }

  updateThread(threadId, fields) {
    return this.api(`/api/threads/${encodeURIComponent(threadId)}`, { method: "PATCH", body: fields });
  }

  updateRun(runId, fields) {
    return this.api(`/api/runs/${encodeURIComponent(runId)}`, { method: "PATCH", body: fields });
  }

  deleteThread(threadId) {
    return this.api(`/api/threads/${encodeURIComponent(threadId)}`, { method: "DELETE" });
  }

  deleteRun(runId) {
    return this.api(`/api/runs/${encodeURIComponent(runId)}`, { method: "DELETE" });
  }

  // -- HTTP ----------------------------------------------------------------------------------

  async api(path, { method = "GET", body, query } = {}) {
    let url = this.httpBase + path;
    if (query) {
      const params = new URLSearchParams();
      for (const [k, v] of Object.entries(query)) if (v !== undefined && v !== null) params.set(k, v);
      const qs = params.toString();
      if (qs) url += (url.includes("?") ? "&" : "?") + qs;
    }
    const init = { method, headers: { Accept: "application/json", ...this._authHeaders() } };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(url, init);
    } catch (err) {
      throw new RuncastError("network", `${method} ${path} failed: ${err.message || err}`);
    }
    const text = await response.text();
    let json = null;
    try {
      json = text ? JSON.parse(text) : null;
    } catch {
      json = null;
    }
    if (!response.ok) {
      const error = RuncastError.fromWire(json?.error || { code: "http", message: response.statusText }, {
        status: response.status,
      });
      if (response.status === 401) {
        this._emit("auth", { code: error.code, message: error.message, status: 401 });
      }
      throw error;
    }
    return json;
  }
}

function metadataQuery(metadata) {
  const query = {};
  for (const [key, value] of Object.entries(metadata || {})) query[`metadata.${key}`] = value;
  return query;
}

function reportError(err) {
  // A listener's bug must not break the client; surface it without stopping delivery.
  setTimeout(() => {
    throw err;
  });
}

/** One run subscription. Created by `client.subscribe()` or `client.start()`. */
class Subscription {
  constructor(client, runId, options) {
    this.client = client;
    this.runId = runId;
    this.cursor = options.after === "latest" ? null : Number(options.after ?? 0);
    this.epoch = options.epoch ?? null;
    this.ended = false;
    this.closed = false;
    this.info = null;
    this._snapshot = Boolean(options.snapshot);
    this._presence = options.presence ?? true;
    this._cb = options;
    this._resolveReady = null;
    this.ready = new Promise((resolve, reject) => {
      this._resolveReady = resolve;
      this._rejectReady = reject;
    });
    this.ready.catch(() => {}); // the error also goes to onError
  }

  _call(name, ...args) {
    const fn = this._cb[name];
    if (!fn) return;
    try {
      fn(...args);
    } catch (err) {
      reportError(err);
    }
  }

  /** (Re)send the subscribe op, from the cursor and in the epoch this subscription holds. */
  _send() {
    if (this.closed || this.ended || this.client.state !== "connected") return;
    const fields = { run_id: this.runId, presence: this._presence };
    fields.after = this.cursor === null ? "latest" : this.cursor;
    if (this.epoch) fields.epoch = this.epoch;
    // A snapshot is asked for only the first time: on a resume we already hold the state.
    if (this._snapshot) fields.snapshot = true;
    this.client
      .request("subscribe", fields, {
        onReply: (result) => {
          if (this.client._subs.get(this.runId) !== this) return;
          this._snapshot = false;
          this._acknowledged(result.run);
        },
      })
      .catch((err) => {
        if (this.client._subs.get(this.runId) !== this) return;
        if (err.code === "disconnected" || err.code === "timeout") return; // resent on reconnect
        this._finish();
        this._rejectReady(err);
        this._call("onError", err);
      });
  }

  _acknowledged(run) {
    this.info = run;
    // With after "latest" the cursor stays unknown until the first snapshot or events
    // frame: the server may append between choosing the cursor and writing this reply.
    if (this.epoch === null) this.epoch = run.epoch;
    this._resolveReady(run);
    this._call("onInfo", run);
    if (typeof run.watchers === "number") this._call("onPresence", run.watchers);
    // An ended run whose log we hold entirely gets nothing more from the server.
    const ended = TERMINAL_STATUSES.has(run.status);
    if (ended && run.epoch === this.epoch && this.cursor !== null && this.cursor >= run.last_index) {
      this._finish();
    }
  }

  _frame(frame) {
    if (this.closed) return;
    switch (frame.type) {
      case "reset":
        this.epoch = frame.epoch;
        this.cursor = null; // the snapshot that follows sets it
        this._call("onReset", frame.epoch);
        return;
      case "snapshot":
        this.epoch = frame.epoch;
        this.cursor = frame.index;
        this._call("onSnapshot", frame);
        // A terminal status is always the last event: nothing follows this snapshot.
        if (TERMINAL_STATUSES.has(frame.state?.status)) {
          this._finish();
          this._call("onEnd", null);
        }
        return;
      case "presence":
        this._call("onPresence", frame.watchers);
        return;
      case "events":
        this._events(frame);
        return;
      default:
        return;
    }
  }

  _events(frame) {
    if (this.epoch && frame.epoch !== this.epoch) return; // a stale frame of an old epoch
    const fresh = [];
    let terminal = null;
    for (const event of frame.events) {
      if (this.cursor === null) this.cursor = event.i - 1; // after "latest": starts here
      if (event.i <= this.cursor) continue; // already delivered
      if (event.i !== this.cursor + 1) {
        // A gap breaks the contract; ask again from what we hold rather than skip.
        console.warn(`runcast: gap in ${this.runId} after ${this.cursor} (got ${event.i})`);
        this._send();
        break;
      }
      this.cursor = event.i;
      fresh.push(event);
      this._call("onEvent", event);
      if (event.type === "status" && TERMINAL_STATUSES.has(event.data?.status)) {
        terminal = event;
        break;
      }
    }
    if (fresh.length) this._call("onEvents", fresh);
    if (terminal) {
      this._finish();
      this._call("onEnd", terminal);
    }
  }

  _finish() {
    this.ended = true;
    if (this.client._subs.get(this.runId) === this) this.client._subs.delete(this.runId);
  }

  /** The run was erased (PROTOCOL.md §10): the server ended the subscription. */
  _deleted(frame) {
    if (this.closed) return;
    this._finish();
    this._call("onDeleted", frame);
  }

  _replaced() {
    this.closed = true;
  }

  /** Stop receiving this run's frames; tells the server unless the run already ended. */
  close() {
    if (this.closed) return;
    this.closed = true;
    if (this.client._subs.get(this.runId) === this) {
      this.client._subs.delete(this.runId);
      if (!this.ended && this.client.state === "connected") {
        this.client.request("unsubscribe", { run_id: this.runId }).catch(() => {});
      }
    }
  }
}

/** The server's watch of one thread on this connection, shared by its ThreadWatch handles. */
class WatchGroup {
  constructor(client, threadId) {
    this.client = client;
    this.threadId = threadId;
    this.watches = new Set();
    this.thread = null; // the latest ThreadInfo from a watch reply
  }

  _send() {
    if (this.client.state !== "connected") return;
    this.client
      .request("watch_thread", { thread_id: this.threadId })
      .then((result) => {
        if (this.client._watches.get(this.threadId) !== this) return;
        this.thread = result.thread;
        for (const watch of [...this.watches]) watch._call("onWatch", result.thread);
      })
      .catch((err) => {
        if (this.client._watches.get(this.threadId) !== this) return;
        if (err.code === "disconnected" || err.code === "timeout") return; // resent on reconnect
        this._end();
        for (const watch of [...this.watches]) watch._call("onError", err);
      });
  }

  /** A handle that joins a watch already made gets its latest reply too. */
  welcome(watch) {
    if (this.thread) queueMicrotask(() => watch._call("onWatch", this.thread));
  }

  _frame(frame) {
    // A deleted thread's watch is over on the server: end it here, without unwatching.
    if (frame.change === "deleted") this._end();
    for (const watch of [...this.watches]) watch._call("onChange", frame);
  }

  _end() {
    if (this.client._watches.get(this.threadId) === this) this.client._watches.delete(this.threadId);
    for (const watch of this.watches) watch.closed = true;
  }

  _leave(watch) {
    this.watches.delete(watch);
    if (this.watches.size || this.client._watches.get(this.threadId) !== this) return;
    this.client._watches.delete(this.threadId);
    if (this.client.state === "connected") {
      this.client.request("unwatch_thread", { thread_id: this.threadId }).catch(() => {});
    }
  }
}

/** One thread watch. Created by `client.watchThread()`. */
class ThreadWatch {
  constructor(client, threadId, callbacks) {
    this.client = client;
    this.threadId = threadId;
    this.closed = false;
    this._cb = callbacks;
  }

  _call(name, ...args) {
    if (this.closed && name !== "onChange" && name !== "onError") return;
    const fn = this._cb[name];
    if (!fn) return;
    try {
      fn(...args);
    } catch (err) {
      reportError(err);
    }
  }

  close() {
    if (this.closed) return;
    this.closed = true;
    this.client._watches.get(this.threadId)?._leave(this);
  }
}
