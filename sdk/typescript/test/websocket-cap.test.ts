/**
 * The served plugin's cap on connections (`MAX_CONNECTIONS`, 1000, as `dispatcher-plugin
 * serve` holds its HTTP ones): past it an upgrade is refused 503 before it upgrades, in a
 * short `overloaded` envelope a dispatcher dials again on, and a connection that closes frees
 * its place. Before, every upgrade was taken. A cap of 2 set by the test, raw `ws` hosts.
 */
import assert from 'node:assert/strict';
import { once } from 'node:events';
import type { IncomingMessage } from 'node:http';
import { test } from 'node:test';
import { WebSocket } from 'ws';
import { MAX_CONNECTIONS, Plugin, WebSocketPluginServer } from '@linchkit/plugin-sdk';

const BOUNDED = { timeout: 30_000 };

function examplePlugin(): Plugin {
  return new Plugin({ id: 'example', version: '1.0.0' }).method('echo', (params) => params);
}

/** A host whose hello has come. */
async function helloed(url: string): Promise<WebSocket> {
  const host = new WebSocket(url);
  const [data] = (await once(host, 'message')) as [Buffer];
  assert.equal(JSON.parse(data.toString()).type, 'hello');
  return host;
}

/** The answer to an upgrade the server does not take: its status, headers and body. */
async function refusal(url: string): Promise<{ status: number; retryAfter: unknown; body: string }> {
  const host = new WebSocket(url);
  host.on('error', () => undefined);
  const [, response] = (await once(host, 'unexpected-response')) as [unknown, IncomingMessage];
  const chunks: Buffer[] = [];
  for await (const chunk of response) chunks.push(chunk as Buffer);
  return { status: response.statusCode ?? 0, retryAfter: response.headers['retry-after'], body: Buffer.concat(chunks).toString() };
}

test('the cap is the HTTP server’s, and must be a whole number of at least 1', () => {
  assert.equal(MAX_CONNECTIONS, 1000);
  for (const wrong of [0, -1, 1.5, Number.NaN]) {
    assert.throws(() => new WebSocketPluginServer(examplePlugin(), undefined, undefined, { maxConnections: wrong }), RangeError);
  }
});

test('an upgrade past the cap is refused 503 before it upgrades; a closed connection frees its place', BOUNDED, async () => {
  const server = new WebSocketPluginServer(examplePlugin(), undefined, undefined, { maxConnections: 2 });
  const url = `ws://${await server.listen('127.0.0.1:0')}/`;
  const hosts: WebSocket[] = [];
  try {
    hosts.push(await helloed(url), await helloed(url));
    const refused = await refusal(url);
    assert.equal(refused.status, 503);
    assert.equal(refused.retryAfter, '1');
    assert.ok(refused.body.length < 300, refused.body);
    const { ok, error } = JSON.parse(refused.body);
    assert.equal(ok, false);
    assert.equal(error.type, 'overloaded');
    assert.equal(error.retryable, true);
    assert.equal(error.retry_after, 1);
    assert.match(String(server), /connections 2\/2, refused 1/);

    const first = hosts.shift() as WebSocket;
    first.close(1000);
    await once(first, 'close');
    const deadline = Date.now() + 10_000;
    while (String(server).includes('connections 2/2')) {
      assert.ok(Date.now() < deadline, `${String(server)} 10 s after one of two closed`);
      await new Promise((resolve) => setTimeout(resolve, 5));
    }
    hosts.push(await helloed(url));
  } finally {
    for (const host of hosts) host.terminate();
    await server.close(0);
  }
});
