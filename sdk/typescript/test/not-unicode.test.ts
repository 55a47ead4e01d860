/**
 * A string that is not valid Unicode (a lone surrogate: half an emoji, as `s.slice(0, n)`
 * leaves it) never reaches the host as a `\udXXX` escape it refuses ("not a response
 * envelope"): a result, a batch item, a stream's chunk is that call's `provider_error`
 * `the plugin's result is not JSON: a string is not valid Unicode (a lone surrogate)`, an
 * event is not sent (said once on stderr at WARN), an error's details are dropped, and an
 * error's type and message are sent with U+FFFD for each bad code unit; over gRPC and
 * WebSocket alike. What every transport sends is checked as the host reads it: strict JSON
 * (`unusable`), well-formed strings.
 */
import assert from 'node:assert/strict';
import { type TestContext, test } from 'node:test';
import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import { type RawData, WebSocket } from 'ws';
import { Plugin, PluginError, PluginServer, ProviderError, WebSocketPluginServer } from '@linchkit/plugin-sdk';
import { protoPath } from '#internal/server';
import { encodeJson, jsonText, sendableError, unusable } from '#internal/wirejson';
import { type Frame, Frames } from './ws-frames';

const NOT_UNICODE = "the plugin's result is not JSON: a string is not valid Unicode (a lone surrogate)";
const BOUNDED = { timeout: 30_000 };

/** Half an emoji, as a plugin author makes one: a UTF-16 index that splits a pair. */
const HALF = 'smile 😀'.slice(0, 7); // 'smile \ud83d'
/** The other half alone. */
const LOW = '😀'.slice(1); // '\ude00'
/** Valid Unicode that looks close: a pair, accents, a real U+FFFD, a backslash + "ud83d". */
const FINE = { text: 'smile 😀 ünïcødé', replaced: '\ufffd', backslash: '\\ud83d', two: '\\\\ud83d', key: { '😀': '\\udc00' } };

/** A plugin whose methods answer `HALF` in each place a plugin sends a string. */
function halfPlugin(): { plugin: Plugin; closed: string[] } {
  const closed: string[] = [];
  const plugin = new Plugin({ id: 'halves', version: '1.0.0' })
    .method('echo', (params) => params)
    .method('fine', () => FINE)
    .method('cut', () => ({ text: HALF }))
    .method('cut_key', () => ({ nested: [1, { [HALF]: true }] }))
    .streamingMethod('rows', async function* () {
      try {
        yield { i: 0 };
        yield { i: 1 };
        yield { i: 2, text: HALF };
        yield { i: 3 };
      } finally {
        closed.push('rows');
      }
    })
    .method('failing_details', () => {
      throw new PluginError('CutFailure', 'no text today', { details: { text: HALF } });
    })
    .method('failing_message', () => {
      throw new PluginError(`Cut${LOW}Failure`, `could not read ${HALF}`, { retryable: true });
    })
    .method('thrown_message', () => {
      throw new TypeError(`bad ${HALF}`);
    })
    .method('emit', () => {
      plugin.emit('bad', { text: HALF });
      plugin.emit(`bad ${HALF}`, 1); // a name with no UTF-8 form ended the gRPC Events stream
      plugin.emit('good', { text: FINE.text });
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

const WARNING = "event 'bad' not sent: the data of event 'bad' is not JSON: a string is not valid Unicode (a lone surrogate)\n";
const NAME_WARNING = "event 'bad smile \\ud83d' not sent: its name is not valid Unicode (a lone surrogate)\n";

// ---- encodeJson -----------------------------------------------------------------------

test('JSON.stringify on this Node writes a lone surrogate as a \\udXXX escape and a pair raw: the search rests on it', () => {
  assert.equal(JSON.stringify(HALF), '"smile \\ud83d"');
  assert.equal(JSON.stringify(LOW), '"\\ude00"');
  assert.equal(JSON.stringify('😀'), '"😀"');
  assert.equal(JSON.stringify('\\ud83d'), '"\\\\ud83d"');
});

test('encodeJson refuses a lone surrogate wherever it is: a value, a key, nested, what toJSON gives', () => {
  const refused: unknown[] = [
    HALF,
    LOW,
    `${LOW}${HALF.slice(-1)}`, // a low then a high surrogate: no pair
    { [HALF]: 1 },
    [1, [2, { deep: ['x', HALF] }]],
    { toJSON: () => ({ text: HALF }) },
    `\\${HALF}`, // a literal backslash, then a lone surrogate: written \\\ud83d
    `\\\\${LOW}`,
  ];
  for (const value of refused) {
    assert.throws(
      () => encodeJson(value),
      (error: unknown) => error instanceof ProviderError && error.message === NOT_UNICODE && error.type === 'provider_error',
      JSON.stringify(value),
    );
  }
  assert.throws(() => jsonText([HALF], "the data of event 'e'"), {
    message: "the data of event 'e' is not JSON: a string is not valid Unicode (a lone surrogate)",
  });
});

test('encodeJson sends valid Unicode unchanged: an emoji, a backslash before "ud83d", a real U+FFFD', () => {
  for (const value of [FINE, '😀', '\\ud83d', '\\\\ud83d', '\\\\\\\\udfff', '\ufffd', `x${'😀'.repeat(1000)}`, { '\\ud800': 'a' }]) {
    const bytes = encodeJson(value);
    assert.equal(bytes.toString(), JSON.stringify(value));
    assert.equal(unusable(bytes), undefined, 'the host reads it');
    assert.deepEqual(JSON.parse(bytes.toString()), value);
  }
});

test('sendableError: a bad type or message becomes U+FFFD, bad details are dropped, a good error is itself', () => {
  assert.deepEqual(sendableError({ type: `A${LOW}`, message: `m ${HALF}`, retryable: true, details: { ok: 1 }, retryAfter: 2 }), {
    type: 'A\ufffd',
    message: 'm smile \ufffd',
    retryable: true,
    details: { ok: 1 },
    retryAfter: 2,
  });
  assert.deepEqual(sendableError({ type: 'A', message: 'm', retryable: false, details: { [HALF]: 1 } }), { type: 'A', message: 'm', retryable: false });
  const good = { type: 'A', message: FINE.text, retryable: false, details: FINE };
  assert.equal(sendableError(good), good);
});

// ---- gRPC -----------------------------------------------------------------------------

interface GrpcHost {
  client: any;
  close(): Promise<void>;
}

async function grpcHost(plugin: Plugin, servingFromStart = true): Promise<GrpcHost> {
  const server = new PluginServer(plugin, { servingFromStart });
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

const request = (method: string, params: unknown = {}) => ({ v: 1, plugin: 'halves', method, params_json: Buffer.from(JSON.stringify(params)) });

function unary(host: GrpcHost, rpc: string, message: object): Promise<any> {
  return new Promise((resolve, reject) => {
    host.client[rpc](message, { deadline: Date.now() + 5000 }, (error: Error | null, reply: unknown) =>
      error ? reject(error) : resolve(reply),
    );
  });
}

/** JSON bytes as the host reads them: refused (as orjson refuses them) when not strict JSON. */
function hostJson(bytes: Buffer): unknown {
  assert.equal(unusable(bytes), undefined, `the host cannot read ${bytes.toString()}`);
  return JSON.parse(bytes.toString());
}

function assertNotUnicode(error: { type: string; message: string; retryable: boolean }): void {
  assert.deepEqual([error.type, error.message, error.retryable], ['provider_error', NOT_UNICODE, false]);
}

test('gRPC Call: a result holding a lone surrogate is provider_error; an emoji, a backslash + "ud83d" go unchanged', BOUNDED, async () => {
  const host = await grpcHost(halfPlugin().plugin);
  try {
    for (const method of ['cut', 'cut_key', 'rows']) {
      const reply = await unary(host, 'Call', request(method));
      assert.equal(reply.ok, false, `${method}: ${reply.result_json}`);
      assertNotUnicode(reply.error);
    }
    assert.deepEqual(hostJson((await unary(host, 'Call', request('fine'))).result_json), FINE);
    assert.deepEqual(hostJson((await unary(host, 'Call', request('echo', FINE))).result_json), FINE);
  } finally {
    await host.close();
  }
});

test('gRPC CallBatch: only the item holding a lone surrogate is provider_error', BOUNDED, async () => {
  const host = await grpcHost(halfPlugin().plugin);
  try {
    const { results } = await unary(host, 'CallBatch', { calls: [request('fine'), request('cut'), request('echo', { a: 1 })] });
    assert.deepEqual(hostJson(results[0].result_json), FINE);
    assert.equal(results[1].ok, false);
    assertNotUnicode(results[1].error);
    assert.deepEqual(hostJson(results[2].result_json), { a: 1 });
  } finally {
    await host.close();
  }
});

test('gRPC CallStream: the chunks before go out, the one holding a lone surrogate ends the stream with provider_error', BOUNDED, async () => {
  const { plugin, closed } = halfPlugin();
  const host = await grpcHost(plugin);
  try {
    const items: any[] = [];
    for await (const item of host.client.CallStream(request('rows'))) items.push(item);
    assert.equal(items.length, 3, JSON.stringify(items));
    assert.deepEqual(items.slice(0, 2).map((item) => hostJson(item.chunk_json)), [{ i: 0 }, { i: 1 }]);
    assert.equal(items[2].item, 'error');
    assertNotUnicode(items[2].error);
    assert.deepEqual(closed, ['rows'], 'the generator is closed, its finally run');
  } finally {
    await host.close();
  }
});

test('gRPC: an error whose details hold a lone surrogate keeps its type and message, without the details', BOUNDED, async () => {
  const host = await grpcHost(halfPlugin().plugin);
  try {
    const reply = await unary(host, 'Call', request('failing_details'));
    assert.deepEqual([reply.error.type, reply.error.message, reply.error.details_json.length], ['CutFailure', 'no text today', 0]);
  } finally {
    await host.close();
  }
});

test('gRPC: an error whose type or message holds a lone surrogate is sent, U+FFFD in its place', BOUNDED, async () => {
  const host = await grpcHost(halfPlugin().plugin);
  try {
    const reply = await unary(host, 'Call', request('failing_message'));
    assert.deepEqual([reply.error.type, reply.error.message, reply.error.retryable], ['Cut\ufffdFailure', 'could not read smile \ufffd', true]);
    const thrown = await unary(host, 'Call', request('thrown_message'));
    assert.deepEqual([thrown.error.type, thrown.error.message], ['TypeError', 'bad smile \ufffd']);
    const { results } = await unary(host, 'CallBatch', { calls: [request('failing_message')] });
    assert.equal(results[0].error.message, 'could not read smile \ufffd');
  } finally {
    await host.close();
  }
});

test('gRPC: a lifecycle hook failing with a lone surrogate in its message is FAILED_PRECONDITION, U+FFFD in its place', BOUNDED, async () => {
  const plugin = new Plugin({ id: 'halves', version: '1.0.0' }).onInit(() => {
    throw new PluginError('BadConfig', `no ${HALF}`);
  });
  const host = await grpcHost(plugin, false);
  try {
    // It threw a URIError inside grpc-js (encodeURI of the grpc-message), the call never answered.
    await assert.rejects(unary(host, 'Init', { config_json: Buffer.from('{}') }), (error: grpc.ServiceError) => {
      assert.equal(error.code, grpc.status.FAILED_PRECONDITION);
      assert.equal(error.details, 'init hook failed: BadConfig: no smile \ufffd');
      return true;
    });
  } finally {
    await host.close();
  }
});

test('gRPC Events: an event whose data holds a lone surrogate is not sent, and said once at WARN', BOUNDED, async (t) => {
  const { plugin } = halfPlugin();
  const host = await grpcHost(plugin);
  const events = host.client.Events();
  try {
    const said = await stderrOf(t, async () => {
      const received: string[] = [];
      events.on('data', (event: { name: string; data_json: Buffer }) => {
        const why = unusable(event.data_json);
        received.push(`${event.name} ${why === undefined ? JSON.stringify(JSON.parse(event.data_json.toString())) : `unreadable (${why})`}`);
      });
      await new Promise((resolve) => events.once('metadata', resolve));
      await unary(host, 'Call', request('emit'));
      const deadline = Date.now() + 5000;
      while (received.length < 1 && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 5));
      await new Promise((resolve) => setTimeout(resolve, 50));
      assert.deepEqual(received, [`good {"text":"${FINE.text}"}`]);
    });
    const warnings = said.filter((line) => line.includes(' WARN '));
    assert.deepEqual(
      warnings.map((line) => line.replace(/^\S+ /, '')),
      [`WARN linchkit plugin: ${WARNING}`, `WARN linchkit plugin: ${NAME_WARNING}`],
    );
  } finally {
    events.end();
    await host.close();
  }
});

// ---- WebSocket ------------------------------------------------------------------------

interface WsHost {
  socket: WebSocket;
  frames: Frames;
  /** Why the host could not read a frame it received (`unusable`), one entry per frame. */
  unreadable: string[];
  close(): Promise<void>;
}

async function wsHost(plugin: Plugin): Promise<WsHost> {
  const server = new WebSocketPluginServer(plugin, undefined);
  const socket = new WebSocket(`ws://${await server.listen('127.0.0.1:0')}/`);
  const unreadable: string[] = [];
  socket.on('message', (data: RawData) => {
    const bytes = Buffer.isBuffer(data) ? data : Buffer.from(data as ArrayBuffer);
    const why = unusable(bytes);
    if (why !== undefined) unreadable.push(`${why}: ${bytes.toString()}`);
  });
  const frames = new Frames(socket);
  assert.equal((await frames.next()).type, 'hello');
  return {
    socket,
    frames,
    unreadable,
    close: async () => {
      socket.close(1000);
      await server.close(0);
    },
  };
}

function send(socket: WebSocket, type: string, id: number, method: string, params: unknown = {}): void {
  socket.send(JSON.stringify({ type, id, request: { v: 1, method, params } }));
}

function wsError(frame: Frame): { type: string; message: string; retryable: boolean; details?: unknown } {
  const response = frame.response as { ok: boolean; error: { type: string; message: string; retryable: boolean } };
  assert.equal(response.ok, false, JSON.stringify(frame));
  return response.error;
}

test('WebSocket call: a result holding a lone surrogate is provider_error; an emoji, a backslash + "ud83d" go unchanged', BOUNDED, async () => {
  const host = await wsHost(halfPlugin().plugin);
  try {
    for (const [id, method] of [[1, 'cut'], [2, 'cut_key'], [3, 'rows']] as const) {
      send(host.socket, 'call', id, method);
      assertNotUnicode(wsError(await host.frames.nextOf('response', id)));
    }
    send(host.socket, 'call', 4, 'fine');
    assert.deepEqual((await host.frames.nextOf('response', 4)).response, { ok: true, result: FINE });
    send(host.socket, 'call', 5, 'echo', FINE);
    assert.deepEqual((await host.frames.nextOf('response', 5)).response, { ok: true, result: FINE });
    assert.deepEqual(host.unreadable, []);
  } finally {
    await host.close();
  }
});

test('WebSocket stream: the chunks before go out, the one holding a lone surrogate ends the stream with provider_error', BOUNDED, async () => {
  const { plugin, closed } = halfPlugin();
  const host = await wsHost(plugin);
  try {
    send(host.socket, 'stream', 7, 'rows');
    const seen = await host.frames.until(7);
    assert.deepEqual(seen.slice(0, -1), [{ type: 'chunk', id: 7, data: { i: 0 } }, { type: 'chunk', id: 7, data: { i: 1 } }]);
    assertNotUnicode(wsError(seen.at(-1)!));
    assert.deepEqual(closed, ['rows'], 'the generator is closed, its finally run');
    assert.deepEqual(host.unreadable, []);
  } finally {
    await host.close();
  }
});

test('WebSocket: an error whose details hold a lone surrogate keeps its type and message, without the details', BOUNDED, async () => {
  const host = await wsHost(halfPlugin().plugin);
  try {
    send(host.socket, 'call', 1, 'failing_details');
    assert.deepEqual(wsError(await host.frames.nextOf('response', 1)), { type: 'CutFailure', message: 'no text today', retryable: false });
    assert.deepEqual(host.unreadable, []);
  } finally {
    await host.close();
  }
});

test('WebSocket: an error whose type or message holds a lone surrogate is sent, U+FFFD in its place', BOUNDED, async () => {
  const host = await wsHost(halfPlugin().plugin);
  try {
    send(host.socket, 'call', 1, 'failing_message');
    assert.deepEqual(wsError(await host.frames.nextOf('response', 1)), {
      type: 'Cut\ufffdFailure',
      message: 'could not read smile \ufffd',
      retryable: true,
    });
    send(host.socket, 'stream', 2, 'thrown_message');
    assert.deepEqual(wsError(await host.frames.nextOf('response', 2)), { type: 'TypeError', message: 'bad smile \ufffd', retryable: false });
    // The host's own frame type, cut at 40 code units inside an emoji, in the error that answers it.
    host.socket.send(JSON.stringify({ type: `${'x'.repeat(39)}😀`, id: 3 }));
    const refused = await host.frames.nextOf('error', 3);
    assert.equal((refused.error as { message: string }).message, `unknown frame type ${'x'.repeat(39)}\ufffd`);
    assert.deepEqual(host.unreadable, []);
  } finally {
    await host.close();
  }
});

test('WebSocket events: an event whose data holds a lone surrogate is not sent, and said once at WARN', BOUNDED, async (t) => {
  const host = await wsHost(halfPlugin().plugin);
  try {
    const said = await stderrOf(t, async () => {
      send(host.socket, 'call', 1, 'emit');
      const frames = [await host.frames.next(), await host.frames.next()];
      assert.deepEqual(
        frames.map((frame) => (frame.type === 'event' ? `event ${frame.event} ${JSON.stringify(frame.data)}` : `response ${JSON.stringify(frame.response)}`)).sort(),
        [`event good {"text":"${FINE.text}"}`, 'response {"ok":true,"result":true}'],
      );
    });
    assert.deepEqual(
      said.filter((line) => line.includes(' WARN ')).map((line) => line.replace(/^\S+ /, '')),
      [`WARN linchkit plugin: ${WARNING}`, `WARN linchkit plugin: ${NAME_WARNING}`],
    );
    assert.deepEqual(host.unreadable, []);
  } finally {
    await host.close();
  }
});

test('WebSocket: a hello naming a method with a lone surrogate is said at ERROR, not sent, and the plugin lives on', BOUNDED, async (t) => {
  const plugin = new Plugin({ id: 'halves', version: '1.0.0' }).method(`cut_${HALF}`, () => 1);
  const server = new WebSocketPluginServer(plugin, undefined);
  const address = await server.listen('127.0.0.1:0');
  try {
    const said = await stderrOf(t, async () => {
      const socket = new WebSocket(`ws://${address}/`);
      const received: string[] = [];
      socket.on('message', (data: RawData) => received.push(String(data)));
      await new Promise((resolve) => socket.once('open', resolve));
      await new Promise((resolve) => setTimeout(resolve, 100));
      assert.deepEqual(received, []);
      socket.close(1000);
    });
    assert.deepEqual(
      said.filter((line) => line.includes(' ERROR ')).map((line) => line.replace(/^\S+ /, '')),
      ['ERROR linchkit plugin: not sent: the hello frame is not JSON: a string is not valid Unicode (a lone surrogate)\n'],
    );
  } finally {
    await server.close(0);
  }
});
