/**
 * Events of a plugin rolling out, two versions emitting at once: a plugin pinned to a
 * version (`client.plugin(id, {version})`) hears that version only, through a real
 * `dispatcher serve`; an unpinned one hears both. And against a gateway older than the
 * subscription's `version` (it ignores the field and sends every version's events): a
 * stand-in WebSocket server speaking that older protocol, since no older gateway runs here.
 */

import assert from 'node:assert/strict';
import { AddressInfo } from 'node:net';
import { after, before, describe, test } from 'node:test';

import { WebSocketServer } from 'ws';

import { GatewayClient, PluginEvent, RemotePlugin } from '../src';
import { eventually, Gateway } from './gateway';

function heard(plugin: RemotePlugin): PluginEvent[] {
  const events: PluginEvent[] = [];
  plugin.on('tick', (_data, event) => {
    events.push(event);
  });
  return events;
}

const idsAndVersions = (events: PluginEvent[]): [number, string | undefined][] =>
  events.map((event) => [event.id, event.version]);

describe('events of a pinned version', () => {
  const gateway = new Gateway({ twoEventVersions: true });
  let client: GatewayClient;
  before(async () => {
    await gateway.start();
    client = new GatewayClient({ url: gateway.url, timeoutMs: 15_000, events: { initialDelayMs: 50, maxDelayMs: 400 } });
  });
  after(() => gateway.close());

  test('a plugin pinned to a version hears that version only; an unpinned one hears both', async () => {
    const first = client.plugin('events', { version: '1.0.0' });
    const second = client.plugin('events', { version: '2.0.0' });
    const every = client.plugin('events');
    const [heardFirst, heardSecond, heardEvery] = [heard(first), heard(second), heard(every)];
    await Promise.all([first.start(), second.start(), every.start()]);
    // Ids 1-2 from 1.0.0, 3-5 from 2.0.0, 6 from 1.0.0, 7 from 2.0.0 (pinned calls go to
    // their version): each pinned plugin's last event marks the end of what it hears.
    for (const [plugin, count] of [
      [first, 2],
      [second, 3],
      [first, 1],
      [second, 1],
    ] as const) {
      await plugin.call('burst', { name: 'tick', count });
    }
    await eventually(() => heardEvery.length === 7, 'all seven events unpinned');
    await eventually(() => heardFirst.some((event) => event.id === 6), "1.0.0's last event");
    await eventually(() => heardSecond.some((event) => event.id === 7), "2.0.0's last event");
    assert.deepEqual(idsAndVersions(heardFirst), [
      [1, '1.0.0'],
      [2, '1.0.0'],
      [6, '1.0.0'],
    ]);
    assert.deepEqual(idsAndVersions(heardSecond), [
      [3, '2.0.0'],
      [4, '2.0.0'],
      [5, '2.0.0'],
      [7, '2.0.0'],
    ]);
    assert.deepEqual(
      heardEvery.map((event) => event.version),
      ['1.0.0', '1.0.0', '2.0.0', '2.0.0', '2.0.0', '1.0.0', '2.0.0'],
    );
    await Promise.all([first.destroy(), second.destroy(), every.destroy()]);
  });
});

describe('events of a pinned version from a gateway that ignores the version filter', () => {
  let server: WebSocketServer;
  const subscriptions: unknown[] = [];
  before(async () => {
    server = new WebSocketServer({ host: '127.0.0.1', port: 0 });
    server.on('connection', (socket) => {
      socket.on('message', (data) => {
        const frame = JSON.parse(data.toString()) as { type: string; filters?: unknown };
        if (frame.type !== 'subscribe') return;
        subscriptions.push(frame.filters);
        // As an older gateway: the filter's version unread, both versions' events sent.
        socket.send(JSON.stringify({ type: 'subscribed', last_event_id: 0, stream: 'older-gateway' }));
        for (const [id, version] of [
          [1, '1.0.0'],
          [2, '2.0.0'],
          [3, '1.0.0'],
        ] as const) {
          socket.send(JSON.stringify({ type: 'event', id, plugin: 'events', version, event: 'tick', data: { n: id } }));
        }
      });
    });
    await new Promise<void>((listening) => server.once('listening', () => listening()));
  });
  after(async () => {
    for (const socket of server.clients) socket.terminate();
    await new Promise((closed) => server.close(closed));
  });

  test("the pinned plugin asks for its version, and drops another version's events itself", async () => {
    const { port } = server.address() as AddressInfo;
    const client = new GatewayClient({ url: `http://127.0.0.1:${port}` });
    const pinned = client.plugin('events', { version: '1.0.0' });
    const heardPinned = heard(pinned);
    await pinned.start();
    await eventually(() => heardPinned.some((event) => event.id === 3), 'the third event');
    assert.deepEqual(idsAndVersions(heardPinned), [
      [1, '1.0.0'],
      [3, '1.0.0'],
    ]);
    assert.equal(pinned.lastEventId, 3); // a resume does not ask for the dropped one again
    await pinned.destroy();

    // Unpinned, or pinned to a range (its calls go to the highest version in it): no
    // exact version to hear, so every version's events.
    for (const unpinned of [client.plugin('events'), client.plugin('events', { version: '1.x' })]) {
      const heardUnpinned = heard(unpinned);
      await unpinned.start();
      await eventually(() => heardUnpinned.length === 3, `all three events for ${unpinned}`);
      await unpinned.destroy();
    }
    assert.deepEqual(subscriptions, [
      [{ plugin: 'events', version: '1.0.0' }],
      [{ plugin: 'events' }],
      [{ plugin: 'events' }],
    ]);
  });
});
