/**
 * Errors a plugin answers with, and how any thrown value becomes `CallReply.error`.
 *
 *     PluginError             the plugin's own type (e.g. "InsufficientFunds"), retryable as given
 *     ├── InvalidParams       invalid_params        not retryable
 *     ├── MethodNotFound      method_not_found      not retryable
 *     ├── DeadlineExceeded    deadline_exceeded     retryable (with a new deadline)
 *     └── ProviderError       provider_error        not retryable (protocol misuse)
 *
 * Anything else a method throws is answered with its `name` as the type ("TypeError", …),
 * not retryable, so a plugin bug never looks like a transient failure.
 */

/** The wire form of an error (docs/protocol.md, "Response"). */
export interface WireError {
  type: string;
  message: string;
  retryable: boolean;
  details?: Record<string, unknown>;
  /** Seconds; omitted when unknown. */
  retryAfter?: number;
}

export interface PluginErrorOptions {
  retryable?: boolean;
  details?: Record<string, unknown>;
  retryAfter?: number;
}

/** An error raised by plugin code; its `type` travels to the host unchanged. */
export class PluginError extends Error {
  readonly type: string;
  readonly retryable: boolean;
  readonly details: Record<string, unknown> | undefined;
  readonly retryAfter: number | undefined;

  constructor(type: string, message: string, options: PluginErrorOptions = {}) {
    super(message);
    this.name = new.target.name;
    this.type = type;
    this.retryable = options.retryable ?? false;
    this.details = options.details;
    this.retryAfter = options.retryAfter;
  }

  toWire(): WireError {
    const wire: WireError = { type: this.type, message: this.message, retryable: this.retryable };
    if (this.details !== undefined) wire.details = this.details;
    if (this.retryAfter !== undefined) wire.retryAfter = this.retryAfter;
    return wire;
  }
}

export class InvalidParams extends PluginError {
  constructor(message: string, details?: Record<string, unknown>) {
    super('invalid_params', message, { details });
  }
}

export class MethodNotFound extends PluginError {
  constructor(message: string) {
    super('method_not_found', message);
  }
}

export class DeadlineExceeded extends PluginError {
  constructor(message: string) {
    super('deadline_exceeded', message, { retryable: true });
  }
}

export class ProviderError extends PluginError {
  constructor(message: string) {
    super('provider_error', message);
  }
}

/** The wire error for anything a method threw or rejected with. */
export function toWireError(thrown: unknown): WireError {
  if (thrown instanceof PluginError) return thrown.toWire();
  if (thrown instanceof Error) {
    return { type: thrown.name || 'Error', message: thrown.message, retryable: false };
  }
  return { type: 'Error', message: String(thrown), retryable: false };
}
