package dev.linchkit.plugin.sdk;

import com.google.protobuf.ByteString;
import dev.linchkit.plugin.v1.Error;
import java.nio.charset.StandardCharsets;
import java.util.concurrent.CompletionException;
import java.util.concurrent.ExecutionException;
import java.lang.reflect.InvocationTargetException;

/** How anything a method throws becomes the wire {@code Error} of docs/protocol.md. */
public final class Errors {
  private Errors() {}

  /** The wire error for {@code thrown}: a PluginException as it says, anything else by its class name. */
  public static Error toWire(Throwable thrown) {
    Throwable cause = unwrap(thrown);
    if (cause instanceof PluginException error) {
      Error.Builder wire = Error.newBuilder()
          .setType(error.type())
          .setMessage(nullToEmpty(error.getMessage()))
          .setRetryable(error.retryable())
          .setRetryAfter(error.retryAfterSeconds());
      if (error.details() != null) {
        wire.setDetailsJson(ByteString.copyFrom(error.details().toString(), StandardCharsets.UTF_8));
      }
      return wire.build();
    }
    String message = cause.getMessage() != null ? cause.getMessage() : cause.toString();
    return Error.newBuilder().setType(cause.getClass().getSimpleName()).setMessage(message).setRetryable(false).build();
  }

  private static Throwable unwrap(Throwable thrown) {
    Throwable current = thrown;
    while ((current instanceof CompletionException || current instanceof ExecutionException
            || current instanceof InvocationTargetException) && current.getCause() != null) {
      current = current.getCause();
    }
    return current;
  }

  private static String nullToEmpty(String text) {
    return text == null ? "" : text;
  }
}
