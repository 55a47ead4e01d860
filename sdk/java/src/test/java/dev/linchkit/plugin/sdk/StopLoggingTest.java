package dev.linchkit.plugin.sdk;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

import com.google.protobuf.ByteString;
import dev.linchkit.plugin.v1.InitRequest;
import dev.linchkit.plugin.v1.LifecycleRequest;
import dev.linchkit.plugin.v1.PluginServiceGrpc;
import io.grpc.ManagedChannel;
import io.grpc.netty.shaded.io.grpc.netty.NettyChannelBuilder;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.List;
import java.util.Map;
import java.util.concurrent.TimeUnit;
import java.util.logging.Logger;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

/**
 * What a plugin's stop and destroy hooks log through {@code java.util.logging} reaches stderr.
 * The stop ran in a shutdown hook, and the JVM's {@code LogManager} resets every logger (their
 * handlers taken away) in a shutdown hook of its own, which runs alongside: the hooks' records
 * were dropped. A race, so the plugin is stopped several times.
 */
class StopLoggingTest {
  private static final int STOPS = 4;
  private static final String STOP_LINE = "INFO stop-logging: onStop: the ledger is closed";
  private static final String DESTROY_LINE = "INFO stop-logging: onDestroy: the pool is released";

  /** The plugin: its hooks log as a plugin author's do, through a logger of its own. */
  public static final class LoggingPlugin {
    private LoggingPlugin() {}

    public static void main(String[] args) {
      Logger logger = Logger.getLogger("stop-logging");
      Plugin plugin = new Plugin("stop-logging", "1.0.0")
          .onStop(() -> logger.info("onStop: the ledger is closed"))
          .onDestroy(() -> logger.info("onDestroy: the pool is released"));
      Serve.serve(plugin, args);
    }
  }

  @Test
  void theLinesTheStopHooksLogReachStderrAtEveryStop(@TempDir Path dir) throws Exception {
    for (int stop = 1; stop <= STOPS; stop++) {
      List<String> said = startedThenStopped(LoggingPlugin.class, Map.of(), dir.resolve("run-" + stop));
      String where = "stop " + stop + " of " + STOPS + "; stderr: " + said;
      assertTrue(said.stream().anyMatch(line -> line.endsWith(STOP_LINE)), where);
      assertTrue(said.stream().anyMatch(line -> line.endsWith(DESTROY_LINE)), where);
    }
  }

  /**
   * With a trace collector named, the SDK sets up OpenTelemetry, which logs through
   * {@code java.util.logging} too and whose autoconfigure module would add a shutdown hook of its
   * own: the hooks' lines still reach stderr, and with no call made no span is left to drop.
   */
  @Test
  void theLinesTheStopHooksLogReachStderrWithTracingOn(@TempDir Path dir) throws Exception {
    for (int stop = 1; stop <= 2; stop++) {
      List<String> said = startedThenStopped(LoggingPlugin.class,
          Map.of("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://127.0.0.1:9/v1/traces"), dir.resolve("run-" + stop));
      String where = "stop " + stop + " with tracing on; stderr: " + said;
      assertTrue(said.stream().anyMatch(line -> line.endsWith(STOP_LINE)), where);
      assertTrue(said.stream().anyMatch(line -> line.endsWith(DESTROY_LINE)), where);
      assertTrue(said.stream().noneMatch(line -> line.contains("spans dropped")), where);
    }
  }

  /**
   * {@code main serve} in a JVM of its own with {@code environment} added, started by a host as
   * the dispatcher starts it (Init, Start: the stop then owes both hooks), then sent SIGTERM: it
   * must exit 0 within 30 s. Its stderr's lines; its output files in {@code dir}.
   */
  static List<String> startedThenStopped(Class<?> main, Map<String, String> environment, Path dir)
      throws Exception {
    Files.createDirectories(dir);
    Path stdout = dir.resolve("stdout");
    Path stderr = dir.resolve("stderr");
    ProcessBuilder builder = new ProcessBuilder(
            Path.of(System.getProperty("java.home"), "bin", "java").toString(),
            "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1",
            "-cp", System.getProperty("java.class.path"),
            main.getName(), "serve", "--address", "127.0.0.1:0")
        .redirectOutput(stdout.toFile())
        .redirectError(stderr.toFile());
    builder.environment().putAll(environment);
    Process plugin = builder.start();
    try {
      String address = handshakeAddress(plugin, stdout);
      ManagedChannel channel = NettyChannelBuilder.forTarget(address).usePlaintext().build();
      try {
        PluginServiceGrpc.PluginServiceBlockingStub stub = PluginServiceGrpc.newBlockingStub(channel)
            .withDeadlineAfter(30, TimeUnit.SECONDS);
        stub.init(InitRequest.newBuilder().setConfigJson(ByteString.copyFromUtf8("{}")).build());
        stub.start(LifecycleRequest.getDefaultInstance());
      } finally {
        channel.shutdownNow();
      }
      plugin.destroy(); // SIGTERM
      assertTrue(plugin.waitFor(30, TimeUnit.SECONDS), "the plugin did not exit 30 s after SIGTERM");
      assertEquals(0, plugin.exitValue());
      return Files.readAllLines(stderr, StandardCharsets.UTF_8);
    } finally {
      plugin.destroyForcibly();
    }
  }

  /** HOST:PORT from the handshake line {@code 1|1|tcp|HOST:PORT|grpc|}, 60 s at most. */
  static String handshakeAddress(Process plugin, Path stdout) throws Exception {
    long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(60);
    while (System.nanoTime() < deadline) {
      String text = Files.readString(stdout, StandardCharsets.UTF_8);
      int end = text.indexOf('\n');
      if (end >= 0) return text.substring(0, end).split("\\|")[3];
      if (!plugin.isAlive()) break;
      Thread.sleep(50);
    }
    throw new AssertionError("no handshake line from the plugin: " + Files.readString(stdout, StandardCharsets.UTF_8));
  }
}
