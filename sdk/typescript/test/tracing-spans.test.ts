/**
 * Traced calls in process: the call's span is active while the method runs (across
 * awaits), so the author's spans nest under it in the dispatcher's trace; a malformed
 * traceparent starts a new trace; a graceful stop sends the spans over OTLP/HTTP to a real
 * local receiver. (The receiver decodes nothing here: tests/test_telemetry_tracing.py
 * decodes what the example plugin sends.) Its own file: tracing.test.ts checks that an
 * untraced process never loads OpenTelemetry.
 */
import assert from 'node:assert/strict';
import { EventEmitter, once } from 'node:events';
import * as http from 'node:http';
import type { AddressInfo } from 'node:net';
import { test } from 'node:test';
import * as grpc from '@grpc/grpc-js';
import { trace } from '@opentelemetry/api';
import { Plugin, PluginServer, Tracing } from '@linchkit/plugin-sdk';
import type { CallReplyMessage } from '#internal/server';

const TRACE = '4bf92f3577b34da6a3ce929d0e0e4736';
const ATTEMPT = '00f067aa0ba902b7';

function answer(server: PluginServer, method: string, traceparent: string): Promise<CallReplyMessage> {
  // What answer() reads of a grpc-js call: its deadline, metadata and 'cancelled'.
  const call = Object.assign(new EventEmitter(), { getDeadline: () => Infinity, metadata: new grpc.Metadata() });
  const context = { request_id: 'r1', deadline_ms: 0, caller: '', traceparent, idempotency_key: '' };
  return server.answer({ v: 1, plugin: 'p', method, params_json: Buffer.from('{}'), context }, call as never);
}

test('a traced call nests the author’s spans and is exported at shutdown', async () => {
  const bodies: Array<{ type: string | undefined; size: number }> = [];
  const receiver = http.createServer((request, response) => {
    let size = 0;
    request.on('data', (chunk: Buffer) => (size += chunk.length));
    request.on('end', () => {
      bodies.push({ type: request.headers['content-type'], size });
      response.writeHead(200, { 'content-type': 'application/x-protobuf' }).end();
    });
  });
  receiver.listen(0, '127.0.0.1');
  await once(receiver, 'listening');
  const port = (receiver.address() as AddressInfo).port;
  try {
    const plugin = new Plugin({ id: 'p', version: '1.0.0' });
    plugin.method('nest', async () => {
      await new Promise((resolve) => setTimeout(resolve, 2)); // the context survives an await
      const call = trace.getActiveSpan()!.spanContext();
      return trace.getTracer('author').startActiveSpan('inner', (span) => {
        span.end();
        return { call: call.spanId, trace: call.traceId, innerTrace: span.spanContext().traceId };
      });
    });
    const tracing = Tracing.fromEnv({ OTEL_EXPORTER_OTLP_ENDPOINT: `http://127.0.0.1:${port}` }, plugin);
    assert.ok(tracing);
    const server = new PluginServer(plugin, { servingFromStart: true, tracing });

    const traced = await answer(server, 'nest', `00-${TRACE}-${ATTEMPT}-01`);
    assert.equal(traced.ok, true);
    const seen = JSON.parse(traced.result_json!.toString());
    assert.equal(seen.trace, TRACE);
    assert.equal(seen.innerTrace, TRACE);
    assert.notEqual(seen.call, ATTEMPT); // the plugin's own span, child of the attempt

    for (const malformed of ['garbage', `00-${'0'.repeat(32)}-${'0'.repeat(16)}-01`, 'x'.repeat(100_000)]) {
      const reply = await answer(server, 'nest', malformed);
      assert.equal(reply.ok, true, malformed.slice(0, 20));
      assert.notEqual(JSON.parse(reply.result_json!.toString()).trace, TRACE);
    }

    await tracing.shutdown();
    assert.ok(bodies.length >= 1, 'the buffered spans were sent at shutdown');
    assert.ok(bodies.every((body) => body.type === 'application/x-protobuf' && body.size > 0));
  } finally {
    receiver.close();
  }
});
