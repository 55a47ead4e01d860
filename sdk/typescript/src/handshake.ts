/**
 * The subprocess handshake of docs/protocol.md, kept free of I/O so it is tested directly:
 * reading the host's environment, choosing a protocol version, and the one stdout line.
 */

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

/** `serve --address HOST:PORT` (service mode) or nothing (subprocess mode). */
export type Command = { mode: 'service'; address: string } | { mode: 'subprocess' };

export function parseCommand(argv: readonly string[]): Command {
  if (argv.length === 0) return { mode: 'subprocess' };
  if (argv[0] !== 'serve') throw new HandshakeError(`unknown command ${JSON.stringify(argv[0])}; usage: serve [--address HOST:PORT]`);
  let address = '127.0.0.1:0';
  for (let i = 1; i < argv.length; i++) {
    const arg = argv[i] as string;
    if (arg === '--address' && i + 1 < argv.length) {
      address = argv[++i] as string;
    } else if (arg.startsWith('--address=')) {
      address = arg.slice('--address='.length);
    } else {
      throw new HandshakeError(`unknown argument ${JSON.stringify(arg)}; usage: serve [--address HOST:PORT]`);
    }
  }
  return { mode: 'service', address };
}
