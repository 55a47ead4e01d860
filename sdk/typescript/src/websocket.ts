/**
 * The plugin over WebSocket (docs/protocol.md, "WebSocket binding"), with the `ws` package:
 *
 * - `serveWebSocket(plugin, address, token)`: the dispatcher dials in (`provider: websocket`,
 *   `url: ws://…`); prints `1|1|tcp|ADDR|websocket|` once listening.
 * - `dial(plugin, url, options)`: reverse mode; the plugin dials the gateway's
 *   `/v1/plugins/connect` and takes calls over that connection, reconnecting after a drop
 *   with exponential backoff and full jitter, each failed dial one INFO line naming the URL
 *   masked (`maskedUrl`). A 400/401/403/404 at the upgrade is not retried,
 *   nor a close 4403 after it (the hello names another id or version than the one admitted,
 *   or speaks a protocol the gateway does not: the next connection would send the same
 *   hello); every other close, 4400 included, is.
 *
 * One `Session` serves one connection either way: `hello` first, then each `call`/`stream`
 * frame runs with its own AbortController (deadline from `context.deadline_ms`, `cancel`
 * frames abort it, as does the connection closing; a stream so cut off closes the plugin's
 * generator, its `finally` run, as over gRPC), streams honour the host's `credit` (a window
 * of 256 chunks), `health`
 * is answered, host `event`s reach `plugin.on` handlers and the plugin's events go out.
 * Those wait in a queue per connection while the socket takes no more (`ws` holds
 * `EVENTS_HIGH_WATER` bytes unsent), at most `EVENTS_WAITING` of them, the oldest dropped and
 * counted past it (said once on stderr), as the Go, Rust and Java SDKs and an Events stream do.
 * Events emitted while no host is connected wait, the newest `MAX_BUFFERED_EVENTS` of them, and
 * go to the next host followed by a `dropped` frame with the count lost, if any, which waits in
 * that queue too but is never dropped. Given
 * a `Tracing`, each call and each stream runs in its span, as over gRPC (tracing.ts): a
 * stream's lasts until its last chunk and ends with its outcome.
 *
 * Stopping loses no call: the plugin says `goaway` on each connection (having stopped
 * listening, or redialling), goes on answering what still arrives, and the host closes the
 * connection once its calls are answered; after `GOAWAY_GRACE` the plugin closes it (1001).
 *
 * No frame goes out over the session's send cap: `MAX_MESSAGE_BYTES` (what it reads), or the
 * host's cap where it announced a smaller one (the upgrade request's
 * `LinchKit-Max-Message-Bytes` header; in reverse mode the same header on the gateway's 101
 * upgrade response, read before the hello, then its `welcome`'s `max_message_bytes`, which
 * replaces it; anything but a whole number from 1,024 to 2^53 is ignored). The host
 * closes a connection (1009) on a message over its cap, and with it every call on it: so a
 * call's answer over the cap is answered `provider_error` (`too_large`) instead, a stream's
 * chunk over it ends the stream so (its generator closed, as a cancel closes it), and an
 * event over it is not sent, the first on a connection said on stderr.
 *
 * A result or a chunk JSON cannot carry (a NaN, an infinity, a string that is not valid
 * Unicode: wirejson.ts `encodeJson`) is answered `provider_error` in its place, ending a
 * stream as a chunk over the cap does; an event is not sent (`Plugin.emit` says so); an
 * error's details are dropped, a lone surrogate in its type or message sent as U+FFFD.
 *
 * An `error` frame from the host (it could not use a frame of ours) is never answered, or the
 * two peers could trade them for ever. It is said at INFO, the host's message escaped and cut
 * as a close reason is: the first `LOGGED_HOST_ERRORS` of a connection, then one line saying
 * the rest are not, so that a host sending a flood of them does not flood stderr.
 */
import * as http from 'node:http';
import type { Duplex } from 'node:stream';
import { setTimeout as sleep } from 'node:timers/promises';
import { WebSocket, WebSocketServer, type RawData } from 'ws';
import type { BearerToken } from './auth';
import { maskedUrl } from './connect';
import { type ClientTls, alertRefusal } from './connecttls';
import { DeadlineExceeded, InvalidParams, PluginError, ProviderError, toWireError } from './errors';
import { formatListenAddress, listen, parseListenAddress } from './listen';
import { log, shown } from './log';
import { isObject, type JsonObject } from './params';
import type { CallContext, Plugin } from './plugin';
import { decodeJson } from './server';
import type { CallSpan, Tracing } from './tracing';
import { MAX_DEPTH, bareName, encodeJson, sendableError } from './wirejson';

export const STREAM_WINDOW = 256;
export const MAX_MESSAGE_BYTES = 8 * 1024 * 1024;
/**
 * The header in which the host announces its read cap: on the upgrade request (the
 * dispatcher), or on the 101 upgrade response (the gateway, in reverse mode).
 */
export const MAX_MESSAGE_BYTES_HEADER = 'LinchKit-Max-Message-Bytes';
/** The least cap a host may announce: smaller, a call's answer could not carry an error. */
const MIN_ANNOUNCED = 1024;
/** The most: the largest integer every SDK's JSON carries exactly. */
const MAX_ANNOUNCED = 2 ** 53;

/**
 * The cap an upgrade request's or response's `LinchKit-Max-Message-Bytes` headers announce
 * (`values`, each one sent: `headersDistinct`), or undefined: none, more than one, or not 1-16 ASCII digits of
 * a value from 1,024 to 2^53.
 */
export function capOfHeader(values: readonly string[] | undefined): number | undefined {
  if (values?.length !== 1 || !/^[0-9]{1,16}$/.test(values[0] as string)) return undefined;
  // As a BigInt: a number rounds 2^53 + 1 down to 2^53.
  return capOfWelcome(BigInt(values[0] as string));
}

/**
 * The cap a `welcome` frame's `max_message_bytes` announces, or undefined: absent, not a
 * JSON integer (a string, 12.5, `true`), or outside 1,024 to 2^53 (which arrives as a BigInt:
 * it is past the integers a number holds exactly).
 */
export function capOfWelcome(value: unknown): number | undefined {
  if (typeof value === 'bigint') return value >= MIN_ANNOUNCED && value <= MAX_ANNOUNCED ? Number(value) : undefined;
  if (typeof value !== 'number' || !Number.isInteger(value)) return undefined;
  return value >= MIN_ANNOUNCED && value <= MAX_ANNOUNCED ? value : undefined;
}

/** The error sent in place of a frame of `size` bytes over the cap `limit`; `what` names its payload. */
function tooLarge(what: string, size: number, limit: number): PluginError {
  const message = `${what} is ${size} bytes, over the WebSocket message cap of ${limit} bytes`;
  return new PluginError('provider_error', message, { details: { reason: 'too_large', bytes: size, limit } });
}
/** Calls one connection runs at once; beyond it the session stops reading (TCP pushes back). */
export const MAX_IN_FLIGHT = 1024;
/** A frame may nest a call's 250 levels of params under its own object and its request's. */
const MAX_FRAME_DEPTH = MAX_DEPTH + 2;
/** Bytes queued on a socket the host does not read before the session stops reading calls. */
const MAX_BUFFERED_BYTES = 16 * 1024 * 1024;
/**
 * The plugin's event frames one connection keeps while the socket takes no more; past it the
 * oldest event is dropped, never the `dropped` frame (EVENTS_PER_STREAM in server.ts: an
 * Events stream's bound, every SDK's).
 */
export const EVENTS_WAITING = 1024;
/**
 * Bytes `ws` may hold unsent before the session hands it no more events: past it the host is
 * not keeping up, and a call's answer sent meanwhile waits behind at most this much of them.
 */
export const EVENTS_HIGH_WATER = 64 * 1024;
const MAX_TIMER_MS = 2 ** 31 - 1;
/**
 * Events the plugin keeps while no host is connected, the oldest dropped and counted past
 * it (docs/protocol.md, "Events while disconnected"; `max_buffered_events` in the Python SDK).
 */
export const MAX_BUFFERED_EVENTS = 1000;
const PROTOCOL_VERSION = 1;
/**
 * Milliseconds a stopping plugin waits, after `goaway`, for the host to finish its calls and
 * close the connection, before closing it itself (1001) with whatever still runs (5 s, as
 * GOAWAY_GRACE in every SDK).
 */
export const GOAWAY_GRACE = 5_000;
/** After its own close (1001), how long the plugin waits for the host's before cutting the socket. */
const CLOSE_WAIT_MS = 1_000;
const CLOSE_GOING_AWAY = 1001;
/** The gateway upgraded the connection but not the hello: it names another id or version than the one admitted. */
const CLOSE_WRONG_PLUGIN = 4403;
/** The host's `error` frames said on one connection; one line says the rest are not. */
export const LOGGED_HOST_ERRORS = 10;

type Frame = JsonObject & { type: string };

/** A stream's send window: chunks it may send before the host grants more. */
class Window {
  private credit = STREAM_WINDOW;
  private waiter: (() => void) | undefined;

  async take(signal: AbortSignal): Promise<void> {
    while (this.credit <= 0) {
      if (signal.aborted) throw signal.reason;
      await new Promise<void>((resolve) => {
        this.waiter = resolve;
        signal.addEventListener('abort', () => resolve(), { once: true });
      });
    }
    this.credit -= 1;
  }

  grant(count: number): void {
    this.credit += count;
    const waiter = this.waiter;
    this.waiter = undefined;
    waiter?.();
  }
}

export class Session {
  private readonly calls = new Map<number, AbortController>();
  private readonly windows = new Map<number, Window>();
  private unsubscribe: () => void = () => undefined;
  private paused = false;
  private draining = false;
  private readonly backlog: RawData[] = [];
  /** The plugin's event frames not yet handed to `ws`, oldest first (`queueEvent`). */
  private readonly events: Buffer[] = [];
  /** The `dropped` frame after the events that waited for a host: never dropped from `events`. */
  private undroppable: Buffer | undefined;
  private dropped = 0;
  /** Events not sent for being over `sendCap` (the first said on stderr). */
  private eventsOverCap = 0;
  /** The host's `error` frames on this connection (the first `LOGGED_HOST_ERRORS` said). */
  private hostErrors = 0;
  /**
   * The largest frame sent: `MAX_MESSAGE_BYTES`, or the host's cap where it announced a
   * smaller one (the upgrade's header, then in reverse mode the `welcome`'s, which replaces it).
   */
  private sendCap = MAX_MESSAGE_BYTES;
  /** The gateway accepted the hello (reverse mode): only then the redial backoff resets. */
  welcomed = false;
  /** Resolves once the socket has closed, however. */
  private readonly ended: Promise<void>;

  constructor(
    private readonly plugin: Plugin,
    private readonly socket: WebSocket,
    /** Each call and stream runs in a span continuing its traceparent; undefined: untraced. */
    private readonly tracing?: Tracing,
    /**
     * The host's read cap, as the upgrade announced it (`capOfHeader`: the request's header,
     * or in reverse mode the 101 response's); undefined: none. It holds from the first frame
     * on: the hello, the kept events flushed after it, anything sent before a `welcome`.
     */
    announcedCap?: number,
  ) {
    this.ended = new Promise((resolve) => socket.once('close', () => resolve()));
    if (announcedCap !== undefined) this.sendCap = Math.min(MAX_MESSAGE_BYTES, announcedCap);
  }

  /** Say hello, then serve until the socket closes (the returned promise resolves then). */
  run(): Promise<void> {
    const plugin = this.plugin;
    const methods = plugin.describe();
    this.send({
      type: 'hello',
      protocol: PROTOCOL_VERSION,
      id: plugin.id,
      version: plugin.version,
      runtime: plugin.runtime,
      methods: methods.map((method) => method.name).sort(),
      streaming: methods.filter((method) => method.streaming).map((method) => method.name).sort(),
      // The largest message this side reads: the host sends no call or event over it.
      max_message_bytes: MAX_MESSAGE_BYTES,
    });
    this.unsubscribe = plugin.addEventSink(
      (name, dataJson) => this.queueEvent(eventFrame(name, dataJson), name),
      (count) => this.queueEvent(encodeJson({ type: 'dropped', count })),
    );
    this.socket.on('message', (data: RawData) => {
      // pause() stops the socket, not the messages ws already read: those wait here.
      if (this.paused || this.backlog.length > 0) this.backlog.push(data);
      else this.received(data);
    });
    // A message over maxPayload (closed with 1009), broken framing, a reset: 'close'
    // follows and ends the session. Unhandled, the 'error' event killed the process.
    this.socket.on('error', () => undefined);
    this.socket.once('close', () => {
      this.unsubscribe();
      this.events.length = 0;
      for (const controller of this.calls.values()) controller.abort(new DeadlineExceeded('the connection closed'));
      this.calls.clear();
    });
    return this.ended;
  }

  /**
   * The plugin stops: say `goaway` and go on serving, so the calls the host sent before it
   * read it are answered; the host closes the connection once none is left. Past `graceMs`
   * close it (1001), cutting off what still runs. Resolves once the socket is closed.
   */
  async goAway(graceMs = GOAWAY_GRACE): Promise<void> {
    this.send({ type: 'goaway' });
    if (await settlesWithin(this.ended, graceMs)) return;
    this.socket.close(CLOSE_GOING_AWAY, 'the plugin is stopping');
    // A host that does not answer the close either: ws alone would wait 30 s for it.
    if (!(await settlesWithin(this.ended, CLOSE_WAIT_MS))) this.socket.terminate();
    await this.ended;
  }

  /** Events dropped on this connection for a host that did not read them. */
  get eventsDropped(): number {
    return this.dropped;
  }

  private send(frame: JsonObject): void {
    if (this.socket.readyState !== WebSocket.OPEN) return;
    let data: Buffer;
    try {
      data = encodeJson(frame, `the ${String(frame.type)} frame`);
    } catch (error) {
      // A hello naming a method with a lone surrogate in its name: said, not sent. Thrown,
      // it ended the process (an exception in ws's upgrade callback).
      log.error(`not sent: ${(error as Error).message}`);
      return;
    }
    this.sendBytes(data);
  }

  private sendBytes(data: Buffer): void {
    if (this.socket.readyState !== WebSocket.OPEN) return;
    // ws queues what the peer has not taken without limit: past MAX_BUFFERED_BYTES stop
    // reading calls until it drained, so a host that never reads cannot grow this process.
    this.socket.send(data, { binary: false }, () => this.flushEvents());
    this.flow();
  }

  /** A call's answer; over `sendCap`, `too_large` in its place (the connection stays). */
  private sendResponse(id: number, method: string, response: JsonObject): void {
    if (this.socket.readyState !== WebSocket.OPEN) return;
    const data = encodeJson({ type: 'response', id, response });
    if (data.length <= this.sendCap) {
      this.sendBytes(data);
      return;
    }
    const what = `the ${response.ok === true ? 'result' : 'error'} of ${bareName(method)}`;
    this.send({ type: 'response', id, response: { ok: false, error: toWireError(tooLarge(what, data.length, this.sendCap)) } });
  }

  /**
   * Queue one of the plugin's event frames; never waits for the host. Each used to go
   * straight to ws, whose buffer grew with every event for a host that reads nothing: they
   * now wait here, the oldest event dropped past EVENTS_WAITING. `event` is the event's
   * name; with none, `data` is the `dropped` frame, which waits here too (behind the events
   * that waited for a host, ahead of later ones) but is never dropped: a flood used to drop
   * it once it was the oldest, and the count it carried.
   */
  private queueEvent(data: Buffer, event?: string): void {
    if (this.socket.readyState !== WebSocket.OPEN) return;
    const droppable = event !== undefined;
    if (data.length > this.sendCap) {
      // Not sent: the host would close the connection, every call on it with it.
      if (this.eventsOverCap++ === 0) {
        log.warn(`event ${bareName(String(event))} is ${data.length} bytes, over the WebSocket message cap of ${this.sendCap} bytes: not sent`);
      }
      return;
    }
    if (this.events.length >= EVENTS_WAITING) {
      // At most one frame is not droppable, the one `dropped` frame: when it is the oldest,
      // the oldest event is the next.
      if (this.events[0] === this.undroppable) this.events.splice(1, 1);
      else this.events.shift();
      if (this.dropped++ === 0) log.warn('the host is not reading its Events stream; dropping the oldest events');
    }
    if (!droppable) this.undroppable = data;
    this.events.push(data);
    this.flushEvents();
  }

  /**
   * Hand ws the waiting events while the socket takes them. Once it holds EVENTS_HIGH_WATER
   * bytes unsent, what it holds has send callbacks to come: the last one, called as the
   * socket drains, calls this again.
   */
  private flushEvents(): void {
    while (this.events.length > 0 && this.socket.readyState === WebSocket.OPEN && this.socket.bufferedAmount < EVENTS_HIGH_WATER) {
      this.socket.send(this.events.shift() as Buffer, { binary: false }, () => this.flushEvents());
    }
    this.flow();
  }

  /** Read while fewer than MAX_IN_FLIGHT calls run and the socket's queue is short. */
  private flow(): void {
    const isFull = (): boolean => this.calls.size >= MAX_IN_FLIGHT || this.socket.bufferedAmount > MAX_BUFFERED_BYTES;
    if (!this.draining) {
      this.draining = true;
      while (this.backlog.length > 0 && !isFull()) this.received(this.backlog.shift() as RawData);
      this.draining = false;
    }
    const full = isFull() || this.backlog.length > 0;
    if (full && !this.paused) this.socket.pause();
    else if (!full && this.paused) this.socket.resume();
    else return;
    this.paused = full;
  }

  private received(data: RawData): void {
    let frame: Frame;
    try {
      const bytes = Buffer.isBuffer(data) ? data : Buffer.from(data as ArrayBuffer);
      if (bytes.length === 0) throw new InvalidParams('an empty message is not a frame');
      const parsed = decodeJson(bytes, 'a frame', MAX_FRAME_DEPTH);
      if (!isObject(parsed) || typeof parsed.type !== 'string') throw new InvalidParams('a frame is an object with a type');
      frame = parsed as Frame;
    } catch (error) {
      this.send({ type: 'error', error: sendableError(toWireError(new ProviderError(String((error as Error).message)))) });
      return;
    }
    const id = typeof frame.id === 'number' && Number.isSafeInteger(frame.id) ? frame.id : undefined;
    switch (frame.type) {
      case 'call':
      case 'stream':
        if (id === undefined || this.calls.has(id)) {
          this.send({ type: 'error', error: sendableError(toWireError(new ProviderError(`${frame.type} needs a new integer id`))) });
          return;
        }
        void this.runCall(frame.type, id, frame.request);
        this.flow();
        return;
      case 'cancel':
        if (id !== undefined) this.calls.get(id)?.abort(new DeadlineExceeded('cancelled by the host'));
        return;
      case 'credit':
        if (id !== undefined && typeof frame.n === 'number' && frame.n > 0) this.windows.get(id)?.grant(frame.n);
        return;
      case 'health':
        this.send({ type: 'health', id: id ?? null, status: this.plugin.started ? 'serving' : 'not_serving', detail: '' });
        return;
      case 'event':
        if (typeof frame.event === 'string') {
          const name = frame.event;
          this.plugin.deliverHostEvent(name, frame.data ?? null).catch((error: unknown) => {
            log.error(`handler of host event ${shown(name, 64)} failed: ${String(error)}`);
          });
        }
        return;
      case 'welcome': {
        this.welcomed = true;
        // Frames are ordered: the gateway's cap arrives before any call it sends after the
        // welcome. A valid one replaces the upgrade response's; an invalid one leaves it.
        const announced = capOfWelcome(frame.max_message_bytes);
        if (announced !== undefined) this.sendCap = Math.min(MAX_MESSAGE_BYTES, announced);
        return;
      }
      case 'dropped':
        return;
      case 'error':
        this.hostError(frame.error);
        return;
      default: {
        // The host's type, cut: maybe inside an emoji (sendableError mends that half).
        const error = new ProviderError(`unknown frame type ${frame.type.slice(0, 40)}`);
        this.send({ type: 'error', id: id ?? null, error: sendableError(toWireError(error)) });
      }
    }
  }

  /**
   * The host could not use a frame of ours (one that predates `goaway` says so of it): said,
   * never answered, or the two peers could trade errors for ever. Only the first
   * `LOGGED_HOST_ERRORS` of a connection: the host chooses how many it sends.
   */
  private hostError(error: unknown): void {
    this.hostErrors += 1;
    if (this.hostErrors <= LOGGED_HOST_ERRORS) {
      log.info(`the host could not use a frame: ${shownCloseReason(errorText(error))}`);
    } else if (this.hostErrors === LOGGED_HOST_ERRORS + 1) {
      log.info(`the host sent more than ${LOGGED_HOST_ERRORS} error frames on this connection; further ones are not logged`);
    }
  }

  private async runCall(kind: string, id: number, request: unknown): Promise<void> {
    const controller = new AbortController();
    this.calls.set(id, controller);
    let timer: NodeJS.Timeout | undefined;
    let span: CallSpan | undefined;
    let chunks: AsyncGenerator<unknown> | undefined;
    let named = '';
    try {
      if (!isObject(request) || request.v !== PROTOCOL_VERSION) {
        throw new ProviderError(`unsupported envelope; this plugin speaks v${PROTOCOL_VERSION}`);
      }
      const method = request.method;
      if (typeof method !== 'string' || method === '') throw new ProviderError('the request names no method');
      named = method;
      const context = isObject(request.context) ? request.context : {};
      // Only a positive deadline bounds the call (a negative one is a host's mistake, not a
      // call already late); 2^63-1 arrives as a BigInt. setTimeout fires after 1 ms for a
      // delay past 2^31-1 ms, so a far deadline waits in steps it can hold.
      const raw = context.deadline_ms;
      const left = (typeof raw === 'number' || typeof raw === 'bigint') && raw > 0 ? Number(raw) : undefined;
      const deadline = left === undefined ? undefined : Date.now() + left;
      if (deadline !== undefined) {
        const arm = (): void => {
          const wait = deadline - Date.now();
          timer =
            wait > MAX_TIMER_MS
              ? setTimeout(arm, MAX_TIMER_MS)
              : setTimeout(() => controller.abort(new DeadlineExceeded(`${method} did not finish before its deadline`)), Math.max(0, wait));
        };
        arm();
      }
      const over = new Promise<never>((_, reject) => {
        controller.signal.addEventListener('abort', () => reject(controller.signal.reason), { once: true });
      });
      over.catch(() => undefined);
      const ctx = callContext(method, context, deadline, controller.signal);
      if (this.tracing !== undefined) {
        this.plugin.lookup(method); // no span named after a method that does not exist
        span = this.tracing.begin(ctx);
      }
      const traced = span;
      const within = <T>(fn: () => T): T => (traced === undefined ? fn() : traced.within(fn));
      if (kind === 'call') {
        const result = await Promise.race([within(() => this.plugin.invoke(method, request.params ?? null, ctx)), over]);
        // Answered, so the deadline's timer did not end it: a method that held the event loop
        // past it kept the timer from running, and is said to have (one clock read).
        this.plugin.lateAnswers.answered(method, deadline);
        // Before the span ends: a result JSON cannot carry (provider_error) ends it failed.
        this.sendResponse(id, method, { ok: true, result: result === undefined ? null : result });
        span?.end();
        span = undefined;
      } else {
        const window = new Window();
        this.windows.set(id, window);
        try {
          const stream = this.plugin.invokeStream(method, request.params ?? null, ctx);
          chunks = stream;
          for (;;) {
            // A generator's body runs in the context of whoever calls next(): each step in the span.
            const next = await Promise.race([within(() => stream.next()), over]);
            if (next.done) break;
            const data = encodeJson({ type: 'chunk', id, data: next.value === undefined ? null : next.value });
            if (data.length > this.sendCap) {
              // The stream ends with it; its producer stops as a cancel stops it.
              const error = tooLarge(`a chunk of ${bareName(method)}`, data.length, this.sendCap);
              controller.abort(error);
              throw error;
            }
            await window.take(controller.signal);
            this.sendBytes(data);
          }
        } finally {
          this.windows.delete(id);
        }
        // Its last chunk came without the deadline ending it: late, the loop was held (as a call).
        this.plugin.lateAnswers.answered(method, deadline);
        span?.end();
        span = undefined;
        this.send({ type: 'response', id, response: { ok: true, result: null } });
      }
    } catch (error) {
      span?.end({ thrown: error });
      // Cut off (a cancel, the connection gone, the deadline) or failed: close the plugin's
      // generator, so its `finally` runs, as the gRPC path does. Not awaited: a step still
      // running ends first (return() waits for it), and may never end.
      void chunks?.return(undefined).catch(() => undefined);
      if (this.socket.readyState === WebSocket.OPEN && !(controller.signal.aborted && isCancel(controller.signal.reason))) {
        this.sendResponse(id, named, { ok: false, error: sendableError(toWireError(error)) });
      }
    } finally {
      if (timer !== undefined) clearTimeout(timer);
      this.calls.delete(id);
      this.flow();
    }
  }
}

/** An `event` frame around data already JSON (`Plugin.emit` encoded it, once for every host). */
function eventFrame(name: string, dataJson: string): Buffer {
  return Buffer.from(`{"type":"event","event":${JSON.stringify(name)},"data":${dataJson}}`);
}

/** Whether `promise` settles within `ms`; the timer does not outlive the answer. */
async function settlesWithin(promise: Promise<unknown>, ms: number): Promise<boolean> {
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<false>((resolve) => (timer = setTimeout(() => resolve(false), ms)));
  try {
    return await Promise.race([promise.then(() => true), late]);
  } finally {
    clearTimeout(timer);
  }
}

function isCancel(reason: unknown): boolean {
  return reason instanceof DeadlineExceeded && reason.message === 'cancelled by the host';
}

function callContext(method: string, context: JsonObject, deadline: number | undefined, signal: AbortSignal): CallContext {
  const text = (key: string): string => (typeof context[key] === 'string' ? (context[key] as string) : '');
  return {
    method,
    requestId: text('request_id'),
    caller: text('caller'),
    traceparent: text('traceparent'),
    idempotencyKey: text('idempotency_key'),
    deadline,
    signal,
    remainingMs: () => (deadline === undefined ? undefined : Math.max(0, deadline - Date.now())),
    sleep: (ms: number) =>
      new Promise<void>((resolve, reject) => {
        if (signal.aborted) return reject(signal.reason);
        const onAbort = (): void => {
          clearTimeout(sleeper);
          reject(signal.reason);
        };
        const sleeper = setTimeout(() => {
          signal.removeEventListener('abort', onAbort);
          resolve();
        }, ms);
        signal.addEventListener('abort', onAbort, { once: true });
      }),
  };
}

/** Ping every `intervalMs`; a peer that did not pong since the last ping is gone (half-open). */
function keepAlive(socket: WebSocket, intervalMs: number): void {
  let alive = true;
  socket.on('pong', () => (alive = true));
  const timer = setInterval(() => {
    if (!alive) {
      socket.terminate();
      return;
    }
    alive = false;
    socket.ping();
  }, intervalMs);
  timer.unref();
  socket.once('close', () => clearInterval(timer));
}

/**
 * The plugin served as a WebSocket at any path: the dispatcher dials in. `listen` binds it;
 * `close` stops it without losing a call (goaway on each connection, see `Session.goAway`).
 */
/**
 * Connections a `WebSocketPluginServer` serves at once, as `dispatcher-plugin serve` holds its
 * HTTP ones: past them an upgrade is refused 503 (`overloaded`, `Retry-After: 1`) before it
 * upgrades, and a dispatcher dials again. Each holds a session, its buffers and a descriptor.
 */
export const MAX_CONNECTIONS = 1000;
/**
 * Connections that have not sent a whole head yet, at once: past it the oldest of them
 * closes to make room. Closing the oldest, not the newest, keeps the server reachable during
 * a flood: a dispatcher's head follows its connection within a round trip, long before a
 * hundred newer ones push it out, while idle sockets are pushed out by the flood itself.
 */
export const MAX_WAITING_CONNECTIONS = 100;
/** Milliseconds from a connection's opening to its whole head, as `dispatcher-plugin serve`'s --header-timeout. */
export const HEADER_TIMEOUT_MS = 10_000;

/** What an upgrade or a request without the token is answered, quoting nothing sent. */
const UNAUTHORIZED = { type: 'unauthorized', message: 'missing or wrong bearer token', retryable: false };

export interface WebSocketServerOptions {
  /** Connections served at once (`MAX_CONNECTIONS`). */
  maxConnections?: number;
}

export class WebSocketPluginServer {
  private readonly server: http.Server;
  /**
   * permessage-deflate accepted when the dispatcher offers it (a target with `compress: true`),
   * declined when it does not: the manifest decides. `ws` inflates a message up to
   * `maxPayload` only and closes 1009 past it, as for a plain one: no bomb.
   */
  private readonly sockets = new WebSocketServer({ noServer: true, maxPayload: MAX_MESSAGE_BYTES, perMessageDeflate: true });
  private readonly sessions = new Set<Session>();
  private closing = false;
  private readonly maxConnections: number;
  /** Sockets upgraded or upgrading now, counted until each closes. */
  private connections = 0;
  private refused = 0;
  /** Connections not past their head yet, oldest first (a Set keeps the order). */
  private readonly waiting = new Set<Duplex>();
  private pushedOut = 0;

  constructor(
    private readonly plugin: Plugin,
    private readonly token: BearerToken | undefined,
    /** Each call and stream runs in a span (tracing.ts); undefined: untraced. */
    private readonly tracing?: Tracing,
    options: WebSocketServerOptions = {},
  ) {
    this.maxConnections = options.maxConnections ?? MAX_CONNECTIONS;
    if (!Number.isInteger(this.maxConnections) || this.maxConnections < 1) {
      throw new RangeError(`maxConnections must be a whole number of at least 1, not ${this.maxConnections}`);
    }
    this.server = http.createServer(
      // A head must be complete within HEADER_TIMEOUT_MS of the connection's opening (Node
      // times it from there; by default 60 s, checked every 30 s).
      { headersTimeout: HEADER_TIMEOUT_MS, requestTimeout: 2 * HEADER_TIMEOUT_MS, connectionsCheckingInterval: 1000 },
      (request, response) => this.notUpgraded(request, response),
    );
    this.server.on('connection', (socket: Duplex) => this.opened(socket));
    this.server.on('upgrade', (request, socket, head) => {
      this.waiting.delete(socket);
      this.upgrade(request, socket, head);
    });
    plugin.keepAtMost(MAX_BUFFERED_EVENTS);
  }

  /** Listen at `address` (host:port); resolves to the bound address. A mistyped address or a failed listen rejects with a `ListenError` (listen.ts). */
  async listen(address: string): Promise<string> {
    const where = parseListenAddress(address);
    const port = await listen(this.server, where);
    return formatListenAddress({ host: where.host, port });
  }

  /**
   * Stop: take no new connection (a host redialling is refused), say `goaway` on each open
   * one and let the host finish its calls there, `graceMs` at most. Resolves once all closed.
   */
  async close(graceMs = GOAWAY_GRACE): Promise<void> {
    this.closing = true;
    this.server.close();
    await Promise.all([...this.sessions].map((session) => session.goAway(graceMs)));
  }

  /** A connection opened: it waits for its head, and the oldest waiting closes past the most. */
  private opened(socket: Duplex): void {
    this.waiting.add(socket);
    socket.once('close', () => this.waiting.delete(socket));
    if (this.waiting.size > MAX_WAITING_CONNECTIONS) {
      const oldest = this.waiting.values().next().value as Duplex;
      this.waiting.delete(oldest);
      this.pushedOut += 1;
      oldest.destroy();
    }
  }

  /** Whether the request carries the token, when one is set. */
  private admits(request: http.IncomingMessage): boolean {
    return this.token === undefined || this.token.admitsHeaders(request.headersDistinct.authorization);
  }

  /**
   * A request that asks for no upgrade: 401 without the token (a peer without it learns
   * nothing else, as in every SDK), else 426. Either way the connection ends with the answer:
   * kept alive, it could wait for another head, uncounted.
   */
  private notUpgraded(request: http.IncomingMessage, response: http.ServerResponse): void {
    this.waiting.delete(request.socket);
    const [status, headers, error] = this.admits(request)
      ? [426, { Upgrade: 'websocket' }, toWireError(new InvalidParams('this plugin speaks WebSocket: send an upgrade'))]
      : [401, { 'WWW-Authenticate': 'Bearer' }, UNAUTHORIZED];
    const body = encodeJson({ ok: false, error });
    response.writeHead(status, { ...headers, 'Content-Type': 'application/json', 'Content-Length': body.length, Connection: 'close' });
    response.end(body);
  }

  private upgrade(request: http.IncomingMessage, socket: Duplex, head: Buffer): void {
    // The token first: a peer without it learns nothing else, not even that the plugin stops.
    if (!this.admits(request)) {
      const body = encodeJson({ ok: false, error: UNAUTHORIZED });
      socket.end(
        'HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer\r\nContent-Type: application/json\r\n' +
          `Content-Length: ${body.length}\r\nConnection: close\r\n\r\n${body.toString()}`,
      );
      return;
    }
    // An upgrade on a connection accepted before `close`: the listener is closed already.
    // (handleUpgrade hands over the socket at once: none is upgraded after this check.)
    if (this.closing) {
      socket.end('HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n');
      return;
    }
    if (this.connections >= this.maxConnections) {
      this.refuseOverCap(socket);
      return;
    }
    this.connections += 1;
    socket.once('close', () => (this.connections -= 1));
    this.sockets.handleUpgrade(request, socket, head, (ws) => {
      keepAlive(ws, 10_000);
      // The dispatcher's read cap: no frame over it is sent.
      const announced = capOfHeader(request.headersDistinct[MAX_MESSAGE_BYTES_HEADER.toLowerCase()]);
      const session = new Session(this.plugin, ws, this.tracing, announced);
      this.sessions.add(session);
      void session.run().then(() => this.sessions.delete(session));
    });
  }

  private refuseOverCap(socket: Duplex): void {
    this.refused += 1;
    if (this.refused === 1) {
      // Once: a flood would otherwise write a line per upgrade.
      log.warn(`serving ${this.maxConnections} WebSocket connections, the most it takes; refusing more with 503 until one closes`);
    }
    const message = `this plugin holds as many WebSocket connections as it takes (${this.maxConnections}): dial again shortly`;
    const body = encodeJson({ ok: false, error: { type: 'overloaded', message, retryable: true, retry_after: 1 } });
    socket.end(
      'HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n' +
        `Content-Length: ${body.length}\r\nConnection: close\r\n\r\n${body.toString()}`,
    );
  }

  toString(): string {
    return (
      `WebSocketPluginServer(${this.plugin.id}, connections ${this.connections}/${this.maxConnections}, refused ${this.refused},` +
      ` waiting ${this.waiting.size}/${MAX_WAITING_CONNECTIONS}, pushed out ${this.pushedOut})`
    );
  }
}

/**
 * Serve `plugin` at `address` (host:port) until the process stops; resolves to the bound
 * address. A mistyped address or a failed listen rejects with a `ListenError` (listen.ts).
 * `WebSocketPluginServer` is the same with a graceful `close`.
 */
export async function serveWebSocket(plugin: Plugin, address: string, token: BearerToken | undefined, tracing?: Tracing): Promise<string> {
  return new WebSocketPluginServer(plugin, token, tracing).listen(address);
}

export interface DialOptions {
  token?: string;
  initialBackoffMs?: number;
  maxBackoffMs?: number;
  heartbeatMs?: number;
  /** Aborted: the plugin stops; no redial, and the connection winds down (`Session.goAway`). */
  signal?: AbortSignal;
  /** How long a stop waits for the gateway to close the connection (`GOAWAY_GRACE`). */
  graceMs?: number;
  /** Each call and stream runs in a span (tracing.ts); undefined: untraced. */
  tracing?: Tracing;
  /** A `wss://` gateway's roots and the client certificate to present (connecttls.ts); undefined: Node's roots, none. */
  tls?: ClientTls;
}

/** The most of a peer's close reason shown, once escaped: a reason is at most 123 bytes,
 * which escaping may make four times longer. */
const SHOWN_REASON_CHARS = 200;

/** A close reason the peer sent, as an error or a log line may show it (`shown`). */
function shownCloseReason(reason: string): string {
  return shown(reason, SHOWN_REASON_CHARS);
}

/**
 * What an `error` frame's `error` says, for the log: its `message`, an error given as a bare
 * string, or else its JSON text (for `shownCloseReason` to make safe to show).
 */
export function errorText(error: unknown): string {
  const said = isObject(error) ? error.message : error;
  if (typeof said === 'string') return said;
  return encodeJson(error ?? null).toString('utf8');
}

/**
 * The gateway refused the plugin; dialling again would get the same answer. `status` is the
 * HTTP status of a refused upgrade (400, 401, 403, 404), or the close code 4403 of a connection
 * closed on the plugin's hello, with the gateway's `reason`.
 */
export class Refused extends Error {
  constructor(readonly status: number, readonly reason = '') {
    super(`the gateway refused the connection (${status})${reason === '' ? '' : `: ${reason}`}`);
  }
}

/**
 * Reverse mode: dial `url` as the plugin and serve calls, reconnecting, until refused
 * (rejects with `Refused`) or `options.signal` aborts (resolves once the connection closed).
 */
export async function dial(plugin: Plugin, url: string, options: DialOptions = {}): Promise<void> {
  const headers: Record<string, string> = { 'X-Plugin-Id': plugin.id, 'X-Plugin-Version': plugin.version };
  if (options.token !== undefined) headers.Authorization = `Bearer ${options.token}`;
  plugin.keepAtMost(MAX_BUFFERED_EVENTS);
  // A fragment is never sent, and `ws` throws on one (a stack trace, not a dial); the
  // other SDKs leave it out too.
  const target = url.split('#', 1)[0] as string;
  const initial = options.initialBackoffMs ?? 100;
  let backoff = initial;
  while (options.signal?.aborted !== true) {
    const outcome = await connection(plugin, target, headers, options);
    if (outcome instanceof Refused) throw outcome;
    if (outcome instanceof Unreachable && !stopped(options)) {
      // Masked: a token in the URL's userinfo or query is not for the log.
      log.info(`cannot reach the gateway at ${maskedUrl(target)}: ${outcome.why}; retrying`);
    }
    // Reset only once the gateway welcomed this plugin: one that closes every
    // connection at once was otherwise redialled 20 times a second.
    if (outcome === 'welcomed') backoff = initial;
    // Full jitter: a gateway coming back is not hit by every plugin at once.
    await sleep(Math.random() * backoff, undefined, { signal: options.signal }).catch(() => undefined);
    backoff = Math.min(backoff * 2, options.maxBackoffMs ?? 10_000);
  }
}

/** Whether the dial was told to stop (a dial it gave up on failed for that reason). */
function stopped(options: DialOptions): boolean {
  return options.signal?.aborted === true;
}

/** A dial that did not open a connection, and why (text that quotes no URL). */
class Unreachable {
  constructor(readonly why: string) {}
}

/**
 * One connection to the gateway, served until it closes ('welcomed' or 'closed'), or
 * `Unreachable` if it did not open. Aborting `options.signal` winds it down: `goaway` once
 * open, else the dial is given up.
 */
function connection(plugin: Plugin, url: string, headers: Record<string, string>, options: DialOptions): Promise<'welcomed' | 'closed' | Unreachable | Refused> {
  return new Promise((resolve) => {
    // permessage-deflate offered on every dial, the gateway deciding: it accepts only where
    // the plugin's inbound target says `compress: true`, so the manifest is the one place
    // that says, as it is for a plugin the dispatcher dials; declined, the offer costs a
    // header. Inflated up to maxPayload only (1009 past it): no bomb.
    const socket = new WebSocket(url, { headers, maxPayload: MAX_MESSAGE_BYTES, perMessageDeflate: true, ...options.tls });
    let session: Session | undefined;
    const stop = (): void => {
      if (session === undefined) socket.terminate();
      else void session.goAway(options.graceMs);
    };
    options.signal?.addEventListener('abort', stop, { once: true });
    const done = (outcome: 'welcomed' | 'closed' | Unreachable | Refused): void => {
      options.signal?.removeEventListener('abort', stop);
      resolve(outcome);
    };
    socket.once('unexpected-response', (_, response) => {
      const status = response.statusCode ?? 0;
      socket.terminate();
      done([400, 401, 403, 404].includes(status) ? new Refused(status) : new Unreachable(`the gateway answered ${status}`));
    });
    // Once open, an error ends in 'close' too: the session ends there (a stop still drains).
    // Before, the error is the request's (`connect ECONNREFUSED 127.0.0.1:1`) or the
    // handshake's, whose text names no more of the URL than its host.
    // The gateway's alert about this plugin's certificate is said in words: its message
    // is OpenSSL's error line, with its source file and a line break.
    socket.once('error', (error: Error) => {
      if (session === undefined) done(new Unreachable(alertRefusal(error) ?? shown(error.message, SHOWN_REASON_CHARS)));
    });
    // The gateway's read cap, on its 101 response ('upgrade' comes before 'open'): what the
    // plugin sends before the welcome (the kept events flushed after the hello, the answers
    // of calls sent before welcoming) is held to it, or the gateway would close (1009).
    let upgradeCap: number | undefined;
    socket.once('upgrade', (response: http.IncomingMessage) => {
      upgradeCap = capOfHeader(response.headersDistinct[MAX_MESSAGE_BYTES_HEADER.toLowerCase()]);
    });
    let refusal: Refused | undefined;
    socket.once('close', (code: number, reason: Buffer) => {
      // The hello names another plugin than the upgrade admitted: the next connection
      // would send the same hello and get the same close.
      if (code === CLOSE_WRONG_PLUGIN) refusal = new Refused(code, shownCloseReason(reason.toString('utf8')));
    });
    socket.once('open', () => {
      keepAlive(socket, options.heartbeatMs ?? 10_000);
      const opened = new Session(plugin, socket, options.tracing, upgradeCap);
      session = opened;
      void opened.run().then(() => done(refusal ?? (opened.welcomed ? 'welcomed' : 'closed')));
    });
  });
}
