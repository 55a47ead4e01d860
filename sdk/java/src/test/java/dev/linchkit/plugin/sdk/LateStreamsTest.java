package dev.linchkit.plugin.sdk;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertTrue;
import static org.junit.jupiter.api.Assertions.fail;

import com.google.protobuf.ByteString;
import dev.linchkit.plugin.v1.CallReply;
import dev.linchkit.plugin.v1.CallRequest;
import io.grpc.Server;
import io.grpc.netty.shaded.io.grpc.netty.GrpcSslContexts;
import io.grpc.netty.shaded.io.netty.buffer.ByteBuf;
import io.grpc.netty.shaded.io.netty.buffer.ByteBufUtil;
import io.grpc.netty.shaded.io.netty.buffer.Unpooled;
import io.grpc.netty.shaded.io.netty.channel.ChannelHandlerContext;
import io.grpc.netty.shaded.io.netty.channel.embedded.EmbeddedChannel;
import io.grpc.netty.shaded.io.netty.handler.codec.http2.DefaultHttp2Headers;
import io.grpc.netty.shaded.io.netty.handler.codec.http2.DefaultHttp2HeadersDecoder;
import io.grpc.netty.shaded.io.netty.handler.codec.http2.DefaultHttp2HeadersEncoder;
import io.grpc.netty.shaded.io.netty.handler.codec.http2.Http2ConnectionHandler;
import io.grpc.netty.shaded.io.netty.handler.codec.http2.Http2ConnectionHandlerBuilder;
import io.grpc.netty.shaded.io.netty.handler.codec.http2.Http2FrameAdapter;
import io.grpc.netty.shaded.io.netty.handler.codec.http2.Http2Headers;
import io.grpc.netty.shaded.io.netty.handler.ssl.ClientAuth;
import io.grpc.netty.shaded.io.netty.handler.ssl.SslContext;
import io.grpc.netty.shaded.io.netty.handler.ssl.SslContextBuilder;
import io.grpc.protobuf.services.HealthStatusManager;
import java.io.ByteArrayInputStream;
import java.io.ByteArrayOutputStream;
import java.io.DataInputStream;
import java.io.EOFException;
import java.io.IOException;
import java.io.OutputStream;
import java.net.InetSocketAddress;
import java.net.Socket;
import java.net.SocketException;
import java.nio.ByteBuffer;
import java.nio.charset.StandardCharsets;
import java.security.KeyStore;
import java.security.cert.Certificate;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import javax.net.ssl.KeyManagerFactory;
import javax.net.ssl.SSLContext;
import javax.net.ssl.SSLException;
import javax.net.ssl.SSLParameters;
import javax.net.ssl.SSLSocket;
import javax.net.ssl.TrustManagerFactory;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.params.ParameterizedTest;
import org.junit.jupiter.params.provider.ValueSource;

/**
 * A call the host sends too late for the plugin's graceful stop, written frame by frame as grpc
 * core writes it ({@link LateStreams}), to a real grpc-java server on loopback, in plaintext (as
 * {@code serve --address}) and over mutual TLS (as a subprocess plugin with AutoMTLS).
 */
class LateStreamsTest {
  private static final byte[] PREFACE = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".getBytes(StandardCharsets.US_ASCII);
  private static final int DATA = 0x0;
  private static final int HEADERS = 0x1;
  private static final int RST_STREAM = 0x3;
  private static final int SETTINGS = 0x4;
  private static final int PING = 0x6;
  private static final int GOAWAY = 0x7;
  private static final int WINDOW_UPDATE = 0x8;
  private static final int END_STREAM = 0x1;
  private static final int ACK = 0x1;
  private static final int END_HEADERS = 0x4;
  private static final int NO_ERROR = 0x0;
  private static final int REFUSED_STREAM = 0x7;
  private static final int STOP_WITHIN_MS = 15_000;

  private record Frame(int type, int flags, int stream, byte[] payload) {}

  /** What the plugin sent on one stream. */
  private static final class Stream {
    final Map<String, String> headers = new HashMap<>();
    final ByteArrayOutputStream data = new ByteArrayOutputStream();
    boolean ended;
    Integer reset;
  }

  @ParameterizedTest(name = "over TLS: {0}")
  @ValueSource(booleans = {false, true})
  void aCallSentTooLateForAGracefulStopCostsNoCallInFlight(boolean overTls) throws Exception {
    Plugin plugin = new Plugin("example", "1");
    plugin.method("sleep", (params, ctx) -> {
      ctx.sleep(params.getAsJsonObject().get("ms").getAsLong());
      return params;
    });
    plugin.method("echo", (params, ctx) -> params);
    HealthStatusManager health = new HealthStatusManager();
    PluginService service = new PluginService(plugin, health, true);
    AutoTls.ServerCertificate serverCertificate = AutoTls.generate();
    AutoTls.ServerCertificate hostCertificate = AutoTls.generate();
    SslContext tls = overTls
        ? GrpcSslContexts.configure(SslContextBuilder.forServer(serverCertificate.privateKey(), serverCertificate.certificate()))
            .trustManager(hostCertificate.certificate())
            .clientAuth(ClientAuth.REQUIRE)
            .build()
        : null;
    Server server = Serve.serving(Serve.builder(new InetSocketAddress("127.0.0.1", 0), tls), service, health,
            Serve.MAX_MESSAGE_BYTES, PluginService.HEADERS_INTERCEPTOR)
        .build()
        .start();
    Map<Integer, Stream> streams = new HashMap<>();
    List<Frame> goaways = new ArrayList<>();
    boolean late = false;
    try (Socket socket = overTls
        ? mutualTls(server.getPort(), serverCertificate, hostCertificate)
        : new Socket("127.0.0.1", server.getPort())) {
      socket.setSoTimeout(STOP_WITHIN_MS);
      OutputStream out = socket.getOutputStream();
      DataInputStream in = new DataInputStream(socket.getInputStream());
      DefaultHttp2HeadersEncoder encoder = new DefaultHttp2HeadersEncoder();
      DefaultHttp2HeadersDecoder decoder = new DefaultHttp2HeadersDecoder(false);

      out.write(concat(PREFACE, frame(SETTINGS, 0, 0, new byte[0]),
          call(1, "sleep", "{\"ms\": 500}", encoder), frame(PING, 0, 0, "in-order".getBytes(StandardCharsets.US_ASCII))));
      out.flush();
      for (Frame frame = read(in); ; frame = read(in)) { // its acknowledgement: the call was read
        if (frame == null) fail("the plugin closed the connection before the call was read");
        keep(frame, streams, goaways, decoder, out);
        if (frame.type() == PING && (frame.flags() & ACK) != 0) break;
      }

      server.shutdown();
      for (Frame frame = read(in); frame != null; frame = read(in)) {
        keep(frame, streams, goaways, decoder, out);
        // The PING that follows the GOAWAY: its acknowledgement caps the streams.
        if (frame.type() == PING && (frame.flags() & ACK) == 0 && !goaways.isEmpty() && !late) {
          late = true;
          // As grpc core writes a call it numbered before it read the GOAWAY: after the PING's
          // acknowledgement, in the same write.
          out.write(concat(frame(PING, ACK, 0, frame.payload()), call(3, "echo", "{\"n\": 1}", encoder)));
          out.flush();
        }
      }
    } finally {
      server.shutdownNow();
      service.close();
    }

    assertTrue(late, "the plugin sent no PING after its GOAWAY: " + goaways.size() + " GOAWAY");
    for (Frame goaway : goaways) {
      assertEquals(NO_ERROR, ByteBuffer.wrap(goaway.payload()).getInt(4),
          "GOAWAY " + new String(goaway.payload(), 8, goaway.payload().length - 8, StandardCharsets.UTF_8));
    }
    Stream inFlight = streams.getOrDefault(1, new Stream());
    assertTrue(inFlight.ended, "the call in flight was never answered: " + inFlight.headers + ", reset " + inFlight.reset);
    assertEquals("0", inFlight.headers.get("grpc-status"), inFlight.headers.toString());
    byte[] reply = inFlight.data.toByteArray();
    assertTrue(CallReply.parseFrom(ByteBuffer.wrap(reply, 5, reply.length - 5)).getOk());
    Stream tooLate = streams.getOrDefault(3, new Stream());
    int lastTaken = goaways.stream().mapToInt(goaway -> ByteBuffer.wrap(goaway.payload()).getInt() & Integer.MAX_VALUE)
        .min().orElse(Integer.MAX_VALUE);
    assertTrue(Integer.valueOf(REFUSED_STREAM).equals(tooLate.reset) || lastTaken < 3,
        "the late call was neither refused nor above the last stream taken: reset " + tooLate.reset + ", last " + lastTaken);
  }

  /**
   * The filter alone in front of Netty's own HTTP/2 server handler, which stops as grpc-java's
   * does (a GOAWAY capping the streams once its PING is acknowledged): the client's bytes split
   * at every size, so that a frame's header, or a dropped frame, straddles two reads.
   */
  @Test
  void aLateStreamsFramesAreCutOutHoweverTheBytesAreSplit() throws Exception {
    DefaultHttp2HeadersEncoder encoder = new DefaultHttp2HeadersEncoder();
    byte[] opening = concat(PREFACE, frame(SETTINGS, 0, 0, new byte[0]), headers(1, 0, encoder));
    // Late: HEADERS (which Netty refuses), a WINDOW_UPDATE, 70 bytes of DATA and a RST_STREAM.
    byte[] after = concat(
        frame(PING, ACK, 0, longBytes(SHUTDOWN_PING)),
        headers(3, 0, encoder),
        frame(WINDOW_UPDATE, 0, 3, ByteBuffer.allocate(4).putInt(5).array()),
        frame(DATA, 0, 3, new byte[30]),
        frame(DATA, END_STREAM, 3, new byte[40]),
        frame(RST_STREAM, 0, 3, ByteBuffer.allocate(4).putInt(0x8).array()),
        frame(WINDOW_UPDATE, 0, 1, ByteBuffer.allocate(4).putInt(100).array()),
        frame(DATA, END_STREAM, 1, new byte[10]),
        frame(PING, 0, 0, longBytes(7)));
    for (int size = 1; size <= after.length; size++) {
      StoppingServer server = new StoppingServer();
      server.channel.writeInbound(Unpooled.wrappedBuffer(opening));
      server.stop();
      int window = server.connectionWindow();
      for (int at = 0; at < after.length && server.channel.isOpen(); at += size) {
        server.channel.writeInbound(Unpooled.wrappedBuffer(Arrays.copyOfRange(after, at, Math.min(after.length, at + size))));
      }
      List<Frame> written = server.written();
      String said = "read in pieces of " + size + ": " + describe(written);
      assertTrue(server.channel.isOpen(), said);
      assertTrue(written.stream().anyMatch(frame -> frame.type() == GOAWAY && lastStream(frame) == 1), said);
      assertTrue(written.stream().filter(frame -> frame.type() == GOAWAY).allMatch(frame -> errorCode(frame) == NO_ERROR), said);
      assertTrue(written.stream().anyMatch(frame -> frame.type() == RST_STREAM && frame.stream() == 3
          && ByteBuffer.wrap(frame.payload()).getInt() == REFUSED_STREAM), said);
      assertTrue(written.stream().anyMatch(frame -> frame.type() == PING && frame.flags() == ACK
          && ByteBuffer.wrap(frame.payload()).getLong() == 7), "read to the end, " + said);
      // The dropped DATA took from the connection's window, as on the client's side: 10 bytes on
      // stream 1 and the late ones.
      assertEquals(window - 10 - 70, server.connectionWindow(), said);
      server.channel.finishAndReleaseAll();
    }
  }

  @Test
  void nothingIsCutBeforeTheServerSendsAGoaway() throws Exception {
    DefaultHttp2HeadersEncoder encoder = new DefaultHttp2HeadersEncoder();
    StoppingServer server = new StoppingServer();
    // A WINDOW_UPDATE on a stream never opened, with no GOAWAY sent: Netty's connection error.
    server.channel.writeInbound(Unpooled.wrappedBuffer(concat(PREFACE, frame(SETTINGS, 0, 0, new byte[0]),
        headers(1, 0, encoder), frame(WINDOW_UPDATE, 0, 5, ByteBuffer.allocate(4).putInt(100).array()))));
    List<Frame> written = server.written();
    assertTrue(written.stream().anyMatch(frame -> frame.type() == GOAWAY && errorCode(frame) != NO_ERROR), describe(written));
    assertFalse(server.channel.isOpen(), describe(written));
    server.channel.finishAndReleaseAll();
  }

  @Test
  void onlyBytesThatOpenWithThePrefaceAreFiltered() throws Exception {
    byte[] lateWindowUpdate = frame(WINDOW_UPDATE, 0, 3, ByteBuffer.allocate(4).putInt(100).array());
    byte[] notThePreface = Arrays.copyOf("GET / HTTP/1.1\r\n".getBytes(StandardCharsets.US_ASCII), PREFACE.length);
    assertEquals(hex(PREFACE), hex(filteredAfterAGoaway(concat(PREFACE, lateWindowUpdate))));
    byte[] other = concat(notThePreface, lateWindowUpdate);
    assertEquals(hex(other), hex(filteredAfterAGoaway(other)));
  }

  /** What the filter hands on of {@code bytes} once the server has sent a GOAWAY naming stream 1. */
  private static byte[] filteredAfterAGoaway(byte[] bytes) throws Exception {
    Http2ConnectionHandler http2 = new Http2ConnectionHandlerBuilder().server(true).frameListener(new Http2FrameAdapter()).build();
    http2.connection().goAwaySent(1, NO_ERROR, Unpooled.EMPTY_BUFFER);
    EmbeddedChannel channel = new EmbeddedChannel(new LateStreams.Frames(http2));
    for (int at = 0; at < bytes.length; at += 5) {
      channel.writeInbound(Unpooled.wrappedBuffer(Arrays.copyOfRange(bytes, at, Math.min(bytes.length, at + 5))));
    }
    ByteArrayOutputStream handedOn = new ByteArrayOutputStream();
    for (ByteBuf in = channel.readInbound(); in != null; in = channel.readInbound()) {
      handedOn.writeBytes(ByteBufUtil.getBytes(in));
      in.release();
    }
    channel.finishAndReleaseAll();
    return handedOn.toByteArray();
  }

  private static String hex(byte[] bytes) {
    return ByteBufUtil.hexDump(bytes);
  }

  private static final long SHUTDOWN_PING = 0x5709L;

  /**
   * Netty's HTTP/2 server handler behind the filter, stopping as grpc-java's does: GOAWAY naming
   * the largest stream id and a PING; on its acknowledgement a GOAWAY naming the last stream.
   */
  private static final class StoppingServer {
    final EmbeddedChannel channel = new EmbeddedChannel();
    final Http2ConnectionHandler http2;

    StoppingServer() {
      Http2ConnectionHandler[] self = new Http2ConnectionHandler[1];
      http2 = new Http2ConnectionHandlerBuilder()
          .server(true)
          .frameListener(new Http2FrameAdapter() {
            @Override
            public void onPingAckRead(ChannelHandlerContext ctx, long data) {
              if (data != SHUTDOWN_PING) return;
              self[0].goAway(ctx, self[0].connection().remote().lastStreamCreated(), NO_ERROR,
                  Unpooled.EMPTY_BUFFER, ctx.newPromise());
              ctx.flush();
            }
          })
          .build();
      self[0] = http2;
      channel.pipeline().addLast(new LateStreams.Frames(http2), http2);
    }

    void stop() {
      ChannelHandlerContext ctx = channel.pipeline().context(http2);
      http2.goAway(ctx, Integer.MAX_VALUE, NO_ERROR, Unpooled.EMPTY_BUFFER, ctx.newPromise());
      http2.encoder().writePing(ctx, false, SHUTDOWN_PING, ctx.newPromise());
      ctx.flush();
    }

    int connectionWindow() throws Exception {
      return http2.decoder().flowController().windowSize(http2.connection().connectionStream());
    }

    /** The frames the server wrote so far. */
    List<Frame> written() throws IOException {
      ByteArrayOutputStream bytes = new ByteArrayOutputStream();
      for (ByteBuf out = channel.readOutbound(); out != null; out = channel.readOutbound()) {
        bytes.writeBytes(ByteBufUtil.getBytes(out));
        out.release();
      }
      List<Frame> frames = new ArrayList<>();
      DataInputStream in = new DataInputStream(new ByteArrayInputStream(bytes.toByteArray()));
      for (Frame frame = read(in); frame != null; frame = read(in)) frames.add(frame);
      return frames;
    }
  }

  private static String describe(List<Frame> frames) {
    StringBuilder said = new StringBuilder("wrote");
    for (Frame frame : frames) said.append(" (type ").append(frame.type()).append(", stream ").append(frame.stream()).append(')');
    return said.toString();
  }

  private static int lastStream(Frame goaway) {
    return ByteBuffer.wrap(goaway.payload()).getInt() & Integer.MAX_VALUE;
  }

  private static int errorCode(Frame goaway) {
    return ByteBuffer.wrap(goaway.payload()).getInt(4);
  }

  private static byte[] longBytes(long value) {
    return ByteBuffer.allocate(8).putLong(value).array();
  }

  /** Keeps what {@code frame} says of a stream or of the connection's end, and acknowledges SETTINGS. */
  private static void keep(Frame frame, Map<Integer, Stream> streams, List<Frame> goaways,
      DefaultHttp2HeadersDecoder decoder, OutputStream out) throws Exception {
    Stream stream = streams.computeIfAbsent(frame.stream(), id -> new Stream());
    switch (frame.type()) {
      case HEADERS -> {
        assertEquals(END_HEADERS, frame.flags() & END_HEADERS, "a header block in one frame");
        ByteBuf block = Unpooled.wrappedBuffer(frame.payload());
        try {
          for (Map.Entry<CharSequence, CharSequence> header : decoder.decodeHeaders(frame.stream(), block)) {
            stream.headers.put(header.getKey().toString(), header.getValue().toString());
          }
        } finally {
          block.release();
        }
      }
      case DATA -> stream.data.write(frame.payload());
      case RST_STREAM -> stream.reset = ByteBuffer.wrap(frame.payload()).getInt();
      case GOAWAY -> goaways.add(frame);
      case SETTINGS -> {
        if ((frame.flags() & ACK) == 0) {
          out.write(frame(SETTINGS, ACK, 0, new byte[0]));
          out.flush();
        }
      }
      default -> { }
    }
    if ((frame.type() == HEADERS || frame.type() == DATA) && (frame.flags() & END_STREAM) != 0) stream.ended = true;
  }

  /** The plugin's next frame; null once it has closed the connection. */
  private static Frame read(DataInputStream in) throws IOException {
    byte[] head = new byte[9];
    try {
      in.readFully(head);
      ByteBuffer header = ByteBuffer.wrap(head);
      int length = (header.get() & 0xff) << 16 | (header.get() & 0xff) << 8 | (header.get() & 0xff);
      int type = header.get() & 0xff;
      int flags = header.get() & 0xff;
      int stream = header.getInt() & Integer.MAX_VALUE;
      byte[] payload = new byte[length];
      in.readFully(payload);
      return new Frame(type, flags, stream, payload);
    } catch (EOFException | SocketException | SSLException closed) {
      return null;
    }
  }

  private static byte[] frame(int type, int flags, int stream, byte[] payload) {
    return ByteBuffer.allocate(9 + payload.length)
        .put((byte) (payload.length >>> 16)).put((byte) (payload.length >>> 8)).put((byte) payload.length)
        .put((byte) type).put((byte) flags).putInt(stream).put(payload)
        .array();
  }

  /** A {@code Call} on {@code stream} as grpc core writes one: HEADERS, a WINDOW_UPDATE on the stream, then DATA. */
  private static byte[] call(int stream, String method, String params, DefaultHttp2HeadersEncoder encoder) throws Exception {
    byte[] message = CallRequest.newBuilder()
        .setV(1)
        .setPlugin("example")
        .setMethod(method)
        .setParamsJson(ByteString.copyFromUtf8(params))
        .build()
        .toByteArray();
    byte[] data = ByteBuffer.allocate(5 + message.length).put((byte) 0).putInt(message.length).put(message).array();
    return concat(
        headers(stream, 0, encoder),
        frame(WINDOW_UPDATE, 0, stream, ByteBuffer.allocate(4).putInt(5).array()),
        frame(DATA, END_STREAM, stream, data));
  }

  /** The HEADERS frame opening a {@code Call} on {@code stream}. */
  private static byte[] headers(int stream, int flags, DefaultHttp2HeadersEncoder encoder) throws Exception {
    Http2Headers headers = new DefaultHttp2Headers()
        .method("POST")
        .scheme("http")
        .path("/linchkit.plugin.v1.PluginService/Call")
        .authority("127.0.0.1")
        .add("content-type", "application/grpc")
        .add("te", "trailers");
    ByteBuf block = Unpooled.buffer();
    try {
      encoder.encodeHeaders(stream, headers, block);
      return frame(HEADERS, END_HEADERS | flags, stream, ByteBufUtil.getBytes(block));
    } finally {
      block.release();
    }
  }

  private static byte[] concat(byte[]... parts) {
    ByteArrayOutputStream all = new ByteArrayOutputStream();
    for (byte[] part : parts) all.writeBytes(part);
    return all.toByteArray();
  }

  /** A connection as the host's: its certificate for the plugin's, HTTP/2 by ALPN. */
  private static Socket mutualTls(int port, AutoTls.ServerCertificate plugin, AutoTls.ServerCertificate host) throws Exception {
    char[] password = "unused".toCharArray();
    KeyStore keys = KeyStore.getInstance("PKCS12");
    keys.load(null, null);
    keys.setKeyEntry("host", host.privateKey(), password, new Certificate[] {host.certificate()});
    KeyManagerFactory keyManagers = KeyManagerFactory.getInstance(KeyManagerFactory.getDefaultAlgorithm());
    keyManagers.init(keys, password);
    KeyStore trusted = KeyStore.getInstance("PKCS12");
    trusted.load(null, null);
    trusted.setCertificateEntry("plugin", plugin.certificate());
    TrustManagerFactory trustManagers = TrustManagerFactory.getInstance(TrustManagerFactory.getDefaultAlgorithm());
    trustManagers.init(trusted);
    SSLContext context = SSLContext.getInstance("TLS");
    context.init(keyManagers.getKeyManagers(), trustManagers.getTrustManagers(), null);
    SSLSocket socket = (SSLSocket) context.getSocketFactory().createSocket("127.0.0.1", port);
    SSLParameters parameters = socket.getSSLParameters();
    parameters.setApplicationProtocols(new String[] {"h2"});
    socket.setSSLParameters(parameters);
    socket.startHandshake();
    return socket;
  }
}
