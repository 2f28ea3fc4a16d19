// The page's only way to the server: the public JSON API, with the session cookie and the CSRF
// token, and streamed replies read from fetch() as Server-Sent Events (EventSource cannot POST).

const configElement = document.getElementById("chat-config");
export const config = JSON.parse(configElement ? configElement.textContent : "{}");
const csrfMeta = document.querySelector('meta[name="csrf-token"]');
const csrfToken = csrfMeta ? csrfMeta.content : "";
const SAFE_METHODS = new Set(["GET", "HEAD", "OPTIONS"]);

export const apiRoot = config.apiRoot || "/api/";

/** An error answered by the API (its `{"error": {...}}` body), or a network failure. */
export class ApiError extends Error {
  constructor(status, body, headers) {
    const detail = (body && typeof body === "object" && body.error) || {};
    super(detail.message || (status ? `The server answered ${status}.` : "The server could not be reached."));
    this.name = "ApiError";
    this.status = detail.status || status;
    this.code = detail.code || (status ? "error" : "network_error");
    this.details = detail;
    this.messageId = detail.message_id ?? null;
    let retryAfter = detail.retry_after;
    if (retryAfter == null && headers) {
      const header = Number.parseFloat(headers.get("Retry-After") || "");
      if (Number.isFinite(header)) retryAfter = header;
    }
    this.retryAfter = retryAfter == null ? null : Math.max(0, Math.ceil(Number(retryAfter)));
  }

  /** No user is logged in (or the session ended): 401, or DRF's 403 for session-only auth. */
  get needsLogin() {
    return this.status === 401 || (this.status === 403 && LOGIN_CODES.has(this.code));
  }

  /** The CSRF token this page holds is no longer the session's (a login or logout elsewhere). */
  get staleToken() {
    return this.status === 403 && /^CSRF Failed/i.test(this.message);
  }
}

const LOGIN_CODES = new Set(["not_authenticated", "authentication_failed"]);

/** An error event received on a stream, as an ApiError. */
export function streamError(body) {
  return new ApiError((body && body.error && body.error.status) || 502, body, null);
}

export function networkError(cause) {
  const error = new ApiError(0, null, null);
  error.cause = cause;
  return error;
}

let onUnauthorized = null;
/** Called when the API answers that a login is needed (the session is gone). */
export function setUnauthorizedHandler(handler) {
  onUnauthorized = handler;
}

function requestInit(method, body, signal, accept, extraHeaders) {
  const headers = { Accept: accept, ...extraHeaders };
  const init = { method, headers, credentials: "same-origin", cache: "no-store", signal };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  if (!SAFE_METHODS.has(method)) headers["X-CSRFToken"] = csrfToken;
  return init;
}

async function readJson(response) {
  const text = await response.text();
  if (!text) return null;
  try {
    return JSON.parse(text);
  } catch {
    return null;
  }
}

async function failure(response) {
  const body = await readJson(response);
  const error = new ApiError(response.status, body, response.headers);
  if (error.needsLogin && onUnauthorized) onUnauthorized(error);
  return error;
}

/** A path of this origin for a URL the API returned (pagination links are absolute). */
export function samePath(url) {
  const parsed = new URL(url, window.location.href);
  return parsed.pathname + parsed.search;
}

/** A JSON request. Resolves to the parsed body (null for 204); rejects with ApiError. */
export async function api(path, { method = "GET", body, signal, headers } = {}) {
  let response;
  try {
    response = await fetch(path, requestInit(method, body, signal, "application/json", headers));
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw networkError(error);
  }
  if (!response.ok) throw await failure(response);
  if (response.status === 204) return null;
  return readJson(response);
}

/**
 * Incremental parser of a text/event-stream (the parts of the format the API uses: `event:`,
 * multi-line `data:`, comment lines such as `: keep-alive`). Calls onEvent(name, dataText) per
 * complete event.
 */
export function createEventParser(onEvent) {
  let buffer = "";
  let name = "";
  let data = [];
  function line(text) {
    if (text === "") {
      if (data.length) onEvent(name || "message", data.join("\n"));
      name = "";
      data = [];
      return;
    }
    if (text.startsWith(":")) return; // a comment (keep-alive)
    const colon = text.indexOf(":");
    const field = colon === -1 ? text : text.slice(0, colon);
    let value = colon === -1 ? "" : text.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") name = value;
    else if (field === "data") data.push(value);
  }
  return {
    push(chunk) {
      buffer += chunk;
      let end = buffer.indexOf("\n");
      while (end !== -1) {
        let text = buffer.slice(0, end);
        if (text.endsWith("\r")) text = text.slice(0, -1);
        buffer = buffer.slice(end + 1);
        line(text);
        end = buffer.indexOf("\n");
      }
    },
    end() {
      if (buffer) line(buffer.endsWith("\r") ? buffer.slice(0, -1) : buffer);
      buffer = "";
      line("");
    },
  };
}

/**
 * A streamed request. onEvent(name, data) gets each event with its JSON data (`start`,
 * `delta`, `message`, `error`). Resolves when the stream ends (whether or not it sent a final
 * event); rejects with ApiError if the request is refused before streaming (4xx/5xx JSON) or
 * the connection fails, and with an AbortError when `signal` aborts it.
 */
export async function stream(path, { method = "GET", body, signal, headers } = {}, onEvent) {
  let response;
  try {
    response = await fetch(path, requestInit(method, body, signal, "text/event-stream", headers));
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw networkError(error);
  }
  if (!response.ok) throw await failure(response);
  const type = response.headers.get("Content-Type") || "";
  if (!type.startsWith("text/event-stream")) {
    // A plain JSON answer (e.g. a finished message): deliver it as the final event.
    const message = await readJson(response);
    if (message) onEvent("message", message);
    return;
  }
  const parser = createEventParser((name, text) => {
    let data = null;
    try {
      data = JSON.parse(text);
    } catch {
      return; // not ours: ignore
    }
    onEvent(name, data);
  });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      parser.push(value);
    }
    parser.end();
  } catch (error) {
    if (error.name === "AbortError" || (signal && signal.aborted)) {
      const abort = new DOMException("The stream was stopped.", "AbortError");
      throw abort;
    }
    throw networkError(error);
  } finally {
    reader.releaseLock();
  }
}

/** A random idempotency key (crypto.randomUUID needs a secure context; this does not). */
export function newKey() {
  if (window.crypto && typeof window.crypto.randomUUID === "function" && window.isSecureContext) {
    return window.crypto.randomUUID();
  }
  const bytes = new Uint8Array(16);
  window.crypto.getRandomValues(bytes);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}
