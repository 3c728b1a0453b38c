// The page's run models: one per run it shows, shared by every view that shows the run
// (the run view and a conversation's streaming turn), kept current by ONE subscription.

import { applyEvent, initialState, TERMINAL_STATUSES } from "./runcast.js";

/** A run as the page knows it: its info, its folded state and its event log. */
export class RunModel {
  constructor(client) {
    this.client = client;
    this.runId = null;
    this.info = null;
    this.state = initialState();
    this.events = []; // every event held, in index order (i = 1..n, or from a snapshot on)
    this.watchers = null;
    this.error = null; // the subscription was refused (e.g. not_found)
    this.deleted = false; // the run was erased (PROTOCOL.md §10)
    this.generation = 0; // bumped on reset: views rebuild what they derived from events
    this.subscription = null;
    this._listeners = new Set();
    this._scheduled = false;
  }

  get ended() {
    return TERMINAL_STATUSES.has(this.state.status);
  }

  get lastIndex() {
    return this.events.length ? this.events[this.events.length - 1].i : (this.snapshotIndex ?? 0);
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

  /** The callbacks of this model's subscription (see runcast.js). */
  callbacks() {
    return {
      onInfo: (run) => {
        this.runId = run.run_id;
        this.info = run;
        this._changed();
      },
      onEvent: (event) => {
        this.events.push(event);
        applyEvent(this.state, event);
        if (this.info) this.info = { ...this.info, status: this.state.status, last_index: event.i };
      },
      onEvents: () => this._changed(),
      onPresence: (n) => {
        this.watchers = n;
        this._changed();
      },
      onReset: () => {
        // The server's log was rewritten (PROTOCOL.md §4): a snapshot at its last index
        // follows; the events before it are read again over HTTP for the inspector.
        this.generation++;
        this.events = [];
        this.state = initialState();
        this._changed();
      },
      onSnapshot: (frame) => {
        this.state = structuredClone(frame.state);
        this.snapshotIndex = frame.index;
        this._backfill(frame.index, this.generation);
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

  async _backfill(upTo, generation) {
    const older = [];
    let after = 0;
    try {
      while (after < upTo) {
        const page = await this.client.api(`/api/runs/${this.runId}/events`, { query: { after, limit: 10000 } });
        if (!page.events.length || page.epoch !== this.subscription?.epoch) break;
        for (const e of page.events) if (e.i <= upTo) older.push(e);
        after = page.events[page.events.length - 1].i;
      }
    } catch {
      return; // the inspector stays without the older events; the state is whole
    }
    if (generation !== this.generation) return;
    this.events = [...older, ...this.events.filter((e) => e.i > upTo)];
    this.generation++;
    this._changed();
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
      model.subscription = this.client.subscribe(runId, { after: 0, ...model.callbacks() });
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
      entry.model.subscription?.close();
      this.models.delete(runId);
    }
  }
}
