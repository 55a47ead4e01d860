/**
 * `connect` (reverse mode) as an operator types it: `--url` of the gateway, checked before
 * anything starts. The same contract in every SDK that dials (tests/conformance/
 * test_serve_cli.py): a URL that can never reach a gateway (no scheme, not WebSocket, no
 * host) is one clear line and exit 1, never a stack trace nor retried for ever; a
 * well-formed URL whose gateway does not answer yet is retried (websocket.ts's `dial`).
 * A plugin that dials the gateway registers nowhere: told to (`LINCHKIT_REGISTER_ETCD`), it
 * refuses in one line before anything starts, as every SDK's `connect` does
 * (`registrationRefusal`).
 */
import type { TlsFlags } from './connecttls';
import { HandshakeError, refusedArgument } from './handshake';
import { REGISTER_ETCD_ENV } from './registryflags';

/** The one-line reminder an argument mistake ends with; `connect --help` says more. */
export const CONNECT_USAGE =
  'connect --url ws://HOST:PORT/v1/plugins/connect [--config JSON] [--ca-file PEM] [--cert-file PEM --key-file PEM] [--help]';

/** `tls`: the TLS files given as flags (connecttls.ts: the variables fill in the others). */
export type ConnectCommand = { mode: 'connect'; url: string; config: string | undefined; tls: TlsFlags } | { mode: 'help' };

/** The TLS flags and the field of `TlsFlags` each sets. */
const TLS_FLAGS: Record<string, keyof TlsFlags> = { '--ca-file': 'caFile', '--cert-file': 'certFile', '--key-file': 'keyFile' };

/** The schemes the `ws` package dials with: http and https are the same as ws and wss there. */
const SCHEMES = new Set(['ws:', 'wss:', 'http:', 'https:']);

/** `argv` from `connect` on: `--url URL` (or `--url=URL`), `--config JSON`, `--help`/`-h`. */
export function parseConnectCommand(argv: readonly string[]): ConnectCommand {
  let url: string | undefined;
  let config: string | undefined;
  const tls: TlsFlags = {};
  let help = false;
  const args = argv[0] === 'connect' ? argv.slice(1) : argv;
  const first = argv.length - args.length + 1; // where args[0] stands on the command line ($N)
  for (let i = 0; i < args.length; i++) {
    const arg = args[i] as string;
    if (arg === '--help' || arg === '-h') help = true;
    else if (arg === '--url') url = valueOf(arg, args[++i]);
    else if (arg === '--config') config = valueOf(arg, args[++i]);
    else if (arg.startsWith('--url=')) url = arg.slice('--url='.length);
    else if (arg.startsWith('--config=')) config = arg.slice('--config='.length);
    else if (arg in TLS_FLAGS) tls[TLS_FLAGS[arg] as keyof TlsFlags] = valueOf(arg, args[++i]);
    else if (arg.includes('=') && arg.slice(0, arg.indexOf('=')) in TLS_FLAGS) {
      tls[TLS_FLAGS[arg.slice(0, arg.indexOf('='))] as keyof TlsFlags] = arg.slice(arg.indexOf('=') + 1);
    } else throw new HandshakeError(`connect: ${refusedArgument(arg, i + first)}; usage: ${CONNECT_USAGE}`);
  }
  if (help) return { mode: 'help' };
  if (url === undefined) throw new HandshakeError(`connect: --url is required; usage: ${CONNECT_USAGE}`);
  parseGatewayUrl(url); // a URL that can never reach a gateway is refused before anything starts
  return { mode: 'connect', url, config, tls };
}

/**
 * `scheme://` and an authority that is not empty, as written: WHATWG's parser (node's URL)
 * reads `ws:///path` as host `path` and `ws:host` as `ws://host`, which the other SDKs refuse.
 */
const AUTHORITY = /^[A-Za-z][A-Za-z0-9+.-]*:\/\/[^/?#]/;

/** `text` as a URL the plugin can dial: ws, wss (or http, https) with a host; else one line. */
export function parseGatewayUrl(text: string): URL {
  let url: URL | undefined;
  try {
    url = AUTHORITY.test(text) ? new URL(text) : undefined;
  } catch {
    url = undefined;
  }
  if (url === undefined || !SCHEMES.has(url.protocol) || url.hostname === '') {
    throw new HandshakeError(`connect: --url must be a ws:// or wss:// URL (e.g. ws://127.0.0.1:8080/v1/plugins/connect), not '${maskedUrl(text)}'`);
  }
  return url;
}

/** What stands for a credential in a URL a line shows. */
const URL_MASK = '***';

/**
 * `text` (a URL, or what was meant as one) as a line may show it, as the dispatcher shows a
 * URL (`providers.model.masked_url`): the password of its userinfo masked (a user without a
 * password whole: a token may be the user), the value of every query item and an item
 * without `=` whole (`?TOKEN`: it is a value itself); no fragment. Read as written, not by
 * WHATWG's parser, which rewrites what it reads and refuses what was refused here.
 */
export function maskedUrl(text: string): string {
  const written = text.split('#', 1)[0] as string;
  const schemeEnd = written.indexOf('://');
  const scheme = schemeEnd < 0 ? '' : written.slice(0, schemeEnd + 3);
  const rest = written.slice(scheme.length);
  const authorityEnd = rest.search(/[/?]/);
  let authority = authorityEnd < 0 ? rest : rest.slice(0, authorityEnd);
  const tail = rest.slice(authority.length);
  const at = authority.lastIndexOf('@');
  if (at >= 0) {
    const userinfo = authority.slice(0, at);
    const colon = userinfo.indexOf(':');
    authority = `${colon < 0 ? URL_MASK : `${userinfo.slice(0, colon)}:${URL_MASK}`}@${authority.slice(at + 1)}`;
  }
  const question = tail.indexOf('?');
  if (question < 0) return `${scheme}${authority}${tail}`;
  const query = tail.slice(question + 1);
  const path = tail.slice(0, question);
  if (query === '') return `${scheme}${authority}${path}`;
  const items = query.split('&').map((item) => (item.includes('=') ? `${item.slice(0, item.indexOf('='))}=${URL_MASK}` : URL_MASK));
  return `${scheme}${authority}${path}?${items.join('&')}`;
}

export { REGISTER_ETCD_ENV };

/**
 * Why `connect` must not start in `env`, or undefined. Told to register (an empty variable
 * counts as unset), a plugin that dials the gateway refuses, in every SDK's words, rather
 * than ignore it: no dispatcher dials it, the gateway knows it by its connection, and the
 * operator who set the variable would believe it registered.
 */
export function registrationRefusal(env: NodeJS.ProcessEnv): HandshakeError | undefined {
  if (!env[REGISTER_ETCD_ENV]) return undefined;
  return new HandshakeError(
    `connect: ${REGISTER_ETCD_ENV}: a plugin that dials the gateway (connect) is not registered in etcd, as no ` +
      'dispatcher dials it: the gateway knows it by its connection. Serve over gRPC (serve) to be found there, or leave it unset',
  );
}

function valueOf(flag: string, value: string | undefined): string {
  if (value === undefined) throw new HandshakeError(`connect: ${flag} needs a value; usage: ${CONNECT_USAGE}`);
  return value;
}
