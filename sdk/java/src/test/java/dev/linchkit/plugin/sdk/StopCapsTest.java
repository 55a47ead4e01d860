package dev.linchkit.plugin.sdk;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.util.Map;
import org.junit.jupiter.api.Test;

/**
 * How long a stop waits, as an operator sets it: {@code LINCHKIT_PLUGIN_STOP_GRACE_MS} and
 * {@code LINCHKIT_PLUGIN_STOP_HOOKS_MS}, whole milliseconds from 0 to 10 minutes; a malformed
 * value is refused in one line naming the variable (tests/conformance/test_stop_drains_first.py
 * holds the executable to it).
 */
class StopCapsTest {
  @Test
  void theCapsComeFromTheEnvironmentInWholeMilliseconds() throws Exception {
    assertEquals(new StopCaps(5_000, 5_000), StopCaps.fromEnv(Map.of()));
    assertEquals(new StopCaps(5_000, 5_000), StopCaps.fromEnv(Map.of(Serve.STOP_GRACE_ENV, "", Serve.STOP_HOOKS_ENV, "")));
    assertEquals(new StopCaps(1_000, 5_000), StopCaps.fromEnv(Map.of(Serve.STOP_GRACE_ENV, "1000")));
    assertEquals(new StopCaps(5_000, 250), StopCaps.fromEnv(Map.of(Serve.STOP_HOOKS_ENV, "250")));
    assertEquals(new StopCaps(0, 0), StopCaps.fromEnv(Map.of(Serve.STOP_GRACE_ENV, "0", Serve.STOP_HOOKS_ENV, "0")));
    assertEquals(new StopCaps(600_000, 1_500),
        StopCaps.fromEnv(Map.of(Serve.STOP_GRACE_ENV, "600000", Serve.STOP_HOOKS_ENV, "0001500")));
  }

  @Test
  void aMalformedCapIsRefusedInOneLineNamingItsVariable() {
    for (String name : new String[] {Serve.STOP_GRACE_ENV, Serve.STOP_HOOKS_ENV}) {
      for (String value : new String[] {"5s", "-1", "1.5", "+5", " 5", "1e3", "600001", "99999999999999999999999", "five"}) {
        Handshake.HandshakeException refused = assertThrows(Handshake.HandshakeException.class,
            () -> Serve.stopCaps(Map.of(name, value), "serve: "), name + "=" + value);
        String message = refused.getMessage();
        assertTrue(message.startsWith("serve: " + name + " must be a whole number of milliseconds from 0 to 600000"), message);
        assertTrue(message.contains("'" + value + "'"), message);
      }
    }
    String message = assertThrows(Handshake.HandshakeException.class,
        () -> StopCaps.fromEnv(Map.of(Serve.STOP_HOOKS_ENV, "5\nINFO forged"))).getMessage();
    assertFalse(message.contains("\n"), message);
  }

  @Test
  void theWarningNamesTheCapInSeconds() {
    assertEquals("5", StopCaps.seconds(5_000));
    assertEquals("1.5", StopCaps.seconds(1_500));
    assertEquals("0", StopCaps.seconds(0));
  }
}
