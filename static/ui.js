// Small DOM helpers and the pieces of UI shared by the views: a form generated from a
// JSON schema, the rendering of a run's message, status badges, times.

/**
 * h("div", {class: "x", onclick: fn, dataset: {i: 1}}, "text", child, [more]) -> Element.
 * Attributes named on* become listeners; `null`/`false` children and attributes are skipped.
 */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") {
      el.addEventListener(key.slice(2).toLowerCase(), value);
    } else if (key === "dataset") {
      Object.assign(el.dataset, value);
    } else if (key === "class") {
      el.className = value;
    } else if (key in el && typeof value !== "string") {
      el[key] = value; // properties such as value, checked, disabled
    } else {
      el.setAttribute(key, value === true ? "" : String(value));
    }
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    if (Array.isArray(child)) append(el, child);
    else el.append(child instanceof Node ? child : String(child));
  }
}

/** A small eye icon (inline SVG, so no icon font or emoji font is needed). */
export function eyeIcon() {
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", "0 0 24 24");
  svg.setAttribute("class", "icon");
  svg.setAttribute("aria-hidden", "true");
  const eye = document.createElementNS(ns, "path");
  eye.setAttribute("d", "M1 12s4-7 11-7 11 7 11 7-4 7-11 7S1 12 1 12z");
  const pupil = document.createElementNS(ns, "circle");
  pupil.setAttribute("cx", "12");
  pupil.setAttribute("cy", "12");
  pupil.setAttribute("r", "3");
  svg.append(eye, pupil);
  return svg;
}

export function shortId(id) {
  if (!id) return "";
  const [prefix, rest = ""] = id.split("_", 2);
  return rest ? `${prefix}_${rest.slice(0, 6)}` : id.slice(0, 10);
}

export function timeAgo(seconds) {
  const delta = Math.max(0, Date.now() / 1000 - seconds);
  if (delta < 5) return "just now";
  if (delta < 60) return `${Math.floor(delta)} s ago`;
  if (delta < 3600) return `${Math.floor(delta / 60)} min ago`;
  if (delta < 86400) return `${Math.floor(delta / 3600)} h ago`;
  return new Date(seconds * 1000).toLocaleDateString();
}

export function statusBadge(status, attrs = {}) {
  return h("span", { class: `badge status-${status}`, ...attrs }, (status || "").replace("_", " "));
}

export function json(value, indent = 2) {
  return JSON.stringify(value, null, indent);
}

export function errorText(err) {
  if (!err) return "";
  return err.code ? `${err.code}: ${err.message}` : String(err.message || err);
}

// -- a form generated from a JSON schema --------------------------------------------------

let formCounter = 0;

function fieldType(schema) {
  if (!schema) return { type: "string", nullable: false };
  if (schema.enum) return { type: "enum", nullable: false };
  if (Array.isArray(schema.anyOf)) {
    const kinds = schema.anyOf.filter((s) => s.type !== "null");
    const nullable = kinds.length < schema.anyOf.length;
    if (kinds.length === 1) return { ...fieldType(kinds[0]), nullable, inner: kinds[0] };
    return { type: "json", nullable };
  }
  const type = Array.isArray(schema.type) ? schema.type.find((t) => t !== "null") : schema.type;
  return { type: type || "json", nullable: Array.isArray(schema.type) && schema.type.includes("null") };
}

function label(name, schema) {
  return schema.title || name.replace(/_/g, " ");
}

/**
 * A form for a JSON schema: an object schema gives one field per property, any other
 * schema one field called "value". Returns {element, read, focus, show}; `read()` returns
 * {value} or {error} (and marks the offending field). The fields named in `hidden` start
 * hidden; `show(name, visible)` shows or hides a field, and a hidden field is not read.
 */
export function schemaForm(schema, { prefix = "f", hidden = [] } = {}) {
  const id = `${prefix}${++formCounter}`;
  const isObject = schema && (schema.type === "object" || schema.properties);
  const props = isObject ? schema.properties || {} : { value: schema || { type: "string" } };
  const required = new Set(isObject ? schema.required || [] : ["value"]);
  const fields = [];
  const element = h("div", { class: "schema-form" });
  for (const [name, prop] of Object.entries(props)) {
    const kind = fieldType(prop);
    const inner = kind.inner || prop;
    const inputId = `${id}-${name}`;
    const hint = prop.description || inner.description;
    const def = prop.default ?? inner.default;
    let input;
    if (kind.type === "boolean") {
      input = h("input", { type: "checkbox", id: inputId, name, checked: Boolean(def) });
    } else if (kind.type === "enum") {
      input = h(
        "select",
        { id: inputId, name },
        prop.enum.map((v) => h("option", { value: JSON.stringify(v), selected: v === def }, String(v))),
      );
    } else if (kind.type === "integer" || kind.type === "number") {
      input = h("input", {
        type: "number",
        id: inputId,
        name,
        inputmode: kind.type === "integer" ? "numeric" : "decimal",
        step: kind.type === "integer" ? "1" : "any",
        min: inner.minimum ?? null,
        max: inner.maximum ?? null,
        value: def ?? "",
      });
    } else if (kind.type === "string") {
      const long = (inner.maxLength ?? 10_000) > 200 && /prompt|text|content|message|value/i.test(name);
      input = long
        ? h("textarea", { id: inputId, name, rows: 2, maxlength: inner.maxLength ?? null }, def ?? "")
        : h("input", { type: "text", id: inputId, name, value: def ?? "", maxlength: inner.maxLength ?? null });
    } else {
      input = h("textarea", { id: inputId, name, rows: 3, class: "mono" }, def !== undefined ? json(def) : "");
    }
    const isRequired = required.has(name);
    if (isRequired && kind.type !== "boolean") input.required = true;
    const row = h(
      "div",
      { class: `field field-${kind.type}`, hidden: hidden.includes(name), dataset: { field: name } },
      h("label", { for: inputId }, isObject ? label(name, prop) : "Answer", isRequired && isObject ? " *" : ""),
      input,
      hint ? h("small", { class: "hint" }, hint) : null,
    );
    element.append(row);
    fields.push({ name, kind, input, row, required: isRequired });
  }

  function read() {
    const value = {};
    for (const field of fields) {
      const { name, kind, input } = field;
      if (field.row.hidden) continue;
      input.removeAttribute("aria-invalid");
      const fail = (message) => {
        input.setAttribute("aria-invalid", "true");
        input.focus();
        return { error: `${name}: ${message}` };
      };
      if (kind.type === "boolean") {
        value[name] = input.checked;
        continue;
      }
      const raw = input.value;
      if (raw === "") {
        if (field.required && kind.type !== "string") return fail("required");
        if (field.required) value[name] = "";
        else if (kind.nullable && isObject) value[name] = null;
        continue; // let the server apply the default
      }
      if (kind.type === "integer" || kind.type === "number") {
        const n = Number(raw);
        if (!Number.isFinite(n) || (kind.type === "integer" && !Number.isInteger(n))) {
          return fail(`expected ${kind.type === "integer" ? "an integer" : "a number"}`);
        }
        value[name] = n;
      } else if (kind.type === "enum") {
        value[name] = JSON.parse(raw);
      } else if (kind.type === "string") {
        value[name] = raw;
      } else {
        try {
          value[name] = JSON.parse(raw);
        } catch {
          return fail("not valid JSON");
        }
      }
    }
    return { value: isObject ? value : value.value };
  }

  function show(name, visible) {
    const field = fields.find((f) => f.name === name);
    if (field) field.row.hidden = !visible;
  }

  return { element, read, show, focus: () => fields.find((f) => !f.row.hidden)?.input.focus() };
}

// -- a run's message: thinking, tool cards, text, input request, error ---------------------

/**
 * Renders a run state (PROTOCOL.md §1) and keeps it current with `update(state)`; each
 * part is touched only when it changed, so streaming text costs one text-node write.
 */
export class MessageView {
  constructor({ testid = "run", live = true } = {}) {
    this.live = live;
    this.thinkingText = h("div", { class: "thinking-text", dataset: { testid: `${testid}-thinking` } });
    this.thinkingSummary = h("summary", {}, "Thinking");
    this.thinking = h("details", { class: "thinking", hidden: true }, this.thinkingSummary, this.thinkingText);
    this.tools = h("div", { class: "tools", dataset: { testid: `${testid}-tools` } });
    this.textNode = document.createTextNode("");
    this.content = h("div", { class: "content", dataset: { testid: `${testid}-text` } }, this.textNode);
    this.error = h("div", { class: "run-error", role: "alert", hidden: true });
    this.element = h("div", { class: "message" }, this.thinking, this.tools, this.content, this.error);
    this._tools = "";
  }

  update(state) {
    const message = state.message;
    if (this.thinkingText.textContent !== message.thinking) this.thinkingText.textContent = message.thinking;
    this.thinking.hidden = !message.thinking;
    const streamingThinking = this.live && state.status === "running" && !message.content && !message.tools.length;
    this.thinkingSummary.textContent = streamingThinking ? "Thinking…" : "Thinking";
    if (this.textNode.data !== message.content) this.textNode.data = message.content;
    this.content.classList.toggle("streaming", this.live && state.status === "running");
    this.content.classList.toggle("empty", !message.content);
    const tools = JSON.stringify(message.tools);
    if (tools !== this._tools) {
      this._tools = tools;
      this.tools.replaceChildren(...message.tools.map(toolCard));
    }
    const err = state.error;
    let errorText = null;
    if (err) errorText = `${state.status === "failed" ? "Failed" : "Error"}: ${describeError(err)}`;
    this.error.hidden = !errorText;
    this.error.textContent = errorText || "";
  }
}

/** An error as people read it: "code: message", a string as it is, else its JSON. */
function describeError(err) {
  if (typeof err === "string") return err;
  if (err && typeof err === "object" && (typeof err.code === "string" || typeof err.message === "string")) {
    return [err.code, err.message].filter((part) => typeof part === "string" && part).join(": ");
  }
  return json(err, 0);
}

function toolCard(tool) {
  const result =
    tool.status === "failed"
      ? h("pre", { class: "tool-error" }, describeError(tool.error))
      : tool.status === "completed"
        ? tool.output === undefined || tool.output === null
          ? h("div", { class: "tool-output hint" }, "done, no output")
          : h("pre", { class: "tool-output", dataset: { raw: "" } }, typeof tool.output === "string" ? tool.output : json(tool.output))
        : h("div", { class: "tool-pending" }, "running…");
  return h(
    "div",
    { class: `tool status-${tool.status}`, dataset: { testid: "tool-card" } },
    h(
      "div",
      { class: "tool-head" },
      h("span", { class: "tool-icon", "aria-hidden": "true" }, "⚙"),
      h("strong", {}, tool.name || "tool"),
      h("code", { class: "tool-id" }, tool.id || ""),
      statusBadge(tool.status),
    ),
    h("details", { class: "tool-args" }, h("summary", {}, "Arguments"), h("pre", { dataset: { raw: "" } }, json(tool.args ?? {}))),
    result,
  );
}

// -- a confirmation dialog ------------------------------------------------------------------

let dialogCounter = 0;

/**
 * Ask for a confirmation in a modal dialog (a native <dialog>: focus moves into it and
 * stays there, Escape cancels, the page behind is inert). Cancel has the focus first, so
 * Enter pressed by habit does not confirm. Resolves true when confirmed; focus goes back
 * to where it was (the caller moves it elsewhere if that element is gone).
 */
export function confirmDialog({ title, body, confirmLabel = "Delete", cancelLabel = "Cancel", danger = true }) {
  return new Promise((resolve) => {
    const opener = document.activeElement;
    const id = `dialog${++dialogCounter}`;
    const cancel = h("button", { value: "cancel", dataset: { testid: "confirm-cancel" } }, cancelLabel);
    const confirm = h("button", { value: "confirm", class: danger ? "danger" : "primary", dataset: { testid: "confirm-ok" } }, confirmLabel);
    const dialog = h(
      "dialog",
      { class: "confirm", "aria-labelledby": `${id}-title`, "aria-describedby": `${id}-body`, dataset: { testid: "confirm-dialog" } },
      h(
        "form",
        { method: "dialog" },
        h("h2", { id: `${id}-title` }, title),
        h("p", { id: `${id}-body` }, body),
        h("div", { class: "actions" }, cancel, confirm),
      ),
    );
    dialog.addEventListener("close", () => {
      const confirmed = dialog.returnValue === "confirm";
      dialog.remove();
      if (opener instanceof HTMLElement && opener.isConnected) opener.focus();
      resolve(confirmed);
    });
    document.body.append(dialog);
    dialog.showModal();
    cancel.focus();
  });
}

// -- a title renamed in place ---------------------------------------------------------------

/**
 * A title shown by `display` (a heading or a link), with a Rename button (when
 * `canEdit`) that turns it into a text field in place: Enter saves through
 * `save(title)` (null for an empty field; it resolves, or throws an error that is shown
 * beside the field), Escape cancels. Returns {element, set(title), editing}.
 *
 *   label     what the field is called for assistive technology ("Conversation title")
 *   name      () -> a short name of the thing, for the button's accessible name
 *   announce  (text) -> void: where a result is read out (an aria-live region)
 */
export function titleEditor({ display, value, canEdit, save, label, name = () => "", announce = () => {}, placeholder = "" }) {
  let current = value ?? null;
  let editor = null;
  const rename = h(
    "button",
    { type: "button", class: "small rename", dataset: { testid: "rename" }, hidden: !canEdit, onclick: () => open() },
    "Rename",
  );
  const element = h("span", { class: "title-edit" }, display, rename);
  labelButton();

  function labelButton() {
    const what = name();
    rename.setAttribute("aria-label", what ? `Rename ${what}` : "Rename");
  }

  function open() {
    if (editor) return;
    const input = h("input", {
      type: "text",
      value: current ?? "",
      placeholder,
      maxlength: 500,
      "aria-label": label,
      autocomplete: "off",
      dataset: { testid: "rename-input" },
      onkeydown: (e) => {
        if (e.key === "Escape") {
          e.preventDefault();
          e.stopPropagation();
          close();
          rename.focus();
        }
      },
    });
    const error = h("span", { class: "run-error", role: "alert", dataset: { testid: "rename-error" } });
    const ok = h("button", { type: "submit", class: "small primary", dataset: { testid: "rename-save" } }, "Save");
    const form = h(
      "form",
      {
        class: "rename-form",
        onsubmit: async (e) => {
          e.preventDefault();
          const title = input.value.trim() || null;
          input.disabled = ok.disabled = true;
          error.textContent = "";
          try {
            await save(title);
            current = title;
            close();
            rename.focus();
            announce(title ? `Renamed to “${title}”.` : "The title was cleared.");
          } catch (err) {
            input.disabled = ok.disabled = false;
            error.textContent = `Could not rename: ${errorText(err)}`;
            input.focus();
          }
        },
      },
      input,
      ok,
      h("button", { type: "button", class: "small", onclick: () => (close(), rename.focus()) }, "Cancel"),
      error,
    );
    editor = form;
    display.hidden = true;
    rename.hidden = true;
    element.append(form);
    input.focus();
    input.select();
  }

  function close() {
    editor?.remove();
    editor = null;
    display.hidden = false;
    rename.hidden = !canEdit;
  }

  return {
    element,
    get editing() {
      return editor !== null;
    },
    /** The title as the server now has it (the field, if open, keeps what is typed). */
    set(title) {
      current = title ?? null;
      labelButton();
    },
  };
}
