// The page's side of access (PROTOCOL.md §8): where its token comes from (a share link's
// fragment, the tab's session storage, the token form), where it is kept, and what the
// page may show for it. The server decides every request; this only avoids offering
// what it would refuse.

const STORAGE_KEY = "runcast.token";

/**
 * Take the token out of a share link (`#/runs/{id}?token=...`): returns it (or null) and
 * rewrites the address bar without it, so that it is neither kept in the history nor
 * copied along with the address.
 */
export function takeLinkToken() {
  const hash = location.hash;
  const q = hash.indexOf("?");
  if (q < 0) return null;
  const params = new URLSearchParams(hash.slice(q + 1));
  const token = params.get("token");
  if (token === null) return null;
  params.delete("token");
  const rest = params.toString();
  const clean = hash.slice(0, q) + (rest ? `?${rest}` : "");
  history.replaceState(history.state, "", `${location.pathname}${location.search}${clean}`);
  return token.trim() || null;
}

/** The token this tab holds, or null. Session storage: it ends with the tab. */
export function storedToken() {
  try {
    return sessionStorage.getItem(STORAGE_KEY) || null;
  } catch {
    return null; // storage disabled: the token lives in memory only
  }
}

export function storeToken(token) {
  try {
    if (token) sessionStorage.setItem(STORAGE_KEY, token);
    else sessionStorage.removeItem(STORAGE_KEY);
  } catch {
    // storage disabled: the token lives in memory only
  }
}

/**
 * What a share token says about itself (`rs1.<payload>.<signature>`, the payload base64url
 * JSON): `{role, scope: {kind, id}, expiresAt}`; null for a server token, whose role only
 * the server knows. A hint for what to show, never a check: the server verifies.
 */
export function tokenGrant(token) {
  if (!token || !token.startsWith("rs1.")) return null;
  try {
    const body = token.slice(4).split(".", 1)[0].replace(/-/g, "+").replace(/_/g, "/");
    const fields = JSON.parse(atob(body + "=".repeat((4 - (body.length % 4)) % 4)));
    if (typeof fields.r !== "string") return null;
    return { role: fields.r, scope: { kind: fields.k, id: fields.i }, expiresAt: fields.e };
  } catch {
    return null;
  }
}

const RANK = { viewer: 1, operator: 2, admin: 3 };
const NEEDS = { read: 1, start: 2, stop: 2, respond: 2, change: 2, rename: 2, create: 2, share: 2, delete: 3 };

/** May a token with `role` do `action`? An unknown role may try anything. */
export function roleAllows(role, action) {
  if (!role || !(role in RANK)) return true;
  return RANK[role] >= (NEEDS[action] ?? 2);
}

/**
 * Ask the server whether it takes `token`, without using it for anything else:
 * `{ok: true}` or `{ok: false, message}`.
 */
export async function checkToken(httpBase, token) {
  let response;
  try {
    response = await fetch(`${httpBase}/api/runs?limit=1`, {
      headers: { Accept: "application/json", Authorization: `Bearer ${token}` },
      cache: "no-store",
    });
  } catch (err) {
    return { ok: false, message: `Could not reach the server (${err.message || err}).` };
  }
  if (response.ok) return { ok: true };
  const error = (await response.json().catch(() => null))?.error || {};
  if (response.status === 401) return { ok: false, message: "The server does not take this token: it is unknown, expired or revoked." };
  if (response.status === 403) return { ok: false, message: `This token may not read this server${error.message ? ` (${error.message})` : ""}.` };
  if (response.status === 429) return { ok: false, message: `Too many attempts: try again in ${error.retry_after ?? "a few"} s.` };
  return { ok: false, message: `The server answered ${response.status}${error.message ? `: ${error.message}` : ""}.` };
}
