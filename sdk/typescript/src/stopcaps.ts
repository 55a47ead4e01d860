/**
 * How long a plugin's graceful stop waits (docs/protocol.md, "Stopping while called"): the
 * calls in flight get the grace to finish (over WebSocket, the host gets it after goaway),
 * then the stop and destroy hooks get the hooks' cap together; a hook still running then is
 * abandoned and the process exits without it. Both are 5 s unless set: `serve` reads
 * `LINCHKIT_PLUGIN_STOP_GRACE_MS` and `LINCHKIT_PLUGIN_STOP_HOOKS_MS` once at start, in every
 * mode, in whole milliseconds from 0 to `MAX_STOP_MS`; a plugin may set its own default in
 * code (`ServeOptions.stopGraceMs`, `stopHooksMs`), which the variables override. 0 does not
 * wait: a grace of 0 cuts the calls in flight off at once, hooks of 0 abandon the hooks at
 * once. A malformed value ends the plugin at start with one line naming the variable.
 */
import { HandshakeError } from './handshake';

/**
 * How long the calls in flight at a stop may take to finish before they are cut off and the
 * plugin's stop and destroy hooks run, unless set: 5 s, as in every SDK.
 */
export const STOP_GRACE_MS = 5_000;

/**
 * How long the stop and destroy hooks may take together at a stop, after the drain, unless
 * set: 5 s, as in every SDK. A hook still running then is abandoned with a warning; the
 * process exits.
 */
export const STOP_HOOKS_MS = 5_000;

export const STOP_GRACE_ENV = 'LINCHKIT_PLUGIN_STOP_GRACE_MS';
export const STOP_HOOKS_ENV = 'LINCHKIT_PLUGIN_STOP_HOOKS_MS';

/**
 * The most either cap may be: 10 minutes, past any platform's wait between SIGTERM and
 * SIGKILL (more is a mistake in the unit, seconds for milliseconds).
 */
export const MAX_STOP_MS = 600_000;

/** How much of a refused value its message quotes. */
const SHOWN_CHARACTERS = 40;

export interface StopCaps {
  /** Milliseconds the calls in flight get to finish. */
  graceMs: number;
  /** Milliseconds the stop and destroy hooks get together. */
  hooksMs: number;
}

/**
 * The caps `env` sets, each one unset or empty at `defaults` (the plugin's own, else 5 s).
 * A malformed value throws a `HandshakeError` naming its variable, after `prefix` (the
 * command's, 'serve: '); so does a default that is not a whole number of milliseconds in
 * range (named by its option).
 */
export function stopCapsFrom(env: NodeJS.ProcessEnv, defaults: Partial<StopCaps> = {}, prefix = ''): StopCaps {
  const graceMs = checkedDefault(`${prefix}stopGraceMs`, defaults.graceMs ?? STOP_GRACE_MS);
  const hooksMs = checkedDefault(`${prefix}stopHooksMs`, defaults.hooksMs ?? STOP_HOOKS_MS);
  return {
    graceMs: fromEnv(env, STOP_GRACE_ENV, prefix) ?? graceMs,
    hooksMs: fromEnv(env, STOP_HOOKS_ENV, prefix) ?? hooksMs,
  };
}

function fromEnv(env: NodeJS.ProcessEnv, name: string, prefix: string): number | undefined {
  const text = env[name];
  if (text === undefined || text === '') return undefined;
  try {
    return stopMs(name, text);
  } catch (error) {
    throw error instanceof HandshakeError ? new HandshakeError(prefix + error.message) : error;
  }
}

/**
 * `text`, the value of `name`, as whole milliseconds from 0 to `MAX_STOP_MS`. Digits only:
 * `Number` would also take ' 5', '5e3', '0x10' and '1.0'.
 */
export function stopMs(name: string, text: string): number {
  if (/^[0-9]+$/.test(text)) {
    const significant = text.replace(/^0+/, '');
    if (significant.length <= String(MAX_STOP_MS).length && Number(significant || '0') <= MAX_STOP_MS) {
      return Number(significant || '0');
    }
  }
  const shown = [...text].length > SHOWN_CHARACTERS ? `${[...text].slice(0, SHOWN_CHARACTERS).join('')}…` : text;
  throw new HandshakeError(`${name} must be a whole number of milliseconds from 0 to ${MAX_STOP_MS} (10 minutes), not ${JSON.stringify(shown)}`);
}

function checkedDefault(option: string, value: number): number {
  if (Number.isInteger(value) && value >= 0 && value <= MAX_STOP_MS) return value;
  throw new HandshakeError(`${option} must be a whole number of milliseconds from 0 to ${MAX_STOP_MS} (10 minutes), not ${String(value)}`);
}
