/**
 * The plugin's events for a connected host that reads nothing (docs/protocol.md, "WebSocket
 * binding"): they wait in a queue per connection, written only while the socket takes them,
 * the newest 1,024 kept, the oldest dropped, counted and said once on stderr, as in
 * the Go, Rust and Java SDKs. Before, each went to `ws`, whose buffer grew without bound.
 * The `dropped` frame behind the events that waited for a host waits there too, and is never
 * dropped.
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
/** Events the plugin keeps while no host is connected (MAX_BUFFERED_EVENTS, every SDK's). */
const KEPT_FOR_A_HOST = 1000;

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

test('the dropped frame outlives a flood of events for a host that reads nothing, and says its count', (t) => {
  // Events emitted while no host is connected go to the next one, then a `dropped` frame with
  // the count lost from them. Before, that frame waited among the events for a host that
  // reads nothing, and a flood dropped it once it was the oldest, the count with it.
  t.mock.method(log, 'warn', () => undefined);
  const plugin = new Plugin({ id: 'example', version: '1.0.0' }).method('echo', (params) => params);
  plugin.keepAtMost(KEPT_FOR_A_HOST);
  const lostBeforeAHost = 7;
  // 1 KiB each: the session hands ws the first few (64 KiB, EVENTS_HIGH_WATER), the rest wait.
  for (let seq = 0; seq < KEPT_FOR_A_HOST + lostBeforeAHost; seq++) {
    plugin.emit('waited', { seq, pad: 'w'.repeat(1024) });
  }
  const socket = new StalledSocket();
  const session = new Session(plugin, socket as unknown as WebSocket);
  void session.run();
  const handed = socket.sent.length - 1;
  assert.ok(handed > 0 && handed < KEPT_FOR_A_HOST, `ws was handed ${handed} of the events that waited for a host`);
  // The host reads nothing meanwhile: the flood drops every event that still waited, and more.
  const flood = 3 * KEPT;
  for (let seq = 0; seq < flood; seq++) plugin.emit('flood', { seq });

  // The host reads again.
  socket.drain();
  const frames = socket.sent;
  assert.equal(frames[0]?.type, 'hello');
  const at = frames.flatMap((frame, i) => (frame.type === 'dropped' ? [i] : []));
  assert.equal(at.length, 1, `dropped frames at [${at.join(', ')}] (none: lost in the flood)`);
  const dropped = at[0] as number;
  assert.deepEqual(frames[dropped], { type: 'dropped', count: lostBeforeAHost });
  // Before it, those that waited for a host that ws was handed, in order; after it, the
  // newest of the flood in order: as many as the queue holds beside the dropped frame.
  const seqs = (from: number, to?: number): unknown[] =>
    frames.slice(from, to).map((frame) => [frame.event, (frame.data as { seq: number }).seq]);
  assert.deepEqual(
    seqs(1, dropped),
    Array.from({ length: handed }, (_, i) => ['waited', lostBeforeAHost + i]),
  );
  assert.deepEqual(
    seqs(dropped + 1),
    Array.from({ length: KEPT - 1 }, (_, i) => ['flood', flood - (KEPT - 1) + i]),
  );
  assert.equal(session.eventsDropped, KEPT_FOR_A_HOST - handed + flood - (KEPT - 1));
  socket.emit('close');
});
