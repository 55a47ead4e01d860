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
import io.netty.buffer.ByteBufUtil;
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
import java.nio.ByteBuffer;
import java.nio.charset.CharacterCodingException;
import java.nio.charset.StandardCharsets;
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
 * A string that is not valid Unicode (a lone UTF-16 surrogate: half an emoji, cut at a char
 * index) in anything a plugin sends, on gRPC and WebSocket alike (the contract of
 * docs/protocol.md, "Response", as for NaN: {@link NonFiniteResultTest}).
 *
 * <p>Until 2026-12-08 Gson wrote the lone surrogate raw and every UTF-8 encoding on the way
 * ({@code String.getBytes}, protobuf's string fields, Netty's text frame) turned it into
 * {@code '?'}: the host got {@code {"text":"smile ?"}} as a good result, the event's data, the
 * error's details and message likewise changed, and nobody was told. Now a result, a batch
 * item, a chunk is the call's {@code provider_error}, an event is not sent (one warning), an
 * error's details are left out and its message and type carry U+FFFD instead.
 */
class NotUnicodeResultTest {
  /** Half an emoji, as a plugin's author makes one: cut at a UTF-16 index. */
  private static final String LONE = "smile 😀".substring(0, 7);
  /** The warning for an event named with {@code LONE}: not sent, where it went with '?'. */
  private static final String NAME_NOT_SENT =
      "event 'bad smile \\ud83d' not sent: its name is not valid Unicode (a lone surrogate)";
  private static final String NOT_UNICODE = "a string is not valid Unicode (a lone surrogate)";
  private static final String REFUSED = "the plugin's result is not JSON: " + NOT_UNICODE;
  /** Valid Unicode beyond Latin-1, an emoji (a surrogate pair) among it: sent unchanged. */
  private static final String EMOJI = "smile 😀 ünïcødé";

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
    plugin = new Plugin("texts", "1.0.0", "java");
    plugin.method("ok", (params, ctx) -> Map.of("text", EMOJI));
    plugin.method("value", (params, ctx) -> Map.of("text", LONE));
    plugin.method("key", (params, ctx) -> Map.of(LONE, 1));
    plugin.method("nested", (params, ctx) -> List.of(1, Map.of("deep", List.of("fine", LONE))));
    plugin.method("string", (params, ctx) -> LONE);
    plugin.method("lowAlone", (params, ctx) -> Map.of("text", "\uDE00 and more"));
    plugin.method("prebuilt", (params, ctx) -> {
      JsonObject result = new JsonObject();
      result.addProperty("text", LONE);
      return result;
    });
    plugin.streamingMethod("chunks", (params, ctx, out) -> {
      out.send(Map.of("i", 0));
      out.send(Map.of("i", 1, "text", EMOJI));
      try {
        out.send(Map.of("i", 2, "text", LONE));
      } catch (PluginException refused) {
        // A method that swallows the refusal: its stream ends all the same.
      }
      try {
        out.send(Map.of("i", 3));
        ctx.sleep(30_000);
      } catch (InterruptedException | PluginException stopped) {
        streamStopped.countDown();
      }
    });
    plugin.streamingMethod("cut", (params, ctx, out) -> {
      out.send(Map.of("i", 0));
      out.send(Map.of("i", 1, "text", LONE));
    });
    plugin.method("emit", (params, ctx) -> {
      plugin.emit("bad", Map.of("text", LONE));
      plugin.emit("bad " + LONE, 1); // a name with no UTF-8 form went with '?' in its place
      plugin.emit("good", Map.of("text", EMOJI));
      return true;
    });
    plugin.method("fails", (params, ctx) -> {
      JsonObject details = new JsonObject();
      details.addProperty("cut", LONE);
      throw new PluginException("Cut" + LONE, "cut at " + LONE + " here", false, details, 0);
    });
    plugin.method("throws", (params, ctx) -> {
      throw new IllegalStateException("\uDE00" + LONE);
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
    ManagedChannel channel = grpcChannel();
    // Each call's own deadline: a stub's is one instant, and the calls of a test add up.
    return PluginServiceGrpc.newBlockingStub(channel).withInterceptors(new io.grpc.ClientInterceptor() {
      @Override
      public <Q, R> io.grpc.ClientCall<Q, R> interceptCall(io.grpc.MethodDescriptor<Q, R> method,
          io.grpc.CallOptions options, io.grpc.Channel next) {
        return next.newCall(method, options.withDeadlineAfter(20, TimeUnit.SECONDS));
      }
    });
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

  /** The bytes as a host decodes them: strictly UTF-8, or the test fails. */
  private static String utf8(ByteString bytes) {
    assertTrue(bytes.isValidUtf8(), "not UTF-8: " + bytes);
    return bytes.toStringUtf8();
  }

  private static void assertNotUnicode(dev.linchkit.plugin.v1.Error error) {
    assertEquals("provider_error", error.getType(), error.toString());
    assertEquals(REFUSED, utf8(error.getMessageBytes()));
    assertFalse(error.getRetryable());
  }

  @Test
  void aResultHoldingALoneSurrogateIsThatCallsProviderErrorAndThePluginServesOn() throws Exception {
    var stub = grpc();
    // A value, an object's key, nested, the whole result, a low surrogate alone, a pre-built
    // tree, and a streaming method called as unary (its chunks are its result).
    for (String method : new String[] {"value", "key", "nested", "string", "lowAlone", "prebuilt", "cut"}) {
      CallReply reply = stub.call(request(method));
      assertFalse(reply.getOk(), method + ": the host got " + reply.getResultJson());
      assertNotUnicode(reply.getError());
    }
    CallReply ok = stub.call(request("ok"));
    assertTrue(ok.getOk());
    assertEquals("{\"text\":\"" + EMOJI + "\"}", utf8(ok.getResultJson()));
  }

  @Test
  void aResultHoldingAnEmojiIsSentUnchanged() throws Exception {
    CallReply ok = grpc().call(request("ok"));
    assertTrue(ok.getOk(), ok.toString());
    assertEquals(ByteString.copyFromUtf8("{\"text\":\"smile \uD83D\uDE00 \u00FCn\u00EFc\u00F8d\u00E9\"}"), ok.getResultJson());
  }

  @Test
  void aBatchItemHoldingALoneSurrogateIsThatItemsErrorAlone() throws Exception {
    BatchReply batch = grpc().callBatch(BatchRequest.newBuilder()
        .addCalls(request("ok")).addCalls(request("value")).addCalls(request("ok"))
        .build());
    assertEquals(3, batch.getResultsCount());
    assertEquals("{\"text\":\"" + EMOJI + "\"}", utf8(batch.getResults(0).getResultJson()));
    assertFalse(batch.getResults(1).getOk(), "the host got " + batch.getResults(1).getResultJson());
    assertNotUnicode(batch.getResults(1).getError());
    assertEquals("{\"text\":\"" + EMOJI + "\"}", utf8(batch.getResults(2).getResultJson()));
  }

  @Test
  void aChunkHoldingALoneSurrogateEndsItsStreamAfterTheChunksBeforeIt() throws Exception {
    List<StreamItem> items = new ArrayList<>();
    grpc().callStream(request("chunks")).forEachRemaining(items::add);
    assertEquals(3, items.size(), items.toString());
    assertEquals("{\"i\":0}", utf8(items.get(0).getChunkJson()));
    assertEquals(JsonParser.parseString("{\"i\":1,\"text\":\"" + EMOJI + "\"}"),
        JsonParser.parseString(utf8(items.get(1).getChunkJson())));
    assertNotUnicode(items.get(2).getError());
    assertTrue(streamStopped.await(5, TimeUnit.SECONDS), "the method went on after its chunk was refused");
  }

  @Test
  void anEventHoldingALoneSurrogateIsNotSentAndSaidOnce() throws Exception {
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

    assertTrue(PluginServiceGrpc.newBlockingStub(channel).call(request("emit")).getOk());
    PluginEvent good = poll(received);
    assertEquals("good", good.getName(), "the event with the lone surrogate was sent: " + good.getDataJson());
    assertEquals("{\"text\":\"" + EMOJI + "\"}", utf8(good.getDataJson()));
    assertEquals(List.of("event 'bad' not sent: the data of event 'bad' is not JSON: " + NOT_UNICODE, NAME_NOT_SENT),
        warnings());
    events.onCompleted();
  }

  @Test
  void anErrorsDetailsHoldingALoneSurrogateAreLeftOutAndItsMessageAndTypeCarryU_FFFD() throws Exception {
    CallReply reply = grpc().call(request("fails"));
    assertFalse(reply.getOk());
    var error = reply.getError();
    assertEquals("Cutsmile \uFFFD", utf8(error.getTypeBytes()));
    assertEquals("cut at smile \uFFFD here", utf8(error.getMessageBytes()));
    assertTrue(error.getDetailsJson().isEmpty(), "the host got details " + error.getDetailsJson());
  }

  @Test
  void anExceptionsMessageWithLoneSurrogatesIsSentWithU_FFFDForEach() throws Exception {
    var error = grpc().call(request("throws")).getError();
    assertEquals("IllegalStateException", error.getType());
    assertEquals("\uFFFDsmile \uFFFD", utf8(error.getMessageBytes()));
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

  /**
   * The host's end of a WebSocket session on Netty's in-process transport: the frames it reads,
   * each decoded from the frame's bytes strictly as UTF-8 (a frame that is not fails the test).
   */
  private BlockingQueue<String> websocket(Channel[] host) throws Exception {
    EventLoopGroup loop = new DefaultEventLoopGroup(2);
    PluginService service = new PluginService(plugin, new HealthStatusManager(), true, WsSession.NO_REPLY_CAP);
    BlockingQueue<String> received = new LinkedBlockingQueue<>();
    LocalAddress address = new LocalAddress("not-unicode-" + ADDRESSES.incrementAndGet());
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
            byte[] bytes = ByteBufUtil.getBytes(frame.content());
            try {
              received.add(StandardCharsets.UTF_8.newDecoder().decode(ByteBuffer.wrap(bytes)).toString());
            } catch (CharacterCodingException notUtf8) {
              received.add("NOT UTF-8: " + ByteBufUtil.hexDump(bytes));
            }
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

  private static JsonObject strictlyParsed(String frame) throws IOException {
    JsonReader reader = new JsonReader(new StringReader(frame));
    reader.setStrictness(Strictness.STRICT);
    JsonElement value = JsonParser.parseReader(reader);
    assertEquals(JsonToken.END_DOCUMENT, reader.peek(), frame);
    return value.getAsJsonObject();
  }

  private static void send(Channel host, String type, long id, String method) {
    host.writeAndFlush(new TextWebSocketFrame("{\"type\":\"" + type + "\",\"id\":" + id
        + ",\"request\":{\"v\":1,\"plugin\":\"texts\",\"method\":\"" + method + "\",\"params\":{}}}"));
  }

  private static JsonObject response(String frame) throws IOException {
    JsonObject parsed = strictlyParsed(frame);
    assertEquals("response", parsed.get("type").getAsString(), frame);
    return parsed.getAsJsonObject("response");
  }

  private static void assertNotUnicode(JsonObject response) {
    assertFalse(response.get("ok").getAsBoolean(), "the host got " + response);
    JsonObject error = response.getAsJsonObject("error");
    assertEquals("provider_error", error.get("type").getAsString());
    assertEquals(REFUSED, error.get("message").getAsString());
    assertFalse(error.get("retryable").getAsBoolean());
  }

  @Test
  void overWebSocketAResultIsItsCallsProviderErrorAndAChunkEndsItsStream() throws Exception {
    Channel[] host = new Channel[1];
    BlockingQueue<String> received = websocket(host);
    send(host[0], "call", 1, "value");
    assertNotUnicode(response(poll(received)));
    send(host[0], "call", 2, "prebuilt");
    assertNotUnicode(response(poll(received)));
    send(host[0], "stream", 3, "chunks");
    assertEquals("{\"type\":\"chunk\",\"id\":3,\"data\":{\"i\":0}}", poll(received));
    assertEquals(JsonParser.parseString("{\"i\":1,\"text\":\"" + EMOJI + "\"}"),
        strictlyParsed(poll(received)).get("data"));
    assertNotUnicode(response(poll(received)));
    assertTrue(streamStopped.await(5, TimeUnit.SECONDS), "the method went on after its chunk was refused");
    send(host[0], "call", 5, "ok");
    assertEquals("{\"type\":\"response\",\"id\":5,\"response\":{\"ok\":true,\"result\":{\"text\":\"" + EMOJI + "\"}}}",
        poll(received));
  }

  @Test
  void overWebSocketAnEventHoldingALoneSurrogateIsNotSentAndAnErrorCarriesU_FFFD() throws Exception {
    Channel[] host = new Channel[1];
    BlockingQueue<String> received = websocket(host);
    send(host[0], "call", 1, "emit");
    assertEquals("{\"type\":\"event\",\"event\":\"good\",\"data\":{\"text\":\"" + EMOJI + "\"}}", poll(received));
    assertEquals("{\"type\":\"response\",\"id\":1,\"response\":{\"ok\":true,\"result\":true}}", poll(received));
    assertEquals(2, warnings().size(), warnings().toString());
    assertEquals(NAME_NOT_SENT, warnings().get(1));

    send(host[0], "call", 2, "fails");
    JsonObject error = response(poll(received)).getAsJsonObject("error");
    assertEquals("Cutsmile \uFFFD", error.get("type").getAsString());
    assertEquals("cut at smile \uFFFD here", error.get("message").getAsString());
    assertFalse(error.has("details"), error.toString());
  }

  // ---- the encoder --------------------------------------------------------------------

  @Test
  void theEncoderRefusesALoneSurrogateWhereverItIsAndPassesEveryPair() throws Exception {
    for (String bad : new String[] {LONE, "\uD83D", "\uDE00", "\uDE00\uD83D", "a\uD83D\nb\uDE00", "\uD83D\u2028\uDE00",
        "\uD83D\"\uDE00", "😀\uD83D", "\uDE00😀", "x".repeat(5000) + "\uDBFF"}) {
      JsonObject value = new JsonObject();
      value.addProperty("text", bad);
      PluginException refused = assertThrows(PluginException.class, () -> ResultJson.text(value, ResultJson.RESULT));
      assertEquals(REFUSED, refused.getMessage());
      assertEquals("provider_error", refused.type());
      JsonObject key = new JsonObject();
      key.addProperty(bad, 1);
      assertThrows(PluginException.class, () -> ResultJson.text(key, ResultJson.RESULT));
    }
    JsonArray fine = new JsonArray();
    fine.add(EMOJI);
    fine.add("\uD800\uDC00\uDBFF\uDFFF\uFFFD\uFFFF");
    fine.add("😀\n😀\u2028");
    assertEquals(fine.toString(), ResultJson.text(fine, ResultJson.RESULT));
    assertEquals(new JsonPrimitive(EMOJI).toString(), ResultJson.text(new JsonPrimitive(EMOJI), ResultJson.RESULT));
  }

  @Test
  void wellFormedReplacesEachLoneSurrogateAndKeepsTheRest() {
    assertEquals("smile \uFFFD", ResultJson.wellFormed(LONE));
    assertEquals("\uFFFD\uFFFD", ResultJson.wellFormed("\uDE00\uD83D"));
    assertEquals("😀\uFFFDx\uFFFD", ResultJson.wellFormed("😀\uD83Dx\uDE00"));
    String valid = EMOJI;
    assertTrue(valid == ResultJson.wellFormed(valid), "a valid string is returned as it is");
    assertEquals(null, ResultJson.wellFormed(null));
  }
}
