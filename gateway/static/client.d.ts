// Types for /client.js, the sse-gateway browser client.

/** The connection's state, as a page's indicator shows it. */
export type Status = "connecting" | "open" | "reconnecting" | "closed";

/** An event as it arrived: its id ("" when it had none), its type and its raw data. */
export interface StreamEvent {
  id: string;
  type: string;
  data: string;
}

/** A failed attempt (the client retries) or a terminal refusal (status becomes "closed"). */
export interface SubscriptionError {
  /** The HTTP status, when the answer had one to tell (400, 401, 403, 429, 503 ...). */
  status?: number;
  /** The gateway's error code or refusal reason ("invalid_token", "too_many_connections" ...). */
  error?: string;
  message: string;
}

/** What a `reset` event says: events of these topics were lost; refetch the page's state. */
export interface ResetInfo {
  reason: "trimmed" | "history_lost" | "future_id" | string;
  topics: string[];
}

/** Handlers by event type; `message` receives events without a name. `data` is the parsed
 * JSON when the data parses, else the raw string. */
export type Handlers = Record<string, (data: any, ev: StreamEvent) => void>;

export interface SubscribeOptions {
  /** Topics to receive (required, at least one). */
  topics: string[];
  /** Start after this id (e.g. a snapshot's position). */
  lastEventId?: string;
  /** Replay events at or after this time (epoch ms); ignored once an id is known. */
  since?: number;
  /** Server-side filter: event types to deliver ("message" for unnamed events). */
  types?: string[];
  /** A token, or a function called before each connect and again on token_expired or a 401. */
  token?: string | (() => string | Promise<string>);
  /** "eventsource" (default): native EventSource, the token goes in the URL.
   * "fetch": the token goes as Authorization, the position as Last-Event-ID. */
  transport?: "eventsource" | "fetch";
  /** Send cookies to another origin (the gateway must list it in --cors-origin). */
  withCredentials?: boolean;
  on?: Handlers;
  onReset?: (info: ResetInfo) => void;
  onStatus?: (status: Status) => void;
  onError?: (error: SubscriptionError) => void;
  /** Full-jitter exponential backoff between attempts (ms); reset after a healthy stream. */
  backoff?: { initial?: number; max?: number };
}

export interface Subscription {
  /** The stream position: the id of the last event delivered (or skipped by `types`). */
  readonly lastEventId: string;
  readonly status: Status;
  /** Stop for good: no further attempts, timers or requests. */
  close(): void;
}

export function subscribe(url: string, options: SubscribeOptions): Subscription;

/** [ms, seq] of an "<ms>-<seq>" id, or null. */
export function parseId(id: string): [bigint, bigint] | null;

/** -1, 0 or 1 by id order; null when either is not an "<ms>-<seq>" id. */
export function compareIds(a: string, b: string): -1 | 0 | 1 | null;

/** The incremental text/event-stream parser the "fetch" transport uses (WHATWG rules). */
export class EventStreamParser {
  constructor(handlers: {
    onEvent: (ev: StreamEvent) => void;
    onId?: (id: string) => void;
    onComment?: (text: string) => void;
    onRetry?: (ms: number) => void;
  });
  /** Start a new connection's parse. */
  reset(): void;
  /** Feed decoded text. */
  push(text: string): void;
}
