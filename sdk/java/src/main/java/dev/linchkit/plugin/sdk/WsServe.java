package dev.linchkit.plugin.sdk;

import com.google.gson.JsonObject;
import io.netty.bootstrap.ServerBootstrap;
import io.netty.buffer.Unpooled;
import io.netty.channel.Channel;
import io.netty.channel.ChannelFutureListener;
import io.netty.channel.ChannelHandlerContext;
import io.netty.channel.ChannelInitializer;
import io.netty.channel.ChannelOption;
import io.netty.channel.EventLoopGroup;
import io.netty.channel.MultiThreadIoEventLoopGroup;
import io.netty.channel.SimpleChannelInboundHandler;
import io.netty.channel.WriteBufferWaterMark;
import io.netty.channel.nio.NioIoHandler;
import io.netty.channel.socket.SocketChannel;
import io.netty.channel.socket.nio.NioServerSocketChannel;
import io.netty.handler.codec.http.DefaultFullHttpResponse;
import io.netty.handler.codec.http.FullHttpRequest;
import io.netty.handler.codec.http.FullHttpResponse;
import io.netty.handler.codec.http.HttpHeaderNames;
import io.netty.handler.codec.http.DefaultFullHttpRequest;
import io.netty.handler.codec.http.EmptyHttpHeaders;
import io.netty.handler.codec.http.HttpObject;
import io.netty.handler.codec.http.HttpRequest;
import io.netty.handler.codec.http.HttpResponseStatus;
import io.netty.handler.codec.http.HttpServerCodec;
import io.netty.handler.codec.http.HttpVersion;
import io.netty.handler.codec.http.websocketx.WebSocketDecoderConfig;
import io.netty.handler.codec.http.websocketx.WebSocketFrameAggregator;
import io.netty.handler.codec.http.websocketx.WebSocketServerHandshaker;
import io.netty.handler.codec.http.websocketx.WebSocketServerHandshakerFactory;
import io.netty.handler.codec.http.websocketx.extensions.compression.WebSocketServerCompressionHandler;
import java.io.IOException;
import java.io.InputStream;
import java.io.OutputStream;
import java.net.InetAddress;
import java.net.InetSocketAddress;
import java.net.Socket;
import java.security.SecureRandom;
import java.util.Base64;
import java.nio.charset.StandardCharsets;
import java.util.Iterator;
import java.util.LinkedHashSet;
import java.util.List;
import java.util.Locale;
import java.util.concurrent.TimeUnit;

/**
 * {@code serve --websocket}: the plugin serves the WebSocket binding and the dispatcher dials it
 * (docs/protocol.md, "WebSocket binding", dial mode: {@code provider: websocket}, {@code url:
 * ws://host:port/}), as the other SDKs' {@code serve --websocket} do. Every path upgrades, and
 * each connection is a {@link WsSession}.
 *
 * <p>Netty, not the JDK: {@code java.net.http.WebSocket} is a client only and has no
 * permessage-deflate, while Netty serves and dials with both, and TLS with client certificates
 * for {@code connect}. grpc-netty-shaded keeps its own Netty under another package, so the two
 * never meet.
 *
 * <p>An upgrade is refused before it happens, in the protocol's JSON error envelope that quotes
 * nothing sent, and its connection closed with the answer: 401 ({@code WWW-Authenticate: Bearer})
 * without the token of {@code LINCHKIT_PLUGIN_TOKEN_FILE} or {@code LINCHKIT_PLUGIN_TOKEN},
 * whatever else was sent, and with more than one {@code Authorization} header; 426 to a request
 * that is no upgrade; 503 once the plugin is stopping, and 503 ({@code overloaded},
 * {@code Retry-After: 1}) past {@link #MAX_CONNECTIONS} connections. Connections that have not
 * sent a whole head count too: at most {@link #MAX_WAITING} at once, the oldest closed to make
 * room, each head due within {@link #HEAD_TIMEOUT_MS} of the connection's opening.
 * permessage-deflate is accepted when the dispatcher offers it (a target with {@code compress:
 * true}), a deflated message inflated up to the 8 MiB limit only. The upgrade's {@link
 * WsSession#MAX_MESSAGE_BYTES_HEADER}, the largest message the dispatcher reads, caps what the
 * session sends (one such header, or it is ignored). No TLS, as in every SDK's
 * WebSocket server: a {@code wss://} url reaches the plugin through a proxy that terminates it.
 */
final class WsServe {
  /** Sessions served at once; past them an upgrade is refused 503, as every SDK's server does. */
  static final int MAX_CONNECTIONS = 1000;
  /** Connections not past their head at once; past them the oldest is closed. */
  static final int MAX_WAITING = 100;
  /** A head must be complete within this of the connection's opening (slowloris). */
  static final long HEAD_TIMEOUT_MS = 10_000;
  /** How long a refused request's connection stays open after the answer, its body read and dropped. */
  static final long LINGER_MS = 1_000;

  private final Plugin plugin;
  private final PluginService service;
  private final BearerToken token;
  private final long graceMs;
  /**
   * One thread accepts and serves every connection: a connection is one loop's for its life,
   * and a dispatcher keeps one per plugin, so more loops would add no throughput (the calls run
   * on the SDK's worker threads). One loop also counts each connection as it is accepted and
   * closes the oldest waiting one at once: with a second loop, 1,200 idle sockets kept 270
   * descriptors open while that loop caught up with its registrations and closes.
   */
  private final EventLoopGroup loop = new MultiThreadIoEventLoopGroup(1, NioIoHandler.newFactory());
  private final WsSession.Sessions sessions = new WsSession.Sessions();
  /** Connections not past their head, oldest first. */
  private final LinkedHashSet<Channel> waiting = new LinkedHashSet<>();
  /** Set under {@link #sessions}' lock, as each session is counted. */
  private volatile boolean closing;
  private int refused;
  private Channel listener;
  /**
   * The header, and its value known to this process only, of the server's own warm-up upgrade
   * ({@link #warmUp}): its session is not a host's, and takes no events.
   */
  static final String WARM_UP_HEADER = "X-LinchKit-Warm-Up";
  private final String warmUpKey = Long.toHexString(new SecureRandom().nextLong()) + Long.toHexString(System.nanoTime());

  WsServe(Plugin plugin, PluginService service, BearerToken token, long graceMs) {
    this.plugin = plugin;
    this.service = service;
    this.token = token;
    this.graceMs = graceMs;
  }

  /** Listens on {@code address}; the port bound (the one asked for, or the one 0 got). */
  int listen(InetSocketAddress address) throws Exception {
    ServerBootstrap bootstrap = new ServerBootstrap()
        .group(loop, loop)
        .channel(NioServerSocketChannel.class)
        .childOption(ChannelOption.TCP_NODELAY, true)
        // A host that does not read stops the session's reading once this much waits.
        .childOption(ChannelOption.WRITE_BUFFER_WATER_MARK, new WriteBufferWaterMark(512 << 10, 1 << 20))
        .childHandler(new ChannelInitializer<SocketChannel>() {
          @Override
          protected void initChannel(SocketChannel channel) {
            waitForHead(channel);
            channel.pipeline()
                .addLast(new HttpServerCodec())
                .addLast(new WebSocketServerCompressionHandler(WsSession.MAX_MESSAGE_BYTES))
                .addLast(new Upgrade());
          }
        });
    try {
      listener = bootstrap.bind(address).sync().channel();
    } catch (Exception error) {
      release();
      throw error;
    }
    return ((InetSocketAddress) listener.localAddress()).getPort();
  }

  /**
   * One upgrade of its own on loopback, with a {@code health} frame, before the handshake line:
   * a JVM runs its first upgrade slowly (classes loaded, code interpreted: 0.3 s alone, over 2 s
   * with five plugins starting on two cores), and the dispatcher dials as soon as the line is out,
   * its first call waiting for that upgrade. Best effort: a failure leaves the first upgrade as
   * slow as it was. The session it opens takes no events ({@link #WARM_UP_HEADER}), so none that
   * waited for a host is sent to it.
   */
  void warmUp(int port) {
    try (Socket socket = new Socket(InetAddress.getLoopbackAddress(), port)) {
      socket.setSoTimeout(5_000);
      String head = "GET / HTTP/1.1\r\nHost: plugin\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
          + "Sec-WebSocket-Key: " + Base64.getEncoder().encodeToString(warmUpKey.getBytes(StandardCharsets.US_ASCII))
          + "\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Extensions: permessage-deflate\r\n"
          + WARM_UP_HEADER + ": " + warmUpKey + "\r\n"
          + (token == null ? "" : "Authorization: " + token.presented() + "\r\n") + "\r\n";
      OutputStream out = socket.getOutputStream();
      out.write(head.getBytes(StandardCharsets.US_ASCII));
      out.flush();
      InputStream in = socket.getInputStream();
      byte[] buffer = new byte[4096];
      int read = 0;
      boolean probed = false;
      // The 101 (frames follow it only: before, they would be read as HTTP), then the hello
      // and the health answer, deflated or not: counted, not read.
      long until = System.nanoTime() + TimeUnit.SECONDS.toNanos(5);
      while (read < buffer.length && System.nanoTime() < until) {
        int n = in.read(buffer, read, buffer.length - read);
        if (n < 0) break;
        read += n;
        if (!probed && frames(buffer, read) >= 0) {
          probed = true;
          // A masked text frame (a zero key) of one health probe.
          byte[] health = "{\"type\":\"health\",\"id\":0}".getBytes(StandardCharsets.US_ASCII);
          out.write(new byte[] {(byte) 0x81, (byte) (0x80 | health.length), 0, 0, 0, 0});
          out.write(health);
          out.flush();
        }
        if (frames(buffer, read) >= 2) break;
      }
    } catch (IOException | RuntimeException ignored) {
      // best effort
    }
  }

  /** Whole frames after the 101's head in {@code buffer}'s first {@code length} bytes; -1 before its end. */
  private static int frames(byte[] buffer, int length) {
    String text = new String(buffer, 0, length, StandardCharsets.ISO_8859_1);
    int at = text.indexOf("\r\n\r\n");
    if (at < 0) return -1;
    int count = 0;
    for (int i = at + 4; i + 1 < length; count++) {
      int size = buffer[i + 1] & 0x7f;
      if (size == 126) {
        if (i + 3 >= length) break;
        size = ((buffer[i + 2] & 0xff) << 8) | (buffer[i + 3] & 0xff);
        i += 2;
      } else if (size == 127) {
        break;
      }
      i += 2 + size;
      if (i > length) break;
    }
    return count;
  }

  /** Counts {@code channel} until its head is read or it closes; closes the oldest past {@link #MAX_WAITING}. */
  private void waitForHead(Channel channel) {
    Channel oldest = null;
    synchronized (waiting) {
      waiting.add(channel);
      if (waiting.size() > MAX_WAITING) {
        Iterator<Channel> first = waiting.iterator();
        oldest = first.next();
        first.remove();
      }
    }
    if (oldest != null) oldest.close();
    channel.closeFuture().addListener(closed -> headRead(channel));
    channel.eventLoop().schedule(() -> {
      boolean late;
      synchronized (waiting) {
        late = waiting.remove(channel);
      }
      if (late) channel.close();
    }, HEAD_TIMEOUT_MS, TimeUnit.MILLISECONDS);
  }

  private void headRead(Channel channel) {
    synchronized (waiting) {
      waiting.remove(channel);
    }
  }

  /**
   * The stop: no new connection (the listener closes, and so do those not upgraded), goaway on
   * each session and a wait for them to end, each within the grace and the close's wait.
   */
  void stop() {
    synchronized (sessions) {
      closing = true;
    }
    if (listener != null) listener.close().awaitUninterruptibly();
    List<Channel> unfinished;
    synchronized (waiting) {
      unfinished = List.copyOf(waiting);
    }
    for (Channel channel : unfinished) channel.close();
    sessions.goAwayAndWait(graceMs);
    release();
  }

  private void release() {
    loop.shutdownGracefully(0, 1, TimeUnit.SECONDS);
  }

  @Override
  public String toString() {
    return "WsServe(" + plugin.id() + ", sessions=" + sessions.size() + "/" + MAX_CONNECTIONS + ", refused=" + refused
        + ", closing=" + closing + ", token=" + (token != null) + ")";
  }

  /** Reads one request: refuses it, or upgrades it and hands the connection to a session. */
  /**
   * Reads one request's head: refuses it, or upgrades it and hands the connection to a session.
   * Its body is never read whole, only dropped: a peer without the token is answered 401 by its
   * head, however large a body follows (an aggregator answered a 100 KB one 413 and hung).
   */
  private final class Upgrade extends SimpleChannelInboundHandler<HttpObject> {
    /** The head was answered: what follows (a body, another request) is dropped. */
    private boolean answered;

    @Override
    protected void channelRead0(ChannelHandlerContext ctx, HttpObject message) {
      if (answered || !(message instanceof HttpRequest head)) return;
      answered = true;
      FullHttpRequest request = new DefaultFullHttpRequest(head.protocolVersion(), head.method(), head.uri(),
          Unpooled.EMPTY_BUFFER, head.headers(), EmptyHttpHeaders.INSTANCE);
      request.setDecoderResult(head.decoderResult());
      headRead(ctx.channel());
      // The token first: a caller without it learns nothing else, not even whether the
      // plugin is stopping or what its request lacked.
      List<String> authorization = request.headers().getAll(HttpHeaderNames.AUTHORIZATION);
      if (token != null && (authorization.size() != 1 || !token.admits(authorization.get(0)))) {
        refuse(ctx, HttpResponseStatus.UNAUTHORIZED, "unauthorized", BearerToken.UNAUTHENTICATED, false, 0);
        return;
      }
      if (!request.decoderResult().isSuccess()) {
        refuse(ctx, HttpResponseStatus.BAD_REQUEST, "invalid_params", "a malformed request", false, 0);
        return;
      }
      if (!hasToken(request, HttpHeaderNames.CONNECTION, "upgrade") || !hasToken(request, HttpHeaderNames.UPGRADE, "websocket")) {
        refuse(ctx, HttpResponseStatus.UPGRADE_REQUIRED, "invalid_params", "this plugin speaks WebSocket: send an upgrade", false, 0);
        return;
      }
      Channel channel = ctx.channel();
      boolean host = !warmUpKey.equals(request.headers().get(WARM_UP_HEADER));
      WsSession session = new WsSession(plugin, service, graceMs, channel, host);
      session.upgradeAnnounced(request.headers());
      boolean stopping;
      boolean full = false;
      boolean first = false;
      // One lock with the stop's: a session is either refused, or counted before the stop
      // says goaway to every session.
      synchronized (sessions) {
        stopping = closing;
        if (!stopping && sessions.size() >= MAX_CONNECTIONS) {
          full = true;
          first = ++refused == 1;
        }
        if (!stopping && !full) sessions.add(session);
      }
      if (stopping) {
        refuse(ctx, HttpResponseStatus.SERVICE_UNAVAILABLE, "target_unavailable", "the plugin is stopping", true, 0);
        return;
      }
      if (full) {
        if (first) { // once: a flood would otherwise write a line per upgrade
          Log.SDK.warning("serve --websocket holds " + MAX_CONNECTIONS + " connections, its most; refusing more with 503"
              + " until one closes");
        }
        refuse(ctx, HttpResponseStatus.SERVICE_UNAVAILABLE, "overloaded", "this plugin holds as many WebSocket connections"
            + " as it takes (" + MAX_CONNECTIONS + "): dial again shortly", true, 1);
        return;
      }
      WebSocketDecoderConfig config = WebSocketDecoderConfig.newBuilder()
          .maxFramePayloadLength(WsSession.MAX_MESSAGE_BYTES)
          .allowExtensions(true)
          // The session closes (1009 past the limit), as a dialling plugin's does.
          .closeOnProtocolViolation(false)
          // Not UTF-8 is the session's to answer, with an error frame: the connection stays.
          .withUTF8Validator(false)
          .build();
      WebSocketServerHandshaker handshaker =
          new WebSocketServerHandshakerFactory("ws://plugin/", null, config).newHandshaker(request);
      if (handshaker == null) {
        WebSocketServerHandshakerFactory.sendUnsupportedVersionResponse(channel).addListener(ChannelFutureListener.CLOSE);
        return;
      }
      handshaker.handshake(channel, request).addListener(upgraded -> {
        if (!upgraded.isSuccess()) {
          channel.close();
          return;
        }
        channel.pipeline().remove(Upgrade.this);
        channel.pipeline()
            .addLast(new WebSocketFrameAggregator(WsSession.MAX_MESSAGE_BYTES))
            .addLast(session);
        session.begin();
      });
    }

    @Override
    public void exceptionCaught(ChannelHandlerContext ctx, Throwable cause) {
      ctx.close(); // a reset or a malformed request: its connection ends, quietly
    }
  }

  /** Whether one of the comma-separated values of header {@code name} is {@code token}, in any case. */
  private static boolean hasToken(FullHttpRequest request, CharSequence name, String token) {
    for (String value : request.headers().getAll(name)) {
      for (String each : value.split(",")) {
        if (each.strip().toLowerCase(Locale.ROOT).equals(token)) return true;
      }
    }
    return false;
  }

  /** Answers with the protocol's error envelope and closes the connection with the answer. */
  private static void refuse(ChannelHandlerContext ctx, HttpResponseStatus status, String type, String message,
      boolean retryable, int retryAfter) {
    JsonObject error = new JsonObject();
    error.addProperty("type", type);
    error.addProperty("message", message);
    error.addProperty("retryable", retryable);
    if (retryAfter > 0) error.addProperty("retry_after", retryAfter);
    JsonObject envelope = new JsonObject();
    envelope.addProperty("ok", false);
    envelope.add("error", error);
    byte[] body = envelope.toString().getBytes(StandardCharsets.UTF_8);
    FullHttpResponse response = new DefaultFullHttpResponse(HttpVersion.HTTP_1_1, status, Unpooled.wrappedBuffer(body));
    response.headers()
        .set(HttpHeaderNames.CONTENT_TYPE, "application/json")
        .set(HttpHeaderNames.CONTENT_LENGTH, body.length)
        .set(HttpHeaderNames.CONNECTION, "close");
    if (status == HttpResponseStatus.UNAUTHORIZED) response.headers().set(HttpHeaderNames.WWW_AUTHENTICATE, "Bearer");
    if (status == HttpResponseStatus.UPGRADE_REQUIRED) response.headers().set(HttpHeaderNames.UPGRADE, "websocket");
    if (retryAfter > 0) response.headers().set(HttpHeaderNames.RETRY_AFTER, retryAfter);
    // Its output shut, its input read and dropped a moment more, then closed: closed with a
    // body still unread, the kernel would reset the connection and the answer could be lost.
    Channel channel = ctx.channel();
    ctx.writeAndFlush(response).addListener(written -> {
      if (channel instanceof SocketChannel socket && written.isSuccess()) {
        socket.shutdownOutput();
        channel.eventLoop().schedule(() -> channel.close(), LINGER_MS, TimeUnit.MILLISECONDS);
      } else {
        channel.close();
      }
    });
  }
}
