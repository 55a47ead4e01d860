package dev.linchkit.plugin.sdk;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertNotNull;
import static org.junit.jupiter.api.Assertions.assertTrue;

import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import io.grpc.protobuf.services.HealthStatusManager;
import io.netty.bootstrap.Bootstrap;
import io.netty.bootstrap.ServerBootstrap;
import io.netty.channel.Channel;
import io.netty.channel.ChannelHandlerContext;
import io.netty.channel.ChannelInboundHandlerAdapter;
import io.netty.channel.ChannelInitializer;
import io.netty.channel.DefaultEventLoopGroup;
import io.netty.channel.EventLoopGroup;
import io.netty.channel.MultiThreadIoEventLoopGroup;
import io.netty.channel.SimpleChannelInboundHandler;
import io.netty.channel.local.LocalAddress;
import io.netty.channel.local.LocalChannel;
import io.netty.channel.local.LocalServerChannel;
import io.netty.channel.nio.NioIoHandler;
import io.netty.channel.socket.SocketChannel;
import io.netty.channel.socket.nio.NioServerSocketChannel;
import io.netty.handler.codec.http.DefaultHttpHeaders;
import io.netty.handler.codec.http.FullHttpRequest;
import io.netty.handler.codec.http.HttpHeaders;
import io.netty.handler.codec.http.HttpObjectAggregator;
import io.netty.handler.codec.http.HttpServerCodec;
import io.netty.handler.codec.http.websocketx.TextWebSocketFrame;
import io.netty.handler.codec.http.websocketx.WebSocketServerHandshaker;
import io.netty.handler.codec.http.websocketx.WebSocketServerHandshakerFactory;
import java.net.InetSocketAddress;
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.WebSocket;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import java.util.concurrent.BlockingQueue;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.CompletionStage;
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
 * The send cap of a WebSocket session: the host's announced cap (the upgrade request's header;
 * in {@code connect} the same header on the gateway's 101 answer, held from the hello on, then
 * the welcome's field, which replaces it) and what is sent in place of a frame over it. Before, such a frame went out
 * anyway and the host closed the connection 1009, failing every call on it. The session runs on
 * Netty's in-process transport, the host's end a handler that reads the frames as they come.
 */
class WsSendCapTest {
  private static final AtomicInteger ADDRESSES = new AtomicInteger();

  private final EventLoopGroup loop = new DefaultEventLoopGroup(2);
  private final BlockingQueue<String> received = new LinkedBlockingQueue<>();
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
  /** A streaming method's sleep after its refused chunk was interrupted, as a cancel interrupts it. */
  private final CountDownLatch producerStopped = new CountDownLatch(1);
  private Plugin plugin;
  private PluginService service;
  private WsSession session;
  private Channel host;
  /** The session's hello. */
  private JsonObject hello;

  @BeforeEach
  void plugin() {
    plugin = new Plugin("capped", "1.0.0", "java");
    plugin.method("big", "a string of n letters x", (params, ctx) -> "x".repeat((int) new Params(params, "big").integer("n")));
    plugin.method("fails", "fails with a message of n letters x", (params, ctx) -> {
      throw new PluginException("Refused", "x".repeat((int) new Params(params, "fails").integer("n")));
    });
    plugin.method("lines", "n line separators, escaped in JSON", (params, ctx) ->
        "\u2028".repeat((int) new Params(params, "lines").integer("n")));
    plugin.method("emit", "an event of n letters x", (params, ctx) -> {
      plugin.emit("big", "x".repeat((int) new Params(params, "emit").integer("n")));
      return true;
    });
    plugin.streamingMethod("count", "a small chunk, then one of n letters x, then a long sleep", (params, ctx, out) -> {
      out.send(Map.of("i", 0));
      try {
        out.send(Map.of("i", 1, "pad", "x".repeat((int) new Params(params, "count").integer("n"))));
      } catch (PluginException refused) {
        // A method that swallows the refusal is stopped all the same.
      }
      try {
        ctx.sleep(30_000);
      } catch (InterruptedException | PluginException stopped) {
        producerStopped.countDown();
      }
    });
    service = new PluginService(plugin, new HealthStatusManager(), true, WsSession.NO_REPLY_CAP);
    Log.SDK.addHandler(capture);
  }

  @AfterEach
  void close() throws Exception {
    Log.SDK.removeHandler(capture);
    if (host != null) host.close().sync();
    service.close();
    // A quiet moment: the peer's close runs on the loop after the host's.
    loop.shutdownGracefully(100, 2_000, TimeUnit.MILLISECONDS).sync();
  }

  /** A session on a connection of the in-process transport, begun: its hello is read. */
  private void connect() throws Exception {
    LocalAddress address = new LocalAddress("ws-send-cap-" + ADDRESSES.incrementAndGet());
    CompletableFuture<WsSession> served = new CompletableFuture<>();
    new ServerBootstrap().group(loop).channel(LocalServerChannel.class)
        .childHandler(new ChannelInitializer<LocalChannel>() {
          @Override
          protected void initChannel(LocalChannel channel) {
            WsSession each = new WsSession(plugin, service, 1_000, channel);
            channel.pipeline().addLast(new ChannelInboundHandlerAdapter() {
              @Override
              public void channelActive(ChannelHandlerContext ctx) {
                each.begin();
                served.complete(each);
                ctx.fireChannelActive();
              }
            }, each);
          }
        })
        .bind(address).sync();
    host = new Bootstrap().group(loop).channel(LocalChannel.class)
        .handler(new SimpleChannelInboundHandler<TextWebSocketFrame>() {
          @Override
          protected void channelRead0(ChannelHandlerContext ctx, TextWebSocketFrame frame) {
            received.add(frame.text());
          }
        })
        .connect(address).sync().channel();
    session = served.get(5, TimeUnit.SECONDS);
    hello = JsonParser.parseString(next()).getAsJsonObject();
    assertEquals("hello", hello.get("type").getAsString());
  }

  private void hostSends(String frame) {
    host.writeAndFlush(new TextWebSocketFrame(frame));
  }

  private String next() throws InterruptedException {
    String frame = received.poll(10, TimeUnit.SECONDS);
    assertNotNull(frame, "no frame within 10 s");
    return frame;
  }

  private static String type(String frame) {
    return JsonParser.parseString(frame).getAsJsonObject().get("type").getAsString();
  }

  private void call(long id, String method, String params) {
    hostSends("{\"type\":\"call\",\"id\":" + id + ",\"request\":{\"v\":1,\"plugin\":\"capped\",\"method\":\"" + method
        + "\",\"params\":" + params + "}}");
  }

  /** The welcome of a gateway that reads at most 4096 bytes. */
  private void welcome4096() throws Exception {
    hostSends("{\"type\":\"welcome\",\"instance\":\"i-1\",\"max_message_bytes\":4096}");
    // Frames are read in order: the health answer comes once the welcome was read.
    hostSends("{\"type\":\"health\",\"id\":0}");
    assertEquals("health", type(next()));
    assertEquals(4096, session.sendCap());
  }

  /** The host's next frame is the answer of a call that still works: the connection stayed. */
  private void connectionStays(long id) throws Exception {
    call(id, "big", "{\"n\":10}");
    assertEquals("{\"type\":\"response\",\"id\":" + id + ",\"response\":{\"ok\":true,\"result\":\"xxxxxxxxxx\"}}", next());
    assertTrue(host.isActive());
  }

  private static JsonObject error(String frame) {
    JsonObject response = JsonParser.parseString(frame).getAsJsonObject().getAsJsonObject("response");
    assertFalse(response.get("ok").getAsBoolean(), frame);
    return response.getAsJsonObject("error");
  }

  private static void assertTooLarge(JsonObject error, String message, long bytes, long limit) {
    assertEquals("provider_error", error.get("type").getAsString(), error.toString());
    assertEquals(message, error.get("message").getAsString());
    assertFalse(error.get("retryable").getAsBoolean());
    assertEquals(JsonParser.parseString("{\"reason\":\"too_large\",\"bytes\":" + bytes + ",\"limit\":" + limit + "}"),
        error.get("details"));
  }

  @Test
  void aCapIsAnnouncedInDigitsFrom1024To2To53() {
    assertEquals(1024, WsSession.announcedCap("1024"));
    assertEquals(8388608, WsSession.announcedCap("8388608"));
    assertEquals(1L << 53, WsSession.announcedCap("9007199254740992"));
    for (String ignored : new String[] {null, "", "abc", "-5", "+2048", "1e6", "12.5", "100", "1023", " 2048", "2048 ",
        "9007199254740993", "99999999999999999", "00000000000002048", "0x1000", "٢٠٤٨"}) {
      assertEquals(-1, WsSession.announcedCap(ignored), String.valueOf(ignored));
    }
  }

  /** The host sends no call or event larger than the plugin reads: it would close the connection 1009. */
  @Test
  void theHelloSaysTheLargestMessageThePluginReads() throws Exception {
    connect();
    assertEquals(8 << 20, hello.get("max_message_bytes").getAsLong(), hello.toString());
  }

  @Test
  void withoutAnAnnouncementTheCapIsTheSdksOwn8Mib() throws Exception {
    connect();
    assertEquals(8 << 20, session.sendCap());
    hostSends("{\"type\":\"welcome\",\"instance\":\"i-1\"}");
    hostSends("{\"type\":\"health\",\"id\":0}");
    assertEquals("health", type(next()));
    assertEquals(8 << 20, session.sendCap());
    // A result just over 8 MiB is refused, though nobody announced a cap.
    int n = 8 << 20;
    call(1, "big", "{\"n\":" + n + "}");
    long bytes = "{\"type\":\"response\",\"id\":1,\"response\":{\"ok\":true,\"result\":\"\"}}".length() + n;
    assertTooLarge(error(next()), "the result of big is " + bytes + " bytes, over the WebSocket message cap of "
        + (8 << 20) + " bytes", bytes, 8 << 20);
    connectionStays(2);
  }

  @Test
  void anAnnouncementOverTheSdksOwnCapOrNotValidLeavesItsOwn() {
    EmbeddedSession embedded = new EmbeddedSession(plugin, service);
    for (String ignored : new String[] {"16777216", "abc", "-5", "1e6", "12.5", "100"}) {
      embedded.session.hostAnnounced(ignored);
      assertEquals(8 << 20, embedded.session.sendCap(), ignored);
    }
    embedded.session.hostAnnounced("4096");
    assertEquals(4096, embedded.session.sendCap());
    embedded.channel.finishAndReleaseAll();
  }

  @Test
  void aWelcomesCapThatIsNotAnIntegerInRangeIsIgnoredAndTheConnectionStays() throws Exception {
    connect();
    for (String value : new String[] {"\"4096\"", "12.5", "1e6", "-5", "100", "null", "[4096]", "9007199254740993"}) {
      hostSends("{\"type\":\"welcome\",\"instance\":\"i-1\",\"max_message_bytes\":" + value + "}");
      hostSends("{\"type\":\"health\",\"id\":0}");
      assertEquals("health", type(next()), value);
      assertEquals(8 << 20, session.sendCap(), value);
    }
    welcome4096();
    connectionStays(1);
  }

  @Test
  void aResultOverTheCapIsTheTooLargeErrorOfItsIdAndTheConnectionStays() throws Exception {
    connect();
    welcome4096();
    call(1, "big", "{\"n\":5000}");
    long bytes = "{\"type\":\"response\",\"id\":1,\"response\":{\"ok\":true,\"result\":\"\"}}".length() + 5000;
    String frame = next();
    assertEquals(1, JsonParser.parseString(frame).getAsJsonObject().get("id").getAsLong());
    assertTooLarge(error(frame), "the result of big is " + bytes + " bytes, over the WebSocket message cap of 4096 bytes",
        bytes, 4096);
    connectionStays(2);
  }

  @Test
  void aResultOfExactlyTheCapIsSentAsItIs() throws Exception {
    connect();
    welcome4096();
    int n = 4096 - "{\"type\":\"response\",\"id\":1,\"response\":{\"ok\":true,\"result\":\"\"}}".length();
    call(1, "big", "{\"n\":" + n + "}");
    String frame = next();
    assertEquals(4096, frame.getBytes(StandardCharsets.UTF_8).length);
    assertEquals("{\"type\":\"response\",\"id\":1,\"response\":{\"ok\":true,\"result\":\"" + "x".repeat(n) + "\"}}", frame);
  }

  @Test
  void aResultIsMeasuredAsSentWithItsLineSeparatorsEscaped() throws Exception {
    connect();
    welcome4096();
    // 1000 U+2028 are 3000 bytes of UTF-8 but 6000 once escaped as \u2028, as they are sent.
    call(1, "lines", "{\"n\":1000}");
    long bytes = "{\"type\":\"response\",\"id\":1,\"response\":{\"ok\":true,\"result\":\"\"}}".length() + 6000;
    assertTooLarge(error(next()), "the result of lines is " + bytes + " bytes, over the WebSocket message cap of 4096 bytes",
        bytes, 4096);
  }

  @Test
  void anErrorOverTheCapIsTheTooLargeErrorOfItsId() throws Exception {
    connect();
    welcome4096();
    call(1, "fails", "{\"n\":5000}");
    JsonObject error = error(next());
    long bytes = error.getAsJsonObject("details").get("bytes").getAsLong();
    assertTrue(bytes > 5000, error.toString());
    assertTooLarge(error, "the error of fails is " + bytes + " bytes, over the WebSocket message cap of 4096 bytes",
        bytes, 4096);
    connectionStays(2);
  }

  @Test
  void aChunkOverTheCapEndsItsStreamAtOnceAndStopsItsMethod() throws Exception {
    connect();
    welcome4096();
    hostSends("{\"type\":\"stream\",\"id\":1,\"request\":{\"v\":1,\"plugin\":\"capped\",\"method\":\"count\","
        + "\"params\":{\"n\":5000}}}");
    assertEquals("{\"type\":\"chunk\",\"id\":1,\"data\":{\"i\":0}}", next());
    // At once: the method sleeps 30 s after the refused chunk, and is interrupted.
    String frame = next();
    long bytes = "{\"type\":\"chunk\",\"id\":1,\"data\":{\"i\":1,\"pad\":\"\"}}".length() + 5000;
    assertTooLarge(error(frame), "a chunk of count is " + bytes + " bytes, over the WebSocket message cap of 4096 bytes",
        bytes, 4096);
    assertTrue(producerStopped.await(5, TimeUnit.SECONDS), "the method went on after its chunk was refused");
    connectionStays(2);
  }

  @Test
  void anEventOverTheCapIsNotSentAndSaidOnceAConnection() throws Exception {
    connect();
    welcome4096();
    call(1, "emit", "{\"n\":5000}");
    assertEquals("{\"type\":\"response\",\"id\":1,\"response\":{\"ok\":true,\"result\":true}}", next());
    call(2, "emit", "{\"n\":6000}");
    assertEquals("{\"type\":\"response\",\"id\":2,\"response\":{\"ok\":true,\"result\":true}}", next());
    call(3, "emit", "{\"n\":3}");
    assertEquals("{\"type\":\"event\",\"event\":\"big\",\"data\":\"xxx\"}", next());
    assertEquals("{\"type\":\"response\",\"id\":3,\"response\":{\"ok\":true,\"result\":true}}", next());
    List<String> lines;
    synchronized (capture) {
      lines = logged.stream().filter(record -> record.getMessage().startsWith("event ")).map(LogRecord::getMessage).toList();
      assertTrue(logged.stream().filter(record -> record.getMessage().startsWith("event "))
          .allMatch(record -> record.getLevel() == Level.WARNING));
    }
    long bytes = "{\"type\":\"event\",\"event\":\"big\",\"data\":\"\"}".length() + 5000;
    assertEquals(List.of("event big is " + bytes + " bytes, over the WebSocket message cap of 4096 bytes: not sent"), lines);
    assertTrue(received.isEmpty(), received.toString());
  }

  /**
   * serve --websocket: the dispatcher's upgrade announces its cap in a header, which the
   * session takes as its send cap.
   */
  @Test
  void aDiallingHostsHeaderIsTheSendCap() throws Exception {
    WsServe server = new WsServe(plugin, service, null, 1_000);
    int port = server.listen(new InetSocketAddress("127.0.0.1", 0));
    BlockingQueue<String> messages = new LinkedBlockingQueue<>();
    try {
      WebSocket socket = HttpClient.newHttpClient().newWebSocketBuilder()
          .header(WsSession.MAX_MESSAGE_BYTES_HEADER, "4096")
          .buildAsync(URI.create("ws://127.0.0.1:" + port + "/"), new WebSocket.Listener() {
            private final StringBuilder parts = new StringBuilder();

            @Override
            public CompletionStage<?> onText(WebSocket webSocket, CharSequence data, boolean last) {
              parts.append(data);
              if (last) {
                messages.add(parts.toString());
                parts.setLength(0);
              }
              webSocket.request(1);
              return null;
            }
          })
          .get(10, TimeUnit.SECONDS);
      assertEquals("hello", type(messages.poll(10, TimeUnit.SECONDS)));
      socket.sendText("{\"type\":\"call\",\"id\":1,\"request\":{\"v\":1,\"plugin\":\"capped\",\"method\":\"big\","
          + "\"params\":{\"n\":5000}}}", true).get(10, TimeUnit.SECONDS);
      long bytes = "{\"type\":\"response\",\"id\":1,\"response\":{\"ok\":true,\"result\":\"\"}}".length() + 5000;
      assertTooLarge(error(messages.poll(10, TimeUnit.SECONDS)),
          "the result of big is " + bytes + " bytes, over the WebSocket message cap of 4096 bytes", bytes, 4096);
      socket.sendText("{\"type\":\"call\",\"id\":2,\"request\":{\"v\":1,\"plugin\":\"capped\",\"method\":\"big\","
          + "\"params\":{\"n\":3}}}", true).get(10, TimeUnit.SECONDS);
      assertEquals("{\"type\":\"response\",\"id\":2,\"response\":{\"ok\":true,\"result\":\"xxx\"}}",
          messages.poll(10, TimeUnit.SECONDS));
      socket.abort();
    } finally {
      server.stop();
    }
  }

  /** What a test does with a connection the plugin dialled: the gateway's end, what it receives, the session. */
  private interface Dialled {
    void run(Channel gateway, BlockingQueue<String> frames, WsSession session) throws Exception;
  }

  /**
   * {@code connect}: the SDK's dialler dials a raw gateway on loopback whose 101 answer carries
   * a {@link WsSession#MAX_MESSAGE_BYTES_HEADER} for each of {@code capHeaders} and which says no
   * welcome unless {@code body} does; {@code body} runs once the hello arrived.
   */
  private void dialled(List<String> capHeaders, Dialled body) throws Exception {
    EventLoopGroup gatewayLoop = new MultiThreadIoEventLoopGroup(1, NioIoHandler.newFactory());
    BlockingQueue<String> frames = new LinkedBlockingQueue<>();
    CompletableFuture<Channel> upgraded = new CompletableFuture<>();
    WsConnect.Dialler dialler = null;
    try {
      Channel server = new ServerBootstrap().group(gatewayLoop).channel(NioServerSocketChannel.class)
          .childHandler(new ChannelInitializer<SocketChannel>() {
            @Override
            protected void initChannel(SocketChannel channel) {
              channel.pipeline().addLast(new HttpServerCodec(), new HttpObjectAggregator(64 << 10),
                  new SimpleChannelInboundHandler<Object>() {
                    @Override
                    protected void channelRead0(ChannelHandlerContext ctx, Object message) {
                      if (message instanceof FullHttpRequest request) {
                        HttpHeaders answer = new DefaultHttpHeaders();
                        for (String value : capHeaders) answer.add(WsSession.MAX_MESSAGE_BYTES_HEADER, value);
                        WebSocketServerHandshaker handshaker = new WebSocketServerHandshakerFactory(
                            "ws://gateway/v1/plugins/connect", null, false, 1 << 20).newHandshaker(request);
                        handshaker.handshake(ctx.channel(), request, answer, ctx.newPromise())
                            .addListener(done -> upgraded.complete(ctx.channel()));
                      } else if (message instanceof TextWebSocketFrame frame) {
                        frames.add(frame.text());
                      }
                    }
                  });
            }
          })
          .bind("127.0.0.1", 0).sync().channel();
      String url = "ws://127.0.0.1:" + ((InetSocketAddress) server.localAddress()).getPort() + "/v1/plugins/connect";
      PluginService dialling = new PluginService(plugin, new HealthStatusManager(), true, WsSession.NO_REPLY_CAP);
      dialler = new WsConnect.Dialler(plugin, dialling, URI.create(url), url, null, null, new StopCaps(1_000, 1_000), null);
      WsConnect.Dialler.Outcome outcome = dialler.dial();
      assertNotNull(outcome.session(), outcome.failure());
      Channel gateway = upgraded.get(10, TimeUnit.SECONDS);
      assertEquals("hello", type(frames.poll(10, TimeUnit.SECONDS)));
      body.run(gateway, frames, outcome.session());
      gateway.close().sync();
      outcome.session().ended().get(10, TimeUnit.SECONDS);
    } finally {
      if (dialler != null) dialler.finish();
      gatewayLoop.shutdownGracefully(0, 2, TimeUnit.SECONDS).sync();
    }
  }

  private static void gatewayCalls(Channel gateway, long id, String method, String params) {
    gateway.writeAndFlush(new TextWebSocketFrame("{\"type\":\"call\",\"id\":" + id + ",\"request\":{\"v\":1,"
        + "\"plugin\":\"capped\",\"method\":\"" + method + "\",\"params\":" + params + "}}"));
  }

  private static String polled(BlockingQueue<String> frames) throws InterruptedException {
    String frame = frames.poll(10, TimeUnit.SECONDS);
    assertNotNull(frame, "no frame within 10 s");
    return frame;
  }

  private static final String BIG_RESULT_5000 =
      "{\"type\":\"response\",\"id\":1,\"response\":{\"ok\":true,\"result\":\"" + "x".repeat(5000) + "\"}}";

  /**
   * The events the plugin kept while no gateway was connected go out right after the hello,
   * before any welcome: the 101's cap holds them. Before, the large one went out whole, and a
   * gateway reading 4096 bytes closed the connection (1009).
   */
  @Test
  void anEventKeptWhileDisconnectedOverTheUpgradesCapIsNotSentOnConnect() throws Exception {
    plugin.emit("big", "x".repeat(5000));
    plugin.emit("small", "xxx");
    dialled(List.of("4096"), (gateway, frames, session) -> {
      assertEquals("{\"type\":\"event\",\"event\":\"small\",\"data\":\"xxx\"}", polled(frames));
      assertEquals(4096, session.sendCap());
      List<String> lines;
      synchronized (capture) {
        lines = logged.stream().filter(record -> record.getMessage().startsWith("event "))
            .filter(record -> record.getLevel() == Level.WARNING).map(LogRecord::getMessage).toList();
      }
      long bytes = "{\"type\":\"event\",\"event\":\"big\",\"data\":\"\"}".length() + 5000;
      assertEquals(List.of("event big is " + bytes + " bytes, over the WebSocket message cap of 4096 bytes: not sent"), lines);
    });
  }

  @Test
  void anAnswerBeforeAnyWelcomeIsHeldToTheUpgradesCap() throws Exception {
    dialled(List.of("4096"), (gateway, frames, session) -> {
      gatewayCalls(gateway, 1, "big", "{\"n\":5000}");
      long bytes = BIG_RESULT_5000.length();
      assertTooLarge(error(polled(frames)), "the result of big is " + bytes + " bytes, over the WebSocket message cap of 4096 bytes",
          bytes, 4096);
      gatewayCalls(gateway, 2, "big", "{\"n\":3}");
      assertEquals("{\"type\":\"response\",\"id\":2,\"response\":{\"ok\":true,\"result\":\"xxx\"}}", polled(frames));
    });
  }

  @Test
  void aWelcomesValidCapReplacesTheUpgradesAndAnInvalidOneLeavesIt() throws Exception {
    dialled(List.of("4096"), (gateway, frames, session) -> {
      gateway.writeAndFlush(new TextWebSocketFrame("{\"type\":\"welcome\",\"instance\":\"i-1\",\"max_message_bytes\":16384}"));
      gatewayCalls(gateway, 1, "big", "{\"n\":5000}");
      assertEquals(BIG_RESULT_5000, polled(frames));
      assertEquals(16384, session.sendCap());
    });
    dialled(List.of("4096"), (gateway, frames, session) -> {
      gateway.writeAndFlush(new TextWebSocketFrame("{\"type\":\"welcome\",\"instance\":\"i-1\",\"max_message_bytes\":12.5}"));
      gatewayCalls(gateway, 1, "big", "{\"n\":5000}");
      assertEquals("too_large", error(polled(frames)).getAsJsonObject("details").get("reason").getAsString());
      assertEquals(4096, session.sendCap());
    });
  }

  @Test
  void anUpgradesCapThatIsNoValidOneLeavesTheSdksOwn() throws Exception {
    for (List<String> ignored : List.of(List.of("abc"), List.of("-5"), List.of("1e6"), List.of("12.5"), List.of("100"),
        List.of("99999999999999999"), List.of(""), List.of("4096", "4096"))) {
      plugin.emit("big", "x".repeat(5000));
      dialled(ignored, (gateway, frames, session) -> {
        assertEquals(8 << 20, session.sendCap(), ignored.toString());
        assertEquals("{\"type\":\"event\",\"event\":\"big\",\"data\":\"" + "x".repeat(5000) + "\"}", polled(frames));
        gatewayCalls(gateway, 1, "big", "{\"n\":5000}");
        assertEquals(BIG_RESULT_5000, polled(frames), ignored.toString());
      });
    }
  }

  /** A session on an embedded channel, for what needs no frames. */
  private static final class EmbeddedSession {
    final io.netty.channel.embedded.EmbeddedChannel channel = new io.netty.channel.embedded.EmbeddedChannel();
    final WsSession session;

    EmbeddedSession(Plugin plugin, PluginService service) {
      session = new WsSession(plugin, service, 1_000, channel);
      channel.pipeline().addLast(session);
    }
  }
}
