package dev.linchkit.plugin.sdk;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertNotNull;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import com.google.gson.JsonArray;
import com.google.gson.JsonElement;
import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import com.google.gson.JsonPrimitive;
import com.google.gson.Strictness;
import com.google.gson.stream.JsonReader;
import com.google.gson.stream.JsonToken;
import com.google.protobuf.ByteString;
import dev.linchkit.plugin.v1.BatchReply;
import dev.linchkit.plugin.v1.BatchRequest;
import dev.linchkit.plugin.v1.CallReply;
import dev.linchkit.plugin.v1.CallRequest;
import dev.linchkit.plugin.v1.HostEvent;
import dev.linchkit.plugin.v1.PluginEvent;
import dev.linchkit.plugin.v1.PluginServiceGrpc;
import dev.linchkit.plugin.v1.StreamItem;
import io.grpc.ManagedChannel;
import io.grpc.Server;
import io.grpc.netty.shaded.io.grpc.netty.NettyChannelBuilder;
import io.grpc.netty.shaded.io.grpc.netty.NettyServerBuilder;
import io.grpc.protobuf.services.HealthStatusManager;
import io.grpc.stub.StreamObserver;
import io.netty.bootstrap.Bootstrap;
import io.netty.bootstrap.ServerBootstrap;
import io.netty.channel.Channel;
import io.netty.channel.ChannelHandlerContext;
import io.netty.channel.ChannelInboundHandlerAdapter;
import io.netty.channel.ChannelInitializer;
import io.netty.channel.DefaultEventLoopGroup;
import io.netty.channel.EventLoopGroup;
import io.netty.channel.SimpleChannelInboundHandler;
import io.netty.channel.local.LocalAddress;
import io.netty.channel.local.LocalChannel;
import io.netty.channel.local.LocalServerChannel;
import io.netty.handler.codec.http.websocketx.TextWebSocketFrame;
import java.io.IOException;
import java.io.StringReader;
import java.net.InetSocketAddress;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.concurrent.BlockingQueue;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.LinkedBlockingQueue;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicInteger;
import java.util.logging.Handler;
import java.util.logging.Level;
import java.util.logging.LogRecord;
import org.junit.jupiter.api.AfterEach;
import org.junit.jupiter.api.BeforeEach;
import org.junit.jupiter.api.Test;

/**
 * A result JSON cannot carry (a NaN, an infinity, anywhere in it), on gRPC and WebSocket alike.
 *
 * <p>Until 2026-12-07 a Map, record or boxed double holding NaN failed in Gson ({@code
 * IllegalArgumentException} and Gson's advice to call {@code serializeSpecialFloatingPointValues})
 * and a pre-built {@code JsonElement} holding one went out as a bare {@code NaN} token: a
 * result_json, a chunk, an event or a WebSocket frame that no host can parse. Now it is the
 * call's {@code provider_error} "the plugin's result is not JSON: …", on a stream its end (even
 * when the method swallows its send's exception), and an event is not sent, said on stderr.
 */
class NonFiniteResultTest {
  private static final String NAN_REFUSED = "the plugin's result is not JSON: NaN is not a JSON number";

  /** A record as a plugin author returns one: Gson writes its fields. */
  record Score(String name, float value) {}

  private final List<Runnable> cleanups = new ArrayList<>();
  private final List<LogRecord> logged = new ArrayList<>();
  private final Handler capture = new Handler() {
    @Override
    public synchronized void publish(LogRecord record) {
      logged.add(record);
    }

    @Override
    public void flush() {}

    @Override
    public void close() {}
  };
  /** The streaming method went on after its refused chunk, or was stopped. */
  private final CountDownLatch streamStopped = new CountDownLatch(1);
  private Plugin plugin;

  @BeforeEach
  void plugin() {
    plugin = new Plugin("scores", "1.0.0", "java");
    plugin.method("ok", (params, ctx) -> Map.of("score", 1.5));
    plugin.method("nan", (params, ctx) -> Map.of("score", Double.NaN));
    plugin.method("nested", (params, ctx) -> List.of(1.0, Map.of("deep", List.of(Double.NEGATIVE_INFINITY))));
    plugin.method("record", (params, ctx) -> new Score("x", Float.POSITIVE_INFINITY));
    plugin.method("number", (params, ctx) -> Double.NaN);
    plugin.method("prebuilt", (params, ctx) -> {
      JsonObject result = new JsonObject();
      result.addProperty("score", Double.NaN);
      return result;
    });
    plugin.method("wrapped", (params, ctx) -> Map.of("score", new JsonPrimitive(Double.POSITIVE_INFINITY)));
    plugin.streamingMethod("chunks", (params, ctx, out) -> {
      out.send(Map.of("i", 0));
      try {
        out.send(Map.of("i", Double.POSITIVE_INFINITY));
      } catch (PluginException refused) {
        // A method that swallows the refusal: its stream ends all the same.
      }
      try {
        out.send(Map.of("i", 2));
        ctx.sleep(30_000);
      } catch (InterruptedException | PluginException stopped) {
        streamStopped.countDown();
      }
    });
    plugin.streamingMethod("prebuiltChunks", (params, ctx, out) -> {
      out.send(new JsonPrimitive(0));
      out.send(new JsonPrimitive(Double.NaN));
    });
    plugin.method("emit", (params, ctx) -> {
      plugin.emit("bad", Map.of("x", Double.NaN));
      plugin.emit("good", Map.of("x", 1));
      return true;
    });
    plugin.method("emitPrebuilt", (params, ctx) -> {
      JsonArray prebuilt = new JsonArray();
      prebuilt.add(Double.NEGATIVE_INFINITY);
      plugin.emit("prebuilt", prebuilt);
      plugin.emit("good", Map.of("x", 1));
      return true;
    });
    Log.SDK.addHandler(capture);
  }

  @AfterEach
  void stop() {
    Log.SDK.removeHandler(capture);
    cleanups.forEach(Runnable::run);
  }

  // ---- gRPC ---------------------------------------------------------------------------

  private PluginServiceGrpc.PluginServiceBlockingStub grpc() throws Exception {
    return PluginServiceGrpc.newBlockingStub(grpcChannel());
  }

  private ManagedChannel grpcChannel() throws Exception {
    HealthStatusManager health = new HealthStatusManager();
    PluginService service = new PluginService(plugin, health, true);
    Server server = Serve.serving(NettyServerBuilder.forAddress(new InetSocketAddress("127.0.0.1", 0)),
            service, health, Serve.MAX_MESSAGE_BYTES, PluginService.HEADERS_INTERCEPTOR)
        .build()
        .start();
    ManagedChannel channel = NettyChannelBuilder.forAddress("127.0.0.1", server.getPort()).usePlaintext().build();
    cleanups.add(() -> {
      channel.shutdownNow();
      server.shutdownNow();
      service.close();
    });
    return channel;
  }

  private static CallRequest request(String method) {
    return CallRequest.newBuilder().setV(1).setMethod(method).setParamsJson(ByteString.copyFromUtf8("{}")).build();
  }

  private static void assertNotJson(dev.linchkit.plugin.v1.Error error, String reason) {
    assertEquals("provider_error", error.getType(), error.toString());
    assertEquals("the plugin's result is not JSON: " + reason, error.getMessage());
    assertFalse(error.getRetryable());
  }

  @Test
  void aResultHoldingANonFiniteNumberIsThatCallsProviderErrorAndThePluginServesOn() throws Exception {
    Map<String, String> reasons = new LinkedHashMap<>();
    reasons.put("nan", "NaN");
    reasons.put("nested", "-Infinity");
    reasons.put("record", "Infinity");
    reasons.put("number", "NaN");
    assertRefusedOverGrpc(reasons);
  }

  /** Until 2026-12-07 these went out as a bare NaN or Infinity: a result_json no host parses. */
  @Test
  void aPrebuiltJsonElementHoldingANonFiniteNumberIsRefusedToo() throws Exception {
    Map<String, String> reasons = new LinkedHashMap<>();
    reasons.put("prebuilt", "NaN");
    reasons.put("wrapped", "Infinity");
    // A streaming method called as unary: its chunks are its result.
    reasons.put("prebuiltChunks", "NaN");
    assertRefusedOverGrpc(reasons);
  }

  /** Each method of {@code reasons} answers Call with the provider_error naming its number; then "ok" still answers. */
  private void assertRefusedOverGrpc(Map<String, String> reasons) throws Exception {
    var stub = grpc().withDeadlineAfter(20, TimeUnit.SECONDS);
    for (Map.Entry<String, String> method : reasons.entrySet()) {
      CallReply reply = stub.call(request(method.getKey()));
      assertFalse(reply.getOk(), method.getKey() + ": " + reply.getResultJson().toStringUtf8());
      assertNotJson(reply.getError(), method.getValue() + " is not a JSON number");
    }
    CallReply ok = stub.call(request("ok"));
    assertTrue(ok.getOk());
    assertEquals("{\"score\":1.5}", ok.getResultJson().toStringUtf8());
  }

  @Test
  void aBatchItemHoldingANonFiniteNumberIsThatItemsErrorAlone() throws Exception {
    for (String refused : new String[] {"nan", "prebuilt"}) {
      BatchReply batch = grpc().withDeadlineAfter(20, TimeUnit.SECONDS).callBatch(BatchRequest.newBuilder()
          .addCalls(request("ok")).addCalls(request(refused)).addCalls(request("ok"))
          .build());
      assertEquals(3, batch.getResultsCount());
      assertEquals("{\"score\":1.5}", batch.getResults(0).getResultJson().toStringUtf8());
      assertNotJson(batch.getResults(1).getError(), "NaN is not a JSON number");
      assertEquals("{\"score\":1.5}", batch.getResults(2).getResultJson().toStringUtf8());
    }
  }

  @Test
  void aChunkHoldingANonFiniteNumberEndsItsStreamEvenWhenTheMethodSwallowsTheRefusal() throws Exception {
    var stub = grpc().withDeadlineAfter(20, TimeUnit.SECONDS);
    List<StreamItem> items = new ArrayList<>();
    stub.callStream(request("chunks")).forEachRemaining(items::add);
    assertEquals(2, items.size(), items.toString());
    assertEquals("{\"i\":0}", items.get(0).getChunkJson().toStringUtf8());
    assertNotJson(items.get(1).getError(), "Infinity is not a JSON number");
    assertTrue(streamStopped.await(5, TimeUnit.SECONDS), "the method went on after its chunk was refused");
  }

  @Test
  void aPrebuiltChunkHoldingANonFiniteNumberEndsItsStream() throws Exception {
    List<StreamItem> prebuilt = new ArrayList<>();
    grpc().withDeadlineAfter(20, TimeUnit.SECONDS).callStream(request("prebuiltChunks")).forEachRemaining(prebuilt::add);
    assertEquals(2, prebuilt.size(), prebuilt.toString());
    assertEquals("0", prebuilt.get(0).getChunkJson().toStringUtf8());
    assertNotJson(prebuilt.get(1).getError(), "NaN is not a JSON number");
  }

  @Test
  void anEventHoldingANonFiniteNumberIsNotSentAndSaidOnce() throws Exception {
    assertEventRefusedOverGrpc("emit",
        "event 'bad' not sent: the data of event 'bad' is not JSON: NaN is not a JSON number");
  }

  @Test
  void aPrebuiltEventHoldingANonFiniteNumberIsNotSentAndSaidOnce() throws Exception {
    assertEventRefusedOverGrpc("emitPrebuilt",
        "event 'prebuilt' not sent: the data of event 'prebuilt' is not JSON: -Infinity is not a JSON number");
  }

  /** Calling {@code method} sends the event "good" alone on Events and logs {@code warning}. */
  private void assertEventRefusedOverGrpc(String method, String warning) throws Exception {
    ManagedChannel channel = grpcChannel();
    BlockingQueue<PluginEvent> received = new LinkedBlockingQueue<>();
    var events = PluginServiceGrpc.newStub(channel).events(new StreamObserver<PluginEvent>() {
      @Override public void onNext(PluginEvent event) { received.add(event); }
      @Override public void onError(Throwable error) {}
      @Override public void onCompleted() {}
    });
    // A host event first: once its echo arrives, the stream is registered with the plugin.
    plugin.on("ping", (name, data) -> plugin.emit("pong", data));
    events.onNext(HostEvent.newBuilder().setName("ping").setDataJson(ByteString.copyFromUtf8("1")).build());
    assertEquals("pong", poll(received).getName());

    assertTrue(PluginServiceGrpc.newBlockingStub(channel).call(request(method)).getOk());
    PluginEvent good = poll(received);
    assertEquals("good", good.getName(), "the event JSON cannot carry was not sent");
    assertEquals("{\"x\":1}", good.getDataJson().toStringUtf8());
    assertEquals(List.of(warning), warnings());
    events.onCompleted();
  }

  private static <T> T poll(BlockingQueue<T> queue) throws InterruptedException {
    T item = queue.poll(10, TimeUnit.SECONDS);
    assertNotNull(item, "nothing within 10 s");
    return item;
  }

  private List<String> warnings() {
    synchronized (capture) {
      return logged.stream().filter(record -> record.getLevel() == Level.WARNING)
          .map(LogRecord::getMessage).filter(message -> message.startsWith("event ")).toList();
    }
  }

  // ---- WebSocket ----------------------------------------------------------------------

  private static final AtomicInteger ADDRESSES = new AtomicInteger();

  /** The host's end of a WebSocket session on Netty's in-process transport: the frames it reads. */
  private BlockingQueue<String> websocket(Channel[] host) throws Exception {
    EventLoopGroup loop = new DefaultEventLoopGroup(2);
    PluginService service = new PluginService(plugin, new HealthStatusManager(), true, WsSession.NO_REPLY_CAP);
    BlockingQueue<String> received = new LinkedBlockingQueue<>();
    LocalAddress address = new LocalAddress("non-finite-" + ADDRESSES.incrementAndGet());
    Channel server = new ServerBootstrap().group(loop).channel(LocalServerChannel.class)
        .childHandler(new ChannelInitializer<LocalChannel>() {
          @Override
          protected void initChannel(LocalChannel channel) {
            WsSession session = new WsSession(plugin, service, 1_000, channel);
            channel.pipeline().addLast(new ChannelInboundHandlerAdapter() {
              @Override
              public void channelActive(ChannelHandlerContext ctx) {
                session.begin();
                ctx.fireChannelActive();
              }
            }, session);
          }
        })
        .bind(address).sync().channel();
    host[0] = new Bootstrap().group(loop).channel(LocalChannel.class)
        .handler(new SimpleChannelInboundHandler<TextWebSocketFrame>() {
          @Override
          protected void channelRead0(ChannelHandlerContext ctx, TextWebSocketFrame frame) {
            received.add(frame.text());
          }
        })
        .connect(address).sync().channel();
    cleanups.add(() -> {
      host[0].close().syncUninterruptibly();
      server.close().syncUninterruptibly();
      service.close();
      loop.shutdownGracefully(0, 2, TimeUnit.SECONDS).syncUninterruptibly();
    });
    assertEquals("hello", strictlyParsed(poll(received)).get("type").getAsString());
    return received;
  }

  /** A frame as a strict JSON parser reads it: a bare NaN or Infinity fails here. */
  private static JsonObject strictlyParsed(String frame) throws IOException {
    JsonReader reader = new JsonReader(new StringReader(frame));
    reader.setStrictness(Strictness.STRICT);
    JsonElement value = JsonParser.parseReader(reader);
    assertEquals(JsonToken.END_DOCUMENT, reader.peek(), frame);
    return value.getAsJsonObject();
  }

  private static void send(Channel host, String type, long id, String method) {
    host.writeAndFlush(new TextWebSocketFrame("{\"type\":\"" + type + "\",\"id\":" + id
        + ",\"request\":{\"v\":1,\"plugin\":\"scores\",\"method\":\"" + method + "\",\"params\":{}}}"));
  }

  private static JsonObject response(String frame) throws IOException {
    JsonObject parsed = strictlyParsed(frame);
    assertEquals("response", parsed.get("type").getAsString(), frame);
    return parsed.getAsJsonObject("response");
  }

  private static void assertNotJson(JsonObject response, String reason) {
    assertFalse(response.get("ok").getAsBoolean(), response.toString());
    JsonObject error = response.getAsJsonObject("error");
    assertEquals("provider_error", error.get("type").getAsString());
    assertEquals("the plugin's result is not JSON: " + reason, error.get("message").getAsString());
    assertFalse(error.get("retryable").getAsBoolean());
  }

  @Test
  void overWebSocketAResultIsItsCallsProviderErrorAndAChunkEndsItsStream() throws Exception {
    Channel[] host = new Channel[1];
    BlockingQueue<String> received = websocket(host);
    send(host[0], "call", 1, "nan");
    assertNotJson(response(poll(received)), "NaN is not a JSON number");
    send(host[0], "stream", 3, "chunks");
    assertEquals("{\"type\":\"chunk\",\"id\":3,\"data\":{\"i\":0}}", poll(received));
    assertNotJson(response(poll(received)), "Infinity is not a JSON number");
    assertTrue(streamStopped.await(5, TimeUnit.SECONDS), "the method went on after its chunk was refused");
    send(host[0], "call", 5, "ok");
    assertEquals("{\"type\":\"response\",\"id\":5,\"response\":{\"ok\":true,\"result\":{\"score\":1.5}}}", poll(received));
  }

  @Test
  void overWebSocketAPrebuiltResultOrChunkIsRefusedToo() throws Exception {
    Channel[] host = new Channel[1];
    BlockingQueue<String> received = websocket(host);
    send(host[0], "call", 2, "prebuilt");
    assertNotJson(response(poll(received)), "NaN is not a JSON number");
    send(host[0], "stream", 4, "prebuiltChunks");
    assertEquals("{\"type\":\"chunk\",\"id\":4,\"data\":0}", poll(received));
    assertNotJson(response(poll(received)), "NaN is not a JSON number");

    send(host[0], "call", 5, "ok");
    assertEquals("{\"type\":\"response\",\"id\":5,\"response\":{\"ok\":true,\"result\":{\"score\":1.5}}}", poll(received));
  }

  @Test
  void overWebSocketAnEventHoldingANonFiniteNumberIsNotSent() throws Exception {
    Channel[] host = new Channel[1];
    BlockingQueue<String> received = websocket(host);
    for (String method : new String[] {"emitPrebuilt", "emit"}) {
      send(host[0], "call", 1, method);
      assertEquals("{\"type\":\"event\",\"event\":\"good\",\"data\":{\"x\":1}}", poll(received), method);
      assertEquals("{\"type\":\"response\",\"id\":1,\"response\":{\"ok\":true,\"result\":true}}", poll(received));
    }
    assertEquals(2, warnings().size(), warnings().toString());
  }

  // ---- errors and the encoder ---------------------------------------------------------

  @Test
  void anErrorsDetailsThatJsonCannotCarryAreDroppedAndTheErrorGoes() {
    JsonObject details = new JsonObject();
    details.addProperty("ratio", Double.NaN);
    dev.linchkit.plugin.v1.Error wire = Errors.toWire(new PluginException("Skewed", "ratio unknown", false, details, 0));
    assertEquals("Skewed", wire.getType());
    assertEquals("ratio unknown", wire.getMessage());
    assertTrue(wire.getDetailsJson().isEmpty(), wire.getDetailsJson().toStringUtf8());
  }

  @Test
  void anErrorsInfiniteRetryAfterIsNotWrittenBareOverWebSocket() throws Exception {
    plugin.method("later", (params, ctx) -> {
      throw new PluginException("Busy", "later", true, null, Double.POSITIVE_INFINITY);
    });
    Channel[] host = new Channel[1];
    BlockingQueue<String> received = websocket(host);
    send(host[0], "call", 1, "later");
    JsonObject error = response(poll(received)).getAsJsonObject("error");
    assertEquals("Busy", error.get("type").getAsString());
    assertFalse(error.has("retry_after"), error.toString());
  }

  @Test
  void theEncoderWritesWhatToStringWritesForEveryValueJsonCanCarry() throws Exception {
    JsonObject value = new JsonObject();
    value.addProperty("text", "<a href='x'>&=\u2028\u2029\u0000\"\\\n\t\u007f\u00e9\ud83d\ude00");
    value.add("none", com.google.gson.JsonNull.INSTANCE);
    value.addProperty("double", 1.5e300);
    value.addProperty("float", 1.5f);
    value.addProperty("long", Long.MIN_VALUE);
    value.addProperty("big", new java.math.BigDecimal("12345678901234567890.5"));
    JsonArray array = new JsonArray();
    array.add(true);
    array.add(new JsonObject());
    value.add("array", array);
    assertEquals(value.toString(), ResultJson.text(value, "the plugin's result"));
    assertEquals("null", ResultJson.text(null, "the plugin's result"));
    PluginException refused = assertThrows(PluginException.class,
        () -> ResultJson.text(new JsonPrimitive(Double.NaN), "the plugin's result"));
    assertEquals(NAN_REFUSED, refused.getMessage());
    assertEquals("provider_error", refused.type());
  }
}
