package dev.linchkit.plugin.sdk;

import io.grpc.ForwardingServerCall;
import io.grpc.ForwardingServerCallListener;
import io.grpc.Metadata;
import io.grpc.MethodDescriptor;
import io.grpc.ServerCall;
import io.grpc.ServerCallHandler;
import io.grpc.ServerMethodDefinition;
import io.grpc.ServerServiceDefinition;
import io.grpc.ServiceDescriptor;
import io.grpc.Status;
import io.grpc.StatusRuntimeException;
import java.io.InputStream;
import java.util.ArrayList;
import java.util.List;

/**
 * A request over the server's {@code maxInboundMessageSize} only once decompressed (a small
 * gzip message that expands past it) answered RESOURCE_EXHAUSTED, as one over it on the wire
 * is, and as the other SDKs answer both; the host reads that as a request too large, which
 * sending again cannot help (docs/protocol.md, "gRPC binding").
 *
 * <p>grpc-java (1.83.1) counts a compressed request's size while the method's marshaller parses
 * it, on the call's executor: the {@code StatusRuntimeException} its size check throws escapes
 * {@code parseRequest}, and the server answers {@code UNKNOWN "Application error processing RPC"}
 * (and logs a SEVERE stack trace for each such call), which the host reads as a crashed handler
 * and sends again (grpc/grpc-java#11246; fixed there twice, #12360 and #12477, and both
 * reverted). So each method's request marshaller is wrapped: a parse refused for its size gives
 * null, and the listener in front of the service, which sees null first, closes the call with
 * grpc-java's own words for it. The service never sees that request; the service of a stream
 * already open (Events) is told its call was cancelled, so it lets go of it.
 */
final class OversizedRequests {
  private OversizedRequests() {}

  /** {@code service} with every method's oversized request answered RESOURCE_EXHAUSTED. */
  static ServerServiceDefinition answered(ServerServiceDefinition service, int maxRequestBytes) {
    ServiceDescriptor original = service.getServiceDescriptor();
    // The schema descriptor is kept: server reflection finds the service's files by it.
    ServiceDescriptor.Builder descriptor = ServiceDescriptor.newBuilder(original.getName())
        .setSchemaDescriptor(original.getSchemaDescriptor());
    List<ServerMethodDefinition<?, ?>> methods = new ArrayList<>();
    for (ServerMethodDefinition<?, ?> method : service.getMethods()) {
      ServerMethodDefinition<?, ?> refusing = refusing(method, maxRequestBytes);
      descriptor.addMethod(refusing.getMethodDescriptor());
      methods.add(refusing);
    }
    ServerServiceDefinition.Builder answered = ServerServiceDefinition.builder(descriptor.build());
    methods.forEach(answered::addMethod);
    return answered.build();
  }

  private static <Q, A> ServerMethodDefinition<Q, A> refusing(ServerMethodDefinition<Q, A> method, int maxRequestBytes) {
    MethodDescriptor<Q, A> original = method.getMethodDescriptor();
    MethodDescriptor<Q, A> descriptor = original
        .toBuilder(new SizeRefusingParser<>(original.getRequestMarshaller()), original.getResponseMarshaller())
        .build();
    ServerCallHandler<Q, A> service = method.getServerCallHandler();
    Status tooLarge = Status.RESOURCE_EXHAUSTED.withDescription(
        "Decompressed gRPC message exceeds maximum size " + maxRequestBytes);
    return ServerMethodDefinition.create(descriptor, (call, headers) -> {
      GuardedCall<Q, A> guarded = new GuardedCall<>(call);
      return new RefusingListener<>(service.startCall(guarded, headers), guarded, tooLarge);
    });
  }

  /** Parses as {@code parser} does, but gives null for a request refused for its size. */
  private record SizeRefusingParser<T>(MethodDescriptor.Marshaller<T> parser) implements MethodDescriptor.Marshaller<T> {
    @Override
    public InputStream stream(T value) {
      return parser.stream(value);
    }

    @Override
    public T parse(InputStream stream) {
      try {
        return parser.parse(stream);
      } catch (StatusRuntimeException error) {
        if (error.getStatus().getCode() != Status.Code.RESOURCE_EXHAUSTED) throw error;
        return null;
      }
    }
  }

  /** Hands the service its call's events until a request is refused; then only its end, as a cancel. */
  private static final class RefusingListener<Q> extends ForwardingServerCallListener.SimpleForwardingServerCallListener<Q> {
    private final GuardedCall<Q, ?> call;
    private final Status tooLarge;

    RefusingListener(ServerCall.Listener<Q> service, GuardedCall<Q, ?> call, Status tooLarge) {
      super(service);
      this.call = call;
      this.tooLarge = tooLarge;
    }

    @Override
    public void onMessage(Q message) {
      if (call.refused()) return;
      if (message == null) {
        call.refuse(tooLarge);
        return;
      }
      super.onMessage(message);
    }

    @Override
    public void onHalfClose() {
      // A unary method runs on the half-close; with its request refused there is nothing to run.
      if (!call.refused()) super.onHalfClose();
    }

    @Override
    public void onReady() {
      if (!call.refused()) super.onReady();
    }

    @Override
    public void onComplete() {
      // The refusal was sent: to the service, which did not end the call, it was cancelled.
      if (call.refused()) super.onCancel();
      else super.onComplete();
    }
  }

  /**
   * The call as the service sees it: once a request is refused, what the service still sends
   * (an Events stream's events, from the plugin's threads) is dropped, not written after the
   * call's end; the lock keeps the refusal's close from crossing a send already under way.
   * Until then every step goes through as it is.
   */
  private static final class GuardedCall<Q, A> extends ForwardingServerCall.SimpleForwardingServerCall<Q, A> {
    private volatile boolean refused;
    private boolean closedByService; // guarded by this

    GuardedCall(ServerCall<Q, A> call) {
      super(call);
    }

    boolean refused() {
      return refused;
    }

    synchronized void refuse(Status status) {
      refused = true;
      if (!closedByService) super.close(status, new Metadata());
    }

    @Override
    public synchronized void sendHeaders(Metadata headers) {
      if (!refused) super.sendHeaders(headers);
    }

    @Override
    public synchronized void sendMessage(A message) {
      if (!refused) super.sendMessage(message);
    }

    @Override
    public synchronized void close(Status status, Metadata trailers) {
      if (refused) return;
      closedByService = true;
      super.close(status, trailers);
    }
  }
}
