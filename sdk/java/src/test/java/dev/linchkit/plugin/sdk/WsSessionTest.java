package dev.linchkit.plugin.sdk;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertNull;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import dev.linchkit.plugin.v1.CallRequest;
import io.grpc.protobuf.services.HealthStatusManager;
import io.netty.channel.embedded.EmbeddedChannel;
import io.netty.handler.codec.http.websocketx.TextWebSocketFrame;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import java.util.logging.Handler;
import java.util.logging.Level;
import java.util.logging.LogRecord;
import org.junit.jupiter.api.Test;

/**
 * What a session reads of a frame, and what it holds for a host that does not read; the frames
 * on a connection: tests/conformance.
 */
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
    // Line and paragraph separators end a line in many viewers, as a newline does.
    assertEquals("a\\u2028b\\u2029c", WsSession.shownReason("a\u2028b\u2029c"));
  }

  /**
   * A plugin that emits while its host reads nothing holds at most {@link
   * PluginService#EVENTS_PER_STREAM} of those events, the oldest dropped first, as the Go and
   * Rust SDKs do and as an Events stream does: before, each went to Netty's outbound buffer,
   * which grew with every event until the heartbeat found the host stalled 15 s later.
   */
  @Test
  void eventsForAHostThatDoesNotReadAreBoundedTheOldestDropped() {
    Plugin plugin = new Plugin("example", "1.0.0", "java");
    PluginService service = new PluginService(plugin, new HealthStatusManager(), true);
    EmbeddedChannel channel = new EmbeddedChannel();
    WsSession session = new WsSession(plugin, service, 1_000, channel);
    channel.pipeline().addLast(session);
    session.begin();
    channel.runPendingTasks();
    assertEquals("hello", type(frames(channel).get(0)));
    // The host takes nothing: the socket's buffer is full (as a high water mark reached says).
    channel.unsafe().outboundBuffer().setUserDefinedWritability(1, false);
    int emitted = 3 * PluginService.EVENTS_PER_STREAM;
    for (int seq = 0; seq < emitted; seq++) {
      plugin.emit("tick", Map.of("seq", seq));
      channel.runPendingTasks();
    }
    List<JsonObject> sent = frames(channel);
    assertTrue(sent.isEmpty(), sent.size() + " events were written while the host took nothing");
    // The host reads again: the newest events come, in order.
    channel.unsafe().outboundBuffer().setUserDefinedWritability(1, true);
    channel.runPendingTasks();
    sent = frames(channel);
    assertEquals(PluginService.EVENTS_PER_STREAM, sent.size());
    int first = emitted - PluginService.EVENTS_PER_STREAM;
    for (int i = 0; i < sent.size(); i++) {
      assertEquals("event", type(sent.get(i)));
      assertEquals(first + i, sent.get(i).getAsJsonObject("data").get("seq").getAsInt());
    }
    assertTrue(session.toString().contains("events_dropped=" + first), session.toString());
    channel.finishAndReleaseAll();
  }

  @Test
  void anErrorFramesTextIsItsMessageOrElseWhatItIs() {
    Map<String, String> said = Map.of(
        "{\"type\":\"provider_error\",\"message\":\"unknown frame type\"}", "unknown frame type",
        "\"frame 7 went astray\"", "frame 7 went astray",
        "{\"message\":7}", "{\"message\":7}",
        "[\"x\"]", "[\"x\"]",
        "null", "null");
    said.forEach((error, text) -> assertEquals(text, WsSession.errorText(JsonParser.parseString(error)), error));
    assertEquals("null", WsSession.errorText(null));
  }

  /**
   * An error frame from the host is said at INFO on one line, its message escaped (a newline,
   * ESC); of a flood of them only the first {@link WsSession#LOGGED_HOST_ERRORS} and a line saying
   * the rest are not. None is answered, and the session serves on. Before, the Java SDK said
   * none of them.
   */
  @Test
  void theHostsErrorFramesAreSaidEscapedAndOnlyTheFirstFew() throws Exception {
    List<LogRecord> logged = new ArrayList<>();
    Handler capture = new Handler() {
      @Override
      public void publish(LogRecord record) {
        synchronized (logged) {
          logged.add(record);
        }
      }

      @Override
      public void flush() {}

      @Override
      public void close() {}
    };
    Plugin plugin = new Plugin("example", "1.0.0", "java");
    plugin.method("echo", "its params", (params, ctx) -> params);
    PluginService service = new PluginService(plugin, new HealthStatusManager(), true);
    EmbeddedChannel channel = new EmbeddedChannel();
    WsSession session = new WsSession(plugin, service, 1_000, channel);
    channel.pipeline().addLast(session);
    Log.SDK.addHandler(capture);
    try {
      session.begin();
      channel.runPendingTasks();
      assertEquals("hello", type(frames(channel).get(0)));
      channel.writeInbound(new TextWebSocketFrame("{\"type\":\"error\",\"error\":{\"type\":\"provider_error\","
          + "\"message\":\"\\u001b[2J\\nINFO forged: the plugin stopped\"}}"));
      for (int i = 1; i < 1000; i++) {
        channel.writeInbound(new TextWebSocketFrame("{\"type\":\"error\",\"id\":3,\"error\":{\"message\":\"again\"}}"));
      }
      channel.writeInbound(new TextWebSocketFrame(
          "{\"type\":\"call\",\"id\":1,\"request\":{\"v\":1,\"method\":\"echo\",\"params\":\"still here\"}}"));
      // The call runs on the service's threads: its answer is the first frame, once written.
      List<JsonObject> sent = new ArrayList<>();
      for (long deadline = System.nanoTime() + 10_000_000_000L; sent.isEmpty() && System.nanoTime() < deadline; ) {
        Thread.sleep(5);
        channel.runPendingTasks();
        sent.addAll(frames(channel));
      }
      assertEquals(List.of(JsonParser.parseString(
          "{\"type\":\"response\",\"id\":1,\"response\":{\"ok\":true,\"result\":\"still here\"}}")), sent);
    } finally {
      Log.SDK.removeHandler(capture);
      channel.finishAndReleaseAll();
      service.close();
    }
    List<String> want = new ArrayList<>();
    want.add("the host could not use a frame: \\u001b[2J\\u000aINFO forged: the plugin stopped");
    for (int i = 1; i < WsSession.LOGGED_HOST_ERRORS; i++) want.add("the host could not use a frame: again");
    want.add("the host sent more than 10 error frames on this connection; further ones are not logged");
    synchronized (logged) {
      assertEquals(want, logged.stream().map(LogRecord::getMessage).toList());
      assertTrue(logged.stream().allMatch(record -> record.getLevel() == Level.INFO), logged.toString());
      for (LogRecord record : logged) {
        String line = new OneLineFormatter().format(record);
        assertEquals(line.length() - 1, line.indexOf('\n'), line);
      }
    }
  }

  private static String type(JsonObject frame) {
    return frame.get("type").getAsString();
  }

  /** The frames the session has written since this was last asked. */
  private static List<JsonObject> frames(EmbeddedChannel channel) {
    List<JsonObject> frames = new ArrayList<>();
    for (Object written; (written = channel.readOutbound()) != null; ) {
      TextWebSocketFrame frame = (TextWebSocketFrame) written;
      frames.add(JsonParser.parseString(frame.text()).getAsJsonObject());
      frame.release();
    }
    return frames;
  }
}
