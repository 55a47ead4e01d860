/**
 * The compiled example plugin run as the host runs it: handshake environment, AutoMTLS on
 * a Unix socket, then the calls the conformance suite makes, and exit on stdin EOF.
 *
 * LINCHKIT_EXAMPLE_PLUGIN and LINCHKIT_EXAMPLE_RUNTIME point it at another language's
 * example plugin (tests/polyglot runs it against the Java one this way).
 */
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { mkdtempSync, rmSync } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { after, before, test } from 'node:test';
import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import { MAGIC_COOKIE_VALUE, parseHandshakeLine } from '#internal/handshake';
import { protoPath } from '#internal/server';
import { generateServerCertificate } from '#internal/tls';

const PLUGIN = process.env.LINCHKIT_EXAMPLE_PLUGIN || path.resolve(__dirname, '../example-plugin');
const RUNTIME = process.env.LINCHKIT_EXAMPLE_RUNTIME || 'typescript';

function derToPem(der: Buffer): string {
  return `-----BEGIN CERTIFICATE-----\n${der.toString('base64').replace(/(.{64})/g, '$1\n')}\n-----END CERTIFICATE-----\n`;
}

let child: ChildProcess;
let socketDir: string;
let client: any;
let stderr = '';
let serverCertPem: Buffer;

function unary(method: string, request: object, deadlineMs = 5000): Promise<any> {
  return new Promise((resolve, reject) => {
    client[method](request, { deadline: Date.now() + deadlineMs }, (error: Error | null, reply: unknown) =>
      error ? reject(error) : resolve(reply),
    );
  });
}

const json = (value: unknown) => Buffer.from(JSON.stringify(value));
const call = (method: string, params: unknown, context: object = {}) =>
  unary('Call', { v: 1, plugin: 'example', method, params_json: json(params), context: { request_id: 'r1', ...context } });

before(async () => {
  socketDir = mkdtempSync(path.join(os.tmpdir(), 'lk-ts-test-'));
  const host = await generateServerCertificate(); // the host's one-time client certificate
  child = spawn(PLUGIN, [], {
    env: {
      ...process.env,
      LINCHKIT_PLUGIN_MAGIC_COOKIE: MAGIC_COOKIE_VALUE,
      LINCHKIT_PLUGIN_PROTOCOL_VERSIONS: '1',
      LINCHKIT_PLUGIN_NETWORK: 'unix',
      LINCHKIT_PLUGIN_SOCKET_DIR: socketDir,
      LINCHKIT_PLUGIN_CLIENT_CERT: host.certPem,
    },
    stdio: ['pipe', 'pipe', 'pipe'],
  });
  child.stderr!.on('data', (chunk) => (stderr += chunk));
  const [first] = (await once(child.stdout!, 'data')) as [Buffer];
  const line = parseHandshakeLine(first.toString().split('\n')[0]!);
  assert.equal(line.coreVersion, 1);
  assert.equal(line.appVersion, 1);
  assert.equal(line.network, 'unix');
  assert.ok(line.address.startsWith(socketDir), line.address);
  assert.ok(line.serverCertDer, 'AutoMTLS: the line carries the server certificate');

  const definition = grpc.loadPackageDefinition(
    protoLoader.loadSync(protoPath(), { keepCase: true, longs: Number, defaults: true, oneofs: true }),
  ) as any;
  serverCertPem = Buffer.from(derToPem(line.serverCertDer));
  const credentials = grpc.credentials.createSsl(
    serverCertPem,
    Buffer.from(host.keyPem),
    Buffer.from(host.certPem),
  );
  client = new definition.linchkit.plugin.v1.PluginService(`unix://${line.address}`, credentials, {
    'grpc.ssl_target_name_override': 'localhost',
    'grpc.default_authority': 'localhost',
  });
});

after(() => {
  client?.close();
  if (child.exitCode === null) child.kill('SIGKILL');
  rmSync(socketDir, { recursive: true, force: true });
});

test('Describe names the plugin and its methods', async () => {
  const info = await unary('Describe', {});
  assert.equal(info.id, 'example');
  assert.equal(info.version, '1.0.0');
  assert.equal(info.runtime, RUNTIME);
  assert.equal(info.protocol_version, 1);
  const names = info.methods.map((m: { name: string }) => m.name).sort();
  assert.deepEqual(names, ['config', 'count', 'digest', 'echo', 'emit', 'fail', 'hooks', 'non_finite', 'not_unicode', 'sleep']);
  assert.equal(info.methods.find((m: { name: string }) => m.name === 'count').streaming, true);
});

test('lifecycle, config and calls over mutual TLS', async () => {
  await unary('Init', { config_json: json({ greeting: 'hi' }) });
  await unary('Start', {});
  assert.deepEqual(JSON.parse((await call('config', {})).result_json), { greeting: 'hi' });
  assert.deepEqual(JSON.parse((await call('echo', { a: [1, 'x'] })).result_json), { a: [1, 'x'] });

  const failure = await call('fail', { message: 'boom' });
  assert.equal(failure.ok, false);
  assert.deepEqual([failure.error.type, failure.error.message, failure.error.retryable], ['ExampleFailure', 'boom', false]);
  assert.equal((await call('nope', {})).error.type, 'method_not_found');
  assert.equal((await call('count', { m: 1 })).error.type, 'invalid_params');
  assert.equal((await call('digest', { data: 'x', rounds: 'many' })).error.type, 'invalid_params');
  assert.deepEqual(JSON.parse((await call('count', { n: 3 })).result_json), [{ i: 0 }, { i: 1 }, { i: 2 }]);
});

test('a second host leaving runs no hook under the first; an id off the contract is refused', async () => {
  const as = (id: string) => {
    const metadata = new grpc.Metadata();
    metadata.set('linchkit-host', id);
    return (method: string, request: object): Promise<unknown> =>
      new Promise((resolve, reject) =>
        client[method](request, metadata, { deadline: Date.now() + 5000 }, (error: Error | null, reply: unknown) =>
          error ? reject(error) : resolve(reply),
        ),
      );
  };
  const before = JSON.parse((await call('hooks', {})).result_json);
  const other = as('other-host.1');
  await other('Init', { config_json: json({ greeting: 'hi' }) });
  await other('Start', {});
  await other('Stop', {});
  await other('Destroy', {});
  for (const method of ['Init', 'Start', 'Stop', 'Destroy']) {
    await assert.rejects(as('bad id')(method, method === 'Init' ? { config_json: json({}) } : {}), (error: grpc.ServiceError) => {
      assert.equal(error.code, grpc.status.INVALID_ARGUMENT, method);
      assert.equal(error.details, 'linchkit-host must be 1-64 of A-Z a-z 0-9 . _ -');
      return true;
    });
  }
  // The host without the metadata (the one that launched the plugin) is still attached.
  // Whether a second Start runs the start hook again differs by SDK ("as before"): not asked.
  const after = JSON.parse((await call('hooks', {})).result_json);
  assert.deepEqual(
    { init: after.init, stop: after.stop, destroy: after.destroy },
    { init: before.init + 1, stop: before.stop, destroy: before.destroy },
  );
  assert.deepEqual(JSON.parse((await call('config', {})).result_json), { greeting: 'hi' });
});

test('sleep gives up with deadline_exceeded when the deadline passes first', async () => {
  const started = Date.now();
  const reply = await call('sleep', { ms: 5000 }, { deadline_ms: 200 });
  assert.equal(reply.error.type, 'deadline_exceeded');
  assert.equal(reply.error.retryable, true);
  assert.ok(Date.now() - started < 2000);
  assert.deepEqual(JSON.parse((await call('sleep', { ms: 10 }, { deadline_ms: 2000 })).result_json), { slept_ms: 10 });
});

test('non_finite is provider_error: JSON has no form for NaN or an infinity; other values are invalid_params', async () => {
  for (const value of ['nan', 'inf', '-inf']) {
    const reply = await call('non_finite', { value });
    assert.equal(reply.ok, false, `${value}: ${reply.result_json}`);
    assert.deepEqual([reply.error.type, reply.error.retryable], ['provider_error', false]);
    assert.match(reply.error.message, /^the plugin's result is not JSON: /);
  }
  for (const params of [{ value: 'NaN' }, { value: 1 }, {}]) {
    const reply = await call('non_finite', params);
    assert.equal(reply.error.type, 'invalid_params', JSON.stringify(params));
    assert.match(reply.error.message, /value/);  // every SDK's example names it
  }
});

test('not_unicode is provider_error: half an emoji is not valid Unicode; echo sends an emoji back unchanged', async () => {
  for (const params of [{}, { any: 'ignored' }, null]) {
    const reply = await call('not_unicode', params);
    assert.equal(reply.ok, false, `${JSON.stringify(params)}: ${reply.result_json}`);
    assert.deepEqual(
      [reply.error.type, reply.error.message, reply.error.retryable],
      ['provider_error', "the plugin's result is not JSON: a string is not valid Unicode (a lone surrogate)", false],
    );
  }
  const text = { text: 'smile 😀 ünïcødé' };
  const echoed = await call('echo', text);
  assert.equal(Buffer.from(echoed.result_json).toString('utf8'), JSON.stringify(text), 'byte for byte, the emoji raw');
});

test('a client with another certificate than the host\'s is refused', async () => {
  const definition = grpc.loadPackageDefinition(protoLoader.loadSync(protoPath(), { keepCase: true })) as any;
  const stranger = await generateServerCertificate();
  const address = client.getChannel().getTarget().replace(/^unix:\/\//, '');
  const rogue = new definition.linchkit.plugin.v1.PluginService(
    `unix://${address}`,
    grpc.credentials.createSsl(serverCertPem, Buffer.from(stranger.keyPem), Buffer.from(stranger.certPem)),
    { 'grpc.ssl_target_name_override': 'localhost' },
  );
  await assert.rejects(
    new Promise((resolve, reject) =>
      rogue.Describe({}, { deadline: Date.now() + 3000 }, (error: Error | null, reply: unknown) => (error ? reject(error) : resolve(reply))),
    ),
  );
  rogue.close();
});

test('CallStream sends the chunks then ends; Events answers ping with pong', async () => {
  const chunks: unknown[] = [];
  const stream = client.CallStream({ v: 1, method: 'count', params_json: json({ n: 4 }), context: { request_id: 's' } });
  for await (const item of stream) chunks.push(JSON.parse(item.chunk_json));
  assert.deepEqual(chunks, [{ i: 0 }, { i: 1 }, { i: 2 }, { i: 3 }]);

  const events = client.Events();
  const received: Array<[string, unknown]> = [];
  const gotTwo = new Promise<void>((resolve) =>
    events.on('data', (event: { name: string; data_json: Buffer }) => {
      received.push([event.name, JSON.parse(event.data_json.toString())]);
      if (received.length === 2) resolve();
    }),
  );
  events.write({ name: 'ping', data_json: json({ n: 1 }) });
  assert.equal(JSON.parse((await call('emit', { name: 'custom', data: [1] })).result_json), true);
  await gotTwo;
  assert.deepEqual(received.sort(), [['custom', [1]], ['pong', { n: 1 }]]);
  events.end();
});

test('health reports SERVING after Start; the plugin exits when its stdin closes', async () => {
  const definition = grpc.loadPackageDefinition(
    protoLoader.loadSync(require.resolve('grpc-health-check/proto/health/v1/health.proto'), { keepCase: true, enums: String }),
  ) as any;
  const health = new definition.grpc.health.v1.Health(client.getChannel().getTarget(), grpc.credentials.createInsecure(), {
    channelOverride: client.getChannel(),
  });
  const answer = await new Promise<any>((resolve, reject) =>
    health.Check({ service: 'linchkit.plugin.v1.PluginService' }, (error: Error | null, reply: unknown) => (error ? reject(error) : resolve(reply))),
  );
  assert.equal(answer.status, 'SERVING');

  const exited = once(child, 'exit');
  child.stdin!.end();
  const [code] = (await Promise.race([exited, new Promise((_, reject) => setTimeout(() => reject(new Error(`no exit on stdin EOF; stderr: ${stderr}`)), 8000).unref())])) as [number];
  assert.equal(code, 0);
});
