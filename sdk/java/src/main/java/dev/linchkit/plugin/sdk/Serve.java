package dev.linchkit.plugin.sdk;

import com.google.gson.JsonObject;
import io.grpc.BindableService;
import io.grpc.Server;
import io.grpc.ServerInterceptor;
import io.grpc.ServerInterceptors;
import io.grpc.netty.shaded.io.grpc.netty.GrpcSslContexts;
import io.grpc.netty.shaded.io.grpc.netty.NettyServerBuilder;
import io.grpc.netty.shaded.io.netty.channel.ChannelOption;
import io.grpc.netty.shaded.io.netty.channel.EventLoopGroup;
import io.grpc.netty.shaded.io.netty.channel.epoll.EpollEventLoopGroup;
import io.grpc.netty.shaded.io.netty.channel.epoll.EpollServerDomainSocketChannel;
import io.grpc.netty.shaded.io.netty.channel.unix.DomainSocketAddress;
import io.grpc.netty.shaded.io.netty.handler.ssl.ClientAuth;
import io.grpc.netty.shaded.io.netty.handler.ssl.SslContext;
import io.grpc.netty.shaded.io.netty.handler.ssl.SslContextBuilder;
import io.grpc.protobuf.services.HealthStatusManager;
import io.grpc.protobuf.services.ProtoReflectionService;
import io.grpc.protobuf.services.ProtoReflectionServiceV1;
import java.io.IOException;
import java.io.InputStream;
import java.io.PrintStream;
import java.net.InetSocketAddress;
import java.net.SocketAddress;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.Comparator;
import java.util.List;
import java.util.Map;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicBoolean;
import java.util.concurrent.atomic.AtomicReference;
import java.util.logging.Level;
import java.util.stream.Stream;

/**
 * The plugin executable's entry point: {@code Serve.serve(plugin, args)} picks the mode.
 *
 * <ul>
 *   <li>{@code serve --address 127.0.0.1:0}: a plain gRPC service; prints {@code 1|1|tcp|ADDR|grpc|}.
 *       With {@code LINCHKIT_PLUGIN_TOKEN_FILE} or {@code LINCHKIT_PLUGIN_TOKEN} set, every RPC but
 *       health's and reflection's needs {@code authorization: Bearer <token>} ({@link BearerToken});
 *       without either it serves anyone and warns on stderr. With {@code --register-etcd} or
 *       {@code LINCHKIT_REGISTER_ETCD} it registers in etcd while it serves and leaves before it
 *       drains ({@link Registration}, docs/registry.md).
 *   <li>no arguments: a subprocess plugin started by the host with the handshake environment
 *       (docs/protocol.md): cookie, version negotiation, Unix socket or TCP, AutoMTLS. It exits
 *       when its stdin reaches end-of-file, which happens however the host dies. The token
 *       variables are not read: AutoMTLS admits only the host that launched the plugin.
 * </ul>
 * Both serve health and gRPC server reflection (v1 and v1alpha) outside the token: reflection
 * tells only the schema, which proto/plugin.proto publishes anyway. Both stop gracefully on
 * SIGTERM or SIGINT and exit 0. With {@code OTEL_EXPORTER_OTLP_ENDPOINT} or
 * {@code OTEL_EXPORTER_OTLP_TRACES_ENDPOINT} set, both trace each call and send the spans over
 * OTLP/HTTP, the last ones at the end of the stop ({@link Tracing}).
 */
public final class Serve {
  private Serve() {}

  /** What {@code serve --help} prints: the flags, then the environment service mode reads. */
  static final String SERVICE_HELP = String.join("\n",
      Handshake.SERVE_USAGE,
      "",
      "Serve the plugin as a gRPC service until SIGTERM or Ctrl+C; the handshake line",
      "(1|1|tcp|HOST:PORT|grpc|) on stdout tells the port. Without arguments the plugin is",
      "a subprocess started by the dispatcher instead (docs/protocol.md).",
      "",
      "flags:",
      "  --address HOST:PORT  where to listen (default " + Handshake.DEFAULT_SERVICE_ADDRESS + "); port 0 takes any",
      "                       free port; an IPv6 address goes in brackets, e.g. [::1]:0",
      "  --websocket          serve the WebSocket binding instead of gRPC: the dispatcher dials it",
      "                       (provider: websocket, url: ws://HOST:PORT/); the line ends |websocket|",
      "  --config JSON        with --websocket: the JSON object the init hook gets (default {});",
      "                       a gRPC service gets it from the dispatcher's Init call",
      "  -h, --help           this help",
      "",
      "  connect --url ws://HOST/v1/plugins/connect [--config JSON] [--ca-file PEM]",
      "          [--cert-file PEM --key-file PEM]: dial the dispatcher's gateway instead",
      "          (connect --help says more)",

      "",
      "registry flags (docs/registry.md): register the service in etcd while it serves; each",
      "reads the variable in brackets when not given, and a flag wins over its variable:",
      RegistrySettings.help().stripTrailing(),
      "",
      "environment (docs/protocol.md, \"gRPC binding\"):",
      "  " + BearerToken.TOKEN_FILE_ENV,
      "      a file holding the bearer token (a mounted secret): every plugin call must then",
      "      carry the metadata 'authorization: Bearer <token>' (with --websocket: every upgrade",
      "      its Authorization header)",
      "  " + BearerToken.TOKEN_ENV,
      "      the bearer token itself, when there is no file; set one of the two, not both",
      "  Without either, anybody who can reach the address may call the plugin (a warning",
      "  says so on stderr). Health and reflection answer without the token.",
      "  " + Serve.STOP_GRACE_ENV + ", " + Serve.STOP_HOOKS_ENV,
      "      on SIGTERM, the milliseconds the calls in flight get to finish, then the stop and",
      "      destroy hooks together, 0-" + Serve.MAX_STOP_MS + " (default 5000 each; 0 does not wait)",
      "  " + Registration.PASSWORD_ENV,
      "      the password of --register-etcd-user: no flag takes it, a command line shows in ps",
      "  " + OtlpSettings.OTLP_ENDPOINT_ENV + ", " + OtlpSettings.OTLP_TRACES_ENDPOINT_ENV,
      "      export a span per call over OTLP/HTTP (docs/observability.md)",
      "");

  /**
   * Serve {@code plugin} until the host stops it; exits the JVM with 1 on a handshake problem
   * or a mistaken command line, and with 0 after {@code serve --help}.
   */
  /**
   * The largest gRPC message the plugin takes (Call, CallBatch, Events): 64 MiB, the dispatcher's
   * own limit (its channel's grpc.max_receive_message_length and grpc.max_send_message_length), not
   * grpc-java's default 4 MiB. A larger request is refused with RESOURCE_EXHAUSTED, one larger only
   * once decompressed too ({@link OversizedRequests}). grpc-java's
   * server caps no reply; the dispatcher refuses one over the same 64 MiB, so {@link PluginService}
   * answers such a reply with the too-large error instead of sending it.
   */
  public static final int MAX_MESSAGE_BYTES = 64 << 20;

  /**
   * How long the calls in flight at a stop may take to finish before they are cut off and the
   * plugin's stop and destroy hooks run, unless {@link #STOP_GRACE_ENV} sets it: 5 s, as in every
   * SDK (docs/protocol.md, "Stopping while called").
   */
  public static final long STOP_GRACE_SECONDS = 5;

  /**
   * How long the plugin's stop and destroy hooks may take together at a stop, after the calls in
   * flight were drained, unless {@link #STOP_HOOKS_ENV} sets it: 5 s, as in every SDK. A hook
   * still running then is abandoned, with a warning naming it and the cap, and the process exits
   * without it.
   */
  public static final long STOP_HOOKS_SECONDS = 5;

  /**
   * The stop's grace in whole milliseconds, 0 to {@link #MAX_STOP_MS}; read once at start in both
   * modes, a malformed value refused then in one line (exit 1). 0 cuts the calls in flight off at
   * once.
   */
  public static final String STOP_GRACE_ENV = "LINCHKIT_PLUGIN_STOP_GRACE_MS";

  /**
   * The cap on the stop and destroy hooks together in whole milliseconds, 0 to
   * {@link #MAX_STOP_MS}; read as {@link #STOP_GRACE_ENV} is. 0 abandons the hooks at once.
   */
  public static final String STOP_HOOKS_ENV = "LINCHKIT_PLUGIN_STOP_HOOKS_MS";

  /**
   * The most either may be set to: 10 minutes, past any platform's wait between SIGTERM and
   * SIGKILL (more is a mistake in the unit, seconds for milliseconds).
   */
  public static final long MAX_STOP_MS = 600_000;

  public static void serve(Plugin plugin, String[] args) {
    Log.formatRootConsoleUnlessConfigured();
    Log.quietStreamErrors();
    try {
      if (args.length > 0 && args[0].equals("connect")) {
        WsConnect.run(plugin, args, System.getenv()); // reverse mode over WebSocket: exits the JVM itself
        return;
      }
      Handshake.Command command = Handshake.parseCommand(args);
      if (command.helpWanted()) {
        System.out.print(SERVICE_HELP);
        System.out.flush();
        System.exit(0);
      }
      if (command.websocket()) {
        serveWebSocket(plugin, command, System.getenv());
        return;
      }
      Running running;
      if (command.isService()) {
        StopCaps caps = stopCaps(System.getenv(), "serve: ");
        RegistrySettings registry = new RegistrySettings(command.registryFlags(), System.getenv());
        running = serveService(plugin, command.serviceAddress(), BearerToken.configured(System.getenv()), caps,
            registry);
      } else {
        // The handshake first, as every SDK does: run by hand, without the cookie, the plugin
        // says that the dispatcher starts it, whatever else the environment holds.
        Handshake.Config config = Handshake.readEnv(System.getenv());
        running = serveSubprocess(plugin, config, stopCaps(System.getenv(), ""));
      }
      running.awaitTermination();
    } catch (Handshake.HandshakeException error) {
      System.err.println(error.getMessage());
      System.exit(1);
    } catch (Exception error) {
      error.printStackTrace();
      System.exit(1);
    }
  }

  /**
   * Span export for {@code plugin} as {@code env}'s OpenTelemetry variables ask, or null (tracing
   * off). Without an endpoint nothing of OpenTelemetry is loaded: {@link Tracing} is not touched.
   */
  static Tracing tracing(Plugin plugin, Map<String, String> env) {
    OtlpSettings settings = OtlpSettings.fromEnv(env, plugin.id(), ignored -> Log.SDK.warning("tracing: " + ignored));
    return settings == null ? null : Tracing.exporting(settings, plugin);
  }

  /** How long a stop waits, from {@code env}; its refusal says {@code prefix} (the command's) first. */
  static StopCaps stopCaps(Map<String, String> env, String prefix) throws Handshake.HandshakeException {
    try {
      return StopCaps.fromEnv(env);
    } catch (Handshake.HandshakeException malformed) {
      throw new Handshake.HandshakeException(prefix + malformed.getMessage());
    }
  }

  /** A started server and what stopping it takes. */
  private static final class Running {
    private final Plugin plugin;
    private final PluginService service;
    private final Server server;
    private final EventLoopGroup[] loops;
    private final Path cleanup;
    private final StopCaps caps;
    /** The spans to send at the end of the stop; null when tracing is off. */
    private final Tracing tracing;
    /** Leaves the registry before the calls in flight are drained; null when not registered. */
    private final Registration registration;
    private final AtomicBoolean stopping = new AtomicBoolean();
    private final CountDownLatch stopped = new CountDownLatch(1);

    Running(Plugin plugin, PluginService service, Server server, EventLoopGroup[] loops, Path cleanup, StopCaps caps,
        Tracing tracing, Registration registration) {
      this.plugin = plugin;
      this.service = service;
      this.server = server;
      this.loops = loops;
      this.cleanup = cleanup;
      this.caps = caps;
      this.tracing = tracing;
      this.registration = registration;
    }

    /**
     * Health off, Events streams ended, drain the calls in flight ({@code caps.graceMs()} at most,
     * {@link #STOP_GRACE_SECONDS} unless set), then the stop/destroy hooks the host did not run
     * ({@code caps.hooksMs()} at most, {@link #STOP_HOOKS_SECONDS} unless set), then release, and
     * last send the spans still buffered, for what remains of the hooks' cap or 1 s when less
     * remains ({@link Tracing#flushAtStop}). Once: a later call waits for the first to end. Hooks
     * last: a stop hook that closes what the calls use must not pull it from under calls still
     * running.
     */
    void stop() {
      if (!stopping.compareAndSet(false, true)) {
        awaitStopped();
        return;
      }
      try {
        release();
      } finally {
        stopped.countDown();
      }
    }

    /**
     * Stop, then exit the JVM with 0, rather than the JVM's 143 for SIGTERM. In this order, not
     * in a shutdown hook: {@code System.exit} starts {@code LogManager}'s own shutdown hook as
     * well, which takes every logger's handlers away while the stop runs, and the lines the
     * plugin's stop and destroy hooks log were dropped.
     */
    void stopAndExit() {
      stop();
      System.exit(0);
    }

    private void awaitStopped() {
      boolean interrupted = false;
      while (true) {
        try {
          stopped.await();
          break;
        } catch (InterruptedException again) {
          interrupted = true; // the stop is bounded: wait for it all the same
        }
      }
      if (interrupted) Thread.currentThread().interrupt();
    }

    private void release() {
      // First: no dispatcher sends another call once the key is gone, and the server keeps
      // answering the leave delay while they learn it.
      if (registration != null) registration.deregister();
      service.setServing(false);
      service.endEvents();
      server.shutdown();
      try {
        if (!server.awaitTermination(caps.graceMs(), TimeUnit.MILLISECONDS)) server.shutdownNow();
      } catch (InterruptedException interrupted) {
        server.shutdownNow();
        Thread.currentThread().interrupt();
      }
      long hooksLeftMs = runHooksWithinCap(plugin, caps);
      service.close();
      for (EventLoopGroup loop : loops) loop.shutdownGracefully(0, 1, TimeUnit.SECONDS);
      if (cleanup != null) deleteRecursively(cleanup);
      // Last: the calls' spans are all buffered by now, the hooks' own included.
      if (tracing != null) tracing.flushAtStop(hooksLeftMs);
    }

    /** Until a stop has ended: the server terminates within the stop, whose hooks run after. */
    void awaitTermination() throws InterruptedException {
      server.awaitTermination();
      stopped.await();
    }
  }

  /**
   * The stop and destroy hooks {@code plugin} still owes, within {@code caps.hooksMs()}, a hook
   * abandoned still running named in a warning; what remains of the cap (nothing once one was
   * abandoned, all of it with no hook owed), for the spans still buffered.
   */
  static long runHooksWithinCap(Plugin plugin, StopCaps caps) {
    long hooksBegan = System.nanoTime();
    String abandoned = runHooks(plugin, caps.hooksMs());
    if (abandoned != null) {
      Log.atExit(Level.WARNING, "the " + abandoned + " hook did not finish within "
          + StopCaps.seconds(caps.hooksMs()) + " s of the stop; exiting without it", null);
      return 0;
    }
    return Math.max(0, caps.hooksMs() - TimeUnit.NANOSECONDS.toMillis(System.nanoTime() - hooksBegan));
  }

  /**
   * The stop and destroy hooks {@code plugin} still owes, for {@code hooksMs} at most (0: not
   * waited for at all); the name of the hook abandoned still running, or null when they ended.
   * The first owed hook is named before its thread starts: a hook abandoned before its thread
   * ran at all is the one that was about to run.
   */
  static String runHooks(Plugin plugin, long hooksMs) {
    List<String> owed = plugin.owedAtClose();
    if (owed.isEmpty()) return null;
    AtomicReference<String> running = new AtomicReference<>(owed.get(0));
    Thread hooks = new Thread(() -> {
      try {
        plugin.close(owed, running::set);
      } catch (Exception error) {
        Log.atExit(Level.SEVERE, "stop/destroy failed", error);
      }
    }, "plugin-close");
    // A hook stuck on a peer that never answers must not keep the JVM once the stop is done.
    hooks.setDaemon(true);
    hooks.start();
    try {
      if (hooksMs > 0) hooks.join(hooksMs); // join(0) would wait for ever
    } catch (InterruptedException interrupted) {
      Thread.currentThread().interrupt();
    }
    return hooks.isAlive() ? running.get() : null;
  }

  private static Running serveService(Plugin plugin, Handshake.ServiceAddress address, BearerToken token,
      StopCaps caps, RegistrySettings registry) throws Handshake.HandshakeException {
    String host = address.host();
    InetSocketAddress bindAddress = new InetSocketAddress(address.bindHost(), address.port());
    if (bindAddress.isUnresolved()) throw cannotListen(address, "unknown host");
    HealthStatusManager health = new HealthStatusManager();
    Tracing tracing = tracing(plugin, System.getenv());
    PluginService service = new PluginService(plugin, health, true, MAX_MESSAGE_BYTES, tracing);
    // The last interceptor runs first: the token is checked before anything else.
    ServerInterceptor[] interceptors = token == null
        ? new ServerInterceptor[] {PluginService.HEADERS_INTERCEPTOR}
        : new ServerInterceptor[] {PluginService.HEADERS_INTERCEPTOR, token};
    Server server = serving(builder(bindAddress, null), service, health, MAX_MESSAGE_BYTES, interceptors)
        .build();
    try {
      server.start();
    } catch (IOException error) {
      throw cannotListen(address, bindFailure(error));
    }
    Registration registration;
    try {
      // The address bound, as given (0.0.0.0 stays IPv4), with the port the server got.
      registration = Registration.from(registry, new InetSocketAddress(bindAddress.getAddress(), server.getPort()));
    } catch (Handshake.HandshakeException mistake) {
      server.shutdownNow();
      throw new Handshake.HandshakeException("serve: " + mistake.getMessage());
    }
    if (token == null) {
      Log.SDK.warning("no bearer token configured (" + BearerToken.TOKEN_FILE_ENV
          + " or " + BearerToken.TOKEN_ENV + "): anybody who can reach " + host + ":" + server.getPort()
          + " can call this plugin");
    }
    Running running = new Running(plugin, service, server, new EventLoopGroup[0], null, caps, tracing, registration);
    // Before a signal can stop it: a stop waits for the registration's thread to leave.
    if (registration != null) registration.start();
    stopOnSignals(running);
    announce(Handshake.line(1, "tcp", host + ":" + server.getPort(), null));
    return running;
  }

  /**
   * A server builder for {@code address}, in plaintext or with {@code tls} when it is not null, whose
   * connections are read through {@link LateStreams}: a call sent too late for a graceful stop costs
   * no call in flight.
   */
  static NettyServerBuilder builder(SocketAddress address, SslContext tls) {
    return NettyServerBuilder.forAddress(address, LateStreams.credentials(tls));
  }

  /**
   * {@code builder} serving the plugin's services: {@code service} behind {@code interceptors}
   * (the last runs first), health and server reflection, requests of up to
   * {@code maxRequestBytes}, and one over it only once decompressed refused as one over it on
   * the wire is ({@link OversizedRequests}).
   */
  static NettyServerBuilder serving(NettyServerBuilder builder, PluginService service, HealthStatusManager health,
      int maxRequestBytes, ServerInterceptor... interceptors) {
    builder.maxInboundMessageSize(maxRequestBytes)
        .addService(ServerInterceptors.intercept(OversizedRequests.answered(service.bindService(), maxRequestBytes), interceptors));
    for (BindableService other : new BindableService[] {
        health.getHealthService(), ProtoReflectionServiceV1.newInstance(), ProtoReflectionService.newInstance()}) {
      builder.addService(OversizedRequests.answered(other.bindService(), maxRequestBytes));
    }
    return builder;
  }

  private static Handshake.HandshakeException cannotListen(Handshake.ServiceAddress address, String reason) {
    return new Handshake.HandshakeException("serve: cannot listen on " + address + ": " + reason);
  }

  /**
   * The operating system's words for a failed bind ("Address already in use"): Netty wraps them
   * in "Failed to bind to address ..." and, on epoll, prefixes "bind(..) failed: ".
   */
  static String bindFailure(Throwable error) {
    Throwable root = error;
    while (root.getCause() != null && root.getCause() != root) root = root.getCause();
    String message = root.getMessage();
    if (message == null || message.isBlank()) return "the bind failed";
    return message.substring(message.lastIndexOf(": ") + 1).strip();
  }

  private static Running serveSubprocess(Plugin plugin, Handshake.Config config, StopCaps caps) throws Exception {
    HealthStatusManager health = new HealthStatusManager();
    Tracing tracing = tracing(plugin, System.getenv());
    PluginService service = new PluginService(plugin, health, false, MAX_MESSAGE_BYTES, tracing);

    byte[] certDer = null;
    SslContext tls = null;
    if (config.clientCertPem() != null) {
      AutoTls.ServerCertificate certificate = AutoTls.generate();
      certDer = certificate.certificate().getEncoded();
      // The host's one-time certificate is the only trusted root, and it is required.
      tls = GrpcSslContexts.configure(SslContextBuilder.forServer(certificate.privateKey(), certificate.certificate()))
          .trustManager(AutoTls.parsePem(config.clientCertPem()))
          .clientAuth(ClientAuth.REQUIRE)
          .build();
    }

    NettyServerBuilder builder;
    EventLoopGroup[] loops = new EventLoopGroup[0];
    Path cleanup = null;
    String address;
    if (config.network().equals("unix")) {
      Path socket;
      if (config.socketDir() != null) {
        socket = Path.of(config.socketDir(), "plugin-" + ProcessHandle.current().pid() + ".sock");
        cleanup = socket;
      } else {
        cleanup = Files.createTempDirectory("lk-plugin-");
        socket = cleanup.resolve("plugin.sock");
      }
      Files.deleteIfExists(socket);
      loops = new EventLoopGroup[] {new EpollEventLoopGroup(1), new EpollEventLoopGroup(2)};
      builder = builder(new DomainSocketAddress(socket.toString()), tls)
          .channelType(EpollServerDomainSocketChannel.class)
          .bossEventLoopGroup(loops[0])
          .workerEventLoopGroup(loops[1])
          // grpc-java sets SO_KEEPALIVE on every accepted channel; a Unix socket has no such
          // option, and Netty warned "Unknown channel option 'SO_KEEPALIVE'" at each connection
          // (the host logged it as a WARNING). A null value takes the option away again.
          .withChildOption(ChannelOption.SO_KEEPALIVE, null);
      address = socket.toString();
    } else {
      builder = builder(new InetSocketAddress("127.0.0.1", 0), tls);
      address = null;
    }

    Server server = serving(builder, service, health, MAX_MESSAGE_BYTES, PluginService.HEADERS_INTERCEPTOR)
        .build()
        .start();
    if (address == null) address = "127.0.0.1:" + server.getPort();

    Running running = new Running(plugin, service, server, loops, cleanup, caps, tracing, null);
    stopOnSignals(running);
    announce(Handshake.line(config.appVersion(), config.network(), address, certDer));
    watchStdin(running);
    return running;
  }

  /**
   * {@code serve --websocket} ({@link WsServe}): refuses what it would not use (a registry), then
   * listens, runs the plugin's own lifecycle (init with {@code --config}, start: no host sends
   * Init there), says the handshake line ({@code 1|1|tcp|HOST:PORT|websocket|}) and serves until
   * SIGTERM: goaway on each connection within the grace, then the stop and destroy hooks within
   * theirs, then the spans.
   */
  private static void serveWebSocket(Plugin plugin, Handshake.Command command, Map<String, String> env)
      throws Exception {
    RegistrySettings registry = new RegistrySettings(command.registryFlags(), env);
    if (!registry.value(RegistrySettings.Setting.ETCD).isEmpty()) {
      // Refused, not ignored: an operator who set it expects the plugin to be found there.
      throw new Handshake.HandshakeException("serve: " + registry.name(RegistrySettings.Setting.ETCD)
          + ": a WebSocket server is not registered in etcd, as a dispatcher dials a websocket target at its one url"
          + " and finds none in a registry: serve over gRPC to be found there, or leave it unset");
    }
    if (!command.registryFlags().isEmpty()) {
      String flag = "--" + command.registryFlags().keySet().iterator().next();
      throw new Handshake.HandshakeException("serve: " + flag + ": a WebSocket server is not registered, as a dispatcher"
          + " dials a websocket target at its one url and finds none in a registry: serve over gRPC to be registered,"
          + " or leave the flag out");
    }
    BearerToken token;
    try {
      token = BearerToken.configured(env);
    } catch (Handshake.HandshakeException mistake) {
      throw new Handshake.HandshakeException("serve: " + mistake.getMessage());
    }
    StopCaps caps = stopCaps(env, "serve: ");
    JsonObject config = WsLifecycle.config("serve", command.config());
    Handshake.ServiceAddress address = command.serviceAddress();
    InetSocketAddress bindAddress = new InetSocketAddress(address.bindHost(), address.port());
    if (bindAddress.isUnresolved()) throw cannotListen(address, "unknown host");
    Tracing tracing = tracing(plugin, env);
    PluginService service = new PluginService(plugin, new HealthStatusManager(), true, WsSession.NO_REPLY_CAP, tracing);
    // Events emitted while no host is connected wait for the next, as many as every SDK keeps.
    plugin.keepAtMost(WsSession.EVENT_BUFFER);
    WsServe server = new WsServe(plugin, service, token, caps.graceMs());
    int port;
    try {
      port = server.listen(bindAddress);
    } catch (Exception error) {
      throw cannotListen(address, bindFailure(error));
    }
    server.warmUp(port);
    try {
      WsLifecycle.start(plugin, "serve", config);
    } catch (Handshake.HandshakeException failed) {
      server.stop();
      throw failed;
    }
    if (token == null) {
      Log.SDK.warning("no bearer token configured (" + BearerToken.TOKEN_FILE_ENV + " or " + BearerToken.TOKEN_ENV
          + "): anybody who can reach " + address.host() + ":" + port + " can call this plugin");
    }
    CountDownLatch stopped = new CountDownLatch(1);
    AtomicBoolean stopping = new AtomicBoolean();
    Runnable stop = () -> {
      if (!stopping.compareAndSet(false, true)) {
        awaitQuietly(stopped);
        return;
      }
      try {
        server.stop();
        long hooksLeftMs = runHooksWithinCap(plugin, caps);
        service.close();
        if (tracing != null) tracing.flushAtStop(hooksLeftMs);
      } finally {
        stopped.countDown();
      }
    };
    stopOnSignals(() -> {
      stop.run();
      System.exit(0);
    }, stop);
    announce(Handshake.CORE_PROTOCOL_VERSION + "|" + PluginService.PROTOCOL_VERSION + "|tcp|" + address.host() + ":" + port
        + "|websocket|");
    stopped.await();
    Thread.sleep(Long.MAX_VALUE); // the signal's handler exits the JVM once the stop is done
  }

  private static void awaitQuietly(CountDownLatch latch) {
    boolean interrupted = false;
    while (true) {
      try {
        latch.await();
        break;
      } catch (InterruptedException again) {
        interrupted = true; // the stop is bounded: wait for it all the same
      }
    }
    if (interrupted) Thread.currentThread().interrupt();
  }

  /** Prints the handshake line; afterwards stdout goes to stderr, since the host reads no more of it. */
  static void announce(String line) {
    PrintStream stdout = System.out;
    stdout.println(line);
    stdout.flush();
    System.setOut(System.err);
  }

  /** Parent death: the host holds our stdin's write end; end-of-file means it is gone. */
  private static void watchStdin(Running running) {
    Thread watcher = new Thread(() -> {
      byte[] buffer = new byte[256];
      try (InputStream stdin = System.in) {
        while (stdin.read(buffer) != -1) {
          // the host sends nothing; we only wait for end-of-file
        }
      } catch (IOException closed) {
        // same as end-of-file
      }
      running.stopAndExit();
    }, "plugin-stdin-watch");
    watcher.setDaemon(true);
    watcher.start();
  }

  private static void stopOnSignals(Running running) {
    stopOnSignals(running::stopAndExit, running::stop);
  }

  /**
   * SIGTERM/SIGINT run {@code stopAndExit} (a graceful stop, then exit 0); any other exit (the
   * plugin's own System.exit) still runs {@code stop}, in a shutdown hook: there the records the
   * hooks log may be dropped, since LogManager resets alongside it.
   */
  @SuppressWarnings("removal")
  static void stopOnSignals(Runnable stopAndExit, Runnable stop) {
    for (String name : new String[] {"TERM", "INT"}) {
      try {
        sun.misc.Signal.handle(new sun.misc.Signal(name), signal -> stopAndExit.run());
      } catch (IllegalArgumentException unavailable) {
        // fall back to the shutdown hook below
      }
    }
    Runtime.getRuntime().addShutdownHook(new Thread(stop, "plugin-shutdown"));
  }

  private static void deleteRecursively(Path path) {
    try (Stream<Path> walk = Files.walk(path)) {
      walk.sorted(Comparator.reverseOrder()).forEach(each -> each.toFile().delete());
    } catch (IOException ignored) {
      // best effort: a temporary folder
    }
  }
}
