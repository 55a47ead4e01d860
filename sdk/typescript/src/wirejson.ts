/**
 * What JSON from the wire every SDK can hold (docs/protocol.md, "gRPC binding"): the checks
 * params, config and event data pass before lossless-json reads them.
 */
import { isUtf8 } from 'node:buffer';

/** Deeper params are invalid_params in every SDK; the dispatcher writes at most 254 levels. */
export const MAX_DEPTH = 250;

const LONE = 'holds a lone surrogate escape (\\ud800-\\udfff), which names no character';

/**
 * Why `bytes` are unusable ("is not UTF-8", …), or undefined. Without it, invalid UTF-8
 * became U+FFFD and the call ran, 1e400 came back as null, and nesting 100,000 deep blew
 * lossless-json's stack (a RangeError where a typed answer was due). One pass, no recursion;
 * the message never quotes the value.
 */
export function unusable(bytes: Buffer): string | undefined {
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
      if (++depth > MAX_DEPTH) return `is nested deeper than ${MAX_DEPTH} levels`;
    } else if (c === 0x5d /* ] */ || c === 0x7d /* } */) {
      depth--;
    } else if (c === 0x2d /* - */ || (c >= 0x30 && c <= 0x39)) {
      let end = i + 1;
      while (end < n && '0123456789+-.eE'.includes(String.fromCharCode(bytes[end] ?? 0))) end++;
      const number = bytes.toString('latin1', i, end);
      // Only an exponent or over 300 digits can pass a double's range.
      if ((number.length > 300 || /[eE]/.test(number)) && Math.abs(Number(number)) === Infinity) {
        return 'holds a number beyond the range of a double';
      }
      i = end - 1;
    }
  }
  return undefined;
}

function hex4(bytes: Buffer, i: number): number {
  if (i + 4 > bytes.length) return -1;
  const text = bytes.toString('latin1', i, i + 4);
  return /^[0-9a-fA-F]{4}$/.test(text) ? parseInt(text, 16) : -1;
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
