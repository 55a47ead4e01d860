/**
 * `connect` (reverse mode) as an operator meets it (tests/conformance/test_serve_cli.py):
 * a `--url` that can never reach a gateway is one line on stderr and exit 1, at once, never
 * a stack trace; a well-formed URL whose gateway is not there yet is dialled again;
 * `--help` on stdout with exit 0; told to register in etcd, one line and exit 1 before it
 * dials (a plugin that dials the gateway registers nowhere).
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import * as net from 'node:net';
import { test } from 'node:test';
import { CONNECT_USAGE, REGISTER_ETCD_ENV, maskedUrl, parseConnectCommand, parseGatewayUrl, registrationRefusal } from '#internal/connect';
import { HandshakeError } from '#internal/handshake';
import { CRASHES, ENV, PLUGIN, type Ran, assertOneLineFailure, runPlugin } from './cli-support';

const BAD_URLS = ['', 'not-a-url', 'ftp://127.0.0.1/v1/plugins/connect', 'ws://', 'ws//127.0.0.1:8080/v1/plugins/connect', 'ws:///v1/plugins/connect', 'ws:127.0.0.1:8080/v1/plugins/connect', 'file:///tmp/socket', 'ws://127.0.0.1:99999/'];

const refusal = (url: string): string =>
  `connect: --url must be a ws:// or wss:// URL (e.g. ws://127.0.0.1:8080/v1/plugins/connect), not '${url}'`;

const connectCli = (...args: string[]): Ran => runPlugin('connect', ...args);

test('a gateway URL is ws, wss, http or https with a host', () => {
  for (const url of ['ws://127.0.0.1:8080/v1/plugins/connect', 'wss://gateway.example/v1/plugins/connect', 'ws://[::1]:1/x', 'http://localhost/v1/plugins/connect', 'https://gateway/v1/plugins/connect']) {
    assert.equal(parseGatewayUrl(url).href.length > 0, true, url);
  }
});

test('a URL that can never reach a gateway is refused with the flag, the form and the URL as given', () => {
  for (const url of BAD_URLS) {
    assert.throws(() => parseGatewayUrl(url), (error: unknown) => error instanceof HandshakeError && error.message === refusal(url), url);
  }
});

test('a URL is shown as the dispatcher shows it: userinfo, query values, bare items masked, no fragment', () => {
  for (const [url, shown] of [
    ['ws://127.0.0.1:8080/v1/plugins/connect', 'ws://127.0.0.1:8080/v1/plugins/connect'],
    ['wss://gw.example/c?token=t0k&region=eu', 'wss://gw.example/c?token=***&region=***'],
    ['ws://me:t0k@gw.example/c?debug#frag', 'ws://me:***@gw.example/c?***'],
    ['ws://t0k@gw.example:8080/c', 'ws://***@gw.example:8080/c'],
    ['ws://gw.example/c?t0k&region=eu', 'ws://gw.example/c?***&region=***'],
    ['ws://gw.example/c#t0k', 'ws://gw.example/c'],
    ['ws://gw.example?', 'ws://gw.example'],
    ['me:t0k@gw.example/c', 'me:***@gw.example/c'],
    ['not-a-url', 'not-a-url'],
  ]) {
    assert.equal(maskedUrl(url as string), shown, url);
  }
});

test('a refused URL is shown masked: a token in it never reaches the line', () => {
  // Before, the refusal quoted the URL as written.
  for (const [url, shown] of [
    ['ftp://me:t0ken@h/', 'ftp://me:***@h/'],
    ['ftp://t0ken@h/', 'ftp://***@h/'],
    ['ws://h:99999/?token=t0ken', 'ws://h:99999/?token=***'],
    ['ws://h:99999/?t0ken', 'ws://h:99999/?***'],
    ['ftp://h/#t0ken', 'ftp://h/'],
  ]) {
    assert.throws(() => parseGatewayUrl(url as string), (error: unknown) => error instanceof HandshakeError && error.message === refusal(shown as string), url);
  }
});

test('the connect command line: --url, --config, --help, and mistakes in one line', () => {
  const url = 'ws://127.0.0.1:8080/v1/plugins/connect';
  assert.deepEqual(parseConnectCommand(['connect', '--url', url, '--config', '{"a":1}']), { mode: 'connect', url, config: '{"a":1}', tls: {} });
  assert.deepEqual(parseConnectCommand(['connect', `--url=${url}`]), { mode: 'connect', url, config: undefined, tls: {} });
  assert.deepEqual(parseConnectCommand(['connect', '--help']), { mode: 'help' });
  assert.deepEqual(parseConnectCommand(['connect', '-h', '--url', 'not-a-url']), { mode: 'help' });
  assert.throws(() => parseConnectCommand(['connect']), (error: unknown) => error instanceof HandshakeError && error.message === `connect: --url is required; usage: ${CONNECT_USAGE}`);
  assert.throws(() => parseConnectCommand(['connect', '--url']), /^HandshakeError: connect: --url needs a value; usage: connect /);
  assert.throws(() => parseConnectCommand(['connect', '--url', 'ftp://h/']), HandshakeError);
  assert.throws(() => parseConnectCommand(['connect', '--uri', url]), /connect: unknown option --uri; usage: connect /);
  // Named, never quoted: a token may sit in what was refused.
  for (const [argv, said] of [
    [['connect', '--uri=ws://me:t0ken@h/'], 'connect: unknown option --uri (its value is not shown); usage: connect '],
    [['connect', '--url', url, 't0ken'], 'connect: unexpected argument #4 (its text is not shown); usage: connect '],
    [['connect', '--url', url, '-t0ken'], 'connect: unknown option (argument #4, its text is not shown); usage: connect '],
  ] as const) {
    assert.throws(
      () => parseConnectCommand(argv),
      (error: unknown) => error instanceof HandshakeError && error.message.startsWith(said) && !error.message.includes('t0ken'),
      argv.join(' '),
    );
  }
});

test('example-plugin connect: a URL that can never reach a gateway is one line, exit 1', () => {
  for (const url of BAD_URLS) assert.equal(assertOneLineFailure(connectCli('--url', url)), refusal(url));
  assert.match(assertOneLineFailure(connectCli()), /^connect: --url is required; usage: connect --url ws:\/\//);
  assert.match(assertOneLineFailure(connectCli('--url')), /^connect: --url needs a value; usage: connect /);
});

test('example-plugin connect --help and -h: the flags and the environment, on stdout, exit 0', () => {
  for (const flag of ['--help', '-h']) {
    const done = connectCli(flag);
    assert.equal(done.status, 0, done.stderr);
    assert.equal(done.stderr, '');
    for (const word of ['--url', 'ws://', 'wss://', '--config', 'LINCHKIT_PLUGIN_TOKEN_FILE', 'LINCHKIT_PLUGIN_TOKEN']) {
      assert.ok(done.stdout.includes(word), `${word} is missing from:\n${done.stdout}`);
    }
  }
});

test('example-plugin connect: a well-formed URL whose gateway is not there yet is dialled again, not refused', async () => {
  const child = spawn(PLUGIN, ['connect', '--url', 'ws://127.0.0.1:1/v1/plugins/connect'], { env: ENV, stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = '';
  child.stderr.setEncoding('utf8').on('data', (chunk: string) => (stderr += chunk));
  const exited = once(child, 'exit');
  const stillRunning = await Promise.race([exited.then(() => false), new Promise<boolean>((resolve) => setTimeout(() => resolve(true), 1500))]);
  child.kill('SIGTERM');
  await exited;
  assert.ok(stillRunning, `connect ended instead of dialling again: ${stderr}`);
  for (const crash of CRASHES) assert.ok(!stderr.includes(crash), stderr);
});

test('example-plugin connect: a gateway not there is named masked at each dial, a fragment is left out', async () => {
  // Before, nothing said the gateway could not be reached, and a URL with a fragment ended
  // in a stack trace (`ws` throws on one).
  const closed = net.createServer();
  closed.listen(0, '127.0.0.1');
  await once(closed, 'listening');
  const port = (closed.address() as net.AddressInfo).port;
  closed.close();
  await once(closed, 'close');
  const token = 'tok-never-shown';
  const url = `ws://me:${token}@127.0.0.1:${port}/v1/plugins/connect?token=${token}&${token}#${token}`;
  const child = spawn(PLUGIN, ['connect', '--url', url], { env: ENV, stdio: ['ignore', 'pipe', 'pipe'] });
  let said = '';
  child.stdout.setEncoding('utf8').on('data', (chunk: string) => (said += chunk));
  child.stderr.setEncoding('utf8').on('data', (chunk: string) => (said += chunk));
  const exited = once(child, 'exit');
  const named = `cannot reach the gateway at ws://me:***@127.0.0.1:${port}/v1/plugins/connect?token=***&***: `;
  const deadline = Date.now() + 30_000;
  while (!said.includes(named) && child.exitCode === null && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 50));
  const stillRunning = child.exitCode === null;
  child.kill('SIGTERM');
  await exited;
  assert.ok(stillRunning, `connect ended instead of dialling again: ${said}`);
  assert.ok(said.includes(named), said);
  assert.ok(!said.includes(token), said);
  for (const crash of CRASHES) assert.ok(!said.includes(crash), said);
});

test('connect told to register in etcd refuses in one line, exit 1, before it dials', async () => {
  assert.equal(registrationRefusal({}), undefined);
  assert.equal(registrationRefusal({ [REGISTER_ETCD_ENV]: '' }), undefined); // empty: unset
  let connections = 0;
  const gateway = net.createServer((socket) => {
    connections += 1;
    socket.destroy();
  });
  gateway.listen(0, '127.0.0.1');
  await once(gateway, 'listening');
  const url = `ws://127.0.0.1:${(gateway.address() as net.AddressInfo).port}/v1/plugins/connect`;
  const child = spawn(PLUGIN, ['connect', '--url', url], {
    env: { ...ENV, [REGISTER_ETCD_ENV]: 'http://127.0.0.1:2379', LINCHKIT_REGISTER_PREFIX: '/linchkit/plugins/example' },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const done: Ran = { status: null, stdout: '', stderr: '' };
  child.stdout.setEncoding('utf8').on('data', (chunk: string) => (done.stdout += chunk));
  child.stderr.setEncoding('utf8').on('data', (chunk: string) => (done.stderr += chunk));
  const killer = setTimeout(() => child.kill('SIGKILL'), 30_000);
  try {
    [done.status] = (await once(child, 'exit')) as [number | null];
  } finally {
    clearTimeout(killer);
    gateway.close();
  }
  const line = assertOneLineFailure(done);
  assert.match(line, /^connect: LINCHKIT_REGISTER_ETCD: a plugin that dials the gateway \(connect\) is not registered in etcd/);
  assert.equal(connections, 0, 'the plugin dialled the gateway before refusing');
});
