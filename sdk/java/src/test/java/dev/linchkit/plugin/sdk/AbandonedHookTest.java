package dev.linchkit.plugin.sdk;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertNull;
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
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.TimeUnit;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

/**
 * With {@code LINCHKIT_PLUGIN_STOP_HOOKS_MS=0} the stop does not wait for its hooks at all, and
 * their thread may not have begun when it gives up on them: the warning still names the hook
 * that was about to run (it said "stop/destroy").
 */
class AbandonedHookTest {
  /** The plugin: a stop hook that never ends on its own. */
  public static final class StuckStopPlugin {
    private StuckStopPlugin() {}

    public static void main(String[] args) {
      CountDownLatch never = new CountDownLatch(1);
      Plugin plugin = new Plugin("stuck-stop", "1.0.0").onStop(never::await);
      Serve.serve(plugin, args);
    }
  }

  @Test
  void aStopHookAbandonedAtOnceIsNamed(@TempDir Path dir) throws Exception {
    Path stdout = dir.resolve("stdout");
    Path stderr = dir.resolve("stderr");
    ProcessBuilder builder = new ProcessBuilder(
            Path.of(System.getProperty("java.home"), "bin", "java").toString(),
            "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1",
            "-cp", System.getProperty("java.class.path"),
            StuckStopPlugin.class.getName(), "serve", "--address", "127.0.0.1:0")
        .redirectOutput(stdout.toFile())
        .redirectError(stderr.toFile());
    builder.environment().put(Serve.STOP_HOOKS_ENV, "0");
    Process plugin = builder.start();
    try {
      String address = StopLoggingTest.handshakeAddress(plugin, stdout);
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
      List<String> said = Files.readAllLines(stderr, StandardCharsets.UTF_8);
      assertTrue(said.stream().anyMatch(line -> line.contains("the stop hook did not finish within 0 s")),
          "stderr: " + said);
    } finally {
      plugin.destroyForcibly();
    }
  }

  @Test
  void nothingOwedIsNothingAbandoned() throws Exception {
    Plugin plugin = new Plugin("idle", "1.0.0");
    plugin.destroy();
    assertEquals(List.of(), plugin.owedAtClose());
    assertNull(Serve.runHooks(plugin, 0));
  }
}
