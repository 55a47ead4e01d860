package dev.linchkit.plugin.sdk;

import io.grpc.ServerCredentials;
import io.grpc.netty.shaded.io.grpc.netty.GrpcHttp2ConnectionHandler;
import io.grpc.netty.shaded.io.grpc.netty.InternalNettyServerCredentials;
import io.grpc.netty.shaded.io.grpc.netty.InternalProtocolNegotiator;
import io.grpc.netty.shaded.io.grpc.netty.InternalProtocolNegotiators;
import io.grpc.netty.shaded.io.netty.buffer.ByteBuf;
import io.grpc.netty.shaded.io.netty.buffer.Unpooled;
import io.grpc.netty.shaded.io.netty.channel.ChannelHandler;
import io.grpc.netty.shaded.io.netty.channel.ChannelHandlerContext;
import io.grpc.netty.shaded.io.netty.channel.ChannelInboundHandlerAdapter;
import io.grpc.netty.shaded.io.netty.channel.ChannelPipeline;
import io.grpc.netty.shaded.io.netty.handler.codec.http2.Http2Connection;
import io.grpc.netty.shaded.io.netty.handler.codec.http2.Http2ConnectionHandler;
import io.grpc.netty.shaded.io.netty.handler.codec.http2.Http2Exception;
import io.grpc.netty.shaded.io.netty.handler.ssl.SslContext;
import io.grpc.netty.shaded.io.netty.handler.ssl.SslHandler;
import io.grpc.netty.shaded.io.netty.util.AsciiString;
import java.nio.charset.StandardCharsets;

/**
 * Each connection's bytes read through a filter for the frames Netty takes for a protocol error
 * while the plugin stops gracefully.
 *
 * <p>At a graceful stop grpc-java sends GOAWAY naming the largest stream id, then a PING; when
 * the client acknowledges it, a second GOAWAY names the last stream the plugin took. A stream
 * the client opened after that is "late": RFC 9113 (section 6.8) has the server ignore its
 * frames, and the client, told by the second GOAWAY, sends the call again on a new connection.
 * Netty (4.2.15 in grpc-java 1.83.1; 4.2.17 in 1.85.1, the latest, alike) refuses the late stream's HEADERS with RST_STREAM
 * REFUSED_STREAM without counting the stream as created; then, although it means to ignore a
 * frame "for a stream created after GOAWAY sent", it checks first that the stream may have
 * existed ({@code DefaultHttp2ConnectionDecoder.FrameReadListener.verifyStreamMayHaveExisted},
 * from {@code onDataRead}, {@code onWindowUpdateRead} and {@code onRstStreamRead}). It did not,
 * so the late stream's DATA, WINDOW_UPDATE or RST_STREAM is a connection error, and Netty closes
 * the connection under every call still in flight on it: calls the plugin took, whose answers
 * are lost, and which the host cannot tell from calls that never ran.
 *
 * <p>grpc core, the dispatcher's channel, writes exactly that when its write races the first
 * GOAWAY: a call it had numbered before reading the GOAWAY goes out right after its PING
 * acknowledgement, in the same write, as HEADERS, a WINDOW_UPDATE on the call's stream and DATA.
 *
 * <p>Neither Netty nor grpc-java has a setting for it, and grpc-java builds the HTTP/2 decoder
 * itself, so the frames are cut out before Netty reads them: {@link #credentials} gives the
 * server a protocol negotiator that puts {@link Frames} right in front of grpc-java's HTTP/2
 * handler (after TLS, where there is TLS). {@link Frames} hands Netty the bytes frame by frame
 * once a GOAWAY is out, so that Netty has read every frame before the one it looks at, and
 * drops a late stream's DATA, WINDOW_UPDATE and RST_STREAM, the frames Netty means to ignore,
 * counting a dropped DATA against the connection's flow-control window as Netty does for a
 * DATA it ignores. Nothing is dropped before a GOAWAY, nothing on a stream that may have
 * existed, and nothing of a connection that does not open with HTTP/2's preface.
 *
 * <p>The negotiator is grpc-java's {@code @Internal} API, the only way into its pipeline: an
 * upgrade that changes it fails to compile, and one that moves the TLS handler fails
 * {@code LateStreamsTest} over TLS.
 */
final class LateStreams {
  private LateStreams() {}

  /**
   * Plaintext, or TLS with {@code tls} when it is not null, each connection read through
   * {@link Frames}.
   */
  static ServerCredentials credentials(SslContext tls) {
    InternalProtocolNegotiator.ProtocolNegotiator negotiator = tls == null
        ? InternalProtocolNegotiators.serverPlaintext()
        : InternalProtocolNegotiators.serverTls(tls);
    return InternalNettyServerCredentials.create(new Negotiator(negotiator));
  }

  /** grpc-java's negotiator, with {@link Frames} put in front of its HTTP/2 handler. */
  private record Negotiator(InternalProtocolNegotiator.ProtocolNegotiator negotiator)
      implements InternalProtocolNegotiator.ProtocolNegotiator {
    @Override
    public AsciiString scheme() {
      return negotiator.scheme();
    }

    @Override
    public ChannelHandler newHandler(GrpcHttp2ConnectionHandler http2) {
      return new Placer(negotiator.newHandler(http2), new Frames(http2));
    }

    @Override
    public void close() {
      negotiator.close();
    }
  }

  /**
   * Puts {@code frames} where the bytes grpc-java's HTTP/2 handler reads pass by: right after
   * the TLS handler, or where the placer is when there is none. The negotiation replaces its
   * handlers, the last by the HTTP/2 handler, each in its own place, and adds the TLS handler
   * in front of them when the channel becomes active; so the place is known, and nothing has
   * been read yet, when the first bytes arrive.
   */
  private static final class Placer extends ChannelInboundHandlerAdapter {
    private final ChannelHandler negotiation;
    private final Frames frames;

    Placer(ChannelHandler negotiation, Frames frames) {
      this.negotiation = negotiation;
      this.frames = frames;
    }

    @Override
    public void handlerAdded(ChannelHandlerContext ctx) {
      ctx.pipeline().addAfter(ctx.name(), null, negotiation);
    }

    @Override
    public void channelRead(ChannelHandlerContext ctx, Object msg) {
      ChannelPipeline pipeline = ctx.pipeline();
      ChannelHandlerContext tls = pipeline.context(SslHandler.class);
      pipeline.addAfter(tls == null ? ctx.name() : tls.name(), null, frames);
      pipeline.remove(this);
      // A removed handler's context still hands on to the handler that followed it.
      ctx.fireChannelRead(msg);
    }
  }

  /** The client's bytes on their way to Netty's HTTP/2 handler, a late stream's frames cut out. */
  static final class Frames extends ChannelInboundHandlerAdapter {
    private static final byte[] PREFACE = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".getBytes(StandardCharsets.US_ASCII);
    private static final int HEADER_LENGTH = 9;
    private static final int DATA = 0x0;
    private static final int RST_STREAM = 0x3;
    private static final int WINDOW_UPDATE = 0x8;
    private static final int END_STREAM = 0x1;

    private final Http2ConnectionHandler http2;
    /** Bytes of the client's preface still to come. */
    private int prefaceLeft = PREFACE.length;
    /**
     * Set when the bytes do not open with the preface: not HTTP/2 as Netty's handler reads it (were
     * the filter ever put in front of TLS), so they are handed on as they came, nothing cut.
     */
    private boolean handingOnAll;
    /** Bytes of the frame being handed on still to come. */
    private int passing;
    /** Bytes of a dropped frame still to come. */
    private int dropping;
    /** The start of a frame whose header is not all here yet. */
    private ByteBuf held;

    Frames(Http2ConnectionHandler http2) {
      this.http2 = http2;
    }

    @Override
    public void channelRead(ChannelHandlerContext ctx, Object msg) {
      if (handingOnAll || !(msg instanceof ByteBuf read)) {
        ctx.fireChannelRead(msg);
        return;
      }
      ByteBuf bytes = held == null ? read : Unpooled.wrappedBuffer(held, read);
      held = null;
      try {
        int at = bytes.readerIndex();
        int end = bytes.writerIndex();
        int handOnFrom = at;
        while (at < end) {
          if (prefaceLeft > 0) {
            if (bytes.getByte(at) != PREFACE[PREFACE.length - prefaceLeft]) {
              handingOnAll = true;
              at = end;
              break;
            }
            at++;
            prefaceLeft--;
            continue;
          }
          if (passing > 0) {
            int taken = Math.min(passing, end - at);
            at += taken;
            passing -= taken;
            continue;
          }
          if (dropping > 0) {
            int taken = Math.min(dropping, end - at);
            at += taken;
            dropping -= taken;
            handOnFrom = at;
            continue;
          }
          if (end - at < HEADER_LENGTH) {
            held = ctx.alloc().buffer(end - at).writeBytes(bytes, at, end - at);
            break;
          }
          int length = bytes.getUnsignedMedium(at);
          int type = bytes.getUnsignedByte(at + 3);
          int flags = bytes.getUnsignedByte(at + 4);
          int stream = bytes.getInt(at + 5) & Integer.MAX_VALUE;
          if (mayBeLate(type, stream)) {
            // Netty reads the frames before this one first: they may cap the streams.
            handOn(ctx, bytes, handOnFrom, at);
            handOnFrom = at;
            if (isLate(stream)) {
              if (type == DATA) countAgainstTheConnectionWindow(ctx, length, (flags & END_STREAM) != 0);
              dropping = HEADER_LENGTH + length;
              continue;
            }
          }
          passing = HEADER_LENGTH + length;
        }
        handOn(ctx, bytes, handOnFrom, at);
      } finally {
        bytes.release();
      }
    }

    /**
     * Whether the frame may be on a late stream: cheap, and false until the plugin sends a GOAWAY,
     * so that until then the bytes go on as they came.
     */
    private boolean mayBeLate(int type, int stream) {
      if (stream == 0 || (type != DATA && type != RST_STREAM && type != WINDOW_UPDATE)) return false;
      Http2Connection connection = http2.connection();
      return connection.goAwaySent() && !connection.streamMayHaveExisted(stream);
    }

    /**
     * Netty's own test of a stream created after its GOAWAY (whose frames it ignores), on a stream
     * Netty never took (for which it would close the connection instead).
     */
    private boolean isLate(int stream) {
      Http2Connection connection = http2.connection();
      Http2Connection.Endpoint<?> remote = connection.remote();
      return connection.goAwaySent()
          && remote.isValidStreamId(stream)
          && stream > remote.lastStreamKnownByPeer()
          && !connection.streamMayHaveExisted(stream);
    }

    /**
     * As Netty counts a DATA frame it ignores: the client took its length from the connection's
     * window, so the plugin takes it too and gives it back, or the window would shrink for good.
     */
    private void countAgainstTheConnectionWindow(ChannelHandlerContext ctx, int length, boolean endOfStream) {
      try {
        http2.decoder().flowController().receiveFlowControlledFrame(null, Unpooled.EMPTY_BUFFER, length, endOfStream);
      } catch (Http2Exception overflow) {
        // The client sent past the window: Netty's connection error, as if Netty had read it.
        ctx.fireExceptionCaught(overflow);
      }
    }

    private static void handOn(ChannelHandlerContext ctx, ByteBuf bytes, int from, int to) {
      if (to > from) ctx.fireChannelRead(bytes.retainedSlice(from, to - from));
    }

    @Override
    public void handlerRemoved(ChannelHandlerContext ctx) {
      if (held != null) {
        held.release();
        held = null;
      }
    }
  }
}
