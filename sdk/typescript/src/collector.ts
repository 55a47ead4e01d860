/**
 * How spans reach the trace collector: OpenTelemetry's OTLP/HTTP (protobuf) exporter, sending
 * through `CollectorTransport`, the Python SDK's contract (linchkit_plugin/_collector_session.py)
 * in node's `http`/`https`. Every request it makes:
 *
 * - goes to the collector's URL as written: its query too (OpenTelemetry's own transport
 *   sends the path alone, and dropped a query holding the collector's key without a word),
 *   and its user and password as HTTP basic authentication, as the Python and Rust SDKs'
 *   exporters send them, unless `OTEL_EXPORTER_OTLP_*HEADERS` sets `authorization` itself;
 * - ends at its timeout (the exporter's, `OTEL_EXPORTER_OTLP_*TIMEOUT`), however the collector
 *   answers, reads at most `MAX_ANSWER_BYTES` of the answer, and follows no redirect;
 * - is tried again, as OpenTelemetry's transport tries it, after a 429, 502, 503 or 504 or a
 *   connection that failed, while the timeout leaves time;
 * - says an outage once: the first batch the collector does not take is one WARN line naming
 *   the collector by scheme://host:port (`collectorShown`) and what happened, never the
 *   URL's user, password, path or query nor a header; the first it takes again is one more.
 *   OpenTelemetry itself says nothing of either (its diagnostics are off).
 *
 * Spans go as http/protobuf only: an `OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL` asking for another
 * protocol (`grpc`, `http/json`) is said once at start (`protocolWarning`), in the words of the
 * Rust and Java SDKs, and the spans go as http/protobuf all the same.
 */
import { gzipSync } from 'node:zlib';
import type * as http from 'node:http';
import type * as ExporterBase from '@opentelemetry/otlp-exporter-base';
import type * as Transformer from '@opentelemetry/otlp-transformer';
import type * as TraceBase from '@opentelemetry/sdk-trace-base';
import { type Logger, log as sdkLog } from './log';

/** The most of a collector's answer that is read: an OTLP answer is a few bytes, a partial-success message at most. */
export const MAX_ANSWER_BYTES = 64 * 1024;
/** Tries of one batch at most, as OpenTelemetry's transport makes them. */
const MAX_ATTEMPTS = 5;
const INITIAL_BACKOFF_MS = 1000;
const MAX_BACKOFF_MS = 5000;

/** The one protocol this SDK sends spans in. */
const HTTP_PROTOBUF = 'http/protobuf';

/**
 * What to say when `OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL` (the traces one when set) asks for
 * another protocol than http/protobuf: the spans still go as http/protobuf to `collector` (as
 * `collectorShown` names it), so the operator who asked for `grpc` learns why a gRPC-only
 * collector port (4317) gets nothing. Undefined when neither asks for another.
 */
export function protocolWarning(env: NodeJS.ProcessEnv, collector: string): string | undefined {
  const traces = 'OTEL_EXPORTER_OTLP_TRACES_PROTOCOL';
  const general = 'OTEL_EXPORTER_OTLP_PROTOCOL';
  const tracesValue = (env[traces] ?? '').trim();
  const [name, value] = tracesValue !== '' ? [traces, tracesValue] : [general, (env[general] ?? '').trim()];
  if (value === '' || value === HTTP_PROTOBUF) return undefined;
  return `${name} is ${quoted(value)}, but this SDK sends spans as ${HTTP_PROTOBUF} only (OTLP over HTTP); sending them so to ${collector}`;
}

/** A value that is no secret as a warning quotes it: in single quotes, cut to 40 characters, control characters as `?`. */
function quoted(text: string): string {
  const characters = [...text];
  const shown = characters.slice(0, 40).join('').replace(/[\u0000-\u001f\u007f-\u009f]/g, '?');
  return `'${shown}${characters.length > 40 ? '…' : ''}'`;
}

type ExportResponse = ExporterBase.ExportResponse;
/** What OpenTelemetry's `convertLegacyHttpOptions` (`@opentelemetry/otlp-exporter-base/node-http`, a
 * subpath this package's module resolution does not type) gives: the exporter's configuration. */
interface Configuration extends ExporterBase.OtlpSharedConfiguration {
  headers(): Promise<Record<string, string>>;
  agentFactory(protocol: string): http.Agent | Promise<http.Agent>;
}
interface NodeHttp {
  convertLegacyHttpOptions(config: { url?: string }, signal: string, path: string, headers: Record<string, string>): Configuration;
}

/** What happened to a request the collector did not take, in words that quote no URL. */
function failureOf(error: NodeJS.ErrnoException): string {
  const code = error.code ?? '';
  const reasons: Record<string, string> = {
    ECONNREFUSED: 'could not be reached (connection refused)',
    ECONNRESET: 'could not be reached (connection reset)',
    EPIPE: 'could not be reached (connection reset)',
    EHOSTUNREACH: 'could not be reached (no route to host)',
    ENETUNREACH: 'could not be reached (network is unreachable)',
    ETIMEDOUT: 'could not be reached (connection timed out)',
    ENOTFOUND: 'could not be reached (its host name does not resolve)',
    EAI_AGAIN: 'could not be reached (its host name does not resolve)',
  };
  if (reasons[code] !== undefined) return reasons[code];
  if (/^(ERR_SSL_|ERR_TLS_|CERT_|UNABLE_TO_|DEPTH_ZERO|SELF_SIGNED)/.test(code)) return 'TLS failed (its certificate, or the CA the exporter trusts)';
  return `the request failed (${code || error.name || 'Error'})`;
}

/**
 * OpenTelemetry's transport of the OTLP exporter, as the module says: `url` is where spans
 * go (as the environment wrote it), `collector` how lines name it, `options` the exporter's
 * configuration (headers, compression, agent) as OpenTelemetry read it from the variables.
 */
export class CollectorTransport implements ExporterBase.IExporterTransport {
  /** The collector has not taken the last batch (said once, until it takes one). */
  private failing = false;
  private readonly target: URL;
  private readonly basic: string | undefined;
  private agent: http.Agent | undefined;

  constructor(
    url: string,
    readonly collector: string,
    private readonly options: Configuration,
    private readonly logger: Logger = sdkLog,
  ) {
    const parsed = new URL(url);
    this.basic =
      parsed.username === '' && parsed.password === ''
        ? undefined
        : `Basic ${Buffer.from(`${decodeURIComponent(parsed.username)}:${decodeURIComponent(parsed.password)}`).toString('base64')}`;
    parsed.username = '';
    parsed.password = '';
    this.target = parsed;
  }

  /** One batch: tried again after a retryable failure while `timeoutMillis` leaves time; the outcome said as the module says. */
  async send(data: Uint8Array, timeoutMillis: number): Promise<ExportResponse> {
    const deadline = Date.now() + timeoutMillis;
    let backoff = INITIAL_BACKOFF_MS;
    let response: ExportResponse = await this.once(data, timeoutMillis);
    for (let attempt = 1; attempt < MAX_ATTEMPTS && response.status === 'retryable'; attempt++) {
      const wait = response.retryInMillis ?? backoff * (0.8 + Math.random() * 0.4);
      backoff = Math.min(backoff * 1.5, MAX_BACKOFF_MS);
      const left = deadline - Date.now();
      if (wait < 0 || wait >= left) break;
      await new Promise((resolve) => setTimeout(resolve, wait).unref());
      response = await this.once(data, deadline - Date.now());
    }
    this.outcome(response.status === 'success' ? undefined : (response.error?.message ?? 'it did not take them'));
    return response;
  }

  shutdown(): void {
    this.agent?.destroy();
  }

  toString(): string {
    return `CollectorTransport(${this.collector}, ${this.failing ? 'failing' : 'taking spans'})`;
  }

  /** Says when the collector stops taking spans (`failure`: what happened) and when it takes them again. */
  private outcome(failure: string | undefined): void {
    if (failure !== undefined && !this.failing) {
      this.failing = true;
      this.logger.warn(
        `spans are not reaching the trace collector at ${this.collector}: ${failure}. Those sent until it takes them again are dropped (said once)`,
      );
    } else if (failure === undefined && this.failing) {
      this.failing = false;
      this.logger.warn(`the trace collector at ${this.collector} takes spans again`);
    }
  }

  private async once(data: Uint8Array, timeoutMillis: number): Promise<ExportResponse> {
    const headers: Record<string, string | number> = { ...(await this.options.headers()) };
    if (this.basic !== undefined && !Object.keys(headers).some((name) => name.toLowerCase() === 'authorization')) {
      headers.Authorization = this.basic;
    }
    headers['Accept-Encoding'] = 'identity'; // the answer is not read: no decoding
    let body = Buffer.from(data);
    if (this.options.compression === 'gzip') {
      body = gzipSync(body);
      headers['Content-Encoding'] = 'gzip';
    }
    headers['Content-Length'] = body.length;
    const secure = this.target.protocol === 'https:';
    this.agent ??= (await this.options.agentFactory(this.target.protocol)) as http.Agent;
    const { request }: typeof http = secure ? require('node:https') : require('node:http');
    return new Promise<ExportResponse>((resolve) => {
      let settled = false;
      const done = (response: ExportResponse): void => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        resolve(response);
      };
      const sent = request(
        this.target,
        { method: 'POST', headers, agent: this.agent },
        (answer) => {
          let size = 0;
          answer.on('data', (chunk: Buffer) => {
            size += chunk.length;
            if (size > MAX_ANSWER_BYTES) {
              done({ status: 'failure', error: new Error(`it answered more than ${MAX_ANSWER_BYTES} bytes`) });
              answer.destroy(); // not back to the pool: the rest of the answer is on it
            }
          });
          answer.on('error', () => undefined);
          answer.on('end', () => {
            const status = answer.statusCode ?? 0;
            if (status >= 200 && status <= 299) done({ status: 'success' });
            else if ([429, 502, 503, 504].includes(status)) {
              const after = Number.parseInt(String(answer.headers['retry-after'] ?? ''), 10);
              done({ status: 'retryable', retryInMillis: Number.isInteger(after) && after >= 0 ? after * 1000 : undefined, error: new Error(`it answered ${status}`) });
            } else if (status >= 300 && status <= 399) {
              done({ status: 'failure', error: new Error(`it answered ${status}, a redirect, which is not followed: point the exporter's endpoint at the collector itself`) });
            } else done({ status: 'failure', error: new Error(`it answered ${status}`) });
          });
        },
      );
      const timer = setTimeout(() => {
        done({ status: 'retryable', error: new Error(`it did not answer within ${Math.round(timeoutMillis / 100) / 10} s`) });
        sent.destroy();
      }, Math.max(0, timeoutMillis));
      sent.on('error', (error: NodeJS.ErrnoException) => done({ status: 'retryable', error: new Error(failureOf(error)) }));
      sent.end(body);
    });
  }
}

/**
 * OpenTelemetry's OTLP/HTTP (protobuf) span exporter for `url`, sending through a
 * `CollectorTransport`; the variables it reads itself (headers, timeout, compression) are
 * read as OpenTelemetry reads them.
 */
export function collectorExporter(url: string, collector: string, logger: Logger = sdkLog): TraceBase.SpanExporter {
  const base: typeof ExporterBase = require('@opentelemetry/otlp-exporter-base');
  const nodeHttp: NodeHttp = require('@opentelemetry/otlp-exporter-base/node-http');
  const transformer: typeof Transformer = require('@opentelemetry/otlp-transformer');
  const options = nodeHttp.convertLegacyHttpOptions({ url }, 'TRACES', 'v1/traces', { 'Content-Type': 'application/x-protobuf' });
  const transport = new CollectorTransport(url, collector, options, logger);
  return new base.OTLPExporterBase(base.createOtlpNetworkExportDelegate(options, transformer.ProtobufTraceSerializer, transport)) as TraceBase.SpanExporter;
}
