package dev.linchkit.plugin.sdk;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import org.junit.jupiter.api.Test;

/** connect's command line and how it shows a URL; the dialling itself: tests/conformance. */
class WsConnectTest {
  private static final String TOKEN = "tok0123456789abcdef";

  @Test
  void aUrlIsShownWithItsCredentialsMasked() {
    assertEquals("ws://me:***@h:1/p", WsConnect.maskedUrl("ws://me:" + TOKEN + "@h:1/p"));
    assertEquals("ws://***@h:1/p", WsConnect.maskedUrl("ws://" + TOKEN + "@h:1/p"));
    assertEquals("ws://h:1/p?token=***&region=***", WsConnect.maskedUrl("ws://h:1/p?token=" + TOKEN + "&region=eu"));
    assertEquals("ws://h:1/p?***", WsConnect.maskedUrl("ws://h:1/p?" + TOKEN));
    assertEquals("ws://h:1/p", WsConnect.maskedUrl("ws://h:1/p#" + TOKEN));
    assertEquals("not-a-url", WsConnect.maskedUrl("not-a-url"));
  }

  @Test
  void aUrlThatCanNeverReachAGatewayIsRefusedMasked() {
    for (String url : new String[] {"not-a-url", "ftp://127.0.0.1/p", "ws://", "ws//127.0.0.1:8080/p",
        "ws://127.0.0.1:99999/p?token=" + TOKEN}) {
      var refused = assertThrows(Handshake.HandshakeException.class, () -> WsConnect.gatewayUri(url), url);
      assertTrue(refused.getMessage().startsWith("connect: --url must be a ws:// or wss:// URL"), refused.getMessage());
      assertFalse(refused.getMessage().contains(TOKEN), refused.getMessage());
    }
  }

  @Test
  void theCommandLineTakesTheFlagsEitherWay() throws Exception {
    WsConnect.Command command = WsConnect.parse(new String[] {"connect", "--url=wss://g:1/p", "--config", "{}",
        "--ca-file", "ca.pem", "--cert-file=c.pem", "--key-file", "c.key"});
    assertEquals(new WsConnect.Command("wss://g:1/p", "{}", "ca.pem", "c.pem", "c.key", false), command);
    assertTrue(WsConnect.parse(new String[] {"connect", "--help"}).help());
  }

  @Test
  void aMistakeIsRefusedWithoutItsText() {
    var unknown = assertThrows(Handshake.HandshakeException.class,
        () -> WsConnect.parse(new String[] {"connect", "--url", "ws://g/p", "--nope=" + TOKEN}));
    assertTrue(unknown.getMessage().contains("--nope") && !unknown.getMessage().contains(TOKEN), unknown.getMessage());
    var stray = assertThrows(Handshake.HandshakeException.class,
        () -> WsConnect.parse(new String[] {"connect", TOKEN, "--url", "ws://g/p"}));
    assertTrue(stray.getMessage().contains("#2") && !stray.getMessage().contains(TOKEN), stray.getMessage());
    var missing = assertThrows(Handshake.HandshakeException.class, () -> WsConnect.parse(new String[] {"connect"}));
    assertTrue(missing.getMessage().startsWith("connect: --url is required"), missing.getMessage());
  }
}
