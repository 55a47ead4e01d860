/**
 * A method that answers long after its deadline is told of, once a minute per method, over
 * gRPC (Call, each CallBatch item, CallStream) and WebSocket (call, stream) alike.
 *
 * A method that blocks the event loop (a busy loop in an `async` method) keeps the deadline's
 * timer from running: its answer came whenever it was done, the host had long answered its
 * caller `deadline_exceeded`, every other call of the process waited, and nothing anywhere
 * said why. Now the SDK says so at WARN on stderr, naming the method and how late it
 * answered; the answer itself is unchanged. A method in time, one the deadline ended, or one
 * without a deadline says nothing. As the Python SDK (tests/test_python_plugin_late_answers.py).
 */
import assert from 'node:assert/strict';
import { type TestContext, test } from 'node:test';
import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import { WebSocket } from 'ws';
import { Plugin, PluginServer, WebSocketPluginServer } from '@linchkit/plugin-sdk';
import { protoPath } from '#internal/server';
import { type Frame, Frames } from './ws-frames';

const BOUNDED = { timeout: 30_000 };
const HELD =
  'after its deadline: the event loop was held that long, by this method or another running meanwhile, so the deadline ' +
  'could not end it and no other call ran; a method must not block the event loop (move CPU-bound work to a ' +
  'worker_threads Worker or a child process, and use asynchronous I/O) (said at most once a minute)';

/** The mistake this file is about: the event loop held for `ms`. */
function hold(ms: number): void {
  const end = Date.now() + ms;
  while (Date.now() < end) {
    // busy
  }
}

/** A plugin whose methods block the loop, answer in time, or ignore their deadline's signal. */
function latePlugin(): { plugin: Plugin; ignored: Promise<void> } {
  let ignoredDone: () => void = () => undefined;
  const ignored = new Promise<void>((resolve) => (ignoredDone = resolve));
  const plugin = new Plugin({ id: 'late', version: '1.0.0' })
    .method('blocks', async (params) => {
      hold((params as { ms?: number } | null)?.ms ?? 800);
      return 'done';
    })
    .method('prompt', async () => {
      await new Promise((resolve) => setTimeout(resolve, 10));
      return 'in time';
    })
    .method('sleeps', async (_params, ctx) => {
      await ctx.sleep(10_000); // ended by the deadline, as it should be
      return 'never';
    })
    .method('ignores', async () => {
      // Does not watch ctx.signal, but does not block either: the deadline still answers it.
      await new Promise((resolve) => setTimeout(resolve, 1500));
      ignoredDone();
      return 'too late';
    })
    .streamingMethod('rows', async function* () {
      yield { row: 0 };
      hold(800);
      yield { row: 1 };
    });
  return { plugin, ignored };
}

/** The lines the SDK writes at WARN on stderr from now on, each without its time. */
function warnings(t: TestContext): string[] {
  const said: string[] = [];
  t.mock.method(process.stderr, 'write', (chunk: string | Uint8Array) => {
    const line = String(chunk);
    if (line.includes(' WARN ')) said.push(line.replace(/^\S+ /, ''));
    return true;
  });
  return said;
}

/** The one warning in `said`, about `method`: how late it says the answer came, in seconds. */
function toldLate(said: string[], method: string): number {
  assert.equal(said.length, 1, said.join(''));
  const found = new RegExp(`^WARN linchkit plugin: method '${method}' answered ([0-9]+\\.[0-9]) s (.*)\\n$`).exec(said[0]!);
  assert.ok(found, said[0]);
  assert.equal(found[2], HELD);
  return Number(found[1]);
}

// ---- gRPC -----------------------------------------------------------------------------

interface GrpcHost {
  client: any;
  close(): Promise<void>;
}

async function grpcHost(plugin: Plugin): Promise<GrpcHost> {
  const server = new PluginServer(plugin, { servingFromStart: true });
  const port = await server.bind('127.0.0.1:0', grpc.ServerCredentials.createInsecure());
  const definition = grpc.loadPackageDefinition(
    protoLoader.loadSync(protoPath(), { keepCase: true, longs: Number, defaults: true, oneofs: true }),
  ) as any;
  const client = new definition.linchkit.plugin.v1.PluginService(`127.0.0.1:${port}`, grpc.credentials.createInsecure());
  return {
    client,
    close: async () => {
      client.close();
      await server.shutdown(1000);
    },
  };
}

/** A call of `method` whose context gives it `deadlineMs` (0: none). */
const request = (method: string, deadlineMs: number, params: unknown = {}) => ({
  v: 1,
  plugin: 'late',
  method,
  params_json: Buffer.from(JSON.stringify(params)),
  context: { request_id: 'r-1', deadline_ms: deadlineMs },
});

/** An RPC without a gRPC deadline of its own: only the context's bounds the call. */
function unary(host: GrpcHost, rpc: string, message: object): Promise<any> {
  return new Promise((resolve, reject) => {
    host.client[rpc](message, (error: Error | null, reply: unknown) => (error ? reject(error) : resolve(reply)));
  });
}

const resultOf = (reply: { ok: boolean; result_json: Buffer }): unknown => {
  assert.equal(reply.ok, true, JSON.stringify(reply));
  return JSON.parse(reply.result_json.toString());
};

test('gRPC Call: a method holding the loop past its deadline is answered as before, and told of once a minute', BOUNDED, async (t) => {
  const host = await grpcHost(latePlugin().plugin);
  try {
    const said = warnings(t);
    assert.equal(resultOf(await unary(host, 'Call', request('blocks', 100))), 'done'); // unchanged
    assert.ok(toldLate(said, 'blocks') >= 0.5);
    // Once a minute per method: a method that always blocks does not fill the log.
    assert.equal(resultOf(await unary(host, 'Call', request('blocks', 100))), 'done');
    assert.equal(said.length, 1, said.join(''));
  } finally {
    await host.close();
  }
});

test('gRPC CallBatch: each item is held to its own deadline, the late method told of once', BOUNDED, async (t) => {
  const host = await grpcHost(latePlugin().plugin);
  try {
    const said = warnings(t);
    const calls = [request('blocks', 100), request('blocks', 100), request('prompt', 60_000)];
    const { results } = await unary(host, 'CallBatch', { calls });
    assert.deepEqual(results.map(resultOf), ['done', 'done', 'in time']);
    toldLate(said, 'blocks'); // 'prompt' waited too, but well within its deadline
  } finally {
    await host.close();
  }
});

test('gRPC CallStream: a stream whose last chunk came long after its deadline is told of', BOUNDED, async (t) => {
  const host = await grpcHost(latePlugin().plugin);
  try {
    const said = warnings(t);
    const items: any[] = [];
    for await (const item of host.client.CallStream(request('rows', 100))) items.push(item);
    assert.deepEqual(items.map((item) => JSON.parse(item.chunk_json.toString())), [{ row: 0 }, { row: 1 }]);
    toldLate(said, 'rows');
  } finally {
    await host.close();
  }
});

test('gRPC: methods in time, ended by their deadline, or without one say nothing; the first late one alone does', BOUNDED, async (t) => {
  const { plugin, ignored } = latePlugin();
  const host = await grpcHost(plugin);
  try {
    const said = warnings(t);
    assert.equal(resultOf(await unary(host, 'Call', request('prompt', 5000))), 'in time');
    // Held the loop, but answered before its deadline.
    assert.equal(resultOf(await unary(host, 'Call', request('blocks', 5000, { ms: 200 }))), 'done');
    assert.equal(resultOf(await unary(host, 'Call', request('blocks', 0, { ms: 600 }))), 'done'); // no deadline
    const ended = await unary(host, 'Call', request('sleeps', 100));
    assert.equal(ended.error.type, 'deadline_exceeded');
    // Ignoring the signal without blocking: answered deadline_exceeded at its deadline, as before.
    const started = Date.now();
    const ignoring = await unary(host, 'Call', request('ignores', 100));
    assert.equal(ignoring.error.type, 'deadline_exceeded', JSON.stringify(ignoring));
    assert.ok(Date.now() - started < 1000, `answered after ${Date.now() - started} ms`);
    await ignored; // its late result, dropped, is not an answer either
    assert.deepEqual(said, []);
    // What was said is seen: the first late answer is.
    assert.equal(resultOf(await unary(host, 'Call', request('blocks', 100))), 'done');
    toldLate(said, 'blocks');
  } finally {
    await host.close();
  }
});

// ---- WebSocket ------------------------------------------------------------------------

async function wsHost(plugin: Plugin): Promise<{ socket: WebSocket; frames: Frames; close(): Promise<void> }> {
  const server = new WebSocketPluginServer(plugin, undefined);
  const socket = new WebSocket(`ws://${await server.listen('127.0.0.1:0')}/`);
  const frames = new Frames(socket);
  assert.equal((await frames.next()).type, 'hello');
  return {
    socket,
    frames,
    close: async () => {
      socket.close(1000);
      await server.close(0);
    },
  };
}

/** Send a `type` frame calling `method` with `deadlineMs` in its context (0: none). */
function send(socket: WebSocket, type: string, id: number, method: string, deadlineMs: number): void {
  const context = deadlineMs > 0 ? { deadline_ms: deadlineMs } : {};
  socket.send(JSON.stringify({ type, id, request: { v: 1, method, params: {}, context } }));
}

const responseOf = (frame: Frame): unknown => frame.response;

test('WebSocket call: a method holding the loop past its deadline is answered as before, and told of once a minute', BOUNDED, async (t) => {
  const host = await wsHost(latePlugin().plugin);
  try {
    const said = warnings(t);
    send(host.socket, 'call', 1, 'blocks', 100);
    assert.deepEqual(responseOf(await host.frames.nextOf('response', 1)), { ok: true, result: 'done' });
    assert.ok(toldLate(said, 'blocks') >= 0.5);
    send(host.socket, 'call', 2, 'blocks', 100);
    assert.deepEqual(responseOf(await host.frames.nextOf('response', 2)), { ok: true, result: 'done' });
    assert.equal(said.length, 1, said.join(''));
  } finally {
    await host.close();
  }
});

test('WebSocket stream: a stream whose last chunk came long after its deadline is told of', BOUNDED, async (t) => {
  const host = await wsHost(latePlugin().plugin);
  try {
    const said = warnings(t);
    send(host.socket, 'stream', 3, 'rows', 100);
    assert.deepEqual(await host.frames.until(3), [
      { type: 'chunk', id: 3, data: { row: 0 } },
      { type: 'chunk', id: 3, data: { row: 1 } },
      { type: 'response', id: 3, response: { ok: true, result: null } },
    ]);
    toldLate(said, 'rows');
  } finally {
    await host.close();
  }
});

test('WebSocket: methods in time or ended by their deadline say nothing; the first late one alone does', BOUNDED, async (t) => {
  const { plugin, ignored } = latePlugin();
  const host = await wsHost(plugin);
  try {
    const said = warnings(t);
    send(host.socket, 'call', 1, 'prompt', 5000);
    assert.deepEqual(responseOf(await host.frames.nextOf('response', 1)), { ok: true, result: 'in time' });
    send(host.socket, 'call', 2, 'sleeps', 100);
    assert.equal((responseOf(await host.frames.nextOf('response', 2)) as any).error.type, 'deadline_exceeded');
    const started = Date.now();
    send(host.socket, 'call', 3, 'ignores', 100);
    const ignoring = responseOf(await host.frames.nextOf('response', 3)) as any;
    assert.equal(ignoring.error.type, 'deadline_exceeded', JSON.stringify(ignoring));
    assert.ok(Date.now() - started < 1000, `answered after ${Date.now() - started} ms`);
    await ignored;
    assert.deepEqual(said, []);
    send(host.socket, 'call', 4, 'blocks', 100);
    assert.deepEqual(responseOf(await host.frames.nextOf('response', 4)), { ok: true, result: 'done' });
    toldLate(said, 'blocks');
  } finally {
    await host.close();
  }
});
