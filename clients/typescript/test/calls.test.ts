/** Calls through a real `dispatcher serve`: results, each error type's class, deadlines, auth, lifecycle. */

import assert from 'node:assert/strict';
import { createServer as createHttpServer } from 'node:http';
import { createServer, Server, Socket } from 'node:net';
import { after, before, describe, test } from 'node:test';

import {
  DeadlineExceeded,
  DispatchError,
  GatewayClient,
  InvalidParams,
  MethodNotFound,
  PluginError,
  PluginNotFound,
  ProviderError,
  RateLimited,
  ShuttingDown,
  TargetUnavailable,
  Unauthorized,
} from '../src';
import { API_KEY, Gateway, Relay } from './gateway';

async function rejection(promise: Promise<unknown>): Promise<unknown> {
  try {
    await promise;
  } catch (error) {
    return error;
  }
  assert.fail('expected a rejection');
}

describe('calls', () => {
  // `sleep` may take 4 s at the gateway (its own timeout_ms): longer than the client's
  // `defaultTimeoutMs` in the test below, which bounds no call.
  const gateway = new Gateway({ sleepTimeoutMs: 4_000 });
  let client: GatewayClient;
  before(async () => {
    await gateway.start();
    client = new GatewayClient({ url: gateway.url, timeoutMs: 10_000 });
  });
  after(() => gateway.close());

  test('init checks the plugin and its methods, then a call returns the result', async () => {
    const echo = client.plugin('echo');
    await echo.init({ methods: ['say', 'sleep'] });
    assert.deepEqual(echo.methods?.map((method) => method.name), ['say', 'sleep', 'withdraw']);
    await echo.start();
    const result = await echo.call<{ text: string; greeting: string }>('say', { text: 'hi' });
    assert.deepEqual(result, { text: 'hi', greeting: 'via gateway', caller: null });
    assert.equal(echo.state, 'started');
    await echo.destroy();
  });

  test('init refuses a plugin, a version or a method the gateway does not serve', async () => {
    assert.ok((await rejection(client.plugin('nope').init())) instanceof PluginNotFound);
    const wrongVersion = await rejection(client.plugin('echo', { version: '9.9.9' }).init());
    assert.ok(wrongVersion instanceof PluginNotFound);
    assert.match(wrongVersion.message, /1\.0\.0/);
    const missing = await rejection(client.plugin('echo').init({ methods: ['say', 'fly'] }));
    assert.ok(missing instanceof MethodNotFound);
    assert.match(missing.message, /fly/);
  });

  test('each error type arrives as its class, with status, retryable and the request id', async () => {
    const echo = client.plugin('echo');
    const invalid = await rejection(echo.call('say', { text: 7 }, { requestId: 'req-invalid.1' }));
    assert.ok(invalid instanceof InvalidParams);
    assert.equal(invalid.type, 'invalid_params');
    assert.equal(invalid.status, 400);
    assert.equal(invalid.retryable, false);
    assert.equal(invalid.requestId, 'req-invalid.1');

    const unknown = await rejection(echo.call('fly'));
    assert.ok(unknown instanceof MethodNotFound);
    assert.equal(unknown.status, 404);
    assert.ok(typeof unknown.requestId === 'string' && unknown.requestId.length > 0);

    assert.ok((await rejection(client.call('ghost', 'say'))) instanceof PluginNotFound);

    // The plugin's own error keeps its name as the type.
    const business = await rejection(echo.call('withdraw', { amount: 500 }));
    assert.ok(business instanceof PluginError);
    assert.equal(business.type, 'InsufficientFunds');
    assert.equal(business.status, 500);
    assert.match(business.message, /balance is 100/);
    assert.equal(await echo.call('withdraw', { amount: 30 }), 70);

    // An idempotency key past the gateway's 255 characters is refused before it is sent;
    // one of 255, and one beyond ASCII (sent as UTF-8), the gateway takes.
    const badKey = await rejection(echo.call('say', { text: 'x' }, { idempotencyKey: 'k'.repeat(256) }));
    assert.ok(badKey instanceof InvalidParams);
    assert.match(badKey.message, /1-255/);
    for (const idempotencyKey of ['k'.repeat(255), 'заказ-42 ✓']) {
      const result = await echo.call<{ text: string }>('say', { text: 'keyed' }, { idempotencyKey });
      assert.equal(result.text, 'keyed');
    }
  });

  test('a deadline is sent to the gateway and its 504 is DeadlineExceeded', async () => {
    const started = performance.now();
    const late = await rejection(
      client.plugin('echo').call('sleep', { seconds: 3 }, { timeoutMs: 300, requestId: 'late-1' }),
    );
    assert.ok(late instanceof DeadlineExceeded, String(late));
    assert.equal(late.retryable, true);
    // The gateway's own answer, not the client's timer (before 2026-12-04 they raced).
    assert.equal(late.status, 504, late.message);
    assert.equal(late.requestId, 'late-1');
    assert.ok(performance.now() - started < 2500, 'the deadline did not end the call');
  });

  test("without timeoutMs a call waits for the gateway's answer: past defaultTimeoutMs, up to the method's timeout_ms", async () => {
    // defaultTimeoutMs (30 s unless set) bounds requests that run no method, not calls:
    // until 2026-12-04 a call without timeoutMs gave up there.
    const patient = new GatewayClient({ url: gateway.url, defaultTimeoutMs: 500 });
    const echo = patient.plugin('echo');
    const started = performance.now();
    const [slow, tooSlow] = await Promise.allSettled([
      echo.call<number>('sleep', { seconds: 1.5 }),
      echo.call('sleep', { seconds: 60 }, { requestId: 'too-slow-1' }),
    ]);
    assert.ok(slow.status === 'fulfilled', `the 1.5 s call failed: ${String(slow.status === 'rejected' && slow.reason)}`);
    // The plugin reports the time it slept; the gateway's loop (uvloop) keeps time in whole
    // milliseconds, so a 1.5 s sleep can end up to 1 ms early by perf_counter (CI saw it).
    assert.ok(slow.value > 1.4, `the 1.5 s call slept ${slow.value} s`);
    // The method's own timeout_ms (4 s) ends the other at the gateway: its 504, not the client's.
    assert.ok(tooSlow.status === 'rejected');
    const late: unknown = tooSlow.reason;
    assert.ok(late instanceof DeadlineExceeded, String(late));
    assert.equal(late.status, 504);
    assert.equal(late.requestId, 'too-slow-1');
    assert.ok(performance.now() - started < 15_000);
    await patient.close();
  });

  test('the deadline holds on the client too, against a peer that never answers', async () => {
    const sockets = new Set<Socket>();
    const silent: Server = createServer((socket) => {
      sockets.add(socket); // reads the request, answers nothing
    });
    await new Promise<void>((done) => silent.listen(0, '127.0.0.1', done));
    const address = silent.address();
    assert.ok(address !== null && typeof address === 'object');
    try {
      const mute = new GatewayClient({ url: `http://127.0.0.1:${address.port}` });
      const started = performance.now();
      const late = await rejection(mute.call('echo', 'say', { text: 'hi' }, { timeoutMs: 200, requestId: 'mute-1' }));
      assert.ok(late instanceof DeadlineExceeded, String(late));
      assert.equal(late.requestId, 'mute-1');
      assert.ok(performance.now() - started < 2000);
    } finally {
      for (const socket of sockets) socket.destroy();
      await new Promise((done) => silent.close(done));
    }
  });

  test('the caller can abort a call; a gateway that is not there is TargetUnavailable', async () => {
    const controller = new AbortController();
    const call = client.plugin('echo').call('sleep', { seconds: 2 }, { signal: controller.signal });
    setTimeout(() => controller.abort(new Error('the user left')), 100);
    const aborted = await rejection(call);
    assert.ok(aborted instanceof Error && aborted.message === 'the user left');

    const free = createServer();
    await new Promise<void>((done) => free.listen(0, '127.0.0.1', done));
    const { port } = free.address() as { port: number };
    await new Promise((done) => free.close(done));
    const nowhere = await rejection(new GatewayClient({ url: `http://127.0.0.1:${port}` }).call('echo', 'say'));
    assert.ok(nowhere instanceof TargetUnavailable, String(nowhere));
    assert.equal(nowhere.retryable, true);
    assert.match(nowhere.message, /ECONNREFUSED/);
  });

  test('healthCheck: healthy while the gateway is ready and serves the plugin', async () => {
    const health = await client.plugin('echo').healthCheck();
    assert.equal(health.status, 'healthy', health.detail);
    assert.ok(health.latencyMs >= 0);
    const gone = await client.plugin('ghost').healthCheck();
    assert.equal(gone.status, 'unhealthy');
    assert.match(gone.detail, /ghost/);
  });

  test('stop waits for calls in flight and refuses new ones; destroy is final', async () => {
    const echo = client.plugin('echo');
    await echo.start();
    // Whether the call had finished when stop returned: not the seconds it says it slept,
    // which a timer of millisecond resolution may end a fraction of one early (0.4996).
    let finished = false;
    const slow = echo.call<number>('sleep', { seconds: 0.5 }).then((slept) => {
      finished = true;
      return slept;
    });
    await new Promise((done) => setTimeout(done, 50));
    await echo.stop();
    assert.ok(finished, 'stop returned before the call in flight finished');
    assert.ok((await slow) > 0.45);
    assert.ok((await rejection(echo.call('say', { text: 'late' }))) instanceof ShuttingDown);
    await echo.start();
    assert.deepEqual((await echo.call<{ text: string }>('say', { text: 'again' })).text, 'again');
    await echo.destroy();
    const refused = await rejection(echo.call('say', { text: 'gone' }));
    assert.ok(refused instanceof ShuttingDown);
    assert.ok(refused instanceof DispatchError);
    assert.ok((await rejection(echo.emit('ping'))) instanceof ShuttingDown);
    assert.throws(() => echo.on('tick', () => undefined), ShuttingDown);
  });
});

describe('a peer that is not the gateway it claims to be', () => {
  test('answers without an envelope are typed by status; a malformed error object is ProviderError', async () => {
    const answers: Record<string, [number, Record<string, string>, string]> = {
      '/v1/plugins/p/methods/html': [200, { 'Content-Type': 'text/html' }, '<h1>hello</h1>'],
      '/v1/plugins/p/methods/busy': [503, { 'Retry-After': '7' }, '<h1>upstream busy</h1>'],
      '/v1/plugins/p/methods/shapeless': [400, {}, '{"ok": false, "error": "nope"}'],
      '/v1/plugins/p/methods/limited': [429, { 'Retry-After': '9' }, '{"ok": false, "error": {"type": "rate_limited", "message": "slow down", "retryable": true, "retry_after": 0.25}}'],
      '/v1/plugins/p/methods/future': [418, {}, '{"ok": false, "error": {"type": "teapot", "message": "a newer type", "retryable": true}}'],
    };
    const liar = createHttpServer((request, response) => {
      const [status, headers, body] = answers[request.url ?? ''] ?? [404, {}, ''];
      request.resume();
      response.writeHead(status, headers).end(body);
    });
    await new Promise<void>((done) => liar.listen(0, '127.0.0.1', done));
    const { port } = liar.address() as { port: number };
    try {
      const client = new GatewayClient({ url: `http://127.0.0.1:${port}`, timeoutMs: 5000 });
      const html = await rejection(client.call('p', 'html'));
      assert.ok(html instanceof ProviderError, String(html));
      const busy = await rejection(client.call('p', 'busy'));
      assert.ok(busy instanceof TargetUnavailable, String(busy));
      assert.equal(busy.retryAfterMs, 7000);
      assert.ok((await rejection(client.call('p', 'shapeless'))) instanceof ProviderError);
      const limited = await rejection(client.call('p', 'limited'));
      assert.ok(limited instanceof RateLimited);
      assert.equal(limited.retryAfterMs, 250); // the envelope's exact figure beats the header's
      const future = await rejection(client.call('p', 'future'));
      assert.ok(future instanceof DispatchError && future.constructor === DispatchError, String(future));
      assert.equal(future.type, 'teapot');
      assert.equal(future.retryable, true);
    } finally {
      await new Promise((done) => liar.close(done));
    }
  });
});

describe('an authenticated gateway', () => {
  const gateway = new Gateway({ auth: true });
  before(() => gateway.start());
  after(() => gateway.close());

  test('without or with a wrong key: Unauthorized, for calls, init and events; the key is never echoed', async () => {
    for (const client of [
      new GatewayClient({ url: gateway.url }),
      new GatewayClient({ url: gateway.url, apiKey: 'wrong-key' }),
    ]) {
      const echo = client.plugin('echo');
      const refused = await rejection(echo.call('say', { text: 'hi' }));
      assert.ok(refused instanceof Unauthorized, String(refused));
      assert.equal(refused.status, 401);
      assert.ok(!refused.message.includes('wrong-key'));
      assert.ok((await rejection(echo.init())) instanceof Unauthorized);
      const streamErrors: unknown[] = [];
      echo.onError((error) => streamErrors.push(error));
      const emitted = await rejection(echo.emit('ping', {}, { timeoutMs: 5000 }));
      assert.ok(emitted instanceof Unauthorized, String(emitted));
      assert.ok(streamErrors.some((error) => error instanceof Unauthorized));
      await echo.destroy();
    }
    assert.ok(!gateway.stderr.includes(API_KEY));
  });

  test('a static key refused on the event stream fails at once; a key from a function is asked again', async () => {
    const relay = new Relay(() => gateway.port);
    const url = await relay.listen();
    const events = { initialDelayMs: 50, maxDelayMs: 200, maxAuthAttempts: 3 };
    try {
      const fixed = new GatewayClient({ url, apiKey: 'wrong-key', events }).plugin('events');
      fixed.on('tick', () => undefined);
      const errors: unknown[] = [];
      fixed.onError((error) => errors.push(error));
      const refused = await rejection(fixed.start());
      assert.ok(refused instanceof Unauthorized, String(refused));
      assert.equal(refused.status, 401);
      assert.ok(!refused.message.includes('wrong-key'));
      assert.equal(relay.connections, 1, 'a key that cannot change was tried again');
      assert.ok(errors.length === 1 && errors[0] instanceof Unauthorized, errors.map(String).join('; '));
      assert.equal(fixed.eventStream, undefined);
      await fixed.destroy();

      // A function may give another key at the next connect: asked again, up to maxAuthAttempts.
      let asked = 0;
      const provided = new GatewayClient({
        url,
        apiKey: () => {
          asked += 1;
          return 'wrong-key';
        },
        events,
      }).plugin('events');
      provided.on('tick', () => undefined);
      const given = await rejection(provided.start());
      assert.ok(given instanceof Unauthorized, String(given));
      assert.match(given.message, /gave up after 3/);
      assert.equal(asked, 3);
      assert.equal(relay.connections, 1 + 3);
      await provided.destroy();
    } finally {
      await relay.close();
    }
  });

  test('with the key: calls, init and events go through', async () => {
    const echo = new GatewayClient({ url: gateway.url, apiKey: API_KEY }).plugin('echo');
    await echo.init();
    const result = await echo.call<{ caller: string }>('say', { text: 'hi' });
    assert.equal(result.caller, 'ts-host');
    await echo.destroy();
  });
});
