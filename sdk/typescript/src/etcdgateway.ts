/**
 * etcd's v3 JSON gateway as a registering plugin reaches it (registry.ts): over http:// or
 * https://, with a client certificate, as one of etcd's users, with node's own http and
 * https, the same contract as the Python and Go SDKs' (docs/registry.md, "A plugin
 * registers itself"), so the SDK needs no etcd client package.
 *
 * Every setting is checked before the plugin serves (`EtcdGateway.from`): TLS files only
 * with an https:// etcd, a client certificate with its key, a user with a password, and a
 * password over plain http:// only to a loopback etcd, where it crosses no network. A user
 * authenticates (/v3/auth/authenticate) and sends its token with every request; etcd
 * forgets a simple token left unused for its --auth-token-ttl, and every token when it
 * restarts, so a request it refuses for that (HTTP 401, gRPC code 16) is sent once more
 * with a new token. An etcd whose authentication is off is used without a token, as etcd's
 * own clients do (said once); should it turn authentication on, the first request it
 * refuses is sent once more with a token. Messages never hold the password.
 *
 *     EtcdUnavailable     etcd did not answer, or not with its gateway's JSON: a connection
 *      │                  refused, reset or timed out, or closed mid-TLS-handshake (a flaky
 *      │                  etcd or load balancer): tried again about every second
 *      └── EtcdRefused    etcd answered and turned the plugin away: a TLS alert (it does
 *                         not trust the plugin's certificate, or got none), a certificate of
 *                         etcd's the plugin does not trust, a port that does not speak TLS,
 *                         a wrong user name or password, a user that may not write the
 *                         prefix: tried again after waits that double (registry.ts)
 */
import { readFileSync } from 'node:fs';
import * as http from 'node:http';
import * as https from 'node:https';
import { X509Certificate } from 'node:crypto';
import { isIP } from 'node:net';
import { createSecureContext } from 'node:tls';
import { shown } from './log';
import { type RegistryConfig, REGISTER_ETCD_PASSWORD_ENV, SETTING_CA_FILE, SETTING_CERT_FILE, SETTING_KEY_FILE, SETTING_USER } from './registryflags';

/** The largest answer read from etcd: its answers here are a few hundred bytes. */
const MAX_ETCD_ANSWER = 1 << 20;

/** gRPC status codes etcd's gateway reports: "code" in a unary answer, "error.grpc_code" in a stream's (the lease keepalive's). */
const CODE_INVALID_ARGUMENT = 3; // authentication failed: a wrong user name or password
const CODE_PERMISSION_DENIED = 7; // the user may not do this
const CODE_FAILED_PRECONDITION = 9; // authentication is not enabled
const CODE_UNAUTHENTICATED = 16; // invalid auth token: expired unused, or etcd restarted

/** etcd did not answer, or not with its gateway's JSON. */
export class EtcdUnavailable extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'EtcdUnavailable';
  }
}

/** etcd answered and turned the plugin away. Retried as an outage is, after longer waits: an operator may mend etcd's side while the plugin serves. */
export class EtcdRefused extends EtcdUnavailable {
  constructor(message: string) {
    super(message);
    this.name = 'EtcdRefused';
  }
}

/** A registry setting that cannot work: the plugin exits with status 1 before it serves. */
export class RegistrySettingError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'RegistrySettingError';
  }
}

/** An answer of etcd's gateway: a JSON object. */
export type Answer = Record<string, unknown>;

/** How messages name the settings of etcd's access, as they were given. */
interface AccessNames {
  caFile: string;
  certFile: string;
  keyFile: string;
  user: string;
}

/** 127.0.0.0/8, ::1 (an IPv4-mapped loopback too), localhost: hosts this machine's own traffic never leaves. */
export function isLoopback(host: string): boolean {
  const bare = host.startsWith('[') && host.endsWith(']') ? host.slice(1, -1) : host;
  if (bare === 'localhost') return true;
  if (isIP(bare) === 4) return bare.startsWith('127.');
  if (isIP(bare) === 6) {
    const normal = new URL(`http://[${bare}]/`).hostname; // [::1], [::ffff:7f00:1]
    if (normal === '[::1]') return true;
    const mapped = /^\[::ffff:([0-9a-f]{1,4}):[0-9a-f]{1,4}\]$/.exec(normal);
    return mapped !== null && parseInt(mapped[1]!, 16) >> 8 === 127;
  }
  return false;
}

/** The PEM certificates in `text`, each parsed; throws when there is none or one does not parse. */
function pemCertificates(text: string): string[] {
  const blocks = text.match(/-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/g) ?? [];
  for (const block of blocks) new X509Certificate(block);
  return blocks;
}

/** node's words for a file it could not read, without the path it repeats. */
function readReason(error: unknown): string {
  const code = (error as NodeJS.ErrnoException)?.code;
  const reasons: Record<string, string> = {
    ENOENT: 'no such file or directory',
    EACCES: 'permission denied',
    EISDIR: 'is a directory',
  };
  return (code && reasons[code]) ?? String((error as Error)?.message ?? error).split('\n')[0]!;
}

/**
 * etcd's gateway as the configured user. One request at a time: the registration's loop
 * alone uses it.
 */
export class EtcdGateway {
  /** The token etcd gave the user; empty before the first request, or when etcd forgot it. */
  private token = '';
  /** etcd answered that its authentication is off: requests go without a token. */
  private authenticationOff = false;
  private readonly agent: http.Agent;

  private constructor(
    /** The etcd's URL, as given, without a last `/`. */
    readonly base: string,
    private readonly url: URL,
    /** Every request ends within this, connecting, writing and reading included. */
    readonly timeoutMs: number,
    private readonly tls: https.AgentOptions | undefined,
    private readonly user: string,
    private readonly password: string,
    private readonly caFile: string,
    private readonly certFile: string,
    private readonly names: AccessNames,
    private readonly say: (message: string) => void,
  ) {
    // Connections kept between renewals, as Go's and Python's clients keep theirs: no TLS
    // handshake every few seconds. No proxy: a registry is reached directly.
    this.agent = tls === undefined ? new http.Agent({ keepAlive: true, maxSockets: 1 }) : new https.Agent({ ...tls, keepAlive: true, maxSockets: 1 });
  }

  /**
   * Checks how etcd at `url` (an http(s) URL) is reached, as `config` says, and returns a
   * gateway whose requests are bounded by `timeoutMs`; `say` tells what is worth knowing
   * but not a failure. Throws a `RegistrySettingError` naming each setting as it was given.
   */
  static from(url: URL, config: RegistryConfig, timeoutMs: number, say: (message: string) => void): EtcdGateway {
    const caFile = config.value(SETTING_CA_FILE);
    const certFile = config.value(SETTING_CERT_FILE);
    const keyFile = config.value(SETTING_KEY_FILE);
    const user = config.value(SETTING_USER);
    const password = config.variable(REGISTER_ETCD_PASSWORD_ENV);
    const names: AccessNames = {
      caFile: config.name(SETTING_CA_FILE),
      certFile: config.name(SETTING_CERT_FILE),
      keyFile: config.name(SETTING_KEY_FILE),
      user: config.name(SETTING_USER),
    };
    const base = url.href.replace(/\/+$/, '');
    if ((user === '') !== (password === '')) {
      const [given, missing] = user === '' ? [REGISTER_ETCD_PASSWORD_ENV, names.user] : [names.user, REGISTER_ETCD_PASSWORD_ENV];
      throw new RegistrySettingError(`${given} needs ${missing} too: etcd takes both or neither`);
    }
    if ((certFile === '') !== (keyFile === '')) {
      const [given, missing] = certFile === '' ? [names.keyFile, names.certFile] : [names.certFile, names.keyFile];
      throw new RegistrySettingError(`${given} needs ${missing} too: a client certificate and its key`);
    }
    let tls: https.AgentOptions | undefined;
    if (url.protocol !== 'https:') {
      for (const [name, file] of [
        [names.caFile, caFile],
        [names.certFile, certFile],
        [names.keyFile, keyFile],
      ] as const) {
        if (file !== '') throw new RegistrySettingError(`${name} is for an https:// etcd, and ${base} is not: use https:// or leave it unset`);
      }
      if (password !== '' && !isLoopback(url.hostname)) {
        throw new RegistrySettingError(
          `${REGISTER_ETCD_PASSWORD_ENV} would cross the network in clear to ${base}: reach etcd over https://, or on a loopback address`,
        );
      }
    } else {
      tls = { minVersion: 'TLSv1.2' };
      if (caFile !== '') {
        let text: string;
        try {
          text = readFileSync(caFile, 'utf8');
        } catch (error) {
          throw new RegistrySettingError(`${names.caFile}: cannot read ${caFile} (${readReason(error)})`);
        }
        let roots: string[];
        try {
          roots = pemCertificates(text);
        } catch {
          roots = [];
        }
        if (roots.length === 0) throw new RegistrySettingError(`${names.caFile}: ${caFile} holds no PEM certificate`);
        tls.ca = roots;
      }
      if (certFile !== '') {
        try {
          tls.cert = readFileSync(certFile, 'utf8');
          tls.key = readFileSync(keyFile, 'utf8');
          if (pemCertificates(tls.cert).length === 0) throw new Error('no PEM certificate');
          // The pair as TLS will use it: a key that does not match, or is encrypted, fails here.
          createSecureContext({ cert: tls.cert, key: tls.key, passphrase: '' });
        } catch (error) {
          throw new RegistrySettingError(
            `${names.certFile} and ${names.keyFile}: cannot read ${certFile} and ${keyFile} as a PEM certificate and its unencrypted key (${readReason(error)})`,
          );
        }
      }
    }
    return new EtcdGateway(base, url, timeoutMs, tls, user, password, caFile, certFile, names, say);
  }

  /** The connections kept for the next request, closed: the registration is over. */
  close(): void {
    this.agent.destroy();
  }

  /**
   * POSTs `body` to `path` as the configured user and resolves to etcd's answer (its error
   * answers are JSON too); rejects with an `EtcdRefused` when etcd turns the user away, an
   * `EtcdUnavailable` when it does not answer.
   */
  async post(path: string, body: Answer): Promise<Answer> {
    if (this.user !== '' && this.token === '' && !this.authenticationOff) await this.authenticate();
    let [status, answer] = await this.exchange(path, body, this.token);
    let code = grpcCode(answer);
    // A token that expired unused or that a restarted etcd forgot; or none, and etcd has
    // turned its authentication on since: a new token, and one more try.
    const stale = status === 401 && code === CODE_UNAUTHENTICATED;
    const tokenless = status === 403 && code === CODE_PERMISSION_DENIED && this.token === '';
    if (this.user !== '' && (stale || tokenless)) {
      this.token = '';
      this.authenticationOff = false;
      await this.authenticate();
      [status, answer] = await this.exchange(path, body, this.token);
      code = grpcCode(answer);
    }
    if ((status === 401 || status === 403) && (code === CODE_UNAUTHENTICATED || code === CODE_PERMISSION_DENIED)) {
      throw this.refusal(path, code, answer);
    }
    return answer;
  }

  /** Sets the user's token, or notes that etcd's authentication is off. */
  private async authenticate(): Promise<void> {
    const [status, answer] = await this.exchange('/v3/auth/authenticate', { name: this.user, password: this.password }, '');
    if (status === 200 && typeof answer.token === 'string' && answer.token !== '') {
      this.token = answer.token;
      return;
    }
    switch (grpcCode(answer)) {
      case CODE_INVALID_ARGUMENT:
        throw new EtcdRefused(
          `etcd at ${this.base} refused user '${this.user}': authentication failed (a wrong user name or ${REGISTER_ETCD_PASSWORD_ENV})`,
        );
      case CODE_FAILED_PRECONDITION: // "authentication is not enabled"
        this.authenticationOff = true;
        this.say(`etcd at ${this.base} has authentication off: registering without user '${this.user}' (${this.names.user} can be unset)`);
        return;
    }
    throw new EtcdUnavailable(`etcd at ${this.base} did not authenticate user '${this.user}'${why(answer)}`);
  }

  private refusal(path: string, code: number, answer: Answer): EtcdRefused {
    if (this.user === '') {
      return new EtcdRefused(
        `etcd at ${this.base} requires a user (${message(answer)}): set ${this.names.user} and ${REGISTER_ETCD_PASSWORD_ENV}`,
      );
    }
    if (code === CODE_PERMISSION_DENIED) {
      return new EtcdRefused(
        `etcd at ${this.base} denies user '${this.user}' ${path} (permission denied): grant the user's role READWRITE on the registry prefix`,
      );
    }
    return new EtcdRefused(`etcd at ${this.base} refused the token it just gave user '${this.user}' (${message(answer)})`);
  }

  /** One POST, with `token` unless it is empty: the status and the JSON answer. A connection kept from before that etcd closed meanwhile is replaced once. */
  private async exchange(path: string, body: Answer, token: string): Promise<[number, Answer]> {
    try {
      return await this.once(path, body, token);
    } catch (error) {
      if (!(error instanceof StaleConnection)) throw error;
      return this.once(path, body, token);
    }
  }

  private once(path: string, body: Answer, token: string): Promise<[number, Answer]> {
    const payload = Buffer.from(JSON.stringify(body));
    const headers: http.OutgoingHttpHeaders = { 'content-type': 'application/json', 'content-length': payload.length };
    if (token !== '') headers.authorization = token;
    const target = new URL(this.url.pathname.replace(/\/+$/, '') + path, this.url);
    const send = this.tls === undefined ? http.request : https.request;
    return new Promise((resolve, reject) => {
      let settled = false;
      const fail = (error: Error): void => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        request.destroy();
        reject(error);
      };
      const request = send(target, { method: 'POST', headers, agent: this.agent }, (response) => {
        const chunks: Buffer[] = [];
        let size = 0;
        response.on('data', (chunk: Buffer) => {
          if (size >= MAX_ETCD_ANSWER) return;
          chunks.push(chunk);
          size += chunk.length;
        });
        response.on('error', (error) => fail(new EtcdUnavailable(`${this.base}: the answer broke off (${error.message})`)));
        response.on('aborted', () => fail(new EtcdUnavailable(`${this.base}: the answer broke off`)));
        response.on('end', () => {
          if (settled) return;
          settled = true;
          clearTimeout(timer);
          let answer: unknown;
          try {
            answer = JSON.parse(Buffer.concat(chunks).subarray(0, MAX_ETCD_ANSWER).toString('utf8'));
          } catch {
            answer = undefined;
          }
          if (typeof answer !== 'object' || answer === null || Array.isArray(answer)) {
            reject(new EtcdUnavailable(`${this.base} answered something that is not a JSON object`));
            return;
          }
          resolve([response.statusCode ?? 0, answer as Answer]);
        });
      });
      const timer = setTimeout(() => fail(new EtcdUnavailable(`${this.base} does not answer within ${this.timeoutMs / 1000}s`)), this.timeoutMs);
      request.on('error', (error: NodeJS.ErrnoException) => {
        // A connection kept from an earlier request that etcd (or what stands before it) had
        // closed: not an outage, a new connection is tried once (node's own advice).
        if (request.reusedSocket && (error.code === 'ECONNRESET' || error.code === 'EPIPE')) fail(new StaleConnection());
        else fail(this.failure(error));
      });
      request.end(payload);
    });
  }

  /**
   * Why a request got no answer: etcd turned the plugin away (an `EtcdRefused`, after which
   * it waits longer to try again), or it does not answer.
   */
  private failure(error: NodeJS.ErrnoException): EtcdUnavailable {
    const code = error.code ?? '';
    const reason = error.message.split('\n')[0];
    if (CERTIFICATE_UNVERIFIED.has(code)) {
      const hint = this.caFile !== '' ? `is ${this.names.caFile} the CA that issued it?` : `name the CA that issued it with ${this.names.caFile}`;
      return new EtcdRefused(`cannot verify etcd's certificate at ${this.base} (${reason}): ${hint}`);
    }
    // etcd's word, a TLS alert: it does not trust the client's certificate, or got none.
    // With TLS 1.3 it may come after the client's side of the handshake is over, as the
    // request is written: OpenSSL reads it there all the same, and node names it so.
    if (/^ERR_SSL_.*ALERT/.test(code)) {
      const hint =
        this.certFile !== '' ? `does etcd trust the certificate of ${this.names.certFile}?` : `etcd may require a client certificate (${this.names.certFile})`;
      return new EtcdRefused(`the TLS handshake with etcd at ${this.base} failed (${alertReason(code, reason)}): ${hint}`);
    }
    // What answered does not speak TLS (an http:// etcd, another service).
    if (code.startsWith('ERR_SSL_')) {
      return new EtcdRefused(`the TLS handshake with etcd at ${this.base} failed (${reason}): is it etcd's TLS port, speaking TLS 1.2 or later?`);
    }
    // Anything else is an etcd that does not answer: a connection refused or reset, or
    // closed mid-handshake by a flaky etcd or load balancer, tried again soon.
    return new EtcdUnavailable(`${this.base} does not answer (${reason})`);
  }
}

/** A connection kept from an earlier request was closed by the peer before this one went: try a new one. */
class StaleConnection extends Error {}

/** The codes node gives a certificate of etcd's that does not verify (OpenSSL's X509_V_ERR_* names, and node's own for a name). */
const CERTIFICATE_UNVERIFIED = new Set([
  'UNABLE_TO_GET_ISSUER_CERT',
  'UNABLE_TO_GET_ISSUER_CERT_LOCALLY',
  'UNABLE_TO_VERIFY_LEAF_SIGNATURE',
  'SELF_SIGNED_CERT_IN_CHAIN',
  'DEPTH_ZERO_SELF_SIGNED_CERT',
  'CERT_SIGNATURE_FAILURE',
  'CERT_NOT_YET_VALID',
  'CERT_HAS_EXPIRED',
  'CERT_UNTRUSTED',
  'CERT_REJECTED',
  'INVALID_CA',
  'INVALID_PURPOSE',
  'PATH_LENGTH_EXCEEDED',
  'HOSTNAME_MISMATCH',
  'ERR_TLS_CERT_ALTNAME_INVALID',
]);

/** An alert as a reader knows it: `ERR_SSL_TLSV13_ALERT_CERTIFICATE_REQUIRED` → "remote error: tls: certificate required" (Go's words). */
function alertReason(code: string, reason: string | undefined): string {
  const alert = /ALERT_(.+)$/.exec(code)?.[1];
  return alert === undefined ? (reason ?? code) : `remote error: tls: ${alert.toLowerCase().replace(/_/g, ' ')}`;
}

/** A number the gateway wrote, as a string (its int64s) or a number; 0 for anything else. */
export function numberOf(value: unknown): number {
  if (typeof value === 'number') return Number.isFinite(value) ? Math.trunc(value) : 0;
  if (typeof value === 'string' && /^-?\d+$/.test(value)) return Number(value);
  return 0;
}

/** The gRPC status code of an error answer, 0 in any other. */
export function grpcCode(answer: Answer): number {
  if ('code' in answer) return numberOf(answer.code);
  const stream = answer.error;
  if (typeof stream === 'object' && stream !== null) return numberOf((stream as Answer).grpc_code);
  return 0;
}

/** etcd's message in an error answer (a stream's is inside "error"), on one line, its unprintable characters escaped, at most 200 characters. */
export function message(answer: Answer): string {
  let text = typeof answer.message === 'string' ? answer.message : '';
  const stream = answer.error;
  if (text === '' && typeof stream === 'object' && stream !== null && typeof (stream as Answer).message === 'string') {
    text = (stream as Answer).message as string;
  }
  // One line, and nothing a terminal would run (etcd's text is what it says, or a liar's).
  return shown(text.split(/\s+/).filter(Boolean).join(' '), 200);
}

/** etcd's message in an error answer as ": <message>" to append, or "". */
export function why(answer: Answer): string {
  const text = message(answer);
  return text === '' ? '' : `: ${text}`;
}
