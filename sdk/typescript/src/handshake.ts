/**
 * The subprocess handshake of docs/protocol.md, kept free of I/O so it is tested directly:
 * reading the host's environment, choosing a protocol version, and the one stdout line.
 */

import { DEFAULT_ADDRESS, parseListenAddress } from './listen';
import { PASSWORD_FLAG, PASSWORD_FLAG_REFUSAL, registrySettingNamed } from './registryflags';

export const CORE_PROTOCOL_VERSION = 1;
export const MAGIC_COOKIE_KEY = 'LINCHKIT_PLUGIN_MAGIC_COOKIE';
export const MAGIC_COOKIE_VALUE = 'd1spatch3r-pl4g1n';
export const PROTOCOL_VERSIONS_KEY = 'LINCHKIT_PLUGIN_PROTOCOL_VERSIONS';
export const NETWORK_KEY = 'LINCHKIT_PLUGIN_NETWORK';
export const SOCKET_DIR_KEY = 'LINCHKIT_PLUGIN_SOCKET_DIR';
export const CLIENT_CERT_KEY = 'LINCHKIT_PLUGIN_CLIENT_CERT';

/** App protocol versions this SDK speaks. */
export const SUPPORTED_VERSIONS: readonly number[] = [1];

export type Network = 'unix' | 'tcp';

/** What the host asked for, from the environment it started the plugin with. */
export interface HandshakeConfig {
  appVersion: number;
  network: Network;
  socketDir: string | undefined;
  clientCertPem: string | undefined;
}

/** The plugin cannot go on; `message` is for a person, on stderr, before exit 1. */
export class HandshakeError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'HandshakeError';
  }
}

/** The highest version both sides speak, or undefined. */
export function negotiateVersion(offered: string | undefined, supported: readonly number[] = SUPPORTED_VERSIONS): number | undefined {
  const text = offered === undefined || offered.trim() === '' ? '1' : offered;
  const hostVersions = text
    .split(',')
    .map((part) => part.trim())
    .filter((part) => /^\d+$/.test(part))
    .map(Number);
  const common = hostVersions.filter((version) => supported.includes(version));
  return common.length === 0 ? undefined : Math.max(...common);
}

export function readHandshakeEnv(env: NodeJS.ProcessEnv): HandshakeConfig {
  if (env[MAGIC_COOKIE_KEY] !== MAGIC_COOKIE_VALUE) {
    throw new HandshakeError(
      'This binary is a LinchKit plugin. It is started by the dispatcher, not by hand ' +
        `(${MAGIC_COOKIE_KEY} is missing or wrong). To run it as a gRPC service: serve --address 127.0.0.1:0`,
    );
  }
  const appVersion = negotiateVersion(env[PROTOCOL_VERSIONS_KEY]);
  if (appVersion === undefined) {
    throw new HandshakeError(
      `no common protocol version: the host offers ${JSON.stringify(env[PROTOCOL_VERSIONS_KEY])}, ` +
        `this plugin speaks ${SUPPORTED_VERSIONS.join(',')}`,
    );
  }
  const network = (env[NETWORK_KEY] || 'unix').trim();
  if (network !== 'unix' && network !== 'tcp') {
    throw new HandshakeError(`${NETWORK_KEY} must be 'unix' or 'tcp', got ${JSON.stringify(network)}`);
  }
  const clientCertPem = env[CLIENT_CERT_KEY]?.trim() ? env[CLIENT_CERT_KEY] : undefined;
  if (clientCertPem !== undefined && !clientCertPem.includes('-----BEGIN CERTIFICATE-----')) {
    throw new HandshakeError(`${CLIENT_CERT_KEY} must be a PEM certificate`);
  }
  return { appVersion, network, socketDir: env[SOCKET_DIR_KEY] || undefined, clientCertPem };
}

/** base64 without padding, as Go's `base64.RawStdEncoding`. */
export function rawStdBase64(der: Uint8Array): string {
  return Buffer.from(der).toString('base64').replace(/=+$/, '');
}

/** `CORE-VERSION|APP-VERSION|NETWORK|ADDRESS|PROTOCOL|SERVER-CERT`, without the newline. */
export function handshakeLine(appVersion: number, network: Network, address: string, serverCertDer?: Uint8Array): string {
  const cert = serverCertDer === undefined ? '' : rawStdBase64(serverCertDer);
  return [CORE_PROTOCOL_VERSION, appVersion, network, address, 'grpc', cert].join('|');
}

/** A parsed handshake line (hosts and tests use it). */
export interface HandshakeLine {
  coreVersion: number;
  appVersion: number;
  network: Network;
  address: string;
  protocol: string;
  serverCertDer: Buffer | undefined;
}

export function parseHandshakeLine(line: string): HandshakeLine {
  const parts = line.trim().split('|');
  if (parts.length !== 6) {
    throw new HandshakeError(`a handshake line has 6 fields separated by '|', got ${parts.length}: ${JSON.stringify(line)}`);
  }
  const [core, app, network, address, protocol, cert] = parts as [string, string, string, string, string, string];
  if (network !== 'unix' && network !== 'tcp') throw new HandshakeError(`unknown network ${JSON.stringify(network)}`);
  if (!/^\d+$/.test(core) || !/^\d+$/.test(app)) throw new HandshakeError(`versions must be integers: ${JSON.stringify(line)}`);
  return {
    coreVersion: Number(core),
    appVersion: Number(app),
    network,
    address,
    protocol,
    serverCertDer: cert === '' ? undefined : Buffer.from(cert, 'base64'),
  };
}

/** The one-line reminder an argument mistake ends with; `serve --help` says more. */
export const SERVE_USAGE = 'serve [--address HOST:PORT] [--websocket [--config JSON]] [--register-etcd URL ...] [--help]';

/**
 * `serve [--address HOST:PORT]` (a gRPC service), `serve --websocket [--address HOST:PORT]
 * [--config JSON]`, `serve --help`, or nothing (subprocess mode). `connect` is serve.ts's.
 * `registry`: the registry flags given (registryflags.ts), by name without `--`, an empty
 * value too; their values are checked by registry.ts.
 */
export type Command =
  | { mode: 'service'; address: string; registry: Map<string, string> }
  | { mode: 'websocket'; address: string; config: string | undefined; registry: Map<string, string> }
  | { mode: 'help' }
  | { mode: 'subprocess' };

interface ServeFlags {
  address: string;
  websocket: boolean;
  config: string | undefined;
  help: boolean;
  registry: Map<string, string>;
}

/** `--register-etcd-password`, joined to its value or not, with one dash or two. */
const PASSWORD_ARGUMENT = new RegExp(`^--?${PASSWORD_FLAG}(=|$)`);

/**
 * What a refusal says of `arg`, the `position`-th argument (as the shell counts `$1`, `$2`):
 * an option by its name, never its value; one given with a single dash, and anything else,
 * by its place, never its text. A command line can carry a secret where an operator slipped
 * (a mistyped `--register-etcd-pasword=…`, a token pasted as an argument, or after a dash: a
 * token may begin with one), and the message goes to stderr and on to the logs.
 */
export function refusedArgument(arg: string, position: number): string {
  if (!arg.startsWith('-') || arg === '-') return `unexpected argument #${position} (its text is not shown)`;
  if (!arg.startsWith('--')) return `unknown option (argument #${position}, its text is not shown)`;
  const equals = arg.indexOf('=');
  return equals < 0 ? `unknown option ${arg}` : `unknown option ${arg.slice(0, equals)} (its value is not shown)`;
}

export function parseCommand(argv: readonly string[]): Command {
  if (argv.length === 0) return { mode: 'subprocess' };
  if (argv[0] !== 'serve') {
    const what = (argv[0] as string).startsWith('-') ? refusedArgument(argv[0] as string, 1) : 'unknown command (argument #1, its text is not shown)';
    throw new HandshakeError(`${what}; usage: ${SERVE_USAGE}`);
  }
  const flags = parseServeFlags(argv.slice(1));
  if (flags.help) return { mode: 'help' };
  parseListenAddress(flags.address); // a mistyped address is refused before anything starts
  if (flags.websocket) return { mode: 'websocket', address: flags.address, config: flags.config, registry: flags.registry };
  if (flags.config !== undefined) {
    throw new HandshakeError(`serve: --config needs --websocket (a gRPC service gets its config from the Init call); usage: ${SERVE_USAGE}`);
  }
  return { mode: 'service', address: flags.address, registry: flags.registry };
}

function parseServeFlags(args: readonly string[]): ServeFlags {
  const flags: ServeFlags = { address: DEFAULT_ADDRESS, websocket: false, config: undefined, help: false, registry: new Map() };
  for (let i = 0; i < args.length; i++) {
    const arg = args[i] as string;
    // Refused by name before anything else is read, its value (a password) never repeated.
    if (PASSWORD_ARGUMENT.test(arg)) throw new HandshakeError(`serve: ${PASSWORD_FLAG_REFUSAL}`);
    const registry = arg.startsWith('--') ? registryFlag(arg.slice(2)) : undefined;
    if (registry !== undefined) {
      flags.registry.set(registry.name, registry.joined ?? valueOf(arg, args[++i]));
      continue;
    }
    if (arg === '--help' || arg === '-h') flags.help = true;
    else if (arg === '--websocket') flags.websocket = true;
    else if (arg === '--address') flags.address = valueOf(arg, args[++i]);
    else if (arg === '--config') flags.config = valueOf(arg, args[++i]);
    else if (arg.startsWith('--address=')) flags.address = arg.slice('--address='.length);
    else if (arg.startsWith('--config=')) flags.config = arg.slice('--config='.length);
    else if (arg.startsWith('--websocket=')) throw new HandshakeError(`serve: --websocket takes no value (its value is not shown); usage: ${SERVE_USAGE}`);
    else throw new HandshakeError(`serve: ${refusedArgument(arg, i + 2)}; usage: ${SERVE_USAGE}`); // after `serve`: $2 on
  }
  return flags;
}

/** `name` or `name=value` when `name` is a registry flag (registryflags.ts); else undefined. */
function registryFlag(text: string): { name: string; joined: string | undefined } | undefined {
  const equals = text.indexOf('=');
  const name = equals < 0 ? text : text.slice(0, equals);
  if (registrySettingNamed(name) === undefined) return undefined;
  return { name, joined: equals < 0 ? undefined : text.slice(equals + 1) };
}

function valueOf(flag: string, value: string | undefined): string {
  if (value === undefined) throw new HandshakeError(`serve: ${flag} needs a value; usage: ${SERVE_USAGE}`);
  return value;
}
