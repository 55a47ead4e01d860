package dev.linchkit.plugin.sdk;

import com.google.gson.JsonElement;
import com.google.gson.JsonObject;
import com.google.protobuf.ByteString;
import dev.linchkit.plugin.v1.BatchReply;
import dev.linchkit.plugin.v1.BatchRequest;
import dev.linchkit.plugin.v1.CallReply;
import dev.linchkit.plugin.v1.CallRequest;
import dev.linchkit.plugin.v1.DescribeRequest;
import dev.linchkit.plugin.v1.HostEvent;
import dev.linchkit.plugin.v1.InitRequest;
import dev.linchkit.plugin.v1.LifecycleReply;
import dev.linchkit.plugin.v1.LifecycleRequest;
import dev.linchkit.plugin.v1.MethodInfo;
import dev.linchkit.plugin.v1.PluginEvent;
import dev.linchkit.plugin.v1.PluginInfo;
import dev.linchkit.plugin.v1.PluginServiceGrpc;
import dev.linchkit.plugin.v1.StreamItem;
import io.grpc.Context;
import io.grpc.Contexts;
import io.grpc.Deadline;
import io.grpc.ForwardingServerCall;
import io.grpc.Metadata;
import io.grpc.ServerCall;
import io.grpc.ServerCallHandler;
import io.grpc.ServerInterceptor;
import io.grpc.Status;
import io.grpc.protobuf.services.HealthStatusManager;
import io.grpc.health.v1.HealthCheckResponse.ServingStatus;
import io.grpc.stub.ServerCallStreamObserver;
import io.grpc.stub.StreamObserver;
import java.nio.charset.StandardCharsets;
import java.util.ArrayDeque;
import java.util.ArrayList;
import java.util.List;
import java.util.Set;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;
import java.util.concurrent.ScheduledFuture;
import java.util.concurrent.ScheduledThreadPoolExecutor;
import java.util.concurrent.ThreadFactory;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicBoolean;
import java.util.concurrent.atomic.AtomicInteger;
import java.util.concurrent.atomic.AtomicReference;
import java.util.logging.Level;

/**
 * The gRPC binding of a {@link Plugin}: linchkit.plugin.v1.PluginService. Plugin failures
 * travel in CallReply.error; gRPC status codes are kept for protocol failures (a malformed
 * config, a failing lifecycle hook). Methods run on the SDK's own worker threads, so a
 * deadline can answer {@code deadline_exceeded} and interrupt a method that overruns it.
 */
public final class PluginService extends PluginServiceGrpc.PluginServiceImplBase {
  /** The most calls one CallBatch may carry: what the dispatcher's batcher sends at most. */
  static final int MAX_BATCH_CALLS = 10_000;
  /** The most events an Events stream holds while its host does not read them. */
  static final int EVENTS_PER_STREAM = 1024;
  public static final int PROTOCOL_VERSION = 1;
  public static final String SERVICE_NAME = "linchkit.plugin.v1.PluginService";

  private static final Context.Key<Metadata> HEADERS = Context.key("linchkit-call-headers");
  private static final Metadata.Key<String> REQUEST_ID = Metadata.Key.of("x-request-id", Metadata.ASCII_STRING_MARSHALLER);
  private static final Metadata.Key<String> CALLER = Metadata.Key.of("x-caller", Metadata.ASCII_STRING_MARSHALLER);
  private static final Metadata.Key<String> TRACEPARENT = Metadata.Key.of("traceparent", Metadata.ASCII_STRING_MARSHALLER);

  /** Makes each call's headers (x-request-id, x-caller, traceparent) visible to the service. */
  public static final ServerInterceptor HEADERS_INTERCEPTOR = new ServerInterceptor() {
    @Override
    public <Q, A> ServerCall.Listener<Q> interceptCall(ServerCall<Q, A> call, Metadata headers, ServerCallHandler<Q, A> next) {
      if ("Events".equals(call.getMethodDescriptor().getBareMethodName())) {
        // Headers at once tell the host the stream is registered, so no later emit is lost
        // (docs/protocol.md); the stub would hold them until the first event. It sends them
        // again with that event: once is enough.
        call.sendHeaders(new Metadata());
        call = new ForwardingServerCall.SimpleForwardingServerCall<>(call) {
          @Override
          public void sendHeaders(Metadata alreadySent) {}
        };
      }
      return Contexts.interceptCall(Context.current().withValue(HEADERS, headers), call, headers, next);
    }
  };

  private final Plugin plugin;
  private final HealthStatusManager health;
  /** Service mode: it serves calls whichever host attaches or detaches, so health stays SERVING. */
  private final boolean servingFromStart;
  /** The largest reply this service sends: the host refuses a larger one (docs/protocol.md). */
  private final int maxReplyBytes;
  /** Each call's span ({@link Tracing}); null when the environment names no collector. */
  private final Tracing tracing;
  private final ExecutorService workers = Executors.newCachedThreadPool(daemonThreads("plugin-method"));
  private final HostEventRunner hostEvents = new HostEventRunner(daemonThreads("plugin-host-event"));
  private final ScheduledThreadPoolExecutor timers = deadlineTimers();
  /** The hosts attached now: the last to leave runs the stop and destroy hooks. */
  private final AttachedHosts hosts = new AttachedHosts();
  /** What ends each open Events stream ({@link #endEvents}). */
  private final Set<Runnable> eventStreams = ConcurrentHashMap.newKeySet();

  public PluginService(Plugin plugin, HealthStatusManager health, boolean servingFromStart) {
    this(plugin, health, servingFromStart, Serve.MAX_MESSAGE_BYTES);
  }

  PluginService(Plugin plugin, HealthStatusManager health, boolean servingFromStart, int maxReplyBytes) {
    this(plugin, health, servingFromStart, maxReplyBytes, null);
  }

  PluginService(Plugin plugin, HealthStatusManager health, boolean servingFromStart, int maxReplyBytes,
      Tracing tracing) {
    this.plugin = plugin;
    this.health = health;
    this.servingFromStart = servingFromStart;
    this.maxReplyBytes = maxReplyBytes;
    this.tracing = tracing;
    setServing(servingFromStart);
  }

  /**
   * One thread for every call's deadline. A call that ends first cancels its timer, which
   * then leaves the queue at once: by default a cancelled timer stayed queued until its
   * deadline (about 210,000 of them at 7,000 calls/s with 30 s deadlines).
   */
  private static ScheduledThreadPoolExecutor deadlineTimers() {
    ScheduledThreadPoolExecutor timers = new ScheduledThreadPoolExecutor(1, daemonThreads("plugin-deadline"));
    timers.setRemoveOnCancelPolicy(true);
    return timers;
  }

  /** Deadline timers still queued (tests: a call that ended leaves none). */
  int deadlineTimersQueued() {
    return timers.getQueue().size();
  }

  private static ThreadFactory daemonThreads(String prefix) {
    AtomicInteger count = new AtomicInteger();
    return runnable -> {
      Thread thread = new Thread(runnable, prefix + "-" + count.incrementAndGet());
      thread.setDaemon(true);
      return thread;
    };
  }

  public void setServing(boolean serving) {
    ServingStatus status = serving ? ServingStatus.SERVING : ServingStatus.NOT_SERVING;
    health.setStatus("", status);
    health.setStatus(SERVICE_NAME, status);
  }

  /**
   * Ends every open Events stream, at the start of a stop: they never end by themselves, and
   * a graceful shutdown would wait for them as for calls in flight.
   */
  public void endEvents() {
    for (Runnable end : List.copyOf(eventStreams)) end.run();
  }

  /** Ends the SDK's threads; methods still running are interrupted. */
  public void close() {
    workers.shutdownNow();
    hostEvents.close();
    timers.shutdownNow();
  }

  // ---- JSON ----------------------------------------------------------------------------

  /**
   * A method's result or chunk as JSON bytes; {@code provider_error} "the plugin's result is not
   * JSON: …" when it holds a number JSON has no form for, or a string UTF-8 has none for (a lone
   * surrogate) ({@link ResultJson}).
   */
  static ByteString encodeResult(JsonElement value) throws PluginException {
    return ByteString.copyFrom(ResultJson.text(value, ResultJson.RESULT), StandardCharsets.UTF_8);
  }

  /** JSON bytes to a value; empty bytes are JSON null. */
  static JsonElement decodeJson(ByteString bytes, String what) throws PluginException {
    return WireJson.decode(bytes, what);
  }

  /** What is answered when not even the error reply could be built (out of memory, say). */
  private static final CallReply UNCONVERTIBLE = CallReply.newBuilder().setOk(false).setError(Errors.toWire(null)).build();

  /**
   * The reply for {@code thrown}. Never throws: an exception escaping here would leave the call
   * unanswered until its deadline, and for ever without one.
   */
  static CallReply errorReply(Throwable thrown) {
    try {
      return CallReply.newBuilder().setOk(false).setError(Errors.toWire(thrown)).build();
    } catch (Throwable broken) {
      return UNCONVERTIBLE;
    }
  }

  /**
   * What is answered instead of a message over the host's cap: sending it would only make the
   * host reset the stream (and Netty log a stack trace for it here) after all of it went.
   * {@code provider_error} with {@code details.reason} {@code too_large}, not retryable: what
   * the host makes of any reply refused for its size.
   */
  PluginException tooLarge(String what, long bytes) {
    return tooLarge(what, bytes, maxReplyBytes, "gRPC message size cap");
  }

  /**
   * {@link #tooLarge(String, long)} of a binding's own {@code cap} ("gRPC message size cap",
   * "WebSocket message cap") of {@code limit} bytes.
   */
  static PluginException tooLarge(String what, long bytes, long limit, String cap) {
    JsonObject details = new JsonObject();
    details.addProperty("reason", "too_large");
    details.addProperty("bytes", bytes);
    details.addProperty("limit", limit);
    return new PluginException("provider_error", what + " is " + bytes + " bytes, over the " + cap + " of " + limit + " bytes",
        false, details, 0);
  }

  /**
   * What a stream's sink throws for a chunk it will not send (over the WebSocket cap, or one JSON
   * cannot carry): the stream ends at once with this error, and its method is stopped as a
   * cancel stops it (interrupted, each later chunk refused), whether or not the method lets the
   * exception through.
   */
  static final class ChunkRefused extends PluginException {
    ChunkRefused(PluginException error) {
      super(error.type(), error.getMessage(), error.retryable(), error.details(), error.retryAfterSeconds());
    }
  }

  /** {@code reply}, or the too-large error in its place when it is over the cap. */
  CallReply capped(CallReply reply, String method) {
    int size = reply.getSerializedSize();
    if (size <= maxReplyBytes) return reply;
    return errorReply(tooLarge((reply.getOk() ? "the result of " : "the error of ") + WireJson.shownName(method), size));
  }

  // ---- calls ---------------------------------------------------------------------------

  private static String header(Metadata headers, Metadata.Key<String> key) {
    String value = headers == null ? null : headers.get(key);
    return value == null ? "" : value;
  }

  private static String firstNonEmpty(String first, String second) {
    return first.isEmpty() ? second : first;
  }

  /** The call's context: the earlier of the envelope's deadline_ms and the gRPC deadline. */
  private static CallContext contextOf(CallRequest request) {
    long now = System.nanoTime();
    long deadline = Long.MAX_VALUE;
    long ms = request.getContext().getDeadlineMs();
    // Only a positive deadline_ms bounds the call. Past ~146 years in nanoseconds, now + it
    // wrapped around and Math.min below picked it over the gRPC deadline: no clock holds
    // such a deadline, so it is none (docs/protocol.md).
    if (ms > 0 && ms < TimeUnit.NANOSECONDS.toMillis(Long.MAX_VALUE / 2)) {
      deadline = now + TimeUnit.MILLISECONDS.toNanos(ms);
    }
    Deadline grpcDeadline = Context.current().getDeadline();
    if (grpcDeadline != null) {
      deadline = Math.min(deadline, now + grpcDeadline.timeRemaining(TimeUnit.NANOSECONDS));
    }
    Metadata headers = HEADERS.get();
    var message = request.getContext();
    return new CallContext(
        request.getMethod(),
        firstNonEmpty(message.getRequestId(), header(headers, REQUEST_ID)),
        firstNonEmpty(message.getCaller(), header(headers, CALLER)),
        firstNonEmpty(message.getTraceparent(), header(headers, TRACEPARENT)),
        message.getIdempotencyKey(),
        deadline);
  }

  /** Protocol checks common to Call, CallBatch and CallStream; the params. */
  private JsonElement checkRequest(CallRequest request) throws PluginException {
    if (request.getV() != 0 && request.getV() != PROTOCOL_VERSION) {
      throw PluginException.providerError("envelope version " + request.getV() + " is not supported; this plugin speaks " + PROTOCOL_VERSION);
    }
    // An empty method name is one the plugin does not have: method_not_found, as in every SDK.
    plugin.checkMethod(request.getMethod());
    return decodeJson(request.getParamsJson(), "params_json");
  }

  /** One unary call, answered as a CallReply whatever happens, at the latest at its deadline. */
  CompletableFuture<CallReply> answer(CallRequest request) {
    return answer(request, null);
  }

  /**
   * {@link #answer(CallRequest)}, the call cancelled (its method interrupted, its reply the
   * cancellation's) once {@code cancelled} completes, when it is not null: the WebSocket
   * binding's {@code cancel} frame, or its connection's end ({@link WsSession}).
   */
  CompletableFuture<CallReply> answer(CallRequest request, CompletableFuture<?> cancelled) {
    JsonElement params;
    try {
      params = checkRequest(request);
    } catch (PluginException error) {
      return CompletableFuture.completedFuture(errorReply(error));
    }
    CallContext ctx = contextOf(request);
    CompletableFuture<CallReply> reply = new CompletableFuture<>();
    Tracing.CallSpan span = tracing == null ? null : tracing.start(ctx);
    if (span != null) {
      // Ended with what the host gets: the method's answer, or the deadline's when that came first.
      reply.thenAccept(answer -> span.end(answer.getOk() ? null : answer.getError()));
    }
    Future<?> task = workers.submit(() -> {
      CallReply answer;
      try {
        JsonElement result = span == null
            ? plugin.invoke(request.getMethod(), params, ctx)
            : span.within(() -> plugin.invoke(request.getMethod(), params, ctx));
        answer = CallReply.newBuilder().setOk(true).setResultJson(encodeResult(result)).build();
      } catch (Throwable error) {
        answer = errorReply(ctx.isOver() && error instanceof InterruptedException ? ctx.overError() : error);
      }
      try {
        answer = capped(answer, request.getMethod());
      } catch (Throwable error) {
        answer = errorReply(error);
      }
      // Whatever happened above, the call is answered: a reply left incomplete waits for the
      // deadline, and for ever without one.
      reply.complete(answer);
    });
    Runnable giveUp = () -> {
      if (reply.complete(errorReply(ctx.overError()))) task.cancel(true);
    };
    watch(ctx, reply, giveUp, cancelled);
    return reply;
  }

  /**
   * A streaming call of the WebSocket binding ({@link WsSession}): its chunks go to {@code out},
   * which may wait (for the host's credit); completes with null once the method returned, or
   * with the wire error it ended with, its deadline's or {@code cancelled}'s included. Checked
   * as a unary call is (version, method, params) before the method runs; traced as one span.
   */
  CompletableFuture<dev.linchkit.plugin.v1.Error> stream(CallRequest request, Plugin.ChunkSink out, CompletableFuture<?> cancelled) {
    CompletableFuture<dev.linchkit.plugin.v1.Error> finished = new CompletableFuture<>();
    JsonElement params;
    CallContext ctx;
    try {
      params = checkRequest(request);
      ctx = contextOf(request);
    } catch (PluginException error) {
      finished.complete(Errors.toWire(error));
      return finished;
    }
    Tracing.CallSpan span = tracing == null ? null : tracing.start(ctx);
    AtomicBoolean ended = new AtomicBoolean();
    java.util.function.Consumer<Throwable> end = error -> {
      if (!ended.compareAndSet(false, true)) return;
      dev.linchkit.plugin.v1.Error wire = error == null ? null : Errors.toWire(error);
      // The span first: a host that read the stream's end sees its span ended.
      if (span != null) span.end(wire);
      finished.complete(wire);
    };
    // The method's task, once submitted: a chunk may be refused before runStream returns.
    CompletableFuture<Future<?>> task = new CompletableFuture<>();
    Plugin.ChunkSink guarded = chunk -> {
      if (ended.get()) throw ctx.overError();
      try {
        out.send(chunk);
      } catch (ChunkRefused refused) {
        ctx.cancel();
        end.accept(refused);
        task.thenAccept(running -> running.cancel(true));
        throw refused;
      }
    };
    task.complete(runStream(request.getMethod(), params, ctx, guarded, span, end));
    watch(ctx, finished, () -> {
      end.accept(ctx.overError());
      task.join().cancel(true);
    }, cancelled);
    return finished;
  }

  /**
   * Runs the streaming method on a worker, within {@code span} when traced, and ends the stream
   * with {@code end}: null once it returned, else its error (its deadline's, when the method was
   * interrupted because the call was over). Both bindings' streams run so.
   */
  private Future<?> runStream(String method, JsonElement params, CallContext ctx, Plugin.ChunkSink sink,
      Tracing.CallSpan span, java.util.function.Consumer<Throwable> end) {
    return workers.submit(() -> {
      try {
        if (span == null) {
          plugin.invokeStream(method, params, ctx, sink);
        } else {
          span.within(() -> {
            plugin.invokeStream(method, params, ctx, sink);
            return null;
          });
        }
        end.accept(null);
      } catch (Throwable error) {
        end.accept(ctx.isOver() && error instanceof InterruptedException ? ctx.overError() : error);
      }
    });
  }

  /**
   * A host event of the WebSocket binding, handed to the plugin's handlers on the host-event
   * threads (bounded, as over gRPC); a handler that fails is logged and the next event runs.
   */
  void deliverHostEvent(String name, JsonElement data) {
    hostEvents.run(() -> {
      try {
        plugin.deliverHostEvent(name, data);
      } catch (Throwable error) {
        Log.SDK.log(Level.SEVERE, "host event " + name + " failed", error);
      }
    });
  }

  /** At the deadline or on cancellation, {@code giveUp}; both watches end with {@code done}. */
  private void watch(CallContext ctx, CompletableFuture<?> done, Runnable giveUp) {
    watch(ctx, done, giveUp, null);
  }

  /**
   * {@link #watch(CallContext, CompletableFuture, Runnable)}, and {@code giveUp} too once
   * {@code cancelled} completes (when not null), the call marked cancelled first.
   */
  private void watch(CallContext ctx, CompletableFuture<?> done, Runnable giveUp, CompletableFuture<?> cancelled) {
    if (cancelled != null) {
      cancelled.whenComplete((value, error) -> {
        if (done.isDone()) return;
        ctx.cancel();
        giveUp.run();
      });
    }
    ScheduledFuture<?> timer = ctx.hasDeadline()
        ? timers.schedule(giveUp, Math.max(0, ctx.deadlineNanos() - System.nanoTime()), TimeUnit.NANOSECONDS)
        : null;
    Context grpcContext = Context.current();
    Context.CancellationListener onCancel = grpcCancelled -> {
      ctx.cancel();
      giveUp.run();
    };
    grpcContext.addListener(onCancel, Runnable::run);
    done.whenComplete((value, error) -> {
      if (timer != null) timer.cancel(false);
      grpcContext.removeListener(onCancel);
    });
  }

  private static <T> void reply(StreamObserver<T> observer, T value) {
    try {
      observer.onNext(value);
      observer.onCompleted();
    } catch (RuntimeException cancelled) {
      // The host went away first; nobody is left to answer.
    }
  }

  @Override
  public void call(CallRequest request, StreamObserver<CallReply> observer) {
    answer(request).thenAccept(reply -> reply(observer, reply));
  }

  @Override
  public void callBatch(BatchRequest request, StreamObserver<BatchReply> observer) {
    // Every item is queued at once: 100,000 of them held every call in memory together.
    // More than the dispatcher's batcher ever sends is refused whole, before any runs.
    if (request.getCallsCount() > MAX_BATCH_CALLS) {
      observer.onError(Status.INVALID_ARGUMENT
          .withDescription("a batch of " + request.getCallsCount() + " calls is over the limit of " + MAX_BATCH_CALLS)
          .asRuntimeException());
      return;
    }
    List<CompletableFuture<CallReply>> replies = new ArrayList<>();
    for (CallRequest call : request.getCallsList()) replies.add(answer(call));
    CompletableFuture.allOf(replies.toArray(CompletableFuture[]::new)).thenRun(() -> {
      BatchReply.Builder batch = BatchReply.newBuilder();
      for (CompletableFuture<CallReply> reply : replies) batch.addResults(reply.join());
      // Each reply fits, but together they may not: the largest give way to the too-large error.
      while (batch.build().getSerializedSize() > maxReplyBytes) {
        int largest = 0;
        for (int i = 1; i < batch.getResultsCount(); i++) {
          if (batch.getResults(i).getSerializedSize() > batch.getResults(largest).getSerializedSize()) largest = i;
        }
        CallReply over = batch.getResults(largest);
        batch.setResults(largest, errorReply(tooLarge(
            (over.getOk() ? "the result of " : "the error of ") + "call " + largest + " of a batch over the cap",
            over.getSerializedSize())));
      }
      reply(observer, batch.build());
    });
  }

  @Override
  public void callStream(CallRequest request, StreamObserver<StreamItem> observer) {
    ServerCallStreamObserver<StreamItem> out = (ServerCallStreamObserver<StreamItem>) observer;
    CompletableFuture<Void> finished = new CompletableFuture<>();
    AtomicBoolean ended = new AtomicBoolean();
    Object readiness = new Object();
    out.setOnCancelHandler(() -> {
      ended.set(true);
      finished.complete(null);
      synchronized (readiness) {
        readiness.notifyAll();
      }
    });
    out.setOnReadyHandler(() -> {
      synchronized (readiness) {
        readiness.notifyAll();
      }
    });
    // The call's span, once it has one: ended with the stream.
    AtomicReference<Tracing.CallSpan> span = new AtomicReference<>();
    // Ends the stream once: with an error item when `error` is not null.
    java.util.function.Consumer<Throwable> end = error -> {
      if (!ended.compareAndSet(false, true)) return;
      Tracing.CallSpan traced = span.get();
      if (traced != null) traced.end(error == null ? null : Errors.toWire(error));
      synchronized (out) {
        try {
          if (error != null) {
            StreamItem item = StreamItem.newBuilder().setError(Errors.toWire(error)).build();
            if (item.getSerializedSize() > maxReplyBytes) {
              item = StreamItem.newBuilder()
                  .setError(Errors.toWire(tooLarge("the error of " + WireJson.shownName(request.getMethod()), item.getSerializedSize())))
                  .build();
            }
            out.onNext(item);
          }
        } catch (RuntimeException cancelled) {
          // the host went away first
        }
        try {
          out.onCompleted();
        } catch (RuntimeException cancelled) {
          // the host went away first
        }
      }
      finished.complete(null);
    };

    JsonElement params;
    CallContext ctx;
    try {
      params = checkRequest(request);
      plugin.checkMethod(request.getMethod()); // method_not_found before any chunk
      ctx = contextOf(request);
    } catch (PluginException error) {
      end.accept(error);
      return;
    }
    if (tracing != null) span.set(tracing.start(ctx));
    // The method's task, once submitted: a chunk may be refused before runStream returns.
    CompletableFuture<Future<?>> task = new CompletableFuture<>();
    Plugin.ChunkSink sink = chunk -> {
      // Flow control: a method that produces faster than the host reads waits here.
      while (!ended.get() && !out.isReady()) {
        synchronized (readiness) {
          try {
            readiness.wait(50);
          } catch (InterruptedException interrupted) {
            Thread.currentThread().interrupt();
            throw ctx.overError();
          }
        }
      }
      if (ended.get()) throw ctx.overError();
      ByteString json;
      try {
        json = encodeResult(Plugin.toJson(chunk));
      } catch (PluginException notJson) {
        // The stream ends with it here, not when the method lets it through: a method that
        // catches it would otherwise go on sending, and the host would never learn of it.
        ctx.cancel();
        end.accept(notJson);
        task.thenAccept(running -> running.cancel(true));
        throw notJson;
      }
      StreamItem item = StreamItem.newBuilder().setChunkJson(json).build();
      if (item.getSerializedSize() > maxReplyBytes) {
        throw tooLarge("a chunk of " + WireJson.shownName(request.getMethod()), item.getSerializedSize());
      }
      synchronized (out) {
        out.onNext(item);
      }
    };
    task.complete(runStream(request.getMethod(), params, ctx, sink, span.get(), end));
    watch(ctx, finished, () -> {
      end.accept(ctx.overError());
      task.join().cancel(true);
    });
  }

  @Override
  public StreamObserver<HostEvent> events(StreamObserver<PluginEvent> observer) {
    ServerCallStreamObserver<PluginEvent> out = (ServerCallStreamObserver<PluginEvent>) observer;
    AtomicBoolean closed = new AtomicBoolean();
    Runnable[] unsubscribe = new Runnable[1];
    // What ends this stream at a stop (endEvents), as the host's own end does.
    Runnable[] end = new Runnable[1];
    out.setOnCancelHandler(() -> {
      closed.set(true);
      if (unsubscribe[0] != null) unsubscribe[0].run();
      if (end[0] != null) eventStreams.remove(end[0]);
    });
    // onNext never blocks: for a host that does not read, grpc-java buffered every event
    // (20,000 pongs of 16 KB: +540 MB). Events wait here while the transport is not ready,
    // at most EVENTS_PER_STREAM of them, the oldest dropped first (docs/protocol.md).
    ArrayDeque<PluginEvent> waiting = new ArrayDeque<>();
    AtomicBoolean told = new AtomicBoolean();
    end[0] = () -> {
      eventStreams.remove(end[0]);
      if (unsubscribe[0] != null) unsubscribe[0].run();
      synchronized (out) {
        if (closed.compareAndSet(false, true)) {
          try {
            out.onCompleted();
          } catch (RuntimeException cancelled) {
            // the host went away first
          }
        }
      }
    };
    Runnable flush = () -> {
      synchronized (out) {
        while (!closed.get() && !out.isCancelled() && out.isReady() && !waiting.isEmpty()) {
          try {
            out.onNext(waiting.poll());
          } catch (RuntimeException cancelled) {
            closed.set(true);
          }
        }
      }
    };
    out.setOnReadyHandler(flush);
    unsubscribe[0] = plugin.addEventSink((name, data) -> {
      synchronized (out) {
        if (closed.get() || out.isCancelled()) return;
        if (waiting.size() >= EVENTS_PER_STREAM) {
          waiting.poll();
          if (!told.getAndSet(true)) {
            Log.SDK.warning("the host is not reading its Events stream; dropping the oldest events");
          }
        }
        waiting.add(PluginEvent.newBuilder().setName(name).setDataJson(ByteString.copyFromUtf8(data)).build());
      }
      flush.run();
    });
    eventStreams.add(end[0]);
    if (closed.get()) eventStreams.remove(end[0]); // cancelled meanwhile
    return new StreamObserver<>() {
      @Override
      public void onNext(HostEvent event) {
        hostEvents.run(() -> {
          try {
            plugin.deliverHostEvent(event.getName(), decodeJson(event.getDataJson(), "data of host event " + event.getName()));
          } catch (Throwable error) {
            Log.SDK.log(Level.SEVERE, "host event " + event.getName() + " failed", error);
          }
        });
      }

      @Override
      public void onError(Throwable error) {
        closed.set(true);
        unsubscribe[0].run();
        eventStreams.remove(end[0]);
      }

      @Override
      public void onCompleted() {
        end[0].run();
      }
    };
  }

  // ---- identity and lifecycle ---------------------------------------------------------------

  @Override
  public void describe(DescribeRequest request, StreamObserver<PluginInfo> observer) {
    PluginInfo.Builder info = PluginInfo.newBuilder()
        .setId(plugin.id())
        .setVersion(plugin.version())
        .setProtocolVersion(PROTOCOL_VERSION)
        .setRuntime(plugin.runtime());
    for (Plugin.MethodInfo method : plugin.describe()) {
      info.addMethods(MethodInfo.newBuilder().setName(method.name()).setStreaming(method.streaming()).setDescription(method.description()));
    }
    reply(observer, info.build());
  }

  @FunctionalInterface
  private interface Step {
    void run() throws Exception;
  }

  /**
   * Runs the {@code name} hook ("init", "start", "stop", "destroy"). A hook that throws is the
   * plugin refusing the step: FAILED_PRECONDITION with "init hook failed: Type: message", the
   * code and words of every SDK (docs/protocol.md, "gRPC binding"), which the host reads as
   * a refusal not worth sending again. INTERNAL, which this answered before, says grpc's own
   * invariants broke.
   */
  private void lifecycle(StreamObserver<LifecycleReply> observer, String name, Step step) {
    try {
      step.run();
    } catch (Throwable error) {
      var wire = Errors.toWire(error);
      observer.onError(Status.FAILED_PRECONDITION
          .withDescription(name + " hook failed: " + wire.getType() + ": " + wire.getMessage())
          .asRuntimeException());
      return;
    }
    reply(observer, LifecycleReply.getDefaultInstance());
  }

  /**
   * The calling host's id ({@code linchkit-host}, "" without it); null once {@code observer}
   * was answered INVALID_ARGUMENT for an id off the contract, before any hook runs.
   */
  private static String host(StreamObserver<LifecycleReply> observer) {
    String host = AttachedHosts.hostOf(HEADERS.get());
    if (host == null) observer.onError(Status.INVALID_ARGUMENT.withDescription(AttachedHosts.BAD_ID).asRuntimeException());
    return host;
  }

  @Override
  public void init(InitRequest request, StreamObserver<LifecycleReply> observer) {
    String host = host(observer);
    if (host == null) return;
    if (!hosts.join(host)) {
      observer.onError(Status.RESOURCE_EXHAUSTED
          .withDescription(AttachedHosts.MAX_HOSTS + " hosts are attached to this service; one more is refused")
          .asRuntimeException());
      return;
    }
    JsonObject config;
    try {
      JsonElement value = decodeJson(request.getConfigJson(), "config_json");
      if (value.isJsonNull()) value = new JsonObject();
      if (!value.isJsonObject()) throw PluginException.invalidParams("config_json must be a JSON object");
      config = value.getAsJsonObject();
    } catch (PluginException error) {
      hosts.joined(host, false);
      observer.onError(Status.INVALID_ARGUMENT.withDescription(error.getMessage()).asRuntimeException());
      return;
    }
    boolean[] attached = {false};
    try {
      lifecycle(observer, "init", () -> {
        plugin.init(config);
        hosts.joined(host, true); // attached once its Init succeeded, before the reply goes
        attached[0] = true;
      });
    } finally {
      if (!attached[0]) hosts.joined(host, false);
    }
  }

  @Override
  public void start(LifecycleRequest request, StreamObserver<LifecycleReply> observer) {
    if (host(observer) == null) return;
    lifecycle(observer, "start", () -> {
      plugin.start();
      setServing(true);
    });
  }

  /**
   * The last host to leave stops the plugin; while another is attached, a host's Stop runs
   * nothing, so no hook runs under the other's calls. A subprocess's one host stops it:
   * NOT_SERVING. A service goes on serving the calls of whoever attaches next (and still
   * answers this host's), so its health stays SERVING.
   */
  @Override
  public void stop(LifecycleRequest request, StreamObserver<LifecycleReply> observer) {
    String host = host(observer);
    if (host == null) return;
    if (hosts.othersStay(host)) {
      reply(observer, LifecycleReply.getDefaultInstance());
      return;
    }
    lifecycle(observer, "stop", () -> {
      if (!servingFromStart) setServing(false);
      plugin.stop();
    });
  }

  @Override
  public void destroy(LifecycleRequest request, StreamObserver<LifecycleReply> observer) {
    String host = host(observer);
    if (host == null) return;
    if (hosts.othersStay(host)) {
      reply(observer, LifecycleReply.getDefaultInstance());
      return;
    }
    lifecycle(observer, "destroy", plugin::destroy);
  }
}
