/**
 * A graceful stop over WebSocket (docs/protocol.md, "WebSocket binding"): the plugin says
 * `goaway`, answers every call that still arrives, and waits for the host to close the
 * connection; past the grace it closes it itself (1001). Served (`WebSocketPluginServer`)
 * and reverse mode (`dial` with a signal) alike, against a raw `ws` peer as the host.
 */
import assert from 'node:assert/strict';
import { once } from 'node:events';
import type { AddressInfo } from 'node:net';
import { test } from 'node:test';
import { WebSocket, WebSocketServer } from 'ws';
import { Plugin, Session, WebSocketPluginServer, dial } from '@linchkit/plugin-sdk';
import { Frames } from './ws-frames';

function examplePlugin(): Plugin {
  return new Plugin({ id: 'example', version: '1.0.0' }).method('echo', (params) => params);
}

const call = (id: number, params: unknown): string => JSON.stringify({ type: 'call', id, request: { v: 1, method: 'echo', params, context: {} } });

/** A host end and the plugin's `Session` on the other end of one connection. */
async function connected(): Promise<{ host: WebSocket; frames: Frames; session: Session; done: () => void }> {
  const server = new WebSocketServer({ host: '127.0.0.1', port: 0 });
  await once(server, 'listening');
  const accepted = once(server, 'connection') as Promise<[WebSocket]>;
  const host = new WebSocket(`ws://127.0.0.1:${(server.address() as AddressInfo).port}/`);
  const frames = new Frames(host);
  const [socket] = await accepted;
  const session = new Session(examplePlugin(), socket);
  void session.run();
  assert.equal((await frames.next()).type, 'hello');
  return { host, frames, session, done: () => server.close() };
}

test('after goaway the session still answers a call, and closes with 1001 once the grace is over', async () => {
  const { host, frames, session, done } = await connected();
  try {
    const started = Date.now();
    const goingAway = session.goAway(300);
    assert.deepEqual(await frames.next(), { type: 'goaway' });
    host.send(call(1, 'sent before the host read goaway'));
    assert.deepEqual(await frames.next(), { type: 'response', id: 1, response: { ok: true, result: 'sent before the host read goaway' } });
    const [code] = (await once(host, 'close')) as [number];
    await goingAway;
    assert.equal(code, 1001);
    assert.ok(Date.now() - started >= 290, `closed after ${Date.now() - started} ms, before the grace`);
  } finally {
    done();
  }
});

test('a host that closes once its calls are answered ends goaway before the grace', async () => {
  const { host, frames, session, done } = await connected();
  try {
    const started = Date.now();
    const goingAway = session.goAway(10_000);
    assert.equal((await frames.next()).type, 'goaway');
    host.close(1000);
    await goingAway;
    assert.ok(Date.now() - started < 2_000, `goaway took ${Date.now() - started} ms`);
  } finally {
    done();
  }
});

test('an error frame from the host is never answered (an older host answers goaway so)', async () => {
  const { host, frames, done } = await connected();
  try {
    host.send(JSON.stringify({ type: 'error', id: null, error: { type: 'provider_error', message: 'unknown frame type goaway' } }));
    host.send(JSON.stringify({ type: 'health', id: 7 }));
    const next = await frames.next();
    assert.equal(next.type, 'health', JSON.stringify(next));
    host.close();
  } finally {
    done();
  }
});

test('a served plugin stops: no new connection, goaway on the open one, closed once the host closes it', async () => {
  const server = new WebSocketPluginServer(examplePlugin(), undefined);
  const url = `ws://${await server.listen('127.0.0.1:0')}/`;
  const host = new WebSocket(url);
  const frames = new Frames(host);
  assert.equal((await frames.next()).type, 'hello');
  const closing = server.close(10_000);
  assert.equal((await frames.next()).type, 'goaway');
  const redial = new WebSocket(url);
  const [error] = (await once(redial, 'error')) as [NodeJS.ErrnoException];
  assert.equal(error.code, 'ECONNREFUSED');
  host.send(call(1, 2));
  assert.deepEqual(await frames.next(), { type: 'response', id: 1, response: { ok: true, result: 2 } });
  host.close(1000);
  await closing;
});

test('a dialling plugin stops: goaway, answers what arrives, no redial, resolves once the gateway closed', async () => {
  const gateway = new WebSocketServer({ host: '127.0.0.1', port: 0 });
  await once(gateway, 'listening');
  let connections = 0;
  gateway.on('connection', () => (connections += 1));
  const accepted = once(gateway, 'connection') as Promise<[WebSocket]>;
  const stopping = new AbortController();
  const url = `ws://127.0.0.1:${(gateway.address() as AddressInfo).port}/v1/plugins/connect`;
  const dialling = dial(examplePlugin(), url, { signal: stopping.signal, initialBackoffMs: 1, graceMs: 10_000 });
  try {
    const [socket] = await accepted;
    const frames = new Frames(socket);
    assert.equal((await frames.next()).type, 'hello');
    stopping.abort();
    assert.equal((await frames.next()).type, 'goaway');
    socket.send(call(1, 'late'));
    assert.deepEqual(await frames.next(), { type: 'response', id: 1, response: { ok: true, result: 'late' } });
    socket.close(1000);
    await dialling;
    await new Promise((resolve) => setTimeout(resolve, 100));
    assert.equal(connections, 1);
  } finally {
    gateway.close();
  }
});
