/**
 * The WebSocket send cap (docs/protocol.md, "WebSocket binding"): no frame over the least of
 * the plugin's own read cap (8 MiB) and the host's announced one goes out, so that the host
 * does not close the connection (1009) with every other call on it. The dispatcher announces
 * its cap in the upgrade request's `LinchKit-Max-Message-Bytes` header, the gateway in the
 * same header on its 101 upgrade response (held from the first frame on: the events kept
 * while disconnected, answers before the welcome) and then in its `welcome`, which replaces
 * it. A response over the cap is answered `provider_error` (`too_large`) instead; a
 * chunk over it ends its stream so, its generator closed; an event over it is not sent, the
 * first said on stderr. Before, each went out whole. The SDK's real server and `dial` on
 * loopback, raw `ws` peers as the host.
 */
import assert from 'node:assert/strict';
import { once } from 'node:events';
import type { AddressInfo } from 'node:net';
import { test } from 'node:test';
import { WebSocket, WebSocketServer } from 'ws';
import { Params, Plugin, PluginError, WebSocketPluginServer, dial } from '@linchkit/plugin-sdk';
import { log } from '#internal/log';
import { MAX_MESSAGE_BYTES, MAX_MESSAGE_BYTES_HEADER, capOfHeader, capOfWelcome } from '#internal/websocket';
import { bareName } from '#internal/wirejson';
import { type Frame, Frames } from './ws-frames';

const BOUNDED = { timeout: 60_000 };
const CAP = 4096;

/** A plugin whose answers, errors, chunks and events are as large as asked. */
function capPlugin(): { plugin: Plugin; stream: { made: number; closed: boolean } } {
  const stream = { made: 0, closed: false };
  const plugin = new Plugin({ id: 'caps', version: '1.0.0' })
    .method('echo', (params) => params)
    .method('blob', (params) => 'b'.repeat(new Params(params, 'blob').int('size')))
    .method('fail', (params) => {
      throw new PluginError('Big', 'x'.repeat(new Params(params, 'fail').int('size')));
    })
    .streamingMethod('blobs', async function* (params) {
      try {
        for (const size of (params as { sizes: number[] }).sizes) {
          stream.made += 1;
          yield 'y'.repeat(size);
        }
        await new Promise(() => undefined); // never ends by itself: only a stop ends it
      } finally {
        stream.closed = true;
      }
    });
  plugin.method('shout', (params) => {
    const p = new Params(params, 'shout');
    plugin.emit(p.str('name'), 'z'.repeat(p.int('size')));
    return true;
  });
  return { plugin, stream };
}

const request = (type: string, id: number, method: string, params: unknown): string =>
  JSON.stringify({ type, id, request: { v: 1, method, params, context: {} } });

const bytesOf = (frame: unknown): number => Buffer.byteLength(JSON.stringify(frame));

function tooLarge(what: string, size: number, limit: number): unknown {
  return {
    ok: false,
    error: {
      type: 'provider_error',
      message: `${what} is ${size} bytes, over the WebSocket message cap of ${limit} bytes`,
      retryable: false,
      details: { reason: 'too_large', bytes: size, limit },
    },
  };
}

/** The plugin served, and a host connected with `headers` in its upgrade request. */
async function served(
  plugin: Plugin,
  headers: Record<string, string>,
  run: (host: WebSocket, frames: Frames) => Promise<void>,
): Promise<void> {
  const server = new WebSocketPluginServer(plugin, undefined);
  const url = `ws://${await server.listen('127.0.0.1:0')}/`;
  const host = new WebSocket(url, { headers });
  const frames = new Frames(host);
  try {
    assert.equal((await frames.next()).type, 'hello');
    await run(host, frames);
  } finally {
    host.terminate();
    await server.close(0);
  }
}

/** The connection is open and answers a call. */
async function stillServed(host: WebSocket, frames: Frames, id = 99): Promise<void> {
  host.send(request('call', id, 'echo', 'still here'));
  assert.deepEqual((await frames.nextOf('response', id)).response, { ok: true, result: 'still here' });
  assert.equal(host.readyState, WebSocket.OPEN);
}

test('a header announces a cap of 1-16 ASCII digits from 1,024 to 2^53; anything else is ignored', () => {
  assert.equal(capOfHeader(['1024']), 1024);
  assert.equal(capOfHeader(['8388608']), 8388608);
  assert.equal(capOfHeader(['0004096']), 4096);
  assert.equal(capOfHeader(['9007199254740992']), 2 ** 53);
  for (const wrong of [
    undefined,
    [],
    ['abc'],
    ['-5'],
    ['+4096'],
    ['1e6'],
    ['12.5'],
    ['100'],
    ['1023'],
    [''],
    ['4096 '],
    ['0x1000'],
    ['\uff14\uff10\uff19\uff16'],
    ['9007199254740993'],
    ['12345678901234567'],
    ['4096', '4096'],
  ]) {
    assert.equal(capOfHeader(wrong), undefined, JSON.stringify(wrong));
  }
});

test('a welcome announces a cap that is a JSON integer from 1,024 to 2^53; anything else is ignored', () => {
  assert.equal(capOfWelcome(1024), 1024);
  assert.equal(capOfWelcome(4096), 4096);
  assert.equal(capOfWelcome(2n ** 53n), 2 ** 53); // past the safe integers: parsed as a BigInt
  for (const wrong of [undefined, null, '4096', 12.5, true, 100, 1023, -5, 2n ** 53n + 1n, [4096], { n: 1 }]) {
    assert.equal(capOfWelcome(wrong), undefined, String(wrong));
  }
});

test('a refusal names its method or event bare: escaped and cut as shown elsewhere, not quoted', () => {
  assert.equal(bareName('config'), 'config');
  assert.equal(bareName('a\u0000\nb'), 'a\\u0000\\nb');
  assert.equal(bareName('x'.repeat(65)), `${'x'.repeat(64)}…`);
});

test('the hello says the largest message the plugin reads, after the fields it had', BOUNDED, async () => {
  const server = new WebSocketPluginServer(capPlugin().plugin, undefined);
  const host = new WebSocket(`ws://${await server.listen('127.0.0.1:0')}/`);
  try {
    const hello = await new Frames(host).next();
    assert.equal(hello.type, 'hello');
    assert.equal(hello.max_message_bytes, MAX_MESSAGE_BYTES);
    assert.equal(Object.keys(hello).at(-1), 'max_message_bytes');
  } finally {
    host.terminate();
    await server.close(0);
  }
});

test('a result over the announced cap is answered too_large, and the connection stays', BOUNDED, async () => {
  await served(capPlugin().plugin, { [MAX_MESSAGE_BYTES_HEADER]: String(CAP) }, async (host, frames) => {
    // Just under and just over: the whole frame counts, as sent.
    const under = 'a'.repeat(CAP - bytesOf({ type: 'response', id: 1, response: { ok: true, result: '' } }));
    host.send(request('call', 1, 'echo', under));
    assert.deepEqual((await frames.nextOf('response', 1)).response, { ok: true, result: under });
    const over = `${under}a`;
    host.send(request('call', 2, 'echo', over));
    const size = bytesOf({ type: 'response', id: 2, response: { ok: true, result: over } });
    assert.equal(size, CAP + 1);
    assert.deepEqual((await frames.nextOf('response', 2)).response, tooLarge('the result of echo', size, CAP));
    await stillServed(host, frames);
  });
});

test('an error over the cap is answered too_large', BOUNDED, async () => {
  await served(capPlugin().plugin, { [MAX_MESSAGE_BYTES_HEADER]: String(CAP) }, async (host, frames) => {
    host.send(request('call', 1, 'fail', { size: 2 * CAP }));
    const { error } = (await frames.nextOf('response', 1)).response as { error: { type: string; message: string; details: Record<string, number | string> } };
    assert.equal(error.type, 'provider_error');
    assert.match(error.message, /^the error of fail is \d+ bytes, over the WebSocket message cap of 4096 bytes$/);
    assert.equal(error.details.reason, 'too_large');
    assert.ok((error.details.bytes as number) > 2 * CAP);
    assert.equal(error.details.limit, CAP);
    await stillServed(host, frames);
  });
});

test('a chunk over the cap ends its stream too_large and stops its producer; another stream goes on', BOUNDED, async () => {
  const { plugin, stream } = capPlugin();
  await served(plugin, { [MAX_MESSAGE_BYTES_HEADER]: String(CAP) }, async (host, frames) => {
    host.send(request('stream', 7, 'blobs', { sizes: [10] }));
    assert.equal((await frames.nextOf('chunk', 7)).data, 'y'.repeat(10));
    stream.made = 0;
    host.send(request('stream', 1, 'blobs', { sizes: [10, 20, 2 * CAP, 30] }));
    const chunks: unknown[] = [];
    let frame: Frame;
    for (;;) {
      frame = await frames.next();
      if (frame.id !== 1) continue;
      if (frame.type === 'response') break;
      chunks.push(frame.data);
    }
    assert.deepEqual(chunks, ['y'.repeat(10), 'y'.repeat(20)]);
    const size = bytesOf({ type: 'chunk', id: 1, data: 'y'.repeat(2 * CAP) });
    assert.deepEqual(frame.response, tooLarge('a chunk of blobs', size, CAP));
    const deadline = Date.now() + 5_000;
    while (!stream.closed) {
      assert.ok(Date.now() < deadline, 'the stream’s generator was not closed');
      await new Promise((resolve) => setTimeout(resolve, 5));
    }
    assert.equal(stream.made, 3); // the chunk over the cap was the last one made
    await stillServed(host, frames);
  });
});

test('an event over the cap is not sent, only the first said on stderr, and its method not failed', BOUNDED, async (t) => {
  const warnings: string[] = [];
  t.mock.method(log, 'warn', (message: string) => warnings.push(message));
  await served(capPlugin().plugin, { [MAX_MESSAGE_BYTES_HEADER]: String(CAP) }, async (host, frames) => {
    for (const [id, name] of [
      [1, 'big\n'],
      [2, 'bigger'],
    ] as const) {
      host.send(request('call', id, 'shout', { name, size: 2 * CAP }));
      assert.deepEqual((await frames.nextOf('response', id)).response, { ok: true, result: true });
    }
    host.send(request('call', 3, 'shout', { name: 'small', size: 5 }));
    // The first event on the wire is the small one: the large ones never went out.
    assert.deepEqual(await frames.nextOf('event'), { type: 'event', event: 'small', data: 'zzzzz' });
    const size = bytesOf({ type: 'event', event: 'big\n', data: 'z'.repeat(2 * CAP) });
    assert.deepEqual(warnings, [`event big\\n is ${size} bytes, over the WebSocket message cap of ${CAP} bytes: not sent`]);
    await stillServed(host, frames);
  });
});

test('without an announcement the cap is the plugin’s own 8 MiB', BOUNDED, async () => {
  assert.equal(MAX_MESSAGE_BYTES, 8 * 1024 * 1024);
  await served(capPlugin().plugin, {}, async (host, frames) => {
    host.send(request('call', 1, 'echo', 'a'.repeat(2 * CAP)));
    assert.equal(((await frames.nextOf('response', 1)).response as { ok: boolean }).ok, true);
    // Over 8 MiB: before, sent whole (and the host closed the connection, 1009).
    host.send(request('call', 2, 'blob', { size: MAX_MESSAGE_BYTES }));
    const size = bytesOf({ type: 'response', id: 2, response: { ok: true, result: 'b'.repeat(MAX_MESSAGE_BYTES) } });
    assert.deepEqual((await frames.nextOf('response', 2)).response, tooLarge('the result of blob', size, MAX_MESSAGE_BYTES));
    await stillServed(host, frames);
  });
});

test('an invalid header leaves the plugin’s own cap', BOUNDED, async () => {
  for (const value of ['abc', '-5', '1e6', '12.5', '100', '99999999999999999']) {
    await served(capPlugin().plugin, { [MAX_MESSAGE_BYTES_HEADER]: value }, async (host, frames) => {
      host.send(request('call', 1, 'blob', { size: 2 * CAP }));
      assert.equal(((await frames.nextOf('response', 1)).response as { ok: boolean }).ok, true, value);
    });
  }
});

/**
 * A gateway that says `welcome` with `fields`, then a call of `blob` (id 1) of `size`, then a
 * call of echo (id 2), to a plugin that dials it; call 1's response, once call 2 is answered
 * too on the same connection.
 */
async function viaGateway(fields: Record<string, unknown>, size: number): Promise<unknown> {
  const gateway = new WebSocketServer({ host: '127.0.0.1', port: 0 });
  await once(gateway, 'listening');
  const accepted = once(gateway, 'connection') as Promise<[WebSocket]>;
  const stopping = new AbortController();
  const url = `ws://127.0.0.1:${(gateway.address() as AddressInfo).port}/v1/plugins/connect`;
  const dialling = dial(capPlugin().plugin, url, { signal: stopping.signal, initialBackoffMs: 1, graceMs: 1_000 });
  try {
    const [socket] = await accepted;
    const frames = new Frames(socket);
    const hello = await frames.next();
    assert.equal(hello.type, 'hello');
    assert.equal(hello.max_message_bytes, MAX_MESSAGE_BYTES);
    socket.send(JSON.stringify({ type: 'welcome', instance: 'i-1', ...fields }));
    socket.send(request('call', 1, 'blob', { size }));
    socket.send(request('call', 2, 'echo', 'after'));
    const answer = (await frames.nextOf('response', 1)).response;
    assert.deepEqual((await frames.nextOf('response', 2)).response, { ok: true, result: 'after' });
    stopping.abort();
    socket.close(1000);
    await dialling;
    return answer;
  } finally {
    gateway.close();
  }
}

test('a result over the cap the welcome announces is answered too_large', BOUNDED, async () => {
  const size = bytesOf({ type: 'response', id: 1, response: { ok: true, result: 'b'.repeat(2 * CAP) } });
  assert.deepEqual(await viaGateway({ max_message_bytes: CAP }, 2 * CAP), tooLarge('the result of blob', size, CAP));
});

test('a welcome without a valid max_message_bytes leaves the plugin’s own cap', BOUNDED, async () => {
  for (const fields of [{}, { max_message_bytes: '4096' }, { max_message_bytes: 12.5 }, { max_message_bytes: 100 }, { max_message_bytes: -5 }, { max_message_bytes: true }]) {
    assert.deepEqual(await viaGateway(fields, 2 * CAP), { ok: true, result: 'b'.repeat(2 * CAP) }, JSON.stringify(fields));
  }
});

/**
 * A gateway whose 101 upgrade response carries a `LinchKit-Max-Message-Bytes` header per
 * value of `capHeaders`, and says no `welcome` unless `run` does; `plugin` dials it, and
 * `run` gets the connection once the hello arrived.
 */
async function viaUpgrade(plugin: Plugin, capHeaders: readonly string[], run: (socket: WebSocket, frames: Frames) => Promise<void>): Promise<void> {
  const gateway = new WebSocketServer({ host: '127.0.0.1', port: 0 });
  gateway.on('headers', (headers) => headers.push(...capHeaders.map((value) => `${MAX_MESSAGE_BYTES_HEADER}: ${value}`)));
  await once(gateway, 'listening');
  const accepted = once(gateway, 'connection') as Promise<[WebSocket]>;
  const stopping = new AbortController();
  const url = `ws://127.0.0.1:${(gateway.address() as AddressInfo).port}/v1/plugins/connect`;
  const dialling = dial(plugin, url, { signal: stopping.signal, initialBackoffMs: 1, graceMs: 1_000 });
  try {
    const [socket] = await accepted;
    const frames = new Frames(socket);
    assert.equal((await frames.next()).type, 'hello');
    await run(socket, frames);
    stopping.abort();
    socket.close(1000);
    await dialling;
  } finally {
    // Failed too: a dial left running would redial for ever.
    stopping.abort();
    gateway.close();
  }
}

test('an event kept while disconnected, over the upgrade response’s cap, is not sent on connect; a small one is', BOUNDED, async (t) => {
  const warnings: string[] = [];
  t.mock.method(log, 'warn', (message: string) => warnings.push(message));
  const { plugin } = capPlugin();
  // Emitted before any gateway is connected: kept, and flushed right after the hello, before
  // any welcome could say the gateway's cap. Before, the large one went out whole.
  plugin.emit('big', 'z'.repeat(2 * CAP));
  plugin.emit('small', 'zz');
  await viaUpgrade(plugin, [String(CAP)], async (socket, frames) => {
    assert.deepEqual(await frames.nextOf('event'), { type: 'event', event: 'small', data: 'zz' });
    const size = bytesOf({ type: 'event', event: 'big', data: 'z'.repeat(2 * CAP) });
    assert.deepEqual(warnings, [`event big is ${size} bytes, over the WebSocket message cap of ${CAP} bytes: not sent`]);
    await stillServed(socket, frames);
  });
});

test('an answer before any welcome is held to the upgrade response’s cap: too_large', BOUNDED, async () => {
  await viaUpgrade(capPlugin().plugin, [String(CAP)], async (socket, frames) => {
    socket.send(request('call', 1, 'echo', 'a'.repeat(2 * CAP)));
    const size = bytesOf({ type: 'response', id: 1, response: { ok: true, result: 'a'.repeat(2 * CAP) } });
    assert.deepEqual((await frames.nextOf('response', 1)).response, tooLarge('the result of echo', size, CAP));
    await stillServed(socket, frames);
  });
});

test('a welcome’s valid cap replaces the upgrade response’s; an invalid one leaves it', BOUNDED, async () => {
  const answer = 'a'.repeat(2 * CAP);
  const size = bytesOf({ type: 'response', id: 1, response: { ok: true, result: answer } });
  await viaUpgrade(capPlugin().plugin, [String(CAP)], async (socket, frames) => {
    socket.send(JSON.stringify({ type: 'welcome', instance: 'i-1', max_message_bytes: 4 * CAP }));
    socket.send(request('call', 1, 'echo', answer));
    assert.deepEqual((await frames.nextOf('response', 1)).response, { ok: true, result: answer });
  });
  for (const fields of [{}, { max_message_bytes: '16384' }, { max_message_bytes: 100 }]) {
    await viaUpgrade(capPlugin().plugin, [String(CAP)], async (socket, frames) => {
      socket.send(JSON.stringify({ type: 'welcome', instance: 'i-1', ...fields }));
      socket.send(request('call', 1, 'echo', answer));
      assert.deepEqual((await frames.nextOf('response', 1)).response, tooLarge('the result of echo', size, CAP), JSON.stringify(fields));
    });
  }
});

test('an upgrade response’s cap that is no valid one leaves the plugin’s own, and the connection', BOUNDED, async () => {
  for (const values of [['abc'], ['-5'], ['1e6'], ['12.5'], ['100'], ['99999999999999999'], [''], [String(CAP), String(CAP)]]) {
    const { plugin } = capPlugin();
    plugin.emit('big', 'z'.repeat(2 * CAP));
    await viaUpgrade(plugin, values, async (socket, frames) => {
      assert.deepEqual(await frames.nextOf('event'), { type: 'event', event: 'big', data: 'z'.repeat(2 * CAP) }, JSON.stringify(values));
      socket.send(request('call', 1, 'echo', 'a'.repeat(2 * CAP)));
      assert.equal(((await frames.nextOf('response', 1)).response as { ok: boolean }).ok, true, JSON.stringify(values));
    });
  }
});
