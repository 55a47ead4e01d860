/**
 * Where `serve` listens, as an operator types it: `--address host:port`, checked before
 * anything starts, and the one line a listen that fails ends with. The same contract in
 * every SDK (tests/conformance/test_serve_cli.py): a mistyped address or a port already
 * taken is one clear line and exit 1, never a stack trace nor a service somewhere else.
 */
import { isIPv6, type Server } from 'node:net';

export const DEFAULT_ADDRESS = '127.0.0.1:0';

/** A checked `host:port`; `host` without the brackets of an IPv6 address (as node's listen wants it). */
export interface ListenAddress {
  host: string;
  port: number;
}

/** `serve` cannot listen where it was asked; `message` is the whole line for stderr. */
export class ListenError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'ListenError';
  }
}

/** A name or an IPv4 address: no colon, so the last colon of `host:port` is the port's. */
const HOST_NAME = /^[A-Za-z0-9._-]+$/;
/** Decimal digits only: node and grpc-js would read `0x10`, ` 1` or `1e3` as ports. */
const PORT = /^\d{1,5}$/;

export function parseListenAddress(text: string): ListenAddress {
  const colon = text.lastIndexOf(':');
  const host = colon < 0 ? undefined : unbracketedHost(text.slice(0, colon));
  const port = text.slice(colon + 1);
  if (host === undefined || !PORT.test(port) || Number(port) > 65535) {
    throw new ListenError(
      `serve: --address must be host:port with a port in 0-65535 (e.g. 127.0.0.1:50051), not '${text}'`,
    );
  }
  return { host, port: Number(port) };
}

/** `[::1]` → `::1`, a name or an IPv4 address as it is; undefined for anything else. */
function unbracketedHost(host: string): string | undefined {
  if (host.startsWith('[') && host.endsWith(']')) {
    const inner = host.slice(1, -1);
    return isIPv6(inner) ? inner : undefined;
  }
  return HOST_NAME.test(host) ? host : undefined;
}

/** `host:port` again, an IPv6 host back in brackets: what the handshake line names. */
export function formatListenAddress(address: ListenAddress): string {
  const host = address.host.includes(':') ? `[${address.host}]` : address.host;
  return `${host}:${address.port}`;
}

/** Listen on `address`; resolves to the port bound (the free one chosen for port 0). */
export function listen(server: Server, address: ListenAddress): Promise<number> {
  return new Promise((resolve, reject) => {
    const fail = (error: Error): void => reject(cannotListen(formatListenAddress(address), error));
    server.once('error', fail);
    server.listen(address.port, address.host, () => {
      server.off('error', fail);
      const bound = server.address();
      resolve(typeof bound === 'object' && bound !== null ? bound.port : address.port);
    });
  });
}

/** What an operator can act on, by the errno code node or grpc-js puts in the error. */
const REASONS: ReadonlyArray<[RegExp, string]> = [
  [/EADDRINUSE/, 'the port is already in use'],
  [/EADDRNOTAVAIL/, 'the host is not an address of this machine'],
  [/EACCES|EPERM/, 'permission denied (a port below 1024 needs privileges)'],
  [/ENOTFOUND|EAI_AGAIN|EAI_NONAME|Name resolution failed/, 'the host name does not resolve'],
];

/** The line `serve` ends with when listening on `address` (as given) failed with `error`. */
export function cannotListen(address: string, error: unknown): ListenError {
  return new ListenError(`serve: cannot listen on ${address}: ${shortReason(error)}`);
}

function shortReason(error: unknown): string {
  const text = `${(error as NodeJS.ErrnoException)?.code ?? ''} ${(error as Error)?.message ?? String(error)}`;
  const known = REASONS.find(([pattern]) => pattern.test(text));
  if (known !== undefined) return known[1];
  // Unforeseen: the runtime's own words, on one line and without "Error: " (not a crash).
  return text.trim().split('\n')[0]!.replace(/\bError: /g, '');
}
