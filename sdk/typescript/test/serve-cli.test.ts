/**
 * `serve` as an operator meets it (the contract of tests/conformance/test_serve_cli.py):
 * `--help` on stdout with exit 0, a mistyped `--address` refused before listening, a port
 * already taken, each one line on stderr and exit 1, never a stack trace.
 */
import assert from 'node:assert/strict';
import { once } from 'node:events';
import * as net from 'node:net';
import { test } from 'node:test';
import { HandshakeError, parseCommand } from '#internal/handshake';
import { ListenError, cannotListen, formatListenAddress, listen, parseListenAddress } from '#internal/listen';
import { type Ran, assertOneLineFailure, runPlugin } from './cli-support';

const serveCli = (...args: string[]): Ran => runPlugin('serve', ...args);

async function takenPort(): Promise<net.Server> {
  const server = net.createServer();
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  return server;
}

const portOf = (server: net.Server): number => (server.address() as net.AddressInfo).port;

test('an address is a host (a name, IPv4, or IPv6 in brackets) and a decimal port 0-65535', () => {
  assert.deepEqual(parseListenAddress('127.0.0.1:0'), { host: '127.0.0.1', port: 0 });
  assert.deepEqual(parseListenAddress('localhost:65535'), { host: 'localhost', port: 65535 });
  assert.deepEqual(parseListenAddress('[::1]:50051'), { host: '::1', port: 50051 });
  assert.deepEqual(parseListenAddress('plugin.internal:8080'), { host: 'plugin.internal', port: 8080 });
  assert.equal(formatListenAddress({ host: '::1', port: 7 }), '[::1]:7');
  assert.equal(formatListenAddress({ host: '0.0.0.0', port: 7 }), '0.0.0.0:7');
});

test('a mistyped address is refused with the flag, the form and the address as given', () => {
  const mistakes = ['', 'not-an-address', '127.0.0.1:', '127.0.0.1:99999', '127.0.0.1:-1', '127.0.0.1:http', ':50051', '::1:50051', '[::1]', '[nope]:1', '127.0.0.1:0x10', '127.0.0.1: 1'];
  for (const address of mistakes) {
    assert.throws(
      () => parseListenAddress(address),
      (error: unknown) =>
        error instanceof ListenError &&
        error.message === `serve: --address must be host:port with a port in 0-65535 (e.g. 127.0.0.1:50051), not '${address}'`,
      address,
    );
  }
});

test('the command line: serve --websocket, --config, --help, and mistakes in one line', () => {
  assert.deepEqual(parseCommand(['serve', '--help']), { mode: 'help' });
  assert.deepEqual(parseCommand(['serve', '-h']), { mode: 'help' });
  assert.deepEqual(parseCommand(['serve', '--websocket', '--address', '[::1]:0', '--config', '{}']), {
    mode: 'websocket',
    address: '[::1]:0',
    config: '{}',
    registry: new Map(),
  });
  assert.deepEqual(parseCommand(['serve', '--websocket']), { mode: 'websocket', address: '127.0.0.1:0', config: undefined, registry: new Map() });
  assert.throws(() => parseCommand(['serve', '--address', '127.0.0.1:99999']), ListenError);
  assert.throws(() => parseCommand(['serve', '--websocket', '--address=nope']), ListenError);
  assert.throws(() => parseCommand(['serve', '--address']), /--address needs a value; usage: serve /);
  assert.throws(() => parseCommand(['serve', '--config', '{}']), /--config needs --websocket/);
  assert.throws(() => parseCommand(['serve', '--port', '1']), (error: unknown) => error instanceof HandshakeError && /usage: serve .*--help/.test(error.message));
});

test('a failed listen says why in words an operator can act on', () => {
  const failure = (code: string): Error => Object.assign(new Error(`listen ${code}: whatever`), { code });
  assert.equal(cannotListen('127.0.0.1:1', failure('EADDRINUSE')).message, 'serve: cannot listen on 127.0.0.1:1: the port is already in use');
  assert.match(cannotListen('10.9.9.9:1', failure('EADDRNOTAVAIL')).message, /not an address of this machine$/);
  assert.match(cannotListen('nope:1', failure('ENOTFOUND')).message, /does not resolve$/);
  // grpc-js folds node's error into its own message, without a code.
  assert.match(cannotListen('x:1', new Error('Name resolution failed for target dns:x:1')).message, /does not resolve$/);
  assert.match(cannotListen('h:1', new Error('No address added: [listen EADDRINUSE: address already in use]')).message, /already in use$/);
  assert.equal(cannotListen('h:1', new Error('Error: something new\n    at here')).message, 'serve: cannot listen on h:1: something new');
});

test('listen rejects a port already taken with a ListenError, and resolves to the port bound', async () => {
  const taken = await takenPort();
  try {
    const address = { host: '127.0.0.1', port: portOf(taken) };
    await assert.rejects(listen(net.createServer(), address), (error: unknown) => error instanceof ListenError && /already in use/.test(error.message));
    const server = net.createServer();
    const port = await listen(server, { host: '127.0.0.1', port: 0 });
    assert.ok(port > 0);
    server.close();
  } finally {
    taken.close();
  }
});

test('example-plugin serve --help and -h: the flags and the environment, on stdout, exit 0', () => {
  for (const flag of ['--help', '-h']) {
    const done = serveCli(flag);
    assert.equal(done.status, 0, done.stderr);
    assert.equal(done.stderr, '');
    for (const word of ['--address', '127.0.0.1:0', '--websocket', '--config', 'LINCHKIT_PLUGIN_TOKEN_FILE', 'LINCHKIT_PLUGIN_TOKEN', 'OTEL_EXPORTER_OTLP_ENDPOINT']) {
      assert.ok(done.stdout.includes(word), `${word} is missing from:\n${done.stdout}`);
    }
  }
});

test('example-plugin serve: a mistyped address or an unknown argument is one line, exit 1', () => {
  for (const args of [['--address', '127.0.0.1:99999'], ['--websocket', '--address', '::1:50051'], ['--address', '']]) {
    const line = assertOneLineFailure(serveCli(...args));
    assert.ok(line.includes(`not '${args.at(-1)}'`), line);
  }
  assert.match(assertOneLineFailure(serveCli('--port', '1')), /^serve: unknown option --port; usage: serve /);
});

test('a refused argument is named, never quoted: a token may sit in it', () => {
  const secret = 'hunter2-5f1d';
  const refusals: [string[], string][] = [
    [['serve', `--register-etcd-pasword=${secret}`], 'serve: unknown option --register-etcd-pasword (its value is not shown); usage: serve '],
    [['serve', `--url=ws://me:${secret}@127.0.0.1:9/`], 'serve: unknown option --url (its value is not shown); usage: serve '],
    [['serve', '--address', '127.0.0.1:0', secret], 'serve: unexpected argument #4 (its text is not shown); usage: serve '],
    [['serve', '--websocket', `--websocket=${secret}`], 'serve: --websocket takes no value (its value is not shown); usage: serve '],
    [[`--url=ws://me:${secret}@127.0.0.1:9/`], 'unknown option --url (its value is not shown); usage: serve '],
    [[secret], 'unknown command (argument #1, its text is not shown); usage: serve '],
    // One dash: by its place (before, named whole, as an option).
    [['serve', `-${secret}`], 'serve: unknown option (argument #2, its text is not shown); usage: serve '],
    [['serve', '--address=127.0.0.1:0', `-${secret}=1`], 'serve: unknown option (argument #3, its text is not shown); usage: serve '],
    [[`-${secret}`], 'unknown option (argument #1, its text is not shown); usage: serve '],
  ];
  for (const [argv, said] of refusals) {
    assert.throws(
      () => parseCommand(argv),
      (error: unknown) => error instanceof HandshakeError && error.message.startsWith(said) && !error.message.includes(secret),
      argv.join(' '),
    );
  }
});

test('example-plugin serve: a port already taken is one line, exit 1, over gRPC and WebSocket', async () => {
  const taken = await takenPort();
  try {
    const address = `127.0.0.1:${portOf(taken)}`;
    for (const mode of [[], ['--websocket']]) {
      const line = assertOneLineFailure(serveCli(...mode, '--address', address));
      assert.equal(line, `serve: cannot listen on ${address}: the port is already in use`);
    }
  } finally {
    taken.close();
  }
});

test('example-plugin serve --websocket and connect: a --config that is no JSON object is one line naming it, never its text', () => {
  // Until 2026-12-06 the line did not begin with the command, and text that was no JSON was
  // said to be no object.
  const secret = '{"password": "s3cr3t-of-the-config"';
  for (const [command, args] of [
    ['serve', ['--websocket', '--address', '127.0.0.1:0']],
    ['connect', ['--url', 'ws://127.0.0.1:9/v1/plugins/connect']],
  ] as const) {
    const notJson = runPlugin(command, ...args, '--config', secret);
    assert.equal(assertOneLineFailure(notJson), `${command}: --config is not valid JSON`);
    assert.ok(!notJson.stderr.includes('s3cr3t'), notJson.stderr);
    for (const config of ['[1]', 'null']) {
      assert.equal(assertOneLineFailure(runPlugin(command, ...args, '--config', config)), `${command}: --config must be a JSON object`);
    }
  }
});
