// The page's only way to the service: the REST API and its SSE stream, with the token the user
// signed in with sent as `Authorization: Bearer` on every call. The page itself is public and
// holds no data; everything it shows passes the API's own door and auth like any client's call.

const TOKEN_KEY = "mlynar.token";

/** The API said 401 (a token is needed) or 403 to a request that carried one (refused). */
export class AuthError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

/** Any other error answer: the API's `{error, detail}` body. */
export class ApiError extends Error {
  constructor(status, message, detail) {
    super(message);
    this.status = status;
    this.detail = detail;
  }
}

// sessionStorage: the token lives as long as the tab, never on disk for other sites or later users
export const token = () => sessionStorage.getItem(TOKEN_KEY);
export const setToken = (value) => sessionStorage.setItem(TOKEN_KEY, value);
export const clearToken = () => sessionStorage.removeItem(TOKEN_KEY);

function headers(extra = {}) {
  const h = new Headers(extra);
  const t = token();
  if (t) h.set("Authorization", `Bearer ${t}`);
  return h;
}

/** The path of one of the API's own absolute URLs (unit downloads, logs): the page may be
 * opened under another name of the same server, and a foreign origin would be refused. */
export const pathOf = (url) => {
  const u = new URL(url, location.href);
  return u.pathname + u.search;
};

async function failure(r, sentToken) {
  let body = null;
  try {
    body = await r.json();
  } catch {
    // not JSON (a proxy's page): the status says enough
  }
  const message = (body && body.error) || `${r.status} ${r.statusText}`;
  if (r.status === 401 || (r.status === 403 && sentToken)) return new AuthError(r.status, message);
  return new ApiError(r.status, message, body && body.detail);
}

/** One API call: JSON (or a FormData) in, JSON or text out; throws AuthError/ApiError. */
export async function call(method, path, { json, form, text = false } = {}) {
  const init = { method, headers: headers(), cache: "no-store" };
  if (json !== undefined) {
    init.headers.set("Content-Type", "application/json");
    init.body = JSON.stringify(json);
  } else if (form !== undefined) {
    init.body = form;
  }
  const r = await fetch(path, init);
  if (!r.ok) throw await failure(r, Boolean(token()));
  if (text) return r.text();
  if (r.status === 204) return null;
  const type = r.headers.get("Content-Type") || "";
  return type.includes("json") ? r.json() : r.text();
}

/** The bytes behind an API URL, as a Blob (for downloads that must carry the token). */
export async function blob(path) {
  const r = await fetch(path, { headers: headers(), cache: "no-store" });
  if (!r.ok) throw await failure(r, Boolean(token()));
  return r.blob();
}

/** Parse the text of one SSE message block into {id, event, data}; null for a comment. */
function parseBlock(block) {
  const msg = { id: null, event: "message", data: [] };
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "id") msg.id = value;
    else if (field === "event") msg.event = value;
    else if (field === "data") msg.data.push(value);
  }
  if (msg.id === null && msg.data.length === 0) return null;
  return { id: msg.id, event: msg.event, data: msg.data.join("\n") };
}

/**
 * Follow an SSE route with fetch (EventSource cannot send an Authorization header), resuming
 * with Last-Event-ID after a dropped connection, exactly where it stopped.
 * `onEvent({id, event, data})` is called per event; `after` is the sequence to start after.
 * Returns a function that stops following.
 */
export function follow(path, onEvent, { after = null, onError = null } = {}) {
  const abort = new AbortController();
  let last = after;
  let stopped = false;
  let retryMs = 1000; // the service's `retry:` line may change it
  (async () => {
    while (!stopped) {
      try {
        const h = headers({ Accept: "text/event-stream" });
        if (last !== null) h.set("Last-Event-ID", String(last));
        const r = await fetch(path, { headers: h, signal: abort.signal, cache: "no-store" });
        if (!r.ok) throw await failure(r, Boolean(token()));
        const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
        let buffer = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += value.replace(/\r\n?/g, "\n");
          let end;
          while ((end = buffer.indexOf("\n\n")) >= 0) {
            const block = buffer.slice(0, end);
            buffer = buffer.slice(end + 2);
            const retry = /^retry: *(\d+)$/m.exec(block);
            if (retry) retryMs = Number(retry[1]);
            const msg = parseBlock(block.replace(/^retry:.*$/m, ""));
            if (msg === null) continue;
            if (msg.id !== null) last = msg.id;
            onEvent(msg);
          }
        }
      } catch (e) {
        if (stopped) return;
        if (onError) onError(e);
        if (e instanceof AuthError) return;
      }
      if (stopped) return;
      // reconnect after the server's retry interval (a closed stream is resumed, not restarted)
      await new Promise((resolve) => setTimeout(resolve, retryMs));
    }
  })();
  return () => {
    stopped = true;
    abort.abort();
  };
}
