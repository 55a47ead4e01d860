/**
 * Continues the dispatcher's trace inside the plugin.
 *
 * The dispatcher sends each attempt's W3C `traceparent` in the call context (and gRPC
 * metadata). When the plugin's environment names an OTLP endpoint
 * (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, else `OTEL_EXPORTER_OTLP_ENDPOINT` + `/v1/traces`),
 * each call runs inside a SERVER span `linchkit.plugin/<method>`, child of the attempt
 * span, exported over OTLP/HTTP (protobuf). The method runs with that span active
 * (AsyncLocalStorage), so spans the author starts with `@opentelemetry/api` nest under it.
 *
 * Without those variables nothing is loaded: OpenTelemetry's packages are required here,
 * on demand, never at import, so an untraced plugin pays neither their load time nor a
 * cost per call (the server checks one `undefined`). If they are missing from the
 * plugin's install, it says so once and serves untraced. A missing or malformed
 * traceparent starts a new trace, never fails the call (W3C: ignore what cannot be parsed).
 *
 * A stop sends the spans still buffered for what remains of the hooks' cap, or 1 s when less
 * remains (`flushWithin`, serve.ts): a collector that accepts the connection and never
 * answers must not keep the plugin past grace + hooks + that margin. The spans it could not
 * send are dropped then, with one warning that names the collector by scheme://host:port
 * only (`collectorShown`), as every SDK names it: never the userinfo, path or query of its
 * URL, nor the exporter's headers.
 *
 * Spans go through `CollectorTransport` (collector.ts): the collector's URL as written, its
 * query and user too, each request bounded, and one line when the collector stops taking
 * spans and one when it takes them again. They go as http/protobuf only: an
 * `OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL` asking for another is said once (`protocolWarning`).
 * The sampler is `OTEL_TRACES_SAMPLER` and `_ARG` read here (`samplerFrom`), as
 * OpenTelemetry's SDKs read them; one that cannot be used is said in one warning, as every
 * SDK says it, where OpenTelemetry would tell its diagnostics (off) and nobody.
 */
import type * as Api from '@opentelemetry/api';
import type * as Core from '@opentelemetry/core';
import type * as Resources from '@opentelemetry/resources';
import type * as TraceBase from '@opentelemetry/sdk-trace-base';
import type * as TraceNode from '@opentelemetry/sdk-trace-node';
import { collectorExporter, protocolWarning } from './collector';
import { toWireError } from './errors';
import { log } from './log';
import type { CallContext } from './plugin';

export const OTLP_ENDPOINT_ENV = 'OTEL_EXPORTER_OTLP_ENDPOINT';
export const OTLP_TRACES_ENDPOINT_ENV = 'OTEL_EXPORTER_OTLP_TRACES_ENDPOINT';

/** A W3C traceparent is 55 characters; anything far longer is not one and is not parsed. */
const MAX_TRACEPARENT = 512;

/** The OTLP/HTTP traces URL the environment names, or undefined. */
export function tracesEndpoint(env: NodeJS.ProcessEnv): string | undefined {
  if ((env.OTEL_SDK_DISABLED ?? '').toLowerCase() === 'true') return undefined;
  // The signal-specific variable is the full URL, as the OTel specification says.
  if (env[OTLP_TRACES_ENDPOINT_ENV]) return env[OTLP_TRACES_ENDPOINT_ENV];
  const base = env[OTLP_ENDPOINT_ENV];
  return base ? `${base.replace(/\/+$/, '')}/v1/traces` : undefined;
}

export const SAMPLER_ENV = 'OTEL_TRACES_SAMPLER';
export const SAMPLER_ARG_ENV = 'OTEL_TRACES_SAMPLER_ARG';

/** A sampler as `OTEL_TRACES_SAMPLER` names it: whether it follows a parent's flag, and its root's decision. */
export interface SamplerChoice {
  parentBased: boolean;
  root: 'always_on' | 'always_off' | { ratio: number };
  /** Why a variable was not used (the fallback is then in use); undefined when both were. */
  warning?: string;
}

/** `text` for a warning: quoted, its control characters escaped, cut to 40 characters. */
function quoted(text: string): string {
  const cut = [...text].slice(0, 40).join('');
  return `${JSON.stringify(cut)}${cut.length < text.length ? '…' : ''}`;
}

/** A ratio as OTel's SDKs write it: a decimal number (an exponent allowed). */
const RATIO = /^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$/;

/**
 * The sampler `OTEL_TRACES_SAMPLER` and `_ARG` name, as OpenTelemetry's SDKs read them: none
 * is `parentbased_always_on`, as is an unknown one (with a warning); the ratio of
 * `traceidratio` and `parentbased_traceidratio` is `_ARG`, 1 when unset, and 1 with a
 * warning when it is no number from 0 to 1. The values are quoted, cut short, in the
 * warning: they name a sampler or a ratio, never a credential.
 */
export function samplerFrom(env: NodeJS.ProcessEnv): SamplerChoice {
  const name = (env[SAMPLER_ENV] ?? '').trim().toLowerCase();
  const roots: Record<string, [boolean, 'always_on' | 'always_off' | 'traceidratio']> = {
    '': [true, 'always_on'],
    parentbased_always_on: [true, 'always_on'],
    parentbased_always_off: [true, 'always_off'],
    parentbased_traceidratio: [true, 'traceidratio'],
    always_on: [false, 'always_on'],
    always_off: [false, 'always_off'],
    traceidratio: [false, 'traceidratio'],
  };
  const known = roots[name];
  if (known === undefined) {
    return {
      parentBased: true,
      root: 'always_on',
      warning:
        `${SAMPLER_ENV} must be always_on, always_off, traceidratio, parentbased_always_on, parentbased_always_off ` +
        `or parentbased_traceidratio, not ${quoted(name)}; using parentbased_always_on`,
    };
  }
  const [parentBased, root] = known;
  if (root !== 'traceidratio') return { parentBased, root };
  const arg = (env[SAMPLER_ARG_ENV] ?? '').trim();
  if (arg === '') return { parentBased, root: { ratio: 1 } };
  const ratio = RATIO.test(arg) ? Number(arg) : NaN;
  if (ratio >= 0 && ratio <= 1) return { parentBased, root: { ratio } };
  return { parentBased, root: { ratio: 1 }, warning: `${SAMPLER_ARG_ENV} must be a ratio from 0 to 1, not ${quoted(arg)}; using 1.0` };
}

/** OpenTelemetry's sampler for `choice`. */
function samplerOf(base: typeof TraceBase, choice: SamplerChoice): TraceBase.Sampler {
  const root =
    choice.root === 'always_on'
      ? new base.AlwaysOnSampler()
      : choice.root === 'always_off'
        ? new base.AlwaysOffSampler()
        : new base.TraceIdRatioBasedSampler(choice.root.ratio);
  return choice.parentBased ? new base.ParentBasedSampler({ root }) : root;
}

/** What a line says of a collector URL it cannot take apart. */
export const MALFORMED_COLLECTOR = '(its URL is malformed)';

/** `scheme://` and the authority, as written: the port is shown when the URL gives one. */
const SCHEME_AND_AUTHORITY = /^([A-Za-z][A-Za-z0-9+.-]*):\/\/([^/?#]*)/;

/**
 * The collector a log line may name: scheme://host[:port], the port when the URL gives one
 * (as the other SDKs name it). Never the userinfo, path or query of `url`: they may hold a
 * password or a token.
 */
export function collectorShown(url: string): string {
  const written = SCHEME_AND_AUTHORITY.exec(url.trim());
  let parsed: URL;
  try {
    parsed = new URL(url.trim());
  } catch {
    return MALFORMED_COLLECTOR; // its message quotes the URL: not shown either
  }
  if (written === null || parsed.hostname === '') return MALFORMED_COLLECTOR;
  const hostAndPort = (written[2] as string).slice((written[2] as string).lastIndexOf('@') + 1);
  const port = /:(\d+)$/.exec(hostAndPort)?.[1];
  // WHATWG's hostname keeps an IPv6 address's brackets, and leaves out a port that is the
  // scheme's default, which the URL gave nonetheless.
  return `${(written[1] as string).toLowerCase()}://${parsed.hostname}${port === undefined ? '' : `:${Number(port)}`}`;
}

/** One call's span: run the method `within` it, then `end` it with what it threw, if it failed. */
export interface CallSpan {
  within<T>(fn: () => T): T;
  end(failure?: { thrown: unknown }): void;
}

/** The plugin's tracer and the provider that exports its spans. */
export class Tracing {
  private readonly propagator: Core.W3CTraceContextPropagator;

  private constructor(
    private readonly api: typeof Api,
    core: typeof Core,
    private readonly provider: TraceNode.NodeTracerProvider,
    private readonly tracer: Api.Tracer,
    private readonly pluginId: string,
    /** The collector as a log line may name it (`collectorShown`). */
    private readonly collector: string,
  ) {
    this.propagator = new core.W3CTraceContextPropagator();
  }

  /** Tracing as `env` asks for it, or undefined (off: no endpoint, or no OpenTelemetry). */
  static fromEnv(env: NodeJS.ProcessEnv, plugin: { id: string; version: string }): Tracing | undefined {
    const url = tracesEndpoint(env);
    if (url === undefined) return undefined;
    let base: typeof TraceBase;
    try {
      require('@opentelemetry/otlp-exporter-base');
      require('@opentelemetry/otlp-transformer');
      base = require('@opentelemetry/sdk-trace-base');
      // Loaded here too, so that a missing one is said once and the plugin serves untraced.
      require('@opentelemetry/api');
      require('@opentelemetry/core');
      require('@opentelemetry/resources');
      require('@opentelemetry/sdk-trace-node');
    } catch (error) {
      log.warn(
        `${OTLP_ENDPOINT_ENV} is set but OpenTelemetry is not installed ` +
          `(${(error as Error).message.split('\n')[0]}): serving without tracing`,
      );
      return undefined;
    }
    const sampling = samplerFrom(env);
    if (sampling.warning !== undefined) log.warn(sampling.warning); // once: read once, at start
    const collector = collectorShown(url);
    const protocol = protocolWarning(env, collector);
    if (protocol !== undefined) log.warn(protocol); // once: read once, at start
    // Batched, so a call never waits on the collector; OTEL_BSP_* tune it. The exporter
    // reads OTEL_EXPORTER_OTLP_HEADERS and its timeouts itself.
    return Tracing.exportingTo(
      new base.BatchSpanProcessor(collectorExporter(url, collector)),
      env.OTEL_SERVICE_NAME || plugin.id,
      plugin,
      collector,
      samplerOf(base, sampling),
    );
  }

  /**
   * @internal Tracing that hands each span to `exporter` as it ends, the environment unread:
   * for tests, which look at the spans in process (the OTLP export is tested end to end).
   */
  static withExporter(exporter: TraceBase.SpanExporter, plugin: { id: string; version: string }): Tracing {
    const base: typeof TraceBase = require('@opentelemetry/sdk-trace-base');
    return Tracing.exportingTo(new base.SimpleSpanProcessor(exporter), plugin.id, plugin, '(in process)');
  }

  private static exportingTo(
    processor: TraceBase.SpanProcessor,
    service: string,
    plugin: { id: string; version: string },
    collector: string,
    sampler?: TraceBase.Sampler,
  ): Tracing {
    const api: typeof Api = require('@opentelemetry/api');
    const core: typeof Core = require('@opentelemetry/core');
    const resources: typeof Resources = require('@opentelemetry/resources');
    const node: typeof TraceNode = require('@opentelemetry/sdk-trace-node');
    const resource = resources.defaultResource().merge(
      resources.resourceFromAttributes({ 'service.name': service, 'service.version': plugin.version }),
    );
    const provider = new node.NodeTracerProvider({ resource, spanProcessors: [processor], ...(sampler ? { sampler } : {}) });
    // Global, with the AsyncLocalStorage context manager: the author's own tracer (the
    // API's `trace.getTracer`) sees the call's span as active and nests under it.
    provider.register();
    return new Tracing(api, core, provider, provider.getTracer('linchkit.plugin'), plugin.id, collector);
  }

  /** Open the span of a call, continuing `ctx.traceparent` when it is a valid one. */
  begin(ctx: CallContext): CallSpan {
    const api = this.api;
    let parent = api.ROOT_CONTEXT;
    if (ctx.traceparent && ctx.traceparent.length <= MAX_TRACEPARENT) {
      // A malformed value leaves the context empty: the span is then a root.
      parent = this.propagator.extract(parent, { traceparent: ctx.traceparent }, api.defaultTextMapGetter);
    }
    const attributes: Api.Attributes = { 'linchkit.method': ctx.method, 'linchkit.plugin': this.pluginId };
    if (ctx.requestId) attributes['linchkit.request_id'] = ctx.requestId.slice(0, 128);
    const span = this.tracer.startSpan(
      `linchkit.plugin/${ctx.method}`,
      { kind: api.SpanKind.SERVER, attributes },
      parent,
    );
    const active = api.trace.setSpan(parent, span);
    return {
      within: (fn) => api.context.with(active, fn),
      end: (failure) => {
        if (failure === undefined) {
          span.setAttribute('linchkit.outcome', 'ok');
        } else {
          const wire = toWireError(failure.thrown);
          span.setAttributes({ 'linchkit.outcome': wire.type, 'error.type': wire.type });
          span.setStatus({ code: api.SpanStatusCode.ERROR, message: wire.message.slice(0, 512) });
        }
        span.end();
      },
    };
  }

  /** Send the spans still buffered and shut the provider down, however long the exporter takes. */
  async shutdown(): Promise<void> {
    try {
      await this.provider.shutdown();
    } catch (error) {
      log.warn(`tracing: could not send the last spans to the trace collector at ${this.collector}: ${String(error)}`);
    }
  }

  /**
   * Send the spans still buffered and shut the provider down, `withinMs` at most: a stop's
   * last step, after the calls drained and the hooks ran. True when they were sent (or there
   * was nothing to send); false when they were dropped, said in one warning naming the
   * collector (the sending goes on unawaited: the process may exit without it).
   */
  async flushWithin(withinMs: number): Promise<boolean> {
    let timer: NodeJS.Timeout | undefined;
    const late = new Promise<'late'>((resolve) => {
      timer = setTimeout(() => resolve('late'), withinMs).unref();
    });
    const sent = this.provider.shutdown().then(
      () => 'sent' as const,
      (error: unknown) => error,
    );
    try {
      const outcome = await Promise.race([sent, late]);
      if (outcome === 'sent') return true;
      if (outcome === 'late') {
        log.warn(
          `spans dropped at the stop: the trace collector at ${this.collector} did not take them within the ` +
            `${Math.round(withinMs / 100) / 10} s the stop's caps left; check that it is up and answers`,
        );
      } else {
        // The exporter's words, which do not quote its URL (nor its headers).
        const said = outcome instanceof Error ? outcome.message : String(outcome);
        log.warn(`spans dropped at the stop: sending them to the trace collector at ${this.collector} failed: ${said.split('\n')[0]}`);
      }
      return false;
    } finally {
      clearTimeout(timer);
    }
  }
}
