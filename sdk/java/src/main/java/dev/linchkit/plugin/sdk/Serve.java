package dev.linchkit.plugin.sdk;

import io.grpc.Server;
import io.grpc.ServerInterceptors;
import io.grpc.netty.shaded.io.grpc.netty.GrpcSslContexts;
import io.grpc.netty.shaded.io.grpc.netty.NettyServerBuilder;
import io.grpc.netty.shaded.io.netty.channel.EventLoopGroup;
import io.grpc.netty.shaded.io.netty.channel.epoll.EpollEventLoopGroup;
import io.grpc.netty.shaded.io.netty.channel.epoll.EpollServerDomainSocketChannel;
import io.grpc.netty.shaded.io.netty.channel.unix.DomainSocketAddress;
import io.grpc.netty.shaded.io.netty.handler.ssl.ClientAuth;
import io.grpc.netty.shaded.io.netty.handler.ssl.SslContextBuilder;
import io.grpc.protobuf.services.HealthStatusManager;
import io.grpc.protobuf.services.ProtoReflectionService;
import io.grpc.protobuf.services.ProtoReflectionServiceV1;
import java.io.IOException;
import java.io.InputStream;
import java.io.PrintStream;
import java.net.InetSocketAddress;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.Comparator;
import java.util.Map;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicBoolean;
import java.util.stream.Stream;

/**
 * The plugin executable's entry point: {@code Serve.serve(plugin, args)} picks the mode.
 *
 * <ul>
 *   <li>{@code serve --address 127.0.0.1:0}: a plain gRPC service; prints {@code 1|1|tcp|ADDR|grpc|}.
 *       With {@code LINCHKIT_PLUGIN_TOKEN_FILE} or {@code LINCHKIT_PLUGIN_TOKEN} set, every RPC but
 *       health's and reflection's needs {@code authorization: Bearer <token>} ({@link BearerToken});
 *       without either it serves anyone and warns on stderr.
 *   <li>no arguments: a subprocess plugin started by the host with the handshake environment
 *       (docs/protocol.md): cookie, version negotiation, Unix socket or TCP, AutoMTLS. It exits
 *       when its stdin reaches end-of-file, which happens however the host dies. The token
 *       variables are not read: AutoMTLS admits only the host that launched the plugin.
 * </ul>
 * Both serve health and gRPC server reflection (v1 and v1alpha) outside the token: reflection
 * tells only the schema, which proto/plugin.proto publishes anyway. Both stop gracefully on
 * SIGTERM or SIGINT and exit 0.
 */
public final class Serve {
  private Serve() {}

  /** Serve {@code plugin} until the host stops it; exits the JVM with 1 on a handshake problem. */
  public static void serve(Plugin plugin, String[] args) {
    try {
      Handshake.Command command = Handshake.parseCommand(args);
      Running running = command.isService()
          ? serveService(plugin, command.serviceAddress(), BearerToken.configured(System.getenv()))
          : serveSubprocess(plugin, System.getenv());
      running.awaitTermination();
    } catch (Handshake.HandshakeException error) {
      System.err.println(error.getMessage());
      System.exit(1);
    } catch (Exception error) {
      error.printStackTrace();
      System.exit(1);
    }
  }

  /** A started server and what stopping it takes. */
  private static final class Running {
    private final Plugin plugin;
    private final PluginService service;
    private final Server server;
    private final EventLoopGroup[] loops;
    private final Path cleanup;
    private final AtomicBoolean stopping = new AtomicBoolean();

    Running(Plugin plugin, PluginService service, Server server, EventLoopGroup[] loops, Path cleanup) {
      this.plugin = plugin;
      this.service = service;
      this.server = server;
      this.loops = loops;
      this.cleanup = cleanup;
    }

    /** Health off, stop/destroy hooks if the host did not run them, drain, release. Once. */
    void stop() {
      if (!stopping.compareAndSet(false, true)) return;
      service.setServing(false);
      Thread hooks = new Thread(() -> {
        try {
          plugin.close();
        } catch (Exception error) {
          System.err.println("linchkit plugin: stop/destroy failed: " + error);
        }
      }, "plugin-close");
      hooks.start();
      try {
        hooks.join(5000);
        server.shutdown();
        if (!server.awaitTermination(2, TimeUnit.SECONDS)) server.shutdownNow();
      } catch (InterruptedException interrupted) {
        server.shutdownNow();
        Thread.currentThread().interrupt();
      }
      service.close();
      for (EventLoopGroup loop : loops) loop.shutdownGracefully(0, 1, TimeUnit.SECONDS);
      if (cleanup != null) deleteRecursively(cleanup);
    }

    void awaitTermination() throws InterruptedException {
      server.awaitTermination();
    }
  }

  private static Running serveService(Plugin plugin, String address, BearerToken token) throws IOException {
    int colon = address.lastIndexOf(':');
    String host = address.substring(0, colon);
    int port = Integer.parseInt(address.substring(colon + 1));
    String bindHost = host.startsWith("[") ? host.substring(1, host.length() - 1) : host;
    HealthStatusManager health = new HealthStatusManager();
    PluginService service = new PluginService(plugin, health, true);
    // The last interceptor runs first: the token is checked before anything else.
    Server server = NettyServerBuilder.forAddress(new InetSocketAddress(bindHost, port))
        .addService(token == null
            ? ServerInterceptors.intercept(service, PluginService.HEADERS_INTERCEPTOR)
            : ServerInterceptors.intercept(service, PluginService.HEADERS_INTERCEPTOR, token))
        .addService(health.getHealthService())
        .addService(ProtoReflectionServiceV1.newInstance())
        .addService(ProtoReflectionService.newInstance())
        .build()
        .start();
    if (token == null) {
      System.err.println("linchkit plugin: warning: no bearer token configured (" + BearerToken.TOKEN_FILE_ENV
          + " or " + BearerToken.TOKEN_ENV + "): anybody who can reach " + host + ":" + server.getPort()
          + " can call this plugin");
    }
    Running running = new Running(plugin, service, server, new EventLoopGroup[0], null);
    stopOnSignals(running);
    announce(Handshake.line(1, "tcp", host + ":" + server.getPort(), null));
    return running;
  }

  private static Running serveSubprocess(Plugin plugin, Map<String, String> env) throws Exception {
    Handshake.Config config = Handshake.readEnv(env);
    HealthStatusManager health = new HealthStatusManager();
    PluginService service = new PluginService(plugin, health, false);

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
      builder = NettyServerBuilder.forAddress(new DomainSocketAddress(socket.toString()))
          .channelType(EpollServerDomainSocketChannel.class)
          .bossEventLoopGroup(loops[0])
          .workerEventLoopGroup(loops[1]);
      address = socket.toString();
    } else {
      builder = NettyServerBuilder.forAddress(new InetSocketAddress("127.0.0.1", 0));
      address = null;
    }

    byte[] certDer = null;
    if (config.clientCertPem() != null) {
      AutoTls.ServerCertificate certificate = AutoTls.generate();
      certDer = certificate.certificate().getEncoded();
      // The host's one-time certificate is the only trusted root, and it is required.
      builder.sslContext(GrpcSslContexts.configure(SslContextBuilder.forServer(certificate.privateKey(), certificate.certificate()))
          .trustManager(AutoTls.parsePem(config.clientCertPem()))
          .clientAuth(ClientAuth.REQUIRE)
          .build());
    }
    Server server = builder
        .addService(ServerInterceptors.intercept(service, PluginService.HEADERS_INTERCEPTOR))
        .addService(health.getHealthService())
        .addService(ProtoReflectionServiceV1.newInstance())
        .addService(ProtoReflectionService.newInstance())
        .build()
        .start();
    if (address == null) address = "127.0.0.1:" + server.getPort();

    Running running = new Running(plugin, service, server, loops, cleanup);
    stopOnSignals(running);
    announce(Handshake.line(config.appVersion(), config.network(), address, certDer));
    watchStdin(running);
    return running;
  }

  /** Prints the handshake line; afterwards stdout goes to stderr, since the host reads no more of it. */
  private static void announce(String line) {
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
      System.exit(0); // the shutdown hook stops the server
    }, "plugin-stdin-watch");
    watcher.setDaemon(true);
    watcher.start();
  }

  @SuppressWarnings("removal")
  private static void stopOnSignals(Running running) {
    // Exit 0 on SIGTERM/SIGINT, rather than the JVM's 143; the shutdown hook stops gracefully.
    for (String name : new String[] {"TERM", "INT"}) {
      try {
        sun.misc.Signal.handle(new sun.misc.Signal(name), signal -> System.exit(0));
      } catch (IllegalArgumentException unavailable) {
        // fall back to the shutdown hook below
      }
    }
    Runtime.getRuntime().addShutdownHook(new Thread(running::stop, "plugin-shutdown"));
  }

  private static void deleteRecursively(Path path) {
    try (Stream<Path> walk = Files.walk(path)) {
      walk.sorted(Comparator.reverseOrder()).forEach(each -> each.toFile().delete());
    } catch (IOException ignored) {
      // best effort: a temporary folder
    }
  }
}
