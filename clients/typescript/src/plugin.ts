/**
 * A remote plugin seen through the gateway, in the shape host code already uses for a
 * local one (the RemotePluginService of the seed): lifecycle, health, calls, events.
 *
 *     created ─init()→ initialized ─start()→ started ─stop()→ stopped ─start()→ started
 *        any state ─destroy()→ destroyed (final: calls and emits reject with ShuttingDown)
 *
 * The plugin itself runs wherever the manifest puts it; these steps are the host's side:
 * `init` checks the gateway serves it, `start` opens the event stream (when someone
 * listens), `stop` closes it and waits for the calls in flight.
 */

import { MethodNotFound, PluginNotFound, ShuttingDown } from './errors';
import { EventStream } from './events';
import type { EventStreamOptions, Gap, PluginEvent, ResumePoint } from './events';
import type { CallOptions, MethodInfo, PluginInfo, Readiness } from './types';

/**
 * What a RemotePlugin needs of its gateway's client: GatewayClient is one. A seam, so that
 * the client (which makes remote plugins) and the plugin (which calls through the client)
 * do not import each other.
 */
export interface PluginGateway {
  readonly url: string;
  readonly eventOptions: EventStreamOptions;
  call<T = unknown>(plugin: string, method: string, params?: unknown, options?: CallOptions): Promise<T>;
  listPlugins(options?: { timeoutMs?: number; signal?: AbortSignal }): Promise<PluginInfo[]>;
  readiness(options?: { timeoutMs?: number; signal?: AbortSignal }): Promise<Readiness>;
  /** Asked anew at every connect of the event stream (a provider may renew a token). */
  credentialHeaders(): Promise<Record<string, string>>;
  /** Whether credentialHeaders may answer differently next time (a credential is a function). */
  readonly credentialsChange: boolean;
}

export type EventHandler = (data: unknown, event: PluginEvent) => void | Promise<void>;
export type GapHandler = (gap: Gap) => void;
/** A handler's failure, or the stream's (a refused upgrade, an error frame). */
export type ErrorHandler = (error: unknown, event?: PluginEvent) => void;

export interface HealthStatus {
  status: 'healthy' | 'unhealthy';
  latencyMs: number;
  detail: string;
}

/** What host code needs of a plugin, local or remote. */
export interface RemotePluginService {
  init(): Promise<void>;
  start(): Promise<void>;
  stop(): Promise<void>;
  destroy(): Promise<void>;
  healthCheck(): Promise<HealthStatus>;
  call<T = unknown>(method: string, params?: unknown, options?: CallOptions): Promise<T>;
  on(event: string, handler: EventHandler): void;
  emit(event: string, data?: unknown): Promise<void>;
}

export type PluginState = 'created' | 'initialized' | 'started' | 'stopped' | 'destroyed';

/** Every event of the plugin, whatever its name. */
export const ANY_EVENT = '*';

/**
 * An exact version (semver, as the manifest's), not a range such as `^1.2` or `1.x`: only
 * a plugin pinned to one has its events filtered by version.
 */
const EXACT_VERSION = /^\d+\.\d+\.\d+(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?$/;

export class RemotePlugin implements RemotePluginService {
  readonly id: string;
  readonly version: string | undefined;
  readonly #client: PluginGateway;
  #state: PluginState = 'created';
  #info: PluginInfo | undefined;
  #stream: EventStream | undefined;
  readonly #handlers = new Map<string, Set<EventHandler>>();
  readonly #gapHandlers = new Set<GapHandler>();
  readonly #errorHandlers = new Set<ErrorHandler>();
  readonly #inFlight = new Set<Promise<unknown>>();

  /** Where the next event stream resumes: given at creation, then the last stream's. */
  #resume: ResumePoint | undefined;

  constructor(client: PluginGateway, id: string, version?: string, resumeFrom?: ResumePoint) {
    this.#client = client;
    this.id = id;
    this.version = version;
    this.#resume = resumeFrom;
  }

  get state(): PluginState {
    return this.#state;
  }

  /** The methods the gateway listed at `init` (undefined before). */
  get methods(): readonly MethodInfo[] | undefined {
    return this.#info?.methods;
  }

  /** The event stream while open (its state, for diagnostics). */
  get eventStream(): EventStream | undefined {
    return this.#stream;
  }

  /** The event stream's last event id: where a reconnect resumes. */
  get lastEventId(): number | undefined {
    return this.resumePoint?.lastEventId;
  }

  /**
   * The last event id handed on and the gateway's stream name: kept by a host that stops,
   * given to `client.plugin(id, {resumeFrom})` by the one that takes over, so the gateway
   * replays what came between (or says `gap`, as at any resume).
   */
  get resumePoint(): ResumePoint | undefined {
    return this.#stream?.resumePoint ?? this.#resume;
  }

  /**
   * Check the gateway serves this plugin (and version), and `methods` when given; keeps
   * the method list. PluginNotFound or MethodNotFound otherwise.
   */
  async init(options: { methods?: string[] } = {}): Promise<void> {
    this.#alive();
    const plugins = await this.#client.listPlugins();
    const info = plugins.find(
      (plugin) => plugin.id === this.id && (this.version === undefined || plugin.version === this.version),
    );
    if (info === undefined) {
      const versions = plugins.filter((plugin) => plugin.id === this.id).map((plugin) => plugin.version);
      throw new PluginNotFound(
        versions.length === 0
          ? `the gateway at ${this.#client.url} serves no plugin ${this.id}`
          : `the gateway serves ${this.id} in ${versions.join(', ')}, not ${this.version}`,
      );
    }
    const names = new Set(info.methods.map((method) => method.name));
    const missing = (options.methods ?? []).filter((name) => !names.has(name));
    if (missing.length > 0) {
      throw new MethodNotFound(`${this.id} ${info.version} has no method ${missing.join(', ')} (it has ${[...names].join(', ')})`);
    }
    this.#info = info;
    if (this.#state === 'created') this.#state = 'initialized';
  }

  /**
   * Take calls (again, after a `stop`) and, if anyone listens, open the event stream:
   * resolves once the gateway confirmed the subscription, so every event from then on
   * reaches the handlers. Rejects with the gateway's refusal (Unauthorized, Forbidden) or
   * TargetUnavailable when it cannot be reached within `timeoutMs` (default: the
   * client's `events.emitTimeoutMs`); the plugin is then left stopped.
   */
  async start(options: { timeoutMs?: number } = {}): Promise<void> {
    this.#alive();
    this.#state = 'started';
    if (this.#handlers.size === 0) return;
    const stream = this.#events();
    stream.subscribe();
    try {
      await stream.whenSubscribed(options.timeoutMs);
    } catch (error) {
      await this.stop();
      throw error;
    }
  }

  /** Close the event stream, refuse new calls, and wait for the calls in flight. */
  async stop(): Promise<void> {
    if (this.#state === 'destroyed') return;
    this.#state = 'stopped';
    const stream = this.#stream;
    this.#stream = undefined;
    this.#resume = stream?.resumePoint ?? this.#resume;
    await Promise.all([stream?.close(), Promise.allSettled([...this.#inFlight])]);
  }

  /** Stop and forget every handler; later calls and emits reject with ShuttingDown. */
  async destroy(): Promise<void> {
    await this.stop();
    this.#state = 'destroyed';
    this.#handlers.clear();
    this.#gapHandlers.clear();
    this.#errorHandlers.clear();
  }

  /** The gateway ready (`/readyz`) and still serving this plugin; never throws. */
  async healthCheck(options: { timeoutMs?: number } = {}): Promise<HealthStatus> {
    const started = performance.now();
    const latency = (): number => Math.round((performance.now() - started) * 1000) / 1000;
    const timeoutMs = options.timeoutMs ?? 5000;
    try {
      const readiness = await this.#client.readiness({ timeoutMs });
      if (!readiness.ready) {
        return { status: 'unhealthy', latencyMs: latency(), detail: `the gateway is not ready: ${readiness.status}` };
      }
      const plugins = await this.#client.listPlugins({ timeoutMs });
      const listed = plugins.some(
        (plugin) => plugin.id === this.id && (this.version === undefined || plugin.version === this.version),
      );
      if (!listed) {
        return { status: 'unhealthy', latencyMs: latency(), detail: `the gateway no longer serves ${this.id}` };
      }
      return { status: 'healthy', latencyMs: latency(), detail: 'the gateway is ready and serves the plugin' };
    } catch (error) {
      const detail = error instanceof Error ? `${error.name}: ${error.message}` : String(error);
      return { status: 'unhealthy', latencyMs: latency(), detail };
    }
  }

  /** Call `method`; its result, or a DispatchError subclass (see errors.ts). */
  call<T = unknown>(method: string, params: unknown = {}, options: CallOptions = {}): Promise<T> {
    try {
      this.#takingCalls(`call ${method}`);
    } catch (error) {
      return Promise.reject(error);
    }
    const withVersion = this.version === undefined || options.version !== undefined ? options : { ...options, version: this.version };
    const call = this.#client.call<T>(this.id, method, params, withVersion);
    this.#inFlight.add(call);
    const forget = (): void => {
      this.#inFlight.delete(call);
    };
    call.then(forget, forget);
    return call;
  }

  /**
   * Handle event `event` of this plugin (`'*'`: every event). A handler that throws or
   * rejects is reported to `onError` and the stream goes on.
   */
  on(event: string, handler: EventHandler): void {
    this.#alive();
    let handlers = this.#handlers.get(event);
    if (handlers === undefined) this.#handlers.set(event, (handlers = new Set()));
    handlers.add(handler);
    if (this.#state === 'started') this.#events().subscribe();
  }

  off(event: string, handler: EventHandler): void {
    const handlers = this.#handlers.get(event);
    handlers?.delete(handler);
    if (handlers?.size === 0) this.#handlers.delete(event);
  }

  /** Told when the stream resumed after events the gateway no longer held. */
  onGap(handler: GapHandler): () => void {
    this.#gapHandlers.add(handler);
    return () => this.#gapHandlers.delete(handler);
  }

  /** Told of handler failures and stream problems (without one: a process warning). */
  onError(handler: ErrorHandler): () => void {
    this.#errorHandlers.add(handler);
    return () => this.#errorHandlers.delete(handler);
  }

  /**
   * Publish host event `event` to the plugin (every target it runs on); resolves once the
   * gateway acked it, rejects with its typed error or DeadlineExceeded after `timeoutMs`.
   */
  emit(event: string, data: unknown = null, options: { timeoutMs?: number } = {}): Promise<void> {
    try {
      this.#takingCalls(`emit ${event}`);
    } catch (error) {
      return Promise.reject(error);
    }
    const frame = { plugin: this.id, event, data, ...(this.version === undefined ? {} : { version: this.version }) };
    return this.#events().publish(frame, options.timeoutMs);
  }

  /**
   * The version whose events this plugin hears: the one it is pinned to, when that is an
   * exact version. During a rollout both versions emit, and a host pinned to 1.0.0 must
   * not take 2.0.0's events for its own. Unpinned (or pinned to a range): every version's.
   */
  get #eventVersion(): string | undefined {
    return this.version !== undefined && EXACT_VERSION.test(this.version) ? this.version : undefined;
  }

  #events(): EventStream {
    if (this.#stream === undefined) {
      const url = new URL('/v1/events', this.#client.url);
      url.protocol = url.protocol === 'https:' ? 'wss:' : 'ws:';
      const version = this.#eventVersion;
      const stream: EventStream = new EventStream(
        url.toString(),
        () => this.#client.credentialHeaders(),
        [{ plugin: this.id, ...(version === undefined ? {} : { version }) }],
        {
          event: (event) => this.#deliver(event),
          gap: (gap) => {
            for (const handler of this.#gapHandlers) this.#guard(() => handler(gap));
          },
          error: (error) => this.#report(error),
          failed: (error) => {
            // Refused for good (reported through `error` already): forget the stream, so a
            // later start, on or emit opens a new one, asking for credentials again.
            void error;
            if (this.#stream === stream) this.#stream = undefined;
            this.#resume = stream.resumePoint ?? this.#resume;
            void stream.close();
          },
        },
        this.#client.eventOptions,
        this.#resume,
        this.#client.credentialsChange,
      );
      this.#stream = stream;
    }
    return this.#stream;
  }

  #deliver(event: PluginEvent): void {
    // A gateway older than the filter's `version` sends every version's events: drop
    // the others here. One that does not say the version cannot be told apart.
    const version = this.#eventVersion;
    if (version !== undefined && event.version !== undefined && event.version !== version) return;
    const handlers = [...(this.#handlers.get(event.event) ?? []), ...(this.#handlers.get(ANY_EVENT) ?? [])];
    for (const handler of handlers) this.#guard(() => handler(event.data, event), event);
  }

  /** Run a handler so that neither its throw nor its rejection reaches the stream. */
  #guard(run: () => void | Promise<void>, event?: PluginEvent): void {
    try {
      const result = run();
      if (result instanceof Promise) result.catch((error: unknown) => this.#report(error, event));
    } catch (error) {
      this.#report(error, event);
    }
  }

  #report(error: unknown, event?: PluginEvent): void {
    if (this.#errorHandlers.size === 0) {
      const what = event === undefined ? 'the event stream' : `a handler of ${event.plugin}.${event.event}`;
      process.emitWarning(`${what}: ${error instanceof Error ? error.message : String(error)}`, 'LinchKitEventWarning');
      return;
    }
    for (const handler of this.#errorHandlers) {
      try {
        handler(error, event);
      } catch {
        // An error handler that fails has no one left to tell.
      }
    }
  }

  #alive(): void {
    if (this.#state === 'destroyed') throw new ShuttingDown(`plugin ${this.id} was destroyed on this host`);
  }

  #takingCalls(what: string): void {
    this.#alive();
    if (this.#state === 'stopped') {
      throw new ShuttingDown(`plugin ${this.id} is stopped on this host: start() it to ${what}`);
    }
  }

  toString(): string {
    return `RemotePlugin(${this.id}${this.version === undefined ? '' : `@${this.version}`}, ${this.#state}, handlers=${this.#handlers.size}, inFlight=${this.#inFlight.size})`;
  }
}


