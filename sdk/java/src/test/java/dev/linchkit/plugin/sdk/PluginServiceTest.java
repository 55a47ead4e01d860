package dev.linchkit.plugin.sdk;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import com.google.protobuf.ByteString;
import dev.linchkit.plugin.v1.BatchReply;
import dev.linchkit.plugin.v1.BatchRequest;
import dev.linchkit.plugin.v1.CallReply;
import dev.linchkit.plugin.v1.CallRequest;
import dev.linchkit.plugin.v1.HostEvent;
import dev.linchkit.plugin.v1.InitRequest;
import dev.linchkit.plugin.v1.LifecycleRequest;
import dev.linchkit.plugin.v1.PluginEvent;
import dev.linchkit.plugin.v1.PluginServiceGrpc;
import dev.linchkit.plugin.v1.StreamItem;
import io.grpc.ManagedChannel;
import io.grpc.Metadata;
import io.grpc.Server;
import io.grpc.Status;
import io.grpc.StatusRuntimeException;
import io.grpc.health.v1.HealthCheckRequest;
import io.grpc.health.v1.HealthCheckResponse.ServingStatus;
import io.grpc.health.v1.HealthGrpc;
import io.grpc.netty.shaded.io.grpc.netty.NettyChannelBuilder;
import io.grpc.netty.shaded.io.grpc.netty.NettyServerBuilder;
import io.grpc.protobuf.services.HealthStatusManager;
import io.grpc.stub.MetadataUtils;
import io.grpc.stub.StreamObserver;
import java.net.InetSocketAddress;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicInteger;
import org.junit.jupiter.api.AfterEach;
import org.junit.jupiter.api.Test;

/** The service over a real grpc-java server and channel on loopback. */
class PluginServiceTest {
  private final List<Runnable> cleanups = new ArrayList<>();

  private record Running(PluginService service, ManagedChannel channel, PluginServiceGrpc.PluginServiceBlockingStub stub, HealthGrpc.HealthBlockingStub health) {}

  private Running serve(Plugin plugin, boolean servingFromStart, int maxReplyBytes) throws Exception {
    return serve(plugin, servingFromStart, maxReplyBytes, Serve.MAX_MESSAGE_BYTES);
  }

  private Running serve(Plugin plugin, boolean servingFromStart, int maxReplyBytes, int maxRequestBytes) throws Exception {
    HealthStatusManager health = new HealthStatusManager();
    PluginService service = new PluginService(plugin, health, servingFromStart, maxReplyBytes);
    Server server = Serve.serving(NettyServerBuilder.forAddress(new InetSocketAddress("127.0.0.1", 0)),
            service, health, maxRequestBytes, PluginService.HEADERS_INTERCEPTOR)
        .build()
        .start();
    ManagedChannel channel = NettyChannelBuilder.forAddress("127.0.0.1", server.getPort())
        .usePlaintext()
        .maxInboundMessageSize(Serve.MAX_MESSAGE_BYTES)
        .build();
    cleanups.add(() -> {
      channel.shutdownNow();
      server.shutdownNow();
      service.close();
    });
    return new Running(service, channel, PluginServiceGrpc.newBlockingStub(channel), HealthGrpc.newBlockingStub(channel));
  }

  @AfterEach
  void stop() {
    cleanups.forEach(Runnable::run);
  }

  private static CallRequest request(String method, String params) {
    return CallRequest.newBuilder().setV(1).setMethod(method).setParamsJson(ByteString.copyFromUtf8(params)).build();
  }

  private static ServingStatus status(Running running) {
    return running.health().check(HealthCheckRequest.newBuilder().setService(PluginService.SERVICE_NAME).build()).getStatus();
  }

  @Test
  void aCallThatEndsBeforeItsDeadlineLeavesNoTimerQueued() throws Exception {
    // Before: each cancelled deadline timer stayed queued until its deadline, so a busy
    // plugin held every call's timer of the last 60 s here.
    Plugin plugin = new Plugin("p", "1");
    plugin.method("echo", (params, ctx) -> params);
    Running running = serve(plugin, true, Serve.MAX_MESSAGE_BYTES);
    for (int i = 0; i < 200; i++) {
      assertTrue(running.stub().withDeadlineAfter(60, TimeUnit.SECONDS).call(request("echo", "{}")).getOk());
    }
    long giveUp = System.nanoTime() + TimeUnit.SECONDS.toNanos(10);
    while (running.service().deadlineTimersQueued() > 0 && System.nanoTime() < giveUp) {
      Thread.sleep(10);
    }
    assertEquals(0, running.service().deadlineTimersQueued());
  }

  @Test
  void anErrorWithoutATypeIsAnsweredAtOnceNotAtTheDeadline() throws Exception {
    Plugin plugin = new Plugin("p", "1");
    plugin.method("untyped", (params, ctx) -> {
      throw new PluginException(null, "no type given");
    });
    plugin.method("bare", (params, ctx) -> {
      throw new PluginException(null, null);
    });
    plugin.streamingMethod("rows", (params, ctx, out) -> {
      out.send(Map.of("row", 1));
      throw new PluginException(null, "after one row");
    });
    Running running = serve(plugin, true, Serve.MAX_MESSAGE_BYTES);
    long start = System.nanoTime();
    CallReply reply = running.stub().withDeadlineAfter(20, TimeUnit.SECONDS).call(request("untyped", "{}"));
    assertTrue(System.nanoTime() - start < TimeUnit.SECONDS.toNanos(5), "answered long before the deadline");
    assertFalse(reply.getOk());
    assertEquals(Errors.DEFAULT_TYPE, reply.getError().getType());
    assertEquals("no type given", reply.getError().getMessage());

    CallReply bare = running.stub().withDeadlineAfter(20, TimeUnit.SECONDS).call(request("bare", "{}"));
    assertEquals(Errors.DEFAULT_TYPE, bare.getError().getType());
    assertEquals("PluginException", bare.getError().getMessage());

    List<StreamItem> items = new ArrayList<>();
    running.stub().withDeadlineAfter(20, TimeUnit.SECONDS).callStream(request("rows", "{}")).forEachRemaining(items::add);
    assertEquals(2, items.size(), items.toString());
    assertEquals("{\"row\":1}", items.get(0).getChunkJson().toStringUtf8());
    assertEquals(Errors.DEFAULT_TYPE, items.get(1).getError().getType());
    assertTrue(System.nanoTime() - start < TimeUnit.SECONDS.toNanos(10), "no call waited for its deadline");
  }

  @Test
  void aServiceRunsTheLifecycleOfEachHostThatAttachesWithItsConfig() throws Exception {
    Plugin plugin = new Plugin("p", "1");
    AtomicInteger inits = new AtomicInteger();
    AtomicInteger starts = new AtomicInteger();
    AtomicInteger stops = new AtomicInteger();
    AtomicInteger destroys = new AtomicInteger();
    plugin.onInit(config -> inits.incrementAndGet())
        .onStart(starts::incrementAndGet)
        .onStop(stops::incrementAndGet)
        .onDestroy(destroys::incrementAndGet);
    plugin.method("config", (params, ctx) -> plugin.config());
    Running running = serve(plugin, true, Serve.MAX_MESSAGE_BYTES);
    var stub = running.stub();
    LifecycleRequest none = LifecycleRequest.getDefaultInstance();
    for (String host : new String[] {"first", "second"}) {
      stub.init(InitRequest.newBuilder().setConfigJson(ByteString.copyFromUtf8("{\"host\": \"" + host + "\"}")).build());
      stub.start(none);
      CallReply config = stub.call(request("config", "{}"));
      assertEquals(JsonParser.parseString("{\"host\": \"" + host + "\"}"), JsonParser.parseString(config.getResultJson().toStringUtf8()));
      stub.stop(none);
      stub.destroy(none);
      assertEquals(ServingStatus.SERVING, status(running), "a service still serves calls after a host detached");
      assertTrue(stub.call(request("config", "{}")).getOk());
    }
    assertEquals(List.of(2, 2, 2, 2), List.of(inits.get(), starts.get(), stops.get(), destroys.get()));

    // A third host attaches and the service is ended: its Stop and Destroy run at shutdown.
    stub.init(InitRequest.newBuilder().setConfigJson(ByteString.copyFromUtf8("{}")).build());
    stub.start(none);
    plugin.close();
    assertEquals(List.of(3, 3, 3, 3), List.of(inits.get(), starts.get(), stops.get(), destroys.get()));
    plugin.close();
    assertEquals(3, destroys.get(), "nothing twice");
  }

  /** The stub as host {@code id} sends it ({@code linchkit-host}). */
  private static PluginServiceGrpc.PluginServiceBlockingStub as(Running running, String id) {
    Metadata headers = new Metadata();
    headers.put(AttachedHosts.HOST, id);
    return running.stub().withInterceptors(MetadataUtils.newAttachHeadersInterceptor(headers));
  }

  private static Plugin counting(AtomicInteger[] counts) {
    Plugin plugin = new Plugin("p", "1");
    for (int i = 0; i < counts.length; i++) counts[i] = new AtomicInteger();
    return plugin.onInit(config -> counts[0].incrementAndGet())
        .onStart(counts[1]::incrementAndGet)
        .onStop(counts[2]::incrementAndGet)
        .onDestroy(counts[3]::incrementAndGet);
  }

  private static List<Integer> counted(AtomicInteger[] counts) {
    return List.of(counts[0].get(), counts[1].get(), counts[2].get(), counts[3].get());
  }

  @Test
  void onlyTheLastHostToLeaveRunsTheStopAndDestroyHooks() throws Exception {
    for (boolean servingFromStart : new boolean[] {true, false}) {
      AtomicInteger[] counts = new AtomicInteger[4];
      Running running = serve(counting(counts), servingFromStart, Serve.MAX_MESSAGE_BYTES);
      LifecycleRequest none = LifecycleRequest.getDefaultInstance();
      for (String host : new String[] {"a", "b"}) {
        as(running, host).init(InitRequest.getDefaultInstance());
        as(running, host).start(none);
      }
      as(running, "b").stop(none);
      as(running, "b").destroy(none);
      assertEquals(List.of(2, 2, 0, 0), counted(counts), "b left while a is attached: nothing ran");
      assertEquals(ServingStatus.SERVING, status(running));
      // A host without the metadata counts as the host "": it joins and leaves like any other.
      running.stub().init(InitRequest.getDefaultInstance());
      running.stub().stop(none);
      running.stub().destroy(none);
      assertEquals(List.of(3, 2, 0, 0), counted(counts));
      as(running, "a").stop(none);
      as(running, "a").destroy(none);
      assertEquals(List.of(3, 2, 1, 1), counted(counts), "the last host to leave stops the plugin");
      assertEquals(servingFromStart ? ServingStatus.SERVING : ServingStatus.NOT_SERVING, status(running));
    }
  }

  @Test
  void aHostIdOffTheContractIsRefusedBeforeAnyHook() throws Exception {
    AtomicInteger[] counts = new AtomicInteger[4];
    Running running = serve(counting(counts), true, Serve.MAX_MESSAGE_BYTES);
    LifecycleRequest none = LifecycleRequest.getDefaultInstance();
    as(running, "a").init(InitRequest.getDefaultInstance());
    for (String bad : new String[] {"x".repeat(65), "bad id", "", "a/b"}) {
      var stub = as(running, bad);
      for (Runnable step : new Runnable[] {
          () -> stub.init(InitRequest.getDefaultInstance()), () -> stub.start(none), () -> stub.stop(none), () -> stub.destroy(none)}) {
        StatusRuntimeException refused = assertThrows(StatusRuntimeException.class, step::run);
        assertEquals(Status.Code.INVALID_ARGUMENT, refused.getStatus().getCode());
        assertEquals("linchkit-host must be 1-64 of A-Z a-z 0-9 . _ -", refused.getStatus().getDescription());
      }
    }
    assertEquals(List.of(1, 0, 0, 0), counted(counts));
    as(running, "a").stop(none);
    assertEquals(List.of(1, 0, 1, 0), counted(counts), "a was still the one host");
  }

  @Test
  void aServiceTracksAtMost1024Hosts() throws Exception {
    AtomicInteger[] counts = new AtomicInteger[4];
    Running running = serve(counting(counts), true, Serve.MAX_MESSAGE_BYTES);
    for (int i = 0; i < AttachedHosts.MAX_HOSTS; i++) as(running, "h" + i).init(InitRequest.getDefaultInstance());
    StatusRuntimeException refused = assertThrows(StatusRuntimeException.class,
        () -> as(running, "one-more").init(InitRequest.getDefaultInstance()));
    assertEquals(Status.Code.RESOURCE_EXHAUSTED, refused.getStatus().getCode());
    assertEquals(AttachedHosts.MAX_HOSTS, counts[0].get(), "no hook ran for the one refused");
    as(running, "h0").init(InitRequest.getDefaultInstance()); // one already attached may Init again
    as(running, "h0").destroy(LifecycleRequest.getDefaultInstance());
    as(running, "one-more").init(InitRequest.getDefaultInstance());
    assertEquals(0, counts[3].get());
  }

  @Test
  void aSubprocessIsServingFromStartToStop() throws Exception {
    Plugin plugin = new Plugin("p", "1");
    Running running = serve(plugin, false, Serve.MAX_MESSAGE_BYTES);
    assertEquals(ServingStatus.NOT_SERVING, status(running));
    running.stub().init(InitRequest.getDefaultInstance());
    running.stub().start(LifecycleRequest.getDefaultInstance());
    assertEquals(ServingStatus.SERVING, status(running));
    running.stub().stop(LifecycleRequest.getDefaultInstance());
    assertEquals(ServingStatus.NOT_SERVING, status(running));
  }

  private static void assertTooLarge(dev.linchkit.plugin.v1.Error error) {
    assertEquals("provider_error", error.getType(), error.toString());
    assertFalse(error.getRetryable());
    JsonObject details = JsonParser.parseString(error.getDetailsJson().toStringUtf8()).getAsJsonObject();
    assertEquals("too_large", details.get("reason").getAsString());
  }

  @Test
  void aReplyOverTheCapIsAnsweredTooLargeInsteadOfSent() throws Exception {
    Plugin plugin = new Plugin("p", "1");
    plugin.method("big", (params, ctx) -> "x".repeat(new Params(params, "big").integer("n", 0, 1 << 30) > 0
        ? (int) new Params(params, "big").integer("n", 0, 1 << 30) : 0));
    plugin.streamingMethod("rows", (params, ctx, out) -> {
      out.send("small");
      out.send("x".repeat(2000));
    });
    Running running = serve(plugin, true, 1000);
    assertTrue(running.stub().call(request("big", "{\"n\": 900}")).getOk());
    CallReply over = running.stub().call(request("big", "{\"n\": 2000}"));
    assertFalse(over.getOk());
    assertTooLarge(over.getError());

    List<StreamItem> items = new ArrayList<>();
    running.stub().callStream(request("rows", "{}")).forEachRemaining(items::add);
    assertEquals(2, items.size(), items.toString());
    assertTooLarge(items.get(1).getError());

    // Two replies that fit alone but not together: the larger one gives way.
    BatchReply batch = running.stub().callBatch(BatchRequest.newBuilder()
        .addCalls(request("big", "{\"n\": 500}"))
        .addCalls(request("big", "{\"n\": 600}"))
        .build());
    assertTrue(batch.getResults(0).getOk());
    assertTooLarge(batch.getResults(1).getError());
    assertTrue(batch.getSerializedSize() <= 1000);
  }

  @Test
  void aResultOver64MiBIsAnsweredTooLargeToAHostOfThatCap() throws Exception {
    Plugin plugin = new Plugin("p", "1");
    plugin.method("huge", (params, ctx) -> "x".repeat(70_000_000));
    Running running = serve(plugin, true, Serve.MAX_MESSAGE_BYTES);
    CallReply over = running.stub().withDeadlineAfter(60, TimeUnit.SECONDS).call(request("huge", "{}"));
    assertTooLarge(over.getError());
    assertTrue(over.getError().getMessage().contains(String.valueOf(Serve.MAX_MESSAGE_BYTES)), over.getError().getMessage());
  }

  /** The status {@code stream} ends with: it must end with one, not with its items. */
  private static Status endOf(java.util.Iterator<?> stream) {
    StatusRuntimeException ended = assertThrows(StatusRuntimeException.class, () -> stream.forEachRemaining(item -> {}));
    return ended.getStatus();
  }

  private static void assertRefusedAsTooLarge(Status status, int cap) {
    assertEquals(Status.Code.RESOURCE_EXHAUSTED, status.getCode(), status.toString());
    // grpc-java's words for a request over the cap, which the dispatcher reads as one.
    assertEquals("Decompressed gRPC message exceeds maximum size " + cap, status.getDescription());
  }

  /**
   * A gzip request small on the wire, over the server's cap once decompressed (a gzip bomb),
   * on each kind of method: RESOURCE_EXHAUSTED, as for one over the cap uncompressed, and the
   * service serves on. Before: UNKNOWN "Application error processing RPC" (grpc-java lets the
   * parser's size refusal escape as an application error), which the host reads as a crashed
   * handler and sends again, and a SEVERE stack trace logged for each.
   */
  @Test
  void aGzipRequestOverTheCapOnceDecompressedIsRefusedAsTooLarge() throws Exception {
    Plugin plugin = new Plugin("p", "1");
    plugin.method("echo", (params, ctx) -> params);
    plugin.streamingMethod("rows", (params, ctx, out) -> out.send(params));
    List<String> events = java.util.Collections.synchronizedList(new ArrayList<>());
    plugin.on("ping", (name, data) -> events.add(data.toString()));
    int cap = 1 << 20;
    Running running = serve(plugin, true, Serve.MAX_MESSAGE_BYTES, cap);
    List<String> severe = java.util.Collections.synchronizedList(new ArrayList<>());
    java.util.logging.Logger grpc = java.util.logging.Logger.getLogger("io.grpc");
    java.util.logging.Handler recorder = new java.util.logging.Handler() {
      @Override public void publish(java.util.logging.LogRecord record) {
        if (record.getLevel().intValue() >= java.util.logging.Level.SEVERE.intValue()) severe.add(record.getMessage());
      }
      @Override public void flush() {}
      @Override public void close() {}
    };
    grpc.addHandler(recorder);
    cleanups.add(() -> grpc.removeHandler(recorder));
    String bomb = "\"" + "0".repeat(2 * cap) + "\"";
    var gzip = running.stub().withCompression("gzip").withDeadlineAfter(20, TimeUnit.SECONDS);

    StatusRuntimeException call = assertThrows(StatusRuntimeException.class, () -> gzip.call(request("echo", bomb)));
    assertRefusedAsTooLarge(call.getStatus(), cap);
    StatusRuntimeException batch = assertThrows(StatusRuntimeException.class,
        () -> gzip.callBatch(BatchRequest.newBuilder().addCalls(request("echo", bomb)).build()));
    assertRefusedAsTooLarge(batch.getStatus(), cap);
    assertRefusedAsTooLarge(endOf(gzip.callStream(request("rows", bomb))), cap);
    StatusRuntimeException init = assertThrows(StatusRuntimeException.class,
        () -> gzip.init(InitRequest.newBuilder().setConfigJson(ByteString.copyFromUtf8("{\"a\": " + bomb + "}")).build()));
    assertRefusedAsTooLarge(init.getStatus(), cap);

    // The Events stream: its headers went at once, so the refusal ends it in its trailers.
    var ended = new java.util.concurrent.CompletableFuture<Status>();
    var stream = PluginServiceGrpc.newStub(running.channel()).withCompression("gzip").events(new StreamObserver<PluginEvent>() {
      @Override public void onNext(PluginEvent event) {}
      @Override public void onError(Throwable error) { ended.complete(Status.fromThrowable(error)); }
      @Override public void onCompleted() { ended.complete(Status.OK); }
    });
    stream.onNext(HostEvent.newBuilder().setName("ping").setDataJson(ByteString.copyFromUtf8("\"small\"")).build());
    stream.onNext(HostEvent.newBuilder().setName("ping").setDataJson(ByteString.copyFromUtf8(bomb)).build());
    assertRefusedAsTooLarge(ended.get(20, TimeUnit.SECONDS), cap);
    stream.onCompleted();

    CallReply after = running.stub().withCompression("gzip").call(request("echo", "{\"still\": \"serving\"}"));
    assertTrue(after.getOk(), after.toString());
    assertEquals("{\"still\":\"serving\"}", after.getResultJson().toStringUtf8());
    long until = System.nanoTime() + TimeUnit.SECONDS.toNanos(5);
    while (events.isEmpty() && System.nanoTime() < until) Thread.sleep(10); // delivered on its own thread
    assertEquals(List.of("\"small\""), events, "the event before the refused one was delivered, and no other");
    assertEquals(List.of(), severe, "a host's oversized request is no error of the plugin's");
  }

  @SuppressWarnings("unused")
  private static String utf8(ByteString bytes) {
    return bytes.toString(StandardCharsets.UTF_8);
  }
}
