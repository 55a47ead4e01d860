/** Async jobs through a real `dispatcher serve` on a real Redis: submit, read, result, refusals. */

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';

import { DispatchError, GatewayClient, InvalidParams, JOB_NOT_FINISHED, Unauthorized } from '../src';
import { API_KEY, Gateway, RedisServer } from './gateway';

async function rejection(promise: Promise<unknown>): Promise<unknown> {
  try {
    await promise;
  } catch (error) {
    return error;
  }
  assert.fail('expected a rejection');
}

describe('jobs', () => {
  const redis = new RedisServer();
  let gateway: Gateway;
  let client: GatewayClient;
  before(async () => {
    await redis.start();
    gateway = new Gateway({ auth: true, redisUrl: redis.url });
    await gateway.start();
    client = new GatewayClient({ url: gateway.url, apiKey: API_KEY, timeoutMs: 30_000 });
  });
  after(async () => {
    await gateway?.close();
    await redis.stop();
  });

  test('a submitted job is read back with its result', async () => {
    const id = await client.submit('echo', 'say', { text: 'later' });
    const record = await client.job(id, { waitSeconds: 20 });
    assert.equal(record.state, 'succeeded');
    assert.equal(record.caller, 'ts-host');
    assert.deepEqual(await client.jobResult(id), { text: 'later', greeting: 'via gateway', caller: 'ts-host' });
  });

  test('a job still running is job_not_finished, retryable', async () => {
    const id = await client.submit('echo', 'sleep', { seconds: 3 });
    const error = await rejection(client.jobResult(id));
    assert.ok(error instanceof DispatchError);
    assert.equal(error.type, JOB_NOT_FINISHED);
    assert.equal(error.retryable, true);
  });

  test('refusals: unknown job, bad params, a callback outside egress, no credentials, a wait too long', async () => {
    const unknown = await rejection(client.job('no-such-job'));
    assert.ok(unknown instanceof DispatchError);
    assert.equal(unknown.type, 'job_not_found');
    assert.ok(await rejection(client.submit('echo', 'say', { text: 1 })) instanceof InvalidParams);
    const callback = await rejection(client.submit('echo', 'say', { text: 'x' }, { callbackUrl: 'http://169.254.169.254/' }));
    assert.ok(callback instanceof InvalidParams);
    const anonymous = new GatewayClient({ url: gateway.url });
    assert.ok((await rejection(anonymous.submit('echo', 'say', { text: 'x' }))) instanceof Unauthorized);
    assert.ok((await rejection(client.job('abc', { waitSeconds: 31 }))) instanceof InvalidParams);
    await assert.rejects(client.job('abc', { waitSeconds: -1 }), RangeError);
  });
});
