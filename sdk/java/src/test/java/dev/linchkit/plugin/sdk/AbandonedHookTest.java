package dev.linchkit.plugin.sdk;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertNull;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.nio.file.Path;
import java.util.List;
import java.util.Map;
import java.util.concurrent.CountDownLatch;
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
    List<String> said = StopLoggingTest.startedThenStopped(
        StuckStopPlugin.class, Map.of(Serve.STOP_HOOKS_ENV, "0"), dir);
    assertTrue(said.stream().anyMatch(line -> line.contains("the stop hook did not finish within 0 s")),
        "stderr: " + said);
  }

  @Test
  void nothingOwedIsNothingAbandoned() throws Exception {
    Plugin plugin = new Plugin("idle", "1.0.0");
    plugin.destroy();
    assertEquals(List.of(), plugin.owedAtClose());
    assertNull(Serve.runHooks(plugin, 0));
  }
}
