/**
 * Registration in etcd (registry.ts, etcdgateway.ts, registryflags.ts): the settings as
 * they are given and checked, the waits after refusals, and the gateway against peers that
 * misbehave. A real etcd runs in tests/test_plugin_registry.py and
 * tests/test_plugin_registry_secure.py; here an HTTP server on port 0 stands for the
 * misbehaving etcd, or for one whose token expires, which a real etcd does only slowly.
 */
import assert from 'node:assert/strict';
import { once } from 'node:events';
import * as http from 'node:http';
import type { AddressInfo } from 'node:net';
import { test } from 'node:test';
import { EtcdGateway, EtcdRefused, EtcdUnavailable, RegistrySettingError, isLoopback, message } from '#internal/etcdgateway';
import { HandshakeError, parseCommand } from '#internal/handshake';
import { REFUSED_RETRY_CAP_MS, Registration, advertisedAddress, isUnspecified, leaveDelayFrom, refusedRetryWait, registrationFrom } from '#internal/registry';
import { RegistryConfig, SETTING_ETCD, SETTING_PREFIX } from '#internal/registryflags';
import { Logger } from '#internal/log';
import { assertOneLineFailure, runPlugin } from './cli-support';

const config = (flags: Record<string, string>, env: NodeJS.ProcessEnv = {}): RegistryConfig => new RegistryConfig(new Map(Object.entries(flags)), env);
const listening = { host: '127.0.0.1', port: 50051 };
const quiet = new Logger('test', () => undefined);

test('a flag wins over its variable, an empty one too, and a setting is named as it was given', () => {
  const env = { LINCHKIT_REGISTER_ETCD: 'http://127.0.0.1:2379', LINCHKIT_REGISTER_PREFIX: '/from/env' };
  assert.equal(config({}, env).value(SETTING_ETCD), 'http://127.0.0.1:2379');
  assert.equal(config({ 'register-etcd': '' }, env).value(SETTING_ETCD), '', 'turned off');
  assert.equal(registrationFrom(config({ 'register-etcd': '' }, env), listening, quiet), undefined);
  assert.equal(config({ 'register-prefix': '/flag' }, env).value(SETTING_PREFIX), '/flag');
  assert.equal(config({ 'register-prefix': '/flag' }, env).name(SETTING_PREFIX), '--register-prefix');
  assert.equal(config({}, env).name(SETTING_PREFIX), 'LINCHKIT_REGISTER_PREFIX');
  assert.equal(config({}, {}).name(SETTING_PREFIX), '--register-prefix (or LINCHKIT_REGISTER_PREFIX)');
});

test('serve takes the registry flags, joined or not, and refuses a password flag without repeating it', () => {
  const command = parseCommand(['serve', '--register-etcd', 'http://127.0.0.1:2379', '--register-prefix=/p', '--advertise', '10.0.0.5:1']);
  assert.equal(command.mode, 'service');
  assert.deepEqual(
    command.mode === 'service' ? Object.fromEntries(command.registry) : undefined,
    { 'register-etcd': 'http://127.0.0.1:2379', 'register-prefix': '/p', advertise: '10.0.0.5:1' },
  );
  for (const args of [['--register-etcd-password', 'SECRET'], ['--register-etcd-password=SECRET'], ['-register-etcd-password=SECRET']]) {
    assert.throws(
      () => parseCommand(['serve', ...args]),
      (error: unknown) =>
        error instanceof HandshakeError && error.message.includes('LINCHKIT_REGISTER_ETCD_PASSWORD') && !error.message.includes('SECRET'),
    );
  }
  assert.throws(() => parseCommand(['serve', '--register-etcd']), /--register-etcd needs a value/);
});

test('every registry mistake is refused before serving, naming the setting as given', () => {
  const mistakes: [Record<string, string>, NodeJS.ProcessEnv, RegExp][] = [
    [{ 'register-etcd': 'unix:///x' }, {}, /^--register-etcd must be an http\(s\):\/\/ URL$/],
    [{ 'register-etcd': 'http:127.0.0.1:2379' }, {}, /must be an http\(s\):\/\/ URL/],
    [{ 'register-etcd': 'http://user:SECRET@127.0.0.1:1' }, {}, /credentials is not supported/],
    [{ 'register-etcd': 'http://etcd..internal:2379' }, {}, /valid host name and a port in 1-65535/],
    [{ 'register-etcd': 'http://127.0.0.1:99999' }, {}, /valid host name and a port in 1-65535/],
    [{ 'register-etcd': 'http://127.0.0.1:0' }, {}, /valid host name and a port in 1-65535/],
    [{}, { LINCHKIT_REGISTER_ETCD: 'http://127.0.0.1:1' }, /^LINCHKIT_REGISTER_ETCD needs --register-prefix \(or LINCHKIT_REGISTER_PREFIX\)$/],
    [{ 'register-prefix': '/ends/' }, {}, /^--register-prefix must start with \/ and not end with one/],
    [{ 'register-prefix': 'no-slash' }, {}, /must start with \//],
    [{ 'register-ttl': '1' }, {}, /^--register-ttl must be a whole number of seconds, at least 2; got "1"$/],
    [{ 'register-ttl': '2.5' }, {}, /at least 2/],
    [{ 'leave-delay': '601' }, {}, /^--leave-delay must be a number of seconds in \[0, 600\]; got "601"$/],
    [{ advertise: 'http://x:1' }, {}, /advertise a gRPC server as host:port, not a URL/],
    [{ advertise: 'no-port' }, {}, /^--advertise must be host:port, got "no-port"$/],
    [{ advertise: '10.0.0.5:0' }, {}, /must be host:port/],
    [{ advertise: '0.0.0.0:8081' }, {}, /must name an address others can call, not 0.0.0.0/],
    [{ advertise: '[::]:8081' }, {}, /not ::$/],
    [{ 'register-etcd-user': 'registrar' }, {}, /^--register-etcd-user needs LINCHKIT_REGISTER_ETCD_PASSWORD too/],
    [{}, { LINCHKIT_REGISTER_ETCD_PASSWORD: 'SECRET' }, /^LINCHKIT_REGISTER_ETCD_PASSWORD needs --register-etcd-user \(or LINCHKIT_REGISTER_ETCD_USER\) too/],
    [{ 'register-etcd-ca-file': '/nope' }, {}, /is for an https:\/\/ etcd/],
    [{ 'register-etcd': 'http://10.0.0.5:2379', 'register-etcd-user': 'r' }, { LINCHKIT_REGISTER_ETCD_PASSWORD: 'SECRET' }, /would cross the network in clear/],
    [{ 'register-etcd': 'https://127.0.0.1:1', 'register-etcd-cert-file': '/nope' }, {}, /^--register-etcd-cert-file needs --register-etcd-key-file \(or LINCHKIT_REGISTER_ETCD_KEY_FILE\) too: a client certificate and its key$/],
    [{ 'register-etcd': 'https://127.0.0.1:1', 'register-etcd-ca-file': '/nope' }, {}, /^--register-etcd-ca-file: cannot read \/nope \(no such file or directory\)$/],
    [{ 'register-etcd': 'https://127.0.0.1:1', 'register-etcd-ca-file': __filename }, {}, /holds no PEM certificate/],
  ];
  for (const [flags, env, expected] of mistakes) {
    const given = { 'register-etcd': 'http://127.0.0.1:1', 'register-prefix': '/p', ...flags };
    if ('LINCHKIT_REGISTER_ETCD' in env) delete (given as Record<string, string>)['register-etcd'];
    if ('LINCHKIT_REGISTER_ETCD' in env) delete (given as Record<string, string>)['register-prefix'];
    assert.throws(
      () => registrationFrom(config(given, env), listening, quiet),
      (error: unknown) => error instanceof RegistrySettingError && expected.test(error.message) && !error.message.includes('SECRET'),
      `${JSON.stringify(flags)} ${JSON.stringify(env)}`,
    );
  }
});

test('the address written: as advertised, else where it listens, never every interface', () => {
  assert.equal(advertisedAddress('', '--advertise', '127.0.0.3', 4), '127.0.0.3:4');
  assert.equal(advertisedAddress('', '--advertise', '::1', 4), '[::1]:4');
  assert.equal(advertisedAddress('echo-3.internal:50051', '--advertise', '0.0.0.0', 4), 'echo-3.internal:50051');
  assert.equal(advertisedAddress('[fd00::5]:50051', '--advertise', '::', 4), '[fd00::5]:50051');
  for (const host of ['0.0.0.0', '::', '0:0:0:0:0:0:0:0', '::ffff:0.0.0.0']) {
    assert.ok(isUnspecified(host), host);
    assert.throws(() => advertisedAddress('', '--advertise (or LINCHKIT_ADVERTISE)', host, 4), /which no dispatcher can call: say where it is reached with --advertise \(or LINCHKIT_ADVERTISE\)/);
  }
  assert.ok(!isUnspecified('127.0.0.1') && !isUnspecified('::1') && !isUnspecified('localhost'));
});

test('the leave delay is seconds in [0, 600], 1 by default', () => {
  assert.equal(leaveDelayFrom('', 'x'), 1);
  assert.equal(leaveDelayFrom('0', 'x'), 0);
  assert.equal(leaveDelayFrom('0.25', 'x'), 0.25);
  assert.equal(leaveDelayFrom('600', 'x'), 600);
  for (const text of ['-1', 'nan', 'NaN', '601', 'soon', 'Infinity', '1s', ' ']) assert.throws(() => leaveDelayFrom(text, 'x'), RegistrySettingError, text);
});

test("etcd's message in a line: one line, nothing a terminal runs, 200 characters at most", () => {
  assert.equal(message({ message: 'permission\u001b[2J denied\n  now' }), 'permission\\x1b[2J denied now');
  assert.equal(message({ error: { grpc_code: 16, message: 'invalid auth token' } }), 'invalid auth token');
  assert.ok(message({ message: 'x'.repeat(10_000) }).length <= 201);
});

test('a password goes over http:// only to a loopback etcd', () => {
  for (const host of ['127.0.0.1', '127.8.9.10', 'localhost', '[::1]', '::1', '[::ffff:127.0.0.1]']) assert.ok(isLoopback(host), host);
  for (const host of ['10.0.0.5', '[fd00::5]', 'localhost.example', '127.0.0.1.nip.io', '[::ffff:10.0.0.1]']) assert.ok(!isLoopback(host), host);
});

test('the waits after refusals double from the pace to the cap, each drawn in its upper half', () => {
  const longest = (): number => 0;
  assert.equal(refusedRetryWait(1, 1000, longest), 2000);
  assert.equal(refusedRetryWait(2, 1000, longest), 4000);
  assert.equal(refusedRetryWait(5, 1000, longest), REFUSED_RETRY_CAP_MS);
  assert.equal(refusedRetryWait(1, 1000, () => 0.5), 1500);
  for (const refusals of [31, 32, 64, 1e6]) assert.equal(refusedRetryWait(refusals, 1000, longest), REFUSED_RETRY_CAP_MS);
  const draws = new Set(Array.from({ length: 20 }, () => refusedRetryWait(5, 1000)));
  assert.ok(draws.size > 1 && [...draws].every((wait) => wait > 15_000 && wait <= 30_000));
});

/** An HTTP server on port 0 answering each request with `answer`; the requests it got. */
async function peer(answer: (request: http.IncomingMessage, body: string, response: http.ServerResponse) => void): Promise<{ url: URL; seen: { path: string; body: string; token: string }[]; close: () => void }> {
  const seen: { path: string; body: string; token: string }[] = [];
  const server = http.createServer((request, response) => {
    let body = '';
    request.on('data', (chunk: Buffer) => (body += chunk.toString()));
    request.on('end', () => {
      seen.push({ path: request.url ?? '', body, token: String(request.headers.authorization ?? '') });
      answer(request, body, response);
    });
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const port = (server.address() as AddressInfo).port;
  return {
    url: new URL(`http://127.0.0.1:${port}`),
    seen,
    close: () => {
      server.closeAllConnections();
      server.close();
    },
  };
}

const gatewayTo = (url: URL, timeoutMs = 2000, user = ''): EtcdGateway =>
  EtcdGateway.from(url, config(user ? { 'register-etcd-user': user } : {}, user ? { LINCHKIT_REGISTER_ETCD_PASSWORD: 'SECRET' } : {}), timeoutMs, () => undefined);

test('a peer that answers no JSON, too much, or nothing in time is an etcd that does not answer', async () => {
  const lying = await peer((request, _body, response) => {
    if (request.url === '/v3/kv/put') response.end('<html>not etcd</html>');
    else if (request.url === '/v3/lease/grant') response.end('x'.repeat(3 << 20));
    else if (request.url === '/v3/lease/revoke') response.end('[1, 2]');
    // anything else: never answered
  });
  try {
    const gateway = gatewayTo(lying.url, 500);
    await assert.rejects(gateway.post('/v3/kv/put', {}), (error: unknown) => error instanceof EtcdUnavailable && !(error instanceof EtcdRefused) && /not a JSON object/.test((error as Error).message));
    await assert.rejects(gateway.post('/v3/lease/grant', {}), /not a JSON object/);
    await assert.rejects(gateway.post('/v3/lease/revoke', {}), /not a JSON object/);
    await assert.rejects(gateway.post('/v3/lease/keepalive', {}), (error: unknown) => error instanceof EtcdUnavailable && /does not answer within 0.5s/.test((error as Error).message));
    gateway.close();
  } finally {
    lying.close();
  }
  const gone = gatewayTo(lying.url, 2000);
  await assert.rejects(gone.post('/v3/kv/put', {}), (error: unknown) => error instanceof EtcdUnavailable && /does not answer \(connect ECONNREFUSED/.test((error as Error).message));
  gone.close();
});

test('a token etcd forgot is replaced once, unsaid; a wrong password and a denied write are refusals', async () => {
  let tokens = 0;
  let password = 'SECRET';
  let mayWrite = true;
  const etcd = await peer((request, body, response) => {
    const reply = (status: number, answer: object): void => {
      response.statusCode = status;
      response.end(JSON.stringify(answer));
    };
    if (request.url === '/v3/auth/authenticate') {
      if (JSON.parse(body).password !== password) return reply(400, { code: 3, message: 'etcdserver: authentication failed, invalid user ID or password' });
      tokens += 1;
      return reply(200, { header: {}, token: `token-${tokens}` });
    }
    if (request.headers.authorization !== `token-${tokens}`) return reply(401, { code: 16, message: 'etcdserver: invalid auth token' });
    if (!mayWrite) return reply(403, { code: 7, message: 'etcdserver: permission denied' });
    reply(200, { header: {} });
  });
  const said: string[] = [];
  try {
    const gateway = EtcdGateway.from(etcd.url, config({ 'register-etcd-user': 'registrar' }, { LINCHKIT_REGISTER_ETCD_PASSWORD: 'SECRET' }), 2000, (line) => said.push(line));
    assert.deepEqual(await gateway.post('/v3/kv/put', {}), { header: {} });
    tokens += 1; // etcd restarted: the token the gateway holds is forgotten
    assert.deepEqual(await gateway.post('/v3/kv/put', {}), { header: {} });
    assert.deepEqual(
      etcd.seen.map((each) => each.path),
      ['/v3/auth/authenticate', '/v3/kv/put', '/v3/kv/put', '/v3/auth/authenticate', '/v3/kv/put'],
    );
    mayWrite = false;
    await assert.rejects(gateway.post('/v3/kv/put', {}), (error: unknown) => error instanceof EtcdRefused && /denies user 'registrar' \/v3\/kv\/put \(permission denied\)/.test((error as Error).message));
    password = 'changed';
    tokens += 1;
    await assert.rejects(gateway.post('/v3/kv/put', {}), (error: unknown) => error instanceof EtcdRefused && /refused user 'registrar': authentication failed/.test((error as Error).message) && !(error as Error).message.includes('SECRET'));
    assert.deepEqual(said, []);
    gateway.close();
  } finally {
    etcd.close();
  }
});

test('the registration loop waits as the backoff says: doubled, capped, started again after a success, kept across an outage', async () => {
  // What etcd does at each try: R refuses (HTTP 403, permission denied), U answers nothing
  // etcd would (an etcd that does not answer, for the loop), A admits. refusedRetryWait's
  // own test holds the waits' values; this one holds the loop to them.
  const tries = 'RRRRRRARURUURAU';
  const period = 10_000 / 3;
  // The span each try's wait must lie in, in ms (a TTL of 10 s: the pace 1 s).
  const expected: [number, number][] = [
    [1000, 2000], // R
    [2000, 4000], // R
    [4000, 8000], // R
    [8000, 16_000], // R
    [15_000, 30_000], // R: the cap
    [15_000, 30_000], // R
    [period, period], // A
    [1000, 2000], // R: from the first again
    [1000, 1000], // U: the pace
    [2000, 4000], // R: the second in a row still
    [1000, 1000], // U
    [1000, 1000], // U
    [4000, 8000], // R
    [period, period], // A
    [1000, 1000], // U
  ];
  let tried = 0;
  const etcd = await peer((request, _body, response) => {
    const outcome = tries[tried] ?? 'A'; // leaving, every try made
    response.setHeader('content-type', 'application/json');
    if (outcome === 'R') {
      response.statusCode = 403;
      response.end('{"error":"etcdserver: permission denied","code":7,"message":"etcdserver: permission denied"}');
    } else if (outcome === 'U') {
      response.end('{}'); // no lease granted, none renewed: not etcd's answer
    } else if (request.url === '/v3/lease/grant') {
      response.end('{"header":{},"ID":"7587","TTL":"10"}');
    } else if (request.url === '/v3/lease/keepalive') {
      response.end('{"result":{"ID":"7587","TTL":"10"}}');
    } else {
      response.end('{"header":{}}');
    }
  });
  const waits: number[] = [];
  let everyTryMade: () => void = () => undefined;
  const made = new Promise<void>((resolve) => (everyTryMade = resolve));
  const registration = new Registration(gatewayTo(etcd.url), '/linchkit/plugins/echo/loop', '{"address":"127.0.0.1:50051"}', 10, 0, quiet, (ms, done) => {
    waits.push(ms);
    tried += 1;
    if (tried < tries.length) setImmediate(done);
    else everyTryMade(); // and waits until deregister() wakes it
    return done;
  });
  try {
    registration.start();
    await made;
    await registration.deregister();
  } finally {
    etcd.close();
  }
  assert.equal(waits.length, expected.length, `waits: ${waits.join(', ')}`);
  expected.forEach(([low, high], index) => {
    const wait = waits[index] ?? NaN;
    assert.ok(low <= wait && wait <= high, `try ${index + 1} (${tries[index]}): ${wait} ms, want ${low} to ${high}; every wait: ${waits.join(', ')}`);
  });
  assert.deepEqual(etcd.seen.slice(-2).map((each) => each.path), ['/v3/kv/deleterange', '/v3/lease/revoke']);
});

test('example-plugin serve: a registry mistake is one line and exit 1, before serving', () => {
  const line = assertOneLineFailure(runPlugin('serve', '--register-etcd', 'http://127.0.0.1:1', '--register-prefix', '/p', '--register-ttl', '1'));
  assert.equal(line, 'serve: --register-ttl must be a whole number of seconds, at least 2; got "1"');
  const refused = assertOneLineFailure(runPlugin('serve', '--websocket', '--register-etcd', 'http://127.0.0.1:1'));
  assert.match(refused, /^serve: --register-etcd: a WebSocket server is not registered in etcd/);
  // Every other registry flag too: before, it was dropped and the server served.
  const prefix = assertOneLineFailure(runPlugin('serve', '--websocket', '--register-prefix', '/p'));
  assert.match(prefix, /^serve: --register-prefix: a WebSocket server is not registered, /);
  const advertise = assertOneLineFailure(runPlugin('serve', '--websocket', '--register-etcd=', '--advertise=SECRET.example:1'));
  assert.match(advertise, /^serve: --advertise: a WebSocket server is not registered, /);
  assert.ok(!advertise.includes('SECRET'), advertise);
});
