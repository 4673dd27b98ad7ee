// sse-gateway browser client: a plain ES module, no build step, no dependency.
//
//   import { subscribe } from "/client.js";
//   const sub = subscribe("/events", { topics: ["user:alice"], on: { message: (data) => {} } });
//
// It reconnects with full-jitter exponential backoff, resumes from the last id, refreshes the
// token before each connect and on `token_expired` or a 401, reports `reset`, and never hands
// the page the same id twice. Types: /client.d.ts.

const CONTROL = new Set(["refused", "token_expired", "reset"]);
const TERMINAL = new Set([400, 403]);
const SETTLE_MS = 150; // an answer still open after this is a stream, not a refusal
const HEALTHY_MS = 5000; // a stream open this long (or delivering) resets the backoff

/** Parse "<ms>-<seq>" into [ms, seq] BigInts, or null when the id is not of that shape. */
export function parseId(id) {
  const match = /^(\d{1,20})-(\d{1,20})$/.exec(id || "");
  return match ? [BigInt(match[1]), BigInt(match[2])] : null;
}

/** -1, 0 or 1; null when either id is not a "<ms>-<seq>" id. */
export function compareIds(a, b) {
  const x = parseId(a);
  const y = parseId(b);
  if (!x || !y) return null;
  if (x[0] !== y[0]) return x[0] < y[0] ? -1 : 1;
  if (x[1] !== y[1]) return x[1] < y[1] ? -1 : 1;
  return 0;
}

/**
 * An incremental parser for a text/event-stream body, following the WHATWG rules: lines end
 * with CR, LF or CRLF (also split across chunks), a leading BOM is dropped, `data` lines join
 * with "\n", an `id` holding NUL is ignored, the id counts when its event is dispatched, and an
 * event with no data is not dispatched (but its id still moves the position).
 * `onEvent({id, type, data})`, `onId(id)` for an id-only block, `onComment(text)`,
 * `onRetry(ms)`.
 */
export class EventStreamParser {
  constructor(handlers) {
    this.handlers = handlers;
    this.reset();
  }

  /** Forget everything: a new connection starts a new parse. */
  reset() {
    this.buffer = "";
    this.started = false;
    this.afterCR = false;
    this.data = "";
    this.hasData = false;
    this.type = "";
    this.lastId = "";
    this.idSeen = false;
  }

  /** Feed decoded text. */
  push(text) {
    if (!this.started && text.length) {
      this.started = true;
      if (text.charCodeAt(0) === 0xfeff) text = text.slice(1);
    }
    if (this.afterCR && text.startsWith("\n")) text = text.slice(1);
    this.afterCR = false;
    let buffer = this.buffer + text;
    let start = 0;
    for (let i = 0; i < buffer.length; i++) {
      const c = buffer.charCodeAt(i);
      if (c !== 10 && c !== 13) continue;
      this.line(buffer.slice(start, i));
      if (c === 13) {
        if (i + 1 === buffer.length) this.afterCR = true;
        else if (buffer.charCodeAt(i + 1) === 10) i++;
      }
      start = i + 1;
    }
    this.buffer = buffer.slice(start);
  }

  line(line) {
    if (line === "") return this.dispatch();
    if (line.charCodeAt(0) === 58) {
      if (this.handlers.onComment) this.handlers.onComment(line.slice(1).replace(/^ /, ""));
      return;
    }
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.charCodeAt(0) === 32) value = value.slice(1);
    if (field === "data") {
      this.data += value + "\n";
      this.hasData = true;
    } else if (field === "event") {
      this.type = value;
    } else if (field === "id") {
      if (!value.includes("\0")) {
        this.lastId = value;
        this.idSeen = true;
      }
    } else if (field === "retry") {
      if (/^\d+$/.test(value) && this.handlers.onRetry) this.handlers.onRetry(Number(value));
    }
  }

  dispatch() {
    const idSeen = this.idSeen;
    this.idSeen = false;
    if (!this.hasData) {
      this.type = "";
      if (idSeen && this.handlers.onId) this.handlers.onId(this.lastId);
      return;
    }
    const data = this.data.slice(0, -1);
    const type = this.type || "message";
    this.data = "";
    this.hasData = false;
    this.type = "";
    // `id` is the id of this block only: an event without an `id:` line has none (refusals,
    // farewells), rather than the previous event's id that the browser would repeat.
    this.handlers.onEvent({ id: idSeen ? this.lastId : "", type, data });
  }
}

function reportError(error) {
  if (typeof globalThis.reportError === "function") globalThis.reportError(error);
  else setTimeout(() => { throw error; });
}

function parseData(raw) {
  try {
    return JSON.parse(raw);
  } catch {
    return raw;
  }
}

/**
 * Follow `topics` on the gateway at `url` (a node or the load balancer's `/events`).
 * Returns {lastEventId, status, close()}; see /client.d.ts and the README.
 */
export function subscribe(url, options = {}) {
  const topics = options.topics;
  if (!Array.isArray(topics) || topics.length === 0) {
    throw new TypeError("subscribe: options.topics must be a non-empty array of topic names");
  }
  const transport = options.transport || "eventsource";
  if (transport !== "eventsource" && transport !== "fetch") {
    throw new TypeError('subscribe: options.transport must be "eventsource" or "fetch"');
  }
  if (transport === "eventsource" && typeof EventSource === "undefined") {
    throw new TypeError('subscribe: EventSource is not available here; use transport "fetch"');
  }
  const handlers = options.on || {};
  const initial = Math.max(1, (options.backoff && options.backoff.initial) || 1000);
  const max = Math.max(initial, (options.backoff && options.backoff.max) || 30000);
  const base = typeof location !== "undefined" ? location.href : undefined;

  let generation = 0; // bumped on each connect and on close: stale callbacks check it
  let attempts = 0; // failures since the last healthy stream
  let timer = null; // the pending reconnect
  let source = null; // the native EventSource, when one is open
  let controller = null; // aborts the in-flight fetch (stream or probe)
  let streamTimers = [];

  const sub = {
    lastEventId: options.lastEventId || "",
    status: "connecting",
    close() {
      if (sub.status === "closed") return;
      stop();
      setStatus("closed");
    },
  };
  // Below it no event is delivered; a `reset` lowers it (the ids may start over).
  let floor = sub.lastEventId;

  function call(fn, ...args) {
    if (typeof fn !== "function") return;
    try {
      fn(...args);
    } catch (error) {
      reportError(error);
    }
  }

  function setStatus(status) {
    if (sub.status === status) return;
    sub.status = status;
    call(options.onStatus, status);
  }

  function teardown() {
    generation++;
    for (const t of streamTimers) clearTimeout(t);
    streamTimers = [];
    if (timer !== null) clearTimeout(timer);
    timer = null;
    if (source) source.close();
    source = null;
    if (controller) controller.abort();
    controller = null;
  }

  function stop() {
    teardown();
  }

  function backoffDelay() {
    const cap = Math.min(max, initial * 2 ** Math.min(attempts, 30));
    attempts++;
    return Math.random() * cap;
  }

  /** A failed attempt or an ended stream: report it and come back after a jittered delay. */
  function retry(error, floorMs = 0) {
    teardown();
    if (error) call(options.onError, error);
    setStatus("reconnecting");
    const delay = Math.max(floorMs, backoffDelay());
    timer = setTimeout(connect, delay);
  }

  function fail(error) {
    teardown();
    call(options.onError, error);
    setStatus("closed");
  }

  function opened(gen) {
    // "open" once the answer has proved to be a stream: it delivered, or stayed a moment.
    streamTimers.push(setTimeout(() => gen === generation && markOpen(), SETTLE_MS));
    streamTimers.push(setTimeout(() => gen === generation && (attempts = 0), HEALTHY_MS));
  }

  function markOpen() {
    if (sub.status !== "closed") setStatus("open");
  }

  function buildUrl(token, forFetch) {
    const target = new URL(url, base);
    for (const topic of topics) target.searchParams.append("topic", topic);
    if (!forFetch && sub.lastEventId) target.searchParams.set("lastEventID", sub.lastEventId);
    if (!sub.lastEventId && options.since != null) {
      target.searchParams.set("since", String(options.since));
    }
    if (options.types && options.types.length) {
      target.searchParams.set("types", options.types.join(","));
    }
    if (!forFetch && token) target.searchParams.set("token", token);
    return target.toString();
  }

  async function currentToken() {
    const token = options.token;
    if (typeof token === "function") return await token();
    return token || "";
  }

  /** A `refused`, `token_expired` or `reset` event, or a data event for the page. */
  function handle(ev) {
    if (ev.type === "refused") {
      const info = parseData(ev.data);
      const reason = info && typeof info === "object" ? info : {};
      retry(
        { error: reason.reason || "refused", message: reason.message || "the node refused" },
        Number(reason.retry_ms) || 0,
      );
      return;
    }
    if (ev.type === "token_expired") {
      // A planned hand-over: a fresh token, then resume from the last id at once.
      teardown();
      connect();
      return;
    }
    if (ev.type === "reset") {
      const info = parseData(ev.data);
      const reset = info && typeof info === "object" ? info : {};
      // After a reset the ids may start over (history lost, a future id): new floor.
      floor = ev.id || "";
      if (ev.id) sub.lastEventId = ev.id;
      call(options.onReset, { reason: reset.reason, topics: reset.topics || [] });
      return;
    }
    if (ev.id) {
      const order = compareIds(ev.id, floor);
      if (order !== null && order <= 0) return; // delivered before
      floor = ev.id;
      sub.lastEventId = ev.id;
      attempts = 0;
    }
    markOpen();
    const handler = handlers[ev.type];
    if (handler) call(handler, parseData(ev.data), { id: ev.id, type: ev.type, data: ev.data });
  }

  function position(id) {
    const order = compareIds(id, floor);
    if (order !== null && order <= 0) return;
    floor = id;
    sub.lastEventId = id;
  }

  async function connect() {
    teardown();
    const gen = generation;
    let token;
    try {
      token = await currentToken();
    } catch (error) {
      if (gen === generation) {
        retry({ error: "token_unavailable", message: `token() failed: ${error}` });
      }
      return;
    }
    if (gen !== generation || sub.status === "closed") return;
    if (transport === "fetch") connectFetch(gen, token);
    else connectNative(gen, token);
  }

  function connectNative(gen, token) {
    const target = buildUrl(token, false);
    const es = new EventSource(target, { withCredentials: !!options.withCredentials });
    source = es;
    const listen = (type) =>
      es.addEventListener(type, (e) => {
        // (a connection error is a plain Event on "error", not a server's `event: error`)
        if (gen !== generation || !(e instanceof MessageEvent)) return;
        // A new source per connection, so an event without an `id:` line carries "".
        handle({ id: e.lastEventId, type, data: e.data });
      });
    for (const type of new Set(["message", ...CONTROL, ...Object.keys(handlers)])) listen(type);
    es.onopen = () => gen === generation && opened(gen);
    es.onerror = () => {
      if (gen !== generation) return;
      if (es.readyState === 2) {
        // CLOSED: an answer that is not a stream (401, 403, 400, a proxy's page). The
        // browser cannot tell which: ask the same URL once to learn the status.
        es.close();
        source = null;
        probe(gen, target);
      } else {
        // The stream ended or the network failed; reconnect on this client's own schedule
        // (never two sources at once), from the last delivered id.
        retry({ message: "the stream was interrupted" });
      }
    };
  }

  async function probe(gen, target) {
    const abort = new AbortController();
    controller = abort;
    let response;
    try {
      response = await fetch(target, {
        headers: { accept: "application/json" },
        credentials: options.withCredentials ? "include" : "same-origin",
        cache: "no-store",
        signal: abort.signal,
      });
    } catch (error) {
      if (gen === generation) retry({ message: `the gateway cannot be reached: ${error}` });
      return;
    }
    if (gen !== generation) return;
    if (response.ok) {
      abort.abort(); // a stream after all: drop it and connect again
      retry({ status: response.status, message: "the stream could not be opened" });
      return;
    }
    await refusedResponse(gen, response);
  }

  async function refusedResponse(gen, response) {
    let body = null;
    try {
      body = await response.json();
    } catch {
      body = null;
    }
    if (gen !== generation) return;
    const error = {
      status: response.status,
      error: body && typeof body.error === "string" ? body.error : undefined,
      message:
        body && typeof body.message === "string"
          ? body.message
          : `HTTP ${response.status} ${response.statusText || ""}`.trim(),
    };
    if (TERMINAL.has(response.status)) return fail(error);
    if (response.status === 401 && typeof options.token !== "function") return fail(error);
    const after = Number(response.headers.get("retry-after"));
    retry(error, Number.isFinite(after) && after > 0 ? after * 1000 : 0);
  }

  async function connectFetch(gen, token) {
    const abort = new AbortController();
    controller = abort;
    const headers = { accept: "text/event-stream" };
    if (token) headers.authorization = `Bearer ${token}`;
    if (sub.lastEventId) headers["last-event-id"] = sub.lastEventId;
    let response;
    try {
      response = await fetch(buildUrl(token, true), {
        headers,
        credentials: options.withCredentials ? "include" : "same-origin",
        cache: "no-store",
        signal: abort.signal,
      });
    } catch (error) {
      if (gen === generation) retry({ message: `the gateway cannot be reached: ${error}` });
      return;
    }
    if (gen !== generation) return;
    const type = response.headers.get("content-type") || "";
    if (!response.ok) return refusedResponse(gen, response);
    if (!type.startsWith("text/event-stream") || !response.body) {
      retry({ status: response.status, message: `not an event stream: ${type}` });
      return;
    }
    opened(gen);
    const parser = new EventStreamParser({
      onEvent: (ev) => gen === generation && handle(ev),
      onId: (id) => gen === generation && position(id),
    });
    const reader = response.body.getReader();
    const decoder = new TextDecoder("utf-8");
    try {
      for (;;) {
        const { done, value } = await reader.read();
        if (gen !== generation) return;
        if (done) break;
        parser.push(decoder.decode(value, { stream: true }));
      }
    } catch (error) {
      if (gen === generation) retry({ message: `the stream was interrupted: ${error}` });
      return;
    }
    if (gen === generation) retry({ message: "the stream ended" });
  }

  // Told once subscribe() has returned, so a handler may already use the subscription.
  queueMicrotask(() => sub.status === "connecting" && call(options.onStatus, "connecting"));
  connect();
  return sub;
}
