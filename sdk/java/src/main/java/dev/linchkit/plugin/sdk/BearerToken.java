package dev.linchkit.plugin.sdk;

import io.grpc.Metadata;
import io.grpc.ServerCall;
import io.grpc.ServerCallHandler;
import io.grpc.ServerInterceptor;
import io.grpc.Status;
import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.security.MessageDigest;
import java.util.Iterator;
import java.util.Locale;
import java.util.Map;

/**
 * The bearer token of service mode (docs/protocol.md, "gRPC binding"), read from
 * {@code LINCHKIT_PLUGIN_TOKEN_FILE} (a mounted secret) or {@code LINCHKIT_PLUGIN_TOKEN},
 * never from a command-line argument ({@code ps} shows those to every user). As a
 * {@link ServerInterceptor} on the plugin service it refuses every call without
 * {@code authorization: Bearer <token>} as {@code UNAUTHENTICATED}, comparing in constant time;
 * the health service is not intercepted (orchestrators probe it without credentials).
 */
public final class BearerToken implements ServerInterceptor {
  public static final String TOKEN_ENV = "LINCHKIT_PLUGIN_TOKEN";
  public static final String TOKEN_FILE_ENV = "LINCHKIT_PLUGIN_TOKEN_FILE";

  /** All a refused caller learns: never what it sent. */
  static final String UNAUTHENTICATED = "missing or wrong bearer token";

  private static final Metadata.Key<String> AUTHORIZATION =
      Metadata.Key.of("authorization", Metadata.ASCII_STRING_MARSHALLER);

  private final byte[] expected;

  BearerToken(String token) throws Handshake.HandshakeException {
    String trimmed = token.strip();
    if (trimmed.isEmpty()) throw new Handshake.HandshakeException("the bearer token is empty");
    for (int i = 0; i < trimmed.length(); i++) {
      char c = trimmed.charAt(i);
      if (c < 0x21 || c > 0x7e) {
        throw new Handshake.HandshakeException("the bearer token must be printable ASCII without spaces");
      }
    }
    expected = ("bearer " + trimmed).getBytes(StandardCharsets.US_ASCII);
  }

  /** The token from the file, else the variable; null when neither is set; both set is refused. */
  public static BearerToken configured(Map<String, String> env) throws Handshake.HandshakeException {
    String file = env.getOrDefault(TOKEN_FILE_ENV, "");
    String value = env.getOrDefault(TOKEN_ENV, "");
    if (!file.isEmpty() && !value.isEmpty()) {
      throw new Handshake.HandshakeException("set either " + TOKEN_FILE_ENV + " or " + TOKEN_ENV + ", not both");
    }
    if (!file.isEmpty()) {
      String text;
      try {
        text = Files.readString(Path.of(file), StandardCharsets.US_ASCII);
      } catch (IOException | RuntimeException error) {
        throw new Handshake.HandshakeException(
            "cannot read the token file '" + file + "': " + error.getClass().getSimpleName());
      }
      try {
        return new BearerToken(text);
      } catch (Handshake.HandshakeException error) {
        throw new Handshake.HandshakeException("the token file '" + file + "': " + error.getMessage());
      }
    }
    return value.isEmpty() ? null : new BearerToken(value);
  }

  /** Whether an {@code authorization} value carries the token (constant time for equal lengths). */
  boolean admits(String authorization) {
    if (authorization == null) return false;
    String value = authorization.strip();
    int space = value.indexOf(' ');
    String scheme = space < 0 ? value : value.substring(0, space);
    String credentials = space < 0 ? "" : value.substring(space + 1).strip();
    byte[] presented = (scheme.toLowerCase(Locale.ROOT) + " " + credentials).getBytes(StandardCharsets.US_ASCII);
    return MessageDigest.isEqual(presented, expected);
  }

  @Override
  public <Q, A> ServerCall.Listener<Q> interceptCall(ServerCall<Q, A> call, Metadata headers, ServerCallHandler<Q, A> next) {
    Iterable<String> values = headers.getAll(AUTHORIZATION);
    String presented = null;
    if (values != null) {
      Iterator<String> each = values.iterator();
      presented = each.next();
      if (each.hasNext()) presented = null; // two values: refuse rather than pick one
    }
    if (admits(presented)) return next.startCall(call, headers);
    call.close(Status.UNAUTHENTICATED.withDescription(UNAUTHENTICATED), new Metadata());
    return new ServerCall.Listener<Q>() {};
  }

  /** The {@code Authorization} value that carries the token, for the server's own warm-up upgrade. */
  String presented() {
    return new String(expected, StandardCharsets.US_ASCII);
  }

  @Override
  public String toString() {
    return "BearerToken(hidden)";
  }
}
