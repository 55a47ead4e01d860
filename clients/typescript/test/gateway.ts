/**
 * A real `dispatcher serve` for the tests: a manifest in a temp folder with the repo's
 * example plugins (the echo plugin in-process, the eventful plugin, the Python example
 * plugin as a subprocess for host events), started as a child process on a port, stopped
 * with SIGTERM (it drains and closes WebSockets with 1001) and started again on the same port.
 */

import { ChildProcess, spawn } from 'node:child_process';
import { createConnection, createServer, Server, Socket } from 'node:net';
import { createHash } from 'node:crypto';
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';

/** The checkout: dist/lib/test → clients/typescript → the repository root. */
export const ROOT = process.env.LINCHKIT_ROOT ?? resolve(__dirname, '..', '..', '..', '..', '..');

/** The interpreter that has the dispatcher installed (the pytest wrapper passes its own). */
export const PYTHON =
  process.env.LINCHKIT_PYTHON ??
  [process.env.VENV && join(process.env.VENV, 'bin', 'python'), join(ROOT, '.venv', 'bin', 'python')].find(
    (candidate): candidate is string => typeof candidate === 'string' && existsSync(candidate),
  ) ??
  'python3';

export const API_KEY = 'host-client-test-key-that-must-not-leak';

const SAY_SCHEMA = {
  type: 'object',
  properties: { text: { type: 'string', maxLength: 1000 } },
  required: ['text'],
  additionalProperties: false,
};

export interface GatewayOptions {
  auth?: boolean;
  /** Keep state (and async jobs, run by one worker) on this Redis. */
  redisUrl?: string;
  /** Serve the eventful plugin in 2.0.0 beside 1.0.0, as during a rollout: both emit. */
  twoEventVersions?: boolean;
  /** The gateway's `max_connections_per_peer`: calls past it from one address are refused. */
  maxConnectionsPerPeer?: number;
  /** Accept bearer tokens signed by the keys of this JWKS file (no leeway on `exp`). */
  jwks?: string;
  /** The echo plugin's `sleep` method's own `timeout_ms` (default: the manifest's, 30 s). */
  sleepTimeoutMs?: number;
}

export function manifest(options: GatewayOptions = {}): Record<string, unknown> {
  const document: Record<string, unknown> = {
    version: 1,
    plugins: [
      {
        id: 'echo',
        version: '1.0.0',
        config: { greeting: 'via gateway' },
        target: { provider: 'local', entrypoint: 'echo_plugin:EchoPlugin', path: join(ROOT, 'examples', 'python') },
        methods: {
          say: { params_schema: SAY_SCHEMA, description: 'Echo text back' },
          sleep: options.sleepTimeoutMs === undefined ? {} : { timeout_ms: options.sleepTimeoutMs },
          withdraw: {},
        },
      },
      {
        id: 'events',
        version: '1.0.0',
        target: { provider: 'local', entrypoint: 'eventful_plugin:EventfulPlugin', path: join(ROOT, 'tests', 'plugins') },
        methods: { burst: {} },
      },
      {
        id: 'example',
        version: '1.0.0',
        target: { provider: 'subprocess', command: [PYTHON, join(ROOT, 'sdk', 'python', 'examples', 'example_plugin.py')] },
        methods: { echo: {}, emit: {} },
      },
    ],
  };
  if (options.twoEventVersions) {
    const plugins = document.plugins as Record<string, unknown>[];
    const events = plugins.find((plugin) => plugin.id === 'events');
    plugins.push({ ...events, version: '2.0.0' });
  }
  if (options.redisUrl !== undefined) {
    // A Redis operation gets 2 s, not the default 200 ms: on a loaded test machine the
    // first one (connecting) took longer, and the store then refused every job for a second.
    document.state = {
      backend: 'redis',
      url: options.redisUrl,
      key_prefix: `ts-${process.pid}-${Date.now()}`,
      op_timeout_ms: 2000,
    };
    document.jobs = { workers: 1 };
  }
  if (options.maxConnectionsPerPeer !== undefined) {
    document.gateway = { max_connections_per_peer: options.maxConnectionsPerPeer };
  }
  if (options.jwks !== undefined) {
    document.auth = { jwt: { jwks: options.jwks, algorithms: ['RS256'], leeway_s: 0 } };
    document.access = { roles: { host: { allow: ['*'] } } };
  }
  if (options.auth) {
    const sha256 = createHash('sha256').update(API_KEY, 'utf8').digest('hex');
    document.auth = { api_keys: [{ principal: 'ts-host', sha256, roles: ['host'] }] };
    document.access = { roles: { host: { allow: ['*'] } } };
  }
  return document;
}

export class Gateway {
  readonly folder: string;
  readonly manifestPath: string;
  url = '';
  port = 0;
  #process: ChildProcess | undefined;
  #stderr = '';

  constructor(options: GatewayOptions = {}) {
    this.folder = mkdtempSync(join(tmpdir(), 'linchkit-ts-client-'));
    this.manifestPath = join(this.folder, 'plugins.yaml');
    // JSON is YAML: no YAML writer needed.
    writeFileSync(this.manifestPath, JSON.stringify(manifest(options), null, 2));
  }

  /** Start `dispatcher serve` (on the port it had, after a restart); resolves once it listens. */
  async start(): Promise<void> {
    const pythonPath = [ROOT, join(ROOT, 'sdk', 'python'), process.env.PYTHONPATH].filter(Boolean).join(':');
    const child = spawn(
      PYTHON,
      ['-m', 'dispatcher.cli', '-m', this.manifestPath, 'serve', '--port', String(this.port), '--grace', '2'],
      { cwd: this.folder, env: { ...process.env, PYTHONPATH: pythonPath }, stdio: ['ignore', 'pipe', 'pipe'] },
    );
    this.#process = child;
    this.#stderr = '';
    child.stderr?.on('data', (chunk: Buffer) => {
      this.#stderr = (this.#stderr + chunk.toString()).slice(-20_000);
    });
    this.url = await new Promise<string>((resolveUrl, reject) => {
      let out = '';
      const timer = setTimeout(() => reject(new Error(`dispatcher serve did not listen in 60 s:\n${this.#stderr}`)), 60_000);
      child.stdout?.on('data', (chunk: Buffer) => {
        out += chunk.toString();
        const match = /listening on (\S+)/.exec(out);
        if (match?.[1] !== undefined) {
          clearTimeout(timer);
          resolveUrl(match[1]);
        }
      });
      child.once('exit', (code) => {
        clearTimeout(timer);
        reject(new Error(`dispatcher serve exited ${code} before listening:\n${this.#stderr}`));
      });
    });
    this.port = Number(new URL(this.url).port);
  }

  /** SIGTERM: the gateway drains, closes its WebSockets (1001) and exits. */
  async stop(): Promise<void> {
    const child = this.#process;
    this.#process = undefined;
    if (child === undefined || child.exitCode !== null || child.signalCode !== null) return;
    const exited = new Promise<void>((done) => child.once('exit', () => done()));
    child.kill('SIGTERM');
    const timer = setTimeout(() => child.kill('SIGKILL'), 20_000);
    await exited;
    clearTimeout(timer);
  }

  /** SIGKILL: the gateway dies at once, its connections cut with whatever they carried. */
  async kill(): Promise<void> {
    const child = this.#process;
    this.#process = undefined;
    if (child === undefined || child.exitCode !== null || child.signalCode !== null) return;
    const exited = new Promise<void>((done) => child.once('exit', () => done()));
    child.kill('SIGKILL');
    await exited;
  }

  async restart(): Promise<void> {
    await this.stop();
    await this.start();
  }

  async close(): Promise<void> {
    await this.stop();
    rmSync(this.folder, { recursive: true, force: true });
  }

  get stderr(): string {
    return this.#stderr;
  }
}

/** Resolve once `check()` holds, polling; fail after `timeoutMs` with `what`. */
export async function eventually(check: () => boolean, what: string, timeoutMs = 20_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((done) => setTimeout(done, 20));
  }
}

/** A `redis-server` of the test's own on a free loopback port, without persistence. */
export class RedisServer {
  #process: ChildProcess | undefined;
  url = '';

  async start(): Promise<void> {
    const port = await new Promise<number>((resolvePort, reject) => {
      const probe = createServer();
      probe.once('error', reject);
      probe.listen(0, '127.0.0.1', () => {
        const address = probe.address();
        probe.close(() => resolvePort(typeof address === 'object' && address ? address.port : 0));
      });
    });
    const child = spawn('redis-server', ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no'], {
      cwd: tmpdir(),
      stdio: ['ignore', 'pipe', 'ignore'],
    });
    this.#process = child;
    await new Promise<void>((ready, reject) => {
      let out = '';
      const timer = setTimeout(() => reject(new Error('redis-server did not start in 20 s')), 20_000);
      child.stdout?.on('data', (chunk: Buffer) => {
        out += chunk.toString();
        if (out.includes('Ready to accept connections')) {
          clearTimeout(timer);
          ready();
        }
      });
    });
    this.url = `redis://127.0.0.1:${port}/0`;
  }

  async stop(): Promise<void> {
    const child = this.#process;
    this.#process = undefined;
    if (child === undefined || child.exitCode !== null) return;
    const exited = new Promise<void>((done) => child.once('exit', () => done()));
    child.kill('SIGKILL');
    await exited;
  }
}

/** A TCP relay to the gateway that the test can cut, and refuse connections through. */
export class Relay {
  readonly #server: Server;
  readonly #sockets = new Set<Socket>();
  refusing = false;
  port = 0;
  /** Connections accepted so far (refused ones included). */
  connections = 0;

  constructor(target: () => number) {
    this.#server = createServer((client) => {
      this.connections += 1;
      if (this.refusing) {
        client.destroy();
        return;
      }
      const upstream = createConnection(target(), '127.0.0.1');
      for (const [from, to] of [
        [client, upstream],
        [upstream, client],
      ] as const) {
        this.#sockets.add(from);
        from.pipe(to);
        from.on('error', () => to.destroy());
        from.on('close', () => {
          this.#sockets.delete(from);
          to.destroy();
        });
      }
    });
  }

  async listen(): Promise<string> {
    await new Promise<void>((done) => this.#server.listen(0, '127.0.0.1', done));
    this.port = (this.#server.address() as { port: number }).port;
    return `http://127.0.0.1:${this.port}`;
  }

  /** Drop every connection now, as a network cut would (no close frame). */
  cut(): void {
    for (const socket of this.#sockets) socket.destroy();
  }

  async close(): Promise<void> {
    this.cut();
    await new Promise((done) => this.#server.close(done));
  }
}
