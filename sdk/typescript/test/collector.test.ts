/**
 * How spans reach the collector (collector.ts) and which sampler the variables name
 * (tracing.ts `samplerFrom`): a real HTTP server on port 0 as the collector, answering as
 * it is told to; OpenTelemetry's real exporter in front of it.
 */
import assert from 'node:assert/strict';
import { once } from 'node:events';
import * as http from 'node:http';
import type { AddressInfo } from 'node:net';
import { test } from 'node:test';
import { CollectorTransport, MAX_ANSWER_BYTES, collectorExporter, protocolWarning } from '#internal/collector';
import { Logger } from '#internal/log';
import { collectorShown, samplerFrom } from '#internal/tracing';

const SECRET = 's3cret-collector-token';

interface Seen {
  url: string;
  authorization: string | undefined;
  bytes: number;
}

/** A collector on port 0 answering each request with `answer` (the number of the request, from 0). */
async function collector(answer: (index: number, response: http.ServerResponse) => void): Promise<{ port: number; seen: Seen[]; close: () => void }> {
  const seen: Seen[] = [];
  const server = http.createServer((request, response) => {
    let bytes = 0;
    request.on('data', (chunk: Buffer) => (bytes += chunk.length));
    request.on('end', () => {
      seen.push({ url: request.url ?? '', authorization: request.headers.authorization, bytes });
      answer(seen.length - 1, response);
    });
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  return {
    port: (server.address() as AddressInfo).port,
    seen,
    close: () => {
      server.closeAllConnections();
      server.close();
    },
  };
}

/** A logger keeping its lines. */
function lines(): { logger: Logger; said: string[] } {
  const said: string[] = [];
  return { logger: new Logger('linchkit plugin', (line) => said.push(line)), said };
}

/** The exporter's configuration as OpenTelemetry's transport gets it, headers `headers`. */
function configuration(headers: Record<string, string> = {}): ConstructorParameters<typeof CollectorTransport>[2] {
  return {
    url: 'unused',
    headers: async () => headers,
    compression: 'none',
    timeoutMillis: 2000,
    concurrencyLimit: 30,
    agentFactory: () => new http.Agent({ keepAlive: true }),
  } as unknown as ConstructorParameters<typeof CollectorTransport>[2];
}

test('an outage is said once, its end once, naming the collector by scheme://host:port only', async () => {
  const statuses = [500, 500, 400, 200, 200, 503];
  const peer = await collector((index, response) => {
    response.statusCode = statuses[index] ?? 200;
    response.end();
  });
  const { logger, said } = lines();
  try {
    const url = `http://user:${SECRET}@127.0.0.1:${peer.port}/v1/traces?key=${SECRET}`;
    const transport = new CollectorTransport(url, collectorShown(url), configuration(), logger);
    const outcomes = [];
    for (let i = 0; i < 5; i++) outcomes.push((await transport.send(new Uint8Array([1, 2, 3]), 2000)).status);
    assert.deepEqual(outcomes, ['failure', 'failure', 'failure', 'success', 'success']);
    assert.equal(said.length, 2, said.join(''));
    assert.match(said[0]!, new RegExp(`WARN linchkit plugin: spans are not reaching the trace collector at http://127.0.0.1:${peer.port}: it answered 500\\. `));
    assert.match(said[1]!, new RegExp(`the trace collector at http://127.0.0.1:${peer.port} takes spans again\\n$`));
    for (const line of said) for (const hidden of [SECRET, '/v1/traces', '?', 'user@']) assert.ok(!line.includes(hidden), line);
    // The URL as written reached the collector: its path and query, its user as basic authentication.
    assert.equal(peer.seen[0]!.url, `/v1/traces?key=${SECRET}`);
    assert.equal(peer.seen[0]!.authorization, `Basic ${Buffer.from(`user:${SECRET}`).toString('base64')}`);
    transport.shutdown();
  } finally {
    peer.close();
  }
});

test('a header that sets authorization wins over the URL user; a redirect is not followed', async () => {
  const peer = await collector((_index, response) => {
    response.statusCode = 302;
    response.setHeader('location', 'http://elsewhere.example/');
    response.end();
  });
  const { logger, said } = lines();
  try {
    const url = `http://user:pw@127.0.0.1:${peer.port}/v1/traces`;
    const transport = new CollectorTransport(url, collectorShown(url), configuration({ Authorization: 'Bearer from-headers' }), logger);
    assert.equal((await transport.send(new Uint8Array([1]), 2000)).status, 'failure');
    assert.equal(peer.seen.length, 1);
    assert.equal(peer.seen[0]!.authorization, 'Bearer from-headers');
    assert.equal(said.length, 1);
    assert.match(said[0]!, /it answered 302, a redirect, which is not followed/);
    transport.shutdown();
  } finally {
    peer.close();
  }
});

test('an endless answer is cut, a silent collector ends at the timeout, a dead one is said in words', async () => {
  const peer = await collector((index, response) => {
    if (index === 0) {
      response.write(Buffer.alloc(MAX_ANSWER_BYTES * 4));
      return; // never ended
    }
    // never answered
  });
  try {
    const { logger, said } = lines();
    const url = `http://127.0.0.1:${peer.port}/v1/traces`;
    const transport = new CollectorTransport(url, collectorShown(url), configuration(), logger);
    const cut = await transport.send(new Uint8Array([1]), 5000);
    assert.equal(cut.status, 'failure');
    const began = Date.now();
    const silent = await transport.send(new Uint8Array([1]), 500);
    assert.ok(Date.now() - began < 5000, 'bounded by its timeout, retries included');
    assert.equal(silent.status, 'retryable');
    assert.equal(said.length, 1, said.join(''));
    assert.match(said[0]!, /it answered more than 65536 bytes/);
    transport.shutdown();
  } finally {
    peer.close();
  }
  const { logger, said } = lines();
  const url = `http://127.0.0.1:${peer.port}/v1/traces`;
  const dead = new CollectorTransport(url, collectorShown(url), configuration(), logger);
  await dead.send(new Uint8Array([1]), 300);
  assert.match(said[0] ?? '', /could not be reached \(connection refused\)/);
  dead.shutdown();
});

test("OpenTelemetry's exporter sends through the transport, to the URL as written", async () => {
  const peer = await collector((_index, response) => response.end());
  try {
    const url = `http://user:pw@127.0.0.1:${peer.port}/custom/traces?key=${SECRET}`;
    const exporter = collectorExporter(url, collectorShown(url), lines().logger);
    const base = require('@opentelemetry/sdk-trace-base');
    const provider = new base.BasicTracerProvider({ spanProcessors: [new base.SimpleSpanProcessor(exporter)] });
    provider.getTracer('t').startSpan('one').end();
    await provider.forceFlush();
    await provider.shutdown();
    assert.equal(peer.seen.length, 1);
    assert.equal(peer.seen[0]!.url, `/custom/traces?key=${SECRET}`);
    assert.ok(peer.seen[0]!.authorization?.startsWith('Basic '));
    assert.ok(peer.seen[0]!.bytes > 0);
  } finally {
    peer.close();
  }
});

test('OTEL_TRACES_SAMPLER and _ARG as OpenTelemetry reads them, one that cannot be used said in a warning', () => {
  assert.deepEqual(samplerFrom({}), { parentBased: true, root: 'always_on' });
  assert.deepEqual(samplerFrom({ OTEL_TRACES_SAMPLER: ' Always_Off ' }), { parentBased: false, root: 'always_off' });
  assert.deepEqual(samplerFrom({ OTEL_TRACES_SAMPLER: 'traceidratio' }), { parentBased: false, root: { ratio: 1 } });
  assert.deepEqual(samplerFrom({ OTEL_TRACES_SAMPLER: 'parentbased_traceidratio', OTEL_TRACES_SAMPLER_ARG: '0.25' }), {
    parentBased: true,
    root: { ratio: 0.25 },
  });
  assert.deepEqual(samplerFrom({ OTEL_TRACES_SAMPLER: 'always_on', OTEL_TRACES_SAMPLER_ARG: 'lots' }), { parentBased: false, root: 'always_on' });
  const unknown = samplerFrom({ OTEL_TRACES_SAMPLER: 'sometimes\n' });
  assert.deepEqual([unknown.parentBased, unknown.root], [true, 'always_on']);
  assert.match(unknown.warning ?? '', /^OTEL_TRACES_SAMPLER must be always_on, .* not "sometimes"; using parentbased_always_on$/);
  assert.ok((samplerFrom({ OTEL_TRACES_SAMPLER: 'x'.repeat(1000) }).warning ?? '').length < 300);
  for (const arg of ['lots', '1.5', '-0.1', 'NaN', 'inf', '0x1']) {
    const bad = samplerFrom({ OTEL_TRACES_SAMPLER: 'traceidratio', OTEL_TRACES_SAMPLER_ARG: arg });
    assert.deepEqual(bad.root, { ratio: 1 }, arg);
    assert.equal(bad.warning, `OTEL_TRACES_SAMPLER_ARG must be a ratio from 0 to 1, not ${JSON.stringify(arg)}; using 1.0`);
  }
});

test('a protocol other than http/protobuf is said, naming its variable and the collector', () => {
  const collector = 'http://127.0.0.1:4317';
  assert.equal(protocolWarning({}, collector), undefined);
  assert.equal(protocolWarning({ OTEL_EXPORTER_OTLP_PROTOCOL: ' http/protobuf ' }, collector), undefined);
  assert.equal(
    protocolWarning({ OTEL_EXPORTER_OTLP_PROTOCOL: 'grpc' }, collector),
    "OTEL_EXPORTER_OTLP_PROTOCOL is 'grpc', but this SDK sends spans as http/protobuf only (OTLP over HTTP); " +
      'sending them so to http://127.0.0.1:4317',
  );
  // The traces variable wins over the general one, either way.
  const traces = protocolWarning({ OTEL_EXPORTER_OTLP_PROTOCOL: 'http/protobuf', OTEL_EXPORTER_OTLP_TRACES_PROTOCOL: 'http/json' }, collector);
  assert.ok(traces?.startsWith("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL is 'http/json'"), traces);
  assert.equal(protocolWarning({ OTEL_EXPORTER_OTLP_PROTOCOL: 'grpc', OTEL_EXPORTER_OTLP_TRACES_PROTOCOL: 'http/protobuf' }, collector), undefined);
  // A blank traces variable is unset: the general one is read.
  assert.ok(protocolWarning({ OTEL_EXPORTER_OTLP_PROTOCOL: 'grpc', OTEL_EXPORTER_OTLP_TRACES_PROTOCOL: '  ' }, collector)?.startsWith('OTEL_EXPORTER_OTLP_PROTOCOL'));
  // An odd value is quoted cut to 40 characters, its control characters as '?'.
  const odd = protocolWarning({ OTEL_EXPORTER_OTLP_PROTOCOL: `grpc\n\u001b[31m${'x'.repeat(60)}` }, collector) ?? '';
  assert.ok(odd.startsWith(`OTEL_EXPORTER_OTLP_PROTOCOL is 'grpc??[31m${'x'.repeat(30)}…', but`), odd);
  assert.ok(!odd.includes('\n') && !odd.includes('\u001b'), odd);
});
