package dev.linchkit.plugin.sdk;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertNotEquals;
import static org.junit.jupiter.api.Assertions.assertNotNull;
import static org.junit.jupiter.api.Assertions.assertNull;
import static org.junit.jupiter.api.Assertions.assertTrue;

import com.google.protobuf.ByteString;
import com.sun.net.httpserver.HttpServer;
import dev.linchkit.plugin.v1.CallReply;
import dev.linchkit.plugin.v1.CallRequest;
import dev.linchkit.plugin.v1.PluginServiceGrpc;
import dev.linchkit.plugin.v1.StreamItem;
import io.grpc.ManagedChannel;
import io.grpc.Metadata;
import io.grpc.Server;
import io.grpc.netty.shaded.io.grpc.netty.NettyChannelBuilder;
import io.grpc.netty.shaded.io.grpc.netty.NettyServerBuilder;
import io.grpc.protobuf.services.HealthStatusManager;
import io.grpc.stub.MetadataUtils;
import io.opentelemetry.api.common.AttributeKey;
import io.opentelemetry.api.trace.Span;
import io.opentelemetry.api.trace.SpanContext;
import io.opentelemetry.api.trace.SpanKind;
import io.opentelemetry.api.trace.StatusCode;
import io.opentelemetry.sdk.common.CompletableResultCode;
import io.opentelemetry.sdk.trace.SdkTracerProvider;
import io.opentelemetry.sdk.trace.data.SpanData;
import io.opentelemetry.sdk.trace.export.SimpleSpanProcessor;
import io.opentelemetry.sdk.trace.export.SpanExporter;
import java.io.ByteArrayOutputStream;
import java.io.PrintStream;
import java.net.InetSocketAddress;
import java.net.ServerSocket;
import java.net.Socket;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.Collection;
import java.util.HashSet;
import java.util.Iterator;
import java.util.List;
import java.util.Map;
import java.util.Set;
import java.util.concurrent.CopyOnWriteArrayList;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicReference;
import java.util.logging.Handler;
import java.util.logging.LogRecord;
import org.junit.jupiter.api.AfterEach;
import org.junit.jupiter.api.Test;

/**
 * Each call's span: the trace it continues, its attributes and outcome, and what a stop says of
 * spans it could not send. Spans are kept in memory here; the OTLP export to a collector is
 * held end to end by tests/test_telemetry_tracing.py, and its bound at a stop by
 * tests/conformance/test_stop_with_a_silent_collector.py.
 */
class TracingTest {
  private static final String PARENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736";
  private static final String PARENT_SPAN = "00f067aa0ba902b7";
  private static final String TRACEPARENT = "00-" + PARENT_TRACE + "-" + PARENT_SPAN + "-01";
  private static final String SECRET = "s3cret-collector-token";

  /** The spans a provider ended, in memory. */
  private static final class Kept implements SpanExporter {
    final List<SpanData> spans = new CopyOnWriteArrayList<>();

    @Override
    public CompletableResultCode export(Collection<SpanData> batch) {
      spans.addAll(batch);
      return CompletableResultCode.ofSuccess();
    }

    @Override
    public CompletableResultCode flush() {
      return CompletableResultCode.ofSuccess();
    }

    @Override
    public CompletableResultCode shutdown() {
      return CompletableResultCode.ofSuccess();
    }

    /** The first {@code count} spans, waiting up to 10 s for them: a span ends as its reply completes. */
    List<SpanData> await(int count) throws InterruptedException {
      long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(10);
      while (spans.size() < count && System.nanoTime() < deadline) Thread.sleep(10);
      assertEquals(count, spans.size(), "spans: " + spans);
      return List.copyOf(spans);
    }
  }

  private final Kept kept = new Kept();
  private final SdkTracerProvider provider =
      SdkTracerProvider.builder().addSpanProcessor(SimpleSpanProcessor.create(kept)).build();
  private final List<Runnable> cleanups = new ArrayList<>();

  @AfterEach
  void cleanUp() {
    cleanups.forEach(Runnable::run);
    provider.shutdown().join(5, TimeUnit.SECONDS);
  }

  /** What the method saw as the current span. */
  private final AtomicReference<SpanContext> seen = new AtomicReference<>();

  private Plugin plugin() {
    return new Plugin("test", "1.0.0")
        .method("echo", (params, ctx) -> params)
        .method("sees", (params, ctx) -> {
          seen.set(Span.current().getSpanContext());
          return null;
        })
        .method("typed", (params, ctx) -> {
          throw new PluginException("Overdrawn", "the account is overdrawn", false);
        })
        .method("throws", (params, ctx) -> {
          throw new IllegalStateException("broken");
        })
        .streamingMethod("rows", (params, ctx, out) -> {
          seen.set(Span.current().getSpanContext());
          out.send(Map.of("row", 1));
          out.send(Map.of("row", 2));
        });
  }

  private PluginService service(Tracing tracing) {
    PluginService service = new PluginService(plugin(), new HealthStatusManager(), true, Serve.MAX_MESSAGE_BYTES, tracing);
    cleanups.add(service::close);
    return service;
  }

  private PluginService traced() {
    return service(new Tracing(provider, "test", "http://collector:4318"));
  }

  private static CallRequest request(String method, String traceparent) {
    CallRequest.Builder request = CallRequest.newBuilder().setV(1).setMethod(method)
        .setParamsJson(ByteString.copyFromUtf8("{\"n\": 1}"));
    request.getContextBuilder().setRequestId("r1").setTraceparent(traceparent);
    return request.build();
  }

  private static String attribute(SpanData span, String key) {
    return span.getAttributes().get(AttributeKey.stringKey(key));
  }

  @Test
  void aCallContinuesTheDispatchersTrace() throws Exception {
    CallReply reply = traced().answer(request("sees", TRACEPARENT)).get(30, TimeUnit.SECONDS);
    assertTrue(reply.getOk(), reply.toString());
    SpanData span = kept.await(1).get(0);
    assertEquals("linchkit.plugin/sees", span.getName());
    assertEquals(SpanKind.SERVER, span.getKind());
    assertEquals(PARENT_TRACE, span.getTraceId());
    assertEquals(PARENT_SPAN, span.getParentSpanId());
    assertTrue(span.getParentSpanContext().isRemote());
    assertEquals(span.getSpanId(), seen.get().getSpanId(), "the method runs with the call's span current");
    assertEquals("sees", attribute(span, "linchkit.method"));
    assertEquals("test", attribute(span, "linchkit.plugin"));
    assertEquals("r1", attribute(span, "linchkit.request_id"));
    assertEquals("ok", attribute(span, "linchkit.outcome"));
    assertNull(attribute(span, "error.type"));
    assertEquals(StatusCode.UNSET, span.getStatus().getStatusCode());
  }

  @Test
  void aFailedCallRecordsItsErrorType() throws Exception {
    PluginService service = traced();
    service.answer(request("typed", TRACEPARENT)).get(30, TimeUnit.SECONDS);
    kept.await(1);
    service.answer(request("throws", "")).get(30, TimeUnit.SECONDS);
    List<SpanData> spans = kept.await(2);
    String[][] expected = {{"Overdrawn", "the account is overdrawn"}, {"IllegalStateException", "broken"}};
    for (int i = 0; i < expected.length; i++) {
      SpanData span = spans.get(i);
      assertEquals(expected[i][0], attribute(span, "linchkit.outcome"));
      assertEquals(expected[i][0], attribute(span, "error.type"));
      assertEquals(StatusCode.ERROR, span.getStatus().getStatusCode());
      assertEquals(expected[i][1], span.getStatus().getDescription());
    }
  }

  @Test
  void aMalformedTraceparentStartsANewTraceAndTheCallSucceeds() throws Exception {
    String[] malformed = {
        "garbage",
        "00-" + "0".repeat(32) + "-" + "0".repeat(16) + "-01", // all-zero ids are invalid
        "00-" + PARENT_TRACE + "-" + PARENT_SPAN, // no flags
        "00-" + PARENT_TRACE.toUpperCase() + "-" + PARENT_SPAN + "-01", // upper-case hex
        TRACEPARENT + "x".repeat(Tracing.MAX_TRACEPARENT), // a valid start, far too long
        "x".repeat(100_000),
        "",
    };
    PluginService service = traced();
    for (String traceparent : malformed) {
      CallReply reply = service.answer(request("echo", traceparent)).get(30, TimeUnit.SECONDS);
      assertTrue(reply.getOk(), "traceparent " + traceparent.substring(0, Math.min(20, traceparent.length())) + ": " + reply);
    }
    List<SpanData> spans = kept.await(malformed.length);
    Set<String> traces = new HashSet<>();
    for (SpanData span : spans) {
      assertFalse(span.getParentSpanContext().isValid(), "a root: " + span);
      assertNotEquals("0".repeat(32), span.getTraceId());
      assertNotEquals(PARENT_TRACE, span.getTraceId());
      traces.add(span.getTraceId());
    }
    assertEquals(malformed.length, traces.size(), "each a new trace");
  }

  /** The request ids of the calls that recorded a span, under {@code OTEL_TRACES_SAMPLER=sampler}. */
  private Set<String> sampledUnder(String sampler, String arg) throws Exception {
    Map<String, String> env = new java.util.HashMap<>(Map.of("OTEL_TRACES_SAMPLER", sampler));
    if (arg != null) env.put("OTEL_TRACES_SAMPLER_ARG", arg);
    Kept mine = new Kept();
    SdkTracerProvider sampling = SdkTracerProvider.builder()
        .setSampler(Tracing.sampler(OtlpSettings.sampling(env, warning -> {})))
        .addSpanProcessor(SimpleSpanProcessor.create(mine))
        .build();
    cleanups.add(() -> sampling.shutdown().join(5, TimeUnit.SECONDS));
    PluginService service = service(new Tracing(sampling, "test", "http://collector:4318"));
    Map<String, String> calls = Map.of(
        "root", "",
        "sampled", TRACEPARENT,
        "unsampled", "00-" + PARENT_TRACE + "-" + PARENT_SPAN + "-00");
    Set<String> seenSampled = new HashSet<>();
    for (Map.Entry<String, String> call : calls.entrySet()) {
      CallRequest.Builder request = request("sees", call.getValue()).toBuilder();
      request.getContextBuilder().setRequestId(call.getKey());
      assertTrue(service.answer(request.build()).get(30, TimeUnit.SECONDS).getOk());
      if (seen.get().isSampled()) seenSampled.add(call.getKey());
    }
    // A span ends as its reply completes: waited for. The method saw the flag as decided.
    Set<String> recorded = new HashSet<>();
    for (SpanData span : mine.await(seenSampled.size())) recorded.add(attribute(span, "linchkit.request_id"));
    assertEquals(seenSampled, recorded);
    return recorded;
  }

  @Test
  void theSamplerTheVariablesNameDecidesWhichCallsRecordASpan() throws Exception {
    assertEquals(Set.of(), sampledUnder("always_off", null));
    assertEquals(Set.of(), sampledUnder("traceidratio", "0"));
    assertEquals(Set.of("root", "sampled", "unsampled"), sampledUnder("always_on", null));
    assertEquals(Set.of("root", "sampled"), sampledUnder("parentbased_always_on", null));
    assertEquals(Set.of("sampled"), sampledUnder("parentbased_always_off", null));
    assertEquals(Set.of("sampled"), sampledUnder("parentbased_traceidratio", "0"));
    assertEquals(Set.of("root", "sampled"), sampledUnder("sometimes", null));
    assertEquals(Set.of("root", "sampled", "unsampled"), sampledUnder("traceidratio", "lots"));
  }

  /** An exporter whose batches fail or succeed as told. */
  private static final class Scripted implements SpanExporter {
    final java.util.Deque<CompletableResultCode> results = new java.util.ArrayDeque<>();

    @Override
    public CompletableResultCode export(Collection<SpanData> batch) {
      return results.removeFirst();
    }

    @Override
    public CompletableResultCode flush() {
      return CompletableResultCode.ofSuccess();
    }

    @Override
    public CompletableResultCode shutdown() {
      return CompletableResultCode.ofSuccess();
    }
  }

  @Test
  void aCollectorOutageIsSaidOnceAndItsEndCountsTheSpansDropped() {
    Scripted scripted = new Scripted();
    Tracing.Reporting reporting = new Tracing.Reporting(scripted, "http://127.0.0.1:4318");
    scripted.results.add(CompletableResultCode.ofExceptionalFailure(
        new IllegalStateException("http://collector:" + SECRET + "@127.0.0.1:4318", new java.net.ConnectException())));
    scripted.results.add(CompletableResultCode.ofFailure());
    CompletableResultCode pending = new CompletableResultCode();
    scripted.results.add(pending);
    List<SpanData> two = List.of(span(), span());
    List<String> said = warningsOf(() -> {
      reporting.export(two);
      reporting.export(List.of(span()));
    });
    assertEquals(List.of("could not send 2 spans to the trace collector at http://127.0.0.1:4318 (ConnectException);"
        + " they are dropped, and so are later ones until it takes them again"), said);
    said = warningsOf(() -> {
      reporting.export(List.of(span()));
      pending.succeed();
    });
    assertEquals(List.of("the trace collector at http://127.0.0.1:4318 takes spans again; 3 were dropped while it did not"),
        said);
  }

  /** A span as the exporter gets one. */
  private SpanData span() {
    provider.get("test").spanBuilder("s").startSpan().end();
    return kept.spans.remove(0);
  }

  @Test
  void withoutTracingTheMethodSeesNoSpan() throws Exception {
    CallReply reply = service(null).answer(request("sees", TRACEPARENT)).get(30, TimeUnit.SECONDS);
    assertTrue(reply.getOk(), reply.toString());
    assertFalse(seen.get().isValid(), "tracing off, yet the method sees " + seen.get());
    assertEquals(List.of(), kept.spans);
  }

  @Test
  void aStreamedCallOverGrpcContinuesTheTraceItsMetadataCarries() throws Exception {
    HealthStatusManager health = new HealthStatusManager();
    PluginService service = traced();
    Server server = Serve.serving(NettyServerBuilder.forAddress(new InetSocketAddress("127.0.0.1", 0)),
            service, health, Serve.MAX_MESSAGE_BYTES, PluginService.HEADERS_INTERCEPTOR)
        .build()
        .start();
    ManagedChannel channel = NettyChannelBuilder.forAddress("127.0.0.1", server.getPort()).usePlaintext().build();
    cleanups.add(() -> {
      channel.shutdownNow();
      server.shutdownNow();
    });
    Metadata headers = new Metadata();
    headers.put(Metadata.Key.of("traceparent", Metadata.ASCII_STRING_MARSHALLER), TRACEPARENT);
    PluginServiceGrpc.PluginServiceBlockingStub stub = PluginServiceGrpc.newBlockingStub(channel)
        .withInterceptors(MetadataUtils.newAttachHeadersInterceptor(headers))
        .withDeadlineAfter(30, TimeUnit.SECONDS);
    // The envelope carries none: the metadata's traceparent is the one continued.
    CallRequest request = CallRequest.newBuilder().setV(1).setMethod("rows").setParamsJson(ByteString.copyFromUtf8("{}")).build();
    int chunks = 0;
    for (Iterator<StreamItem> items = stub.callStream(request); items.hasNext(); items.next()) chunks++;
    assertEquals(2, chunks);
    SpanData span = kept.await(1).get(0);
    assertEquals("linchkit.plugin/rows", span.getName());
    assertEquals(PARENT_TRACE, span.getTraceId());
    assertEquals(PARENT_SPAN, span.getParentSpanId());
    assertEquals("ok", attribute(span, "linchkit.outcome"));
    assertEquals(span.getSpanId(), seen.get().getSpanId());
  }

  @Test
  void truncationKeepsSurrogatePairsWhole() {
    assertEquals("a", Tracing.truncated("a\uD83D\uDE00", 2));
    assertEquals("abc", Tracing.truncated("abc", 3));
    assertEquals("ab", Tracing.truncated("abc", 2));
  }

  /** What {@code body} wrote on System.err (where a stop's warnings go). */
  private static String stderrOf(Runnable body) {
    PrintStream original = System.err;
    ByteArrayOutputStream captured = new ByteArrayOutputStream();
    System.setErr(new PrintStream(captured, true, StandardCharsets.UTF_8));
    try {
      body.run();
    } finally {
      System.setErr(original);
    }
    return captured.toString(StandardCharsets.UTF_8);
  }

  /**
   * A collector that accepts and never answers: the stop's flush gives up within its time, and
   * its one warning names the collector by scheme://host:port, not the password in its URL nor
   * the exporter's headers.
   */
  @Test
  void spansASilentCollectorDoesNotTakeAreDroppedWithOneWarningThatHidesItsSecrets() throws Exception {
    try (ServerSocket silent = new ServerSocket(0, 50, java.net.InetAddress.getLoopbackAddress())) {
      List<Socket> held = new CopyOnWriteArrayList<>();
      Thread acceptor = new Thread(() -> {
        try {
          while (true) held.add(silent.accept()); // held open, never answered
        } catch (Exception closed) {
          // the test is over
        }
      });
      acceptor.setDaemon(true);
      acceptor.start();
      int port = silent.getLocalPort();
      OtlpSettings settings = OtlpSettings.fromEnv(Map.of(
          "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://collector:" + SECRET + "@127.0.0.1:" + port + "/v1/traces?token=" + SECRET,
          "OTEL_EXPORTER_OTLP_TRACES_HEADERS", "authorization=Bearer%20" + SECRET), "test", warning -> {});
      Tracing tracing = Tracing.exporting(settings, plugin());
      assertNotNull(tracing);
      tracing.start(new CallContext("echo", "r1", "", TRACEPARENT, "", Long.MAX_VALUE)).end(null);
      long began = System.nanoTime();
      boolean[] sent = {true};
      String said = stderrOf(() -> sent[0] = tracing.flushWithin(300));
      long tookMs = TimeUnit.NANOSECONDS.toMillis(System.nanoTime() - began);
      assertFalse(sent[0]);
      assertTrue(tookMs < 5_000, "the flush took " + tookMs + " ms, its bound 300");
      assertTrue(said.contains("WARNING dev.linchkit.plugin.sdk: spans dropped at the stop: the trace collector at http://127.0.0.1:"
          + port + " did not take them within the 0.3 s"), said);
      assertEquals(1, said.lines().count(), said);
      assertFalse(said.contains(SECRET), said);
      for (Socket socket : held) socket.close();
    }
  }

  /** The SDK's warnings while {@code body} runs. */
  private static List<String> warningsOf(Runnable body) {
    List<String> said = new CopyOnWriteArrayList<>();
    Handler keep = new Handler() {
      @Override
      public void publish(LogRecord record) {
        said.add(record.getMessage());
      }

      @Override
      public void flush() {}

      @Override
      public void close() {}
    };
    Log.SDK.addHandler(keep);
    try {
      body.run();
    } finally {
      Log.SDK.removeHandler(keep);
    }
    return said;
  }

  /**
   * An exporter that cannot be made leaves the plugin untraced, with one warning that names the
   * collector without the password in its URL: tracing is an aid, not the plugin's job.
   */
  @Test
  void anExporterThatCannotBeMadeLeavesThePluginUntracedWithoutItsSecrets() {
    List<Map<String, String>> broken = List.of(
        Map.of("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "ftp://collector:" + SECRET + "@127.0.0.1:4318/v1/traces"),
        Map.of("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://collector:" + SECRET + "@127.0.0.1:4318/v1/traces",
            "OTEL_EXPORTER_OTLP_CERTIFICATE", "/nonexistent/" + "ca.pem"),
        Map.of("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://collector:" + SECRET + "@127.0.0.1:4318/v1/traces",
            "OTEL_EXPORTER_OTLP_CLIENT_KEY", "/nonexistent/client.key"));
    for (Map<String, String> env : broken) {
      Tracing[] made = {null};
      List<String> said = warningsOf(() -> made[0] = Tracing.exporting(OtlpSettings.fromEnv(env, "test", w -> {}), plugin()));
      assertNull(made[0], env.toString());
      assertEquals(1, said.size(), said.toString());
      assertTrue(said.get(0).startsWith("serving without tracing: "), said.get(0));
      assertTrue(said.get(0).contains("127.0.0.1:4318"), said.get(0));
      assertFalse(said.get(0).contains(SECRET), said.get(0));
    }
  }

  /** The exporter's request as a collector gets it: OTLP/HTTP protobuf, the headers the variables name. */
  @Test
  void aCollectorThatAnswersGetsTheSpansWithTheHeadersAtTheFlush() throws Exception {
    HttpServer collector = HttpServer.create(new InetSocketAddress("127.0.0.1", 0), 0);
    List<String> received = new CopyOnWriteArrayList<>();
    collector.createContext("/v1/traces", exchange -> {
      byte[] body = exchange.getRequestBody().readAllBytes();
      received.add(exchange.getRequestMethod() + " " + exchange.getRequestURI().getPath()
          + " " + exchange.getRequestHeaders().getFirst("Content-Type")
          + " " + exchange.getRequestHeaders().getFirst("Authorization")
          + " " + (new String(body, StandardCharsets.ISO_8859_1).contains("linchkit.plugin/echo")));
      exchange.sendResponseHeaders(200, -1);
      exchange.close();
    });
    collector.start();
    try {
      OtlpSettings settings = OtlpSettings.fromEnv(Map.of(
          "OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:" + collector.getAddress().getPort() + "/",
          "OTEL_EXPORTER_OTLP_HEADERS", "authorization=Bearer%20" + SECRET), "test", warning -> {});
      Tracing tracing = Tracing.exporting(settings, plugin());
      assertNotNull(tracing);
      tracing.start(new CallContext("echo", "r1", "", TRACEPARENT, "", Long.MAX_VALUE)).end(null);
      assertTrue(tracing.flushWithin(20_000));
      assertEquals(List.of("POST /v1/traces application/x-protobuf Bearer " + SECRET + " true"), received);
    } finally {
      collector.stop(0);
    }
  }
}
