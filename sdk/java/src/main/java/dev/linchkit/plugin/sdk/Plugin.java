package dev.linchkit.plugin.sdk;

import com.google.gson.Gson;
import com.google.gson.GsonBuilder;
import com.google.gson.JsonArray;
import com.google.gson.JsonElement;
import com.google.gson.JsonNull;
import com.google.gson.JsonObject;
import java.util.ArrayDeque;
import java.util.ArrayList;
import java.util.Collections;
import java.util.Deque;
import java.util.EnumSet;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Set;
import java.util.TreeSet;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.CopyOnWriteArrayList;
import java.util.function.BiConsumer;
import java.util.function.Consumer;

/**
 * What a plugin author writes against: methods, lifecycle hooks and event handlers, then
 * {@link Serve#serve(Plugin, String[])}. Nothing here knows about gRPC.
 *
 * <pre>{@code
 * Plugin plugin = new Plugin("shop", "1.2.0");
 * plugin.method("price", (params, ctx) -> Map.of("cents", 120));
 * plugin.streamingMethod("rows", (params, ctx, out) -> out.send(Map.of("row", 1)));
 * plugin.onInit(config -> ...);
 * plugin.on("ping", (name, data) -> plugin.emit("pong", data));
 * Serve.serve(plugin, args);
 * }</pre>
 */
public final class Plugin {
  /**
   * A unary method: JSON params in, any Gson-serialisable result out. A result JSON cannot carry
   * (a NaN or an infinity anywhere in it, a string with a lone surrogate) is the call's {@code
   * provider_error}.
   */
  @FunctionalInterface
  public interface UnaryMethod {
    Object call(JsonElement params, CallContext ctx) throws Exception;
  }

  /**
   * Where a streaming method sends its chunks. A chunk refused (one JSON cannot carry, one over
   * the host's cap) throws, and ends the stream with that error even when the method catches it.
   */
  @FunctionalInterface
  public interface ChunkSink {
    void send(Object chunk) throws PluginException;
  }

  /** A streaming method: sends zero or more chunks, then returns. */
  @FunctionalInterface
  public interface StreamingMethod {
    void call(JsonElement params, CallContext ctx, ChunkSink out) throws Exception;
  }

  @FunctionalInterface
  public interface Hook {
    void run() throws Exception;
  }

  @FunctionalInterface
  public interface InitHook {
    void run(JsonObject config) throws Exception;
  }

  /** A host event's handler: its name and JSON data. */
  @FunctionalInterface
  public interface EventHandler {
    void handle(String name, JsonElement data) throws Exception;
  }

  /** A method as Describe reports it. */
  public record MethodInfo(String name, boolean streaming, String description) {}

  private record Registered(UnaryMethod unary, StreamingMethod streaming, String description) {}

  /** An event emitted while no host listened: its name and its data as JSON text. */
  private record PendingEvent(String name, String json) {}

  private enum Phase { INIT, START, STOP, DESTROY }

  /** Events emitted while no host listens are kept, up to this many, for the first listener. */
  private static final int PENDING_EVENTS_LIMIT = 1024;

  /**
   * Builds the trees of what methods return and emit. A NaN or an infinity goes into the tree
   * as it is: {@link ResultJson} refuses it when the tree is written, one check for a Map, a
   * record and a pre-built {@code JsonElement} alike. Gson's default threw here instead, with
   * advice meant for the plugin's author ({@code serializeSpecialFloatingPointValues}) as the
   * host's error message.
   */
  static final Gson GSON = new GsonBuilder().serializeSpecialFloatingPointValues().create();

  private final String id;
  private final String version;
  private final String runtime;
  private volatile JsonObject config = new JsonObject();
  private final Map<String, Registered> methods = new LinkedHashMap<>();
  private final List<InitHook> initHooks = new ArrayList<>();
  private final List<Hook> startHooks = new ArrayList<>();
  private final List<Hook> stopHooks = new ArrayList<>();
  private final List<Hook> destroyHooks = new ArrayList<>();
  private final Set<Phase> done = EnumSet.noneOf(Phase.class);
  private final Map<String, List<EventHandler>> eventHandlers = new ConcurrentHashMap<>();
  /** Where events go: each gets the event's name and its data as JSON text. */
  private final List<BiConsumer<String, String>> sinks = new CopyOnWriteArrayList<>();
  private final Deque<PendingEvent> pending = new ArrayDeque<>();
  /** How many events {@link #pending} keeps; the WebSocket modes keep 1000, as every SDK does there. */
  private int pendingLimit = PENDING_EVENTS_LIMIT;
  /** Events dropped from {@link #pending} since a listener last took it. */
  private long pendingDropped;

  public Plugin(String id, String version) {
    this(id, version, "java");
  }

  public Plugin(String id, String version, String runtime) {
    this.id = id;
    this.version = version;
    this.runtime = runtime;
  }

  public String id() { return id; }
  public String version() { return version; }
  public String runtime() { return runtime; }

  /** The JSON object the host passed to Init ({} before that). */
  public JsonObject config() {
    return config;
  }

  public Plugin method(String name, UnaryMethod method) {
    return method(name, "", method);
  }

  public Plugin method(String name, String description, UnaryMethod method) {
    register(name, new Registered(method, null, description));
    return this;
  }

  /** A method answered chunk by chunk on CallStream; a unary Call gets the list of chunks. */
  public Plugin streamingMethod(String name, StreamingMethod method) {
    return streamingMethod(name, "", method);
  }

  public Plugin streamingMethod(String name, String description, StreamingMethod method) {
    register(name, new Registered(null, method, description));
    return this;
  }

  private synchronized void register(String name, Registered entry) {
    if (methods.containsKey(name)) throw new IllegalArgumentException("method " + name + " is registered twice");
    methods.put(name, entry);
  }

  public Plugin onInit(InitHook hook) { initHooks.add(hook); return this; }
  public Plugin onStart(Hook hook) { startHooks.add(hook); return this; }
  public Plugin onStop(Hook hook) { stopHooks.add(hook); return this; }
  public Plugin onDestroy(Hook hook) { destroyHooks.add(hook); return this; }

  /** Handle host events named {@code name} ("*" for every event). */
  public Plugin on(String name, EventHandler handler) {
    eventHandlers.computeIfAbsent(name, key -> new CopyOnWriteArrayList<>()).add(handler);
    return this;
  }

  /**
   * Send event {@code name} with {@code data} (any Gson-serialisable value) to the host's handlers.
   * Data JSON cannot carry (a NaN, an infinity, a string with a lone surrogate) is not sent, on
   * any binding, and said once on stderr at WARNING: {@code event 'NAME' not sent: the data of
   * event 'NAME' is not JSON: …}.
   */
  public void emit(String name, Object data) {
    if (ResultJson.loneSurrogate(name) >= 0) {
      // No UTF-8 form: gRPC and WebSocket sent it with '?' in its place, another name.
      Log.SDK.warning("event '" + ResultJson.escapedLone(WireJson.bareName(name))
          + "' not sent: its name is not valid Unicode (a lone surrogate)");
      return;
    }
    String json;
    try {
      // Written once here, not by each sink: one refusal, one line, whoever listens.
      json = ResultJson.text(toJson(data), () -> "the data of event '" + WireJson.bareName(name) + "'");
    } catch (PluginException notJson) {
      Log.SDK.warning("event '" + WireJson.bareName(name) + "' not sent: " + notJson.getMessage());
      return;
    }
    synchronized (pending) {
      if (sinks.isEmpty()) {
        if (pending.size() >= pendingLimit) {
          pending.removeFirst();
          pendingDropped++;
        }
        pending.addLast(new PendingEvent(name, json));
        return;
      }
    }
    for (BiConsumer<String, String> sink : sinks) sink.accept(name, json);
  }

  public synchronized List<MethodInfo> describe() {
    List<MethodInfo> infos = new ArrayList<>();
    methods.forEach((name, entry) -> infos.add(new MethodInfo(name, entry.streaming() != null, entry.description())));
    return Collections.unmodifiableList(infos);
  }

  static JsonElement toJson(Object value) {
    if (value == null) return JsonNull.INSTANCE;
    if (value instanceof JsonElement json) return json;
    return GSON.toJsonTree(value);
  }

  // ---- used by the server binding ----------------------------------------------------

  /** Where emitted events go (their name and their data as JSON text); returns the unsubscribe action. */
  Runnable addEventSink(BiConsumer<String, String> sink) {
    return addEventSink(sink, dropped -> {});
  }

  /**
   * {@link #addEventSink(BiConsumer)}, told after the events that waited for a listener how
   * many were dropped from them (when any were): the WebSocket binding's {@code dropped} frame.
   */
  Runnable addEventSink(BiConsumer<String, String> sink, java.util.function.LongConsumer dropped) {
    synchronized (pending) {
      sinks.add(sink);
      while (!pending.isEmpty()) {
        PendingEvent event = pending.removeFirst();
        sink.accept(event.name(), event.json());
      }
      if (pendingDropped > 0) dropped.accept(pendingDropped);
      pendingDropped = 0;
    }
    return () -> sinks.remove(sink);
  }

  /** Keep at most {@code limit} events while no listener is attached (the WebSocket modes: 1000). */
  void keepAtMost(int limit) {
    synchronized (pending) {
      pendingLimit = limit;
      while (pending.size() > limit) {
        pending.removeFirst();
        pendingDropped++;
      }
    }
  }

  void deliverHostEvent(String name, JsonElement data) throws Exception {
    List<EventHandler> handlers = new ArrayList<>(eventHandlers.getOrDefault(name, List.of()));
    handlers.addAll(eventHandlers.getOrDefault("*", List.of()));
    for (EventHandler handler : handlers) handler.handle(name, data);
  }

  /**
   * Run Init's hooks with {@code configuration}, which {@link #config()} reports from now on.
   * Every Init runs them: a service outlives its hosts, and the next host to attach runs the
   * lifecycle again, with its own config (docs/protocol.md), as the other SDKs do. An Init
   * begins a new round: the Stop and Destroy of the last one count no more.
   */
  void init(JsonObject configuration) throws Exception {
    config = configuration;
    synchronized (done) {
      done.clear();
      done.add(Phase.INIT);
    }
    for (InitHook hook : initHooks) hook.run(configuration);
  }

  void start() throws Exception {
    run(startHooks);
    synchronized (done) {
      done.add(Phase.START);
      done.remove(Phase.STOP);
    }
  }

  void stop() throws Exception {
    run(stopHooks);
    mark(Phase.STOP);
  }

  void destroy() throws Exception {
    run(destroyHooks);
    mark(Phase.DESTROY);
  }

  /**
   * At shutdown, what the host did not run itself: Stop when started and not stopped since,
   * Destroy when not destroyed since the last Init; both even if one fails.
   */
  void close() throws Exception {
    close(hook -> {});
  }

  /**
   * The hooks a {@link #close()} now owes, in the order it runs them: "stop" when started and
   * not stopped since, "destroy" when not destroyed since the last Init.
   */
  List<String> owedAtClose() {
    List<String> owed = new ArrayList<>(2);
    synchronized (done) {
      if (done.contains(Phase.START) && !done.contains(Phase.STOP)) owed.add("stop");
      if (!done.contains(Phase.DESTROY)) owed.add("destroy");
    }
    return owed;
  }

  /**
   * {@link #close()}, telling {@code starting} the name of each hook ("stop", "destroy") as it
   * begins: a stop that gives up on a hook still running names it.
   */
  void close(Consumer<String> starting) throws Exception {
    close(owedAtClose(), starting);
  }

  /**
   * The hooks in {@code owed} (from {@link #owedAtClose()}), both even if one fails, telling
   * {@code starting} each one's name as it begins.
   */
  void close(List<String> owed, Consumer<String> starting) throws Exception {
    try {
      if (owed.contains("stop")) {
        starting.accept("stop");
        stop();
      }
    } finally {
      if (owed.contains("destroy")) {
        starting.accept("destroy");
        destroy();
      }
    }
  }

  private void mark(Phase phase) {
    synchronized (done) {
      done.add(phase);
    }
  }

  private static void run(List<Hook> hooks) throws Exception {
    for (Hook hook : hooks) hook.run();
  }

  private synchronized Registered lookup(String name) throws PluginException {
    Registered entry = methods.get(name);
    if (entry == null) {
      String known = methods.isEmpty() ? "none" : String.join(", ", new TreeSet<>(methods.keySet()));
      throw PluginException.methodNotFound("plugin " + id + " has no method " + WireJson.shownName(name) + "; it has: " + known);
    }
    return entry;
  }

  /** Fails with method_not_found before any work when {@code name} is unknown. */
  void checkMethod(String name) throws PluginException {
    lookup(name);
  }

  /** One unary answer: a streaming method's chunks are gathered into a list. */
  JsonElement invoke(String name, JsonElement params, CallContext ctx) throws Exception {
    Registered entry = lookup(name);
    if (entry.unary() != null) return toJson(entry.unary().call(params, ctx));
    JsonArray chunks = new JsonArray();
    entry.streaming().call(params, ctx, chunk -> {
      ctx.checkDeadline();
      chunks.add(toJson(chunk));
    });
    return chunks;
  }

  /** The chunks of a call: a unary method's result is its one chunk. */
  void invokeStream(String name, JsonElement params, CallContext ctx, ChunkSink out) throws Exception {
    Registered entry = lookup(name);
    if (entry.unary() != null) {
      out.send(toJson(entry.unary().call(params, ctx)));
      return;
    }
    entry.streaming().call(params, ctx, out);
  }
}
