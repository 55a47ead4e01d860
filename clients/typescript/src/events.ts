/**
 * One WebSocket to the gateway's `/v1/events` that outlives its connections: it reconnects
 * with exponential backoff and jitter, subscribes again with the last event id it handed
 * on and the id stream that id belongs to, so the gateway replays what was missed (no gap,
 * no duplicate), or says `gap` when its ring lost events, or starts from its first event
 * when it is a gateway that restarted (docs/gateway.md, "Events").
 *
 * Publishes (host events) wait for their `published` ack by `ref`. One sent on a connection
 * that drops before its ack rejects with TargetUnavailable: whether it reached the plugin
 * is unknown, and resending it on its own could deliver it twice. One not yet sent waits
 * for the next connection, within its timeout.
 */

import WebSocket from 'ws';

import {
  DeadlineExceeded,
  DispatchError,
  Forbidden,
  ShuttingDown,
  TargetUnavailable,
  Unauthorized,
  errorFromStatus,
  errorFromWire,
  isRecord,
} from './errors';

export interface EventStreamOptions {
  /** The first reconnect waits about this long (ms; default 100), doubling per failure. */
  initialDelayMs?: number;
  /** The longest wait between reconnects (ms; default 5000). */
  maxDelayMs?: number;
  /** How long an `emit` waits for the gateway's ack, connecting included (ms; default 10000). */
  emitTimeoutMs?: number;
  /**
   * A connection silent this long (no frame, no ping) is taken for dead and replaced
   * (ms; default 60000). The gateway pings every 20 s; a peer gone without a FIN (a
   * network cut) would otherwise hold the stream until the OS gives up.
   */
  idleTimeoutMs?: number;
  /**
   * Upgrades refused with 401 in a row before the stream gives up (default 3): each asks
   * the credential provider again, after the usual backoff, so an expired JWT is renewed.
   * Credentials that cannot change (strings, not functions) are not tried again: their
   * first 401 ends the stream.
   */
  maxAuthAttempts?: number;
}

export interface PluginEvent {
  /** The gateway's id: grows by one per event within one gateway process. */
  id: number;
  plugin: string;
  /**
   * The version of the plugin that emitted it: during a rollout two versions run, and
   * emit, at once. Absent from gateways that predate it.
   */
  version?: string;
  event: string;
  data: unknown;
}

/** Where a stream resumes: the last event id handed on, and the gateway's id stream it is of. */
export interface ResumePoint {
  lastEventId: number;
  /** The gateway's `stream` name; without it ids are taken to be of the gateway now running. */
  stream?: string;
}

/** Events the gateway no longer held when the stream resumed: they are lost to this client. */
export interface Gap {
  /** The last id handed on before the gap. */
  after: number;
  /** The first id the gateway still had. */
  resumedAt: number;
}

export interface EventFilter {
  plugin?: string;
  event?: string;
  /**
   * The exact version that emitted the event (during a rollout two versions emit). A
   * gateway that predates the field ignores it and sends every version's events.
   */
  version?: string;
}

export interface EventStreamListener {
  event(event: PluginEvent): void;
  gap(gap: Gap): void;
  /** A problem of the stream itself: a refused upgrade, an error frame without a ref. */
  error(error: unknown): void;
  /** The stream gave up for good (refused): no event will come any more. */
  failed?(error: DispatchError): void;
}

/**
 * The credentials of one connect: asked anew for each (a provider may renew a token). A
 * record cannot change, so a 401 is final; a function may give others at the next connect.
 */
export type HeadersSource = Record<string, string> | (() => Promise<Record<string, string>>);

export interface PublishFrame {
  plugin: string;
  event: string;
  data: unknown;
  version?: string;
}

interface Pending {
  frame: string;
  sent: boolean;
  resolve: () => void;
  reject: (error: unknown) => void;
  timer: NodeJS.Timeout;
}

/** Statuses of a refused upgrade that another attempt will not change. */
const FATAL_STATUSES = new Set([403]);
const MAX_REFUSAL_BYTES = 64 * 1024;

export class EventStream {
  readonly #url: string;
  readonly #headers: HeadersSource;
  readonly #maxAuthAttempts: number;
  /** Whether the next connect may carry other credentials: if not, a 401 is final. */
  readonly #credentialsChange: boolean;
  /** Upgrades refused with 401 since the last subscription the gateway confirmed. */
  #authFailures = 0;
  readonly #filters: EventFilter[];
  readonly #listener: EventStreamListener;
  readonly #initialDelayMs: number;
  readonly #maxDelayMs: number;
  readonly #idleTimeoutMs: number;
  readonly emitTimeoutMs: number;

  #socket: WebSocket | undefined;
  #open = false;
  #closed = false;
  #wantSubscription = false;
  #subscribedHere = false;
  /** The last event id handed on (or the newest at the first subscription). */
  #cursor: number | undefined;
  /** The id stream `#cursor` belongs to (one per gateway process). */
  #stream: string | undefined;
  #attempt = 0;
  #reconnectTimer: NodeJS.Timeout | undefined;
  #idleTimer: NodeJS.Timeout | undefined;
  #refusal: DispatchError | undefined;
  /** This connection's upgrade was refused with 401: decided at its close. */
  #authError: DispatchError | undefined;
  #nextRef = 1;
  readonly #pending = new Map<number, Pending>();
  #connections = 0;
  /** Whether the gateway ever confirmed the subscription, and who waits for it. */
  #confirmed = false;
  readonly #confirmWaiters = new Set<{ resolve: () => void; reject: (error: unknown) => void }>();

  constructor(
    url: string,
    headers: HeadersSource,
    filters: EventFilter[],
    listener: EventStreamListener,
    options: EventStreamOptions = {},
    resume?: ResumePoint,
    /**
     * Whether `headers` may give other credentials at the next connect (default: when it
     * is a function). A function that only reads credentials fixed in advance says false,
     * so a 401 ends the stream at once instead of being tried `maxAuthAttempts` times.
     */
    credentialsChange: boolean = typeof headers === 'function',
  ) {
    this.#url = url;
    this.#cursor = resume?.lastEventId;
    this.#stream = resume?.stream;
    this.#headers = headers;
    this.#filters = filters;
    this.#listener = listener;
    this.#initialDelayMs = options.initialDelayMs ?? 100;
    this.#maxDelayMs = options.maxDelayMs ?? 5000;
    this.#idleTimeoutMs = options.idleTimeoutMs ?? 60_000;
    this.emitTimeoutMs = options.emitTimeoutMs ?? 10_000;
    this.#maxAuthAttempts = Math.max(1, options.maxAuthAttempts ?? 3);
    this.#credentialsChange = credentialsChange;
  }

  /** The last event id handed on, and how many connections were opened (for tests, repr). */
  get lastEventId(): number | undefined {
    return this.#cursor;
  }
  /** Where a new stream (of this or another client, process) would resume this one. */
  get resumePoint(): ResumePoint | undefined {
    if (this.#cursor === undefined) return undefined;
    return { lastEventId: this.#cursor, ...(this.#stream === undefined ? {} : { stream: this.#stream }) };
  }
  get connections(): number {
    return this.#connections;
  }
  get connected(): boolean {
    return this.#open;
  }

  /** Receive events from now on (and, across reconnects, every one after). */
  subscribe(): void {
    this.#wantSubscription = true;
    this.#ensureSocket();
    if (this.#open && !this.#subscribedHere) this.#sendSubscribe();
  }

  /**
   * Resolves once the gateway confirmed the subscription (so events from then on arrive);
   * rejects with the refusal (Unauthorized, Forbidden), ShuttingDown if closed first, or
   * TargetUnavailable after `timeoutMs` without a confirmation (the stream keeps trying).
   */
  whenSubscribed(timeoutMs: number = this.emitTimeoutMs): Promise<void> {
    if (this.#confirmed) return Promise.resolve();
    if (this.#refusal !== undefined) return Promise.reject(this.#refusal);
    if (this.#closed) return Promise.reject(new ShuttingDown('the event stream is closed'));
    return new Promise<void>((resolve, reject) => {
      const waiter = {
        resolve: () => {
          clearTimeout(timer);
          resolve();
        },
        reject: (error: unknown) => {
          clearTimeout(timer);
          reject(error);
        },
      };
      const timer = setTimeout(() => {
        this.#confirmWaiters.delete(waiter);
        reject(new TargetUnavailable(`no subscription confirmed by ${this.#url} within ${timeoutMs} ms`));
      }, timeoutMs);
      this.#confirmWaiters.add(waiter);
    });
  }

  /** Publish a host event; resolves on the gateway's ack, rejects with its typed error. */
  publish(frame: PublishFrame, timeoutMs: number = this.emitTimeoutMs): Promise<void> {
    if (this.#closed) return Promise.reject(new ShuttingDown('the event stream is closed'));
    if (this.#refusal !== undefined) return Promise.reject(this.#refusal);
    const ref = this.#nextRef++;
    return new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.#pending.delete(ref);
        reject(
          new DeadlineExceeded(
            `no ack for event ${frame.plugin}.${frame.event} within ${timeoutMs} ms` +
              (this.#open ? '' : ' (the gateway could not be reached)'),
          ),
        );
      }, timeoutMs);
      const pending: Pending = {
        frame: JSON.stringify({ type: 'publish', ...frame, ref }),
        sent: false,
        resolve,
        reject,
        timer,
      };
      this.#pending.set(ref, pending);
      this.#ensureSocket();
      if (this.#open) this.#send(pending);
    });
  }

  /** Stop for good: no reconnect; unanswered publishes reject with ShuttingDown. */
  async close(): Promise<void> {
    this.#closed = true;
    clearTimeout(this.#reconnectTimer);
    clearTimeout(this.#idleTimer);
    const closed = new ShuttingDown('the event stream was closed before the ack');
    this.#failPending(() => true, closed);
    this.#settleWaiters(closed);
    const socket = this.#socket;
    this.#socket = undefined;
    this.#open = false;
    if (socket === undefined || socket.readyState === WebSocket.CLOSED) return;
    await new Promise<void>((resolve) => {
      const force = setTimeout(() => socket.terminate(), 2000);
      socket.once('close', () => {
        clearTimeout(force);
        resolve();
      });
      if (socket.readyState === WebSocket.CONNECTING) socket.terminate();
      else socket.close(1000);
    });
  }

  #ensureSocket(): void {
    if (this.#closed || this.#refusal !== undefined) return;
    if (this.#socket !== undefined || this.#reconnectTimer !== undefined) return;
    this.#connect();
  }

  /** Ask for the credentials of this connect, then open it. */
  #connect(): void {
    this.#reconnectTimer = undefined;
    const source = this.#headers;
    if (typeof source !== 'function') {
      this.#openSocket(source);
      return;
    }
    // Hold the place of the socket while the provider answers: nothing else connects.
    const placeholder = setTimeout(() => undefined, 0);
    this.#reconnectTimer = placeholder;
    source().then(
      (headers) => {
        if (this.#reconnectTimer !== placeholder) return;
        this.#reconnectTimer = undefined;
        if (this.#closed) return;
        this.#openSocket(headers);
      },
      (error: unknown) => {
        if (this.#reconnectTimer !== placeholder) return;
        this.#reconnectTimer = undefined;
        if (this.#closed) return;
        this.#listener.error(error);
        if (error instanceof DispatchError && !error.retryable) this.#refused(error);
        else this.#authRefused(error);
      },
    );
  }

  /** A 401 (or a provider that failed): try again with fresh credentials, a few times. */
  #authRefused(error: unknown): void {
    this.#authFailures += 1;
    if (this.#authFailures >= this.#maxAuthAttempts) {
      const final =
        error instanceof DispatchError
          ? error
          : new Unauthorized(`the credential provider failed: ${error instanceof Error ? error.message : String(error)}`, {
              cause: error,
            });
      const givenUp = new Unauthorized(
        `the event stream of ${this.#url} gave up after ${this.#authFailures} refused connects: ${final.message}`,
        { ...(final.status === undefined ? {} : { status: final.status }), cause: final },
      );
      this.#listener.error(givenUp);
      this.#refused(givenUp);
      return;
    }
    if (!this.#closed) this.#scheduleReconnect();
  }

  /** Stop for good: the refusal goes to every waiter and pending emit, and the listener. */
  #refused(error: DispatchError): void {
    this.#refusal = error;
    clearTimeout(this.#reconnectTimer);
    this.#reconnectTimer = undefined;
    this.#failPending(() => true, error);
    this.#settleWaiters(error);
    this.#listener.failed?.(error);
  }

  #openSocket(headers: Record<string, string>): void {
    this.#connections += 1;
    const socket = new WebSocket(this.#url, {
      headers,
      handshakeTimeout: 10_000,
      maxPayload: 16 * 1024 * 1024,
    });
    this.#socket = socket;
    this.#subscribedHere = false;

    socket.on('unexpected-response', (_request, response) => {
      // The upgrade was answered with an error envelope: read it, so the refusal says why.
      const chunks: Buffer[] = [];
      let size = 0;
      response.on('data', (chunk: Buffer) => {
        size += chunk.length;
        if (size <= MAX_REFUSAL_BYTES) chunks.push(chunk);
      });
      response.on('end', () => {
        const status = response.statusCode ?? 0;
        const text = Buffer.concat(chunks).toString('utf8');
        let error: DispatchError;
        try {
          const parsed: unknown = JSON.parse(text);
          error =
            isRecord(parsed) && parsed.ok === false
              ? errorFromWire(parsed.error, { status })
              : errorFromStatus(status, text);
        } catch {
          error = errorFromStatus(status, text);
        }
        const unauthorized = status === 401 || error instanceof Unauthorized;
        if (FATAL_STATUSES.has(status) || error instanceof Forbidden || (unauthorized && !this.#credentialsChange)) {
          // Refused for good: the same credentials would be refused again.
          this.#refusal = error;
        } else if (unauthorized) {
          this.#authError = error;
        }
        this.#listener.error(error);
        socket.terminate();
      });
    });
    socket.on('open', () => {
      if (socket !== this.#socket) return;
      this.#open = true;
      this.#attempt = 0;
      this.#touch(socket);
      if (this.#wantSubscription) this.#sendSubscribe();
      for (const pending of this.#pending.values()) if (!pending.sent) this.#send(pending);
    });
    socket.on('ping', () => this.#touch(socket));
    socket.on('message', (data: WebSocket.RawData, isBinary: boolean) => {
      if (socket !== this.#socket) return;
      this.#touch(socket);
      if (isBinary) return;
      let frame: unknown;
      try {
        frame = JSON.parse(data.toString());
      } catch {
        return; // the gateway sends JSON text only; anything else is not ours to act on
      }
      if (isRecord(frame)) this.#handle(frame);
    });
    // Errors are followed by 'close', where the reconnect is decided.
    socket.on('error', () => undefined);
    socket.on('close', () => {
      if (socket !== this.#socket) return;
      this.#socket = undefined;
      this.#open = false;
      clearTimeout(this.#idleTimer);
      this.#failPending(
        (pending) => pending.sent,
        new TargetUnavailable('the event stream dropped before the ack: the event may or may not have been published'),
      );
      if (this.#refusal !== undefined) {
        this.#refused(this.#refusal);
        return;
      }
      const authError = this.#authError;
      this.#authError = undefined;
      if (authError !== undefined) {
        this.#authRefused(authError);
        return;
      }
      if (!this.#closed) this.#scheduleReconnect();
    });
  }

  #scheduleReconnect(): void {
    // Exponential backoff with equal jitter: many clients of one restarted gateway spread
    // out instead of arriving together, and none waits longer than maxDelayMs.
    const ceiling = Math.min(this.#maxDelayMs, this.#initialDelayMs * 2 ** this.#attempt);
    const delay = ceiling / 2 + Math.random() * (ceiling / 2);
    this.#attempt = Math.min(this.#attempt + 1, 30);
    this.#reconnectTimer = setTimeout(() => this.#connect(), delay);
  }

  #touch(socket: WebSocket): void {
    clearTimeout(this.#idleTimer);
    this.#idleTimer = setTimeout(() => {
      if (socket === this.#socket) socket.terminate();
    }, this.#idleTimeoutMs);
    this.#idleTimer.unref(); // the socket keeps the process alive, not its watchdog
  }

  #sendSubscribe(): void {
    const frame: Record<string, unknown> = { type: 'subscribe', filters: this.#filters };
    if (this.#cursor !== undefined) frame.last_event_id = this.#cursor;
    if (this.#stream !== undefined) frame.stream = this.#stream;
    this.#socket?.send(JSON.stringify(frame));
    this.#subscribedHere = true;
  }

  #send(pending: Pending): void {
    pending.sent = true;
    this.#socket?.send(pending.frame);
  }

  #handle(frame: Record<string, unknown>): void {
    switch (frame.type) {
      case 'event': {
        const id = frame.id;
        if (typeof id !== 'number' || typeof frame.plugin !== 'string' || typeof frame.event !== 'string') return;
        if (this.#cursor !== undefined && id <= this.#cursor) return; // a replay already handed on
        this.#cursor = id;
        const version = typeof frame.version === 'string' ? { version: frame.version } : {};
        this.#listener.event({ id, plugin: frame.plugin, ...version, event: frame.event, data: frame.data });
        return;
      }
      case 'subscribed':
        this.#subscribed(frame);
        return;
      case 'gap':
        if (typeof frame.after === 'number' && typeof frame.resumed_at === 'number') {
          this.#listener.gap({ after: frame.after, resumedAt: frame.resumed_at });
        }
        return;
      case 'published':
      case 'error': {
        const pending = typeof frame.ref === 'number' ? this.#pending.get(frame.ref) : undefined;
        if (pending === undefined) {
          if (frame.type === 'error') this.#listener.error(errorFromWire(frame.error));
          return;
        }
        this.#pending.delete(frame.ref as number);
        clearTimeout(pending.timer);
        if (frame.type === 'published') pending.resolve();
        else pending.reject(errorFromWire(frame.error));
        return;
      }
      default:
        return;
    }
  }

  #subscribed(frame: Record<string, unknown>): void {
    const newest = typeof frame.last_event_id === 'number' ? frame.last_event_id : 0;
    const stream = typeof frame.stream === 'string' ? frame.stream : undefined;
    if (this.#cursor === undefined) {
      // The first subscription: events from now on.
      this.#cursor = newest;
    } else if (stream !== undefined && this.#stream !== undefined && stream !== this.#stream) {
      // A restarted gateway: it replays from its first event (ids start again at 1).
      this.#cursor = 0;
    } else if (stream === undefined && newest < this.#cursor) {
      // A gateway that does not name its stream restarted: its ids start again, and what
      // it emitted before this subscription cannot be asked for any more.
      this.#listener.gap({ after: this.#cursor, resumedAt: newest + 1 });
      this.#cursor = newest;
    }
    this.#stream = stream;
    this.#confirmed = true;
    this.#authFailures = 0;
    this.#settleWaiters();
  }

  /** Resolve (no error) or reject everyone waiting for the subscription. */
  #settleWaiters(error?: unknown): void {
    for (const waiter of this.#confirmWaiters) {
      if (error === undefined) waiter.resolve();
      else waiter.reject(error);
    }
    this.#confirmWaiters.clear();
  }

  #failPending(which: (pending: Pending) => boolean, error: unknown): void {
    for (const [ref, pending] of this.#pending) {
      if (!which(pending)) continue;
      this.#pending.delete(ref);
      clearTimeout(pending.timer);
      pending.reject(error);
    }
  }

  toString(): string {
    return `EventStream(${this.#url}, connected=${this.#open}, lastEventId=${this.#cursor}, connections=${this.#connections}, pending=${this.#pending.size})`;
  }
}
