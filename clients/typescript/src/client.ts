/**
 * The gateway's HTTP side: calls (`POST /v1/plugins/{plugin}/methods/{method}`), async
 * jobs (`…:submit`, `GET /v1/jobs/{id}`, `GET /v1/jobs/{id}/result`), the plugin list and
 * readiness, with credentials (asked of their providers for every request), a call's
 * deadline sent and enforced here when the caller names one (else the method's own rules
 * at the gateway), at most `maxConnections` connections (undici's Agent, kept alive;
 * calls beyond wait here), and every failure turned into a DispatchError at this boundary
 * (no fetch TypeError or AbortError reaches a caller, except the caller's own abort
 * reason). A gateway that cannot be reached is TargetUnavailable with
 * `details.stage`: `connect` when the request provably never left (the connection was
 * refused, reset or timed out while connecting, DNS, the TLS handshake), `in_flight`
 * when it may have reached the gateway (the connection broke after it was written).
 */

import { randomUUID } from 'node:crypto';

import { Agent, buildConnector, fetch } from 'undici';
import type { Dispatcher, Response } from 'undici';

import {
  DeadlineExceeded,
  DispatchError,
  InvalidParams,
  ProviderError,
  TargetUnavailable,
  errorFromStatus,
  errorFromWire,
  isRecord,
} from './errors';
import type { EventStreamOptions, ResumePoint } from './events';
import { RemotePlugin } from './plugin';
import type { CallOptions, MethodInfo, PluginInfo, Readiness } from './types';

export type { CallOptions, MethodInfo, PluginInfo, Readiness } from './types';

/**
 * A credential, or what gives it: called for every request and every connect of an event
 * stream (so a JWT can be refreshed before it expires, or after the gateway refused it).
 */
export type Credential = string | (() => string | Promise<string>);

export interface GatewayClientOptions {
  /** The gateway's base URL, as `dispatcher serve` prints it: `http://127.0.0.1:8080`. */
  url: string;
  /** Sent as `X-API-Key` (manifest `auth.api_keys`). */
  apiKey?: Credential;
  /** Sent as `Authorization: Bearer …` (manifest `auth.jwt`). */
  token?: Credential;
  /** The same as `token` (one or the other). */
  bearerToken?: Credential;
  /**
   * A call's deadline when the call names none (sent as `X-Timeout-Ms`; enforced here
   * `DEADLINE_MARGIN_MS` later, so the gateway's own 504 comes first).
   * Without either, nothing is sent and the client waits for the gateway's answer: the
   * method's `timeout_ms` rules there (CALL_SAFETY_NET_MS is the client's only bound).
   */
  timeoutMs?: number;
  /**
   * How long a request that runs no method (the plugin list, readiness, a submission, a
   * job's record without `waitSeconds`) waits for its answer when it names no `timeoutMs`
   * (ms; default 30000): the gateway answers those itself, so this only finds out a
   * gateway that hangs. Not sent, and not a call's bound: a call without `timeoutMs` waits
   * for the gateway, which ends it at the method's `timeout_ms`.
   */
  defaultTimeoutMs?: number;
  /**
   * The most connections this client opens to the gateway (default 256, kept alive);
   * more calls at once wait here for one, instead of meeting the gateway's per-peer limit.
   */
  maxConnections?: number;
  /** An undici dispatcher of the host's (a proxy, its own pool) instead of the client's own. */
  dispatcher?: Dispatcher;
  /** How the event streams of this client's plugins reconnect. */
  events?: EventStreamOptions;
}

export interface SubmitOptions {
  /** The job runs at most once per key (1-255 characters). */
  idempotencyKey?: string;
  /** POSTed the job's record when it ends; must be within the manifest's `egress`. */
  callbackUrl?: string;
  /** The plugin version to call; default the highest in the manifest. */
  version?: string;
  /** A deadline for the submission itself (not for the job). */
  timeoutMs?: number;
  signal?: AbortSignal;
}

export interface JobOptions {
  /** Seconds the gateway waits for the job to end (at most its `job_wait_ms`). */
  waitSeconds?: number;
  /** A deadline for the request; default `waitSeconds` plus 10 s when waiting. */
  timeoutMs?: number;
  signal?: AbortSignal;
}

/** A job's record, as `GET /v1/jobs/{id}` answers it (only the caller's own jobs). */
export interface JobRecord {
  id: string;
  plugin: string;
  version: string;
  method: string;
  state: 'queued' | 'running' | 'retrying' | 'succeeded' | 'failed' | 'dead';
  attempts: number;
  caller?: string;
  params?: unknown;
  result?: unknown;
  /** What it ended with (failed, dead), or while it runs again its last attempt's; none once succeeded. */
  error?: unknown;
  /** A job that succeeded after failed attempts: the last one's error. */
  previous_error?: unknown;
  /** Milliseconds since the epoch (every `…_at` field); strings before 2026-12-03. */
  submitted_at: number;
  started_at?: number;
  finished_at?: number;
  [field: string]: unknown;
}

/** `jobResult` of a job that has not ended: ask again later. */
export const JOB_NOT_FINISHED = 'job_not_finished';

/** The gateway's largest `X-Timeout-Ms`. */
const MAX_TIMEOUT_MS = 86_400_000;
/** How long a request that runs no method waits for its answer when nothing names a deadline. */
export const DEFAULT_TIMEOUT_MS = 30_000;
/**
 * How long a call that names no deadline waits for its answer here: a day and a minute.
 * The gateway ends every call by then (a method's `timeout_ms` is at most a day, as is
 * any `X-Timeout-Ms`) and answers `deadline_exceeded` itself, so only a gateway that hangs
 * with the connection open meets it; one that vanished is found out sooner by TCP
 * keepalive (probes after a minute idle).
 */
export const CALL_SAFETY_NET_MS = MAX_TIMEOUT_MS + 60_000;
/**
 * How long past a call's `timeoutMs` the client waits for the gateway's own answer: the
 * gateway ends the call at that deadline and answers 504 with the call's `requestId`,
 * which then arrives first rather than racing the client's timer. Only a gateway that
 * stopped answering meets the client's bound.
 */
export const DEADLINE_MARGIN_MS = 1_000;
export const DEFAULT_MAX_CONNECTIONS = 256;
/** The gateway's longest `Idempotency-Key` (dispatcher/policies/idempotency.py). */
export const MAX_IDEMPOTENCY_KEY_LENGTH = 255;

/** `details.stage` of a request that provably never left (providers/base.py, CONNECT_STAGE). */
export const CONNECT_STAGE = 'connect';
/** `details.stage` of a request that may have reached the gateway, as the dispatcher says it. */
export const IN_FLIGHT_STAGE = 'in_flight';

export class GatewayClient {
  readonly url: string;
  readonly timeoutMs: number | undefined;
  readonly defaultTimeoutMs: number;
  readonly eventOptions: EventStreamOptions;
  readonly #apiKey: Credential | undefined;
  readonly #token: Credential | undefined;
  readonly #dispatcher: Dispatcher;
  /** The agent this client made (closed by `close`), not one the host passed. */
  readonly #ownAgent: Agent | undefined;
  readonly #maxConnections: number;

  constructor(options: GatewayClientOptions) {
    const url = new URL(options.url);
    if (url.protocol !== 'http:' && url.protocol !== 'https:') {
      throw new TypeError(`the gateway URL is http(s)://host:port, not ${options.url}`);
    }
    this.url = url.toString().replace(/\/+$/, '');
    if (options.timeoutMs !== undefined) checkTimeout(options.timeoutMs);
    this.timeoutMs = options.timeoutMs;
    this.defaultTimeoutMs = options.defaultTimeoutMs ?? DEFAULT_TIMEOUT_MS;
    checkTimeout(this.defaultTimeoutMs);
    this.eventOptions = options.events ?? {};
    if (options.token !== undefined && options.bearerToken !== undefined) {
      throw new TypeError('token and bearerToken are one option: give one');
    }
    this.#apiKey = options.apiKey;
    this.#token = options.token ?? options.bearerToken;
    const maxConnections = options.maxConnections ?? DEFAULT_MAX_CONNECTIONS;
    if (!(Number.isInteger(maxConnections) && maxConnections >= 1)) {
      throw new RangeError(`maxConnections is a positive integer, not ${maxConnections}`);
    }
    this.#maxConnections = maxConnections;
    if (options.dispatcher !== undefined) {
      this.#dispatcher = options.dispatcher;
    } else {
      // Deadlines are this client's (headers and body timeouts off: a job's wait may be an
      // hour, a call the method's timeout_ms); TCP keepalive finds out a peer that vanished
      // meanwhile; a connect that fails is marked, so its error can say the request never left.
      const connector = buildConnector({ timeout: 10_000, keepAlive: true, keepAliveInitialDelay: 60_000 });
      this.#ownAgent = new Agent({
        connections: maxConnections,
        headersTimeout: 0,
        bodyTimeout: 0,
        connect: (connectOptions, callback) =>
          connector(connectOptions, (error, socket) => {
            if (error !== null) NOT_SENT.add(error);
            (callback as (error: Error | null, socket: unknown) => void)(error, socket);
          }),
      });
      this.#dispatcher = this.#ownAgent;
    }
  }

  toString(): string {
    const credentials = [this.#apiKey === undefined ? '' : 'apiKey', this.#token === undefined ? '' : 'token'].filter(Boolean);
    return `GatewayClient(${this.url}, timeoutMs=${this.timeoutMs ?? "none (the gateway's)"}, ${
      this.#ownAgent === undefined ? "the host's dispatcher" : `maxConnections=${this.#maxConnections}`
    }, credentials=${credentials.join('+') || 'none'})`;
  }

  /** Close this client's connections (the ones it made; a host's `dispatcher` is the host's). */
  async close(): Promise<void> {
    await this.#ownAgent?.close();
  }

  /** A remote plugin of this gateway, in the RemotePluginService shape. */
  plugin(id: string, options: { version?: string; resumeFrom?: ResumePoint } = {}): RemotePlugin {
    return new RemotePlugin(this, id, options.version, options.resumeFrom);
  }

  /**
   * The headers that carry this client's credentials, asking the providers anew (for every
   * request, and every connect of an event stream). A value no header can carry rejects
   * with InvalidParams naming the option, never the value.
   */
  async credentialHeaders(): Promise<Record<string, string>> {
    const headers: Record<string, string> = {};
    if (this.#apiKey !== undefined) {
      headers['X-API-Key'] = checkedSecret(await credentialOf(this.#apiKey), 'apiKey');
    }
    if (this.#token !== undefined) {
      headers['Authorization'] = `Bearer ${checkedSecret(await credentialOf(this.#token), 'token')}`;
    }
    return headers;
  }

  /**
   * Whether the credentials may differ from one request to the next: some are given as a
   * function. If not, a 401 is final (the event stream does not connect again with them).
   */
  get credentialsChange(): boolean {
    return typeof this.#apiKey === 'function' || typeof this.#token === 'function';
  }

  /** Call `plugin.method` with `params`; its result, or a DispatchError subclass. */
  async call<T = unknown>(
    plugin: string,
    method: string,
    params: unknown = {},
    options: CallOptions = {},
  ): Promise<T> {
    const requestId = options.requestId ?? randomUUID();
    if (!REQUEST_ID.test(requestId)) {
      throw new InvalidParams(`requestId is 1-128 of A-Z a-z 0-9 . _ : -, not ${JSON.stringify(requestId)}`);
    }
    const timeoutMs = options.timeoutMs ?? this.timeoutMs;
    if (timeoutMs !== undefined) checkTimeout(timeoutMs);
    const headers: Record<string, string> = {
      ...(await this.credentialHeaders()),
      'Content-Type': 'application/json',
      'X-Request-Id': requestId,
    };
    if (timeoutMs !== undefined) headers['X-Timeout-Ms'] = String(Math.max(1, Math.ceil(timeoutMs)));
    if (options.idempotencyKey !== undefined) headers['Idempotency-Key'] = idempotencyKeyHeader(options.idempotencyKey);
    if (options.traceparent !== undefined) headers['traceparent'] = checkedValue(options.traceparent, 'traceparent');
    if (options.version !== undefined) headers['X-Plugin-Version'] = checkedValue(options.version, 'version');
    const body = jsonOf(params, `${plugin}.${method}`, requestId);
    const path = `/v1/plugins/${encodeURIComponent(plugin)}/methods/${encodeURIComponent(method)}`;
    // Without a deadline the gateway decides (the method's timeout_ms) and says so with
    // its own deadline_exceeded: the client only keeps its safety net. With one, the
    // gateway's answer at the deadline gets DEADLINE_MARGIN_MS to arrive.
    const waitMs = timeoutMs === undefined ? undefined : timeoutMs + DEADLINE_MARGIN_MS;
    const answer = await this.#request('POST', path, { headers, body }, waitMs, options.signal, requestId, CALL_SAFETY_NET_MS);
    return (await this.#envelope(answer, requestId, `${plugin}.${method}`)) as T;
  }

  /**
   * Queue `plugin.method` as an async job (`POST …/methods/{method}:submit`); its job id.
   * Refusals (access, params, a callback URL outside egress) reject as a call's would.
   */
  async submit(plugin: string, method: string, params: unknown = {}, options: SubmitOptions = {}): Promise<string> {
    const timeoutMs = options.timeoutMs ?? this.timeoutMs;
    if (timeoutMs !== undefined) checkTimeout(timeoutMs);
    const headers: Record<string, string> = { ...(await this.credentialHeaders()), 'Content-Type': 'application/json' };
    if (options.idempotencyKey !== undefined) headers['Idempotency-Key'] = idempotencyKeyHeader(options.idempotencyKey);
    if (options.callbackUrl !== undefined) headers['X-Callback-Url'] = checkedValue(options.callbackUrl, 'callbackUrl');
    if (options.version !== undefined) headers['X-Plugin-Version'] = checkedValue(options.version, 'version');
    const body = jsonOf(params, `${plugin}.${method}`);
    const path = `/v1/plugins/${encodeURIComponent(plugin)}/methods/${encodeURIComponent(method)}:submit`;
    const answer = await this.#request('POST', path, { headers, body }, timeoutMs, options.signal);
    const text = await this.#text(answer);
    const parsed = parseJson(text);
    if (answer.response.status === 202 && isRecord(parsed) && typeof parsed.job_id === 'string') {
      return parsed.job_id;
    }
    throw answerError(answer.response, parsed, text, undefined);
  }

  /** `GET /v1/jobs/{id}`: the record of one of this caller's jobs (another's: JobNotFound). */
  async job(id: string, options: JobOptions = {}): Promise<JobRecord> {
    const answer = await this.#jobRequest(`/v1/jobs/${encodeURIComponent(id)}`, options);
    const text = await this.#text(answer);
    const parsed = parseJson(text);
    if (answer.response.ok && isRecord(parsed) && parsed.ok === true && isRecord(parsed.job)) {
      return parsed.job as JobRecord;
    }
    throw answerError(answer.response, parsed, text, undefined);
  }

  /**
   * `GET /v1/jobs/{id}/result`: what the job returned; its own error (typed, as the call's
   * would be, but not retryable: the job has ended, `details.state` says failed or dead) if
   * it failed; a retryable DispatchError of type `job_not_finished` before it ends.
   */
  async jobResult<T = unknown>(id: string, options: JobOptions = {}): Promise<T> {
    const answer = await this.#jobRequest(`/v1/jobs/${encodeURIComponent(id)}/result`, options);
    return (await this.#envelope(answer, '', `job ${id}`, true)) as T;
  }

  async #jobRequest(path: string, options: JobOptions): Promise<Answer> {
    const wait = options.waitSeconds;
    if (wait !== undefined && !(wait >= 0 && wait <= 3600)) {
      throw new RangeError(`waitSeconds is in [0, 3600], not ${wait}`);
    }
    const timeoutMs = options.timeoutMs ?? (wait ? wait * 1000 + 10_000 : this.timeoutMs);
    if (timeoutMs !== undefined) checkTimeout(timeoutMs);
    const query = wait ? `?wait=${wait}` : '';
    return this.#request('GET', path + query, { headers: await this.credentialHeaders() }, timeoutMs, options.signal);
  }

  /** `GET /v1/plugins`: every plugin and version of the manifest, with its methods. */
  async listPlugins(options: { timeoutMs?: number; signal?: AbortSignal } = {}): Promise<PluginInfo[]> {
    const answer = await this.#request(
      'GET',
      '/v1/plugins',
      { headers: await this.credentialHeaders() },
      options.timeoutMs ?? this.timeoutMs,
      options.signal,
    );
    const text = await this.#text(answer);
    const parsed = parseJson(text);
    if (answer.response.ok && isRecord(parsed) && Array.isArray(parsed.plugins)) {
      return parsed.plugins as PluginInfo[];
    }
    throw answerError(answer.response, parsed, text, undefined);
  }

  /** `GET /readyz`: whether the gateway's dispatcher takes calls (not while it drains). */
  async readiness(options: { timeoutMs?: number; signal?: AbortSignal } = {}): Promise<Readiness> {
    const answer = await this.#request('GET', '/readyz', {}, options.timeoutMs ?? this.timeoutMs, options.signal);
    const parsed = parseJson(await this.#text(answer));
    const status = isRecord(parsed) && typeof parsed.status === 'string' ? parsed.status : String(answer.response.status);
    return { ready: answer.response.status === 200, status };
  }

  /**
   * One request under a deadline and the caller's signal. A deadline that passes, before
   * the answer or while its body arrives, is DeadlineExceeded; a gateway that cannot be
   * reached is TargetUnavailable; the caller's abort rejects with its reason. Without
   * `timeoutMs` the wait is bounded by `unboundedMs` (default `defaultTimeoutMs`).
   */
  async #request(
    method: string,
    path: string,
    init: { headers?: Record<string, string>; body?: string },
    timeoutMs: number | undefined,
    signal: AbortSignal | undefined,
    requestId?: string,
    unboundedMs: number = this.defaultTimeoutMs,
  ): Promise<Answer> {
    signal?.throwIfAborted();
    const deadlineMs = timeoutMs ?? unboundedMs;
    const controller = new AbortController();
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      controller.abort();
    }, deadlineMs);
    const unlink = signal === undefined ? undefined : linkAbort(signal, () => controller.abort(signal.reason));
    const done = (): void => {
      clearTimeout(timer);
      unlink?.();
    };
    const where = `${method} ${path}`;
    const translate = (error: unknown): unknown => {
      done();
      if (signal?.aborted) return signal.reason;
      const common = requestId === undefined ? {} : { requestId };
      if (timedOut || isUndiciTimeout(error)) {
        return new DeadlineExceeded(
          `${where}: no answer within the deadline of ${timedOut ? deadlineMs : 'the transport'} ms` +
            (timeoutMs === undefined && timedOut ? " (no timeoutMs given: the client's own bound)" : ''),
          { ...common, cause: error },
        );
      }
      if (error instanceof DispatchError) return error;
      if (isRefusedInput(error)) {
        // fetch refused a header value: the caller's input, and its message may hold a credential.
        return new InvalidParams(`${where}: a header value cannot be sent (fetch refused it)`, common);
      }
      if (neverSent(error)) {
        return new TargetUnavailable(
          `${where}: the gateway at ${this.url} cannot be reached (${describe(error)}); the request was not sent`,
          { ...common, details: { stage: CONNECT_STAGE }, cause: error },
        );
      }
      return new TargetUnavailable(
        `${where}: the connection to the gateway at ${this.url} failed before the answer (${describe(error)}); ` +
          'the request may have reached it',
        { ...common, details: { stage: IN_FLIGHT_STAGE }, cause: error },
      );
    };
    let response: Response;
    try {
      response = await fetch(`${this.url}${path}`, {
        method,
        ...init,
        signal: controller.signal,
        dispatcher: this.#dispatcher,
      });
    } catch (error) {
      throw translate(error);
    }
    return { response, translate, done };
  }

  /** The answer's body, read under the same deadline; the timer ends with it. */
  async #text(answer: Answer): Promise<string> {
    try {
      return await answer.response.text();
    } catch (error) {
      throw answer.translate(error);
    } finally {
      answer.done();
    }
  }

  /** The result of an envelope, or its error; the timer ends once the body is read. */
  async #envelope(answer: Answer, requestId: string, what: string, job = false): Promise<unknown> {
    const { response } = answer;
    const text = await this.#text(answer);
    const answeredId = response.headers.get('X-Request-Id') ?? requestId;
    const parsed = parseJson(text);
    // A job's 202 carries an error envelope (job_not_finished): read as an error.
    if (isRecord(parsed) && parsed.ok === true && response.ok && !(job && response.status === 202)) {
      return parsed.result;
    }
    if (isRecord(parsed) && parsed.ok === false) {
      throw errorFromWire(parsed.error, {
        status: response.status,
        requestId: answeredId,
        retryAfterHeader: response.headers.get('Retry-After'),
      });
    }
    if (response.ok) {
      throw new ProviderError(`${what}: the gateway answered ${response.status} without an envelope`, {
        status: response.status,
        requestId: answeredId,
      });
    }
    throw answerError(response, parsed, text, answeredId);
  }
}

interface Answer {
  response: Response;
  translate: (error: unknown) => unknown;
  done: () => void;
}

function answerError(response: Response, parsed: unknown, text: string, requestId: string | undefined): DispatchError {
  const context = {
    status: response.status,
    retryAfterHeader: response.headers.get('Retry-After'),
    ...(requestId === undefined ? {} : { requestId }),
  };
  if (isRecord(parsed) && parsed.ok === false) return errorFromWire(parsed.error, context);
  return errorFromStatus(response.status, text, context);
}

function parseJson(text: string): unknown {
  try {
    return JSON.parse(text) as unknown;
  } catch {
    return undefined;
  }
}

/**
 * Errors of the connector (refused, reset or timed out while connecting, DNS, the TLS
 * handshake): no byte of the request went out on those sockets.
 */
const NOT_SENT = new WeakSet<object>();
/** Codes that name a failure before any connection was made, whoever's connector it was. */
const CONNECT_CODES = new Set(['ECONNREFUSED', 'ENOTFOUND', 'EAI_AGAIN', 'EAI_NONAME', 'EHOSTUNREACH', 'ENETUNREACH', 'EADDRNOTAVAIL', 'UND_ERR_CONNECT_TIMEOUT']);
const UNDICI_TIMEOUTS = new Set(['UND_ERR_HEADERS_TIMEOUT', 'UND_ERR_BODY_TIMEOUT']);

function causes(error: unknown): unknown[] {
  const chain: unknown[] = [];
  for (let at = error; at !== undefined && at !== null && chain.length < 8; at = (at as { cause?: unknown }).cause) {
    chain.push(at);
    if (!(at instanceof Error)) break;
  }
  return chain;
}

function codeOf(error: unknown): string | undefined {
  const code = error instanceof Error ? (error as NodeJS.ErrnoException).code : undefined;
  return typeof code === 'string' ? code : undefined;
}

function neverSent(error: unknown): boolean {
  return causes(error).some(
    (cause) => (typeof cause === 'object' && cause !== null && NOT_SENT.has(cause)) || CONNECT_CODES.has(codeOf(cause) ?? ''),
  );
}

function isUndiciTimeout(error: unknown): boolean {
  return causes(error).some((cause) => UNDICI_TIMEOUTS.has(codeOf(cause) ?? ''));
}

/** fetch's own refusal of what it was given (a header value), not a network failure. */
function isRefusedInput(error: unknown): boolean {
  return error instanceof TypeError && error.message !== 'fetch failed' && error.cause === undefined;
}

/**
 * Call `onAbort` when `signal` aborts, with one listener per signal however many calls
 * share it (no MaxListenersExceededWarning); the returned function forgets the call.
 */
const LINKED = new WeakMap<AbortSignal, { listener: () => void; callbacks: Set<() => void> }>();
function linkAbort(signal: AbortSignal, onAbort: () => void): () => void {
  let link = LINKED.get(signal);
  if (link === undefined) {
    const callbacks = new Set<() => void>();
    const listener = (): void => {
      LINKED.delete(signal);
      for (const callback of [...callbacks]) callback();
    };
    link = { listener, callbacks };
    LINKED.set(signal, link);
    signal.addEventListener('abort', listener, { once: true });
  }
  const { listener, callbacks } = link;
  callbacks.add(onAbort);
  return () => {
    callbacks.delete(onAbort);
    if (callbacks.size === 0 && LINKED.get(signal)?.callbacks === callbacks) {
      LINKED.delete(signal);
      signal.removeEventListener('abort', listener);
    }
  };
}

const REQUEST_ID = /^[A-Za-z0-9._:-]{1,128}$/;
/** What an HTTP header value may hold here: visible ASCII and inner spaces. */
const HEADER_VALUE = /^[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?$/;
/** Python's str.isprintable(), the gateway's rule for an idempotency key. */
const PRINTABLE = /^(?:[^\p{C}\p{Z}]| )+$/u;

/** `value` if a header can carry it; else InvalidParams naming `option` (and the value). */
function checkedValue(value: string, option: string): string {
  if (typeof value !== 'string' || !HEADER_VALUE.test(value)) {
    throw new InvalidParams(`${option} is visible ASCII characters (a header value), not ${JSON.stringify(value)}`);
  }
  return value;
}

/** A credential if a header can carry it; else InvalidParams naming the option, never the value. */
function checkedSecret(value: string, option: string): string {
  if (typeof value !== 'string' || !HEADER_VALUE.test(value)) {
    throw new InvalidParams(`${option} is visible ASCII characters (a header value); the one given is not (not shown)`);
  }
  return value;
}

async function credentialOf(credential: Credential): Promise<string> {
  return typeof credential === 'function' ? await credential() : credential;
}

/**
 * The gateway's rule (1-255 printable characters), sent as UTF-8 bytes: a header carries
 * bytes, and fetch would send a character above U+00FF not at all, one below as Latin-1.
 */
function idempotencyKeyHeader(key: string): string {
  const length = typeof key === 'string' ? [...key].length : 0;
  if (!(length >= 1 && length <= MAX_IDEMPOTENCY_KEY_LENGTH && PRINTABLE.test(key) && key.trim() === key)) {
    throw new InvalidParams(
      `idempotencyKey is 1-${MAX_IDEMPOTENCY_KEY_LENGTH} printable characters without spaces around, not ${JSON.stringify(key).slice(0, 300)}`,
    );
  }
  return Buffer.from(key, 'utf8').toString('latin1');
}

function jsonOf(params: unknown, what: string, requestId?: string): string {
  try {
    return JSON.stringify(params ?? {});
  } catch (error) {
    throw new InvalidParams(`the params of ${what} are not JSON: ${String(error)}`, {
      ...(requestId === undefined ? {} : { requestId }),
      cause: error,
    });
  }
}

function checkTimeout(timeoutMs: number): void {
  if (!(timeoutMs > 0 && timeoutMs <= MAX_TIMEOUT_MS)) {
    throw new RangeError(`timeoutMs is in (0, ${MAX_TIMEOUT_MS}], not ${timeoutMs}`);
  }
}

/** What went wrong under fetch's "fetch failed": the socket error it wraps. */
function describe(error: unknown): string {
  const cause = error instanceof Error && error.cause instanceof Error ? error.cause : error;
  if (cause instanceof Error) {
    const code = (cause as NodeJS.ErrnoException).code;
    return code === undefined ? cause.message : `${code}: ${cause.message}`;
  }
  return String(cause);
}
