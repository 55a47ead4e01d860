/**
 * Traced calls over WebSocket, both ways the plugin speaks it (its own server the
 * dispatcher dials, and `dial` to the gateway): each call and each stream runs in one
 * SERVER span `linchkit.plugin/<method>`, child of the attempt, as over gRPC; a stream's
 * span lasts until its last chunk and ends with its outcome; a malformed traceparent starts
 * a new trace; an untraced plugin makes no span. The spans are kept in memory
 * (`Tracing.withExporter`); the OTLP export is tested end to end by
 * tests/test_telemetry_tracing.py. Its own file: the provider registers itself globally.
 */
import assert from 'node:assert/strict';
import { once } from 'node:events';
import type { AddressInfo } from 'node:net';
import { test } from 'node:test';
import { SpanKind, SpanStatusCode, trace } from '@opentelemetry/api';
import { InMemorySpanExporter, type ReadableSpan } from '@opentelemetry/sdk-trace-base';
import { WebSocket, WebSocketServer } from 'ws';
import { Plugin, PluginError, Tracing, WebSocketPluginServer, dial } from '@linchkit/plugin-sdk';
import { type Frame, Frames } from './ws-frames';

const TRACE = '4bf92f3577b34da6a3ce929d0e0e4736';
const ATTEMPT = '00f067aa0ba902b7';
const TRACEPARENT = `00-${TRACE}-${ATTEMPT}-01`;

/** What each method saw of the active span: the call's, so the author's spans nest under it. */
const activeIn = new Map<string, string | undefined>();

function tracedPlugin(): Plugin {
  return new Plugin({ id: 'example', version: '1.0.0' })
    .method('echo', async (params) => {
      await new Promise((resolve) => setTimeout(resolve, 2)); // the context survives an await
      activeIn.set('echo', trace.getActiveSpan()?.spanContext().spanId);
      return params;
    })
    .streamingMethod('count', async function* () {
      for (let i = 0; i < 3; i++) {
        await new Promise((resolve) => setTimeout(resolve, 1));
        activeIn.set('count', trace.getActiveSpan()?.spanContext().spanId);
        yield { i };
      }
    })
    .streamingMethod('breaks', async function* () {
      yield 1;
      throw new PluginError('Overdrawn', 'balance is 100');
    });
}

function request(kind: 'call' | 'stream', id: number, method: string, context: Record<string, unknown>): string {
  return JSON.stringify({ type: kind, id, request: { v: 1, plugin: 'example', method, params: { n: id }, context } });
}

/** Send a call, a stream and a failing stream as the host; the frames each got back. */
async function exercise(host: WebSocket, frames: Frames): Promise<Frame[][]> {
  const longId = 'r'.repeat(300);
  host.send(request('call', 1, 'echo', { request_id: 'r1', traceparent: TRACEPARENT }));
  const call = await frames.until(1);
  host.send(request('stream', 2, 'count', { request_id: 'r2', traceparent: TRACEPARENT }));
  const stream = await frames.until(2);
  host.send(request('stream', 3, 'breaks', { request_id: longId, traceparent: 'garbage' }));
  const broken = await frames.until(3);
  return [call, stream, broken];
}

function checkSpans(spans: ReadableSpan[], answers: Frame[][]): void {
  const [call, stream, broken] = answers as [Frame[], Frame[], Frame[]];
  assert.deepEqual(call.at(-1)?.response, { ok: true, result: { n: 1 } });
  assert.deepEqual(stream.map((frame) => frame.type), ['chunk', 'chunk', 'chunk', 'response']);
  assert.equal((broken.at(-1)?.response as { error: { type: string } }).error.type, 'Overdrawn');

  assert.equal(spans.length, 3, `spans: ${spans.map((span) => span.name).join(', ')}`);
  const [echo, count, breaks] = spans as [ReadableSpan, ReadableSpan, ReadableSpan];
  for (const [span, method, requestId] of [
    [echo, 'echo', 'r1'],
    [count, 'count', 'r2'],
    [breaks, 'breaks', 'r'.repeat(128)],
  ] as const) {
    assert.equal(span.name, `linchkit.plugin/${method}`);
    assert.equal(span.kind, SpanKind.SERVER);
    assert.equal(span.attributes['linchkit.method'], method);
    assert.equal(span.attributes['linchkit.plugin'], 'example');
    assert.equal(span.attributes['linchkit.request_id'], requestId);
  }
  for (const span of [echo, count]) {
    assert.equal(span.spanContext().traceId, TRACE);
    assert.equal(span.parentSpanContext?.spanId, ATTEMPT);
    assert.equal(span.parentSpanContext?.isRemote, true);
    assert.equal(span.attributes['linchkit.outcome'], 'ok');
    assert.equal(span.attributes['error.type'], undefined);
    assert.notEqual(span.status.code, SpanStatusCode.ERROR);
  }
  // The method ran with its call's span active, across awaits and a stream's steps.
  assert.equal(activeIn.get('echo'), echo.spanContext().spanId);
  assert.equal(activeIn.get('count'), count.spanContext().spanId);
  // A malformed traceparent: a root of a new trace, and the stream's error recorded.
  assert.equal(breaks.parentSpanContext, undefined);
  assert.notEqual(breaks.spanContext().traceId, TRACE);
  assert.equal(breaks.attributes['linchkit.outcome'], 'Overdrawn');
  assert.equal(breaks.attributes['error.type'], 'Overdrawn');
  assert.equal(breaks.status.code, SpanStatusCode.ERROR);
  assert.equal(breaks.status.message, 'balance is 100');
}

const exporter = new InMemorySpanExporter();
const tracing = Tracing.withExporter(exporter, { id: 'example', version: '1.0.0' });

test('served over WebSocket, a call and a stream each run in their span', async () => {
  exporter.reset();
  activeIn.clear();
  const server = new WebSocketPluginServer(tracedPlugin(), undefined, tracing);
  const address = await server.listen('127.0.0.1:0');
  const host = new WebSocket(`ws://${address}/`);
  const frames = new Frames(host);
  try {
    assert.equal((await frames.next()).type, 'hello');
    checkSpans(exporter.getFinishedSpans(), await exercise(host, frames));
  } finally {
    host.close();
    await server.close(1_000);
  }
});

test('dialled to the gateway, a call and a stream each run in their span', async () => {
  exporter.reset();
  activeIn.clear();
  const gateway = new WebSocketServer({ host: '127.0.0.1', port: 0 });
  await once(gateway, 'listening');
  const accepted = once(gateway, 'connection') as Promise<[WebSocket]>;
  const stopping = new AbortController();
  const url = `ws://127.0.0.1:${(gateway.address() as AddressInfo).port}/v1/plugins/connect`;
  const dialling = dial(tracedPlugin(), url, { signal: stopping.signal, tracing, graceMs: 1_000 });
  const [host] = await accepted;
  const frames = new Frames(host);
  try {
    assert.equal((await frames.next()).type, 'hello');
    host.send(JSON.stringify({ type: 'welcome' }));
    checkSpans(exporter.getFinishedSpans(), await exercise(host, frames));
  } finally {
    stopping.abort();
    host.close();
    await dialling;
    gateway.close();
  }
});

test('an untraced plugin makes no span over WebSocket, and its methods see none', async () => {
  exporter.reset();
  activeIn.clear();
  assert.equal(Tracing.fromEnv({}, { id: 'example', version: '1.0.0' }), undefined); // no variables: off
  const server = new WebSocketPluginServer(tracedPlugin(), undefined);
  const address = await server.listen('127.0.0.1:0');
  const host = new WebSocket(`ws://${address}/`);
  const frames = new Frames(host);
  try {
    assert.equal((await frames.next()).type, 'hello');
    const [call, stream] = await exercise(host, frames);
    assert.equal(call?.at(-1)?.type, 'response');
    assert.equal(stream?.length, 4);
    assert.deepEqual(exporter.getFinishedSpans(), []);
    assert.equal(activeIn.get('echo'), undefined);
    assert.equal(activeIn.get('count'), undefined);
  } finally {
    host.close();
    await server.close(1_000);
  }
});
