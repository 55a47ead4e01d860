/**
 * `connect`'s TLS files, for a `wss://` gateway: the roots that verify it and the client
 * certificate the plugin logs in with (mutual TLS). The same options, variables and words
 * as every SDK's `connect` (the Python SDK's `linchkit_plugin/_connect_tls.py`):
 *
 * | flag          | variable                      | what                                                     |
 * |---------------|-------------------------------|----------------------------------------------------------|
 * | `--ca-file`   | `LINCHKIT_PLUGIN_GATEWAY_CA`  | PEM roots that verify the gateway, instead of Node's own |
 * | `--cert-file` | `LINCHKIT_PLUGIN_CLIENT_CERT` | the client certificate (chain), PEM                      |
 * | `--key-file`  | `LINCHKIT_PLUGIN_CLIENT_KEY`  | its unencrypted private key, PEM                         |
 *
 * A flag wins over its variable; an empty variable counts as unset. Every file is read and
 * checked before the plugin dials, a refusal naming the flag (or the variable it came from)
 * and the file, never what it holds: neither a key's bytes nor OpenSSL's message about them.
 *
 * `alertRefusal` says in the same words why a gateway refused the handshake: without a
 * client certificate (`certificate required`), one of a CA it does not trust (`unknown
 * ca`), an expired one (`certificate expired`).
 */
import { X509Certificate, createPrivateKey, type KeyObject } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { HandshakeError } from './handshake';

export const GATEWAY_CA_ENV = 'LINCHKIT_PLUGIN_GATEWAY_CA';
/** A path here; a subprocess plugin's AutoMTLS reads the same name as the host's certificate itself, and `connect` never runs as one. */
export const CLIENT_CERT_ENV = 'LINCHKIT_PLUGIN_CLIENT_CERT';
export const CLIENT_KEY_ENV = 'LINCHKIT_PLUGIN_CLIENT_KEY';

/** The three flags as given on the command line (undefined: not given). */
export interface TlsFlags {
  caFile?: string;
  certFile?: string;
  keyFile?: string;
}

/** What the `ws` client takes (Node's `tls.connect` options): PEM text each; `ca` replaces Node's roots. */
export interface ClientTls {
  ca?: string;
  cert?: string;
  key?: string;
}

interface Setting {
  value: string;
  name: string;
}

function setting(flag: string, given: string | undefined, variable: string, env: NodeJS.ProcessEnv): Setting | undefined {
  if (given !== undefined && given !== '') return { value: given, name: flag };
  const value = env[variable];
  return value === undefined || value === '' ? undefined : { value, name: variable };
}

const CERTIFICATES = /-----BEGIN CERTIFICATE-----[\s\S]*?-----END CERTIFICATE-----/g;
const REASONS: Record<string, string> = { ENOENT: 'no such file or directory', EACCES: 'permission denied', EISDIR: 'is a directory' };

/** The file's text, once the value is checked to be a path. */
function read(file: Setting): string {
  // The PEM text of a key pasted where its path goes would otherwise be printed in full.
  if (file.value.includes('-----BEGIN')) {
    throw new HandshakeError(`connect: ${file.name}: the value is PEM text, not a file's path: write it to a file and give that file's path`);
  }
  // eslint-disable-next-line no-control-regex
  if (/[\u0000-\u001f\u007f]/.test(file.value)) {
    throw new HandshakeError(`connect: ${file.name}: the value holds a line break or a control character`);
  }
  try {
    return readFileSync(file.value, 'latin1');
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code ?? 'EIO';
    throw new HandshakeError(`connect: ${file.name}: cannot read ${file.value}: ${REASONS[code] ?? code.toLowerCase()}`);
  }
}

/** The certificates of the file's PEM text that parse; refused if none does. */
function certificates(file: Setting): { text: string; first: X509Certificate } {
  const text = read(file);
  for (const block of text.match(CERTIFICATES) ?? []) {
    try {
      return { text, first: new X509Certificate(block) };
    } catch {
      // the next one, if any
    }
  }
  throw new HandshakeError(`connect: ${file.name}: ${file.value} holds no PEM certificate`);
}

/** The file's first private key, not encrypted (Node reads PKCS #8, PKCS #1 and SEC 1). */
function privateKey(file: Setting): { text: string; key: KeyObject } {
  const text = read(file);
  const refused = new HandshakeError(`connect: ${file.name}: ${file.value} holds no unencrypted PEM private key`);
  const begin = /^-----BEGIN ([A-Z0-9 ]*PRIVATE KEY)-----\s*$/m.exec(text);
  if (begin === null || (begin[1] as string).includes('ENCRYPTED') || text.includes('Proc-Type: 4,ENCRYPTED')) throw refused;
  try {
    return { text, key: createPrivateKey({ key: text, format: 'pem' }) };
  } catch {
    throw refused; // OpenSSL's words are not shown: one line, as in every SDK
  }
}

/**
 * What `connect` dials `url` with (`url` checked already): undefined when no file is given
 * (Node's roots, no certificate). Throws `HandshakeError`, one line each.
 */
export function clientTls(url: string, flags: TlsFlags, env: NodeJS.ProcessEnv): ClientTls | undefined {
  const ca = setting('--ca-file', flags.caFile, GATEWAY_CA_ENV, env);
  const cert = setting('--cert-file', flags.certFile, CLIENT_CERT_ENV, env);
  const key = setting('--key-file', flags.keyFile, CLIENT_KEY_ENV, env);
  if ((cert === undefined) !== (key === undefined)) throw new HandshakeError('connect: --cert-file and --key-file go together');
  if (ca === undefined && cert === undefined) return undefined;
  if (!/^wss:/i.test(url)) throw new HandshakeError('connect: --ca-file, --cert-file and --key-file need a wss:// --url');
  const tls: ClientTls = {};
  if (ca !== undefined) tls.ca = certificates(ca).text;
  if (cert !== undefined && key !== undefined) {
    const chain = certificates(cert);
    const plain = privateKey(key);
    if (!chain.first.checkPrivateKey(plain.key)) {
      throw new HandshakeError(`connect: ${key.name}: ${key.value} is not the private key of the certificate in ${cert.name}`);
    }
    tls.cert = chain.text;
    tls.key = plain.text;
  }
  return tls;
}

/** A TLS alert of the gateway's (OpenSSL's name, after `ALERT_`), in the words every SDK says it. */
const ALERTS: Record<string, string> = {
  CERTIFICATE_REQUIRED: 'the gateway requires a client certificate and got none (--cert-file and --key-file)',
  UNKNOWN_CA: "the gateway does not trust this plugin's client certificate: no CA it trusts signed it",
  CERTIFICATE_EXPIRED: "this plugin's client certificate has expired: the gateway refused it",
};

/**
 * Why the gateway refused the handshake, if `error` is its alert (Node's code
 * `ERR_SSL_TLSV13_ALERT_CERTIFICATE_REQUIRED` and the like, whose message is OpenSSL's
 * error line with its source file); else undefined.
 */
export function alertRefusal(error: Error): string | undefined {
  const code = (error as NodeJS.ErrnoException).code ?? '';
  const alert = /^ERR_SSL_(?:SSLV3|TLSV1\d*)_ALERT_([A-Z0-9_]+)$/.exec(code)?.[1];
  if (alert === undefined) return undefined;
  return `TLS: ${ALERTS[alert] ?? `the gateway refused the handshake (${alert.toLowerCase().replace(/_/g, ' ')})`}`;
}
