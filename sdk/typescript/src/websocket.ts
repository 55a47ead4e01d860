/**
 * The plugin over WebSocket (docs/protocol.md, "WebSocket binding"), with the `ws` package:
 *
 * - `serveWebSocket(plugin, address, token)`: the dispatcher dials in (`provider: websocket`,
 *   `url: ws://…`); prints `1|1|tcp|ADDR|websocket|` once listening.
 * - `dial(plugin, url, options)`: reverse mode; the plugin dials the gateway's
 *   `/v1/plugins/connect` and takes calls over that connection, reconnecting after a drop
 *   with exponential backoff and full jitter. A 401/403/404 at the upgrade is not retried.
 *
 * One `Session` serves one connection either way: `hello` first, then each `call`/`stream`
 * frame runs with its own AbortController (deadline from `context.deadline_ms`, `cancel`
 * frames abort it), streams honour the host's `credit` (a window of 256 chunks), `health`
 * is answered, host `event`s reach `plugin.on` handlers and the plugin's events go out.
 * Events emitted while no host is connected wait in the plugin's own bounded buffer.
 */
import * as http from 'node:http';
import { WebSocket, WebSocketServer, type RawData } from 'ws';
import type { BearerToken } from './auth';
import { DeadlineExceeded, InvalidParams, ProviderError, toWireError } from './errors';
import { formatListenAddress, listen, parseListenAddress } from './listen';
import { isObject, type JsonObject } from './params';
import type { CallContext, Plugin } from './plugin';
import { decodeJson, encodeJson } from './server';

export const STREAM_WINDOW = 256;
export const MAX_MESSAGE_BYTES = 8 * 1024 * 1024;
const PROTOCOL_VERSION = 1;

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

  constructor(
    private readonly plugin: Plugin,
    private readonly socket: WebSocket,
  ) {}

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
    });
    this.unsubscribe = plugin.addEventSink((name, data) => this.send({ type: 'event', event: name, data }));
    this.socket.on('message', (data: RawData) => this.received(data));
    return new Promise((resolve) => {
      this.socket.once('close', () => {
        this.unsubscribe();
        for (const controller of this.calls.values()) controller.abort(new DeadlineExceeded('the connection closed'));
        this.calls.clear();
        resolve();
      });
    });
  }

  private send(frame: JsonObject): void {
    if (this.socket.readyState === WebSocket.OPEN) this.socket.send(encodeJson(frame), { binary: false });
  }

  private received(data: RawData): void {
    let frame: Frame;
    try {
      const parsed = decodeJson(Buffer.isBuffer(data) ? data : Buffer.from(data as ArrayBuffer), 'a frame');
      if (!isObject(parsed) || typeof parsed.type !== 'string') throw new InvalidParams('a frame is an object with a type');
      frame = parsed as Frame;
    } catch (error) {
      this.send({ type: 'error', error: toWireError(new ProviderError(String((error as Error).message))) });
      return;
    }
    const id = typeof frame.id === 'number' && Number.isSafeInteger(frame.id) ? frame.id : undefined;
    switch (frame.type) {
      case 'call':
      case 'stream':
        if (id === undefined || this.calls.has(id)) {
          this.send({ type: 'error', error: toWireError(new ProviderError(`${frame.type} needs a new integer id`)) });
          return;
        }
        void this.runCall(frame.type, id, frame.request);
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
          this.plugin.deliverHostEvent(frame.event, frame.data ?? null).catch((error: unknown) => {
            process.stderr.write(`linchkit plugin: handler of ${frame.event} failed: ${String(error)}\n`);
          });
        }
        return;
      case 'dropped':
      case 'welcome':
        return;
      default:
        this.send({ type: 'error', id: id ?? null, error: toWireError(new ProviderError(`unknown frame type ${frame.type.slice(0, 40)}`)) });
    }
  }

  private async runCall(kind: string, id: number, request: unknown): Promise<void> {
    const controller = new AbortController();
    this.calls.set(id, controller);
    let timer: NodeJS.Timeout | undefined;
    try {
      if (!isObject(request) || request.v !== PROTOCOL_VERSION) {
        throw new ProviderError(`unsupported envelope; this plugin speaks v${PROTOCOL_VERSION}`);
      }
      const method = request.method;
      if (typeof method !== 'string' || method === '') throw new ProviderError('the request names no method');
      const context = isObject(request.context) ? request.context : {};
      const left = typeof context.deadline_ms === 'number' ? context.deadline_ms : undefined;
      const deadline = left === undefined ? undefined : Date.now() + left;
      if (left !== undefined) {
        timer = setTimeout(() => controller.abort(new DeadlineExceeded(`${method} did not finish before its deadline`)), left);
      }
      const over = new Promise<never>((_, reject) => {
        controller.signal.addEventListener('abort', () => reject(controller.signal.reason), { once: true });
      });
      over.catch(() => undefined);
      const ctx = callContext(method, context, deadline, controller.signal);
      if (kind === 'call') {
        const result = await Promise.race([this.plugin.invoke(method, request.params ?? null, ctx), over]);
        this.send({ type: 'response', id, response: { ok: true, result: result === undefined ? null : result } });
      } else {
        const window = new Window();
        this.windows.set(id, window);
        try {
          const chunks = this.plugin.invokeStream(method, request.params ?? null, ctx);
          for (;;) {
            const next = await Promise.race([chunks.next(), over]);
            if (next.done) break;
            await window.take(controller.signal);
            this.send({ type: 'chunk', id, data: next.value === undefined ? null : next.value });
          }
        } finally {
          this.windows.delete(id);
        }
        this.send({ type: 'response', id, response: { ok: true, result: null } });
      }
    } catch (error) {
      if (this.socket.readyState === WebSocket.OPEN && !(controller.signal.aborted && isCancel(controller.signal.reason))) {
        this.send({ type: 'response', id, response: { ok: false, error: toWireError(error) } });
      }
    } finally {
      if (timer !== undefined) clearTimeout(timer);
      this.calls.delete(id);
    }
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
 * Serve `plugin` at `address` (host:port) until the process stops; resolves to the bound
 * address. A mistyped address or a failed listen rejects with a `ListenError` (listen.ts).
 */
export async function serveWebSocket(plugin: Plugin, address: string, token: BearerToken | undefined): Promise<string> {
  const server = http.createServer((_, response) => {
    response.writeHead(426, { 'Content-Type': 'application/json' });
    response.end(encodeJson({ ok: false, error: toWireError(new InvalidParams('this plugin speaks WebSocket: send an upgrade')) }));
  });
  const sockets = new WebSocketServer({ noServer: true, maxPayload: MAX_MESSAGE_BYTES });
  server.on('upgrade', (request, socket, head) => {
    if (token !== undefined && !token.admits(request.headers.authorization)) {
      socket.end('HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer\r\nContent-Length: 0\r\nConnection: close\r\n\r\n');
      return;
    }
    sockets.handleUpgrade(request, socket, head, (ws) => {
      keepAlive(ws, 10_000);
      void new Session(plugin, ws).run();
    });
  });
  const where = parseListenAddress(address);
  const port = await listen(server, where);
  return formatListenAddress({ host: where.host, port });
}

export interface DialOptions {
  token?: string;
  initialBackoffMs?: number;
  maxBackoffMs?: number;
  heartbeatMs?: number;
}

export class Refused extends Error {
  constructor(readonly status: number) {
    super(`the gateway refused the connection (${status})`);
  }
}

/** Reverse mode: dial `url` as the plugin and serve calls, reconnecting, until refused. */
export async function dial(plugin: Plugin, url: string, options: DialOptions = {}): Promise<never> {
  const headers: Record<string, string> = { 'X-Plugin-Id': plugin.id, 'X-Plugin-Version': plugin.version };
  if (options.token !== undefined) headers.Authorization = `Bearer ${options.token}`;
  const initial = options.initialBackoffMs ?? 100;
  let backoff = initial;
  for (;;) {
    const outcome = await new Promise<'closed' | 'failed' | Refused>((resolve) => {
      const socket = new WebSocket(url, { headers, maxPayload: MAX_MESSAGE_BYTES });
      socket.once('unexpected-response', (_, response) => {
        const status = response.statusCode ?? 0;
        socket.terminate();
        resolve([401, 403, 404].includes(status) ? new Refused(status) : 'failed');
      });
      socket.once('error', () => resolve('failed'));
      socket.once('open', () => {
        backoff = initial;
        keepAlive(socket, options.heartbeatMs ?? 10_000);
        void new Session(plugin, socket).run().then(() => resolve('closed'));
      });
    });
    if (outcome instanceof Refused) throw outcome;
    // Full jitter: a gateway coming back is not hit by every plugin at once.
    await new Promise((resolve) => setTimeout(resolve, Math.random() * backoff));
    backoff = Math.min(backoff * 2, options.maxBackoffMs ?? 10_000);
  }
}
