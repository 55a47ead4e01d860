/**
 * Events through a real `dispatcher serve`: delivery to handlers, host events published,
 * and resumes: across a cut connection (a TCP relay in between, cut for real), past the
 * gateway's ring (a gap, said), and across a gateway restart on the same port.
 */

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';

import { GatewayClient, Gap, PluginNotFound, RemotePlugin } from '../src';
import { eventually, Gateway, Relay } from './gateway';

interface Tick {
  id: number;
  n: number;
}

function collect(plugin: RemotePlugin): Tick[] {
  const ticks: Tick[] = [];
  plugin.on('tick', (data, event) => {
    ticks.push({ id: event.id, n: (data as { n: number }).n });
  });
  return ticks;
}

describe('events', () => {
  const gateway = new Gateway();
  let client: GatewayClient;
  const fast = { initialDelayMs: 50, maxDelayMs: 400, emitTimeoutMs: 10_000 };
  before(async () => {
    await gateway.start();
    client = new GatewayClient({ url: gateway.url, timeoutMs: 15_000, events: fast });
  });
  after(() => gateway.close());

  const burst = (count: number, via: GatewayClient = client): Promise<number> =>
    via.call<number>('events', 'burst', { name: 'tick', count });

  test('handlers get the plugin events in order; one that throws is reported and the stream goes on', async () => {
    const events = client.plugin('events');
    const ticks = collect(events);
    const everything: string[] = [];
    events.on('*', (_data, event) => {
      everything.push(`${event.event}@${event.version}`);
    });
    events.on('tick', (data) => {
      if ((data as { n: number }).n === 1) throw new Error('a handler bug');
    });
    events.on('tick', async (data) => {
      if ((data as { n: number }).n === 2) throw new Error('an async handler bug');
    });
    const failures: unknown[] = [];
    events.onError((error) => failures.push(error));
    await events.start();
    await burst(4);
    await eventually(() => ticks.length === 4 && failures.length === 2, 'four ticks and two failures');
    assert.deepEqual(ticks.map((tick) => tick.n), [0, 1, 2, 3]);
    assert.deepEqual(everything, ['tick@1.0.0', 'tick@1.0.0', 'tick@1.0.0', 'tick@1.0.0']);
    assert.deepEqual(failures.map((error) => (error as Error).message).sort(), ['a handler bug', 'an async handler bug']);
    // Another plugin's events are not this one's.
    assert.equal(await client.call('example', 'emit', { name: 'other', data: {} }), true);
    await burst(1);
    await eventually(() => ticks.length === 5, 'the fifth tick');
    assert.deepEqual(everything.length, 5);
    await events.destroy();
  });

  test('emit publishes a host event and waits for the ack; the plugin answers it', async () => {
    const example = client.plugin('example');
    const pongs: unknown[] = [];
    example.on('pong', (data) => {
      pongs.push(data);
    });
    await example.start();
    await example.emit('ping', { k: 1 });
    await eventually(() => pongs.length === 1, 'the pong');
    assert.deepEqual(pongs, [{ k: 1 }]);
    await example.destroy();

    const ghost = client.plugin('ghost');
    const refused = await ghost.emit('ping', {}).then(
      () => assert.fail('published to no plugin'),
      (error: unknown) => error,
    );
    assert.ok(refused instanceof PluginNotFound, String(refused));
    await ghost.destroy();
  });

  test('a cut connection resumes from the last event handed on: nothing missed, nothing twice', async () => {
    const relay = new Relay(() => gateway.port);
    const relayed = new GatewayClient({ url: await relay.listen(), events: fast });
    try {
      const events = relayed.plugin('events');
      const ticks = collect(events);
      await events.start();
      await burst(5);
      await eventually(() => ticks.length === 5, 'the first five');
      relay.refusing = true;
      relay.cut();
      await burst(7); // emitted while the client is away
      await new Promise((done) => setTimeout(done, 200));
      relay.refusing = false;
      await eventually(() => ticks.length === 12, 'the seven emitted while away');
      await burst(3); // and live again
      await eventually(() => ticks.length === 15, 'three live after the resume');
      const ids = ticks.map((tick) => tick.id);
      const first = ids[0] ?? 0;
      assert.deepEqual(ids, Array.from({ length: 15 }, (_, index) => first + index));
      assert.ok((events.eventStream?.connections ?? 0) >= 2, 'the connection was never replaced');
      await events.destroy();
    } finally {
      await relay.close();
    }
  });

  test('a new client resumes from the resume point a stopped one kept: what came between arrives', async () => {
    const first = client.plugin('events');
    const seen = collect(first);
    await first.start();
    await burst(2);
    await eventually(() => seen.length === 2, 'two ticks');
    await first.destroy();
    const point = first.resumePoint;
    assert.ok(point !== undefined && point.lastEventId === seen[1]?.id && typeof point.stream === 'string');

    await burst(3); // while no one listens
    const other = new GatewayClient({ url: gateway.url, timeoutMs: 15_000, events: fast });
    const second = other.plugin('events', { resumeFrom: point });
    const ticks = collect(second);
    await second.start();
    await eventually(() => ticks.length === 3, 'the three ticks emitted between');
    assert.deepEqual(ticks.map((tick) => tick.n), [0, 1, 2]);
    assert.equal(ticks[0]?.id, point.lastEventId + 1);
    await second.destroy();
    await other.close();
  });

  test('a resume past the gateway ring is told as a gap, and the events after it arrive', async () => {
    const relay = new Relay(() => gateway.port);
    const relayed = new GatewayClient({ url: await relay.listen(), events: fast });
    try {
      const events = relayed.plugin('events');
      const ticks = collect(events);
      const gaps: Gap[] = [];
      events.onGap((gap) => gaps.push(gap));
      await events.start();
      await burst(2);
      await eventually(() => ticks.length === 2, 'two ticks');
      const lastSeen = ticks[1]?.id ?? 0;
      relay.refusing = true;
      relay.cut();
      await burst(1200); // the ring keeps the newest 1000
      relay.refusing = false;
      await eventually(() => gaps.length === 1 && ticks.length === 1002, 'the gap and the ring replayed', 30_000);
      assert.deepEqual(gaps, [{ after: lastSeen, resumedAt: lastSeen + 201 }]);
      assert.equal(ticks[2]?.id, lastSeen + 201);
      assert.equal(ticks.at(-1)?.id, lastSeen + 1200);
      await events.destroy();
    } finally {
      await relay.close();
    }
  });

  test('across a gateway restart on the same port: reconnects, resubscribes, gets every later event once', async () => {
    const events = client.plugin('events');
    const ticks = collect(events);
    const gaps: Gap[] = [];
    events.onGap((gap) => gaps.push(gap));
    await events.start();
    await burst(3);
    await eventually(() => ticks.length === 3, 'three ticks before the restart');
    await gateway.restart();
    // Emitted before the client is back: the new gateway's ids start again at 1, and the
    // resume must not skip them for having ids below the last one seen.
    await burst(2);
    await eventually(() => ticks.length === 5, 'the two emitted before the client came back');
    await burst(2);
    await eventually(() => ticks.length === 7, 'two live after the restart');
    assert.deepEqual(ticks.map((tick) => tick.n), [0, 1, 2, 0, 1, 0, 1]);
    assert.deepEqual(ticks.slice(3).map((tick) => tick.id), [1, 2, 3, 4]);
    assert.deepEqual(gaps, []);
    // Calls go to the new process as well.
    assert.equal(await client.call('echo', 'withdraw', { amount: 1 }), 99);
    await events.destroy();
  });
});
