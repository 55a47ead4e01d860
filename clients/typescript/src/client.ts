/**
 * The gateway's HTTP side: calls (`POST /v1/plugins/{plugin}/methods/{method}`), async
 * jobs (`…:submit`, `GET /v1/jobs/{id}`, `GET /v1/jobs/{id}/result`), the plugin list and
 * readiness, with credentials, a deadline enforced here as well as sent, and every
 * failure turned into a DispatchError at this boundary (no fetch TypeError or AbortError
 * reaches a caller, except the caller's own abort reason).
 */

import { randomUUID } from 'node:crypto';

import {
  DeadlineExceeded,
  DispatchError,
  ProviderError,
  TargetUnavailable,
  errorFromStatus,
  errorFromWire,
  isRecord,
} from './errors';
import type { EventStreamOptions } from './events';
import { RemotePlugin } from './plugin';
import type { CallOptions, MethodInfo, PluginInfo, Readiness } from './types';

export type { CallOptions, MethodInfo, PluginInfo, Readiness } from './types';

export interface GatewayClientOptions {
  /** The gateway's base URL, as `dispatcher serve` prints it: `http://127.0.0.1:8080`. */
  url: string;
  /** Sent as `X-API-Key` (manifest `auth.api_keys`). */
  apiKey?: string;
  /** Sent as `Authorization: Bearer …` (manifest `auth.jwt`). */
  token?: string;
  /** A call's deadline when the call names none; without either the method's `timeout_ms` rules. */
  timeoutMs?: number;
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

export class GatewayClient {
  readonly url: string;
  readonly timeoutMs: number | undefined;
  readonly eventOptions: EventStreamOptions;
  readonly #credentials: Record<string, string>;

  constructor(options: GatewayClientOptions) {
    const url = new URL(options.url);
    if (url.protocol !== 'http:' && url.protocol !== 'https:') {
      throw new TypeError(`the gateway URL is http(s)://host:port, not ${options.url}`);
    }
    this.url = url.toString().replace(/\/+$/, '');
    if (options.timeoutMs !== undefined) checkTimeout(options.timeoutMs);
    this.timeoutMs = options.timeoutMs;
    this.eventOptions = options.events ?? {};
    const credentials: Record<string, string> = {};
    if (options.apiKey !== undefined) credentials['X-API-Key'] = options.apiKey;
    if (options.token !== undefined) credentials['Authorization'] = `Bearer ${options.token}`;
    this.#credentials = credentials;
  }

  /** A remote plugin of this gateway, in the RemotePluginService shape. */
  plugin(id: string, options: { version?: string } = {}): RemotePlugin {
    return new RemotePlugin(this, id, options.version);
  }

  /** The headers that carry this client's credentials (for the event stream's upgrade). */
  credentialHeaders(): Record<string, string> {
    return { ...this.#credentials };
  }

  /** Call `plugin.method` with `params`; its result, or a DispatchError subclass. */
  async call<T = unknown>(
    plugin: string,
    method: string,
    params: unknown = {},
    options: CallOptions = {},
  ): Promise<T> {
    const requestId = options.requestId ?? randomUUID();
    const timeoutMs = options.timeoutMs ?? this.timeoutMs;
    if (timeoutMs !== undefined) checkTimeout(timeoutMs);
    const headers: Record<string, string> = {
      ...this.#credentials,
      'Content-Type': 'application/json',
      'X-Request-Id': requestId,
    };
    if (timeoutMs !== undefined) headers['X-Timeout-Ms'] = String(Math.max(1, Math.ceil(timeoutMs)));
    if (options.idempotencyKey !== undefined) headers['Idempotency-Key'] = options.idempotencyKey;
    if (options.traceparent !== undefined) headers['traceparent'] = options.traceparent;
    if (options.version !== undefined) headers['X-Plugin-Version'] = options.version;
    let body: string;
    try {
      body = JSON.stringify(params ?? {});
    } catch (error) {
      throw new DispatchError(`the params of ${plugin}.${method} are not JSON: ${String(error)}`, {
        type: 'invalid_params',
        requestId,
        cause: error,
      });
    }
    const path = `/v1/plugins/${encodeURIComponent(plugin)}/methods/${encodeURIComponent(method)}`;
    const answer = await this.#request('POST', path, { headers, body }, timeoutMs, options.signal, requestId);
    return (await this.#envelope(answer, requestId, `${plugin}.${method}`)) as T;
  }

  /**
   * Queue `plugin.method` as an async job (`POST …/methods/{method}:submit`); its job id.
   * Refusals (access, params, a callback URL outside egress) reject as a call's would.
   */
  async submit(plugin: string, method: string, params: unknown = {}, options: SubmitOptions = {}): Promise<string> {
    const timeoutMs = options.timeoutMs ?? this.timeoutMs;
    if (timeoutMs !== undefined) checkTimeout(timeoutMs);
    const headers: Record<string, string> = { ...this.#credentials, 'Content-Type': 'application/json' };
    if (options.idempotencyKey !== undefined) headers['Idempotency-Key'] = options.idempotencyKey;
    if (options.callbackUrl !== undefined) headers['X-Callback-Url'] = options.callbackUrl;
    if (options.version !== undefined) headers['X-Plugin-Version'] = options.version;
    let body: string;
    try {
      body = JSON.stringify(params ?? {});
    } catch (error) {
      throw new DispatchError(`the params of ${plugin}.${method} are not JSON: ${String(error)}`, {
        type: 'invalid_params',
        cause: error,
      });
    }
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
    return this.#request('GET', path + query, { headers: this.credentialHeaders() }, timeoutMs, options.signal);
  }

  /** `GET /v1/plugins`: every plugin and version of the manifest, with its methods. */
  async listPlugins(options: { timeoutMs?: number; signal?: AbortSignal } = {}): Promise<PluginInfo[]> {
    const answer = await this.#request(
      'GET',
      '/v1/plugins',
      { headers: this.credentialHeaders() },
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
   * reached is TargetUnavailable; the caller's abort rejects with its reason.
   */
  async #request(
    method: string,
    path: string,
    init: { headers?: Record<string, string>; body?: string },
    timeoutMs: number | undefined,
    signal: AbortSignal | undefined,
    requestId?: string,
  ): Promise<Answer> {
    signal?.throwIfAborted();
    const controller = new AbortController();
    let timedOut = false;
    const timer =
      timeoutMs === undefined
        ? undefined
        : setTimeout(() => {
            timedOut = true;
            controller.abort();
          }, timeoutMs);
    const onAbort = (): void => controller.abort(signal?.reason);
    signal?.addEventListener('abort', onAbort, { once: true });
    const done = (): void => {
      if (timer !== undefined) clearTimeout(timer);
      signal?.removeEventListener('abort', onAbort);
    };
    const where = `${method} ${path}`;
    const translate = (error: unknown): unknown => {
      done();
      if (signal?.aborted) return signal.reason;
      const common = requestId === undefined ? {} : { requestId };
      if (timedOut) {
        return new DeadlineExceeded(`${where}: no answer within the deadline of ${timeoutMs} ms`, {
          ...common,
          cause: error,
        });
      }
      if (error instanceof DispatchError) return error;
      return new TargetUnavailable(`${where}: the gateway at ${this.url} cannot be reached (${describe(error)})`, {
        ...common,
        cause: error,
      });
    };
    let response: Response;
    try {
      response = await fetch(`${this.url}${path}`, { method, ...init, signal: controller.signal });
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
