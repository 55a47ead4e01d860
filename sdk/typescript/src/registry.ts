/**
 * Registration in an etcd registry, where a dispatcher's fleet finds the plugin
 * (docs/registry.md). The contract is the dispatcher's: one key `<prefix>/<instance id>` per
 * instance, on a lease the instance keeps alive, whose value is JSON `{"address":
 * "host:port"}` for a gRPC server. etcd is reached through its v3 JSON gateway
 * (etcdgateway.ts: TLS, a client certificate, one of etcd's users and its token), so the
 * SDK needs no etcd client package. The same contract, flags, variables and messages as
 * the Go SDK's (sdk/go/plugin/registry.go).
 *
 * An etcd that does not answer, or turns the plugin away (its certificate, its user's
 * password or permission), is not fatal: the plugin serves, says so once on stderr and
 * keeps trying, about every second while etcd does not answer, after waits that double up
 * to `REFUSED_RETRY_CAP_MS` while it turns the plugin away (`refusedRetryWait`); it
 * registers again if etcd lost its lease. On SIGTERM or SIGINT the key is deleted and the
 * lease revoked, the server keeps serving `--leave-delay` (`LINCHKIT_LEAVE_DELAY`) seconds
 * (1) while dispatchers learn it left, and then the calls in flight are drained. Every
 * setting has a flag of serve's and a variable (registryflags.ts); every one is checked
 * by `registrationFrom` before the plugin serves.
 */
import { randomBytes } from 'node:crypto';
import { isIP } from 'node:net';
import * as os from 'node:os';
import { type Answer, EtcdGateway, EtcdRefused, RegistrySettingError, numberOf, why } from './etcdgateway';
import { type Logger, log as sdkLog } from './log';
import {
  DEFAULT_LEAVE_DELAY,
  DEFAULT_REGISTER_TTL,
  type RegistryConfig,
  SETTING_ADVERTISE,
  SETTING_ETCD,
  SETTING_LEAVE_DELAY,
  SETTING_PREFIX,
  SETTING_TTL,
} from './registryflags';

/** The longest leave delay, in seconds. */
export const MAX_LEAVE_DELAY = 600;

/**
 * The longest wait between two tries while etcd turns the plugin away. etcd checks a
 * password with bcrypt, tens of milliseconds of a core each time, and a wrong one stays
 * wrong until an operator mends it: a hundred plugins deployed with it and retrying every
 * second would keep several of etcd's cores busy refusing them; at this cap (waits drawn
 * between 15 and 30 s) they cost it about four checks a second. At 30 s every plugin is
 * back within half a minute of the fix.
 */
export const REFUSED_RETRY_CAP_MS = 30_000;

/**
 * The wait after the `refusals`-th refusal in a row (1, 2, ...), in milliseconds: `paceMs`,
 * the wait after an etcd that does not answer, doubled at each refusal up to
 * `REFUSED_RETRY_CAP_MS`, less a random part of up to half of it, so that a fleet turned
 * away at once does not try again in step. `draw` gives a number in [0, 1), the random part.
 */
export function refusedRetryWait(refusals: number, paceMs: number, draw: () => number = Math.random): number {
  const ceiling = refusals < 32 ? Math.min(paceMs * 2 ** refusals, REFUSED_RETRY_CAP_MS) : REFUSED_RETRY_CAP_MS;
  return ceiling * (1 - draw() / 2);
}

/** `scheme://authority…`: the scheme and the authority as written. */
const URL_START = /^([A-Za-z][A-Za-z0-9+.-]*):\/\/([^/?#]*)/;
/** An authority's host (a name, an IPv4 address, an IPv6 one in brackets) and its port, if any. */
const HOST_PORT = /^(\[[^\]]*\]|[^:[\]]*)(?::(\d*))?$/;

/**
 * The etcd to register in (named `name` in a message) as a URL: http(s), no credentials, a
 * valid host and a port, when it has one, in 1-65535. Read from the text as written: node's
 * URL parser reads `http:x` as `http://x` and forgets a default port.
 */
function etcdUrl(text: string, name: string): URL {
  const start = URL_START.exec(text);
  if (start === null || !['http', 'https'].includes(start[1]!.toLowerCase()) || start[2] === '') {
    throw new RegistrySettingError(`${name} must be an http(s):// URL`);
  }
  const authority = start[2]!;
  if (authority.includes('@')) throw new RegistrySettingError(`${name}: etcd authentication by URL credentials is not supported`);
  const hostPort = HOST_PORT.exec(authority);
  const host = hostPort?.[1] ?? '';
  const port = hostPort?.[2];
  const validHost = host.startsWith('[') ? isIP(host.slice(1, -1)) === 6 : host !== '' && !host.replace(/\.$/, '').split('.').includes('');
  let url: URL | undefined;
  try {
    url = new URL(text);
  } catch {
    url = undefined;
  }
  // Dialled, a port over 65535 fails as an outage would, retried every second for ever.
  if (url === undefined || !validHost || (port !== undefined && !(/^\d{1,5}$/.test(port) && Number(port) >= 1 && Number(port) <= 65535))) {
    throw new RegistrySettingError(`${name}: the etcd to register in must have a valid host name and a port in 1-65535`);
  }
  return url;
}

/** Whether `host` (brackets allowed) is every interface: 0.0.0.0, ::, and their spellings. */
export function isUnspecified(host: string): boolean {
  const bare = host.startsWith('[') && host.endsWith(']') ? host.slice(1, -1) : host;
  if (isIP(bare) === 4) return bare === '0.0.0.0';
  if (isIP(bare) === 6) return ['[::]', '[::ffff:0:0]'].includes(new URL(`http://[${bare}]/`).hostname);
  return false;
}

/**
 * The address to advertise (`host:port`, named `name` in a message) or where the server
 * listens (`host`, as given to `--address`, and the port it got), unless that is every
 * interface, which no dispatcher can call.
 */
export function advertisedAddress(advertise: string, name: string, host: string, port: number): string {
  if (advertise !== '') {
    if (advertise.includes('://')) throw new RegistrySettingError(`${name}: advertise a gRPC server as host:port, not a URL`);
    const colon = advertise.lastIndexOf(':');
    const advertisedHost = colon < 0 ? '' : advertise.slice(0, colon);
    const advertisedPort = colon < 0 ? '' : advertise.slice(colon + 1);
    const bracketed = advertisedHost.startsWith('[') && advertisedHost.endsWith(']');
    const hostOk =
      advertisedHost !== '' && (bracketed ? isIP(advertisedHost.slice(1, -1)) === 6 : !advertisedHost.includes(':') && !/[\s/?#@[\]]/.test(advertisedHost));
    if (!hostOk || !/^\d{1,5}$/.test(advertisedPort) || Number(advertisedPort) < 1 || Number(advertisedPort) > 65535) {
      throw new RegistrySettingError(`${name} must be host:port, got ${JSON.stringify(advertise)}`);
    }
    if (isUnspecified(advertisedHost)) {
      throw new RegistrySettingError(`${name} must name an address others can call, not ${advertisedHost.replace(/^\[|\]$/g, '')}`);
    }
    return advertise;
  }
  const listening = `${host.includes(':') ? `[${host}]` : host}:${port}`;
  if (isUnspecified(host)) {
    throw new RegistrySettingError(
      `this server listens on ${listening}, which no dispatcher can call: say where it is reached with ${name}, e.g. 10.0.0.5:50051`,
    );
  }
  return listening;
}

/** The leave delay (named `name` in a message) in seconds: [0, 600], 1 when unset. */
export function leaveDelayFrom(text: string, name: string): number {
  if (text === '') return DEFAULT_LEAVE_DELAY;
  const seconds = /^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$/.test(text.trim()) ? Number(text) : NaN;
  if (!(seconds >= 0 && seconds <= MAX_LEAVE_DELAY)) {
    // NaN fails too
    throw new RegistrySettingError(`${name} must be a number of seconds in [0, 600]; got ${JSON.stringify(text)}`);
  }
  return seconds;
}

/**
 * Unique and readable: `<hostname>-<pid>-<6 hex>`, the random part for restarts that reuse
 * a pid (containers are often pid 1).
 */
export function instanceId(): string {
  const clean = os.hostname().replace(/[^A-Za-z0-9._-]/g, '-') || 'plugin';
  return `${clean}-${process.pid}-${randomBytes(3).toString('hex')}`;
}

/** Where the gRPC service listens, as `serve` bound it. */
export interface Listening {
  /** The host given to `--address`, without the brackets of an IPv6 address. */
  host: string;
  port: number;
}

/**
 * Undefined without an etcd (`--register-etcd`, `LINCHKIT_REGISTER_ETCD`); otherwise every
 * setting is checked, so that a mistake stops the plugin before it serves (a
 * `RegistrySettingError`, one line).
 */
export function registrationFrom(config: RegistryConfig, listening: Listening, logger: Logger = sdkLog): Registration | undefined {
  const base = config.value(SETTING_ETCD);
  if (base === '') return undefined;
  const etcdName = config.name(SETTING_ETCD);
  const url = etcdUrl(base, etcdName);
  const prefix = config.value(SETTING_PREFIX);
  if (prefix === '') throw new RegistrySettingError(`${etcdName} needs ${config.name(SETTING_PREFIX)}`);
  if (prefix.length < 2 || !prefix.startsWith('/') || prefix.endsWith('/') || /[ \t\r\n]/.test(prefix)) {
    throw new RegistrySettingError(
      `${config.name(SETTING_PREFIX)} must start with / and not end with one, e.g. /linchkit/plugins/echo; got ${JSON.stringify(prefix)}`,
    );
  }
  let ttl = DEFAULT_REGISTER_TTL;
  const ttlText = config.value(SETTING_TTL);
  if (ttlText !== '') {
    ttl = /^[+-]?\d+$/.test(ttlText) ? Number(ttlText) : NaN;
    if (!(ttl >= 2) || !Number.isSafeInteger(ttl)) {
      throw new RegistrySettingError(`${config.name(SETTING_TTL)} must be a whole number of seconds, at least 2; got ${JSON.stringify(ttlText)}`);
    }
  }
  const leaveDelay = leaveDelayFrom(config.value(SETTING_LEAVE_DELAY), config.name(SETTING_LEAVE_DELAY));
  const address = advertisedAddress(config.value(SETTING_ADVERTISE), config.name(SETTING_ADVERTISE), listening.host, listening.port);
  // Each request is bounded well inside a renewal period.
  const timeoutMs = Math.min(Math.max(Math.floor(ttl / 3), 1), 5) * 1000;
  const gateway = EtcdGateway.from(url, config, timeoutMs, (message) => logger.warn(message));
  return new Registration(gateway, `${prefix}/${instanceId()}`, JSON.stringify({ address }), ttl, leaveDelay, logger);
}

/** What the last try came to, so that an outage is said once and said again only when the trouble changes. */
type Trouble = 'fine' | 'unavailable' | 'refused';

/**
 * How the loop waits between two tries: calls `done` after `ms` milliseconds, and returns
 * what calls it at once (a stop). A test passes its own to see the waits asked for without
 * taking them.
 */
export type Pause = (ms: number, done: () => void) => () => void;

const timerPause: Pause = (ms, done) => {
  const timer = setTimeout(done, ms);
  return () => {
    clearTimeout(timer);
    done();
  };
};

const base64 = (text: string): string => Buffer.from(text, 'utf8').toString('base64');

/**
 * One instance's key in the registry, kept while the plugin serves: `start()` once it
 * listens, `deregister()` at a stop. Owns its loop and its connections: `deregister()` ends
 * both.
 */
export class Registration {
  /** The lease the key is on, as etcd wrote its ID (an int64, kept as text); '' for none. */
  private lease = '';
  /** Whether the key is put on `lease`. */
  private written = false;
  private trouble: Trouble = 'fine';
  /** Refusals since etcd last admitted the plugin: an outage between two of them does not start the waits again from a second. */
  private refusals = 0;
  private stopping = false;
  private wake: () => void = () => undefined;
  private running: Promise<void> | undefined;

  constructor(
    private readonly etcd: EtcdGateway,
    /** `<prefix>/<instance id>`. */
    readonly key: string,
    /** The JSON value written under the key. */
    readonly value: string,
    /** The lease's TTL, in seconds. */
    readonly ttl: number,
    /** Seconds `deregister()` waits after leaving, still serving. */
    readonly leaveDelay: number,
    private readonly logger: Logger,
    private readonly pause: Pause = timerPause,
  ) {}

  /** Begins registering (in the background): the server listens. */
  start(): void {
    this.running ??= this.run();
  }

  /**
   * Deletes the key and revokes the lease, and resolves once that is done or bounded time
   * has passed, and then `leaveDelay` later: the server serves meanwhile.
   */
  async deregister(): Promise<void> {
    this.stopping = true;
    this.wake();
    // A new token costs two quick requests more; an etcd that hangs is not waited for past this bound.
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([
      this.running ?? Promise.resolve(),
      new Promise<void>((resolve) => {
        timer = setTimeout(resolve, 4 * this.etcd.timeoutMs + 1000);
      }),
    ]);
    clearTimeout(timer);
    this.etcd.close();
    await new Promise<void>((resolve) => setTimeout(resolve, this.leaveDelay * 1000));
  }

  toString(): string {
    return `Registration(${this.key}, lease ${this.lease || 'none'}, ${this.written ? 'registered' : 'not registered'}, ${this.trouble})`;
  }

  private async run(): Promise<void> {
    const renewEvery = (this.ttl * 1000) / 3;
    const pace = Math.min(renewEvery, 1000);
    while (!this.stopping) {
      let wait = renewEvery;
      try {
        await this.renew();
        if (this.trouble !== 'fine') this.logger.info(`etcd answers again: ${this.key} is registered`);
        this.trouble = 'fine';
        this.refusals = 0;
      } catch (error) {
        const kind: Trouble = error instanceof EtcdRefused ? 'refused' : 'unavailable';
        if (kind !== this.trouble) {
          this.logger.warn(`cannot register ${this.key} in etcd: ${(error as Error).message}; serving anyway and trying again`);
        }
        this.trouble = kind;
        wait = pace;
        if (kind === 'refused') {
          this.refusals += 1;
          wait = refusedRetryWait(this.refusals, pace);
        }
      }
      if (this.stopping) break;
      await new Promise<void>((resolve) => {
        this.wake = this.pause(wait, resolve);
      });
    }
    await this.leave();
  }

  private async renew(): Promise<void> {
    if (this.lease !== '') {
      const answer = await this.etcd.post('/v3/lease/keepalive', { ID: this.lease });
      const result = answer.result;
      if (typeof result !== 'object' || result === null) throw new Error(`etcd did not renew the lease${why(answer)}`);
      if (numberOf((result as Answer).TTL) <= 0) {
        // A lease no key was put on (etcd refused the key) ends unrenewed while the plugin
        // waits to try again, as expected: only a registered key is news.
        if (this.written) this.logger.warn(`etcd lost the lease of ${this.key} (restarted?): registering again`);
        this.lease = '';
        this.written = false;
      }
    }
    if (this.lease === '') {
      const answer = await this.etcd.post('/v3/lease/grant', { TTL: this.ttl });
      const id = leaseId(answer.ID);
      if (id === '') throw new Error(`etcd granted no lease${why(answer)}`);
      this.lease = id;
    }
    if (!this.written) {
      const answer = await this.etcd.post('/v3/kv/put', { key: base64(this.key), value: base64(this.value), lease: this.lease });
      if (!('header' in answer)) {
        // e.g. the lease ended between grant and put
        this.lease = '';
        throw new Error(`etcd refused the registration${why(answer)}`);
      }
      this.written = true;
      this.logger.info(`registered ${this.key} in etcd at ${this.etcd.base}`);
    }
  }

  private async leave(): Promise<void> {
    if (this.lease === '') return;
    const lease = { ID: this.lease };
    if (!this.written) {
      // a lease for a key etcd refused (permission): let it go quietly
      await this.etcd.post('/v3/lease/revoke', lease).catch(() => undefined);
      return;
    }
    // The key first: a dispatcher stops calling this instance from that moment.
    await this.etcd.post('/v3/kv/deleterange', { key: base64(this.key) }).catch(() => undefined);
    try {
      await this.etcd.post('/v3/lease/revoke', lease);
    } catch (error) {
      this.logger.warn(`cannot deregister ${this.key}: ${(error as Error).message}; it leaves the registry when its lease ends, within ${this.ttl} s`);
      return;
    }
    this.logger.info(`deregistered ${this.key}`);
  }
}

/** A lease ID as the gateway wrote it (an int64 as text, or a number), '' for none or 0. */
function leaseId(value: unknown): string {
  if (typeof value === 'string' && /^-?\d+$/.test(value) && !/^-?0+$/.test(value)) return value;
  if (typeof value === 'number' && Number.isSafeInteger(value) && value !== 0) return String(value);
  return '';
}
