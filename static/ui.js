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
 * schema one field called "value". Returns {element, read, focus}; `read()` returns
 * {value} or {error} (and marks the offending field).
 */
export function schemaForm(schema, { prefix = "f" } = {}) {
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
      { class: `field field-${kind.type}` },
      h("label", { for: inputId }, isObject ? label(name, prop) : "Answer", isRequired && isObject ? " *" : ""),
      input,
      hint ? h("small", { class: "hint" }, hint) : null,
    );
    element.append(row);
    fields.push({ name, kind, input, required: isRequired });
  }

  function read() {
    const value = {};
    for (const field of fields) {
      const { name, kind, input } = field;
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

  return { element, read, focus: () => fields[0]?.input.focus() };
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
    if (err) errorText = `${state.status === "failed" ? "Failed" : "Error"}: ${err.code ?? ""} ${err.message ?? ""}`;
    this.error.hidden = !errorText;
    this.error.textContent = errorText || "";
  }
}

function toolCard(tool) {
  const result =
    tool.status === "failed"
      ? h("pre", { class: "tool-error" }, typeof tool.error === "string" ? tool.error : json(tool.error))
      : tool.status === "completed"
        ? h("pre", { class: "tool-output" }, json(tool.output ?? null))
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
    h("details", { class: "tool-args" }, h("summary", {}, "Arguments"), h("pre", {}, json(tool.args ?? {}))),
    result,
  );
}
