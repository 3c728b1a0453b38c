// The run view's inspector: a run's event log as a virtual list. It draws only the rows
// in sight, over a spacer as tall as the whole log, and reads the events they show from
// the server (GET /api/runs/{id}/events?after=&limit=, PROTOCOL.md §5) in pages, keeping
// MAX_PAGES of them: what it holds does not grow with the run. The latest events come
// from the run's model (its live tail) without a request.

import { h } from "./ui.js";

const ROW_PX = 24; // every row is this tall (style.css: .event-log tbody tr)
const PAGE = 100; // events per request
const MAX_PAGES = 8; // pages held; the least recently used goes first
const MAX_SPACE_PX = 4_000_000; // taller logs are scaled to this (browsers cap heights)
const FETCH_DELAY_MS = 80; // pages are read once scrolling pauses this long
const DATA_CHARS = 240; // the data column shows this much of an event's JSON
const NO_ROWS = 10; // rows drawn while the list is not laid out (hidden)

export class EventLog {
  /**
   * `model` is the run's RunModel; `onPick(i)` is called when an index is clicked.
   * `element` goes into the page; `update()` after each change of the model; `mark(i)`
   * highlights the slider's index (null: following the live end); `destroy()` at unmount.
   */
  constructor({ client, model, onPick }) {
    this.client = client;
    this.model = model;
    this.onPick = onPick;
    this.pages = new Map(); // page number -> {events, upTo}: upTo, the last index when read
    this.loading = new Set();
    this.generation = model.generation;
    this.follow = true; // keep the newest event in sight
    this.at = null; // the marked index (the slider's), or null
    this.override = null; // a first row set by mark(), until the user scrolls
    this.expectedTop = null;
    this.firstTs = null;
    this.firstTsAsked = false;
    this.fetchTimer = null;
    this.scrolledAt = -Infinity; // when the user last scrolled (performance.now())
    this.viewPx = 0; // the box's inner height and the header's, measured on resize only,
    this.headPx = ROW_PX; // so that drawing reads no layout
    this.destroyed = false;

    this.body = h("tbody", {});
    this.indexCol = h("col", { class: "c-i" });
    this.table = h(
      "table",
      { class: "event-log" },
      h("colgroup", {}, this.indexCol, h("col", { class: "c-type" }), h("col", { class: "c-data" }), h("col", { class: "c-ms" })),
      h(
        "thead",
        {},
        h(
          "tr",
          {},
          h("th", { scope: "col" }, "#"),
          h("th", { scope: "col" }, "type"),
          h("th", { scope: "col" }, "data"),
          h("th", { scope: "col", title: "milliseconds since the first event" }, "+ms"),
        ),
      ),
      this.body,
    );
    this.space = h("div", { class: "vl-space" }, this.table);
    this.element = h(
      "div",
      { class: "inspector", dataset: { testid: "inspector" }, tabindex: "0", role: "region", "aria-label": "event log" },
      this.space,
    );
    this.element.addEventListener("scroll", () => this._scrolled(), { passive: true });
    this.resize = new ResizeObserver(() => {
      this.viewPx = this.element.clientHeight;
      this.headPx = this.table.tHead.offsetHeight || ROW_PX;
      this.draw();
    });
    this.resize.observe(this.element);
  }

  /** The model changed: more events, or a reset. */
  update() {
    if (this.generation !== this.model.generation) {
      this.generation = this.model.generation;
      this.pages.clear();
      this.loading.clear();
      this.firstTs = null;
      this.firstTsAsked = false;
    }
    this.draw();
  }

  /** Highlight `index` and bring it in sight; null: follow the newest event again. */
  mark(index) {
    this.at = index;
    if (index === null) {
      this.follow = true;
      this.override = null;
    } else {
      this.follow = false;
      const { first, rows } = this._window();
      if (index < first || index >= first + rows) this._scrollTo(index - Math.floor(rows / 2));
    }
    this.draw();
  }

  destroy() {
    this.destroyed = true;
    clearTimeout(this.fetchTimer);
    this.resize.disconnect();
    this.pages.clear();
  }

  // -- geometry ----------------------------------------------------------------------------

  _geometry() {
    const total = this.model.lastIndex;
    const head = this.headPx;
    const view = this.viewPx;
    const rows = view ? Math.max(1, Math.floor((view - head) / ROW_PX)) : NO_ROWS;
    const space = Math.min(total * ROW_PX, MAX_SPACE_PX) + head;
    const range = Math.max(0, space - view);
    const maxFirst = Math.max(1, total - rows + 1);
    return { total, rows, space, range, maxFirst };
  }

  /** The first row in sight and how many rows fit. */
  _window() {
    const g = this._geometry();
    let first;
    if (this.follow) first = g.maxFirst;
    else if (this.override !== null) first = this.override;
    else first = g.range > 0 ? 1 + Math.round((this.element.scrollTop / g.range) * (g.maxFirst - 1)) : 1;
    return { ...g, first: Math.max(1, Math.min(g.maxFirst, first)) };
  }

  _scrollTo(first) {
    const g = this._geometry();
    this.override = Math.max(1, Math.min(g.maxFirst, first));
    this.space.style.height = `${g.space}px`;
    const top = g.maxFirst > 1 ? ((this.override - 1) / (g.maxFirst - 1)) * g.range : 0;
    this._setTop(top);
  }

  /** Scroll the box to `top` ourselves (the scroll event that follows is not the user's). */
  _setTop(top) {
    if (this.expectedTop !== null && Math.abs(top - this.expectedTop) < 1) return;
    this.expectedTop = top;
    this.element.scrollTop = top;
  }

  _scrolled() {
    const el = this.element;
    const top = el.scrollTop;
    if (this.expectedTop !== null && Math.abs(top - this.expectedTop) < 2) return; // ours: drawn
    this.expectedTop = null;
    const atBottom = el.scrollHeight - el.clientHeight - top < ROW_PX;
    if (this.follow && atBottom) return; // ours too, clamped by the browser
    this.override = null;
    this.scrolledAt = performance.now();
    this.follow = atBottom;
    this.draw();
  }

  // -- drawing -----------------------------------------------------------------------------

  draw() {
    if (this.destroyed) return;
    const w = this._window();
    const height = `${w.space}px`;
    if (this.space.style.height !== height) this.space.style.height = height;
    if (this.follow) this._setTop(w.range);
    this.table.setAttribute("aria-rowcount", String(w.total + 1));
    const indexWidth = `calc(${Math.max(3, String(w.total).length)}ch + 1.2rem)`; // the widest index fits
    if (this.indexCol.style.width !== indexWidth) this.indexCol.style.width = indexWidth;
    while (this.body.rows.length < w.rows) this.body.append(this._row());
    const missing = new Set();
    for (let k = 0; k < this.body.rows.length; k++) {
      const row = this.body.rows[k];
      const i = w.first + k;
      if (k >= w.rows || i > w.total) {
        row.hidden = true;
        continue;
      }
      row.hidden = false;
      const event = this._event(i);
      if (!event) missing.add(Math.floor((i - 1) / PAGE));
      this._fill(row, i, event);
    }
    if (w.total > 0 && this.firstTs === null) this._readFirstTs();
    if (missing.size) this._want(missing);
  }

  _row() {
    const button = h("button", { type: "button", class: "link", tabindex: "-1", onclick: () => this.onPick(Number(row.dataset.i)) });
    const row = h("tr", {}, h("td", {}, button), h("td", {}), h("td", {}, h("code", { dataset: { raw: "" } })), h("td", { class: "num" }));
    return row;
  }

  _fill(row, i, event) {
    const [cIndex, cType, cData, cMs] = row.cells;
    const key = event ? `${this.generation}:${i}` : `${this.generation}:${i}:?`;
    if (row.dataset.key !== key) {
      row.dataset.key = key;
      row.dataset.i = String(i);
      row.setAttribute("aria-rowindex", String(i + 1));
      cIndex.firstChild.textContent = String(i);
      cType.textContent = event ? event.type : "…";
      const text = event ? JSON.stringify(event.data ?? {}) : "";
      const code = cData.firstChild;
      code.textContent = text.length > DATA_CHARS ? `${text.slice(0, DATA_CHARS)}…` : text;
      if (text.length > DATA_CHARS) code.title = text.slice(0, 4 * DATA_CHARS);
      else code.removeAttribute("title");
      row.dataset.type = event ? event.type : "";
    }
    const ms = event && this.firstTs !== null ? String(Math.round((event.ts - this.firstTs) * 1000)) : "";
    if (cMs.textContent !== ms) cMs.textContent = ms;
    const classes = [`type-${row.dataset.type || "loading"}`];
    if (this.at !== null && i === this.at) classes.push("at");
    if (this.at !== null && i > this.at) classes.push("future");
    const className = classes.join(" ");
    if (row.className !== className) row.className = className;
  }

  // -- reading pages -----------------------------------------------------------------------

  _event(i) {
    const held = this.model.eventAt(i);
    if (held) return held;
    const p = Math.floor((i - 1) / PAGE);
    const page = this.pages.get(p);
    if (!page) return undefined;
    this.pages.delete(p); // most recently used last
    this.pages.set(p, page);
    const event = page.events[i - p * PAGE - 1];
    return event?.i === i ? event : undefined;
  }

  _want(pages) {
    clearTimeout(this.fetchTimer);
    // While the user scrolls, only where the scrolling pauses is read; otherwise at once.
    const scrolling = performance.now() - this.scrolledAt < FETCH_DELAY_MS;
    this.fetchTimer = setTimeout(() => {
      const { first, rows } = this._window();
      for (const p of pages) {
        // Only pages still in sight once the scrolling paused.
        const lo = p * PAGE + 1;
        if (lo + PAGE <= first || lo >= first + rows) continue;
        this._read(p);
      }
    }, scrolling ? FETCH_DELAY_MS : 0);
  }

  async _read(p) {
    const held = this.pages.get(p);
    if (this.loading.has(p) || (held && held.upTo >= this.model.lastIndex)) return;
    this.loading.add(p);
    const generation = this.generation;
    try {
      const page = await this.client.api(`/api/runs/${encodeURIComponent(this.model.runId)}/events`, {
        query: { after: p * PAGE, limit: PAGE },
      });
      if (this.destroyed || generation !== this.generation || page.epoch !== this.model.epoch) return;
      this.pages.set(p, { events: page.events, upTo: page.last_index });
      while (this.pages.size > MAX_PAGES) this.pages.delete(this.pages.keys().next().value);
      if (p === 0 && page.events[0]?.i === 1) this.firstTs = page.events[0].ts;
    } catch {
      return; // the rows stay as they are; scrolling asks again
    } finally {
      if (generation === this.generation) this.loading.delete(p);
    }
    this.draw();
  }

  async _readFirstTs() {
    const first = this.model.eventAt(1);
    if (first) {
      this.firstTs = first.ts;
      return;
    }
    if (this.firstTsAsked) return;
    this.firstTsAsked = true;
    const generation = this.generation;
    try {
      const page = await this.client.api(`/api/runs/${encodeURIComponent(this.model.runId)}/events`, { query: { after: 0, limit: 1 } });
      if (this.destroyed || generation !== this.generation || !page.events.length) return;
      this.firstTs = page.events[0].ts;
      this.draw();
    } catch {
      // no +ms column then
    }
  }
}
