/**
 * A stream cut off over WebSocket closes the plugin's generator, as the gRPC path does: the
 * host's `cancel` frame, or the connection dropping mid-stream, runs the generator's
 * `finally` (a cursor closed, a lock released), both ways the plugin speaks WebSocket (its
 * own server the dispatcher dials, and `dial` to the gateway). The generator waits between
 * chunks without the call's signal, as one reading rows from a database does: only the SDK
 * can close it.
 */
import assert from 'node:assert/strict';
import { once } from 'node:events';
import type { AddressInfo } from 'node:net';
import { test } from 'node:test';
import { WebSocket, WebSocketServer } from 'ws';
import { Plugin, WebSocketPluginServer, dial } from '@linchkit/plugin-sdk';
import { Frames } from './ws-frames';

/** A plugin whose endless stream says when its generator was closed (its `finally` ran). */
function rowsPlugin(): { plugin: Plugin; closed: Promise<number> } {
  let markClosed: (rows: number) => void = () => undefined;
  const closed = new Promise<number>((resolve) => (markClosed = resolve));
  const plugin = new Plugin({ id: 'example', version: '1.0.0' }).streamingMethod('rows', async function* () {
    let rows = 0;
    try {
      for (;;) {
        yield { row: rows++ };
        await new Promise((resolve) => setTimeout(resolve, 20)); // the next row, not watching ctx.signal
      }
    } finally {
      markClosed(rows);
    }
  });
  return { plugin, closed };
}

/** Within 10 s, or the test fails saying what did not happen. */
async function within<T>(promise: Promise<T>, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error(`${what} within 10 s`)), 10_000)));
  try {
    return await Promise.race([promise, late]);
  } finally {
    clearTimeout(timer);
  }
}

const stream = JSON.stringify({ type: 'stream', id: 1, request: { v: 1, plugin: 'example', method: 'rows', params: {}, context: {} } });

/** Start the stream from the host's end, wait for its first chunk, then cut it `how`. */
async function cut(host: WebSocket, frames: Frames, how: 'cancel' | 'drop'): Promise<void> {
  host.send(stream);
  let frame = await frames.next();
  while (frame.type !== 'chunk') frame = await frames.next(); // a welcome's answer, say
  assert.equal(frame.id, 1, JSON.stringify(frame));
  if (how === 'cancel') host.send(JSON.stringify({ type: 'cancel', id: 1 }));
  else host.terminate(); // the connection drops: no close frame
}

for (const how of ['cancel', 'drop'] as const) {
  test(`served over WebSocket: a stream cut off (${how}) closes the plugin's generator`, async () => {
    const { plugin, closed } = rowsPlugin();
    const server = new WebSocketPluginServer(plugin, undefined);
    const host = new WebSocket(`ws://${await server.listen('127.0.0.1:0')}/`);
    try {
      const frames = new Frames(host);
      assert.equal((await frames.next()).type, 'hello');
      await cut(host, frames, how);
      await within(closed, "the generator's finally did not run");
    } finally {
      host.terminate();
      await server.close(0);
    }
  });

  test(`dialling the gateway: a stream cut off (${how}) closes the plugin's generator`, async () => {
    const { plugin, closed } = rowsPlugin();
    const gateway = new WebSocketServer({ host: '127.0.0.1', port: 0 });
    await once(gateway, 'listening');
    const accepted = once(gateway, 'connection') as Promise<[WebSocket]>;
    const stopping = new AbortController();
    const url = `ws://127.0.0.1:${(gateway.address() as AddressInfo).port}/v1/plugins/connect`;
    const dialling = dial(plugin, url, { signal: stopping.signal, initialBackoffMs: 1, graceMs: 0 });
    try {
      const [socket] = await accepted;
      const frames = new Frames(socket);
      assert.equal((await frames.next()).type, 'hello');
      socket.send(JSON.stringify({ type: 'welcome' }));
      await cut(socket, frames, how);
      await within(closed, "the generator's finally did not run");
    } finally {
      stopping.abort();
      for (const client of gateway.clients) client.terminate();
      gateway.close();
      await dialling;
    }
  });
}
