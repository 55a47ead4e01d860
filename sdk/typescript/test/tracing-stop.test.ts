/**
 * A stop with tracing on and a collector that accepts and never answers: the spans still
 * buffered get what remains of the hooks' cap (1 s at least, SPAN_FLUSH_MARGIN_MS), so the
 * plugin exits within grace + hooks + that margin after SIGTERM, not 5 s past the
 * operator's caps (where a container may be killed). The spans are dropped then, with one
 * warning naming the collector by scheme://host:port only, as every SDK names it: never the
 * password or query of its URL, nor its headers.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import * as net from 'node:net';
import { test } from 'node:test';
import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import { SPAN_FLUSH_MARGIN_MS } from '#internal/serve';
import { protoPath } from '#internal/server';
import { STOP_GRACE_ENV, STOP_HOOKS_ENV } from '#internal/stopcaps';
import { ENV, PLUGIN } from './cli-support';

const SECRET = 's3cret-collector-token';

test('a silent collector keeps the stop within grace + hooks + the flush margin, and is named when the spans are dropped', async () => {
  const held: net.Socket[] = [];
  const silent = net.createServer((socket) => held.push(socket)); // accepts, never answers
  silent.listen(0, '127.0.0.1');
  await once(silent, 'listening');
  const shown = `http://127.0.0.1:${(silent.address() as net.AddressInfo).port}`;
  const collector = `http://collector:${SECRET}@${shown.slice('http://'.length)}/v1/traces?key=${SECRET}`;
  const plugin = spawn(PLUGIN, ['serve', '--address', '127.0.0.1:0'], {
    env: {
      ...ENV,
      OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: collector,
      OTEL_EXPORTER_OTLP_TRACES_HEADERS: `authorization=Bearer%20${SECRET}`,
      [STOP_GRACE_ENV]: '0',
      [STOP_HOOKS_ENV]: '0',
    },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stderr = '';
  plugin.stderr!.setEncoding('utf8').on('data', (text: string) => (stderr += text));
  let client: any;
  try {
    const [first] = (await once(plugin.stdout!, 'data')) as [Buffer];
    const address = first.toString().split('\n')[0]!.split('|')[3]!;
    const definition = grpc.loadPackageDefinition(
      protoLoader.loadSync(protoPath(), { keepCase: true, longs: Number, defaults: true, oneofs: true }),
    ) as any;
    client = new definition.linchkit.plugin.v1.PluginService(address, grpc.credentials.createInsecure());
    // One span buffered for the flush at the stop.
    await new Promise<void>((resolve, reject) =>
      client.Call(
        { v: 1, plugin: 'example', method: 'echo', params_json: Buffer.from('{}'), context: { request_id: 'r1' } },
        { deadline: Date.now() + 30_000 },
        (error: Error | null) => (error ? reject(error) : resolve()),
      ),
    );
    const began = Date.now();
    const exited = once(plugin, 'exit');
    plugin.kill('SIGTERM');
    const timeout = setTimeout(() => plugin.kill('SIGKILL'), 30_000);
    const [code] = (await exited) as [number | null];
    clearTimeout(timeout);
    const took = Date.now() - began;
    assert.equal(code, 0);
    // The margin is 1 s; the rest is slack for a slow machine, well short of the old 5 s.
    assert.ok(took < SPAN_FLUSH_MARGIN_MS + 2_500, `the stop took ${took} ms with a silent collector`);
    if (!plugin.stderr!.readableEnded) await once(plugin.stderr!, 'end');
    const dropped = stderr.split('\n').filter((line) => line.includes('spans dropped'));
    assert.equal(dropped.length, 1, stderr);
    const line = dropped[0]!;
    assert.match(line, / WARN linchkit plugin: spans dropped at the stop: /);
    assert.ok(line.includes(`the trace collector at ${shown} did not take them within the 1 s`), line);
    for (const hidden of ['/v1/traces', '?', 'collector@']) assert.ok(!line.includes(hidden), line);
    assert.ok(!stderr.includes(SECRET), stderr);
  } finally {
    client?.close();
    if (plugin.exitCode === null) plugin.kill('SIGKILL');
    for (const socket of held) socket.destroy();
    silent.close();
  }
});
