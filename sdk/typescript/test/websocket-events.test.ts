/**
 * The plugin's events while no host is connected (docs/protocol.md, "Events while
 * disconnected"): the newest 1,000 wait, go to the host that connects next, and are followed
 * by a `dropped` frame with the count lost, as in every SDK's WebSocket modes. Served
 * (`WebSocketPluginServer`) and reverse mode (`dial`), against a raw `ws` peer as the host.
 */
import assert from 'node:assert/strict';
import { once } from 'node:events';
import type { AddressInfo } from 'node:net';
import { test } from 'node:test';
import { WebSocket, WebSocketServer } from 'ws';
import { Plugin, WebSocketPluginServer, dial } from '@linchkit/plugin-sdk';
import { Frames } from './ws-frames';

/** The events tick {seq: from} … {seq: to - 1}, in order. */
async function ticks(frames: Frames, from: number, to: number): Promise<void> {
  for (let seq = from; seq < to; seq++) assert.deepEqual(await frames.next(), { type: 'event', event: 'tick', data: { seq } });
}

const BOUNDED = { timeout: 30_000 };
/** The events kept while no host is connected (`max_buffered_events` in the Python SDK). */
const KEPT = 1000;

function emitTicks(plugin: Plugin, from: number, to: number): void {
  for (let seq = from; seq < to; seq++) plugin.emit('tick', { seq });
}

function examplePlugin(): Plugin {
  return new Plugin({ id: 'example', version: '1.0.0' }).method('echo', (params) => params);
}

/**
 * Until no session takes the plugin's events (bounded): one that saw its connection close
 * has let go of them, so what is emitted next waits for the next host. (The plugin's own
 * sinks, read as the SDK's internals: nothing public says when a session has ended.)
 */
async function noHostListening(plugin: Plugin): Promise<void> {
  const sinks = (plugin as unknown as { sinks: Set<unknown> }).sinks;
  const deadline = Date.now() + 10_000;
  while (sinks.size > 0) {
    assert.ok(Date.now() < deadline, `${sinks.size} sessions still take the events after 10 s`);
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
}

/** After what was read so far comes nothing but the answer to a health probe: no `dropped`. */
async function nothingDropped(host: WebSocket, frames: Frames): Promise<void> {
  host.send(JSON.stringify({ type: 'health', id: 9 }));
  assert.equal((await frames.next()).type, 'health');
}

test('a served plugin keeps the newest 1,000 events for the next host, then says how many it dropped', BOUNDED, async () => {
  const plugin = examplePlugin();
  const server = new WebSocketPluginServer(plugin, undefined);
  const url = `ws://${await server.listen('127.0.0.1:0')}/`;
  try {
    emitTicks(plugin, 0, KEPT + 5);
    const host = new WebSocket(url);
    const frames = new Frames(host);
    assert.equal((await frames.next()).type, 'hello');
    await ticks(frames, 5, KEPT + 5);
    assert.deepEqual(await frames.next(), { type: 'dropped', count: 5 });
    emitTicks(plugin, 2000, 2001);
    await ticks(frames, 2000, 2001);
    host.close(1000);
    await noHostListening(plugin);

    // The count was the last host's: the next hears only of what it missed itself.
    emitTicks(plugin, 3000, 3003);
    const next = new WebSocket(url);
    const nextFrames = new Frames(next);
    assert.equal((await nextFrames.next()).type, 'hello');
    await ticks(nextFrames, 3000, 3003);
    await nothingDropped(next, nextFrames);
    next.close(1000);
  } finally {
    await server.close(0);
  }
});

test('a dialling plugin keeps the events emitted while disconnected, then says how many it dropped', BOUNDED, async () => {
  // Refusing upgrades (503) while the test says so: the plugin dials again at once, and
  // what it emits meanwhile must find no session.
  let admitting = true;
  const gateway = new WebSocketServer({ host: '127.0.0.1', port: 0, verifyClient: (_, done) => done(admitting, 503) });
  await once(gateway, 'listening');
  const plugin = examplePlugin();
  emitTicks(plugin, 0, KEPT + 2);
  const stopping = new AbortController();
  const url = `ws://127.0.0.1:${(gateway.address() as AddressInfo).port}/v1/plugins/connect`;
  let accepted = once(gateway, 'connection') as Promise<[WebSocket]>;
  const dialling = dial(plugin, url, { signal: stopping.signal, initialBackoffMs: 1, maxBackoffMs: 50, graceMs: 0 });
  try {
    let [socket] = await accepted;
    let frames = new Frames(socket);
    assert.equal((await frames.next()).type, 'hello');
    await ticks(frames, 2, KEPT + 2);
    assert.deepEqual(await frames.next(), { type: 'dropped', count: 2 });

    accepted = once(gateway, 'connection') as Promise<[WebSocket]>;
    admitting = false;
    socket.close(1001);
    await noHostListening(plugin);
    emitTicks(plugin, 5000, 5003);
    admitting = true;
    [socket] = await accepted;
    frames = new Frames(socket);
    assert.equal((await frames.next()).type, 'hello');
    await ticks(frames, 5000, 5003);
    await nothingDropped(socket, frames);
    stopping.abort();
    socket.close(1000);
    await dialling;
  } finally {
    stopping.abort(); // a failed case must not leave the plugin dialling, nor the process running
    for (const client of gateway.clients) client.terminate();
    gateway.close();
  }
});
