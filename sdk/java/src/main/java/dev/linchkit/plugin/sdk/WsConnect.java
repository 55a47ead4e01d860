package dev.linchkit.plugin.sdk;

import com.google.gson.JsonObject;
import io.grpc.protobuf.services.HealthStatusManager;
import io.netty.bootstrap.Bootstrap;
import io.netty.channel.Channel;
import io.netty.channel.ChannelFuture;
import io.netty.channel.ChannelHandlerContext;
import io.netty.channel.ChannelInitializer;
import io.netty.channel.ChannelOption;
import io.netty.channel.EventLoopGroup;
import io.netty.channel.MultiThreadIoEventLoopGroup;
import io.netty.channel.SimpleChannelInboundHandler;
import io.netty.channel.WriteBufferWaterMark;
import io.netty.channel.nio.NioIoHandler;
import io.netty.channel.socket.SocketChannel;
import io.netty.channel.socket.nio.NioSocketChannel;
import io.netty.handler.codec.http.DefaultHttpHeaders;
import io.netty.handler.codec.http.FullHttpResponse;
import io.netty.handler.codec.http.HttpClientCodec;
import io.netty.handler.codec.http.HttpHeaders;
import io.netty.handler.codec.http.HttpObjectAggregator;
import io.netty.handler.codec.http.websocketx.WebSocketClientHandshaker;
import io.netty.handler.codec.http.websocketx.WebSocketClientHandshakerFactory;
import io.netty.handler.codec.http.websocketx.WebSocket13FrameDecoder;
import io.netty.handler.codec.http.websocketx.WebSocketDecoderConfig;
import io.netty.handler.codec.http.websocketx.WebSocketFrameAggregator;
import io.netty.handler.codec.http.websocketx.WebSocketFrameDecoder;
import io.netty.handler.codec.http.websocketx.WebSocketVersion;
import io.netty.handler.codec.http.websocketx.extensions.compression.WebSocketClientCompressionHandler;
import io.netty.handler.ssl.SslContext;
import io.netty.handler.ssl.SslHandler;
import java.net.ConnectException;
import java.net.URI;
import java.net.URISyntaxException;
import java.util.Locale;
import java.util.Map;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.ThreadLocalRandom;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicBoolean;
import java.util.concurrent.atomic.AtomicReference;

/**
 * {@code connect} (reverse mode, docs/protocol.md "WebSocket binding"): the plugin dials the
 * dispatcher's gateway ({@code connect --url ws://gateway/v1/plugins/connect}) and takes calls
 * over that one connection (a {@link WsSession}), dialling again after a drop with exponential
 * backoff and full jitter (100 ms doubling to 10 s), reset only by the gateway's
 * {@code welcome}: one that closes every connection at once is never dialled in a tight loop.
 * The gateway's 101 answer to the upgrade says its read cap ({@link
 * WsSession#MAX_MESSAGE_BYTES_HEADER}), taken before the hello: the events kept while no
 * gateway was connected, flushed right after it, and the answers to calls sent before the
 * welcome are held to it; the welcome's {@code max_message_bytes} then replaces it ({@link
 * WsSession}).
 *
 * <p>A 400, 401, 403 or 404 at the upgrade is final, and so is a close 4403 after the hello (it
 * names another id or version than the one admitted, or a protocol the gateway does not speak):
 * the next dial would get the same answer. Each ends the process with one line and status 1.
 * Every other failure (no gateway there, a TLS handshake refused, a close) is said in one line
 * naming the gateway's URL masked, and dialled again.
 *
 * <p>It presents {@code X-Plugin-Id}, {@code X-Plugin-Version} and the token of
 * {@code LINCHKIT_PLUGIN_TOKEN_FILE} or {@code LINCHKIT_PLUGIN_TOKEN}, and offers
 * permessage-deflate on every dial (the gateway agrees where the target says {@code compress:
 * true}). Over {@code wss://} it verifies the gateway ({@link ConnectTls}) before anything is
 * sent. On SIGTERM the session says goaway and the plugin stops dialling; it exits once the
 * gateway has closed the connection, or the stop's grace has passed.
 */
final class WsConnect {
  static final long INITIAL_BACKOFF_MS = 100;
  static final long MAX_BACKOFF_MS = 10_000;
  /** The gateway upgraded the connection but not the hello: the same hello gets the same close. */
  static final int CLOSE_WRONG_PLUGIN = 4403;
  static final String USAGE =
      "connect --url ws://HOST:PORT/v1/plugins/connect [--config JSON] [--ca-file PEM] [--cert-file PEM --key-file PEM] [--help]";

  static final String HELP = String.join("\n",
      "usage: " + USAGE,
      "",
      "Dial the dispatcher's gateway and take calls over that connection until SIGTERM",
      "(docs/protocol.md, \"WebSocket binding\", reverse mode).",
      "",
      "flags:",
      "  --url URL         the gateway's ws[s]://HOST/v1/plugins/connect",
      "  --config JSON     the JSON object the init hook gets (default {})",
      "  --ca-file PEM     wss://: roots that verify the gateway (default: " + ConnectTls.SSL_CERT_FILE_ENV
          + "'s, else the JDK's) [" + ConnectTls.GATEWAY_CA_ENV + "]",
      "  --cert-file PEM   wss://: the client certificate (chain) to log in with, for a gateway that",
      "                    requires one or whose auth.mtls names it as the target's principal ["
          + ConnectTls.CLIENT_CERT_ENV + "]",
      "  --key-file PEM    the unencrypted private key of --cert-file [" + ConnectTls.CLIENT_KEY_ENV + "]",
      "  -h, --help        this help",
      "",
      "environment:",
      "  " + BearerToken.TOKEN_FILE_ENV + ", " + BearerToken.TOKEN_ENV,
      "      the bearer token presented to the gateway",
      "  " + ConnectTls.GATEWAY_CA_ENV + ", " + ConnectTls.CLIENT_CERT_ENV + ", " + ConnectTls.CLIENT_KEY_ENV,
      "      --ca-file, --cert-file and --key-file, where the flag is not given",
      "  " + Serve.STOP_GRACE_ENV + ", " + Serve.STOP_HOOKS_ENV,
      "      on SIGTERM, the milliseconds the gateway gets to finish its calls after goaway,",
      "      then the stop and destroy hooks together, 0-" + Serve.MAX_STOP_MS + " (default 5000 each; 0 does not wait)",
      "");

  /** What the command line says. */
  record Command(String url, String config, String caFile, String certFile, String keyFile, boolean help) {}

  private WsConnect() {}

  /** {@code args} from {@code connect} on; refused in one line that repeats no argument's text. */
  static Command parse(String[] args) throws Handshake.HandshakeException {
    String url = null;
    String config = null;
    String[] tls = new String[3];
    String[] tlsFlags = {"--ca-file", "--cert-file", "--key-file"};
    boolean help = false;
    for (int i = 1; i < args.length; i++) {
      String arg = args[i];
      int equals = arg.indexOf('=');
      String flag = arg.startsWith("--") && equals > 0 ? arg.substring(0, equals) : arg;
      String inline = arg.startsWith("--") && equals > 0 ? arg.substring(equals + 1) : null;
      int tlsIndex = java.util.Arrays.asList(tlsFlags).indexOf(flag);
      if (arg.equals("--help") || arg.equals("-h")) {
        help = true;
      } else if (flag.equals("--url") || flag.equals("--config") || tlsIndex >= 0) {
        String value = inline;
        if (value == null) {
          if (i + 1 >= args.length) throw new Handshake.HandshakeException("connect: " + flag + " needs a value; usage: " + USAGE);
          value = args[++i];
        }
        if (flag.equals("--url")) url = value;
        else if (flag.equals("--config")) config = value;
        else tls[tlsIndex] = value;
      } else {
        throw new Handshake.HandshakeException("connect: " + Handshake.refused(arg, i + 1) + "; usage: " + USAGE);
      }
    }
    if (help) return new Command(null, null, null, null, null, true);
    if (url == null) throw new Handshake.HandshakeException("connect: --url is required; usage: " + USAGE);
    gatewayUri(url);
    return new Command(url, config, tls[0], tls[1], tls[2], false);
  }

  /**
   * {@code text} as a URI the plugin can dial: ws, wss (or http, https, dialled the same way)
   * with a host and a port that is one; else one line, the URL masked. Anything else would be
   * dialled for ever.
   */
  static URI gatewayUri(String text) throws Handshake.HandshakeException {
    Handshake.HandshakeException refused = new Handshake.HandshakeException(
        "connect: --url must be a ws:// or wss:// URL (e.g. ws://127.0.0.1:8080/v1/plugins/connect), not '"
            + maskedUrl(text) + "'");
    URI uri;
    try {
      uri = new URI(text);
    } catch (URISyntaxException malformed) {
      throw refused;
    }
    String scheme = uri.getScheme() == null ? "" : uri.getScheme().toLowerCase(Locale.ROOT);
    if (!(scheme.equals("ws") || scheme.equals("wss") || scheme.equals("http") || scheme.equals("https"))
        || uri.getHost() == null || uri.getHost().isEmpty() || uri.getPort() > 65535) {
      throw refused;
    }
    return uri;
  }

  private static final String URL_MASK = "***";

  /**
   * {@code text} (a URL, or what was meant as one) as a line may show it, as the dispatcher and
   * every SDK show a URL: the password of its userinfo masked (a user without a password whole:
   * a token may be the user), the value of every query item and an item without {@code =}
   * whole; no fragment.
   */
  static String maskedUrl(String text) {
    int hash = text.indexOf('#');
    String written = hash < 0 ? text : text.substring(0, hash);
    int schemeEnd = written.indexOf("://");
    String scheme = schemeEnd < 0 ? "" : written.substring(0, schemeEnd + 3);
    String rest = written.substring(scheme.length());
    int authorityEnd = -1;
    for (int i = 0; i < rest.length(); i++) {
      if (rest.charAt(i) == '/' || rest.charAt(i) == '?') {
        authorityEnd = i;
        break;
      }
    }
    String authority = authorityEnd < 0 ? rest : rest.substring(0, authorityEnd);
    String tail = rest.substring(authority.length());
    int at = authority.lastIndexOf('@');
    if (at >= 0) {
      String userinfo = authority.substring(0, at);
      int colon = userinfo.indexOf(':');
      authority = (colon < 0 ? URL_MASK : userinfo.substring(0, colon) + ":" + URL_MASK) + "@" + authority.substring(at + 1);
    }
    int question = tail.indexOf('?');
    if (question < 0) return scheme + authority + tail;
    String path = tail.substring(0, question);
    String query = tail.substring(question + 1);
    if (query.isEmpty()) return scheme + authority + path;
    StringBuilder masked = new StringBuilder();
    for (String item : query.split("&", -1)) {
      if (masked.length() > 0) masked.append('&');
      int equals = item.indexOf('=');
      masked.append(equals < 0 ? URL_MASK : item.substring(0, equals) + "=" + URL_MASK);
    }
    return scheme + authority + path + "?" + masked;
  }

  /**
   * Runs {@code connect}: refuses what it would not use (a registry), checks the TLS files, runs
   * the plugin's own lifecycle, then dials until a stop; exits the JVM.
   */
  static void run(Plugin plugin, String[] args, Map<String, String> env) throws Exception {
    Command command = parse(args);
    if (command.help()) {
      System.out.print(HELP);
      System.out.flush();
      System.exit(0);
    }
    URI uri = gatewayUri(command.url());
    if (!env.getOrDefault(Registration.ETCD_ENV, "").isEmpty()) {
      // Refused, not ignored: the operator who set it would believe the plugin registered.
      throw new Handshake.HandshakeException("connect: " + Registration.ETCD_ENV + ": a plugin that dials the gateway"
          + " (connect) is not registered in etcd, as no dispatcher dials it: the gateway knows it by its connection."
          + " Serve over gRPC (serve) to be found there, or leave it unset");
    }
    // Before the hooks run, as the URL is checked.
    SslContext tls = ConnectTls.context(command.url(), command.caFile(), command.certFile(), command.keyFile(), env);
    BearerToken token;
    try {
      token = BearerToken.configured(env);
    } catch (Handshake.HandshakeException mistake) {
      throw new Handshake.HandshakeException("connect: " + mistake.getMessage());
    }
    StopCaps caps = Serve.stopCaps(env, "connect: ");
    JsonObject config = WsLifecycle.config("connect", command.config());
    Tracing tracing = Serve.tracing(plugin, env);
    PluginService service = new PluginService(plugin, new HealthStatusManager(), true, WsSession.NO_REPLY_CAP, tracing);
    // Events emitted while no host is connected wait for the next, as many as every SDK keeps.
    plugin.keepAtMost(WsSession.EVENT_BUFFER);
    WsLifecycle.start(plugin, "connect", config);
    new WsConnect.Dialler(plugin, service, uri, command.url(), tls, token, caps, tracing).run();
  }

  /** The dialling loop and its stop; the tests dial one connection of it ({@link #dial}). */
  static final class Dialler {
    private final Plugin plugin;
    private final PluginService service;
    private final URI uri;
    private final String shownUrl;
    private final SslContext tls;
    private final BearerToken token;
    private final StopCaps caps;
    private final Tracing tracing;
    private final EventLoopGroup loop = new MultiThreadIoEventLoopGroup(1, NioIoHandler.newFactory());
    private final AtomicBoolean stopping = new AtomicBoolean();
    private final AtomicReference<WsSession> current = new AtomicReference<>();
    private final CountDownLatch dialled = new CountDownLatch(1);
    private final Object backoff = new Object();

    Dialler(Plugin plugin, PluginService service, URI uri, String url, SslContext tls, BearerToken token, StopCaps caps,
        Tracing tracing) {
      this.plugin = plugin;
      this.service = service;
      this.uri = uri;
      this.shownUrl = maskedUrl(url);
      this.tls = tls;
      this.token = token;
      this.caps = caps;
      this.tracing = tracing;
    }

    /** What one dial came to. */
    record Outcome(WsSession session, int refusedStatus, String failure) {}

    void run() {
      CountDownLatch stopped = new CountDownLatch(1);
      Runnable stop = () -> {
        if (stopping.compareAndSet(false, true)) {
          WsSession session = current.get();
          if (session != null) session.goAway();
          synchronized (backoff) {
            backoff.notifyAll();
          }
          try {
            // The session's own bound: the grace, then the close's wait.
            dialled.await(caps.graceMs() + WsSession.CLOSE_HANDSHAKE_WAIT_MS + 1_000, TimeUnit.MILLISECONDS);
          } catch (InterruptedException interrupted) {
            Thread.currentThread().interrupt();
          }
          finish();
          stopped.countDown();
        } else {
          try {
            stopped.await();
          } catch (InterruptedException interrupted) {
            Thread.currentThread().interrupt();
          }
        }
      };
      Serve.stopOnSignals(() -> {
        stop.run();
        System.exit(0);
      }, stop);
      String refusal = dialUntilStopped();
      dialled.countDown();
      if (refusal != null) {
        stopping.set(true);
        finish();
        System.err.println(refusal);
        System.err.flush();
        Runtime.getRuntime().halt(1); // the shutdown hook's stop is done already
      }
      try {
        stopped.await();
      } catch (InterruptedException interrupted) {
        Thread.currentThread().interrupt();
      }
      try {
        Thread.sleep(Long.MAX_VALUE); // the signal's handler exits the JVM once the stop is done
      } catch (InterruptedException interrupted) {
        Thread.currentThread().interrupt();
      }
    }

    /** The hooks within their cap, the SDK's threads, then the spans. */
    void finish() {
      long hooksLeftMs = Serve.runHooksWithinCap(plugin, caps);
      service.close();
      loop.shutdownGracefully(0, 1, TimeUnit.SECONDS);
      if (tracing != null) tracing.flushAtStop(hooksLeftMs);
    }

    /** Dials until a stop (null) or a final refusal (its line). */
    private String dialUntilStopped() {
      long wait = INITIAL_BACKOFF_MS;
      while (!stopping.get()) {
        Outcome outcome = dial();
        if (outcome.refusedStatus() != 0) {
          return "connect: the gateway refused the connection (" + outcome.refusedStatus() + ")";
        }
        if (outcome.session() != null) {
          WsSession session = outcome.session();
          current.set(session);
          if (stopping.get()) session.goAway();
          session.ended().join();
          current.set(null);
          if (session.welcomed) wait = INITIAL_BACKOFF_MS;
          if (stopping.get()) return null;
          if (session.closeCode == CLOSE_WRONG_PLUGIN) {
            return "connect: the gateway refused the connection (" + CLOSE_WRONG_PLUGIN + "): " + session.closeReason;
          }
        } else if (!stopping.get()) {
          Log.SDK.warning("cannot reach the gateway at " + shownUrl + ": " + outcome.failure() + "; retrying");
        }
        // Full jitter: a gateway coming back is not hit by every plugin at once.
        long sleep = ThreadLocalRandom.current().nextLong(wait + 1);
        synchronized (backoff) {
          long until = System.nanoTime() + TimeUnit.MILLISECONDS.toNanos(sleep);
          while (!stopping.get() && System.nanoTime() < until) {
            try {
              backoff.wait(Math.max(1, TimeUnit.NANOSECONDS.toMillis(until - System.nanoTime())));
            } catch (InterruptedException interrupted) {
              Thread.currentThread().interrupt();
              return null;
            }
          }
        }
        wait = Math.min(wait * 2, MAX_BACKOFF_MS);
      }
      return null;
    }

    /** One dial: the session it opened, the status of an upgrade refused for good, or why it failed. */
    Outcome dial() {
      CompletableFuture<Outcome> outcome = new CompletableFuture<>();
      HttpHeaders headers = new DefaultHttpHeaders()
          .set("X-Plugin-Id", plugin.id())
          .set("X-Plugin-Version", plugin.version());
      if (token != null) headers.set("Authorization", "Bearer " + token.presented().substring("bearer ".length()));
      WebSocketClientHandshaker handshaker = WebSocketClientHandshakerFactory.newHandshaker(
          uri, WebSocketVersion.V13, null, true, headers, WsSession.MAX_MESSAGE_BYTES, true, false);
      boolean secure = uri.getScheme().equalsIgnoreCase("wss") || uri.getScheme().equalsIgnoreCase("https");
      int port = uri.getPort() >= 0 ? uri.getPort() : secure ? 443 : 80;
      Bootstrap bootstrap = new Bootstrap()
          .group(loop)
          .channel(NioSocketChannel.class)
          .option(ChannelOption.TCP_NODELAY, true)
          .option(ChannelOption.CONNECT_TIMEOUT_MILLIS, 30_000)
          .option(ChannelOption.WRITE_BUFFER_WATER_MARK, new WriteBufferWaterMark(512 << 10, 1 << 20))
          .handler(new ChannelInitializer<SocketChannel>() {
            @Override
            protected void initChannel(SocketChannel channel) {
              if (tls != null) {
                SslHandler handler = tls.newHandler(channel.alloc(), uri.getHost(), port);
                // Before the close that follows a failed handshake: why it failed, not that it closed.
                handler.handshakeFuture().addListener(done -> {
                  if (!done.isSuccess()) outcome.complete(new Outcome(null, 0, failure(done.cause())));
                });
                channel.pipeline().addLast(handler);
              }
              channel.pipeline()
                  .addLast(new HttpClientCodec())
                  .addLast(new HttpObjectAggregator(64 << 10))
                  // Offered on every dial; the gateway decides (the manifest's compress).
                  .addLast(new WebSocketClientCompressionHandler(WsSession.MAX_MESSAGE_BYTES))
                  .addLast(new Upgrade(handshaker, outcome));
            }
          });
      ChannelFuture connected = bootstrap.connect(uri.getHost(), port);
      connected.addListener(done -> {
        if (!done.isSuccess()) {
          outcome.complete(new Outcome(null, 0, failure(done.cause())));
        } else {
          // Later than the close itself: a TLS alert closes the channel first and then
          // fires the exception that says why (Upgrade.exceptionCaught), which is the answer.
          Channel channel = connected.channel();
          channel.closeFuture().addListener(closed -> channel.eventLoop().execute(() ->
              outcome.complete(new Outcome(null, 0, "the connection closed before an answer"))));
        }
      });
      try {
        return outcome.get(60, TimeUnit.SECONDS);
      } catch (Exception slow) {
        connected.channel().close();
        return new Outcome(null, 0, "no answer within 60 s");
      }
    }

    /** Why a dial failed, in one line's words that quote no URL. */
    private static String failure(Throwable error) {
      String tlsWords = ConnectTls.whyRefused(error);
      if (tlsWords != null) return tlsWords;
      for (Throwable each = error; each != null; each = each.getCause() == each ? null : each.getCause()) {
        if (each instanceof ConnectException) return "connection refused";
        if (each instanceof java.nio.channels.UnresolvedAddressException || each instanceof java.net.UnknownHostException) {
          return "unknown host";
        }
      }
      Throwable root = error;
      while (root.getCause() != null && root.getCause() != root) root = root.getCause();
      String message = root.getMessage();
      return message == null || message.isBlank() ? root.getClass().getSimpleName() : WsSession.shownReason(message);
    }

    /** Sends the upgrade, reads its answer, and hands an upgraded connection to a session. */
    private final class Upgrade extends SimpleChannelInboundHandler<FullHttpResponse> {
      private final WebSocketClientHandshaker handshaker;
      private final CompletableFuture<Outcome> outcome;

      Upgrade(WebSocketClientHandshaker handshaker, CompletableFuture<Outcome> outcome) {
        this.handshaker = handshaker;
        this.outcome = outcome;
      }

      @Override
      public void channelActive(ChannelHandlerContext ctx) {
        handshaker.handshake(ctx.channel());
        ctx.fireChannelActive();
      }

      @Override
      protected void channelRead0(ChannelHandlerContext ctx, FullHttpResponse response) {
        int status = response.status().code();
        if (status == 400 || status == 401 || status == 403 || status == 404) {
          outcome.complete(new Outcome(null, status, null));
          ctx.close();
          return;
        }
        if (status != 101) {
          outcome.complete(new Outcome(null, 0, "the gateway answered " + status + " instead of an upgrade"));
          ctx.close();
          return;
        }
        Channel channel = ctx.channel();
        try {
          handshaker.finishHandshake(channel, response);
        } catch (RuntimeException refused) {
          outcome.complete(new Outcome(null, 0, "the gateway's upgrade is not WebSocket's"));
          ctx.close();
          return;
        }
        // The handshaker's decoder answers a frame over the limit with a close frame written
        // where no encoder masks it (the host saw 1006): this one leaves the close to the
        // session, which sends 1009 through the encoder. Replaced before the HTTP codec goes,
        // which hands what it read past the 101 to the decoder after it.
        channel.pipeline().replace(WebSocketFrameDecoder.class, "ws-decoder", new WebSocket13FrameDecoder(
            WebSocketDecoderConfig.newBuilder()
                .expectMaskedFrames(false)
                .allowExtensions(true)
                .maxFramePayloadLength(WsSession.MAX_MESSAGE_BYTES)
                .closeOnProtocolViolation(false)
                .withUTF8Validator(false)
                .build()));
        WsSession session = new WsSession(plugin, service, caps.graceMs(), channel);
        // Before the hello: the kept events it flushes, and any answer before the welcome,
        // would otherwise go out up to 8 MiB, which a gateway reading less closes on (1009).
        session.upgradeAnnounced(response.headers());
        channel.pipeline().remove(this);
        channel.pipeline()
            .addLast(new WebSocketFrameAggregator(WsSession.MAX_MESSAGE_BYTES))
            .addLast(session);
        session.begin();
        outcome.complete(new Outcome(session, 0, null));
      }

      @Override
      public void exceptionCaught(ChannelHandlerContext ctx, Throwable cause) {
        outcome.complete(new Outcome(null, 0, failure(cause)));
        ctx.close();
      }
    }
  }
}
