/**
 * The SDK's own lines on stderr (start-up, a failed handler, dropped events, shutdown), and
 * the logger a plugin author may use: one line a record, the time and the level first,
 *
 *     2026-12-04T00:10:00.000Z WARN linchkit plugin: the host is not reading its Events stream; …
 *
 * A host reading a subprocess plugin's stderr logs each line at the level it carries
 * (WARN stays a warning there, not INFO: the dispatcher's providers/subprocess/levels.py).
 * A newline inside a message is written as `\n`, so a record (an error's stack too) never
 * spills onto lines without a level.
 */

import { format } from 'node:util';

export type Level = 'DEBUG' | 'INFO' | 'WARN' | 'ERROR';

/** What does not print: controls, format characters (a bidi override), separators other
 * than the space, lone surrogates, private and unassigned code points. */
const NOT_PRINTED = /[\p{C}\p{Z}]/gu;
const NAMED_ESCAPES: Record<string, string> = { '\t': '\\t', '\n': '\\n', '\r': '\\r' };

/**
 * Text a peer chose (a close reason, a host event's name), as a log line or an error may show
 * it: every character that does not print (ESC, a newline, a bidi override) escaped as Python
 * writes it (`\x1b`, `\n`, `\u202e`), cut to `max` characters. The operator's terminal must
 * not run what a peer sent.
 */
export function shown(text: string, max: number): string {
  const escaped = text.replace(NOT_PRINTED, (char) => {
    if (char === ' ') return char;
    const named = NAMED_ESCAPES[char];
    if (named !== undefined) return named;
    const code = char.codePointAt(0) ?? 0;
    if (code < 0x100) return `\\x${code.toString(16).padStart(2, '0')}`;
    if (code < 0x10000) return `\\u${code.toString(16).padStart(4, '0')}`;
    return `\\U${code.toString(16).padStart(8, '0')}`;
  });
  if (escaped.length <= max) return escaped;
  const cut = /[\ud800-\udbff]/.test(escaped.charAt(max - 1)) ? max - 1 : max;
  return `${escaped.slice(0, cut)}…`;
}

/** Where a logger writes; stderr unless a test passes its own. */
export type Sink = (line: string) => void;

const stderr: Sink = (line) => {
  process.stderr.write(line);
};

/** One record as its line: time, level, name, message; newlines in it escaped. */
export function formatLine(level: Level, name: string, message: string, now: Date = new Date()): string {
  const text = message.replace(/\r?\n/g, '\\n').replace(/\r/g, '\\r');
  return `${now.toISOString()} ${level} ${name}: ${text}\n`;
}

/** A logger that writes each record as one line carrying its level. */
export class Logger {
  constructor(
    readonly name: string,
    private readonly sink: Sink = stderr,
  ) {}

  debug(message: string): void {
    this.sink(formatLine('DEBUG', this.name, message));
  }

  info(message: string): void {
    this.sink(formatLine('INFO', this.name, message));
  }

  warn(message: string): void {
    this.sink(formatLine('WARN', this.name, message));
  }

  error(message: string): void {
    this.sink(formatLine('ERROR', this.name, message));
  }
}

/** The SDK's own logger. */
export const log = new Logger('linchkit plugin');

/**
 * The console as `logger`: `console.log`, `info` at INFO, `debug` and `trace` at DEBUG,
 * `warn` at WARN, `error` at ERROR, each call one line on stderr. A subprocess plugin's
 * stdout carried its handshake line and is read no more, so `serve` does this there.
 */
export function routeConsole(logger: Logger): void {
  const line = (args: unknown[]): string => format(...args);
  console.log = (...args: unknown[]) => logger.info(line(args));
  console.info = (...args: unknown[]) => logger.info(line(args));
  console.debug = (...args: unknown[]) => logger.debug(line(args));
  console.trace = (...args: unknown[]) => logger.debug(line(args));
  console.warn = (...args: unknown[]) => logger.warn(line(args));
  console.error = (...args: unknown[]) => logger.error(line(args));
}
