/**
 * permessage-deflate (RFC 7692) under a target's `compress: true` (docs/protocol.md,
 * "WebSocket binding"): the side that dials offers it, the side that serves accepts it.
 * Served (`WebSocketPluginServer`), the plugin accepts the dispatcher's offer; before, it
 * never did, so `compress: true` deflated nothing for a TypeScript plugin. In reverse mode
 * (`dial`) it offers it on every dial, the gateway deciding. Either way a deflated message
 * is inflated up to the message limit only: a bomb closes the connection 1009. A raw `ws`
 * peer stands in for the dispatcher.
 */
import assert from 'node:assert/strict';
import { once } from 'node:events';
import type { IncomingMessage } from 'node:http';
import type { AddressInfo } from 'node:net';
import { test } from 'node:test';
import { WebSocket, WebSocketServer, type RawData } from 'ws';
import { Plugin, WebSocketPluginServer, dial } from '@linchkit/plugin-sdk';

/** A plugin dialling again for ever, or a close that never comes, fails here by name. */
const BOUNDED = { timeout: 30_000 };
/** 64 MiB of one letter: a few tens of KB once deflated, eight times the message limit inflated. */
const BOMB_BYTES = 64 << 20;

function examplePlugin(): Plugin {
  return new Plugin({ id: 'example', version: '1.0.0' }).method('echo', (params) => params);
}

/** The next message `socket` receives, parsed. */
async function nextFrame(socket: WebSocket): Promise<{ type: string; [key: string]: unknown }> {
  const [data] = (await once(socket, 'message')) as [RawData];
  return JSON.parse(data.toString()) as { type: string };
}

const call = (id: number, params: unknown): string => JSON.stringify({ type: 'call', id, request: { v: 1, method: 'echo', params, context: {} } });

/** The plugin served, and a host dialled in offering permessage-deflate (ws's default), its hello read. */
async function served(): Promise<{ server: WebSocketPluginServer; url: string; host: WebSocket }> {
  const server = new WebSocketPluginServer(examplePlugin(), undefined);
  const url = `ws://${await server.listen('127.0.0.1:0')}/`;
  const host = new WebSocket(url, { perMessageDeflate: true });
  const hello = nextFrame(host);
  await once(host, 'open');
  assert.equal((await hello).type, 'hello');
  return { server, url, host };
}

test('the served plugin accepts permessage-deflate and answers over it', BOUNDED, async () => {
  const { server, host } = await served();
  try {
    assert.match(host.extensions, /^permessage-deflate/, `agreed: '${host.extensions}'`);
    const text = 'deflate me '.repeat(20_000);
    const answer = nextFrame(host);
    host.send(call(1, text));
    assert.deepEqual(await answer, { type: 'response', id: 1, response: { ok: true, result: text } });
  } finally {
    host.close(1000);
    await server.close(1_000);
  }
});

test('the served plugin closes 1009 on a deflated message that inflates past the limit, and serves on', BOUNDED, async () => {
  const { server, url, host } = await served();
  try {
    assert.match(host.extensions, /^permessage-deflate/, `agreed: '${host.extensions}'`);
    const closed = once(host, 'close') as Promise<[number]>;
    host.send(Buffer.alloc(BOMB_BYTES, 'x'), { binary: false, compress: true });
    const [code] = await closed;
    assert.equal(code, 1009);
    const again = new WebSocket(url);
    assert.equal((await nextFrame(again)).type, 'hello');
    const answer = nextFrame(again);
    again.send(call(2, 'still serving'));
    assert.deepEqual(await answer, { type: 'response', id: 2, response: { ok: true, result: 'still serving' } });
    again.close(1000);
  } finally {
    await server.close(1_000);
  }
});

test('dial offers permessage-deflate, and closes 1009 on a deflated bomb from the gateway', BOUNDED, async () => {
  // A gateway whose target says `compress: true`: it accepts the offer.
  const gateway = new WebSocketServer({ host: '127.0.0.1', port: 0, perMessageDeflate: true });
  await once(gateway, 'listening');
  const arrived = once(gateway, 'connection') as Promise<[WebSocket, IncomingMessage]>;
  const url = `ws://127.0.0.1:${(gateway.address() as AddressInfo).port}/v1/plugins/connect`;
  const stop = new AbortController();
  const dialling = dial(examplePlugin(), url, { initialBackoffMs: 50, maxBackoffMs: 100, signal: stop.signal, graceMs: 100 });
  try {
    const [socket, request] = await arrived;
    assert.match(request.headers['sec-websocket-extensions'] ?? '', /^permessage-deflate/);
    assert.match(socket.extensions, /^permessage-deflate/, `agreed: '${socket.extensions}'`);
    assert.equal((await nextFrame(socket)).type, 'hello');
    const closed = once(socket, 'close') as Promise<[number]>;
    socket.send(Buffer.alloc(BOMB_BYTES, 'x'), { binary: false, compress: true });
    const [code] = await closed;
    assert.equal(code, 1009);
  } finally {
    stop.abort();
    await dialling;
    for (const client of gateway.clients) client.terminate();
    gateway.close();
  }
});
