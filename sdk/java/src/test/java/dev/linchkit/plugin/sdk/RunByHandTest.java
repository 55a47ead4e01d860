package dev.linchkit.plugin.sdk;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.nio.charset.StandardCharsets;
import java.io.File;
import java.nio.file.Path;
import java.util.concurrent.TimeUnit;
import org.junit.jupiter.api.Test;

/**
 * A plugin run by hand, without the handshake cookie, says that the dispatcher starts it, even
 * when a stop cap in the environment is malformed: the cookie is checked first, as every SDK
 * does (the caps' refusal came first and hid the hint).
 */
class RunByHandTest {
  @Test
  void theCookieIsCheckedBeforeTheStopCaps() throws Exception {
    ProcessBuilder builder = new ProcessBuilder(
            Path.of(System.getProperty("java.home"), "bin", "java").toString(),
            "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1",
            "-cp", System.getProperty("java.class.path"),
            StopLoggingTest.LoggingPlugin.class.getName())
        .redirectInput(ProcessBuilder.Redirect.from(new File("/dev/null")));
    builder.environment().remove(Handshake.MAGIC_COOKIE_KEY);
    builder.environment().put(Serve.STOP_GRACE_ENV, "soon");
    Process plugin = builder.start();
    try {
      assertTrue(plugin.waitFor(60, TimeUnit.SECONDS), "the plugin did not end");
      String stderr = new String(plugin.getErrorStream().readAllBytes(), StandardCharsets.UTF_8);
      assertEquals(1, plugin.exitValue(), stderr);
      String[] lines = stderr.strip().split("\n");
      String last = lines[lines.length - 1];
      assertTrue(last.contains("started by the dispatcher, not by hand"), stderr);
    } finally {
      plugin.destroyForcibly();
    }
  }
}
