/**
 * Reverse mode against a gateway that upgrades the connection and then closes it on the
 * plugin's hello (docs/protocol.md, "Reverse mode"): 4403, the hello names another id or
 * version than the one admitted, is as final as a 403 at the upgrade (the next connection
 * would send the same hello); 4400 and every other close are dialled again. A raw `ws`
 * server stands in for the gateway and counts the upgrades.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import { test } from 'node:test';
import { WebSocketServer } from 'ws';
import { Plugin, Refused, dial } from '@linchkit/plugin-sdk';
import { CRASHES, ENV, PLUGIN } from './cli-support';

const REASON = "admitted as version 2.0.0, said '1.0.0'";
/** A plugin dialling again for ever fails here, by name, instead of hanging the run. */
const BOUNDED = { timeout: 30_000 };

function examplePlugin(): Plugin {
  return new Plugin({ id: 'example', version: '1.0.0' }).method('echo', (params) => params);
}

/** A gateway that reads each connection's hello and closes it with `code` and `reason`. */
async function closingGateway(code: number, reason: string): Promise<{ url: string; upgrades: () => number; close: () => void }> {
  const server = new WebSocketServer({ host: '127.0.0.1', port: 0 });
  await once(server, 'listening');
  let upgrades = 0;
  server.on('connection', (socket) => {
    upgrades += 1;
    socket.once('message', () => socket.close(code, reason));
  });
  const url = `ws://127.0.0.1:${(server.address() as AddressInfo).port}/v1/plugins/connect`;
  return { url, upgrades: () => upgrades, close: () => server.close() };
}

test('a hostile close reason is escaped and cut in Refused, which connect prints', BOUNDED, async () => {
  // ESC[2J clears the operator's screen, a newline forges a line, U+202E reverses text.
  const cases: Array<[string, string]> = [
    ['\x1b[2J\nERROR forged line \u202e', '\\x1b[2J\\nERROR forged line \\u202e'],
    ['\x1b'.repeat(123), `${'\\x1b'.repeat(50)}…`], // the longest reason a close frame holds
  ];
  for (const [reason, shown] of cases) {
    const gateway = await closingGateway(4403, reason);
    try {
      const signal = AbortSignal.timeout(5_000);
      const refused = await dial(examplePlugin(), gateway.url, { initialBackoffMs: 1, maxBackoffMs: 10, signal }).then(
        () => assert.fail('dial went on dialling'),
        (error: unknown) => error,
      );
      assert.ok(refused instanceof Refused, String(refused));
      assert.equal(refused.reason, shown);
      assert.equal(refused.message, `the gateway refused the connection (4403): ${shown}`);
    } finally {
      gateway.close();
    }
  }
});

test('a close 4403 after the hello ends dial with Refused and the reason, without dialling again', BOUNDED, async () => {
  const gateway = await closingGateway(4403, REASON);
  try {
    const started = Date.now();
    // Stopped after 5 s, a dial that is still dialling resolves: that fails the test.
    const signal = AbortSignal.timeout(5_000);
    const refused = await dial(examplePlugin(), gateway.url, { initialBackoffMs: 1, maxBackoffMs: 10, signal }).then(
      () => assert.fail(`dial went on dialling: ${gateway.upgrades()} upgrades in 5 s`),
      (error: unknown) => error,
    );
    assert.ok(refused instanceof Refused, String(refused));
    assert.equal(refused.status, 4403);
    assert.equal(refused.reason, REASON);
    assert.equal(refused.message, `the gateway refused the connection (4403): ${REASON}`);
    assert.ok(Date.now() - started < 2_000, `refused after ${Date.now() - started} ms`);
    await new Promise((resolve) => setTimeout(resolve, 100)); // a redial would have come by now
    assert.equal(gateway.upgrades(), 1);
  } finally {
    gateway.close();
  }
});

for (const code of [4400, 1001, 1008, 1012]) {
  test(`a close ${code} after the hello is dialled again`, BOUNDED, async () => {
    const gateway = await closingGateway(code, 'closed by the test');
    const stopping = new AbortController();
    const dialling = dial(examplePlugin(), gateway.url, { initialBackoffMs: 1, maxBackoffMs: 10, signal: stopping.signal });
    let ended = false;
    dialling.then(
      () => (ended = true),
      () => (ended = true),
    );
    try {
      const deadline = Date.now() + 10_000;
      while (gateway.upgrades() < 3 && !ended && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 10));
      assert.equal(ended, false, `dial ended after ${gateway.upgrades()} upgrades`);
      assert.ok(gateway.upgrades() >= 3, `${gateway.upgrades()} upgrades in 10 s`);
    } finally {
      stopping.abort();
      await dialling.catch(() => undefined);
      gateway.close();
    }
  });
}

test('example-plugin connect: a close 4403 after the hello is one line naming the reason, exit 1', BOUNDED, async () => {
  const gateway = await closingGateway(4403, REASON);
  try {
    const child = spawn(PLUGIN, ['connect', '--url', gateway.url], { env: ENV, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (chunk: string) => (stdout += chunk));
    child.stderr.setEncoding('utf8').on('data', (chunk: string) => (stderr += chunk));
    const timer = setTimeout(() => child.kill('SIGKILL'), 10_000);
    const [status] = (await once(child, 'exit')) as [number | null];
    clearTimeout(timer);
    assert.equal(status, 1, `exit ${status}: ${stderr}`);
    assert.equal(stdout, '');
    for (const crash of CRASHES) assert.ok(!stderr.includes(crash), stderr);
    assert.equal(stderr.trim(), `connect: the gateway refused the connection (4403): ${REASON}`);
    assert.equal(gateway.upgrades(), 1);
  } finally {
    gateway.close();
  }
});

test('a 400 at the upgrade ends dial with Refused, without dialling again', BOUNDED, async () => {
  // An id or version off the gateway's pattern: the same dial would get the same 400.
  let requests = 0;
  const server = createServer((_, response) => {
    requests += 1;
    response.writeHead(400, { 'Content-Type': 'application/json' }).end('{"ok":false}');
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  try {
    const url = `ws://127.0.0.1:${(server.address() as AddressInfo).port}/v1/plugins/connect`;
    const signal = AbortSignal.timeout(5_000);
    const refused = await dial(examplePlugin(), url, { initialBackoffMs: 1, maxBackoffMs: 10, signal }).then(
      () => assert.fail(`dial went on dialling: ${requests} requests in 5 s`),
      (error: unknown) => error,
    );
    assert.ok(refused instanceof Refused, String(refused));
    assert.equal(refused.status, 400);
    assert.equal(requests, 1);
  } finally {
    server.close();
  }
});

test("a host event's hostile name is escaped in the log line of its failed handler", BOUNDED, async () => {
  const server = new WebSocketServer({ host: '127.0.0.1', port: 0 });
  await once(server, 'listening');
  server.on('connection', (socket) => {
    socket.once('message', () => {
      // ESC[2J clears the operator's screen, a newline forges a line, U+202E reverses text.
      socket.send(JSON.stringify({ type: 'event', event: '\x1b[2J\nERROR forged \u202e', data: null }));
    });
  });
  const url = `ws://127.0.0.1:${(server.address() as AddressInfo).port}/v1/plugins/connect`;
  const plugin = examplePlugin().on('*', () => {
    throw new Error('no handler for that');
  });
  const written: string[] = [];
  const write = process.stderr.write.bind(process.stderr);
  process.stderr.write = ((chunk: string | Uint8Array) => {
    written.push(String(chunk));
    return true;
  }) as typeof process.stderr.write;
  const stopping = new AbortController();
  try {
    const dialling = dial(plugin, url, { initialBackoffMs: 1, maxBackoffMs: 10, signal: stopping.signal });
    const deadline = Date.now() + 5_000;
    while (!written.some((line) => line.includes('handler of host event')) && Date.now() < deadline) {
      await new Promise((resolve) => setTimeout(resolve, 10));
    }
    stopping.abort();
    await dialling.catch(() => undefined);
  } finally {
    process.stderr.write = write;
    server.close();
  }
  const line = written.find((each) => each.includes('handler of host event'));
  assert.ok(line, written.join(''));
  assert.ok(line.includes('host event \\x1b[2J\\nERROR forged \\u202e failed'), line);
  assert.ok(!line.includes('\x1b'), line);
});
