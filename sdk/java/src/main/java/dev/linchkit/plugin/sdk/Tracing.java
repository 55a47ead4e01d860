package dev.linchkit.plugin.sdk;

import io.opentelemetry.api.GlobalOpenTelemetry;
import io.opentelemetry.api.OpenTelemetry;
import io.opentelemetry.api.common.AttributeKey;
import io.opentelemetry.api.common.Attributes;
import io.opentelemetry.api.common.AttributesBuilder;
import io.opentelemetry.api.trace.Span;
import io.opentelemetry.api.trace.SpanBuilder;
import io.opentelemetry.api.trace.SpanKind;
import io.opentelemetry.api.trace.StatusCode;
import io.opentelemetry.api.trace.Tracer;
import io.opentelemetry.api.trace.TracerProvider;
import io.opentelemetry.api.trace.propagation.W3CTraceContextPropagator;
import io.opentelemetry.context.Context;
import io.opentelemetry.context.Scope;
import io.opentelemetry.context.propagation.ContextPropagators;
import io.opentelemetry.context.propagation.TextMapGetter;
import io.opentelemetry.exporter.otlp.http.trace.OtlpHttpSpanExporter;
import io.opentelemetry.exporter.otlp.http.trace.OtlpHttpSpanExporterBuilder;
import io.opentelemetry.sdk.common.CompletableResultCode;
import io.opentelemetry.sdk.resources.Resource;
import io.opentelemetry.sdk.trace.SdkTracerProvider;
import io.opentelemetry.sdk.trace.data.SpanData;
import io.opentelemetry.sdk.trace.export.BatchSpanProcessor;
import io.opentelemetry.sdk.trace.export.BatchSpanProcessorBuilder;
import io.opentelemetry.sdk.trace.export.SpanExporter;
import io.opentelemetry.sdk.trace.samplers.Sampler;
import java.io.IOException;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.Collection;
import java.util.List;
import java.util.concurrent.Callable;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicBoolean;
import java.util.concurrent.atomic.AtomicReference;
import java.util.logging.Level;
import java.util.logging.Logger;

/**
 * Continues the dispatcher's trace inside the plugin: the one file of the SDK that uses
 * OpenTelemetry (docs/observability.md, "Java plugins").
 *
 * <p>The dispatcher sends each attempt's W3C {@code traceparent} in the call's context (and gRPC
 * metadata). When the plugin's environment names an OTLP endpoint ({@link OtlpSettings}), each
 * call runs inside a SERVER span {@code linchkit.plugin/<method>}, child of the attempt span,
 * with the attributes {@code linchkit.method}, {@code linchkit.plugin},
 * {@code linchkit.request_id} and {@code linchkit.outcome} ({@code ok} or the error's type; a
 * failure adds {@code error.type} and an error status). Spans are batched and sent over OTLP/HTTP
 * (protobuf) through the JDK's HttpClient, so a call never waits on the collector. The method
 * runs with the span current ({@link Context#makeCurrent()} on its thread), so spans its author
 * starts nest under it; the provider is also made the global one ({@link GlobalOpenTelemetry})
 * unless the plugin set its own.
 *
 * <p>Which calls record a span is {@code OTEL_TRACES_SAMPLER}'s to say ({@link OtlpSettings.Sampling}),
 * {@code parentbased_always_on} by default: a call whose dispatcher did not sample it records no
 * span, and the method sees its span's sampled flag unset.
 *
 * <p>A collector that does not take the spans is said once per outage, in one line naming it by
 * {@code scheme://host:port} ({@link Reporting}); OpenTelemetry's own record of each failed
 * batch (logger {@link #OTLP_EXPORTER_LOGGER}, SEVERE, with a stack) is not shown unless the
 * plugin's logging configuration gives that logger a level.
 *
 * <p>Without those variables this class is never initialised, and no OpenTelemetry class is
 * loaded: a call pays one null check. A missing or malformed traceparent starts a new trace and
 * never fails the call (the W3C rule is to ignore what cannot be parsed).
 *
 * <p>A stop sends the spans still buffered after the plugin's hooks, for what remains of the
 * hooks' cap or {@link #SPAN_FLUSH_MARGIN_MS} when less remains ({@link #flushWithin}): a
 * collector that accepts and never answers keeps the stop within grace + hooks + 1 s. The spans
 * it did not take are dropped then, with one warning naming the collector by
 * {@code scheme://host:port} only, never the exporter's headers nor a password in its URL.
 */
final class Tracing {
  /**
   * The least a stop gives the spans still buffered, after its hooks: what remains of the hooks'
   * cap, or this when less remains, as in every SDK (docs/protocol.md, "Stopping while called").
   */
  static final long SPAN_FLUSH_MARGIN_MS = 1000;

  /** A W3C traceparent is 55 characters; anything far longer is not one and is not parsed. */
  static final int MAX_TRACEPARENT = 512;

  /** How much of a request id a span keeps, and of an error's message its status. */
  static final int MAX_REQUEST_ID = 128;
  static final int MAX_STATUS_MESSAGE = 512;

  // Span attribute keys, shared with the dispatcher's and the other SDKs' spans.
  static final AttributeKey<String> METHOD = AttributeKey.stringKey("linchkit.method");
  static final AttributeKey<String> PLUGIN = AttributeKey.stringKey("linchkit.plugin");
  static final AttributeKey<String> REQUEST_ID = AttributeKey.stringKey("linchkit.request_id");
  static final AttributeKey<String> OUTCOME = AttributeKey.stringKey("linchkit.outcome");
  static final AttributeKey<String> ERROR_TYPE = AttributeKey.stringKey("error.type");

  /** The logger OpenTelemetry's OTLP/HTTP exporter says each failed batch to. */
  static final String OTLP_EXPORTER_LOGGER = "io.opentelemetry.exporter.otlp.internal.HttpExporter";

  /**
   * That logger, held: {@code java.util.logging} keeps loggers weakly, and one collected would
   * come back without the level set here.
   */
  private static final Logger OTLP_EXPORTER = Logger.getLogger(OTLP_EXPORTER_LOGGER);

  /** Reads the one header a traceparent is: the dispatcher sends no tracestate. */
  private static final TextMapGetter<String> TRACEPARENT = new TextMapGetter<>() {
    @Override
    public Iterable<String> keys(String traceparent) {
      return List.of("traceparent");
    }

    @Override
    public String get(String traceparent, String key) {
      return "traceparent".equals(key) ? traceparent : null;
    }
  };

  private final SdkTracerProvider provider;
  private final Tracer tracer;
  private final String pluginId;
  /** The collector as a warning names it: scheme://host:port. */
  private final String collectorShown;

  Tracing(SdkTracerProvider provider, String pluginId, String collectorShown) {
    this.provider = provider;
    this.tracer = provider.get("linchkit.plugin");
    this.pluginId = pluginId;
    this.collectorShown = collectorShown;
  }

  /**
   * Span export as {@code settings} asks, for {@code plugin}; null, with a warning, when the
   * exporter cannot be made (a URL it refuses, a certificate file it cannot read): tracing is an
   * aid, not the plugin's job, so the plugin serves untraced rather than not at all.
   */
  static Tracing exporting(OtlpSettings settings, Plugin plugin) {
    quietExporterLog();
    OtlpHttpSpanExporterBuilder exporter = OtlpHttpSpanExporter.builder();
    try {
      exporter.setEndpoint(settings.endpoint());
    } catch (IllegalArgumentException notUsable) {
      // Its message quotes the URL, which may hold a password: not shown.
      Log.SDK.warning("serving without tracing: the trace collector's URL (" + settings.collectorShown()
          + ") is not an http:// or https:// URL");
      return null;
    }
    try {
      settings.headers().forEach(exporter::addHeader);
      if (settings.timeoutMs() != null) exporter.setTimeout(settings.timeoutMs(), TimeUnit.MILLISECONDS);
      if (settings.compression() != null) exporter.setCompression(settings.compression());
      if (settings.certificateFile() != null) exporter.setTrustedCertificates(read(settings.certificateFile()));
      if (settings.clientKeyFile() != null || settings.clientCertificateFile() != null) {
        if (settings.clientKeyFile() == null || settings.clientCertificateFile() == null) {
          Log.SDK.warning("serving without tracing: a client key for the trace collector at " + settings.collectorShown()
              + " needs its certificate, and a certificate its key (OTEL_EXPORTER_OTLP_CLIENT_KEY,"
              + " OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE)");
          return null;
        }
        exporter.setClientTls(read(settings.clientKeyFile()), read(settings.clientCertificateFile()));
      }
      BatchSpanProcessorBuilder batches =
          BatchSpanProcessor.builder(new Reporting(exporter.build(), settings.collectorShown()));
      if (settings.scheduleDelayMs() != null) batches.setScheduleDelay(settings.scheduleDelayMs(), TimeUnit.MILLISECONDS);
      if (settings.exportTimeoutMs() != null) batches.setExporterTimeout(settings.exportTimeoutMs(), TimeUnit.MILLISECONDS);
      if (settings.maxQueueSize() != null) batches.setMaxQueueSize(settings.maxQueueSize());
      if (settings.maxExportBatchSize() != null) batches.setMaxExportBatchSize(settings.maxExportBatchSize());
      SdkTracerProvider provider = SdkTracerProvider.builder()
          .setResource(Resource.getDefault().merge(Resource.create(resource(settings, plugin))))
          .setSampler(sampler(settings.sampling()))
          .addSpanProcessor(batches.build())
          .build();
      makeGlobal(provider);
      return new Tracing(provider, plugin.id(), settings.collectorShown());
    } catch (IOException | RuntimeException broken) { // InvalidPathException: a path it cannot take
      // What the library says (a certificate it cannot use, a file not found), never the URL.
      String said = String.valueOf(broken.getMessage()).replace(settings.endpoint(), settings.collectorShown());
      Log.SDK.warning("serving without tracing: no span exporter for the trace collector at "
          + settings.collectorShown() + ": " + Errors.namedClass(broken.getClass()) + ": " + said);
      return null;
    }
  }

  /**
   * OpenTelemetry's exporter logs each batch a collector did not take at SEVERE, a stack of 30
   * lines with it, five a minute: a collector down for an hour fills a plugin's stderr (a
   * subprocess plugin's host logs each line again). {@link Reporting} says it once per outage
   * instead. Only that logger is quieted, and only when the plugin's logging configuration gave
   * it no level of its own: a plugin that asks for those records gets them.
   */
  static void quietExporterLog() {
    if (OTLP_EXPORTER.getLevel() == null) OTLP_EXPORTER.setLevel(Level.OFF);
  }

  /** OpenTelemetry's sampler for {@code sampling}. */
  static Sampler sampler(OtlpSettings.Sampling sampling) {
    Sampler root = switch (sampling.root()) {
      case ALWAYS_ON -> Sampler.alwaysOn();
      case ALWAYS_OFF -> Sampler.alwaysOff();
      case TRACE_ID_RATIO -> Sampler.traceIdRatioBased(sampling.ratio());
    };
    return sampling.parentBased() ? Sampler.parentBased(root) : root;
  }

  /**
   * The exporter, and one line per outage of its collector: the first batch it does not take
   * says so (a WARNING naming the collector by {@code scheme://host:port} and the failure's class,
   * never its message, which may quote the URL), and the next one it takes says how many spans
   * were dropped meanwhile (INFO), as the Rust SDK says them.
   */
  static final class Reporting implements SpanExporter {
    private final SpanExporter exporter;
    private final String collectorShown;
    /** Spans dropped since the collector last took a batch; -1 while it takes them. */
    private long lost = -1;

    Reporting(SpanExporter exporter, String collectorShown) {
      this.exporter = exporter;
      this.collectorShown = collectorShown;
    }

    @Override
    public CompletableResultCode export(Collection<SpanData> spans) {
      CompletableResultCode result = exporter.export(spans);
      int count = spans.size();
      result.whenComplete(() -> {
        if (result.isSuccess()) {
          taken();
        } else {
          dropped(count, result.getFailureThrowable());
        }
      });
      return result;
    }

    private synchronized void taken() {
      if (lost < 0) return;
      Log.SDK.info("the trace collector at " + collectorShown + " takes spans again; " + lost
          + " were dropped while it did not");
      lost = -1;
    }

    private synchronized void dropped(int count, Throwable failure) {
      if (lost >= 0) {
        lost += count;
        return;
      }
      lost = count;
      Log.SDK.warning("could not send " + count + " spans to the trace collector at " + collectorShown
          + (failure == null ? "" : " (" + Errors.namedClass(reason(failure).getClass()) + ")")
          + "; they are dropped, and so are later ones until it takes them again");
    }

    /** What went wrong: the exporter's failure wraps it (a ConnectException, a timeout), if anything. */
    private static Throwable reason(Throwable failure) {
      return failure.getCause() != null ? failure.getCause() : failure;
    }

    @Override
    public CompletableResultCode flush() {
      return exporter.flush();
    }

    @Override
    public CompletableResultCode shutdown() {
      return exporter.shutdown();
    }

    @Override
    public synchronized String toString() {
      return "Reporting[collector=" + collectorShown + ", lost=" + Math.max(lost, 0) + "]";
    }
  }

  private static byte[] read(String file) throws IOException {
    return Files.readAllBytes(Path.of(file));
  }

  /**
   * The plugin's resource: {@code OTEL_RESOURCE_ATTRIBUTES}, then {@code service.name} as
   * {@link OtlpSettings} found it and {@code service.version} the plugin's unless set there.
   */
  private static Attributes resource(OtlpSettings settings, Plugin plugin) {
    AttributesBuilder attributes = Attributes.builder();
    settings.resourceAttributes().forEach(attributes::put);
    attributes.put("service.name", settings.serviceName());
    if (!settings.resourceAttributes().containsKey("service.version")) {
      attributes.put("service.version", plugin.version());
    }
    return attributes.build();
  }

  /**
   * The global OpenTelemetry is this provider's, so a tracer the author takes from it exports
   * with the plugin's spans; unless the plugin set one of its own first, which stays.
   */
  private static void makeGlobal(SdkTracerProvider provider) {
    ContextPropagators propagators = ContextPropagators.create(W3CTraceContextPropagator.getInstance());
    try {
      GlobalOpenTelemetry.set(new OpenTelemetry() {
        @Override
        public TracerProvider getTracerProvider() {
          return provider;
        }

        @Override
        public ContextPropagators getPropagators() {
          return propagators;
        }
      });
    } catch (IllegalStateException alreadySet) {
      // The plugin's own setup: the calls' spans still go to the collector the variables name.
    }
  }

  /**
   * The context a call's span continues: the trace {@code traceparent} names, or the root (a new
   * trace) when it is missing, too long to be one, or malformed.
   */
  static Context parentOf(String traceparent) {
    if (traceparent == null || traceparent.isEmpty() || traceparent.length() > MAX_TRACEPARENT) return Context.root();
    // extract leaves the context as it was when traceparent is malformed: the span is then a root.
    return W3CTraceContextPropagator.getInstance().extract(Context.root(), traceparent, TRACEPARENT);
  }

  /** Opens the span of the call {@code call} describes, continuing its traceparent when valid. */
  CallSpan start(CallContext call) {
    Context parent = parentOf(call.traceparent());
    SpanBuilder builder = tracer.spanBuilder("linchkit.plugin/" + call.method())
        .setParent(parent)
        .setSpanKind(SpanKind.SERVER)
        .setAttribute(METHOD, call.method())
        .setAttribute(PLUGIN, pluginId);
    if (call.requestId() != null && !call.requestId().isEmpty()) {
      builder.setAttribute(REQUEST_ID, truncated(call.requestId(), MAX_REQUEST_ID));
    }
    Span span = builder.startSpan();
    return new CallSpan(span, parent.with(span));
  }

  /** One call's span: the method runs {@link #within} it; {@link #end} records how it ended, once. */
  static final class CallSpan {
    private final Span span;
    private final Context context;
    private final AtomicBoolean ended = new AtomicBoolean();

    private CallSpan(Span span, Context context) {
      this.span = span;
      this.context = context;
    }

    /** {@code body} with the span current on this thread. */
    <T> T within(Callable<T> body) throws Exception {
      try (Scope scope = context.makeCurrent()) {
        return body.call();
      }
    }

    /**
     * Ends the span with the outcome its caller got: {@code ok} for a null {@code failure},
     * else the error's type, as {@code error.type} too, and an error status with its message.
     * Only the first call counts: a deadline and the method's own end may race.
     */
    void end(dev.linchkit.plugin.v1.Error failure) {
      if (!ended.compareAndSet(false, true)) return;
      if (failure == null) {
        span.setAttribute(OUTCOME, "ok");
      } else {
        span.setAttribute(OUTCOME, failure.getType());
        span.setAttribute(ERROR_TYPE, failure.getType());
        span.setStatus(StatusCode.ERROR, truncated(failure.getMessage(), MAX_STATUS_MESSAGE));
      }
      span.end();
    }
  }

  /**
   * Sends the spans still buffered and shuts the provider down, waiting {@code ms} at most: a
   * stop's last step. True when they were sent (or none was left); false when the collector did
   * not take them: they are dropped, with one warning naming the collector by
   * {@code scheme://host:port}, and the sending goes on in a daemon thread, which does not keep
   * the JVM from exiting. The warning goes straight to stderr ({@link Log#atExit}): a stop may
   * run in a shutdown hook, alongside {@code LogManager}'s reset.
   */
  boolean flushWithin(long ms) {
    CountDownLatch done = new CountDownLatch(1);
    AtomicReference<CompletableResultCode> result = new AtomicReference<>();
    Thread flush = new Thread(() -> {
      CompletableResultCode shutdown = provider.shutdown();
      result.set(shutdown);
      shutdown.whenComplete(done::countDown);
    }, "linchkit-span-flush");
    flush.setDaemon(true);
    flush.start();
    boolean finished = false;
    try {
      finished = done.await(ms, TimeUnit.MILLISECONDS);
    } catch (InterruptedException interrupted) {
      Thread.currentThread().interrupt();
    }
    if (finished && result.get().isSuccess()) return true;
    Log.atExit(Level.WARNING, "spans dropped at the stop: the trace collector at " + collectorShown
        + (finished ? " did not take them" : " did not take them within the " + StopCaps.seconds(ms)
            + " s the stop's caps left") + "; check that it is up and answers", null);
    return false;
  }

  /**
   * {@link #flushWithin} for what remains of the hooks' cap, {@code hooksLeftMs}, or
   * {@link #SPAN_FLUSH_MARGIN_MS} when less remains.
   */
  boolean flushAtStop(long hooksLeftMs) {
    return flushWithin(Math.max(hooksLeftMs, SPAN_FLUSH_MARGIN_MS));
  }

  /** {@code text} cut to at most {@code limit} chars, never between the two halves of a surrogate pair. */
  static String truncated(String text, int limit) {
    if (text.length() <= limit) return text;
    int end = Character.isHighSurrogate(text.charAt(limit - 1)) ? limit - 1 : limit;
    return text.substring(0, end);
  }

  @Override
  public String toString() {
    return "Tracing[plugin=" + pluginId + ", collector=" + collectorShown + "]";
  }
}
