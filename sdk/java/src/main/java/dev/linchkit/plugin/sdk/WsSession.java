package dev.linchkit.plugin.sdk;

import com.google.gson.JsonElement;
import com.google.gson.JsonNull;
import com.google.gson.JsonObject;
import com.google.gson.JsonParseException;
import com.google.gson.JsonParser;
import com.google.gson.JsonPrimitive;
import com.google.gson.Strictness;
import com.google.gson.stream.JsonReader;
import com.google.gson.stream.JsonToken;
import com.google.protobuf.ByteString;
import dev.linchkit.plugin.v1.CallReply;
import dev.linchkit.plugin.v1.CallRequest;
import io.netty.buffer.ByteBuf;
import io.netty.buffer.ByteBufUtil;
import io.netty.channel.Channel;
import io.netty.channel.ChannelFuture;
import io.netty.channel.ChannelFutureListener;
import io.netty.channel.ChannelHandlerContext;
import io.netty.channel.SimpleChannelInboundHandler;
import io.netty.handler.codec.TooLongFrameException;
import io.netty.handler.codec.compression.DecompressionException;
import io.netty.handler.codec.http.HttpHeaders;
import io.netty.handler.codec.http.websocketx.BinaryWebSocketFrame;
import io.netty.handler.codec.http.websocketx.CloseWebSocketFrame;
import io.netty.handler.codec.http.websocketx.CorruptedWebSocketFrameException;
import io.netty.handler.codec.http.websocketx.PingWebSocketFrame;
import io.netty.handler.codec.http.websocketx.PongWebSocketFrame;
import io.netty.handler.codec.http.websocketx.TextWebSocketFrame;
import io.netty.handler.codec.http.websocketx.WebSocketFrame;
import java.io.IOException;
import java.io.StringReader;
import java.math.BigDecimal;
import java.nio.ByteBuffer;
import java.nio.charset.CharacterCodingException;
import java.nio.charset.CodingErrorAction;
import java.nio.charset.StandardCharsets;
import java.util.ArrayDeque;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicBoolean;

/**
 * One WebSocket connection to a host, served alike in both WebSocket modes (docs/protocol.md,
 * "WebSocket binding"): {@code serve --websocket} ({@link WsServe}: the dispatcher dials the
 * plugin) and {@code connect} ({@link WsConnect}: the plugin dials the gateway). A mode only
 * opens the connection and puts a session at the end of its pipeline; the frames are this
 * class's.
 *
 * <p>A session says hello (with the largest message it reads), runs each {@code call} and
 * {@code stream} through the {@link PluginService} the gRPC binding uses (so errors,
 * deadlines, params and spans read the same), cancels one on {@code cancel}, answers {@code
 * health}, hands host events to the plugin's handlers and sends the plugin's events (those that waited for a host first, then a
 * {@code dropped} frame with the count lost). A frame it cannot use gets an {@code error} frame
 * in one short line that never quotes it, and the connection stays. An {@code error} frame from
 * the host is never answered (two peers could trade them for ever) but said at INFO, the host's
 * message escaped and cut as a close reason is: the first {@link #LOGGED_HOST_ERRORS} of a
 * connection, then one line saying the rest are not, so that a flood of them does not flood
 * stderr.
 *
 * <p>Bounds, all per connection: at most {@link #MAX_IN_FLIGHT} calls run, past them the
 * session stops reading (TCP pushes back on the host) and holds what was read already; it stops
 * reading too while the socket takes no more of what it writes, so a host that does not read
 * costs its calls in flight and their answers, never a growing buffer, and one that takes
 * nothing for 1.5 heartbeats is dropped. The plugin's events wait while the socket takes no
 * more (as its other frames do: below), at most {@link #EVENTS_WAITING} of them, the oldest
 * dropped first (said once on stderr per connection), as the Go and Rust SDKs' sessions and an
 * Events stream do. A stream waits for the host's credit (a window of {@link #STREAM_WINDOW}
 * chunks). A message over {@link #MAX_MESSAGE_BYTES}, or one that inflates past it, closes the
 * connection 1009 (the pipeline's decoder, aggregator and inflater count; this class closes).
 *
 * <p>What it sends is held to the send cap: the smaller of {@link #MAX_MESSAGE_BYTES} and the
 * cap the host announced ({@link #MAX_MESSAGE_BYTES_HEADER} on the upgrade: the dispatcher's
 * request, or in reverse mode the gateway's 101 response, which holds from the hello on; then
 * {@code max_message_bytes} in {@code welcome}, which replaces it), measured as the frame's
 * UTF-8 bytes. A frame over it
 * is never sent, as the host would close the connection 1009 and fail every call on it: a
 * {@code response} becomes the too-large error of its id, a {@code chunk} ends its stream with
 * that error (its method stopped as a cancel stops it), an {@code event} is dropped (said once
 * on stderr per connection). The connection stays.
 *
 * <p>Writes never block the caller, and go out in the order the plugin handed them over: every
 * frame waits in the session's outbox, and the connection's event loop, its one writer, hands
 * them to the socket while it takes more. Only {@code event} frames are dropped there (the
 * bound above), never a response, a chunk, an error, goaway or the {@code dropped} frame, so an
 * answer never overtakes the events its method emitted before it. Pings and pongs go straight
 * to the socket; a close goes behind everything handed over before it, and nothing after it.
 * All state but {@link #calls} and the outbox is the event loop's.
 */
final class WsSession extends SimpleChannelInboundHandler<WebSocketFrame> {
  /** The largest message either way, as every SDK's (the dispatcher's default too). */
  static final int MAX_MESSAGE_BYTES = 8 << 20;
  /**
   * The upgrade's header in which the host announces the largest message it reads: on its
   * request (the dispatcher dialling) or on its 101 response (the gateway, in reverse mode).
   */
  static final String MAX_MESSAGE_BYTES_HEADER = "LinchKit-Max-Message-Bytes";
  /** The smallest and the largest cap a host may announce: others are ignored. */
  static final long MIN_ANNOUNCED_CAP = 1024;
  static final long MAX_ANNOUNCED_CAP = 1L << 53;
  /**
   * The reply cap of the {@link PluginService} behind the WebSocket modes: none, as each
   * session holds its answers to its own send cap and says so in the WebSocket's words.
   */
  static final int NO_REPLY_CAP = Integer.MAX_VALUE;
  /** How the refusals name the cap (the gRPC binding names its own). */
  static final String CAP_NAME = "WebSocket message cap";
  /** Calls running at once on one connection; past them the session reads nothing. */
  static final int MAX_IN_FLIGHT = 1024;
  /** The chunks a stream may send before the host grants more. */
  static final int STREAM_WINDOW = 256;
  /** A call's params may nest {@link WireJson#MAX_DEPTH} levels under the frame's and its request's objects. */
  static final int MAX_FRAME_DEPTH = WireJson.MAX_DEPTH + 2;
  /** How often the session pings; a pong not back within half of it ends the connection. */
  static final long HEARTBEAT_MS = 10_000;
  /** How long a close the plugin sends waits for the host's before the connection is cut. */
  static final long CLOSE_HANDSHAKE_WAIT_MS = 1_000;
  /** Events kept while no host is connected (every SDK's WebSocket modes). */
  static final int EVENT_BUFFER = 1000;
  /** Event frames waiting while the socket takes no more; past them the oldest is dropped. */
  static final int EVENTS_WAITING = PluginService.EVENTS_PER_STREAM;
  /** The host's {@code error} frames said on one connection; one line says the rest are not. */
  static final int LOGGED_HOST_ERRORS = 10;

  private final Plugin plugin;
  private final PluginService service;
  /** How long the host has after goaway to close the connection (the stop's grace). */
  private final long graceMs;
  private final Channel channel;
  /** Whether the peer is a host (events go to it), not the server's own warm-up. */
  private final boolean host;
  /** The hello has gone out: frames may follow. */
  private boolean begun;
  /** A stop asked for goaway before the session began: said right after the hello. */
  private boolean goAwayWanted;
  /** The calls and streams in flight or waiting for a slot, by id. */
  private final Map<Long, Call> calls = new ConcurrentHashMap<>();
  /** Calls read while {@link #MAX_IN_FLIGHT} ran: started as slots free. */
  private final ArrayDeque<Call> waiting = new ArrayDeque<>();
  /**
   * What the session sends and the socket has not taken yet, handed over from any thread and
   * guarded by this lock: {@link #events} and {@link #frames}, each oldest first, numbered by
   * {@link #handedOver} so that the event loop writes them in the order handed over.
   */
  private final Object outbox = new Object();
  /** The plugin's event frames waiting: at most {@link #EVENTS_WAITING}, the oldest dropped past it. */
  private final ArrayDeque<Waiting> events = new ArrayDeque<>();
  /**
   * Every other frame waiting (a response, a chunk, an error, goaway, the {@code dropped} frame
   * after the events that waited for a host): never dropped. Bounded by what calls in flight
   * answer and by the streams' windows, as Netty's buffer was when they went straight to it.
   */
  private final ArrayDeque<Waiting> frames = new ArrayDeque<>();
  /** The frames handed over so far: the next one's number. */
  private long handedOver;
  /** Events dropped from {@link #events} for a host that did not read them. */
  private long eventsDropped;
  /** A {@link #flush} is queued on the event loop. */
  private boolean flushQueued;
  private int running;
  private Runnable unsubscribe = () -> {};
  private boolean closeSent;
  private boolean goneAway;
  /** The {@code error} frames the host sent (the first {@link #LOGGED_HOST_ERRORS} are said). */
  private long hostErrors;
  /** System.nanoTime() of the last pong, or of the session's start. */
  private long lastPong;
  /** System.nanoTime() when the socket last stopped taking writes; 0 while it takes them. */
  private long unwritableSince;
  /** The gateway accepted the hello ({@code welcome}): only then does a redial's backoff reset. */
  volatile boolean welcomed;
  /**
   * The largest frame this session sends: {@link #MAX_MESSAGE_BYTES}, or the host's smaller cap
   * (the upgrade's header, set before the hello; then a welcome's, which replaces it).
   */
  private volatile long sendCap = MAX_MESSAGE_BYTES;
  /** An event over the send cap was said on stderr: the next ones are dropped without a word. */
  private final AtomicBoolean eventRefusalSaid = new AtomicBoolean();
  /** The host's close frame's code, -1 without one, and its reason as a log may show it. */
  volatile int closeCode = -1;
  volatile String closeReason = "";
  private final CompletableFuture<Void> ended = new CompletableFuture<>();

  /**
   * A session of {@code connection}, counted by a stop from now on, though it serves only once
   * the upgrade is done ({@link #begin}): a stop that came meanwhile says goaway after the hello.
   */
  WsSession(Plugin plugin, PluginService service, long graceMs, Channel connection) {
    this(plugin, service, graceMs, connection, true);
  }

  /** {@code host}: false for a server's own warm-up connection, which takes no events. */
  WsSession(Plugin plugin, PluginService service, long graceMs, Channel connection, boolean host) {
    this.host = host;
    this.plugin = plugin;
    this.service = service;
    this.graceMs = graceMs;
    this.channel = connection;
    lastPong = System.nanoTime();
    channel.closeFuture().addListener(closed -> end());
  }

  /** A frame waiting for the socket, numbered in the order it was handed over. */
  private record Waiting(long number, String text) {}

  /** A call or a stream of this connection. */
  private static final class Call {
    final long id;
    final boolean stream;
    final JsonElement request;
    /** The method called, once its envelope was read: named by a refusal of its answer. */
    volatile String method = "";
    /** Completed by a cancel frame or the connection's end: the method is interrupted, nothing answered. */
    final CompletableFuture<Void> cancelled = new CompletableFuture<>();
    private int credit = STREAM_WINDOW;

    Call(long id, boolean stream, JsonElement request) {
      this.id = id;
      this.stream = stream;
      this.request = request;
    }

    synchronized void grant(int n) {
      credit = (int) Math.min(Integer.MAX_VALUE, (long) credit + n);
      notifyAll();
    }

    /** One chunk's credit, waiting for the host's grant; interrupted at the deadline. */
    synchronized void take() throws InterruptedException, PluginException {
      while (credit == 0) {
        if (cancelled.isDone()) throw PluginException.deadlineExceeded("the stream was cancelled by the host");
        wait(50);
      }
      credit--;
    }
  }

  /** Completes once the connection has closed and its calls were cancelled. */
  CompletableFuture<Void> ended() {
    return ended;
  }

  /** Starts serving the connection, whose pipeline ends with this session now: hello first. On its event loop. */
  void begin() {
    begun = true;
    lastPong = System.nanoTime();
    JsonObject hello = new JsonObject();
    hello.addProperty("type", "hello");
    hello.addProperty("protocol", PluginService.PROTOCOL_VERSION);
    hello.addProperty("id", plugin.id());
    hello.addProperty("version", plugin.version());
    hello.addProperty("runtime", plugin.runtime());
    com.google.gson.JsonArray methods = new com.google.gson.JsonArray();
    com.google.gson.JsonArray streaming = new com.google.gson.JsonArray();
    for (Plugin.MethodInfo method : plugin.describe()) {
      methods.add(method.name());
      if (method.streaming()) streaming.add(method.name());
    }
    hello.add("methods", methods);
    hello.add("streaming", streaming);
    // The largest message this plugin reads: the host sends no larger call or event.
    hello.addProperty("max_message_bytes", MAX_MESSAGE_BYTES);
    send(hello.toString());
    if (!channel.isActive() || !host) return;
    // The dropped frame is no event: an event flood must not drop it, and its count with it.
    unsubscribe = plugin.addEventSink(this::sendEvent, dropped -> send("{\"type\":\"dropped\",\"count\":" + dropped + "}"));
    // Closed meanwhile (end() ran before there was anything to unsubscribe): unsubscribe now.
    if (!channel.isActive()) unsubscribe.run();
    scheduleHeartbeat();
    if (goAwayWanted) goAway();
  }

  /**
   * Says goaway and leaves the connection's end to the host, which closes it (1000) once its
   * calls are answered; a host that has not within the grace is closed 1001, and cut off
   * {@link #CLOSE_HANDSHAKE_WAIT_MS} later if it does not answer that close either.
   */
  void goAway() {
    channel.eventLoop().execute(() -> {
      if (!begun) {
        goAwayWanted = true;
        return;
      }
      if (goneAway || !channel.isActive()) return;
      goneAway = true;
      send("{\"type\":\"goaway\"}");
      channel.eventLoop().schedule(() -> closeWithin(1001, "the plugin is stopping"), graceMs, TimeUnit.MILLISECONDS);
    });
  }

  /** Closes with {@code code}, cutting the connection when the host does not answer in time. */
  private void closeWithin(int code, String reason) {
    if (!channel.isActive()) return;
    if (!closeSent) {
      sayClose(new CloseWebSocketFrame(code, reason));
    }
    channel.eventLoop().schedule(() -> {
      channel.close();
    }, CLOSE_HANDSHAKE_WAIT_MS, TimeUnit.MILLISECONDS);
  }

  /** Closes at once with {@code code}: the close frame is handed to the socket and the connection dropped. */
  private void closeNow(int code, String reason) {
    if (!channel.isActive()) return;
    if (closeSent) {
      channel.close();
      return;
    }
    sayClose(new CloseWebSocketFrame(code, reason)).addListener(ChannelFutureListener.CLOSE);
  }

  /**
   * Writes {@code close} behind every frame handed over before it, whether the socket takes
   * more or not (the connection ends within {@link #CLOSE_HANDSHAKE_WAIT_MS} or at once), and
   * nothing after it: a goaway still waiting goes before the close that follows it. On the
   * event loop.
   */
  private ChannelFuture sayClose(CloseWebSocketFrame close) {
    closeSent = true;
    List<Waiting> waiting = new ArrayList<>();
    synchronized (outbox) {
      while (!frames.isEmpty() || !events.isEmpty()) waiting.add(nextInOrder());
    }
    for (Waiting frame : waiting) channel.write(new TextWebSocketFrame(frame.text()), channel.voidPromise());
    return channel.writeAndFlush(close);
  }

  private void end() {
    unsubscribe.run();
    synchronized (outbox) { // never written now
      frames.clear();
      events.clear();
    }
    for (Call call : List.copyOf(calls.values())) call.cancelled.complete(null);
    ended.complete(null);
  }

  // ---- keepalive ---------------------------------------------------------------------

  private void scheduleHeartbeat() {
    channel.eventLoop().schedule(this::heartbeat, HEARTBEAT_MS, TimeUnit.MILLISECONDS);
  }

  /**
   * A half-open connection, or a host that answers no ping, ends within 1.5 heartbeats; so does
   * one that takes nothing of what the session writes. While the session reads nothing (its
   * calls fill it, or its writes wait) no pong is read either, and none is missed.
   */
  private void heartbeat() {
    if (!channel.isActive()) return;
    long now = System.nanoTime();
    long stallAfter = TimeUnit.MILLISECONDS.toNanos(HEARTBEAT_MS * 3 / 2);
    if (unwritableSince != 0 && now - unwritableSince > stallAfter) {
      Log.SDK.warning("the host took nothing of what this plugin wrote for " + (HEARTBEAT_MS * 3 / 2000.0)
          + " s; dropping the connection");
      channel.close();
      return;
    }
    if (channel.config().isAutoRead()) {
      long pinged = now;
      channel.writeAndFlush(new PingWebSocketFrame());
      channel.eventLoop().schedule(() -> {
        if (channel.isActive() && channel.config().isAutoRead() && lastPong - pinged < 0) {
          channel.close();
        }
      }, HEARTBEAT_MS / 2, TimeUnit.MILLISECONDS);
    }
    scheduleHeartbeat();
  }

  @Override
  public void channelWritabilityChanged(ChannelHandlerContext ctx) {
    if (channel.isWritable()) {
      unwritableSince = 0;
      flush();
      resumeReading();
    } else {
      unwritableSince = System.nanoTime();
      channel.config().setAutoRead(false);
    }
    ctx.fireChannelWritabilityChanged();
  }

  private void resumeReading() {
    if (running < MAX_IN_FLIGHT && waiting.isEmpty() && channel.isWritable() && !channel.config().isAutoRead()) {
      lastPong = System.nanoTime(); // no pong could be read meanwhile
      channel.config().setAutoRead(true);
    }
  }

  // ---- reading -----------------------------------------------------------------------

  @Override
  protected void channelRead0(ChannelHandlerContext ctx, WebSocketFrame frame) {
    if (frame instanceof TextWebSocketFrame || frame instanceof BinaryWebSocketFrame) {
      String text = utf8(frame.content());
      if (text == null) {
        error(null, "a frame that is not UTF-8");
      } else {
        handle(text);
      }
    } else if (frame instanceof PingWebSocketFrame) {
      ctx.writeAndFlush(new PongWebSocketFrame(frame.content().retain()));
    } else if (frame instanceof PongWebSocketFrame) {
      lastPong = System.nanoTime();
    } else if (frame instanceof CloseWebSocketFrame close) {
      closeCode = close.statusCode();
      closeReason = shownReason(close.reasonText());
      if (!closeSent) {
        int code = close.statusCode() < 0 ? 1000 : close.statusCode();
        sayClose(new CloseWebSocketFrame(code, "")).addListener(ChannelFutureListener.CLOSE);
      } else {
        ctx.close();
      }
    }
  }

  /** {@code bytes} as UTF-8, or null when they are not. */
  private static String utf8(ByteBuf bytes) {
    ByteBuffer buffer = bytes.nioBuffer();
    try {
      return StandardCharsets.UTF_8.newDecoder()
          .onMalformedInput(CodingErrorAction.REPORT)
          .onUnmappableCharacter(CodingErrorAction.REPORT)
          .decode(buffer)
          .toString();
    } catch (CharacterCodingException notUtf8) {
      return null;
    }
  }

  @Override
  public void exceptionCaught(ChannelHandlerContext ctx, Throwable cause) {
    // A message over the limit (whole, or once inflated) closes 1009, as every SDK does;
    // anything else (a reset, a corrupt frame the decoder already answered) ends the connection.
    if (isTooLarge(cause)) {
      closeNow(1009, "a message over " + MAX_MESSAGE_BYTES + " bytes");
    } else if (cause instanceof CorruptedWebSocketFrameException corrupt && corrupt.closeStatus() != null) {
      closeNow(corrupt.closeStatus().code(), "a frame this plugin cannot read");
    } else {
      ctx.close();
    }
  }

  private static boolean isTooLarge(Throwable cause) {
    for (Throwable each = cause; each != null; each = each.getCause()) {
      if (each instanceof TooLongFrameException) return true;
      if (each instanceof DecompressionException && String.valueOf(each.getMessage()).contains("maximum size")) return true;
      if (each == each.getCause()) break;
    }
    return false;
  }

  private void handle(String text) {
    String why = text.isEmpty() ? "is empty" : WireJson.unusable(text, MAX_FRAME_DEPTH);
    if (why != null) {
      error(null, "a frame that " + why);
      return;
    }
    JsonObject frame = parse(text);
    if (frame == null) {
      error(null, "a frame that is not a JSON object with a type");
      return;
    }
    String type = frame.get("type").getAsString();
    JsonElement rawId = frame.get("id");
    Long id = integer(rawId);
    switch (type) {
      case "call", "stream" -> {
        if (id == null) {
          error(null, type + " needs an integer id");
        } else if (calls.containsKey(id)) {
          // A second call under one id would take over the first one's answer.
          error(id, type + " needs a new integer id");
        } else {
          Call call = new Call(id, type.equals("stream"), frame.get("request"));
          calls.put(id, call);
          admit(call);
        }
      }
      case "cancel" -> {
        Call call = id == null ? null : calls.get(id);
        if (call != null) call.cancelled.complete(null);
      }
      case "credit" -> {
        Call call = id == null ? null : calls.get(id);
        Long n = integer(frame.get("n"));
        if (call != null && n != null && n > 0) call.grant((int) Math.min(n, Integer.MAX_VALUE));
      }
      case "health" -> {
        JsonObject answer = new JsonObject();
        answer.addProperty("type", "health");
        answer.add("id", rawId == null ? JsonNull.INSTANCE : rawId);
        answer.addProperty("status", "serving");
        answer.addProperty("detail", "");
        send(answer.toString());
      }
      case "event" -> {
        JsonElement name = frame.get("event");
        if (name != null && name.isJsonPrimitive() && name.getAsJsonPrimitive().isString()) {
          JsonElement data = frame.get("data");
          service.deliverHostEvent(name.getAsString(), data == null ? JsonNull.INSTANCE : data);
        }
      }
      case "welcome" -> {
        welcomed = true;
        JsonElement cap = frame.get("max_message_bytes");
        if (cap != null && cap.isJsonPrimitive() && cap.getAsJsonPrimitive().isNumber()) hostAnnounced(cap.getAsString());
      }
      case "error" -> hostError(frame.get("error"));
      case "dropped" -> { } // the host's count of its events lost

      default -> error(id, "unknown frame type");
    }
  }

  /**
   * The host could not use a frame of ours (an older one says so of goaway): said at INFO, never
   * answered, or two peers could trade error frames for ever. Only the first {@link
   * #LOGGED_HOST_ERRORS} of a connection: the host chooses how many it sends.
   */
  private void hostError(JsonElement error) {
    hostErrors++;
    if (hostErrors <= LOGGED_HOST_ERRORS) {
      Log.SDK.info("the host could not use a frame: " + shownReason(errorText(error)));
    } else if (hostErrors == LOGGED_HOST_ERRORS + 1) {
      Log.SDK.info("the host sent more than " + LOGGED_HOST_ERRORS
          + " error frames on this connection; further ones are not logged");
    }
  }

  /**
   * What an {@code error} frame's {@code error} says, for the log: its {@code message}, an error
   * given as a bare string, or else its JSON text (for {@link #shownReason} to make safe to show).
   */
  static String errorText(JsonElement error) {
    if (error == null) return "null";
    JsonElement said = error.isJsonObject() ? error.getAsJsonObject().get("message") : error;
    if (said != null && said.isJsonPrimitive() && said.getAsJsonPrimitive().isString()) return said.getAsString();
    return error.toString();
  }

  /** A JSON object with a string {@code type}, or null. */
  private static JsonObject parse(String text) {
    JsonReader reader = new JsonReader(new StringReader(text));
    reader.setStrictness(Strictness.STRICT);
    reader.setNestingLimit(MAX_FRAME_DEPTH);
    try {
      JsonElement value = JsonParser.parseReader(reader);
      if (reader.peek() != JsonToken.END_DOCUMENT || !value.isJsonObject()) return null;
      JsonElement type = value.getAsJsonObject().get("type");
      if (type == null || !type.isJsonPrimitive() || !type.getAsJsonPrimitive().isString()) return null;
      return value.getAsJsonObject();
    } catch (JsonParseException | IOException | IllegalStateException | NumberFormatException notJson) {
      return null;
    }
  }

  /** A JSON integer that fits a long, or null. */
  static Long integer(JsonElement value) {
    if (value == null || !value.isJsonPrimitive() || !value.getAsJsonPrimitive().isNumber()) return null;
    String text = value.getAsString();
    if (text.length() > 40) return null;
    try {
      return new BigDecimal(text).longValueExact();
    } catch (ArithmeticException | NumberFormatException notALong) {
      return null;
    }
  }

  /**
   * The cap a host announced in {@code text} (the header's value, a welcome's number as
   * written): digits only, at most 16, from {@link #MIN_ANNOUNCED_CAP} to {@link
   * #MAX_ANNOUNCED_CAP}; else -1 (absent, a sign, a fraction, an exponent, too small or large).
   */
  static long announcedCap(String text) {
    if (text == null || text.isEmpty() || text.length() > 16) return -1;
    for (int i = 0; i < text.length(); i++) {
      if (text.charAt(i) < '0' || text.charAt(i) > '9') return -1;
    }
    long cap = Long.parseLong(text);
    return cap < MIN_ANNOUNCED_CAP || cap > MAX_ANNOUNCED_CAP ? -1 : cap;
  }

  /**
   * Takes the cap the upgrade's {@code headers} announce (the dispatcher's request, or in
   * reverse mode the gateway's 101 response) as the send cap: exactly one {@link
   * #MAX_MESSAGE_BYTES_HEADER}, as {@link #hostAnnounced(String)} takes it; none, two (each
   * could say another cap) or an invalid one leave the session's own. Before {@link #begin}, so
   * that the hello and everything after it are held to it.
   */
  void upgradeAnnounced(HttpHeaders headers) {
    List<String> announced = headers.getAll(MAX_MESSAGE_BYTES_HEADER);
    if (announced.size() == 1) hostAnnounced(announced.get(0));
  }

  /**
   * Takes the cap the host announced ({@link #announcedCap}'s forms) as the send cap when it is
   * smaller than the session's own; anything else leaves the session's cap as it was (a
   * welcome's invalid cap leaves the upgrade's).
   */
  void hostAnnounced(String text) {
    long cap = announcedCap(text);
    if (cap > 0) sendCap = Math.min(MAX_MESSAGE_BYTES, cap);
  }

  /** The largest frame this session sends now. */
  long sendCap() {
    return sendCap;
  }

  /** The bytes {@code frame} takes on the wire before any deflate: its UTF-8 as Netty writes it. */
  private static long wireBytes(String frame) {
    return ByteBufUtil.utf8Bytes(frame);
  }

  // ---- calls -------------------------------------------------------------------------

  private void admit(Call call) {
    if (running >= MAX_IN_FLIGHT || !waiting.isEmpty()) {
      waiting.add(call);
      channel.config().setAutoRead(false);
      return;
    }
    start(call);
  }

  private void start(Call call) {
    running++;
    if (running >= MAX_IN_FLIGHT) channel.config().setAutoRead(false);
    CallRequest request;
    try {
      request = envelope(call.request);
      call.method = request.getMethod();
    } catch (PluginException notAnEnvelope) {
      respond(call, PluginService.errorReply(notAnEnvelope));
      finished(call);
      return;
    }
    if (!call.stream) {
      service.answer(request, call.cancelled).whenComplete((reply, error) -> {
        respond(call, reply != null ? reply : PluginService.errorReply(error));
        channel.eventLoop().execute(() -> finished(call));
      });
      return;
    }
    Plugin.ChunkSink chunks = chunk -> {
      String data;
      try {
        data = ResultJson.text(Plugin.toJson(chunk), ResultJson.RESULT);
      } catch (PluginException notJson) {
        throw new PluginService.ChunkRefused(notJson);
      }
      String frame = "{\"type\":\"chunk\",\"id\":" + call.id + ",\"data\":" + data + "}";
      long bytes = wireBytes(frame);
      long cap = sendCap;
      if (bytes > cap) {
        throw new PluginService.ChunkRefused(
            PluginService.tooLarge("a chunk of " + WireJson.bareName(call.method), bytes, cap, CAP_NAME));
      }
      try {
        call.take();
      } catch (InterruptedException interrupted) {
        Thread.currentThread().interrupt();
        throw PluginException.deadlineExceeded("the stream was cancelled");
      }
      send(frame);
    };
    service.stream(request, chunks, call.cancelled).whenComplete((error, thrown) -> {
      CallReply reply = error == null && thrown == null
          ? CallReply.newBuilder().setOk(true).build()
          : error != null ? CallReply.newBuilder().setOk(false).setError(error).build() : PluginService.errorReply(thrown);
      respond(call, reply);
      channel.eventLoop().execute(() -> finished(call));
    });
  }

  private void finished(Call call) {
    calls.remove(call.id, call);
    running--;
    while (running < MAX_IN_FLIGHT && !waiting.isEmpty()) {
      Call next = waiting.poll();
      if (next.cancelled.isDone()) {
        calls.remove(next.id, next);
        continue;
      }
      start(next);
    }
    resumeReading();
  }

  /** The call's answer, unless the host cancelled it or the connection ended: nobody waits for it then. */
  private void respond(Call call, CallReply reply) {
    if (call.cancelled.isDone()) return;
    String frame = responseFrame(call, reply);
    long bytes = wireBytes(frame);
    long cap = sendCap;
    if (bytes > cap) {
      String what = (reply.getOk() ? "the result of " : "the error of ") + WireJson.bareName(call.method);
      frame = responseFrame(call, PluginService.errorReply(PluginService.tooLarge(what, bytes, cap, CAP_NAME)));
    }
    send(frame);
  }

  /** The {@code response} frame of {@code reply} to {@code call}. */
  private static String responseFrame(Call call, CallReply reply) {
    StringBuilder frame = new StringBuilder("{\"type\":\"response\",\"id\":").append(call.id).append(",\"response\":");
    if (reply.getOk()) {
      String result = reply.getResultJson().isEmpty() ? "null" : reply.getResultJson().toStringUtf8();
      frame.append("{\"ok\":true,\"result\":").append(result).append('}');
    } else {
      var error = reply.getError();
      JsonObject wire = new JsonObject();
      wire.addProperty("type", error.getType());
      wire.addProperty("message", error.getMessage());
      wire.addProperty("retryable", error.getRetryable());
      if (!error.getDetailsJson().isEmpty()) {
        try {
          wire.add("details", JsonParser.parseString(error.getDetailsJson().toStringUtf8()));
        } catch (JsonParseException unreadable) {
          // a plugin's details that are not JSON are left out
        }
      }
      // An infinite one would be written bare (Infinity), no JSON: the host drops it anyway.
      if (error.getRetryAfter() > 0 && Double.isFinite(error.getRetryAfter())) {
        wire.addProperty("retry_after", error.getRetryAfter());
      }
      JsonObject response = new JsonObject();
      response.addProperty("ok", false);
      response.add("error", wire);
      frame.append(response);
    }
    return frame.append('}').toString();
  }

  /**
   * The protobuf request of a frame's {@code request}: an object with the envelope's fields of
   * their types, else provider_error (that call's own answer).
   */
  static CallRequest envelope(JsonElement request) throws PluginException {
    if (request == null || !request.isJsonObject()) throw notAnEnvelope("not a JSON object");
    JsonObject fields = request.getAsJsonObject();
    CallRequest.Builder built = CallRequest.newBuilder()
        .setV((int) number(fields, "v", 0, 0xFFFF_FFFFL))
        .setPlugin(string(fields, "plugin"))
        .setMethod(string(fields, "method"));
    JsonElement params = fields.get("params");
    if (params != null && !params.isJsonNull()) built.setParamsJson(ByteString.copyFromUtf8(params.toString()));
    JsonElement context = fields.get("context");
    if (context != null && !context.isJsonNull()) {
      if (!context.isJsonObject()) throw notAnEnvelope("its context is not an object");
      JsonObject ctx = context.getAsJsonObject();
      built.getContextBuilder()
          .setRequestId(string(ctx, "request_id"))
          .setDeadlineMs(number(ctx, "deadline_ms", Long.MIN_VALUE, Long.MAX_VALUE))
          .setCaller(string(ctx, "caller"))
          .setTraceparent(string(ctx, "traceparent"))
          .setIdempotencyKey(string(ctx, "idempotency_key"));
    }
    return built.build();
  }

  private static PluginException notAnEnvelope(String why) {
    return PluginException.providerError("the request is not an envelope: " + why);
  }

  private static String string(JsonObject fields, String name) throws PluginException {
    JsonElement value = fields.get(name);
    if (value == null || value.isJsonNull()) return "";
    if (value.isJsonPrimitive() && value.getAsJsonPrimitive().isString()) return value.getAsString();
    throw notAnEnvelope("'" + name + "' is not a string");
  }

  private static long number(JsonObject fields, String name, long min, long max) throws PluginException {
    JsonElement value = fields.get(name);
    if (value == null || value.isJsonNull()) return 0;
    Long number = integer(value);
    if (number == null || number < min || number > max) throw notAnEnvelope("'" + name + "' is not an integer in range");
    return number;
  }

  // ---- writing -----------------------------------------------------------------------

  /** The event frame of {@code name} and its {@code data}, JSON text {@link Plugin#emit} wrote. */
  private void sendEvent(String name, String data) {
    String frame = "{\"type\":\"event\",\"event\":" + new JsonPrimitive(name) + ",\"data\":" + data + "}";
    long bytes = wireBytes(frame);
    long cap = sendCap;
    if (bytes > cap) {
      // Once a connection: a plugin that emits such events in a loop would fill stderr.
      if (eventRefusalSaid.compareAndSet(false, true)) {
        Log.SDK.warning("event " + WireJson.bareName(name) + " is " + bytes + " bytes, over the " + CAP_NAME + " of "
            + cap + " bytes: not sent");
      }
      return;
    }
    queueEvent(frame);
  }

  /**
   * Hands an event frame over, from any thread; past {@link #EVENTS_WAITING} event frames
   * waiting the oldest is dropped. A method that emits never waits for the host: handed
   * straight to Netty, as before, every event for a host that reads nothing stayed in its
   * outbound buffer until the heartbeat found the host stalled, 15 s of events later.
   */
  private void queueEvent(String frame) {
    handOver(frame, true);
  }

  /**
   * Hands {@code text} over, from any thread, behind every frame handed over before it; the
   * event loop writes them in that order while the socket takes more ({@link #flush}). Only
   * {@code event} frames ({@code event}: true) are ever dropped, the oldest first; nothing is
   * kept once the connection has closed. Written straight to Netty, as before, an answer went
   * out ahead of the events its method had emitted, which waited for the socket to drain.
   */
  private void handOver(String text, boolean event) {
    if (!channel.isActive()) return;
    boolean firstDrop = false;
    boolean flush;
    synchronized (outbox) {
      Waiting frame = new Waiting(handedOver++, text);
      if (event) {
        if (events.size() >= EVENTS_WAITING) {
          events.poll();
          firstDrop = eventsDropped++ == 0;
        }
        events.add(frame);
      } else {
        frames.add(frame);
      }
      flush = !flushQueued;
      flushQueued = true;
    }
    if (firstDrop) {
      Log.SDK.warning("the host is not reading its Events stream; dropping the oldest events");
    }
    // Through the event loop's queue, from it too: the one writer, one task for a burst.
    if (flush) channel.eventLoop().execute(this::flush);
  }

  /** The frame handed over first of those waiting; under {@link #outbox}, with one waiting. */
  private Waiting nextInOrder() {
    Waiting frame = frames.peek();
    Waiting event = events.peek();
    return event == null || (frame != null && frame.number() < event.number()) ? frames.poll() : events.poll();
  }

  /**
   * Hands the waiting frames to the socket in order while it takes more. On the event loop;
   * once the socket takes no more, {@link #channelWritabilityChanged} calls it again when it
   * drains. After a close frame nothing more is written.
   */
  private void flush() {
    boolean wrote = false;
    while (true) {
      Waiting frame;
      synchronized (outbox) {
        if ((frames.isEmpty() && events.isEmpty()) || closeSent || !channel.isActive() || !channel.isWritable()) {
          flushQueued = false;
          break;
        }
        frame = nextInOrder();
      }
      channel.write(new TextWebSocketFrame(frame.text()), channel.voidPromise());
      wrote = true;
    }
    if (wrote) channel.flush();
  }

  private void error(Long id, String message) {
    JsonObject frame = new JsonObject();
    frame.addProperty("type", "error");
    if (id != null) frame.addProperty("id", id);
    JsonObject error = new JsonObject();
    error.addProperty("type", "provider_error");
    error.addProperty("message", message);
    frame.add("error", error);
    send(frame.toString());
  }

  /** Hands {@code text}, a frame that is never dropped, over ({@link #handOver}), from any thread. */
  private void send(String text) {
    handOver(text, false);
  }

  /**
   * A close reason a peer sent, as a log line may show it: what does not print escaped
   * ({@code \\u001b}, a newline), cut to 200 characters. The peer chose those bytes; the operator's
   * terminal must not run them.
   */
  static String shownReason(String reason) {
    if (reason == null) return "";
    StringBuilder shown = new StringBuilder();
    for (int i = 0; i < reason.length() && shown.length() <= 200; i++) {
      char c = reason.charAt(i);
      int type = Character.getType(c);
      // Line and paragraph separators (U+2028, U+2029) end a line in many viewers, as in
      // the Go, Python, Rust and TypeScript SDKs' escaping.
      if (c < 0x20 || c == 0x7f || (c >= 0x80 && c < 0xa0) || type == Character.FORMAT
          || type == Character.LINE_SEPARATOR || type == Character.PARAGRAPH_SEPARATOR
          || Character.isSurrogate(c)) {
        shown.append(String.format("\\u%04x", (int) c));
      } else {
        shown.append(c);
      }
    }
    return shown.length() <= 200 ? shown.toString() : shown.substring(0, 200) + "…";
  }

  @Override
  public String toString() {
    int framesWaiting;
    int eventsWaiting;
    long dropped;
    synchronized (outbox) {
      framesWaiting = frames.size();
      eventsWaiting = events.size();
      dropped = eventsDropped;
    }
    return "WsSession(" + plugin.id() + ", calls=" + calls.size() + ", waiting=" + waiting.size()
        + ", send_cap=" + sendCap + ", frames_waiting=" + framesWaiting + ", events_waiting=" + eventsWaiting
        + ", events_dropped=" + dropped
        + ", goaway=" + goneAway + ")";
  }

  /** The sessions of one server or dialler, for a stop to say goaway on each and wait for them. */
  static final class Sessions {
    private final List<WsSession> open = new ArrayList<>();

    synchronized void add(WsSession session) {
      open.add(session);
      session.ended().whenComplete((value, error) -> remove(session));
    }

    private synchronized void remove(WsSession session) {
      open.remove(session);
    }

    synchronized int size() {
      return open.size();
    }

    /** goaway on each, then wait for them all to end: the host closes, or the grace and the close's wait pass. */
    void goAwayAndWait(long graceMs) {
      List<WsSession> now;
      synchronized (this) {
        now = List.copyOf(open);
      }
      for (WsSession session : now) session.goAway();
      long deadline = System.nanoTime() + TimeUnit.MILLISECONDS.toNanos(graceMs + CLOSE_HANDSHAKE_WAIT_MS + 500);
      for (WsSession session : now) {
        try {
          session.ended().get(Math.max(0, deadline - System.nanoTime()), TimeUnit.NANOSECONDS);
        } catch (Exception late) {
          session.channel.close();
        }
      }
    }
  }
}
