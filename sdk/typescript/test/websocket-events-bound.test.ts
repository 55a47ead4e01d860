/**
 * The plugin's events for a connected host that reads nothing (docs/protocol.md, "WebSocket
 * binding"): they wait in a queue per connection, written only while the socket takes them,
 * the newest 1,024 kept, the oldest dropped, counted and said once on stderr, as in
 * the Go, Rust and Java SDKs. Before, each went to `ws`, whose buffer grew without bound.
 *
 * The session runs over a stand-in for `ws`'s WebSocket whose socket takes nothing until the
 * test lets it: a real connection's kernel buffers take an unknown share first, so what was
 * written while the host read nothing could not be told from what came after.
 */
import assert from 'node:assert/strict';
import { EventEmitter } from 'node:events';
import { test } from 'node:test';
import { WebSocket } from 'ws';
import { Plugin, Session } from '@linchkit/plugin-sdk';
import { log } from '#internal/log';

/** Events one connection keeps for a host that does not read (EVENTS_PER_STREAM, every SDK's). */
const KEPT = 1024;

type Frame = { type: string; [key: string]: unknown };

/** What a session uses of `ws`'s WebSocket; `bufferedAmount` is what the socket has not taken. */
class StalledSocket extends EventEmitter {
  readonly readyState = WebSocket.OPEN;
  bufferedAmount = 0;
  /** Frames handed over, in order. */
  readonly sent: Frame[] = [];
  private readonly callbacks: (() => void)[] = [];

  send(data: Buffer, _options: unknown, callback: () => void): void {
    this.sent.push(JSON.parse(data.toString()) as Frame);
    this.bufferedAmount += data.length;
    this.callbacks.push(callback);
  }

  /** The socket takes everything it was handed: each send's callback, as `ws` calls them. */
  drain(): void {
    while (this.callbacks.length > 0) {
      this.bufferedAmount = 0;
      (this.callbacks.shift() as () => void)();
    }
  }

  pause(): void {}
  resume(): void {}
}

test('a host that reads nothing gets the newest 1,024 events once it reads, the oldest dropped and said once', (t) => {
  const warnings: string[] = [];
  t.mock.method(log, 'warn', (message: string) => warnings.push(message));
  const plugin = new Plugin({ id: 'example', version: '1.0.0' }).method('echo', (params) => params);
  const socket = new StalledSocket();
  const session = new Session(plugin, socket as unknown as WebSocket);
  void session.run();
  assert.deepEqual(
    socket.sent.map((frame) => frame.type),
    ['hello'],
  );
  // From here the socket takes nothing: a megabyte waits in it.
  socket.bufferedAmount = 1024 * 1024;
  socket.sent.length = 0;
  const emitted = 3 * KEPT;
  for (let seq = 0; seq < emitted; seq++) plugin.emit('tick', { seq });
  assert.equal(socket.sent.length, 0, `${socket.sent.length} events handed to a socket that took nothing`);
  assert.equal(session.eventsDropped, emitted - KEPT);
  assert.deepEqual(warnings, ['the host is not reading its Events stream; dropping the oldest events']);

  // The host reads again: the newest events come, in order, and nothing else.
  socket.drain();
  const first = emitted - KEPT;
  assert.deepEqual(
    socket.sent,
    Array.from({ length: KEPT }, (_, i) => ({ type: 'event', event: 'tick', data: { seq: first + i } })),
  );
  assert.equal(session.eventsDropped, emitted - KEPT);
  assert.equal(warnings.length, 1);
  socket.emit('close');
});
