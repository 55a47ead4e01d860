/**
 * What a plugin author writes against: register methods, lifecycle hooks and event
 * handlers on a `Plugin`, then `serve(plugin)`. Nothing here knows about gRPC; the
 * binding lives in server.ts.
 *
 *     const plugin = new Plugin({ id: 'shop', version: '1.2.0' });
 *     plugin.method('price', async (params, ctx) => ({ cents: 120 }));
 *     plugin.streamingMethod('rows', async function* (params, ctx) { yield { row: 1 }; });
 *     plugin.onInit((config) => { ... });
 *     plugin.on('ping', (data) => plugin.emit('pong', data));
 *     serve(plugin);
 */
import { DeadlineExceeded, MethodNotFound, type ProviderError } from './errors';
import { LateAnswers } from './lateanswers';
import { log, shown } from './log';
import type { JsonObject } from './params';
import { jsonText, shownName } from './wirejson';

/** What a method knows about the call it is serving. */
export interface CallContext {
  readonly method: string;
  readonly requestId: string;
  readonly caller: string;
  readonly traceparent: string;
  readonly idempotencyKey: string;
  /** Epoch milliseconds after which the host has given up; undefined for none. */
  readonly deadline: number | undefined;
  /** Aborted when the deadline passes or the host cancels the call. */
  readonly signal: AbortSignal;
  /** Milliseconds left before the deadline; undefined for none. */
  remainingMs(): number | undefined;
  /** Sleep `ms`, or reject with `DeadlineExceeded` (or the cancellation) as soon as the call is over. */
  sleep(ms: number): Promise<void>;
}

export type UnaryMethod = (params: unknown, ctx: CallContext) => unknown;
export type StreamingMethod = (params: unknown, ctx: CallContext) => AsyncIterable<unknown> | Iterable<unknown>;
export type LifecycleHook = (config: JsonObject) => void | Promise<void>;
export type EventHandler = (data: unknown, name: string) => void | Promise<void>;
/** Where an event goes: its name and its data, already JSON (`emit` encodes it once for every host). */
export type EventSink = (name: string, dataJson: string) => void;

export interface MethodOptions {
  description?: string;
}

export interface MethodInfo {
  name: string;
  streaming: boolean;
  description: string;
}

type Registered =
  | { streaming: false; handler: UnaryMethod; description: string }
  | { streaming: true; handler: StreamingMethod; description: string };

type Phase = 'init' | 'start' | 'stop' | 'destroy';

/**
 * Events emitted while no host listens are kept, up to this many, for the first listener
 * (the WebSocket modes keep fewer: `keepAtMost`).
 */
const PENDING_EVENTS_LIMIT = 1024;

export interface PluginOptions {
  id: string;
  version: string;
  /** The language, as Describe reports it. */
  runtime?: string;
}

export class Plugin {
  readonly id: string;
  readonly version: string;
  readonly runtime: string;
  /** The JSON object the host passed to Init ({} before that). */
  config: JsonObject = {};

  private readonly methods = new Map<string, Registered>();
  private readonly hooks: Record<Phase, LifecycleHook[]> = { init: [], start: [], stop: [], destroy: [] };
  private readonly done = new Set<Phase>();
  private readonly eventHandlers = new Map<string, EventHandler[]>();
  private readonly sinks = new Set<EventSink>();
  private pending: Array<[string, string]> = [];
  private pendingLimit = PENDING_EVENTS_LIMIT;
  /** Events dropped from `pending` (the oldest, past its bound) since a listener last took it. */
  private lost = 0;
  /**
   * @internal Methods that answered long after their deadline, said once a minute each
   * whichever transport served them (every binding checks its answers here).
   */
  readonly lateAnswers = new LateAnswers();

  constructor(options: PluginOptions) {
    this.id = options.id;
    this.version = options.version;
    this.runtime = options.runtime ?? 'typescript';
  }

  method(name: string, handler: UnaryMethod, options: MethodOptions = {}): this {
    this.register(name, { streaming: false, handler, description: options.description ?? '' });
    return this;
  }

  /** A method answered chunk by chunk on CallStream; a unary Call gets the list of chunks. */
  streamingMethod(name: string, handler: StreamingMethod, options: MethodOptions = {}): this {
    this.register(name, { streaming: true, handler, description: options.description ?? '' });
    return this;
  }

  private register(name: string, entry: Registered): void {
    if (this.methods.has(name)) throw new Error(`method ${JSON.stringify(name)} is registered twice`);
    this.methods.set(name, entry);
  }

  onInit(hook: LifecycleHook): this {
    this.hooks.init.push(hook);
    return this;
  }
  onStart(hook: () => void | Promise<void>): this {
    this.hooks.start.push(hook);
    return this;
  }
  onStop(hook: () => void | Promise<void>): this {
    this.hooks.stop.push(hook);
    return this;
  }
  onDestroy(hook: () => void | Promise<void>): this {
    this.hooks.destroy.push(hook);
    return this;
  }

  /** Handle host events named `name` ('*' for every event). */
  on(name: string, handler: EventHandler): this {
    const handlers = this.eventHandlers.get(name) ?? [];
    handlers.push(handler);
    this.eventHandlers.set(name, handlers);
    return this;
  }

  /**
   * Send event `name` with JSON `data` to the host's handlers. Data JSON cannot carry (a NaN,
   * an infinity, a string that is not valid Unicode) is not sent, to any host, and said on
   * stderr at WARN.
   */
  emit(name: string, data: unknown = null): void {
    const dataJson = eventJson(name, data);
    if (dataJson === undefined) return;
    if (this.sinks.size === 0) {
      if (this.pending.length >= this.pendingLimit) {
        this.pending.shift();
        this.lost += 1;
      }
      this.pending.push([name, dataJson]);
      return;
    }
    for (const sink of this.sinks) sink(name, dataJson);
  }

  describe(): MethodInfo[] {
    return [...this.methods].map(([name, entry]) => ({ name, streaming: entry.streaming, description: entry.description }));
  }

  get started(): boolean {
    return this.done.has('start') && !this.done.has('stop');
  }

  // ---- used by the server binding -------------------------------------------------

  /**
   * @internal Where emitted events go: first those that waited for a listener, then `lost`
   * with the count dropped from them (if any: a WebSocket session's `dropped` frame), then
   * each as it is emitted. Returns the unsubscribe function.
   */
  addEventSink(sink: EventSink, lost?: (count: number) => void): () => void {
    this.sinks.add(sink);
    const pending = this.pending;
    const dropped = this.lost;
    this.pending = [];
    this.lost = 0;
    for (const [name, dataJson] of pending) sink(name, dataJson);
    if (dropped > 0) lost?.(dropped);
    return () => this.sinks.delete(sink);
  }

  /**
   * @internal Keep at most `limit` events while no host listens, dropping (and counting) the
   * oldest past it: the WebSocket modes' bound, as every SDK's.
   */
  keepAtMost(limit: number): void {
    this.pendingLimit = limit;
    const over = this.pending.length - limit;
    if (over > 0) {
      this.pending.splice(0, over);
      this.lost += over;
    }
  }

  /** @internal A host event reaching the plugin. */
  async deliverHostEvent(name: string, data: unknown): Promise<void> {
    const handlers = [...(this.eventHandlers.get(name) ?? []), ...(this.eventHandlers.get('*') ?? [])];
    for (const handler of handlers) await handler(data, name);
  }

  /**
   * @internal Run a lifecycle phase's hooks. Init's run at every Init (the last config is the
   * one held: hosts sharing a service each send theirs) and, after a stop or destroy, begin
   * the lifecycle anew; start, stop and destroy run once per lifecycle.
   */
  async runPhase(phase: Phase, config?: JsonObject): Promise<void> {
    if (phase === 'init') {
      if (this.done.has('stop') || this.done.has('destroy')) this.done.clear();
    } else if (this.done.has(phase)) {
      return;
    }
    this.done.add(phase);
    if (phase === 'init') this.config = config ?? {};
    try {
      for (const hook of this.hooks[phase]) await hook(this.config);
    } catch (error) {
      // A start that failed started nothing: the next Start runs its hooks again, as in every
      // SDK, rather than answer OK for a plugin that never started.
      if (phase === 'start') this.done.delete('start');
      throw error;
    }
  }

  /**
   * @internal Stop then destroy, both even if one fails, when the host did not. `starting`
   * hears the name of each hook as it begins: a stop that gives up on a hook still running
   * names it.
   */
  async close(starting: (phase: 'stop' | 'destroy') => void = () => undefined): Promise<void> {
    try {
      if (this.done.has('start')) {
        starting('stop');
        await this.runPhase('stop');
      }
    } finally {
      starting('destroy');
      await this.runPhase('destroy');
    }
  }

  /** @internal */
  lookup(name: string): Registered {
    const entry = this.methods.get(name);
    if (entry === undefined) {
      const known = [...this.methods.keys()].sort().join(', ') || 'none';
      throw new MethodNotFound(`plugin ${this.id} has no method ${shownName(name)}; it has: ${known}`);
    }
    return entry;
  }

  /** @internal One unary answer: a streaming method's chunks are gathered into a list. */
  async invoke(name: string, params: unknown, ctx: CallContext): Promise<unknown> {
    const entry = this.lookup(name);
    if (!entry.streaming) return await entry.handler(params, ctx);
    const chunks: unknown[] = [];
    for await (const chunk of entry.handler(params, ctx)) {
      throwIfAborted(ctx.signal);
      chunks.push(chunk);
    }
    return chunks;
  }

  /** @internal The chunks of a call: a unary method's result is its one chunk. */
  async *invokeStream(name: string, params: unknown, ctx: CallContext): AsyncGenerator<unknown> {
    const entry = this.lookup(name);
    if (!entry.streaming) {
      yield await entry.handler(params, ctx);
      return;
    }
    yield* entry.handler(params, ctx);
  }
}

/**
 * The event's data as JSON, or undefined (said at WARN) when JSON cannot carry it. Encoded
 * here, once: a sink that threw on it would stop the others, and the replay of the events
 * that waited for a host.
 */
function eventJson(name: string, data: unknown): string | undefined {
  const quoted = `'${shown(name, 64)}'`;
  if (!name.isWellFormed()) {
    // No UTF-8 form: over gRPC protobufjs wrote bytes the host cannot read, which ended its
    // whole Events stream; over WebSocket the frame was refused.
    log.warn(`event ${quoted} not sent: its name is not valid Unicode (a lone surrogate)`);
    return undefined;
  }
  try {
    return jsonText(data, `the data of event ${quoted}`);
  } catch (error) {
    log.warn(`event ${quoted} not sent: ${(error as ProviderError).message}`);
    return undefined;
  }
}

function throwIfAborted(signal: AbortSignal): void {
  if (signal.aborted) throw signal.reason ?? new DeadlineExceeded('the call is over');
}
