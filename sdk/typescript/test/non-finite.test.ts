/**
 * What JSON has no form for (NaN, +Infinity, -Infinity) never reaches the host as `null`
 * (lossless-json, as JSON.stringify, writes it so): a result, a batch item, a stream's chunk
 * is that call's `provider_error` `the plugin's result is not JSON: …`, an event is not sent
 * (said on stderr at WARN), an error's details are dropped; over gRPC and WebSocket alike.
 */
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { type TestContext, test } from 'node:test';
import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import { WebSocket } from 'ws';
import { Plugin, PluginError, PluginServer, ProviderError, WebSocketPluginServer } from '@linchkit/plugin-sdk';
import { protoPath } from '#internal/server';
import { encodeJson } from '#internal/wirejson';
import { type Frame, Frames } from './ws-frames';

const NOT_JSON = "the plugin's result is not JSON: ";
const BOUNDED = { timeout: 30_000 };

/** A score the host sends as text ("NaN", "Infinity", "-Infinity", "2.5"), as a number. */
function scoreOf(params: unknown): number {
  return Number((params as { score: string }).score);
}

/** A plugin whose results hold the score its params name; `closed` hears each stream's end. */
function scoringPlugin(): { plugin: Plugin; closed: string[] } {
  const closed: string[] = [];
  const plugin = new Plugin({ id: 'scores', version: '1.0.0' })
    .method('echo', (params) => params)
    .method('score', (params) => ({ ranked: [{ name: 'a', score: scoreOf(params) }] }))
    .streamingMethod('rows', async function* (params) {
      try {
        yield { i: 0 };
        yield { i: 1 };
        yield { i: 2, score: scoreOf(params) };
        yield { i: 3 };
      } finally {
        closed.push('rows');
      }
    })
    .method('failing', () => {
      throw new PluginError('ScoreFailure', 'no score today', { details: { score: NaN } });
    })
    .method('emit', (params) => {
      plugin.emit('bad', { score: scoreOf(params) });
      plugin.emit('good', { score: 1 });
      return true;
    });
  return { plugin, closed };
}

/** What the SDK writes on stderr while `run` runs. */
async function stderrOf(t: TestContext, run: () => Promise<void>): Promise<string[]> {
  const lines: string[] = [];
  const write = t.mock.method(process.stderr, 'write', (chunk: string | Uint8Array) => {
    lines.push(String(chunk));
    return true;
  });
  try {
    await run();
  } finally {
    write.mock.restore();
  }
  return lines;
}

test('encodeJson refuses NaN and the infinities wherever they are, and only those', () => {
  const refused: [unknown, string][] = [
    [NaN, 'NaN'],
    [{ x: Infinity }, 'Infinity'],
    [[1, [2, { y: -Infinity }]], '-Infinity'],
    [{ x: new Number(NaN) }, 'NaN'], // a Number object, written through its value
    [{ toJSON: () => ({ x: NaN }) }, 'NaN'], // what toJSON gives is what is written
    [{ rows: new Float64Array([1, NaN]) }, 'NaN'], // a typed array is written as an object
  ];
  for (const [value, number] of refused) {
    assert.throws(
      () => encodeJson(value),
      (error: unknown) => error instanceof ProviderError && error.message === `${NOT_JSON}${number} is not a JSON number`,
    );
  }
  assert.throws(() => encodeJson([NaN], 'the data of event \'e\''), /^ProviderError: the data of event 'e' is not JSON: NaN/);
  for (const value of [{ x: 1, y: null }, [null, 1.5e300, -0], { n: 9007199254740993n }, undefined]) {
    assert.doesNotThrow(() => encodeJson(value));
  }
  assert.equal(encodeJson({ x: 1, y: null, z: undefined }).toString(), '{"x":1,"y":null}');
});

test('what lossless-json cannot write at all (a cycle) is the same provider_error', () => {
  const cycle: Record<string, unknown> = {};
  cycle.self = cycle;
  assert.throws(() => encodeJson(cycle), (error: unknown) => error instanceof ProviderError && error.message.startsWith(NOT_JSON));
});

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

const request = (method: string, params: unknown) => ({ v: 1, plugin: 'scores', method, params_json: Buffer.from(JSON.stringify(params)) });

function unary(host: GrpcHost, rpc: string, message: object): Promise<any> {
  return new Promise((resolve, reject) => {
    host.client[rpc](message, { deadline: Date.now() + 5000 }, (error: Error | null, reply: unknown) =>
      error ? reject(error) : resolve(reply),
    );
  });
}

function assertNotJson(error: { type: string; message: string; retryable: boolean }, number: string): void {
  assert.deepEqual([error.type, error.message, error.retryable], ['provider_error', `${NOT_JSON}${number} is not a JSON number`, false]);
}

test('gRPC Call: a result holding NaN or an infinity is provider_error, and the plugin serves on', BOUNDED, async () => {
  const host = await grpcHost(scoringPlugin().plugin);
  try {
    for (const number of ['NaN', 'Infinity', '-Infinity']) {
      const reply = await unary(host, 'Call', request('score', { score: number }));
      assert.equal(reply.ok, false, `${number}: ${reply.result_json}`);
      assertNotJson(reply.error, number);
    }
    // A streaming method called as unary: its chunks gathered into one result.
    assertNotJson((await unary(host, 'Call', request('rows', { score: 'NaN' }))).error, 'NaN');
    const fine = await unary(host, 'Call', request('score', { score: '2.5' }));
    assert.deepEqual(JSON.parse(fine.result_json.toString()), { ranked: [{ name: 'a', score: 2.5 }] });
  } finally {
    await host.close();
  }
});

test('gRPC CallBatch: only the item holding NaN is provider_error', BOUNDED, async () => {
  const host = await grpcHost(scoringPlugin().plugin);
  try {
    const calls = [request('echo', { a: null }), request('score', { score: 'NaN' }), request('score', { score: '1' })];
    const { results } = await unary(host, 'CallBatch', { calls });
    assert.deepEqual(JSON.parse(results[0].result_json.toString()), { a: null });
    assert.equal(results[1].ok, false);
    assertNotJson(results[1].error, 'NaN');
    assert.deepEqual(JSON.parse(results[2].result_json.toString()), { ranked: [{ name: 'a', score: 1 }] });
  } finally {
    await host.close();
  }
});

test('gRPC CallStream: the chunks before go out, the one holding NaN ends the stream with provider_error', BOUNDED, async () => {
  const { plugin, closed } = scoringPlugin();
  const host = await grpcHost(plugin);
  try {
    const items: any[] = [];
    for await (const item of host.client.CallStream(request('rows', { score: 'NaN' }))) items.push(item);
    assert.deepEqual(items.slice(0, 2).map((item) => JSON.parse(item.chunk_json.toString())), [{ i: 0 }, { i: 1 }]);
    assert.equal(items.length, 3, JSON.stringify(items));
    assert.equal(items[2].item, 'error');
    assertNotJson(items[2].error, 'NaN');
    assert.deepEqual(closed, ['rows'], 'the generator is closed, its finally run');
  } finally {
    await host.close();
  }
});

test('gRPC: an error whose details hold NaN keeps its type and message, without the details', BOUNDED, async () => {
  const host = await grpcHost(scoringPlugin().plugin);
  try {
    const reply = await unary(host, 'Call', request('failing', {}));
    assert.deepEqual([reply.error.type, reply.error.message, reply.error.details_json.length], ['ScoreFailure', 'no score today', 0]);
  } finally {
    await host.close();
  }
});

test('gRPC Events: an event whose data holds NaN is not sent, and said once at WARN', BOUNDED, async (t) => {
  const { plugin } = scoringPlugin();
  const host = await grpcHost(plugin);
  const events = host.client.Events();
  try {
    const said = await stderrOf(t, async () => {
      plugin.emit('early', { score: NaN }); // kept for the first host: checked when emitted
      plugin.emit('first', 0);
      const received: string[] = [];
      events.on('data', (event: { name: string; data_json: Buffer }) => received.push(`${event.name} ${event.data_json}`));
      await once(events, 'metadata');
      await unary(host, 'Call', request('emit', { score: 'Infinity' }));
      const deadline = Date.now() + 5000;
      while (received.length < 2 && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 5));
      assert.deepEqual(received, ['first 0', 'good {"score":1}']);
    });
    const warnings = said.filter((line) => line.includes(' WARN '));
    assert.equal(warnings.length, 2, said.join(''));
    assert.match(warnings[0]!, / WARN linchkit plugin: event 'early' not sent: the data of event 'early' is not JSON: NaN is not a JSON number\n$/);
    assert.match(warnings[1]!, /event 'bad' not sent: the data of event 'bad' is not JSON: Infinity is not a JSON number\n$/);
  } finally {
    events.end();
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

function send(socket: WebSocket, type: string, id: number, method: string, params: unknown): void {
  socket.send(JSON.stringify({ type, id, request: { v: 1, method, params } }));
}

function wsError(frame: Frame): { type: string; message: string; retryable: boolean; details?: unknown } {
  const response = frame.response as { ok: boolean; error: { type: string; message: string; retryable: boolean } };
  assert.equal(response.ok, false, JSON.stringify(frame));
  return response.error;
}

test('WebSocket call: a result holding NaN or an infinity is provider_error, and the session serves on', BOUNDED, async () => {
  const host = await wsHost(scoringPlugin().plugin);
  try {
    for (const [id, number] of [[1, 'NaN'], [2, 'Infinity'], [3, '-Infinity']] as const) {
      send(host.socket, 'call', id, 'score', { score: number });
      assertNotJson(wsError(await host.frames.nextOf('response', id)), number);
    }
    send(host.socket, 'call', 4, 'rows', { score: 'NaN' });
    assertNotJson(wsError(await host.frames.nextOf('response', 4)), 'NaN');
    send(host.socket, 'call', 5, 'score', { score: '2.5' });
    assert.deepEqual((await host.frames.nextOf('response', 5)).response, { ok: true, result: { ranked: [{ name: 'a', score: 2.5 }] } });
  } finally {
    await host.close();
  }
});

test('WebSocket stream: the chunks before go out, the one holding NaN ends the stream with provider_error', BOUNDED, async () => {
  const { plugin, closed } = scoringPlugin();
  const host = await wsHost(plugin);
  try {
    send(host.socket, 'stream', 7, 'rows', { score: '-Infinity' });
    const seen = await host.frames.until(7);
    assert.deepEqual(seen.slice(0, -1), [{ type: 'chunk', id: 7, data: { i: 0 } }, { type: 'chunk', id: 7, data: { i: 1 } }]);
    assertNotJson(wsError(seen.at(-1)!), '-Infinity');
    assert.deepEqual(closed, ['rows'], 'the generator is closed, its finally run');
  } finally {
    await host.close();
  }
});

test('WebSocket: an error whose details hold NaN keeps its type and message, without the details', BOUNDED, async () => {
  const host = await wsHost(scoringPlugin().plugin);
  try {
    send(host.socket, 'call', 1, 'failing', {});
    assert.deepEqual(wsError(await host.frames.nextOf('response', 1)), { type: 'ScoreFailure', message: 'no score today', retryable: false });
  } finally {
    await host.close();
  }
});

test('WebSocket events: an event whose data holds NaN is not sent, and said at WARN', BOUNDED, async (t) => {
  const host = await wsHost(scoringPlugin().plugin);
  try {
    const said = await stderrOf(t, async () => {
      send(host.socket, 'call', 1, 'emit', { score: 'NaN' });
      const frames = [await host.frames.next(), await host.frames.next()];
      assert.deepEqual(
        frames.map((frame) => frame.type === 'event' ? `event ${frame.event}` : `response ${JSON.stringify(frame.response)}`).sort(),
        ['event good', 'response {"ok":true,"result":true}'],
      );
    });
    assert.deepEqual(
      said.filter((line) => line.includes(' WARN ')).map((line) => line.replace(/^\S+ /, '')),
      ["WARN linchkit plugin: event 'bad' not sent: the data of event 'bad' is not JSON: NaN is not a JSON number\n"],
    );
  } finally {
    await host.close();
  }
});
