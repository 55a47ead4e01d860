/**
 * The errors a call through the gateway can end with: one class per wire `type`
 * (docs/gateway.md, "Status of each error type"), mirroring the dispatcher's own
 * hierarchy (sdk/python/linchkit_plugin/errors.py).
 *
 *     DispatchError              any type this client does not know (a newer gateway's)
 *     ├── PluginNotFound         plugin_not_found      404
 *     ├── MethodNotFound         method_not_found      404
 *     ├── InvalidParams          invalid_params        400, 413, 415
 *     ├── Unauthorized           unauthorized          401
 *     ├── Forbidden              forbidden             403
 *     ├── RateLimited            rate_limited          429, retryable (retryAfterMs)
 *     ├── Overloaded             overloaded            503, retryable
 *     ├── CircuitOpen            circuit_open          503, retryable (retryAfterMs)
 *     ├── DeadlineExceeded       deadline_exceeded     504 or the client's own deadline, retryable
 *     ├── TargetUnavailable      target_unavailable    503, or the gateway cannot be reached, retryable
 *     ├── ShuttingDown           shutting_down         503, retryable (another replica may take it)
 *     ├── PluginError            the plugin's own type 500 (e.g. "InsufficientFunds"), as the plugin says
 *     └── ProviderError          provider_error        502, or an answer that is not an envelope
 *
 * `type` is the wire's: for a PluginError it is the plugin's own name, so hosts can branch
 * on business errors without parsing messages.
 */

/** The `error` object of an envelope, as the gateway sends it. */
export interface WireError {
  type: string;
  message: string;
  retryable?: boolean;
  details?: Record<string, unknown>;
  /** Seconds, exact (the `Retry-After` header rounds up). */
  retry_after?: number;
}

export interface DispatchErrorOptions {
  /** The wire type; only the base class and PluginError take one (the others have theirs). */
  type?: string;
  retryable?: boolean;
  retryAfterMs?: number;
  details?: Record<string, unknown>;
  requestId?: string;
  /** The HTTP status the gateway answered with, when there was an answer. */
  status?: number;
  cause?: unknown;
}

export class DispatchError extends Error {
  static readonly wireType: string = 'dispatch_error';
  static readonly defaultRetryable: boolean = false;

  readonly type: string;
  readonly retryable: boolean;
  readonly retryAfterMs: number | undefined;
  readonly details: Record<string, unknown>;
  readonly requestId: string | undefined;
  readonly status: number | undefined;

  constructor(message: string, options: DispatchErrorOptions = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    const kind = new.target as typeof DispatchError;
    this.name = kind.name;
    this.type = options.type ?? kind.wireType;
    this.retryable = options.retryable ?? kind.defaultRetryable;
    this.retryAfterMs = options.retryAfterMs;
    this.details = options.details ?? {};
    this.requestId = options.requestId;
    this.status = options.status;
  }
}

export class PluginNotFound extends DispatchError {
  static override readonly wireType = 'plugin_not_found';
}
export class MethodNotFound extends DispatchError {
  static override readonly wireType = 'method_not_found';
}
export class InvalidParams extends DispatchError {
  static override readonly wireType = 'invalid_params';
}
export class Unauthorized extends DispatchError {
  static override readonly wireType = 'unauthorized';
}
export class Forbidden extends DispatchError {
  static override readonly wireType = 'forbidden';
}
export class RateLimited extends DispatchError {
  static override readonly wireType = 'rate_limited';
  static override readonly defaultRetryable = true;
}
/** A bulkhead is full: too many calls in flight or waiting. */
export class Overloaded extends DispatchError {
  static override readonly wireType = 'overloaded';
  static override readonly defaultRetryable = true;
}
export class CircuitOpen extends DispatchError {
  static override readonly wireType = 'circuit_open';
  static override readonly defaultRetryable = true;
}
export class DeadlineExceeded extends DispatchError {
  static override readonly wireType = 'deadline_exceeded';
  static override readonly defaultRetryable = true;
}
export class TargetUnavailable extends DispatchError {
  static override readonly wireType = 'target_unavailable';
  static override readonly defaultRetryable = true;
}
/** The gateway drains, or this plugin was stopped or destroyed on the host's side. */
export class ShuttingDown extends DispatchError {
  static override readonly wireType = 'shutting_down';
  static override readonly defaultRetryable = true;
}
/** Raised by plugin code: `type` is the plugin's own error name. */
export class PluginError extends DispatchError {
  static override readonly wireType = 'plugin_error';
}
/** The gateway or the target broke the contract (an answer that is not an envelope). */
export class ProviderError extends DispatchError {
  static override readonly wireType = 'provider_error';
}

const BY_TYPE: ReadonlyMap<string, typeof DispatchError> = new Map(
  [
    PluginNotFound,
    MethodNotFound,
    InvalidParams,
    Unauthorized,
    Forbidden,
    RateLimited,
    Overloaded,
    CircuitOpen,
    DeadlineExceeded,
    TargetUnavailable,
    ShuttingDown,
    PluginError,
    ProviderError,
  ].map((kind) => [kind.wireType, kind]),
);

/** The status the gateway gives a plugin's own error (docs/gateway.md). */
const PLUGIN_RAISED = 500;

export interface AnswerContext {
  status?: number;
  requestId?: string;
  /** The `Retry-After` header, seconds; used when the envelope has no `retry_after`. */
  retryAfterHeader?: string | null;
}

/**
 * The error an envelope's `error` object stands for. A known type becomes its class; an
 * unknown type on a 500 is the plugin's own (PluginError); any other unknown type is the
 * base class, so a newer gateway's types still arrive typed as a DispatchError. A
 * malformed error object is a contract breach: ProviderError.
 */
export function errorFromWire(wire: unknown, context: AnswerContext = {}): DispatchError {
  const common = {
    ...(context.status === undefined ? {} : { status: context.status }),
    ...(context.requestId === undefined ? {} : { requestId: context.requestId }),
  };
  if (!isRecord(wire) || typeof wire.type !== 'string' || typeof wire.message !== 'string') {
    return new ProviderError(
      `the gateway answered an error without type and message: ${preview(wire)}`,
      common,
    );
  }
  const options: DispatchErrorOptions = { ...common, type: wire.type };
  if (typeof wire.retryable === 'boolean') options.retryable = wire.retryable;
  if (isRecord(wire.details)) options.details = wire.details;
  const retryAfterMs = retryAfterOf(wire.retry_after, context.retryAfterHeader);
  if (retryAfterMs !== undefined) options.retryAfterMs = retryAfterMs;
  const known = BY_TYPE.get(wire.type);
  if (known !== undefined) return new known(wire.message, options);
  if (context.status === PLUGIN_RAISED) return new PluginError(wire.message, options);
  return new DispatchError(wire.message, options);
}

/**
 * The error an answer without an envelope stands for (a proxy's page, a gateway too
 * old): read from its status alone, so a 503 from a load balancer is still retryable.
 */
export function errorFromStatus(status: number, body: string, context: AnswerContext = {}): DispatchError {
  const options: DispatchErrorOptions = { status };
  if (context.requestId !== undefined) options.requestId = context.requestId;
  const retryAfterMs = retryAfterOf(undefined, context.retryAfterHeader);
  if (retryAfterMs !== undefined) options.retryAfterMs = retryAfterMs;
  const message = `the gateway answered ${status} without an error envelope: ${preview(body)}`;
  if (status === 401) return new Unauthorized(message, options);
  if (status === 403) return new Forbidden(message, options);
  if (status === 404) return new PluginNotFound(message, options);
  if (status === 429) return new RateLimited(message, options);
  if (status === 502 || status === 503) return new TargetUnavailable(message, options);
  if (status === 504) return new DeadlineExceeded(message, options);
  return new ProviderError(message, options);
}

function retryAfterOf(exact: unknown, header: string | null | undefined): number | undefined {
  if (typeof exact === 'number' && Number.isFinite(exact) && exact >= 0) return exact * 1000;
  if (header != null && /^\d+$/.test(header.trim())) return Number(header.trim()) * 1000;
  return undefined;
}

export function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

function preview(value: unknown): string {
  let text: string;
  try {
    text = typeof value === 'string' ? value : JSON.stringify(value) ?? String(value);
  } catch {
    text = String(value);
  }
  return text.length > 200 ? `${text.slice(0, 200)}…` : text;
}
