/**
 * The plugin executable's entry point: `serve(plugin)` picks the mode from argv and env.
 *
 * - `serve --address 127.0.0.1:0`: a plain gRPC service; prints `1|1|tcp|ADDR|grpc|`. With
 *   `LINCHKIT_PLUGIN_TOKEN_FILE` or `LINCHKIT_PLUGIN_TOKEN` set, every RPC but health's needs
 *   `authorization: Bearer <token>` (auth.ts); without either it serves anyone and warns.
 *   With `--register-etcd` (or `LINCHKIT_REGISTER_ETCD`) it registers in etcd while it serves
 *   and leaves before it drains (registry.ts; every setting checked before serving).
 * - no arguments: a subprocess plugin started by the host with the handshake environment
 *   (docs/protocol.md): cookie, version negotiation, Unix socket or TCP, AutoMTLS. It exits
 *   when its stdin reaches end-of-file, which happens however the host dies. The token
 *   variables are not read: AutoMTLS admits only the host that launched the plugin.
 * - `serve --websocket --address 127.0.0.1:0 [--config JSON]`: a WebSocket server the
 *   dispatcher dials (`provider: websocket`); prints `1|1|tcp|ADDR|websocket|`. Told to
 *   register in etcd, it refuses in one line: no dispatcher finds it in a registry.
 * - `connect --url ws://gateway/v1/plugins/connect [--config JSON]`: reverse mode, the
 *   plugin dials the gateway with the token of the variables above (websocket.ts). A URL
 *   that can never reach a gateway (no scheme, not ws/wss, no host) ends in one line and
 *   exit 1 (connect.ts), as does `LINCHKIT_REGISTER_ETCD` set (a plugin that dials the
 *   gateway registers nowhere); an unreachable gateway is dialled again. `connect --help` too.
 * The WebSocket modes run the plugin's own lifecycle with `--config` (no Init RPC there).
 * `serve --help` prints the flags and the environment; a mistyped `--address` or a failed
 * listen ends in one line on stderr and exit 1 (listen.ts), as in every SDK.
 * All stop gracefully on SIGTERM or SIGINT, waiting `LINCHKIT_PLUGIN_STOP_GRACE_MS` for the
 * calls in flight and `LINCHKIT_PLUGIN_STOP_HOOKS_MS` for the hooks (stopcaps.ts: 5 s each
 * unless set; read once at start, a malformed value refused in one line and exit 1). With an
 * OTLP endpoint in the environment
 * (`OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`), calls and streams
 * are traced in every mode (tracing.ts) and the last spans are sent before exiting.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { BearerToken, TOKEN_ENV, TOKEN_FILE_ENV } from './auth';
import { type HandshakeConfig, HandshakeError, SERVE_USAGE, handshakeLine, parseCommand, readHandshakeEnv } from './handshake';
import { CONNECT_USAGE, parseConnectCommand, registrationRefusal } from './connect';
import { CLIENT_CERT_ENV, CLIENT_KEY_ENV, type ClientTls, GATEWAY_CA_ENV, clientTls } from './connecttls';
import { DEFAULT_ADDRESS, ListenError, cannotListen, parseListenAddress } from './listen';
import { Logger, log, routeConsole } from './log';
import type { Plugin } from './plugin';
import { PluginServer } from './server';
import { RegistrySettingError } from './etcdgateway';
import { type Registration, registrationFrom } from './registry';
import { REGISTER_ETCD_PASSWORD_ENV, RegistryConfig, SETTING_ETCD, registryHelp } from './registryflags';
import { OTLP_ENDPOINT_ENV, OTLP_TRACES_ENDPOINT_ENV, Tracing } from './tracing';
import { generateServerCertificate } from './tls';
import { MAX_STOP_MS, STOP_GRACE_ENV, STOP_HOOKS_ENV, STOP_HOOKS_MS, type StopCaps, stopCapsFrom } from './stopcaps';
import { Refused, WebSocketPluginServer, dial } from './websocket';

export { STOP_GRACE_MS, STOP_HOOKS_MS } from './stopcaps';

export interface ServeOptions {
  argv?: readonly string[];
  env?: NodeJS.ProcessEnv;
  /**
   * The plugin's own stop grace, in whole milliseconds (default `STOP_GRACE_MS`, 5 s): how long
   * the calls in flight get at a stop. `LINCHKIT_PLUGIN_STOP_GRACE_MS` overrides it.
   */
  stopGraceMs?: number;
  /**
   * The plugin's own cap on the stop and destroy hooks together, in whole milliseconds (default
   * `STOP_HOOKS_MS`, 5 s). `LINCHKIT_PLUGIN_STOP_HOOKS_MS` overrides it.
   */
  stopHooksMs?: number;
}

/** Serve `plugin` until the host stops it; never returns normally (the process exits), but for `serve --help`. */
export async function serve(plugin: Plugin, options: ServeOptions = {}): Promise<void> {
  const argv = options.argv ?? process.argv.slice(2);
  const env = options.env ?? process.env;
  // Read once, at start, in every mode: a malformed value ends the plugin before it serves.
  const caps = (prefix: string): StopCaps => stopCapsFrom(env, { graceMs: options.stopGraceMs, hooksMs: options.stopHooksMs }, prefix);
  try {
    if (argv[0] === 'connect') {
      const command = parseConnectCommand(argv);
      const refusal = command.mode === 'help' ? undefined : registrationRefusal(env);
      if (refusal !== undefined) throw refusal; // before the hooks, before the dial
      if (command.mode === 'help') process.stdout.write(connectHelp());
      else {
        const tls = clientTls(command.url, command.tls, env); // its files checked before the hooks run
        await connectToGateway(plugin, command.url, command.config, env, caps('connect: '), Tracing.fromEnv(env, plugin), tls);
      }
      return;
    }
    const command = parseCommand(argv);
    if (command.mode === 'help') {
      process.stdout.write(serveHelp());
      return;
    }
    if (command.mode === 'websocket') {
      const registry = new RegistryConfig(command.registry, env);
      if (registry.value(SETTING_ETCD) !== '') {
        // Refused, not ignored: an operator who set it expects the plugin to be found there.
        throw new HandshakeError(
          `serve: ${registry.name(SETTING_ETCD)}: a WebSocket server is not registered in etcd, as a dispatcher dials ` +
            'a websocket target at its one url and finds none in a registry: serve over gRPC to be found there, or leave it unset',
        );
      }
      // Any other registry flag with a value: refused too, not dropped (the operator would
      // believe it in force). An empty one says "none", over a variable.
      const flag = [...command.registry].find(([, value]) => value !== '')?.[0];
      if (flag !== undefined) {
        throw new HandshakeError(
          `serve: --${flag}: a WebSocket server is not registered, as a dispatcher dials a websocket target at its ` +
            'one url and finds none in a registry: serve over gRPC to be registered, or leave the flag out',
        );
      }
      await serveOverWebSocket(plugin, command.address, command.config, env, caps('serve: '), Tracing.fromEnv(env, plugin));
      return;
    }
    if (command.mode === 'service') {
      const stopCaps = caps('serve: ');
      const registry = new RegistryConfig(command.registry, env);
      await serveService(plugin, command.address, registry, BearerToken.configured(env), Tracing.fromEnv(env, plugin), stopCaps);
    } else {
      // The handshake first, as every SDK does: run by hand, without the cookie, the plugin
      // says that the dispatcher starts it, whatever else the environment holds.
      const config = readHandshakeEnv(env);
      const stopCaps = caps('');
      await serveSubprocess(plugin, config, Tracing.fromEnv(env, plugin), stopCaps);
    }
  } catch (error) {
    process.stderr.write(`${messageFor(error)}\n`);
    process.exit(1);
  }
}

/** A mistake of the operator's or the host's is one line; anything else is a bug, with its stack. */
function messageFor(error: unknown): string {
  if (error instanceof HandshakeError || error instanceof ListenError) return error.message;
  if (error instanceof RegistrySettingError) return `serve: ${error.message}`;
  return String((error as Error)?.stack ?? error);
}

/** `serve --help`: the flags, and the environment serve mode reads (where a deployment sets the rest). */
function serveHelp(): string {
  const program = path.basename(process.argv[1] ?? 'plugin', '.js');
  return `usage: ${program} ${SERVE_USAGE}

Serve the plugin until SIGTERM or Ctrl+C: a gRPC service, or with --websocket a WebSocket
server the dispatcher dials. Once listening it prints one line: 1|1|tcp|HOST:PORT|grpc|
(or |websocket|). Without arguments it is a subprocess plugin, started by the dispatcher.

options:
  --address HOST:PORT  where to listen (default ${DEFAULT_ADDRESS}); port 0 takes any free
                       port; an IPv6 address in brackets: [::1]:0
  --websocket          serve over WebSocket instead of gRPC
  --config JSON        with --websocket: the object the plugin's init hooks get (default {});
                       a gRPC service gets it from the dispatcher's Init call
  -h, --help           this help

registering in etcd, where a dispatcher's fleet finds the gRPC service (docs/registry.md;
each flag reads its variable when not given):
${registryHelp()}
environment (docs/registry.md, docs/security.md, docs/observability.md):
  ${TOKEN_FILE_ENV}, ${TOKEN_ENV}
      the bearer token every call must carry, from a file (a mounted secret) or the
      variable, not both; without either anybody who can reach the address may call
  ${REGISTER_ETCD_PASSWORD_ENV}
      the password of --register-etcd-user: no flag takes it, a command line shows in ps
  ${OTLP_TRACES_ENDPOINT_ENV}, ${OTLP_ENDPOINT_ENV}
      export a span per call and per stream over OTLP/HTTP, gRPC and WebSocket alike
      (the first is the full URL, the second a base URL + /v1/traces)
  OTEL_SERVICE_NAME, OTEL_SDK_DISABLED, OTEL_EXPORTER_OTLP_HEADERS, OTEL_BSP_*
      the traced service's name (default the plugin id), true to turn tracing off, the
      collector's headers, span batching
  ${STOP_GRACE_ENV}, ${STOP_HOOKS_ENV}
      on SIGTERM, the milliseconds the calls in flight get to finish, then the stop and
      destroy hooks together, 0-${MAX_STOP_MS} (default ${STOP_HOOKS_MS} each; 0 does not wait)
  LINCHKIT_PLUGIN_PROTO
      where plugin.proto is, when not next to the SDK
`;
}

/** `connect --help`: the flags, and the environment reverse mode reads. */
function connectHelp(): string {
  const program = path.basename(process.argv[1] ?? 'plugin', '.js');
  return `usage: ${program} ${CONNECT_USAGE}

Reverse mode: dial the dispatcher's gateway over WebSocket and serve its calls until SIGTERM
or Ctrl+C. A gateway that cannot be reached (yet) is dialled again with backoff and jitter;
one that refuses the plugin (400, 401, 403, 404) ends it with exit 1.

options:
  --url URL      the gateway's plugin endpoint: ws://HOST:PORT/v1/plugins/connect, or
                 wss:// for TLS (http:// and https:// are taken as ws:// and wss://)
  --config JSON  the object the plugin's init hooks get (default {})
  --ca-file PEM  wss://: the roots that verify the gateway, instead of Node's [${GATEWAY_CA_ENV}]
  --cert-file PEM
                 wss://: the client certificate (chain) to log in with, for a gateway that
                 requires one or whose auth.mtls names it as the target's principal
                 [${CLIENT_CERT_ENV}]
  --key-file PEM the unencrypted private key of --cert-file [${CLIENT_KEY_ENV}]
  -h, --help     this help

environment (docs/security.md, docs/observability.md):
  ${TOKEN_FILE_ENV}, ${TOKEN_ENV}
      the bearer token the plugin presents to the gateway, from a file (a mounted secret)
      or the variable, not both
  ${OTLP_TRACES_ENDPOINT_ENV}, ${OTLP_ENDPOINT_ENV}
      export a span per call and per stream over OTLP/HTTP (the first is the full URL,
      the second a base URL + /v1/traces); OTEL_SERVICE_NAME, OTEL_SDK_DISABLED,
      OTEL_EXPORTER_OTLP_HEADERS and OTEL_BSP_* as for serve
  ${STOP_GRACE_ENV}, ${STOP_HOOKS_ENV}
      on SIGTERM, the milliseconds the gateway gets to finish its calls after goaway, then
      the stop and destroy hooks together, 0-${MAX_STOP_MS} (default ${STOP_HOOKS_MS} each)
`;
}

/**
 * The WebSocket modes run the plugin's own lifecycle: init with `--config`, start, and on a
 * signal `windDown` (the connections' calls finish on a started plugin), then stop (the hooks
 * `hooksMs` at most), send the spans still buffered (`flushSpans`) and exit.
 */
async function startLifecycle(
  command: 'serve' | 'connect',
  plugin: Plugin,
  configText: string | undefined,
  hooksMs: number,
  tracing: Tracing | undefined,
  windDown: () => Promise<void>,
): Promise<void> {
  // Begun with the command and its text never quoted (a config may hold a secret), as every
  // SDK says it; until 2026-12-06 no command, and text that was no JSON "must be a JSON object".
  let config: unknown;
  try {
    config = JSON.parse(configText ?? '{}');
  } catch {
    throw new HandshakeError(`${command}: --config is not valid JSON`);
  }
  if (typeof config !== 'object' || config === null || Array.isArray(config)) {
    throw new HandshakeError(`${command}: --config must be a JSON object`);
  }
  await plugin.runPhase('init', config as Record<string, unknown>);
  await plugin.runPhase('start');
  let stopping = false;
  const stop = (): void => {
    if (stopping) return; // a second signal: the first stop is under way, bounded by the grace
    stopping = true;
    void windDown()
      .catch(() => undefined)
      .then(async () => {
        const hooksBegan = Date.now();
        await closeWithin(plugin, hooksMs);
        await flushSpans(tracing, Math.max(hooksMs - (Date.now() - hooksBegan), SPAN_FLUSH_MARGIN_MS));
      })
      .finally(() => process.exit(0));
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
}

/** `url` is checked already (connect.ts): a gateway that does not answer yet is retried. */
async function connectToGateway(
  plugin: Plugin,
  url: string,
  config: string | undefined,
  env: NodeJS.ProcessEnv,
  caps: StopCaps,
  tracing: Tracing | undefined,
  tls: ClientTls | undefined,
): Promise<void> {
  const token = BearerToken.configured(env);
  const stopping = new AbortController();
  let dialling: Promise<void> = Promise.resolve();
  // A stop: no redial, goaway on the connection; `dial` resolves once the gateway closed it.
  await startLifecycle('connect', plugin, config, caps.hooksMs, tracing, () => {
    stopping.abort();
    return dialling;
  });
  dialling = dial(plugin, url, { token: token?.secret(), signal: stopping.signal, graceMs: caps.graceMs, tracing, tls });
  try {
    await dialling;
  } catch (error) {
    await closeQuietly(plugin); // the init hooks ran: their stop and destroy run too
    if (error instanceof Refused) throw new HandshakeError(`connect: ${error.message}`);
    throw error;
  }
}

/** Run the plugin's stop and destroy hooks on the way out; their own failure is not the one to report. */
async function closeQuietly(plugin: Plugin): Promise<void> {
  await plugin.close().catch(() => undefined);
}

async function serveOverWebSocket(
  plugin: Plugin,
  address: string,
  config: string | undefined,
  env: NodeJS.ProcessEnv,
  caps: StopCaps,
  tracing: Tracing | undefined,
): Promise<void> {
  const token = BearerToken.configured(env);
  const server = new WebSocketPluginServer(plugin, token, tracing);
  await startLifecycle('serve', plugin, config, caps.hooksMs, tracing, () => server.close(caps.graceMs)); // a stop: no new connection, goaway on each
  let bound: string;
  try {
    bound = await server.listen(address);
  } catch (error) {
    await closeQuietly(plugin); // a port already taken: the hooks that ran are undone
    throw error;
  }
  if (token === undefined) {
    log.warn(`no bearer token configured (${TOKEN_FILE_ENV} or ${TOKEN_ENV}): anybody who can reach ${bound} can call this plugin`);
  }
  process.stdout.write(`1|1|tcp|${bound}|websocket|\n`);
}

async function serveService(
  plugin: Plugin,
  address: string,
  registry: RegistryConfig,
  token: BearerToken | undefined,
  tracing: Tracing | undefined,
  caps: StopCaps,
): Promise<void> {
  const server = new PluginServer(plugin, { servingFromStart: true, token, tracing });
  const port = await bindService(server, address);
  const host = address.slice(0, address.lastIndexOf(':'));
  // Checked whole before the line is printed: a mistake ends the plugin with status 1.
  const registration = registrationFrom(registry, { host: parseListenAddress(address).host, port });
  if (token === undefined) {
    log.warn(
      `no bearer token configured (${TOKEN_FILE_ENV} or ${TOKEN_ENV}): ` + `anybody who can reach ${host}:${port} can call this plugin`,
    );
  }
  stopOn(['SIGTERM', 'SIGINT'], plugin, server, tracing, caps, registration); // before the line: the host may stop us at once
  process.stdout.write(handshakeLine(1, 'tcp', `${host}:${port}`) + '\n');
  registration?.start();
}

/**
 * Bind the gRPC service at `address`, a failure as one `ListenError` line. grpc-js logs a
 * failed bind itself first ("E No address added…"): its logging is off for the bind only.
 */
async function bindService(server: PluginServer, address: string): Promise<number> {
  grpc.setLogVerbosity(grpc.logVerbosity.NONE);
  try {
    return await server.bind(address, grpc.ServerCredentials.createInsecure());
  } catch (error) {
    throw cannotListen(address, error);
  } finally {
    grpc.setLogVerbosity(grpcLogVerbosity(process.env));
  }
}

/** The verbosity grpc-js takes from the environment at load (ERROR unless set), to put back. */
function grpcLogVerbosity(env: NodeJS.ProcessEnv): grpc.logVerbosity {
  const name = (env.GRPC_NODE_VERBOSITY ?? env.GRPC_VERBOSITY ?? '').toUpperCase();
  const known = ['DEBUG', 'INFO', 'ERROR', 'NONE'] as const;
  return known.includes(name as (typeof known)[number]) ? grpc.logVerbosity[name as (typeof known)[number]] : grpc.logVerbosity.ERROR;
}

async function serveSubprocess(plugin: Plugin, config: HandshakeConfig, tracing: Tracing | undefined, caps: StopCaps): Promise<void> {
  const server = new PluginServer(plugin, { servingFromStart: false, tracing });

  let credentials = grpc.ServerCredentials.createInsecure();
  let certDer: Uint8Array | undefined;
  if (config.clientCertPem !== undefined) {
    const certificate = await generateServerCertificate();
    certDer = certificate.certDer;
    // The host's one-time certificate is the only trusted root, and it is required.
    credentials = grpc.ServerCredentials.createSsl(
      Buffer.from(config.clientCertPem),
      [{ private_key: Buffer.from(certificate.keyPem), cert_chain: Buffer.from(certificate.certPem) }],
      true,
    );
  }

  let address: string;
  let cleanup = (): void => undefined;
  if (config.network === 'unix') {
    let socketPath: string;
    if (config.socketDir !== undefined) {
      socketPath = path.join(config.socketDir, `plugin-${process.pid}.sock`);
      cleanup = () => rmSync(socketPath, { force: true });
    } else {
      const dir = mkdtempSync(path.join(os.tmpdir(), 'lk-plugin-'));
      socketPath = path.join(dir, 'plugin.sock');
      cleanup = () => rmSync(dir, { recursive: true, force: true });
    }
    rmSync(socketPath, { force: true });
    await server.bind(`unix://${socketPath}`, credentials);
    address = socketPath;
  } else {
    const port = await server.bind('127.0.0.1:0', credentials);
    address = `127.0.0.1:${port}`;
  }
  process.on('exit', () => cleanup());

  const stop = stopOn(['SIGTERM', 'SIGINT'], plugin, server, tracing, caps); // before the line: the host may stop us at once
  process.stdout.write(handshakeLine(config.appVersion, config.network, address, certDer) + '\n');
  // The host reads no more of stdout: a pipe nobody drains would block the event loop. The
  // console goes to stderr, each record one line that says its level (log.ts): the host
  // logs a console.warn as a warning, a console.error as an error.
  routeConsole(new Logger(plugin.id));

  // Parent death: the host holds our stdin's write end; end-of-file means it is gone.
  process.stdin.on('end', stop);
  process.stdin.on('close', stop);
  process.stdin.on('error', stop);
  process.stdin.on('data', () => undefined);
  process.stdin.resume();
}

/**
 * The least a stop gives the spans still buffered after its hooks: they get what remains of
 * the hooks' cap, or this when less remains, so a whole stop ends within grace + hooks + 1 s.
 */
export const SPAN_FLUSH_MARGIN_MS = 1_000;

/**
 * The spans still buffered, sent within `flushMs` at most: a dead collector does not hold the
 * stop. Those it could not take are dropped, with one warning naming it (`Tracing.flushWithin`).
 */
async function flushSpans(tracing: Tracing | undefined, flushMs: number): Promise<void> {
  await tracing?.flushWithin(flushMs);
}

/**
 * @internal The plugin's stop and destroy hooks at a stop, `capMs` (`STOP_HOOKS_MS` unless
 * set) at most together: a hook still running then is abandoned with a warning naming it and
 * the cap, as every SDK words it, so that the process exits without it. 0 waits for neither.
 */
export async function closeWithin(plugin: Plugin, capMs: number = STOP_HOOKS_MS, logger: Logger = log): Promise<void> {
  let finished = false;
  let running: 'stop' | 'destroy' | undefined;
  let timer: NodeJS.Timeout | undefined;
  await Promise.race([
    plugin
      .close((phase) => {
        running = phase;
      })
      .catch((error: unknown) => {
        logger.error(`stop/destroy failed: ${String(error)}`);
      })
      .finally(() => {
        finished = true;
      }),
    new Promise<void>((resolve) => {
      timer = setTimeout(resolve, capMs).unref();
    }).then(() => {
      if (!finished) logger.warn(`the ${running ?? 'stop/destroy'} hook did not finish within ${capMs / 1000} s of the stop; exiting without it`);
    }),
  ]);
  clearTimeout(timer);
}

/**
 * Stop once on any of `signals`: leave the registry (`registration`: the key deleted and the
 * lease revoked, then `--leave-delay` still serving, while dispatchers learn it left),
 * health off, drain the calls in flight (`caps.graceMs` at most), then the stop/destroy
 * hooks the host did not run (`caps.hooksMs` at most), then exit. Hooks last: a stop hook
 * that closes what the calls use must not pull it from under calls still running.
 */
function stopOn(
  signals: NodeJS.Signals[],
  plugin: Plugin,
  server: PluginServer,
  tracing: Tracing | undefined,
  caps: StopCaps,
  registration?: Registration,
): () => void {
  let stopping = false;
  const stop = (): void => {
    if (stopping) return;
    stopping = true;
    // Spans last: the drained calls' are buffered by then. Bounded by what remains of the
    // hooks' cap (SPAN_FLUSH_MARGIN_MS at least): a dead collector must not keep the plugin
    // past grace + hooks + the margin, where a container may be killed.
    void (registration?.deregister() ?? Promise.resolve())
      .catch((error: unknown) => log.warn(`cannot deregister: ${String(error)}`))
      .then(() => {
        server.setServing(false);
        return server.shutdown(caps.graceMs);
      })
      .then(async () => {
        const hooksBegan = Date.now();
        await closeWithin(plugin, caps.hooksMs);
        return Math.max(caps.hooksMs - (Date.now() - hooksBegan), SPAN_FLUSH_MARGIN_MS);
      })
      .then((flushMs) => flushSpans(tracing, flushMs))
      .then(() => process.exit(0));
  };
  for (const signal of signals) process.on(signal, stop);
  return stop;
}
