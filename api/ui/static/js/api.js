// The dashboard's only way to the API: fetch with the bearer key kept in this tab's session storage.
// A 401 forgets the key and returns to the login page. Server-sent events are read with fetch too
// (EventSource cannot send an Authorization header), resuming with Last-Event-ID after a drop.

const KEY_NAME = "distill.apiKey";

export const session = {
  get key() {
    return sessionStorage.getItem(KEY_NAME);
  },
  set(key) {
    sessionStorage.setItem(KEY_NAME, key);
  },
  clear() {
    sessionStorage.removeItem(KEY_NAME);
  },
};

export class ApiError extends Error {
  constructor(status, body) {
    const error = body?.error ?? {};
    super(error.message || `HTTP ${status}`);
    this.status = status;
    this.code = error.code ?? "http_error";
    this.param = error.param ?? null;
    this.requestId = error.request_id ?? null;
  }
}

function signedOut() {
  session.clear();
  const here = location.hash && !location.hash.startsWith("#/login") ? location.hash.slice(1) : "";
  location.hash = here ? `#/login?next=${encodeURIComponent(here)}` : "#/login";
}

function authHeaders(extra = {}) {
  const headers = { ...extra };
  if (session.key) headers.Authorization = `Bearer ${session.key}`;
  return headers;
}

async function failure(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = null;
  }
  if (response.status === 401) signedOut();
  return new ApiError(response.status, body);
}

/** Call the API; returns the parsed JSON body, or throws an ApiError carrying the error shape. */
export async function api(path, { method = "GET", json, body, headers = {}, signal, query } = {}) {
  let url = path;
  if (query) {
    const params = new URLSearchParams();
    for (const [key, value] of Object.entries(query)) {
      if (value !== undefined && value !== null && value !== "") params.set(key, value);
    }
    const text = params.toString();
    if (text) url += (url.includes("?") ? "&" : "?") + text;
  }
  const init = { method, headers: authHeaders(headers), signal };
  if (json !== undefined) {
    init.body = JSON.stringify(json);
    init.headers["Content-Type"] = "application/json";
  } else if (body !== undefined) {
    init.body = body;
  }
  const response = await fetch(url, init);
  if (!response.ok) throw await failure(response);
  if (response.status === 204) return null;
  return response.json();
}

/** Check a key before keeping it: throws an ApiError (401 for a wrong key) without signing out. */
export async function checkKey(key) {
  const response = await fetch("/v1/jobs?limit=1", { headers: { Authorization: `Bearer ${key}` } });
  if (!response.ok) {
    let body = null;
    try {
      body = await response.json();
    } catch {
      body = null;
    }
    throw new ApiError(response.status, body);
  }
}

/** Fetch an archive with the key and hand it to the browser as a download. */
export async function download(path, fallbackName) {
  const response = await fetch(path, { headers: authHeaders() });
  if (!response.ok) throw await failure(response);
  const disposition = response.headers.get("Content-Disposition") || "";
  const match = /filename\*?=(?:UTF-8'')?"?([^";]+)"?/i.exec(disposition);
  const name = match ? decodeURIComponent(match[1]) : fallbackName;
  const url = URL.createObjectURL(await response.blob());
  const link = document.createElement("a");
  link.href = url;
  link.download = name;
  link.hidden = true;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
  return name;
}

function sleep(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal?.addEventListener("abort", () => {
      clearTimeout(timer);
      resolve();
    });
  });
}

/**
 * Read a server-sent event stream with the key; calls onEvent({id, type, data}) for each event.
 * When the server ends the stream, `reconnect()` decides whether to open it again (from the last id);
 * a network error or a server `error` event reconnects after the server's `retry:` delay.
 * Stops for good when `signal` aborts or on a 4xx.
 */
export async function streamEvents(path, { onEvent, reconnect = () => false, onState, signal }) {
  let lastEventId = null;
  let retryMs = 2000;
  while (!signal?.aborted) {
    let ended = false;
    try {
      const headers = authHeaders({ Accept: "text/event-stream" });
      if (lastEventId !== null) headers["Last-Event-ID"] = lastEventId;
      const response = await fetch(path, { headers, signal });
      if (!response.ok) {
        const error = await failure(response);
        if (response.status < 500) {
          onState?.("closed", error);
          return;
        }
        throw error;
      }
      onState?.("open");
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      let event = { id: null, type: "message", data: [] };
      let failed = false;
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        const lines = buffer.split(/\r\n|\r|\n/);
        buffer = lines.pop();
        for (const line of lines) {
          if (line === "") {
            if (event.data.length) {
              if (event.id !== null) lastEventId = event.id;
              const text = event.data.join("\n");
              let data = text;
              try {
                data = JSON.parse(text);
              } catch {
                data = text;
              }
              if (event.type === "error") failed = true;
              else onEvent({ id: event.id, type: event.type, data });
            }
            event = { id: null, type: "message", data: [] };
            continue;
          }
          if (line.startsWith(":")) continue;
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          const fieldValue = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
          if (field === "data") event.data.push(fieldValue);
          else if (field === "event") event.type = fieldValue;
          else if (field === "id") event.id = fieldValue;
          else if (field === "retry" && /^\d+$/.test(fieldValue)) retryMs = Number(fieldValue);
        }
      }
      ended = !failed;
    } catch (error) {
      if (signal?.aborted) return;
      if (error instanceof ApiError && error.status < 500) return;
    }
    if (signal?.aborted) return;
    if (ended && !(await reconnect())) {
      onState?.("closed");
      return;
    }
    onState?.("reconnecting");
    await sleep(retryMs, signal);
  }
}
