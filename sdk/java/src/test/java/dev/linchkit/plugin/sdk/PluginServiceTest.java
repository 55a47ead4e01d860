package dev.linchkit.plugin.sdk;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertTrue;

import com.google.gson.JsonParser;
import com.google.protobuf.ByteString;
import dev.linchkit.plugin.v1.CallReply;
import dev.linchkit.plugin.v1.CallRequest;
import dev.linchkit.plugin.v1.PluginServiceGrpc;
import dev.linchkit.plugin.v1.StreamItem;
import io.grpc.ManagedChannel;
import io.grpc.Server;
import io.grpc.ServerInterceptors;
import io.grpc.health.v1.HealthGrpc;
import io.grpc.netty.shaded.io.grpc.netty.NettyChannelBuilder;
import io.grpc.netty.shaded.io.grpc.netty.NettyServerBuilder;
import io.grpc.protobuf.services.HealthStatusManager;
import java.net.InetSocketAddress;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import java.util.concurrent.TimeUnit;
import org.junit.jupiter.api.AfterEach;
import org.junit.jupiter.api.Test;

/** The service over a real grpc-java server and channel on loopback. */
class PluginServiceTest {
  private final List<Runnable> cleanups = new ArrayList<>();

  private record Running(PluginService service, PluginServiceGrpc.PluginServiceBlockingStub stub, HealthGrpc.HealthBlockingStub health) {}

  private Running serve(Plugin plugin, boolean servingFromStart) throws Exception {
    HealthStatusManager health = new HealthStatusManager();
    PluginService service = new PluginService(plugin, health, servingFromStart);
    Server server = NettyServerBuilder.forAddress(new InetSocketAddress("127.0.0.1", 0))
        .maxInboundMessageSize(Serve.MAX_MESSAGE_BYTES)
        .addService(ServerInterceptors.intercept(service, PluginService.HEADERS_INTERCEPTOR))
        .addService(health.getHealthService())
        .build()
        .start();
    ManagedChannel channel = NettyChannelBuilder.forAddress("127.0.0.1", server.getPort())
        .usePlaintext()
        .maxInboundMessageSize(Serve.MAX_MESSAGE_BYTES)
        .build();
    cleanups.add(() -> {
      channel.shutdownNow();
      server.shutdownNow();
      service.close();
    });
    return new Running(service, PluginServiceGrpc.newBlockingStub(channel), HealthGrpc.newBlockingStub(channel));
  }

  @AfterEach
  void stop() {
    cleanups.forEach(Runnable::run);
  }

  private static CallRequest request(String method, String params) {
    return CallRequest.newBuilder().setV(1).setMethod(method).setParamsJson(ByteString.copyFromUtf8(params)).build();
  }

  @Test
  void anErrorWithoutATypeIsAnsweredAtOnceNotAtTheDeadline() throws Exception {
    Plugin plugin = new Plugin("p", "1");
    plugin.method("untyped", (params, ctx) -> {
      throw new PluginException(null, "no type given");
    });
    plugin.method("bare", (params, ctx) -> {
      throw new PluginException(null, null);
    });
    plugin.streamingMethod("rows", (params, ctx, out) -> {
      out.send(Map.of("row", 1));
      throw new PluginException(null, "after one row");
    });
    Running running = serve(plugin, true);
    long start = System.nanoTime();
    CallReply reply = running.stub().withDeadlineAfter(20, TimeUnit.SECONDS).call(request("untyped", "{}"));
    assertTrue(System.nanoTime() - start < TimeUnit.SECONDS.toNanos(5), "answered long before the deadline");
    assertFalse(reply.getOk());
    assertEquals(Errors.DEFAULT_TYPE, reply.getError().getType());
    assertEquals("no type given", reply.getError().getMessage());

    CallReply bare = running.stub().withDeadlineAfter(20, TimeUnit.SECONDS).call(request("bare", "{}"));
    assertEquals(Errors.DEFAULT_TYPE, bare.getError().getType());
    assertEquals("PluginException", bare.getError().getMessage());

    List<StreamItem> items = new ArrayList<>();
    running.stub().withDeadlineAfter(20, TimeUnit.SECONDS).callStream(request("rows", "{}")).forEachRemaining(items::add);
    assertEquals(2, items.size(), items.toString());
    assertEquals("{\"row\":1}", items.get(0).getChunkJson().toStringUtf8());
    assertEquals(Errors.DEFAULT_TYPE, items.get(1).getError().getType());
    assertTrue(System.nanoTime() - start < TimeUnit.SECONDS.toNanos(10), "no call waited for its deadline");
  }

  @SuppressWarnings("unused")
  private static String utf8(ByteString bytes) {
    return bytes.toString(StandardCharsets.UTF_8);
  }
}
