package dev.linchkit.plugin.sdk;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertTrue;

import com.google.protobuf.ByteString;
import dev.linchkit.plugin.v1.CallReply;
import dev.linchkit.plugin.v1.CallRequest;
import dev.linchkit.plugin.v1.PluginServiceGrpc;
import io.grpc.ManagedChannel;
import io.grpc.netty.shaded.io.grpc.netty.NettyChannelBuilder;
import java.net.InetAddress;
import java.net.ServerSocket;
import java.net.Socket;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.List;
import java.util.Map;
import java.util.concurrent.CopyOnWriteArrayList;
import java.util.concurrent.TimeUnit;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

/**
 * A subprocess plugin told of a collector that accepts and never answers stops within grace +
 * hooks + {@link Tracing#SPAN_FLUSH_MARGIN_MS} when its host closes its stdin, as a service does on
 * SIGTERM (tests/conformance/test_stop_with_a_silent_collector.py holds the example plugin's
 * service mode to it), and says once that it dropped the spans without the secrets the collector's
 * URL and headers hold.
 */
class TracingStopTest {
  private static final String SECRET = "s3cret-collector-token";
  /** Slack past the margin (both caps are 0) for a JVM's exit on a slow, loaded machine. */
  private static final long SLACK_MS = 2500;

  /** The plugin: one method, served as the dispatcher starts it. */
  public static final class Traced {
    private Traced() {}

    public static void main(String[] args) {
      Serve.serve(new Plugin("traced", "1.0.0").method("echo", (params, ctx) -> params), args);
    }
  }

  @Test
  void aSilentCollectorKeepsASubprocessStopWithinItsCaps(@TempDir Path dir) throws Exception {
    try (ServerSocket silent = new ServerSocket(0, 50, InetAddress.getLoopbackAddress())) {
      List<Socket> held = new CopyOnWriteArrayList<>();
      Thread acceptor = new Thread(() -> {
        try {
          while (true) held.add(silent.accept()); // held open, never answered
        } catch (Exception closed) {
          // the test is over
        }
      });
      acceptor.setDaemon(true);
      acceptor.start();
      Path stdout = dir.resolve("stdout");
      Path stderr = dir.resolve("stderr");
      ProcessBuilder builder = new ProcessBuilder(
              Path.of(System.getProperty("java.home"), "bin", "java").toString(),
              "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1",
              "-cp", System.getProperty("java.class.path"), Traced.class.getName())
          .redirectOutput(stdout.toFile())
          .redirectError(stderr.toFile());
      builder.environment().keySet().removeIf(name -> name.startsWith("OTEL_"));
      builder.environment().putAll(Map.of(
          Handshake.MAGIC_COOKIE_KEY, Handshake.MAGIC_COOKIE_VALUE,
          Handshake.NETWORK_KEY, "tcp",
          "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
              "http://collector:" + SECRET + "@127.0.0.1:" + silent.getLocalPort() + "/v1/traces",
          "OTEL_EXPORTER_OTLP_TRACES_HEADERS", "authorization=Bearer%20" + SECRET,
          "OTEL_BSP_SCHEDULE_DELAY", "600000", // nothing sent before the stop
          Serve.STOP_GRACE_ENV, "0",
          Serve.STOP_HOOKS_ENV, "0"));
      Process plugin = builder.start();
      try {
        String address = StopLoggingTest.handshakeAddress(plugin, stdout);
        ManagedChannel channel = NettyChannelBuilder.forTarget(address).usePlaintext().build();
        try {
          CallRequest.Builder request = CallRequest.newBuilder().setV(1).setMethod("echo")
              .setParamsJson(ByteString.copyFromUtf8("{}"));
          request.getContextBuilder().setTraceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
          CallReply reply = PluginServiceGrpc.newBlockingStub(channel).withDeadlineAfter(30, TimeUnit.SECONDS)
              .call(request.build());
          assertTrue(reply.getOk(), reply.toString());
        } finally {
          channel.shutdownNow();
        }
        long began = System.nanoTime();
        plugin.getOutputStream().close(); // the host is gone: end-of-file on the plugin's stdin
        assertTrue(plugin.waitFor(30, TimeUnit.SECONDS), "the plugin did not exit 30 s after its stdin closed");
        long tookMs = TimeUnit.NANOSECONDS.toMillis(System.nanoTime() - began);
        String said = Files.readString(stderr, StandardCharsets.UTF_8);
        assertEquals(0, plugin.exitValue(), said);
        assertTrue(tookMs < Tracing.SPAN_FLUSH_MARGIN_MS + SLACK_MS,
            "the stop took " + tookMs + " ms with a silent collector; stderr: " + said);
        assertTrue(said.contains("spans dropped at the stop: the trace collector at http://127.0.0.1:"
            + silent.getLocalPort() + " did not take them within the 1 s the stop's caps left"), said);
        assertFalse(said.contains(SECRET), said);
      } finally {
        plugin.destroyForcibly();
        for (Socket socket : held) socket.close();
      }
    }
  }
}
