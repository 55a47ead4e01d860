package dev.linchkit.plugin.sdk;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertNull;
import static org.junit.jupiter.api.Assertions.assertThrows;

import com.google.gson.JsonParser;
import dev.linchkit.plugin.v1.CallRequest;
import org.junit.jupiter.api.Test;

/** What a session reads of a frame; the frames on a connection: tests/conformance. */
class WsSessionTest {
  @Test
  void anIdIsAnIntegerThatFitsALong() {
    assertEquals(7L, WsSession.integer(JsonParser.parseString("7")));
    assertEquals(Long.MAX_VALUE, WsSession.integer(JsonParser.parseString("9223372036854775807")));
    assertNull(WsSession.integer(JsonParser.parseString("1.5")));
    assertNull(WsSession.integer(JsonParser.parseString("\"7\"")));
    assertNull(WsSession.integer(JsonParser.parseString("1180591620717411303424")));
    assertNull(WsSession.integer(JsonParser.parseString("null")));
  }

  @Test
  void anEnvelopeBecomesTheCallRequest() throws Exception {
    CallRequest request = WsSession.envelope(JsonParser.parseString(
        "{\"v\":1,\"plugin\":\"p\",\"method\":\"m\",\"params\":{\"a\":[1,2]},"
            + "\"context\":{\"request_id\":\"r\",\"deadline_ms\":-9223372036854775808}}"));
    assertEquals("m", request.getMethod());
    assertEquals("{\"a\":[1,2]}", request.getParamsJson().toStringUtf8());
    assertEquals(Long.MIN_VALUE, request.getContext().getDeadlineMs());
    assertEquals("r", request.getContext().getRequestId());
  }

  @Test
  void aRequestThatIsNoEnvelopeIsProviderError() {
    for (String request : new String[] {"[\"x\"]", "\"x\"", "{\"method\":7}", "{\"context\":[]}",
        "{\"context\":{\"deadline_ms\":1e400}}"}) {
      PluginException refused = assertThrows(PluginException.class,
          () -> WsSession.envelope(JsonParser.parseString(request)), request);
      assertEquals("provider_error", refused.type());
    }
  }

  @Test
  void aPeersCloseReasonIsShownEscapedAndCut() {
    assertEquals("\\u001b[2J\\u000aINFO x", WsSession.shownReason("\u001b[2J\nINFO x"));
    assertEquals(201, WsSession.shownReason("y".repeat(500)).length());
  }
}
