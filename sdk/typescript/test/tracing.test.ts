/**
 * Tracing's switch: off without an OTLP endpoint, and then OpenTelemetry is not even
 * loaded. The spans themselves (parent, attributes, export over OTLP/HTTP to a real
 * receiver) are checked end to end by tests/test_telemetry_tracing.py.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { Tracing, tracesEndpoint } from '@linchkit/plugin-sdk';
import { MALFORMED_COLLECTOR, collectorShown } from '#internal/tracing';

const plugin = { id: 'example', version: '1.0.0' };

test('no endpoint, no tracing, and OpenTelemetry stays unloaded', () => {
  assert.equal(Tracing.fromEnv({}, plugin), undefined);
  assert.equal(Tracing.fromEnv({ OTEL_EXPORTER_OTLP_ENDPOINT: 'http://127.0.0.1:9', OTEL_SDK_DISABLED: 'true' }, plugin), undefined);
  const loaded = Object.keys(require.cache).filter((file) => file.includes('@opentelemetry'));
  assert.deepEqual(loaded, []);
});

test('the traces endpoint follows the OTel variables', () => {
  assert.equal(tracesEndpoint({ OTEL_EXPORTER_OTLP_ENDPOINT: 'http://collector:4318/' }), 'http://collector:4318/v1/traces');
  assert.equal(
    tracesEndpoint({ OTEL_EXPORTER_OTLP_ENDPOINT: 'http://a:4318', OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: 'http://b:9/traces' }),
    'http://b:9/traces',
  );
  assert.equal(tracesEndpoint({}), undefined);
});

test('a line names the collector by scheme://host:port only, never its credentials, path or query', () => {
  const cases: [string, string][] = [
    ['http://127.0.0.1:4318/v1/traces', 'http://127.0.0.1:4318'],
    ['https://user:pass@collector.example:443/v1/traces?k=v', 'https://collector.example:443'],
    ['http://user:p@ss@collector.example:80/v1/traces', 'http://collector.example:80'],
    ['HTTP://collector.example/v1/traces#frag', 'http://collector.example'],
    ['http://[::1]:4318/v1/traces', 'http://[::1]:4318'],
    [' http://collector.example:4318 ', 'http://collector.example:4318'],
    ['collector.example:4318', MALFORMED_COLLECTOR],
    ['http://user:pass@/v1/traces', MALFORMED_COLLECTOR],
    ['http://collector.example:port/', MALFORMED_COLLECTOR],
    ['', MALFORMED_COLLECTOR],
  ];
  for (const [url, shown] of cases) assert.equal(collectorShown(url), shown, url);
});
