/**
 * What the client's own transport decides, against real `dispatcher serve` processes: a
 * call cut off in flight told apart from one never sent, bad input refused before it is
 * sent, a bound on every call and on the connections it opens, one signal shared by many.
 */

import assert from 'node:assert/strict';
import { createServer, Server, Socket } from 'node:net';
import { after, before, describe, test } from 'node:test';

import { Agent } from 'undici';

import { DeadlineExceeded, GatewayClient, InvalidParams, TargetUnavailable } from '../src';
import { Gateway } from './gateway';

async function rejection(promise: Promise<unknown>): Promise<unknown> {
  try {
    await promise;
  } catch (error) {
    return error;
  }
  assert.fail('expected a rejection');
}

async function freePort(): Promise<number> {
  const free = createServer();
  await new Promise<void>((done) => free.listen(0, '127.0.0.1', done));
  const { port } = free.address() as { port: number };
  await new Promise((done) => free.close(done));
  return port;
}

/** A TCP server that reads requests and never answers: a hung gateway. `received`: what came. */
async function silentServer(): Promise<{ url: string; received: () => string; close: () => Promise<void> }> {
  const sockets = new Set<Socket>();
  let received = '';
  const silent: Server = createServer((socket) => {
    sockets.add(socket);
    socket.on('data', (chunk: Buffer) => {
      received += chunk.toString('latin1');
    });
    socket.on('error', () => undefined);
  });
  await new Promise<void>((done) => silent.listen(0, '127.0.0.1', done));
  const { port } = silent.address() as { port: number };
  return {
    url: `http://127.0.0.1:${port}`,
    received: () => received,
    close: async () => {
      for (const socket of sockets) socket.destroy();
      await new Promise((done) => silent.close(done));
    },
  };
}

describe('a call cut off in flight, and one never sent', () => {
  test('killing the gateway mid-call: TargetUnavailable stage in_flight; refused: stage connect', async () => {
    const gateway = new Gateway();
    await gateway.start();
    try {
      const client = new GatewayClient({ url: gateway.url, timeoutMs: 20_000 });
      assert.equal(typeof (await client.call('echo', 'sleep', { seconds: 0 })), 'number');
      const calls = [1, 2, 3].map((n) => rejection(client.call('echo', 'sleep', { seconds: 10 }, { requestId: `cut-${n}` })));
      await new Promise((done) => setTimeout(done, 500));
      await gateway.kill();
      for (const cut of await Promise.all(calls)) {
        assert.ok(cut instanceof TargetUnavailable, String(cut));
        assert.equal(cut.details.stage, 'in_flight', cut.message);
        assert.equal(cut.retryable, true);
        assert.match(cut.message, /may have reached/);
        assert.doesNotMatch(cut.message, /cannot be reached/);
      }
      const refused = await rejection(client.call('echo', 'sleep', { seconds: 0 }));
      assert.ok(refused instanceof TargetUnavailable, String(refused));
      assert.equal(refused.details.stage, 'connect', refused.message);
      assert.match(refused.message, /ECONNREFUSED/);
      assert.match(refused.message, /not sent/);
    } finally {
      await gateway.close();
    }
  });
});

describe('bad input', () => {
  const port = freePort();

  test('header values a request cannot carry are InvalidParams, not retryable, naming the option', async () => {
    const url = `http://127.0.0.1:${await port}`;
    const client = new GatewayClient({ url, timeoutMs: 5000 });
    for (const [options, option] of [
      [{ idempotencyKey: 'a\nb' }, 'idempotencyKey'],
      [{ idempotencyKey: '' }, 'idempotencyKey'],
      [{ idempotencyKey: 'k'.repeat(256) }, 'idempotencyKey'],
      [{ requestId: 'a b' }, 'requestId'],
      [{ traceparent: 'x\r\ny' }, 'traceparent'],
      [{ version: '1.0.0\n' }, 'version'],
    ] as const) {
      const refused = await rejection(client.call('echo', 'say', { text: 'x' }, options));
      assert.ok(refused instanceof InvalidParams, `${option}: ${String(refused)}`);
      assert.equal(refused.retryable, false);
      assert.match(refused.message, new RegExp(option));
    }
    const submitted = await rejection(client.submit('echo', 'say', {}, { idempotencyKey: 'a\nb' }));
    assert.ok(submitted instanceof InvalidParams, String(submitted));
    for (const secret of ['a\nb', 'ключ-secret', 'tab\tsecret']) {
      for (const [options, option] of [
        [{ apiKey: secret }, 'apiKey'],
        [{ token: secret }, 'token'],
      ] as const) {
        const keyed = new GatewayClient({ url, timeoutMs: 5000, ...options });
        for (const attempt of [keyed.call('echo', 'say'), keyed.listPlugins(), keyed.job('j')]) {
          const refused = await rejection(attempt);
          assert.ok(refused instanceof InvalidParams, `${option}: ${String(refused)}`);
          assert.equal(refused.retryable, false);
          assert.match(refused.message, new RegExp(option));
          assert.ok(!refused.message.includes('secret') && !refused.message.includes('a\nb'), refused.message);
          assert.equal(refused.cause, undefined);
        }
      }
    }
  });

  test('params that are not JSON are InvalidParams', async () => {
    const client = new GatewayClient({ url: `http://127.0.0.1:${await port}`, timeoutMs: 5000 });
    const cycle: Record<string, unknown> = {};
    cycle.self = cycle;
    for (const params of [{ n: 10n }, cycle]) {
      for (const attempt of [client.call('echo', 'say', params), client.submit('echo', 'say', params)]) {
        const refused = await rejection(attempt);
        assert.ok(refused instanceof InvalidParams, String(refused));
        assert.equal(refused.type, 'invalid_params');
        assert.equal(refused.retryable, false);
      }
    }
  });
});

describe('bounds', () => {
  test('a call without timeoutMs sends no deadline and waits for the gateway; other requests keep defaultTimeoutMs', async () => {
    const silent = await silentServer();
    try {
      const client = new GatewayClient({ url: silent.url, defaultTimeoutMs: 300 });
      // The plugin list, readiness, a job's record: the gateway answers them itself.
      const started = performance.now();
      const late = await rejection(client.listPlugins());
      assert.ok(late instanceof DeadlineExceeded, String(late));
      assert.ok(performance.now() - started < 3000);
      assert.doesNotMatch(late.message, /cannot be reached/);

      // A call names no deadline: the method's timeout_ms rules at the gateway, which
      // answers deadline_exceeded itself; the client does not give up at 300 ms (nor 30 s).
      const controller = new AbortController();
      const call = rejection(client.call('echo', 'say', { text: 'hi' }, { signal: controller.signal }));
      await new Promise((done) => setTimeout(done, 1500));
      controller.abort(new Error('the host gave up'));
      const aborted = await call;
      assert.ok(aborted instanceof Error && aborted.message === 'the host gave up', String(aborted));
      const head = silent.received().toLowerCase();
      assert.match(head, /post \/v1\/plugins\/echo\/methods\/say/);
      assert.doesNotMatch(head, /x-timeout-ms|request-timeout/);

      // With timeoutMs: sent, and enforced here too.
      const bounded = await rejection(client.call('echo', 'say', { text: 'hi' }, { timeoutMs: 200 }));
      assert.ok(bounded instanceof DeadlineExceeded, String(bounded));
      assert.match(silent.received(), /X-Timeout-Ms: 200\r\n/i);

      const plain = new GatewayClient({ url: silent.url, apiKey: 'never-shown' });
      assert.equal(plain.defaultTimeoutMs, 30_000);
      assert.match(String(plain), /timeoutMs=none \(the gateway's\).*maxConnections=256.*credentials=apiKey/);
      assert.ok(!String(plain).includes('never-shown'));
    } finally {
      await silent.close();
    }
  });

  test('undici timeouts of its own are DeadlineExceeded, not "cannot be reached"', async () => {
    const silent = await silentServer();
    try {
      // The transport's own header timeout, below the call's deadline.
      const dispatcher = new Agent({ headersTimeout: 200 });
      const client = new GatewayClient({ url: silent.url, timeoutMs: 20_000, dispatcher });
      const late = await rejection(client.call('echo', 'say', { text: 'hi' }));
      assert.ok(late instanceof DeadlineExceeded, String(late));
      assert.doesNotMatch(late.message, /cannot be reached/);
      await dispatcher.close();
    } finally {
      await silent.close();
    }
  });

  test('calls past maxConnections queue in the client instead of meeting the per-peer limit', async () => {
    const gateway = new Gateway({ maxConnectionsPerPeer: 8 });
    await gateway.start();
    try {
      const client = new GatewayClient({ url: gateway.url, timeoutMs: 60_000, maxConnections: 4 });
      const calls = Array.from({ length: 60 }, () => client.call<number>('echo', 'sleep', { seconds: 0.05 }));
      const results = await Promise.allSettled(calls);
      const failed = results.filter((result) => result.status === 'rejected');
      assert.equal(failed.length, 0, String((failed[0] as PromiseRejectedResult | undefined)?.reason));
      await client.close();
    } finally {
      await gateway.close();
    }
  });
});

describe('one signal shared by many calls', () => {
  const gateway = new Gateway();
  before(() => gateway.start());
  after(() => gateway.close());

  test('50 calls on one AbortSignal: no listener warning, all reject with its reason', async () => {
    const warnings: Error[] = [];
    const onWarning = (warning: Error): void => {
      warnings.push(warning);
    };
    process.on('warning', onWarning);
    try {
      const client = new GatewayClient({ url: gateway.url, timeoutMs: 20_000 });
      const controller = new AbortController();
      const calls = Array.from({ length: 50 }, () =>
        rejection(client.call('echo', 'sleep', { seconds: 5 }, { signal: controller.signal })),
      );
      await new Promise((done) => setTimeout(done, 300));
      const reason = new Error('the user left');
      controller.abort(reason);
      for (const error of await Promise.all(calls)) assert.equal(error, reason);
      // Calls that ended leave no listener behind on a signal that lives on.
      const longLived = new AbortController();
      for (let n = 0; n < 30; n += 1) await client.call('echo', 'say', { text: 'x' }, { signal: longLived.signal });
      await new Promise((done) => setImmediate(done));
      assert.deepEqual(warnings.map((warning) => warning.name), []);
      await client.close();
    } finally {
      process.off('warning', onWarning);
    }
  });
});
