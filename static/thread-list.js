// The conversation list (#/threads): the threads this page's token may read, newest first,
// read a page at a time by cursor as the list scrolls (GET /api/threads, PROTOCOL.md §5);
// a search by title; rename in place (operator and above) and delete after a confirmation
// (admin). The server has no search by title, so the search filters the conversations
// loaded so far and, while it hides most of them, loads a few more pages unasked.
//
// The first MAX_WATCHES threads listed are watched (watch_thread), so a rename or a delete
// made in another tab shows here as it happens; the rest show what they were when loaded.

import { confirmDialog, errorText, h, shortId, statusBadge, timeAgo, titleEditor } from "./ui.js";

const PAGE_SIZE = 30;
const MAX_WATCHES = 40; // of the server's 64 per connection by default: leave room for views
const MAX_UNASKED_PAGES = 10; // while a search is typed: then "Search older conversations"

/** Mounts the list into `root`; returns a function that unmounts it. */
export function mountThreadList(root, app) {
  const { client } = app;
  document.title = "conversations · runcast";

  const entries = new Map(); // thread_id -> {thread, element, editor, watch, meta}
  let cursor = null; // the next page's cursor (null before the first page)
  let done = false;
  let loading = false;
  let unaskedPages = 0; // pages loaded for the current search without a scroll or a click
  let gone = false; // unmounted
  let watched = 0; // rows with a thread watch

  const heading = h("h1", { id: "threads-title", tabindex: "-1" }, "Conversations");
  const status = h("p", { class: "hint", role: "status", "aria-live": "polite", dataset: { testid: "thread-list-status" } });
  const search = h("input", {
    type: "search",
    id: "thread-search",
    autocomplete: "off",
    spellcheck: "false",
    "aria-describedby": "thread-search-help",
    dataset: { testid: "thread-search" },
    oninput: () => {
      unaskedPages = 0;
      filter();
      announceCount();
      renderFoot();
      recheck();
    },
  });
  const list = h("ul", { class: "thread-list", "aria-labelledby": "threads-title", dataset: { testid: "thread-list" } });
  const more = h("button", { type: "button", class: "small", dataset: { testid: "load-more" }, onclick: () => loadPage() }, "Load more");
  const end = h("p", { class: "hint", tabindex: "-1", hidden: true, dataset: { testid: "thread-list-end" } });
  const error = h("p", { class: "run-error", role: "alert" });

  // -- a new conversation ----------------------------------------------------------------
  const newTitle = h("input", { type: "text", id: "new-thread-title", maxlength: 500, autocomplete: "off", dataset: { testid: "new-thread-title" } });
  const create = h("button", { type: "submit", class: "primary", dataset: { testid: "new-thread" } }, "New conversation");
  const createError = h("p", { class: "run-error", role: "alert" });
  const createForm = h(
    "form",
    {
      class: "new-thread",
      hidden: !app.can("create"),
      onsubmit: async (e) => {
        e.preventDefault();
        create.disabled = true;
        createError.textContent = "";
        try {
          const title = newTitle.value.trim();
          const thread = await client.api("/api/threads", { method: "POST", body: title ? { title } : {} });
          app.navigate(`#/threads/${thread.thread_id}`);
        } catch (err) {
          createError.textContent = `Could not create it: ${errorText(err)}`;
          create.disabled = false;
        }
      },
    },
    h("label", { for: "new-thread-title" }, "Title ", h("span", { class: "hint" }, "(optional)")),
    h("div", { class: "new-thread-row" }, newTitle, create),
    createError,
  );

  root.replaceChildren(
    h(
      "article",
      { class: "thread-list-view", dataset: { testid: "thread-list-view" } },
      h("header", { class: "run-head" }, heading),
      h("p", {}, "A conversation is a thread of turns: edit a message, regenerate an answer or rewind, and switch between the branches this leaves."),
      createForm,
      h(
        "div",
        { class: "field search" },
        h("label", { for: "thread-search" }, "Search by title"),
        search,
        h("small", { id: "thread-search-help", class: "hint" }, "Searches the conversations loaded so far; scrolling down loads older ones."),
      ),
      status,
      error,
      list,
      h("div", { class: "list-foot" }, more, end),
    ),
  );
  let flash = app.flash; // a result of the view we came from ("... was deleted.")
  app.flash = null;
  if (flash) status.textContent = flash;

  // -- paging ----------------------------------------------------------------------------
  // The "Load more" button is the sentinel: reaching it loads the next page, and a
  // keyboard or a screen reader user can press it.
  const observer = new IntersectionObserver((seen) => {
    // An entry may be older than the last page appended: ask the layout as it is now.
    if (seen.some((entry) => entry.isIntersecting) && inView(more)) loadPage({ unasked: true });
  });
  observer.observe(more);

  /** After a page, ask the observer again: the sentinel may still be in view. */
  function recheck() {
    if (gone || done) return;
    observer.unobserve(more);
    observer.observe(more);
  }

  async function loadPage({ unasked = false } = {}) {
    if (loading || done || gone) return;
    if (unasked && search.value.trim()) {
      if (unaskedPages >= MAX_UNASKED_PAGES) return; // the button asks now
      unaskedPages++;
    } else if (!unasked) {
      unaskedPages = 0;
    }
    loading = true;
    // Not `disabled`: a keyboard user who pressed it keeps the focus on it.
    more.setAttribute("aria-disabled", "true");
    more.textContent = "Loading…";
    list.setAttribute("aria-busy", "true");
    error.textContent = "";
    try {
      const page = await client.listThreads({ limit: PAGE_SIZE, cursor: cursor ?? undefined });
      if (gone) return;
      for (const thread of page.threads) add(thread);
      cursor = page.next_cursor ?? null;
      done = cursor === null;
      filter();
      announceCount();
    } catch (err) {
      if (gone) return;
      error.textContent = `Could not list conversations: ${errorText(err)}`;
      done = err.status === 401 || err.status === 403; // nothing more to try with this token
    } finally {
      loading = false;
      list.removeAttribute("aria-busy");
      renderFoot();
    }
    if (!error.textContent) recheck();
  }

  function renderFoot() {
    if (loading) return;
    const hadFocus = document.activeElement === more;
    more.hidden = done;
    more.removeAttribute("aria-disabled");
    more.textContent = search.value.trim() && unaskedPages >= MAX_UNASKED_PAGES ? "Search older conversations" : "Load more";
    end.hidden = !done;
    if (hadFocus && done) end.focus();
    end.textContent = entries.size ? "That is every conversation." : "No conversations yet.";
  }

  // -- rows ------------------------------------------------------------------------------
  function add(thread) {
    if (entries.has(thread.thread_id)) return; // paging never repeats one; a reload might
    const entry = { thread, watch: null };
    const link = h("a", { href: `#/threads/${thread.thread_id}`, class: "thread-name", dataset: { testid: "thread-link" } });
    entry.link = link;
    entry.editor = titleEditor({
      display: link,
      value: thread.title,
      canEdit: app.can("rename"),
      label: "Conversation title",
      placeholder: "Untitled conversation",
      name: () => nameOf(entry.thread),
      announce: (text) => (status.textContent = text),
      save: async (title) => {
        entry.thread = { ...entry.thread, ...(await client.updateThread(thread.thread_id, { title })) };
        render(entry);
      },
    });
    entry.meta = h("span", { class: "thread-meta hint" });
    const remove = h(
      "button",
      {
        type: "button",
        class: "small danger",
        dataset: { testid: "delete-thread" },
        hidden: !app.can("delete"),
        onclick: () => onDelete(entry, remove),
      },
      "Delete",
    );
    entry.remove = remove;
    entry.element = h(
      "li",
      { class: "thread-item", dataset: { testid: "thread-item", threadId: thread.thread_id } },
      h("div", { class: "thread-line" }, entry.editor.element, entry.meta),
      h("div", { class: "thread-actions" }, remove),
    );
    entries.set(thread.thread_id, entry);
    list.append(entry.element);
    render(entry);
    if (watched < MAX_WATCHES) watch(entry);
  }

  function render(entry) {
    const { thread } = entry;
    entry.link.textContent = thread.title || "Untitled conversation";
    entry.link.classList.toggle("untitled", !thread.title);
    entry.editor.set(thread.title);
    entry.remove.setAttribute("aria-label", `Delete ${nameOf(thread)}`);
    entry.element.dataset.title = thread.title ?? "";
    entry.meta.replaceChildren(
      h("code", { title: thread.thread_id }, shortId(thread.thread_id)),
      ` · updated ${timeAgo(thread.updated_at ?? thread.created_at)}`,
      ...(thread.active_run_id ? [" · ", statusBadge("running")] : []),
    );
  }

  function watch(entry) {
    const threadId = entry.thread.thread_id;
    watched++;
    entry.watch = client.watchThread(threadId, {
      onChange: (frame) => {
        // The frame may come before the answer to this tab's own DELETE.
        if (frame.change === "deleted") drop(threadId, entry.deleting ? "was deleted" : "was deleted elsewhere");
        else if (frame.change === "run_started") update(threadId, { active_run_id: frame.run?.run_id ?? null });
        else if (frame.change === "run_ended") update(threadId, { active_run_id: null });
        else refresh(threadId);
      },
      onError: () => {
        if (entry.watch) watched--;
        entry.watch = null; // e.g. too_many_subscriptions: this row shows what it was
      },
    });
  }

  function update(threadId, fields) {
    const entry = entries.get(threadId);
    if (!entry) return;
    entry.thread = { ...entry.thread, ...fields };
    render(entry);
    filter();
  }

  const refreshing = new Set();

  /** Read one thread again (its title may have changed in another tab). */
  async function refresh(threadId) {
    if (refreshing.has(threadId)) return;
    refreshing.add(threadId);
    try {
      const { turns: _turns, ...thread } = await client.api(`/api/threads/${threadId}`);
      update(threadId, thread);
    } catch (err) {
      if (err.code === "not_found") drop(threadId, "was deleted");
    } finally {
      refreshing.delete(threadId);
    }
  }

  /** Take a thread off the list; the keyboard goes to the next row (or the heading). */
  function drop(threadId, why) {
    const entry = entries.get(threadId);
    if (!entry) return;
    // This tab's own delete keeps the keyboard in the list, wherever the focus was left.
    const hadFocus = entry.deleting || entry.element.contains(document.activeElement);
    const next = entry.element.nextElementSibling || entry.element.previousElementSibling;
    if (entry.watch) watched--;
    entry.watch?.close();
    entries.delete(threadId);
    entry.element.remove();
    status.textContent = `${capitalized(nameOf(entry.thread))} ${why}.`;
    if (hadFocus) (next?.querySelector("a") || heading).focus();
    renderFoot();
  }

  async function onDelete(entry, button) {
    if (entry.deleting) return;
    const name = nameOf(entry.thread);
    const confirmed = await confirmDialog({
      title: "Delete this conversation?",
      body: `${capitalized(name)}, its turns and its runs will be erased for good. This cannot be undone.`,
      confirmLabel: "Delete for good",
    });
    if (!confirmed || gone || entry.deleting) return;
    // Not `disabled`: that would drop the focus on the page's body while the request runs.
    button.setAttribute("aria-disabled", "true");
    entry.deleting = true;
    try {
      await app.deleteThread(entry.thread.thread_id);
      drop(entry.thread.thread_id, "was deleted");
    } catch (err) {
      entry.deleting = false;
      button.removeAttribute("aria-disabled");
      status.textContent =
        err.code === "run_in_progress"
          ? `${capitalized(name)} has a run in progress: stop it first, then delete.`
          : `Could not delete ${name}: ${errorText(err)}`;
      button.focus();
    }
  }

  // -- search ----------------------------------------------------------------------------
  function filter() {
    const query = search.value.trim().toLowerCase();
    for (const entry of entries.values()) {
      const title = (entry.thread.title || "untitled conversation").toLowerCase();
      entry.element.hidden = Boolean(query) && !title.includes(query) && !entry.thread.thread_id.toLowerCase().startsWith(query);
    }
  }

  let countTimer = null;

  function announceCount() {
    clearTimeout(countTimer);
    // After typing pauses: a screen reader reads the count once, not on every key.
    countTimer = setTimeout(() => {
      const query = search.value.trim();
      const shown = [...entries.values()].filter((e) => !e.element.hidden).length;
      const loaded = `${entries.size} conversation${entries.size === 1 ? "" : "s"} loaded${done ? "" : " (more further down)"}`;
      status.textContent = `${flash ? `${flash} ` : ""}${query ? `${shown} of ${loaded} match “${query}”.` : `${loaded}.`}`;
      flash = null;
    }, 300);
  }

  loadPage({ unasked: true });
  return () => {
    gone = true;
    observer.disconnect();
    clearTimeout(countTimer);
    for (const entry of entries.values()) entry.watch?.close();
  };
}

function capitalized(text) {
  return text.charAt(0).toUpperCase() + text.slice(1);
}

function inView(element) {
  const box = element.getBoundingClientRect();
  return box.bottom >= 0 && box.top <= (window.innerHeight || document.documentElement.clientHeight);
}

/** How a message names a thread: its title in quotes, or its short id. */
function nameOf(thread) {
  return thread.title ? `“${thread.title}”` : `conversation ${shortId(thread.thread_id)}`;
}
