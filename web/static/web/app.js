// The chat page: a client of the public API (see README "Web chat"). No framework, no build.
import { api, apiRoot, ApiError, config, newKey, samePath, setUnauthorizedHandler, stream, streamError } from "./api.js";
import { renderMarkdown } from "./markdown.js";

const $ = (id) => document.getElementById(id);
const ui = {
  app: $("app"),
  sidebar: $("sidebar"),
  sidebarClose: $("sidebar-close"),
  backdrop: $("backdrop"),
  menu: $("menu"),
  newChat: $("new-chat"),
  list: $("conversation-list"),
  listNote: $("conversation-note"),
  more: $("more-conversations"),
  usage: $("usage"),
  usageFigures: $("usage-figures"),
  usageMeter: $("usage-meter"),
  usageNote: $("usage-note"),
  title: $("conversation-title"),
  model: $("model"),
  transcript: $("transcript"),
  messages: $("messages"),
  empty: $("empty"),
  loading: $("loading"),
  jump: $("jump"),
  error: $("error"),
  errorText: $("error-text"),
  errorRetry: $("error-retry"),
  errorDismiss: $("error-dismiss"),
  composer: $("composer"),
  prompt: $("prompt"),
  send: $("send"),
  stop: $("stop"),
  announcer: $("announcer"),
  deleteDialog: $("delete-dialog"),
  deleteText: $("delete-dialog-text"),
};

const ACTIVE = new Set(["pending", "streaming"]);
const MODEL_KEY = "chat.model";
const NARROW = window.matchMedia("(max-width: 760px)");

const state = {
  conversations: [],
  nextConversations: null,
  currentId: null,
  conversationsLoaded: false,
  renaming: false, // a title is being edited in the list: the list is not redrawn meanwhile
  turns: [], // Turn objects of the open conversation, in order
  generation: null, // the reply this page is streaming: {turn, controller, messageId, ...}
  loadSeq: 0,
  stick: true, // keep the transcript scrolled to the bottom while a reply grows
  models: [],
  retryTimer: null,
};

const url = {
  conversations: (query = "") => `${apiRoot}conversations/${query}`,
  conversation: (id) => `${apiRoot}conversations/${id}/`,
  conversationMessages: (id) => `${apiRoot}conversations/${id}/messages/?page_size=100`,
  create: () => `${apiRoot}messages/create/`,
  message: (id) => `${apiRoot}messages/${id}/`,
  messageStream: (id) => `${apiRoot}messages/${id}/stream/`,
  regenerate: (id) => `${apiRoot}messages/${id}/regenerate/`,
  cancel: (id) => `${apiRoot}messages/${id}/cancel/`,
  models: () => `${apiRoot}models/`,
  usage: () => `${apiRoot}usage/`,
};

// --- small helpers ---------------------------------------------------------------------------

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text != null) node.textContent = text;
  return node;
}

function iconSpan(name) {
  const span = el("span", `icon icon-${name}`);
  span.setAttribute("aria-hidden", "true");
  return span;
}

function button(label, { icon, className = "action-button", ariaLabel, onClick } = {}) {
  const node = el("button", className);
  node.type = "button";
  if (icon) node.append(iconSpan(icon));
  node.append(el("span", "button-label", label));
  if (ariaLabel) node.setAttribute("aria-label", ariaLabel);
  if (onClick) node.addEventListener("click", onClick);
  return node;
}

function announce(text) {
  ui.announcer.textContent = "";
  window.setTimeout(() => {
    ui.announcer.textContent = text;
  }, 50);
}

const money = new Intl.NumberFormat(undefined, { style: "currency", currency: "USD", maximumFractionDigits: 4 });
const money2 = new Intl.NumberFormat(undefined, { style: "currency", currency: "USD", minimumFractionDigits: 2, maximumFractionDigits: 2 });
const shortDate = new Intl.DateTimeFormat(undefined, { dateStyle: "medium" });
const dateTime = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "short" });

function formatUsd(value, { cents = false } = {}) {
  const number = Number(value);
  if (value == null || value === "" || !Number.isFinite(number)) return "";
  return (cents || number === 0 || number >= 1 ? money2 : money).format(number);
}

function formatDate(value, formatter = shortDate) {
  const date = value ? new Date(value) : null;
  return date && !Number.isNaN(date.getTime()) ? formatter.format(date) : "";
}

async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch {
    // No clipboard API (plain http on another host): the selection fallback.
    const area = el("textarea", "visually-hidden");
    area.value = text;
    area.setAttribute("readonly", "");
    document.body.append(area);
    area.select();
    let ok = false;
    try {
      ok = document.execCommand("copy");
    } catch {
      ok = false;
    }
    area.remove();
    return ok;
  }
}

async function copyWithFeedback(buttonNode, text) {
  const ok = await copyText(text);
  const label = buttonNode.querySelector(".button-label, .copy-label");
  const icon = buttonNode.querySelector(".icon");
  if (label) label.textContent = ok ? "Copied" : "Copy failed";
  if (icon && ok) icon.className = "icon icon-check";
  buttonNode.classList.add("copied");
  announce(ok ? "Copied to the clipboard." : "Could not copy.");
  window.setTimeout(() => {
    if (label) label.textContent = "Copy";
    if (icon) icon.className = "icon icon-copy";
    buttonNode.classList.remove("copied");
  }, 1500);
}

// --- rendering of the transcript --------------------------------------------------------------

const dirtyTurns = new Set();
let frameRequested = false;

function scheduleRender(turn) {
  dirtyTurns.add(turn);
  if (frameRequested) return;
  frameRequested = true;
  window.requestAnimationFrame(() => {
    frameRequested = false;
    for (const dirty of dirtyTurns) dirty.renderReply();
    dirtyTurns.clear();
    followBottom();
  });
}

function atBottom() {
  const t = ui.transcript;
  return t.scrollHeight - t.scrollTop - t.clientHeight < 24;
}

function scrollToBottom() {
  ui.transcript.scrollTop = ui.transcript.scrollHeight;
  state.stick = true;
  ui.jump.hidden = true;
}

function followBottom() {
  if (state.stick) scrollToBottom();
}

function statusText(message) {
  const error = message.error || {};
  switch (message.status) {
    case "failed":
      return { text: error.message || "The reply failed.", kind: "error" };
    case "truncated":
      return { text: `The reply was cut short. ${error.message || ""}`.trim(), kind: "warning" };
    case "interrupted":
      return { text: "The server stopped before the reply was complete.", kind: "warning" };
    case "cancelled":
      return { text: "Stopped.", kind: "muted" };
    case "completed":
      return message.finish_reason === "length"
        ? { text: "The reply reached its length limit.", kind: "muted" }
        : null;
    default:
      return null;
  }
}

class Turn {
  constructor(message) {
    this.message = message;
    this.text = message.response || "";
    this.refusal = message.refusal || "";
    this.streaming = false;
    this.note = null; // a transient status ("Reconnecting…")

    this.el = el("article", "turn");
    const user = el("div", "msg msg-user");
    user.append(el("h2", "visually-hidden", "You said:"));
    this.promptEl = el("div", "bubble");
    user.append(this.promptEl);

    this.replyBox = el("div", "msg msg-assistant");
    this.replyBox.append(el("h2", "visually-hidden", "The assistant said:"));
    this.replyEl = el("div", "reply markdown");
    this.refusalEl = el("div", "refusal");
    this.refusalEl.hidden = true;
    this.statusEl = el("p", "reply-status");
    this.statusEl.hidden = true;
    this.footer = el("div", "reply-footer");
    this.actionsEl = el("div", "reply-actions");
    this.metaEl = el("p", "reply-meta");
    this.footer.append(this.actionsEl, this.metaEl);
    this.previousEl = el("details", "previous-replies");
    this.previousEl.hidden = true;
    this.replyBox.append(this.replyEl, this.refusalEl, this.statusEl, this.footer, this.previousEl);
    this.el.append(user, this.replyBox);
    this.update(message);
  }

  get id() {
    return this.message.id;
  }

  /** Show the stored message as it is. */
  update(message) {
    this.message = message;
    this.text = message.response || "";
    this.refusal = message.refusal || "";
    if (message.id != null) this.el.dataset.messageId = String(message.id);
    this.promptEl.textContent = message.prompt_message || "";
    this.renderReply();
    this.renderFooter();
    this.renderPrevious();
  }

  /** A request for a reply is under way (`clear`: the reply is being replaced). */
  beginStream(clear) {
    this.streaming = true;
    this.note = null;
    if (clear) {
      this.text = "";
      this.refusal = "";
    }
    this.renderReply();
    this.renderFooter();
  }

  /** The stream's `start` event: its deltas replay the text from the beginning. */
  startStream(message) {
    this.streaming = true;
    this.note = null;
    this.message = message;
    if (message.id != null) this.el.dataset.messageId = String(message.id);
    this.promptEl.textContent = message.prompt_message || "";
    this.renderPrevious();
    this.renderFooter();
    this.text = "";
    this.refusal = "";
    scheduleRender(this); // drawn with the first delta, usually in the same frame
  }

  delta(data) {
    if (typeof data.content === "string") this.text += data.content;
    if (typeof data.refusal === "string") this.refusal += data.refusal;
    scheduleRender(this);
  }

  finish(message) {
    this.streaming = false;
    this.note = null;
    dirtyTurns.delete(this);
    this.update(message);
  }

  setNote(note) {
    this.note = note;
    this.renderReply();
  }

  isActive() {
    return this.streaming || ACTIVE.has(this.message.status);
  }

  renderReply() {
    const active = this.isActive();
    this.replyBox.setAttribute("aria-busy", active ? "true" : "false");
    this.replyBox.classList.toggle("generating", active);
    if (this.text) {
      this.replyEl.replaceChildren(renderMarkdown(this.text));
    } else if (active && !this.refusal) {
      const typing = el("span", "typing");
      typing.setAttribute("aria-label", "The assistant is writing");
      typing.append(el("span"), el("span"), el("span"));
      this.replyEl.replaceChildren(typing);
    } else {
      this.replyEl.replaceChildren();
    }
    this.replyEl.hidden = !this.replyEl.firstChild;
    this.refusalEl.hidden = !this.refusal;
    if (this.refusal) {
      const label = el("strong", "refusal-label", "The model declined: ");
      this.refusalEl.replaceChildren(label, document.createTextNode(this.refusal));
    } else {
      this.refusalEl.replaceChildren();
    }
    const status = this.note || (active ? null : statusText(this.message));
    this.statusEl.hidden = !status;
    this.statusEl.className = `reply-status ${status ? status.kind : ""}`;
    this.statusEl.textContent = status ? status.text : "";
  }

  renderFooter() {
    const message = this.message;
    const active = this.isActive();
    this.actionsEl.replaceChildren();
    this.metaEl.replaceChildren();
    this.footer.hidden = active || message.id == null;
    if (this.footer.hidden) return;
    if (this.text) {
      const copy = button("Copy", { icon: "copy", ariaLabel: "Copy reply" });
      copy.addEventListener("click", () => copyWithFeedback(copy, this.text));
      this.actionsEl.append(copy);
    }
    const failed = message.status === "failed";
    const last = state.turns[state.turns.length - 1] === this;
    if (failed || last) {
      const label = failed ? "Retry" : "Regenerate";
      this.actionsEl.append(
        button(label, {
          icon: "refresh",
          ariaLabel: failed ? "Retry this message" : "Regenerate reply",
          onClick: () => regenerate(this),
        }),
      );
    }
    const parts = [];
    if (message.model) parts.push(message.model);
    const usage = message.usage || {};
    if (usage.total_tokens != null) parts.push(`${usage.total_tokens} tokens`);
    const cost = formatUsd(message.cost_usd);
    if (cost) parts.push(cost);
    if (message.latency_ms != null) parts.push(`${(message.latency_ms / 1000).toFixed(1)} s`);
    this.metaEl.textContent = parts.join(" · ");
    const when = formatDate(message.completed_at || message.created_at, dateTime);
    if (when) this.metaEl.title = when;
  }

  renderPrevious() {
    const previous = this.message.previous_replies || [];
    this.previousEl.hidden = previous.length === 0;
    if (!previous.length) {
      this.previousEl.replaceChildren();
      return;
    }
    const summary = el("summary", null, previous.length === 1 ? "1 earlier reply" : `${previous.length} earlier replies`);
    const items = previous.map((reply, index) => {
      const item = el("div", "previous-reply");
      const label = [`Reply ${index + 1}`, reply.model, reply.status !== "completed" ? reply.status : ""].filter(Boolean).join(" · ");
      item.append(el("p", "reply-meta", label));
      const body = el("div", "markdown");
      if (reply.response) body.append(renderMarkdown(reply.response));
      else if (reply.refusal) body.append(el("p", "muted", `The model declined: ${reply.refusal}`));
      else body.append(el("p", "muted", reply.error_code ? `No reply (${reply.error_code}).` : "No reply."));
      item.append(body);
      return item;
    });
    this.previousEl.replaceChildren(summary, ...items);
  }
}

function renderTurns(messages) {
  state.turns = messages.map((message) => new Turn(message));
  ui.messages.replaceChildren(...state.turns.map((turn) => turn.el));
  refreshFooters();
  updateEmpty();
}

function appendTurn(turn) {
  state.turns.push(turn);
  ui.messages.append(turn.el);
  refreshFooters();
  updateEmpty();
}

function removeTurn(turn) {
  state.turns = state.turns.filter((t) => t !== turn);
  turn.el.remove();
  refreshFooters();
  updateEmpty();
}

/** Regenerate belongs to the last reply only: redraw the footers when the last one changes. */
function refreshFooters() {
  for (const turn of state.turns) turn.renderFooter();
}

function updateEmpty() {
  ui.empty.hidden = state.turns.length > 0 || !ui.loading.hidden;
}

// --- errors -----------------------------------------------------------------------------------

const RETRYABLE = new Set([
  "rate_limited",
  "too_many_concurrent",
  "upstream_rate_limited",
  "upstream_unavailable",
  "upstream_timeout",
  "upstream_bad_response",
  "upstream_truncated",
  "upstream_error",
  "generation_interrupted",
  "openai_not_configured",
  "network_error",
  "connection_lost",
]);

function describe(error) {
  const d = error.details || {};
  const wait = error.retryAfter;
  const waitText = wait ? ` Try again in ${wait} second${wait === 1 ? "" : "s"}.` : "";
  switch (error.code) {
    case "rate_limited":
      return `You are sending messages too quickly.${waitText || " Wait a moment and try again."}`;
    case "too_many_concurrent":
      return `Too many replies are being generated for you at once; wait for one to finish.${waitText}`;
    case "budget_exceeded": {
      const parts = ["You have used your budget"];
      const budget = formatUsd(d.budget_usd, { cents: true });
      if (budget) parts[0] += ` of ${budget}`;
      parts[0] += ".";
      const remaining = formatUsd(d.remaining_usd ?? d.remaining, { cents: true });
      if (remaining) parts.push(`${remaining} left.`);
      const resets = formatDate(d.resets_at, dateTime);
      if (resets) parts.push(`It resets on ${resets}.`);
      return parts.join(" ");
    }
    case "upstream_rate_limited":
      return `The model service is rate-limiting this server.${waitText}`;
    case "openai_not_configured":
      return "This server has no OpenAI API key, so it cannot send messages. Your message is saved: retry once a key is configured.";
    case "message_in_progress":
      return "A reply is still being generated there: wait for it to finish or stop it first.";
    case "network_error":
      return "The server could not be reached. Check your connection.";
    case "connection_lost":
      return "The connection to the server was lost before the reply finished.";
    case "not_found":
      return error.message || "Not found.";
    case "permission_denied":
      if (error.staleToken) return "This page is out of date with your login (you logged in or out elsewhere): reload it.";
      return error.message || "This is not allowed.";
    default:
      if (error.code && error.code.startsWith("upstream_")) return `The model service failed: ${error.message}`;
      return error.message || "Something went wrong.";
  }
}

function clearError() {
  keepFocus(ui.error);
  window.clearInterval(state.retryTimer);
  state.retryTimer = null;
  ui.error.hidden = true;
  ui.errorText.textContent = "";
  ui.errorRetry.hidden = true;
  ui.errorRetry.onclick = null;
}

/** The error line above the box; `retry` (a function) adds a Retry button. */
function showError(error, { retry } = {}) {
  clearError();
  const text = error instanceof ApiError ? describe(error) : String(error.message || error);
  ui.error.dataset.code = (error instanceof ApiError && error.code) || "error";
  ui.errorText.textContent = text;
  ui.error.hidden = false;
  const canRetry = retry && (!(error instanceof ApiError) || RETRYABLE.has(error.code));
  if (!canRetry) return;
  ui.errorRetry.hidden = false;
  ui.errorRetry.onclick = () => {
    clearError();
    retry();
  };
  let wait = error.retryAfter || 0;
  const label = ui.errorRetry;
  const tick = () => {
    if (wait > 0) {
      label.disabled = true;
      label.textContent = `Retry in ${wait} s`;
      wait -= 1;
    } else {
      label.disabled = false;
      label.textContent = "Retry";
      window.clearInterval(state.retryTimer);
      state.retryTimer = null;
    }
  };
  tick();
  if (wait >= 0 && label.disabled) state.retryTimer = window.setInterval(tick, 1000);
}

function goToLogin() {
  const next = window.location.pathname + window.location.search;
  window.location.assign(`${config.loginUrl || "/login/"}?next=${encodeURIComponent(next)}`);
}

// --- generating: send, regenerate, re-attach, stop ---------------------------------------------

function setGenerating(on) {
  ui.stop.hidden = !on;
  ui.send.hidden = on;
  updateSendButton();
}

function updateSendButton() {
  ui.send.disabled = Boolean(state.generation) || !ui.prompt.value.trim();
}

/**
 * Stream a reply into `turn`: POST create/regenerate or GET stream (re-attach). Resolves when
 * the reply is final, the stream was stopped or detached, or an error was shown.
 */
async function runStream(turn, path, { method = "GET", body, headers, onStart, onRefused, clear = false, attempt = 0 } = {}) {
  const controller = new AbortController();
  const generation = { turn, controller, messageId: turn.id, finished: false, stopRequested: false };
  state.generation = generation;
  setGenerating(true);
  turn.beginStream(clear);
  const mine = () => state.generation === generation;
  try {
    await stream(path, { method, body, headers, signal: controller.signal }, (name, data) => {
      if (!mine() || generation.finished) return;
      if (name === "start") {
        generation.messageId = data.id;
        turn.startStream(data);
        if (onStart) onStart(data);
        if (generation.stopRequested) stop();
      } else if (name === "delta") {
        turn.delta(data);
      } else if (name === "message") {
        generation.finished = true;
        turn.finish(data);
        announceReply(turn);
      } else if (name === "error") {
        generation.finished = true;
        failed(turn, streamError(data));
      }
    });
    if (mine() && !generation.finished) {
      // The connection ended without a final event (a proxy or the network cut it): the reply
      // is still being generated on the server; follow it again.
      await reattachAfterCut(generation, attempt);
    }
  } catch (error) {
    if (error.name === "AbortError") return; // stopped or detached: whoever aborted handles it
    if (!mine()) return;
    if (error.code === "network_error" && generation.messageId != null) {
      await reattachAfterCut(generation, attempt);
      return;
    }
    generation.finished = true;
    if (onRefused) onRefused(error);
    else refused(turn, error);
  } finally {
    if (mine()) {
      state.generation = null;
      setGenerating(false);
      if (turn.streaming) {
        turn.streaming = false;
        turn.renderReply();
        turn.renderFooter();
      }
      refreshUsage();
      loadConversations();
    }
  }
}

async function reattachAfterCut(generation, attempt) {
  const turn = generation.turn;
  if (generation.messageId == null) return;
  if (attempt >= 3) {
    turn.setNote(null);
    const error = new ApiError(0, { error: { code: "connection_lost", message: "Connection lost." } }, null);
    showError(error, { retry: () => attach(turn) });
    return;
  }
  turn.setNote({ text: "Connection lost, reconnecting…", kind: "muted" });
  await new Promise((resolve) => window.setTimeout(resolve, 500 * 2 ** attempt));
  if (state.generation !== generation) return;
  state.generation = null;
  await runStream(turn, url.messageStream(generation.messageId), { attempt: attempt + 1 });
}

function announceReply(turn) {
  const message = turn.message;
  if (message.status === "refused" || turn.refusal) {
    announce(`The model declined: ${turn.refusal}`);
    return;
  }
  const text = turn.replyEl.textContent.trim();
  const status = statusText(message);
  announce(["Reply:", text, status ? status.text : ""].filter(Boolean).join(" "));
}

/** The stream ended with an error event: show the stored failure (partial text kept). */
async function failed(turn, error) {
  turn.streaming = false;
  const id = error.messageId ?? turn.id;
  try {
    if (id != null) turn.finish(await api(url.message(id)));
  } catch {
    turn.finish({ ...turn.message, response: turn.text, status: "failed", error: { code: error.code, message: error.message } });
  }
  showError(error, { retry: () => regenerate(turn) });
  announce(describe(error));
}

/** The request was answered with an error before any streaming (nothing, or a failed prompt). */
function refused(turn, error) {
  turn.streaming = false;
  if (error.needsLogin) {
    goToLogin();
    return;
  }
  turn.renderReply();
  turn.renderFooter();
  showError(error, { retry: turn.id != null ? () => regenerate(turn) : null });
}

function modelChoice() {
  return ui.model.value || null;
}

/** Send a prompt. `key` (Idempotency-Key) is kept by Retry: if the first attempt reached the
 * server after all, the retry gets the same message back instead of a second one. */
async function send(text, key = newKey()) {
  if (state.generation || !text.trim()) return;
  clearError();
  const body = { prompt_message: text, stream: true };
  if (state.currentId != null) body.conversation = state.currentId;
  const model = modelChoice();
  if (model) body.model = model;
  const conversationAtSend = state.currentId;
  const turn = new Turn({ id: null, prompt_message: text, response: "", status: "pending", model });
  appendTurn(turn);
  ui.prompt.value = "";
  autosize();
  scrollToBottom();
  await runStream(turn, url.create(), {
    method: "POST",
    clear: true,
    body,
    headers: { "Idempotency-Key": key },
    onStart: (message) => {
      if (conversationAtSend == null && message.conversation != null) adoptConversation(message.conversation);
    },
    onRefused: async (error) => {
      if (error.needsLogin) {
        goToLogin();
        return;
      }
      if (error.messageId != null) {
        // The prompt was stored, failed (e.g. no API key): show it as it is stored.
        try {
          const stored = await api(url.message(error.messageId));
          if (conversationAtSend == null && stored.conversation != null) adoptConversation(stored.conversation);
          turn.finish(stored);
        } catch {
          turn.finish({ ...turn.message, id: error.messageId, status: "failed", error: { code: error.code, message: error.message } });
        }
        showError(error, { retry: () => regenerate(turn) });
        return;
      }
      // Nothing was stored (invalid, rate limited, over budget...): the prompt goes back in the box.
      removeTurn(turn);
      if (!ui.prompt.value) {
        ui.prompt.value = text;
        autosize();
        updateSendButton();
      }
      showError(error, {
        retry: () => {
          if (ui.prompt.value === text) {
            ui.prompt.value = "";
            autosize();
          }
          send(text, key);
        },
      });
      if (error.code === "budget_exceeded") refreshUsage();
    },
  });
}

/** The focus was on a control that is about to disappear: the box takes it. */
function keepFocus(...containers) {
  const active = document.activeElement;
  if (active && containers.some((container) => container.contains(active))) ui.prompt.focus();
}

async function regenerate(turn) {
  if (state.generation || turn.id == null) return;
  keepFocus(turn.el, ui.error);
  clearError();
  const body = { stream: true };
  const model = modelChoice();
  if (model) body.model = model;
  const before = turn.message;
  state.stick = atBottom() || turn === state.turns[state.turns.length - 1];
  await runStream(turn, url.regenerate(turn.id), {
    method: "POST",
    clear: true,
    body,
    onRefused: (error) => {
      turn.finish(before);
      if (error.needsLogin) goToLogin();
      else showError(error, { retry: () => regenerate(turn) });
    },
  });
}

/** Follow a reply that is being generated (after a reload, or on opening its conversation). */
function attach(turn) {
  if (state.generation || turn.id == null) return;
  return runStream(turn, url.messageStream(turn.id));
}

/** Stop the reply being generated: stop reading it and ask the server to cancel it. */
async function stop() {
  const generation = state.generation;
  if (!generation || generation.finished) return;
  if (generation.messageId == null) {
    generation.stopRequested = true; // stopped as soon as the server names the message
    return;
  }
  generation.finished = true;
  generation.controller.abort();
  state.generation = null;
  setGenerating(false);
  const turn = generation.turn;
  turn.streaming = false;
  turn.setNote({ text: "Stopping…", kind: "muted" });
  try {
    turn.finish(await api(url.cancel(generation.messageId), { method: "POST" }));
  } catch (error) {
    if (error.needsLogin) return goToLogin();
    // Without the cancel endpoint the server finishes the reply anyway; what was shown stays.
    turn.finish({ ...turn.message, response: turn.text, status: "cancelled" });
    if (error.status !== 404) showError(error);
  }
  announce("Stopped.");
  refreshUsage();
  loadConversations();
}

/** Leave a reply streaming on the server (switching conversation): it is re-attached later. */
function detach() {
  const generation = state.generation;
  if (!generation) return;
  state.generation = null;
  generation.controller.abort();
  setGenerating(false);
}

// --- conversations ----------------------------------------------------------------------------

function conversationHref(id) {
  return id == null ? "/" : `/?c=${encodeURIComponent(id)}`;
}

function setUrl(id, { push }) {
  const href = conversationHref(id);
  if (window.location.pathname + window.location.search === href) return;
  if (push) window.history.pushState({ c: id }, "", href);
  else window.history.replaceState({ c: id }, "", href);
}

function setTitle(title) {
  ui.title.textContent = title || "New chat";
  document.title = title ? `${title} · Chat` : "Chat";
}

/** A new conversation was created by the first send: it becomes the open one. */
function adoptConversation(id) {
  state.currentId = id;
  setUrl(id, { push: false });
  loadConversations().then(() => {
    const conversation = state.conversations.find((c) => c.id === id);
    if (conversation && state.currentId === id) setTitle(conversation.title);
  });
}

async function loadConversations({ append = false } = {}) {
  const path = append && state.nextConversations ? samePath(state.nextConversations) : url.conversations("?page_size=50");
  try {
    const page = await api(path);
    const results = page.results || [];
    state.conversations = append ? [...state.conversations, ...results.filter((c) => !state.conversations.some((o) => o.id === c.id))] : results;
    state.nextConversations = page.next;
    state.conversationsLoaded = true;
    renderConversationList();
  } catch (error) {
    if (error.needsLogin) return goToLogin();
    ui.listNote.hidden = false;
    ui.listNote.textContent = "Chats could not be loaded.";
  }
}

function renderConversationList() {
  if (state.renaming) return;
  ui.listNote.hidden = !state.conversationsLoaded || state.conversations.length > 0;
  ui.listNote.textContent = "No chats yet.";
  ui.more.hidden = !state.nextConversations;
  const focusedId = document.activeElement && document.activeElement.closest(".conversation")?.dataset.id;
  ui.list.replaceChildren(...state.conversations.map(conversationItem));
  if (focusedId) ui.list.querySelector(`.conversation[data-id="${CSS.escape(focusedId)}"] .conversation-link`)?.focus();
}

function conversationItem(conversation) {
  const title = conversation.title || "Untitled chat";
  const item = el("li", "conversation");
  item.dataset.id = String(conversation.id);
  const link = el("a", "conversation-link", title);
  link.href = conversationHref(conversation.id);
  link.title = title;
  if (conversation.id === state.currentId) {
    link.setAttribute("aria-current", "page");
    item.classList.add("current");
  }
  link.addEventListener("click", (event) => {
    if (event.button !== 0 || event.metaKey || event.ctrlKey || event.shiftKey || event.altKey) return;
    event.preventDefault();
    openConversation(conversation.id, { push: true });
    closeSidebar();
    ui.prompt.focus();
  });
  const actions = el("span", "conversation-actions");
  const rename = el("button", "icon-button small");
  rename.type = "button";
  rename.setAttribute("aria-label", `Rename chat: ${title}`);
  rename.title = "Rename";
  rename.append(iconSpan("pencil"));
  rename.addEventListener("click", () => startRename(item, conversation));
  const remove = el("button", "icon-button small");
  remove.type = "button";
  remove.setAttribute("aria-label", `Delete chat: ${title}`);
  remove.title = "Delete";
  remove.append(iconSpan("trash"));
  remove.addEventListener("click", () => confirmDelete(conversation));
  actions.append(rename, remove);
  item.append(link, actions);
  return item;
}

function startRename(item, conversation) {
  const input = el("input", "rename-input");
  input.type = "text";
  input.value = conversation.title || "";
  input.maxLength = 200;
  input.setAttribute("aria-label", "Chat title (Enter to save, Esc to cancel)");
  state.renaming = true;
  item.classList.add("renaming");
  item.replaceChildren(input);
  input.focus();
  input.select();
  let done = false;
  const finish = async (save) => {
    if (done) return;
    done = true;
    const title = input.value.trim();
    if (save && title && title !== conversation.title) {
      try {
        const updated = await api(url.conversation(conversation.id), { method: "PATCH", body: { title } });
        // The list may have been reloaded meanwhile: update the entry it holds now.
        for (const entry of [conversation, ...state.conversations.filter((c) => c.id === conversation.id)]) {
          Object.assign(entry, updated);
        }
        if (conversation.id === state.currentId) setTitle(updated.title);
        announce(`Renamed to ${updated.title}.`);
      } catch (error) {
        if (error.needsLogin) return goToLogin();
        showError(error);
      }
    }
    state.renaming = false;
    renderConversationList();
    ui.list.querySelector(`.conversation[data-id="${conversation.id}"] .conversation-link`)?.focus();
  };
  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.isComposing) {
      event.preventDefault();
      finish(true);
    } else if (event.key === "Escape") {
      event.preventDefault();
      event.stopPropagation();
      finish(false);
    }
  });
  input.addEventListener("blur", () => finish(true));
}

function confirmDelete(conversation) {
  const title = conversation.title || "Untitled chat";
  ui.deleteText.textContent = `“${title}” and all its messages will be deleted.`;
  ui.deleteDialog.returnValue = "";
  ui.deleteDialog.onclose = async () => {
    if (ui.deleteDialog.returnValue !== "delete") {
      ui.list.querySelector(`.conversation[data-id="${conversation.id}"] .conversation-link`)?.focus();
      return;
    }
    try {
      await api(url.conversation(conversation.id), { method: "DELETE" });
      announce(`Deleted ${title}.`);
      if (conversation.id === state.currentId) newChat({ push: false });
      state.conversations = state.conversations.filter((c) => c.id !== conversation.id);
      renderConversationList();
      ui.newChat.focus();
    } catch (error) {
      if (error.needsLogin) return goToLogin();
      showError(error);
    }
  };
  ui.deleteDialog.showModal();
}

function newChat({ push = true } = {}) {
  detach();
  clearError();
  state.loadSeq += 1;
  state.currentId = null;
  setUrl(null, { push });
  setTitle(null);
  ui.loading.hidden = true;
  renderTurns([]);
  renderConversationList();
  restoreModel();
  closeSidebar();
  ui.prompt.focus();
}

async function fetchMessages(id) {
  const messages = [];
  let path = url.conversationMessages(id);
  while (path) {
    const page = await api(path);
    messages.push(...(page.results || []));
    path = page.next ? samePath(page.next) : null;
  }
  return messages;
}

async function openConversation(id, { push = false } = {}) {
  detach();
  clearError();
  const seq = ++state.loadSeq;
  state.currentId = id;
  setUrl(id, { push });
  renderConversationList();
  const known = state.conversations.find((c) => c.id === id);
  setTitle(known ? known.title : "");
  renderTurns([]);
  ui.loading.hidden = false;
  ui.empty.hidden = true;
  try {
    const [conversation, messages] = await Promise.all([api(url.conversation(id)), fetchMessages(id)]);
    if (seq !== state.loadSeq) return;
    setTitle(conversation.title || "Untitled chat");
    ui.loading.hidden = true;
    renderTurns(messages);
    const last = messages[messages.length - 1];
    const model = (last && last.model) || conversation.model;
    if (model && state.models.includes(model)) ui.model.value = model;
    scrollToBottom();
    if (last && ACTIVE.has(last.status)) attach(state.turns[state.turns.length - 1]);
  } catch (error) {
    if (seq !== state.loadSeq) return;
    ui.loading.hidden = true;
    if (error.needsLogin) return goToLogin();
    state.currentId = null;
    setTitle(null);
    renderTurns([]);
    renderConversationList();
    const missing = error.status === 404 || (error.status === 403 && !error.staleToken);
    showError(missing ? new ApiError(404, { error: { code: "not_found", message: "This chat does not exist, or is not yours." } }, null) : error);
  }
}

// --- models and usage -------------------------------------------------------------------------

async function loadModels() {
  let models = config.models || [];
  let fallback = config.defaultModel || models[0] || "";
  const labels = new Map();
  try {
    const answer = await api(url.models());
    if (answer && Array.isArray(answer.results) && answer.results.length) {
      models = answer.results.map((m) => m.id);
      fallback = answer.default || fallback;
      for (const m of answer.results) {
        if (m.input_usd_per_million != null && m.output_usd_per_million != null) {
          labels.set(m.id, `${m.id} (${formatUsd(m.input_usd_per_million)} in / ${formatUsd(m.output_usd_per_million)} out per million tokens)`);
        }
      }
    }
  } catch (error) {
    if (error.needsLogin) return goToLogin();
    // Older servers have no /api/models/: the page's own list is used.
  }
  state.models = models;
  state.defaultModel = fallback;
  ui.model.replaceChildren(
    ...models.map((id) => {
      const option = el("option", null, id);
      option.value = id;
      if (labels.has(id)) option.title = labels.get(id);
      return option;
    }),
  );
  restoreModel();
}

function restoreModel() {
  let saved = null;
  try {
    saved = window.localStorage.getItem(MODEL_KEY);
  } catch {
    saved = null;
  }
  const choice = saved && state.models.includes(saved) ? saved : state.defaultModel;
  if (choice && state.models.includes(choice)) ui.model.value = choice;
}

let usageSeq = 0;
async function refreshUsage() {
  const seq = ++usageSeq;
  let usage;
  try {
    usage = await api(url.usage());
  } catch (error) {
    if (error.needsLogin) return goToLogin();
    ui.usage.hidden = true; // no usage endpoint on this server
    return;
  }
  if (seq !== usageSeq || !usage) return;
  const spent = formatUsd(usage.spent_usd);
  const budget = usage.budget_usd == null ? null : Number(usage.budget_usd);
  const remaining = usage.remaining_usd == null ? null : Number(usage.remaining_usd);
  if (budget != null && Number.isFinite(budget) && budget > 0) {
    ui.usageFigures.textContent = `${spent || "$0.00"} of ${formatUsd(budget, { cents: true })} used`;
    ui.usageMeter.hidden = false;
    ui.usageMeter.max = budget;
    ui.usageMeter.value = Math.min(budget, Number(usage.spent_usd) + Number(usage.reserved_usd || 0));
    ui.usageMeter.low = budget * 0.7;
    ui.usageMeter.high = budget * 0.9;
    ui.usageMeter.optimum = 0;
    const left = remaining != null ? `${formatUsd(Math.max(0, remaining), { cents: true })} left` : "";
    const resets = formatDate(usage.period_end);
    ui.usageNote.textContent = [left, resets ? `resets ${resets}` : ""].filter(Boolean).join(" · ");
  } else {
    ui.usageFigures.textContent = `${spent || "$0.00"} spent`;
    ui.usageMeter.hidden = true;
    ui.usageNote.textContent = "No budget limit";
  }
  const requests = (usage.days || []).reduce((sum, day) => sum + (day.requests || 0), 0);
  if (requests) ui.usageNote.textContent += ` · ${requests} request${requests === 1 ? "" : "s"}`;
  ui.usage.hidden = false;
}

// --- layout: sidebar on narrow screens, scrolling, composer -------------------------------------

function openSidebar() {
  ui.app.classList.add("sidebar-open");
  ui.menu.setAttribute("aria-expanded", "true");
  ui.backdrop.hidden = false;
  ui.newChat.focus();
}

function closeSidebar() {
  if (!ui.app.classList.contains("sidebar-open")) return;
  ui.app.classList.remove("sidebar-open");
  ui.menu.setAttribute("aria-expanded", "false");
  ui.backdrop.hidden = true;
}

const fieldSizing = window.CSS && CSS.supports("field-sizing", "content");
function autosize() {
  if (fieldSizing) return;
  ui.prompt.style.height = "auto";
  ui.prompt.style.height = `${Math.min(ui.prompt.scrollHeight, 240)}px`;
}

function bindEvents() {
  ui.composer.addEventListener("submit", (event) => {
    event.preventDefault();
    send(ui.prompt.value);
  });
  ui.prompt.addEventListener("keydown", (event) => {
    if (event.key !== "Enter" || event.shiftKey || event.altKey) return;
    // An input method composing text (CJK and others) uses Enter to confirm the composition.
    if (event.isComposing || event.keyCode === 229) return;
    event.preventDefault();
    if (!state.generation) send(ui.prompt.value);
  });
  ui.prompt.addEventListener("input", () => {
    autosize();
    updateSendButton();
  });
  ui.stop.addEventListener("click", () => {
    stop();
    ui.prompt.focus();
  });
  document.addEventListener("keydown", (event) => {
    if (event.key !== "Escape" || event.defaultPrevented) return;
    if (ui.deleteDialog.open) return;
    if (state.generation) {
      event.preventDefault();
      stop();
    } else if (ui.app.classList.contains("sidebar-open")) {
      closeSidebar();
      ui.menu.focus();
    }
  });
  ui.newChat.addEventListener("click", () => newChat());
  ui.more.addEventListener("click", () => loadConversations({ append: true }));
  ui.menu.addEventListener("click", openSidebar);
  ui.sidebarClose.addEventListener("click", () => {
    closeSidebar();
    ui.menu.focus();
  });
  ui.backdrop.addEventListener("click", closeSidebar);
  NARROW.addEventListener("change", () => closeSidebar());
  ui.model.addEventListener("change", () => {
    try {
      window.localStorage.setItem(MODEL_KEY, ui.model.value);
    } catch {
      /* storage off: the choice lasts for this page */
    }
  });
  ui.errorDismiss.addEventListener("click", () => {
    clearError();
    ui.prompt.focus();
  });
  ui.transcript.addEventListener(
    "scroll",
    () => {
      const bottom = atBottom();
      state.stick = bottom;
      ui.jump.hidden = bottom || state.turns.length === 0;
    },
    { passive: true },
  );
  ui.jump.addEventListener("click", () => {
    scrollToBottom();
    ui.prompt.focus();
  });
  // Copy buttons of code blocks (rendered markdown is re-created while a reply streams).
  ui.messages.addEventListener("click", (event) => {
    const copy = event.target.closest(".copy-code");
    if (!copy) return;
    const code = copy.closest(".code-block")?.querySelector("pre");
    if (code) copyWithFeedback(copy, code.textContent);
  });
  window.addEventListener("popstate", () => {
    const id = conversationFromUrl();
    if (id == null) newChat({ push: false });
    else openConversation(id);
  });
}

function conversationFromUrl() {
  const raw = new URLSearchParams(window.location.search).get("c");
  const id = raw && /^\d+$/.test(raw) ? Number(raw) : null;
  return id && id > 0 ? id : null;
}

async function start() {
  setUnauthorizedHandler(() => goToLogin());
  bindEvents();
  autosize();
  updateSendButton();
  await loadModels();
  const id = conversationFromUrl();
  const list = loadConversations();
  refreshUsage();
  if (id != null) await openConversation(id);
  else newChat({ push: false });
  await list;
  renderConversationList();
  document.body.classList.add("ready");
}

start();
