/**
 * Credentials that change: a bearer token from a provider, asked for every request and
 * every connect of the event stream, against a real `dispatcher serve` that verifies
 * JWTs (RS256, from a JWKS file the test writes) with no leeway on `exp`.
 */

import assert from 'node:assert/strict';
import { generateKeyPairSync, KeyObject, sign } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';

import { GatewayClient, Unauthorized } from '../src';
import { eventually, Gateway, Relay } from './gateway';

const KID = 'ts-client-test';

function base64url(value: Buffer | string): string {
  return Buffer.from(value).toString('base64url');
}

/** An RS256 JWT for principal `ts-host` (role `host`) that expires in `seconds`. */
function jwt(key: KeyObject, seconds: number): string {
  const header = base64url(JSON.stringify({ alg: 'RS256', typ: 'JWT', kid: KID }));
  const now = Math.floor(Date.now() / 1000);
  const payload = base64url(JSON.stringify({ sub: 'ts-host', roles: ['host'], iat: now, exp: now + seconds }));
  const signature = sign('sha256', Buffer.from(`${header}.${payload}`), key);
  return `${header}.${payload}.${base64url(signature)}`;
}

async function rejection(promise: Promise<unknown>): Promise<unknown> {
  try {
    await promise;
  } catch (error) {
    return error;
  }
  assert.fail('expected a rejection');
}

describe('a bearer token from a provider', () => {
  const folder = mkdtempSync(join(tmpdir(), 'linchkit-ts-jwks-'));
  const { privateKey, publicKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
  const jwks = join(folder, 'jwks.json');
  writeFileSync(jwks, JSON.stringify({ keys: [{ ...publicKey.export({ format: 'jwk' }), kid: KID, alg: 'RS256', use: 'sig' }] }));
  const gateway = new Gateway({ jwks });
  const fast = { initialDelayMs: 50, maxDelayMs: 200, emitTimeoutMs: 10_000 };
  before(() => gateway.start());
  after(async () => {
    await gateway.close();
    rmSync(folder, { recursive: true, force: true });
  });

  test('is asked for every call, so a renewed token is used at once', async () => {
    let current = jwt(privateKey, -60); // expired
    let asked = 0;
    const client = new GatewayClient({
      url: gateway.url,
      timeoutMs: 10_000,
      bearerToken: async () => {
        asked += 1;
        return current;
      },
    });
    assert.ok((await rejection(client.call('echo', 'say', { text: 'hi' }))) instanceof Unauthorized);
    current = jwt(privateKey, 600);
    const result = await client.call<{ caller: string }>('echo', 'say', { text: 'hi' });
    assert.equal(result.caller, 'ts-host');
    assert.equal(asked, 2);
    await client.close();
  });

  test('an event stream refused with 401 at a reconnect asks the provider again and resumes', async () => {
    const relay = new Relay(() => gateway.port);
    let current = jwt(privateKey, 600);
    let asked = 0;
    const client = new GatewayClient({
      url: await relay.listen(),
      timeoutMs: 10_000,
      events: fast,
      token: () => {
        asked += 1;
        return current;
      },
    });
    const direct = new GatewayClient({ url: gateway.url, timeoutMs: 10_000, token: jwt(privateKey, 600) });
    try {
      const events = client.plugin('events');
      const ticks: number[] = [];
      events.on('tick', (data) => {
        ticks.push((data as { n: number }).n);
      });
      const errors: unknown[] = [];
      events.onError((error) => {
        errors.push(error);
        // The host learns the token is stale and renews it: the next connect uses it.
        if (error instanceof Unauthorized) current = jwt(privateKey, 600);
      });
      await events.start();
      await direct.call('events', 'burst', { name: 'tick', count: 2 });
      await eventually(() => ticks.length === 2, 'two ticks');

      current = jwt(privateKey, -60); // the token expired while the stream was up
      relay.cut();
      await direct.call('events', 'burst', { name: 'tick', count: 3 });
      await eventually(() => ticks.length === 5, 'the three ticks emitted while refused, replayed');
      assert.deepEqual(ticks, [0, 1, 0, 1, 2]);
      assert.ok(errors.some((error) => error instanceof Unauthorized), 'the refusal was not reported');
      assert.ok(events.eventStream !== undefined && asked >= 3, `asked ${asked} times`);
      await events.destroy();
    } finally {
      await client.close();
      await direct.close();
      await relay.close();
    }
  });

  test('a stream refused again and again gives up, says so, and stops looking subscribed', async () => {
    const relay = new Relay(() => gateway.port);
    let current = jwt(privateKey, 600);
    let asked = 0;
    const client = new GatewayClient({
      url: await relay.listen(),
      events: { ...fast, maxAuthAttempts: 3 },
      token: () => {
        asked += 1;
        return current;
      },
    });
    try {
      const events = client.plugin('events');
      events.on('tick', () => undefined);
      const errors: unknown[] = [];
      events.onError((error) => errors.push(error));
      await events.start();
      assert.ok(events.eventStream !== undefined);
      const before = asked;
      current = 'not-a-token';
      relay.cut();
      await eventually(() => events.eventStream === undefined, 'the stream to give up');
      assert.equal(asked - before, 3);
      const last = errors.at(-1);
      assert.ok(last instanceof Unauthorized, String(last));
      assert.match(last.message, /gave up after 3/);
      assert.ok(!last.message.includes('not-a-token'));
      // Renewed credentials: a new emit opens a new stream, which asks again.
      current = jwt(privateKey, 600);
      await events.emit('ping', {});
      assert.ok(events.eventStream !== undefined);
      await events.destroy();
    } finally {
      await client.close();
      await relay.close();
    }
  });
});
