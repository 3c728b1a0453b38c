// The page's run models: one per run it shows, shared by every view that shows the run
// (the run view and a conversation's streaming turn), kept current by ONE subscription.
//
// A model opens its run from the server's snapshot (PROTOCOL.md §2, `snapshot: true`):
// an ended run at its last event, a live one a few hundred events back; the live events
// after it are folded by runcast.js's reducer. It keeps the folded state and the latest
// events only (TAIL_EVENTS at most): what a run view shows of the older ones it reads
// over HTTP when asked. So a model costs the same for a run of a hundred events and for
// one of a million.

import { applyEvent, initialState, TERMINAL_STATUSES } from "./runcast.js";

/** A live run opens this many events back: the inspector has them at once. */
export const LIVE_BACKLOG = 300;
/** The latest events a model holds (between TAIL_EVENTS and twice that). */
export const TAIL_EVENTS = 500;

/** A run as the page knows it: its info, its folded state and its latest events. */
export class RunModel {
  constructor(client) {
    this.client = client;
    this.runId = null;
    this.info = null;
    this.state = initialState();
    this.epoch = null;
    this.cursor = 0; // the last index folded into `state`
    this.tail = []; // the latest events, in index order, contiguous, ending at `cursor`
    this.ending = null; // the terminal status event, once known
    this.opened = false; // the state is the server's (a snapshot or events from 0 arrived)
    this.watchers = null;
    this.error = null; // the subscription was refused (e.g. not_found)
    this.deleted = false; // the run was erased (PROTOCOL.md §10)
    this.generation = 0; // bumped on reset: views drop what they read of the old log
    // Delivery, for the tests: `delivered` events since the state at index `from` (the
    // snapshot's), `gaps` out of order (never, by the protocol): exactly once in order
    // is delivered === cursor - from and gaps === 0.
    this.from = 0;
    this.delivered = 0;
    this.gaps = 0;
    this.subscription = null;
    this.closed = false;
    this._listeners = new Set();
    this._scheduled = false;
  }

  get ended() {
    return TERMINAL_STATUSES.has(this.state.status);
  }

  /** The last index the page knows of: the state is the snapshot at this index. */
  get lastIndex() {
    return this.cursor;
  }

  /** Listen for changes; called at most once per received frame. Returns an off function. */
  listen(fn) {
    this._listeners.add(fn);
    return () => this._listeners.delete(fn);
  }

  _changed() {
    if (this._scheduled) return;
    this._scheduled = true;
    queueMicrotask(() => {
      this._scheduled = false;
      for (const fn of this._listeners) fn(this);
    });
  }

  /** The held event at index `i`, or undefined. */
  eventAt(i) {
    const first = this.tail.length ? this.tail[0].i : Infinity;
    return i >= first ? this.tail[i - first] : undefined;
  }

  /**
   * Subscribe from the snapshot at the point the view needs: the RunInfo first (over
   * HTTP, while the socket may still be connecting), then `subscribe` with a snapshot at
   * the last index of an ended run (one before it: its terminal event follows, with the
   * ending's details), or LIVE_BACKLOG events back for a live one.
   */
  async open() {
    let after = "latest";
    try {
      const info = await this.client.api(`/api/runs/${encodeURIComponent(this.runId)}`);
      if (this.closed) return;
      this.info = info;
      this._changed(); // the view shows the run's title while the socket connects
      const last = info.last_index;
      after = Math.max(0, TERMINAL_STATUSES.has(info.status) ? last - 1 : last - LIVE_BACKLOG);
    } catch (err) {
      if (this.closed) return;
      if (err.code === "not_found" || err.code === "forbidden") {
        this.error = err;
        this._changed();
        return;
      }
      // Out of reach (or no token yet): the socket asks for the latest snapshot when it can.
    }
    this.subscription = this.client.subscribe(this.runId, { after, snapshot: true, ...this.callbacks() });
  }

  /** The callbacks of this model's subscription (see runcast.js). */
  callbacks() {
    return {
      onInfo: (run) => {
        this.runId = run.run_id;
        this.info = run;
        if (this.epoch === null) this.epoch = run.epoch;
        // A start subscribes from index 0: the initial state is the server's.
        if (!this.opened && this.subscription?.cursor === 0) this.opened = true;
        this._changed();
      },
      onEvent: (event) => {
        if (event.i !== this.cursor + 1) this.gaps++;
        this.cursor = event.i;
        this.delivered++;
        applyEvent(this.state, event);
        this.tail.push(event);
        if (this.tail.length > 2 * TAIL_EVENTS) this.tail.splice(0, this.tail.length - TAIL_EVENTS);
        if (event.type === "status" && TERMINAL_STATUSES.has(event.data?.status)) this.ending = event;
        if (this.info) this.info = { ...this.info, status: this.state.status, last_index: event.i };
      },
      onEvents: () => this._changed(),
      onPresence: (n) => {
        this.watchers = n;
        this._changed();
      },
      onReset: (epoch) => {
        // The server's log was rewritten (PROTOCOL.md §4): a snapshot at its last index
        // follows; what views read of the old log is dropped.
        this.generation++;
        this.epoch = epoch;
        this.tail = [];
        this.ending = null;
        this.opened = false;
        this.state = initialState();
        this._changed();
      },
      onSnapshot: (frame) => {
        this.state = frame.state;
        this.epoch = frame.epoch;
        this.cursor = frame.index;
        this.from = frame.index;
        this.delivered = 0;
        this.opened = true;
        this.tail = [];
        if (this.info) this.info = { ...this.info, status: this.state.status };
        // An ended run opened at its last index (after a reset): its ending is read.
        if (TERMINAL_STATUSES.has(frame.state.status) && frame.index > 0) this._readEnding(frame.index, this.generation);
        this._changed();
      },
      onEnd: () => {
        this.watchers = null;
        this._changed();
      },
      onError: (err) => {
        this.error = err;
        this._changed();
      },
      onDeleted: () => this.markDeleted(),
    };
  }

  /** The run is gone for good: what the views show of it says so. */
  markDeleted() {
    if (this.deleted) return;
    this.deleted = true;
    this.watchers = null;
    this._changed();
  }

  /** New RunInfo fields (a rename, say) merged into what the model holds. */
  updateInfo(info) {
    this.info = { ...this.info, ...info };
    this._changed();
  }

  /** Read the terminal event at `index` over HTTP (the ending's reason, who stopped it). */
  async _readEnding(index, generation) {
    try {
      const page = await this.client.api(`/api/runs/${encodeURIComponent(this.runId)}/events`, {
        query: { after: index - 1, limit: 1 },
      });
      const event = page.events[0];
      if (generation !== this.generation || this.ending || event?.i !== index) return;
      this.ending = event;
      if (!this.tail.length) this.tail = [event];
      this._changed();
    } catch {
      // the ending's details stay unknown; the status says how it ended
    }
  }

  /** Stop receiving the run (no view holds it any more). */
  close() {
    this.closed = true;
    this.subscription?.close();
  }
}

/** Run models by run id, with reference counts: views acquire and release them. */
export class RunRegistry {
  constructor(client) {
    this.client = client;
    this.models = new Map(); // run_id -> {model, refs}
  }

  acquire(runId) {
    let entry = this.models.get(runId);
    if (!entry) {
      const model = new RunModel(this.client);
      model.runId = runId;
      model.open();
      entry = { model, refs: 0 };
      this.models.set(runId, entry);
    }
    entry.refs++;
    return entry.model;
  }

  release(model) {
    const entry = this.models.get(model.runId);
    if (!entry || entry.model !== model) return;
    entry.refs--;
  }

  /** Start a run over the socket, subscribed from index 0; its model is registered. */
  async start(agent, input, options = {}) {
    const model = new RunModel(this.client);
    const { run, subscription } = await this.client.start(agent, input, { ...options, ...model.callbacks() });
    model.subscription = subscription;
    model.opened = true; // subscribed from index 0: the initial state is the server's
    this.models.set(run.run_id, { model, refs: 0 });
    return { run, model };
  }

  /** A run was deleted (here, in another tab, or with its thread). */
  markDeleted(runId) {
    this.models.get(runId)?.model.markDeleted();
  }

  /** A thread was deleted: so were its runs. */
  markThreadDeleted(threadId) {
    for (const { model } of this.models.values()) if (model.info?.thread_id === threadId) model.markDeleted();
  }

  /** Unsubscribe from runs that no view holds. */
  collect() {
    for (const [runId, entry] of this.models) {
      if (entry.refs > 0) continue;
      entry.model.close();
      this.models.delete(runId);
    }
  }
}
