/**
 * What JSON from the wire every SDK can hold (docs/protocol.md, "gRPC binding"): the checks
 * params, config and event data pass before lossless-json reads them; and, going out, a
 * plugin's values as JSON (`encodeJson`), refusing what JSON cannot carry.
 */
import { isUtf8 } from 'node:buffer';
import { stringify } from 'lossless-json';
import { ProviderError, type WireError } from './errors';

/** Deeper params are invalid_params in every SDK; the dispatcher writes at most 254 levels. */
export const MAX_DEPTH = 250;

const LONE = 'holds a lone surrogate escape (\\ud800-\\udfff), which names no character';

/**
 * Why `bytes` are unusable ("is not UTF-8", …), or undefined. Without it, invalid UTF-8
 * became U+FFFD and the call ran, 1e400 came back as null, and nesting 100,000 deep blew
 * lossless-json's stack (a RangeError where a typed answer was due). One pass, no recursion;
 * the message never quotes the value.
 */
export function unusable(bytes: Buffer, maxDepth: number = MAX_DEPTH): string | undefined {
  if (!isUtf8(bytes)) return 'is not UTF-8';
  let depth = 0;
  const n = bytes.length;
  for (let i = 0; i < n; i++) {
    const c = bytes[i] ?? 0;
    if (c === 0x22 /* " */) {
      for (i++; i < n && bytes[i] !== 0x22; i++) {
        if (bytes[i] !== 0x5c /* \ */) continue;
        if (bytes[i + 1] === 0x75 /* u */) {
          const unit = hex4(bytes, i + 2);
          if (unit >= 0xdc00 && unit <= 0xdfff) return LONE;
          if (unit >= 0xd800 && unit <= 0xdbff) {
            const low = bytes[i + 6] === 0x5c && bytes[i + 7] === 0x75 ? hex4(bytes, i + 8) : -1;
            if (!(low >= 0xdc00 && low <= 0xdfff)) return LONE;
            i += 6;
          }
          i += 5;
        } else {
          i++;
        }
      }
    } else if (c === 0x5b /* [ */ || c === 0x7b /* { */) {
      if (++depth > maxDepth) return `is nested deeper than ${maxDepth} levels`;
    } else if (c === 0x5d /* ] */ || c === 0x7d /* } */) {
      depth--;
    } else if (c === 0x2d /* - */ || (c >= 0x30 && c <= 0x39)) {
      let end = i + 1;
      while (end < n && isNumberByte(bytes[end] ?? 0)) end++;
      // Parsed only when it could pass a double's range: a string per number (and Number()
      // on each with an exponent) made the check cost more than lossless-json's own parse.
      if (mayOverflow(bytes, i, end) && Math.abs(Number(bytes.toString('latin1', i, end))) === Infinity) {
        return 'holds a number beyond the range of a double';
      }
      i = end - 1;
    }
  }
  return undefined;
}

function hex4(bytes: Buffer, i: number): number {
  if (i + 4 > bytes.length) return -1;
  let value = 0;
  for (let k = i; k < i + 4; k++) {
    const c = bytes[k] ?? 0;
    const digit =
      c >= 0x30 && c <= 0x39 ? c - 0x30
      : c >= 0x61 && c <= 0x66 ? c - 0x57
      : c >= 0x41 && c <= 0x46 ? c - 0x37
      : -1;
    if (digit < 0) return -1;
    value = value * 16 + digit;
  }
  return value;
}

/** A byte a JSON number may hold after its first: digits, `.`, `e`, `E`, `+`, `-`. */
function isNumberByte(c: number): boolean {
  return (c >= 0x30 && c <= 0x39) || c === 0x2e || c === 0x65 || c === 0x45 || c === 0x2b || c === 0x2d;
}

/**
 * Whether the number in bytes[start, end) could be past a double's ±1.8e308: more than 300
 * digits before its point, or that many with its exponent added.
 */
function mayOverflow(bytes: Buffer, start: number, end: number): boolean {
  let digits = 0;
  let k = start;
  for (; k < end; k++) {
    const c = bytes[k] ?? 0;
    if (c === 0x65 || c === 0x45 || c === 0x2e) break;
    if (c >= 0x30 && c <= 0x39) digits++;
  }
  while (k < end && bytes[k] !== 0x65 && bytes[k] !== 0x45) k++; // past the fraction
  if (k === end) return digits > 300;
  const negative = bytes[k + 1] === 0x2d;
  let exponent = 0;
  for (k++; k < end; k++) {
    const c = bytes[k] ?? 0;
    if (c >= 0x30 && c <= 0x39 && (exponent = exponent * 10 + (c - 0x30)) > 1000) return true;
  }
  return digits + (negative ? -exponent : exponent) > 300;
}

/**
 * A caller's method name as an error message shows it: JSON-quoted (a NUL or a newline
 * escaped) and cut to 64 characters, so a 10,000-character name is not sent back whole.
 */
export function shownName(name: string): string {
  if (name.length <= 64) return JSON.stringify(name);
  const cut = /[\ud800-\udbff]/.test(name.charAt(63)) ? 63 : 64;
  return `${JSON.stringify(name.slice(0, cut))}…`;
}

/**
 * `shownName` without its quotes, escaped and cut alike: how the WebSocket binding's refusals
 * of a message over the host's cap name a method or an event (`the result of config is …`),
 * as every SDK's do.
 */
export function bareName(name: string): string {
  const shown = shownName(name);
  return shown.endsWith('…') ? `${shown.slice(1, -2)}…` : shown.slice(1, -1);
}

/** The most of a serializer's own error message that `encodeJson` repeats. */
const SHOWN_REASON_CHARS = 200;

/** What every SDK says of a string that is not valid Unicode (docs/protocol.md, "Response"). */
const NOT_UNICODE = 'a string is not valid Unicode (a lone surrogate)';

/**
 * `value` as JSON text (undefined as `null`); what JSON cannot carry is `ProviderError`
 * `${what} is not JSON: …` (a NaN or an infinity anywhere in it, a string that is not valid
 * Unicode, a cycle), that call's answer on every binding. lossless-json, as JSON.stringify,
 * writes NaN and ±Infinity as `null`: `{"score": NaN}` reached the host as `{"score": null}`,
 * a different answer. It writes a lone surrogate (half an emoji, `'smile 😀'.slice(0, 7)`) as
 * the escape `\ud83d`, which stands for no character: the host refused the whole answer
 * ("not a response envelope").
 *
 * Only text holding `null`, the one form lossless-json gives them, is searched, by
 * `firstNonFinite`. Measured (bench/encode-json.js, Node 20, 10,000 rows of 4 fields, 12-15 ms
 * for lossless-json alone), that costs nothing without a null, 1.1-1.8 ms with one; having
 * lossless-json refuse them itself (its `numberStringifiers`, consulted for every value)
 * cost 4-6 ms on every result, and running that only for text holding a null 15-21 ms then.
 */
export function jsonText(value: unknown, what = "the plugin's result"): string {
  let text: string;
  let nonFinite: number | undefined;
  try {
    text = stringify(value === undefined ? null : value) ?? 'null';
    nonFinite = text.includes('null') ? firstNonFinite(value) : undefined;
  } catch (error) {
    // A cycle (the stack overflows), a toJSON that throws: never a RangeError on the wire.
    const reason = error instanceof Error ? error.message : String(error);
    throw new ProviderError(`${what} is not JSON: ${reason.slice(0, SHOWN_REASON_CHARS)}`);
  }
  if (nonFinite !== undefined) throw new ProviderError(`${what} is not JSON: ${nonFinite} is not a JSON number`);
  if (holdsLoneSurrogate(text)) throw new ProviderError(`${what} is not JSON: ${NOT_UNICODE}`);
  return text;
}

/**
 * Whether JSON text written by lossless-json (JSON.stringify for each string and key) holds
 * a lone surrogate. JSON.stringify writes a paired surrogate raw and a lone one as an escape
 * `\ud800`-`\udfff`, and writes no other `\ud` escape: so only text holding `\ud` is looked
 * at, and there only an escape counts, not a backslash of the string's own followed by "ud"
 * (written `\\ud83d`: an even run of backslashes). One pass: a run of backslashes is walked
 * back over once at most. Measured (bench/encode-json.js, Node 20), the search adds ~0.1 µs
 * to a 1 KB result (20 µs) and ~40 µs to a 1 MB one (35 ms); a walk of the value checking each
 * string (`isWellFormed`) would cost a walk of every result. Text holding many `\\ud` of the
 * plugin's own costs ~55 ns each (1.1 ms for 20,000).
 * @internal exported for bench/encode-json.js.
 */
export function holdsLoneSurrogate(text: string): boolean {
  for (let at = text.indexOf('\\ud'); at !== -1; at = text.indexOf('\\ud', at + 3)) {
    let run = 1;
    while (text.charCodeAt(at - run) === 0x5c /* \ */) run++;
    const digit = text.charCodeAt(at + 3); // \ud8XX-\udfXX
    if (run % 2 === 1 && (digit === 0x38 || digit === 0x39 || (digit >= 0x61 && digit <= 0x66))) return true;
  }
  return false;
}

/** `text` with U+FFFD for each lone surrogate in it; itself when it has none. */
function wellFormed(text: string): string {
  return typeof text !== 'string' || text.isWellFormed() ? text : text.toWellFormed();
}

/**
 * `error` as it can travel: details JSON cannot carry (a NaN, a lone surrogate in them) are
 * dropped, its type and message kept, each lone surrogate in them replaced by U+FFFD (refusing
 * them would hide the error; over gRPC protobufjs wrote one as bytes that are not UTF-8, and
 * the host could not read the reply). They must not turn a plugin's error into another, nor
 * its answer into invalid JSON.
 */
export function sendableError(error: WireError): WireError {
  const type = wellFormed(error.type);
  const message = wellFormed(error.message);
  const wire = type === error.type && message === error.message ? error : { ...error, type, message };
  if (wire.details === undefined) return wire;
  try {
    jsonText(wire.details, 'the details');
    return wire;
  } catch {
    const { details: _dropped, ...kept } = wire;
    return kept;
  }
}

/** `jsonText` as the bytes the wire carries. */
export function encodeJson(value: unknown, what?: string): Buffer {
  return Buffer.from(jsonText(value, what));
}

/**
 * A NaN or an infinity that lossless-json 4 writes of `value` (as `null`), if there is one.
 * It walks what lossless-json writes: an array's items, a Number object's value, what a
 * `toJSON` returns (called again here, as a getter is: only for text that holds a `null`),
 * else an object's own enumerable properties (a typed array's items among them). It ends:
 * lossless-json has written `value` already, so `value` holds no cycle.
 */
function firstNonFinite(value: unknown): number | undefined {
  const stack: unknown[] = [value];
  while (stack.length > 0) {
    const item = stack.pop();
    if (typeof item === 'number') {
      if (!Number.isFinite(item)) return item;
    } else if (Array.isArray(item)) {
      for (const element of item) stack.push(element);
    } else if (typeof item === 'object' && item !== null) {
      const object = item as { toJSON?: unknown } & Record<string, unknown>;
      if (typeof object.toJSON === 'function') {
        stack.push(object.toJSON());
      } else if (item instanceof Number) {
        stack.push(Number(item));
      } else {
        for (const key of Object.keys(object)) stack.push(object[key]);
      }
    }
  }
  return undefined;
}
