package dev.linchkit.plugin.sdk;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

import com.google.protobuf.ByteString;
import dev.linchkit.plugin.v1.CallReply;
import dev.linchkit.plugin.v1.CallRequest;
import dev.linchkit.plugin.v1.PluginServiceGrpc;
import io.grpc.ManagedChannel;
import io.grpc.netty.shaded.io.grpc.netty.NettyChannelBuilder;
import java.net.InetAddress;
import java.net.ServerSocket;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.List;
import java.util.Map;
import java.util.concurrent.TimeUnit;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

/**
 * A plugin whose collector refuses every connection says so on its stderr once, not once per
 * batch: OpenTelemetry's exporter logs each failed batch at SEVERE with a stack of 30 lines (five a
 * minute), and a subprocess plugin's host logs each line of stderr again. The SDK's own lines stay:
 * the outage's, and the stop's naming the collector.
 */
class CollectorOutageTest {
  @Test
  void aCollectorThatRefusesConnectionsIsSaidOnceOnStderr(@TempDir Path dir) throws Exception {
    int refused;
    try (ServerSocket closed = new ServerSocket(0, 1, InetAddress.getLoopbackAddress())) {
      refused = closed.getLocalPort(); // nothing listens there once it is closed
    }
    Path stdout = dir.resolve("stdout");
    Path stderr = dir.resolve("stderr");
    ProcessBuilder builder = new ProcessBuilder(
            Path.of(System.getProperty("java.home"), "bin", "java").toString(),
            "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1",
            "-cp", System.getProperty("java.class.path"), TracingStopTest.Traced.class.getName())
        .redirectOutput(stdout.toFile())
        .redirectError(stderr.toFile());
    builder.environment().keySet().removeIf(name -> name.startsWith("OTEL_"));
    builder.environment().putAll(Map.of(
        Handshake.MAGIC_COOKIE_KEY, Handshake.MAGIC_COOKIE_VALUE,
        Handshake.NETWORK_KEY, "tcp",
        "OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:" + refused,
        "OTEL_BSP_SCHEDULE_DELAY", "10",
        Serve.STOP_GRACE_ENV, "0",
        Serve.STOP_HOOKS_ENV, "1000")); // no hooks: the spans get what is left of it, 1 s
    Process plugin = builder.start();
    try {
      String address = StopLoggingTest.handshakeAddress(plugin, stdout);
      ManagedChannel channel = NettyChannelBuilder.forTarget(address).usePlaintext().build();
      try {
        PluginServiceGrpc.PluginServiceBlockingStub stub = PluginServiceGrpc.newBlockingStub(channel);
        // Calls until the first batch has failed (after OpenTelemetry's retries, about 8 s) and
        // a few more batches with it; then one more, whose span the stop has left to send.
        long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(90);
        int after = 0;
        while (after < 10 && System.nanoTime() < deadline) {
          CallReply reply = stub.withDeadlineAfter(30, TimeUnit.SECONDS).call(CallRequest.newBuilder().setV(1)
              .setMethod("echo").setParamsJson(ByteString.copyFromUtf8("{}")).build());
          assertTrue(reply.getOk(), reply.toString());
          String said = Files.readString(stderr, StandardCharsets.UTF_8);
          if (said.contains("could not send") || said.contains("io.opentelemetry")) after++;
          Thread.sleep(100);
        }
      } finally {
        channel.shutdownNow();
      }
      plugin.getOutputStream().close(); // the host is gone: end-of-file on the plugin's stdin
      assertTrue(plugin.waitFor(30, TimeUnit.SECONDS), "the plugin did not exit 30 s after its stdin closed");
      String said = Files.readString(stderr, StandardCharsets.UTF_8);
      List<String> lines = said.lines().toList();
      String collector = "the trace collector at http://127.0.0.1:" + refused;
      assertEquals(0, lines.stream().filter(line -> line.contains("io.opentelemetry")).count(), said);
      assertEquals(1, lines.stream().filter(line -> line.contains("WARNING dev.linchkit.plugin.sdk: could not send ")
          && line.contains(" spans to " + collector + " (ConnectException); they are dropped")).count(), said);
      assertEquals(1, lines.stream().filter(line -> line.contains("spans dropped at the stop: " + collector)).count(),
          said);
      assertEquals(2, lines.size(), said);
    } finally {
      plugin.destroyForcibly();
    }
  }
}
