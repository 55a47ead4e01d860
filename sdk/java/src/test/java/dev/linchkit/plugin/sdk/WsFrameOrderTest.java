package dev.linchkit.plugin.sdk;

import static org.junit.jupiter.api.Assertions.assertEquals;
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
import io.netty.channel.ChannelOption;
import io.netty.channel.EventLoopGroup;
import io.netty.channel.MultiThreadIoEventLoopGroup;
import io.netty.channel.SimpleChannelInboundHandler;
import io.netty.channel.WriteBufferWaterMark;
import io.netty.channel.nio.NioIoHandler;
import io.netty.channel.socket.SocketChannel;
import io.netty.channel.socket.nio.NioServerSocketChannel;
import io.netty.channel.socket.nio.NioSocketChannel;
import io.netty.handler.codec.http.websocketx.TextWebSocketFrame;
import io.netty.handler.codec.http.websocketx.WebSocket13FrameDecoder;
import io.netty.handler.codec.http.websocketx.WebSocket13FrameEncoder;
import io.netty.handler.codec.http.websocketx.WebSocketFrameAggregator;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import java.util.concurrent.BlockingQueue;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.LinkedBlockingQueue;
import java.util.concurrent.TimeUnit;
import java.util.function.BooleanSupplier;
import org.junit.jupiter.api.AfterEach;
import org.junit.jupiter.api.BeforeEach;
import org.junit.jupiter.api.Test;

/**
 * The order of what a session sends while its host reads nothing (docs/protocol.md, "Keepalive,
 * limits, backpressure"): every frame goes out in the order the plugin handed it over, and only
 * event frames are dropped, the oldest first, past {@link WsSession#EVENTS_WAITING}. Before, the
 * events waited in a queue of their own while every other frame went straight to Netty, so an
 * answer overtook the events its method had emitted, and a flood dropped the {@code dropped}
 * frame with the count it carried.
 *
 * <p>A real TCP connection on loopback with small socket buffers and a low high water mark, the
 * host's end reading WebSocket frames only when told to: a few events of 16 KiB fill it.
 */
class WsFrameOrderTest {
  private static final int FILL_BYTES = 16 << 10;
  /** The events a flood emits: three times what may wait. */
  private static final int FLOOD = 3 * WsSession.EVENTS_WAITING;

  private final EventLoopGroup loop = new MultiThreadIoEventLoopGroup(2, NioIoHandler.newFactory());
  private final BlockingQueue<String> received = new LinkedBlockingQueue<>();
  /** The method {@code later} has begun; it goes on once {@link #go} is counted down. */
  private final CountDownLatch started = new CountDownLatch(1);
  private final CountDownLatch go = new CountDownLatch(1);
  private Plugin plugin;
  private PluginService service;
  private WsSession session;
  /** The plugin's end of the connection (its writability), and the host's. */
  private Channel pluginEnd;
  private Channel host;

  @BeforeEach
  void plugin() {
    plugin = new Plugin("ordered", "1.0.0", "java");
    plugin.method("later", "emits an event once let go, then answers", (params, ctx) -> {
      started.countDown();
      go.await();
      plugin.emit("marker", Map.of("before", "the answer"));
      return "answer";
    });
    service = new PluginService(plugin, new HealthStatusManager(), true, WsSession.NO_REPLY_CAP);
  }

  @AfterEach
  void close() throws Exception {
    go.countDown();
    if (host != null) host.close().sync();
    service.close();
    loop.shutdownGracefully(0, 2, TimeUnit.SECONDS).sync();
  }

  /**
   * A session served to a host on loopback, begun; the host reads only once {@link #hostReads}
   * says so when {@code reading} is false.
   */
  private void connect(boolean reading) throws Exception {
    CompletableFuture<WsSession> served = new CompletableFuture<>();
    Channel server = new ServerBootstrap().group(loop).channel(NioServerSocketChannel.class)
        .childOption(ChannelOption.SO_SNDBUF, 8 << 10)
        .childOption(ChannelOption.WRITE_BUFFER_WATER_MARK, new WriteBufferWaterMark(8 << 10, 16 << 10))
        .childHandler(new ChannelInitializer<SocketChannel>() {
          @Override
          protected void initChannel(SocketChannel channel) {
            // A long grace: goaway's close must not come while the test reads.
            WsSession each = new WsSession(plugin, service, 30_000, channel);
            channel.pipeline().addLast(
                new WebSocket13FrameDecoder(true, false, WsSession.MAX_MESSAGE_BYTES),
                new WebSocket13FrameEncoder(false),
                new WebSocketFrameAggregator(WsSession.MAX_MESSAGE_BYTES),
                new ChannelInboundHandlerAdapter() {
                  @Override
                  public void channelActive(ChannelHandlerContext ctx) {
                    each.begin();
                    pluginEnd = ctx.channel();
                    served.complete(each);
                    ctx.fireChannelActive();
                  }
                },
                each);
          }
        })
        .bind("127.0.0.1", 0).sync().channel();
    host = new Bootstrap().group(loop).channel(NioSocketChannel.class)
        .option(ChannelOption.SO_RCVBUF, 8 << 10)
        .option(ChannelOption.AUTO_READ, reading)
        .handler(new ChannelInitializer<SocketChannel>() {
          @Override
          protected void initChannel(SocketChannel channel) {
            channel.pipeline().addLast(
                new WebSocket13FrameDecoder(false, false, WsSession.MAX_MESSAGE_BYTES),
                new WebSocket13FrameEncoder(true),
                new WebSocketFrameAggregator(WsSession.MAX_MESSAGE_BYTES),
                new SimpleChannelInboundHandler<TextWebSocketFrame>() {
                  @Override
                  protected void channelRead0(ChannelHandlerContext ctx, TextWebSocketFrame frame) {
                    received.add(frame.text());
                  }
                });
          }
        })
        .connect(server.localAddress()).sync().channel();
    host.closeFuture().addListener(closed -> server.close());
    session = served.get(10, TimeUnit.SECONDS);
    if (reading) assertEquals("hello", type(next()));
  }

  private void hostReads(boolean reading) {
    host.config().setAutoRead(reading);
    if (reading) host.read();
  }

  private String next() throws InterruptedException {
    String frame = received.poll(10, TimeUnit.SECONDS);
    assertNotNull(frame, "no frame within 10 s");
    return frame;
  }

  private static JsonObject json(String frame) {
    return JsonParser.parseString(frame).getAsJsonObject();
  }

  private static String type(String frame) {
    return json(frame).get("type").getAsString();
  }

  private static void until(BooleanSupplier condition, String what) throws InterruptedException {
    long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(10);
    while (!condition.getAsBoolean()) {
      assertTrue(System.nanoTime() < deadline, "not within 10 s: " + what);
      Thread.sleep(5);
    }
  }

  /** The host calls {@code later} while it reads, then stops reading; the method has begun. */
  private void laterIsCalledThenTheHostStopsReading() throws Exception {
    host.writeAndFlush(new TextWebSocketFrame(
        "{\"type\":\"call\",\"id\":1,\"request\":{\"v\":1,\"plugin\":\"ordered\",\"method\":\"later\"}}"));
    assertTrue(started.await(10, TimeUnit.SECONDS), "later did not begin");
    hostReads(false);
  }

  /**
   * Whether the plugin's socket takes no more: Netty's buffer over its high water mark, and
   * still 100 ms later. At first it may only be waiting for a flush into the kernel's buffers,
   * which makes it writable again while they have room.
   */
  private boolean full() throws InterruptedException {
    if (pluginEnd.isWritable()) return false;
    Thread.sleep(100);
    return !pluginEnd.isWritable();
  }

  /** Events of 16 KiB until the plugin's socket takes no more: the events emitted. */
  private int fillUntilFull() throws InterruptedException {
    int filled = 0;
    while (!full()) {
      assertTrue(filled < 200, "the socket still takes writes after " + filled + " events of 16 KiB");
      plugin.emit("fill", Map.of("seq", filled++, "pad", "x".repeat(FILL_BYTES)));
      long deadline = System.nanoTime() + TimeUnit.MILLISECONDS.toNanos(50);
      while (pluginEnd.isWritable() && System.nanoTime() < deadline) Thread.sleep(1);
    }
    return filled;
  }

  /** {@code later} emits its event and answers; the answer has been handed over. */
  private void laterAnswers() throws InterruptedException {
    go.countDown();
    // The call leaves the session's count on the event loop after its answer was handed over.
    until(() -> session.toString().contains("calls=0"), "later answered");
  }

  /** The frames the host reads, up to and including the first that {@code last} accepts. */
  private List<String> readUntil(java.util.function.Predicate<String> last) throws InterruptedException {
    List<String> frames = new ArrayList<>();
    while (true) {
      String frame = next();
      frames.add(frame);
      if (last.test(frame)) return frames;
    }
  }

  @Test
  void anEventEmittedBeforeTheAnswerGoesOutBeforeIt() throws Exception {
    connect(true);
    laterIsCalledThenTheHostStopsReading();
    int filled = fillUntilFull();
    laterAnswers();

    hostReads(true);
    List<String> frames = readUntil(frame -> type(frame).equals("response"));
    List<String> kinds = frames.stream().map(frame -> {
      JsonObject json = json(frame);
      return json.has("event") ? json.get("event").getAsString() : json.get("type").getAsString();
    }).toList();
    assertEquals(filled + 2, frames.size(), kinds.toString());
    assertEquals("marker", kinds.get(filled), "the answer overtook the event emitted before it: " + kinds);
    assertEquals("{\"type\":\"response\",\"id\":1,\"response\":{\"ok\":true,\"result\":\"answer\"}}",
        frames.get(filled + 1));
  }

  @Test
  void aFloodDropsOnlyEventsTheOldestFirstNeverTheAnswerOrGoaway() throws Exception {
    connect(true);
    laterIsCalledThenTheHostStopsReading();
    fillUntilFull();
    laterAnswers();
    for (int seq = 0; seq < FLOOD; seq++) plugin.emit("flood", Map.of("seq", seq));
    session.goAway();
    until(() -> session.toString().contains("goaway=true"), "goaway handed over");

    hostReads(true);
    List<String> frames = readUntil(frame -> type(frame).equals("goaway"));
    int answer = -1;
    List<Integer> floods = new ArrayList<>();
    for (int i = 0; i < frames.size(); i++) {
      JsonObject frame = json(frames.get(i));
      if (type(frames.get(i)).equals("response")) {
        answer = i;
      } else if (frame.has("event") && frame.get("event").getAsString().equals("flood")) {
        assertTrue(answer >= 0, "a flood event went out before the answer handed over before it");
        floods.add(frame.getAsJsonObject("data").get("seq").getAsInt());
      }
    }
    assertTrue(answer >= 0, "the answer was dropped in the flood");
    // In order, the newest that may wait last (the kernel may have taken a few before them),
    // then goaway: the last frame handed over.
    List<Integer> newest = new ArrayList<>();
    for (int seq = FLOOD - WsSession.EVENTS_WAITING; seq < FLOOD; seq++) newest.add(seq);
    assertTrue(floods.size() >= newest.size(), floods.size() + " flood events before goaway");
    for (int i = 1; i < floods.size(); i++) assertTrue(floods.get(i - 1) < floods.get(i), "flood events out of order");
    assertEquals(newest, floods.subList(floods.size() - newest.size(), floods.size()));
    assertEquals("{\"type\":\"goaway\"}", frames.get(frames.size() - 1));
  }

  /**
   * The {@code dropped} frame after the events that waited for a host is never dropped, however
   * many events the plugin emits while the host reads nothing: before, it waited among the
   * events, was the oldest once they had gone, and went with the count it carried.
   */
  @Test
  void theDroppedFrameOutlivesAFloodAndSaysItsCount() throws Exception {
    plugin.keepAtMost(WsSession.EVENT_BUFFER);
    int lostBeforeAHost = 7;
    // 1 KiB each: those that waited fill the socket, and most of them wait on.
    for (int seq = 0; seq < WsSession.EVENT_BUFFER + lostBeforeAHost; seq++) {
      plugin.emit("waited", Map.of("seq", seq, "pad", "w".repeat(1024)));
    }
    connect(false);
    long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(10);
    while (!full()) assertTrue(System.nanoTime() < deadline, "the socket still takes writes after 10 s");
    assertTrue(session.toString().contains("events_waiting="), session.toString());
    for (int seq = 0; seq < FLOOD; seq++) plugin.emit("flood", Map.of("seq", seq));

    hostReads(true);
    List<String> frames = readUntil(frame -> frame.contains("\"flood\"")
        && json(frame).getAsJsonObject("data").get("seq").getAsInt() == FLOOD - 1);
    assertEquals("hello", type(frames.get(0)));
    List<Integer> dropped = new ArrayList<>();
    for (int i = 0; i < frames.size(); i++) {
      if (type(frames.get(i)).equals("dropped")) dropped.add(i);
    }
    assertEquals(1, dropped.size(), "dropped frames at " + dropped + " (none: lost in the flood)");
    int at = dropped.get(0);
    assertEquals("{\"type\":\"dropped\",\"count\":" + lostBeforeAHost + "}", frames.get(at));
    // Those that waited for a host before it, the flood after it.
    for (int i = 1; i < frames.size(); i++) {
      if (i == at) continue;
      JsonObject frame = json(frames.get(i));
      assertEquals("event", type(frames.get(i)), frames.get(i));
      assertEquals(i < at ? "waited" : "flood", frame.get("event").getAsString(), "the frame at " + i);
    }
  }
}
