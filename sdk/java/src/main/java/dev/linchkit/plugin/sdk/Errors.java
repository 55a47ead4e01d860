package dev.linchkit.plugin.sdk;

import com.google.protobuf.ByteString;
import dev.linchkit.plugin.v1.Error;
import java.nio.charset.StandardCharsets;
import java.util.concurrent.CompletionException;
import java.util.concurrent.ExecutionException;
import java.lang.reflect.InvocationTargetException;

/**
 * How anything a method throws becomes the wire {@code Error} of docs/protocol.md. Never
 * throws itself: a conversion that failed would leave the call unanswered until its deadline.
 */
public final class Errors {
  private Errors() {}

  /** The type of a PluginException that gave none (null or empty). */
  public static final String DEFAULT_TYPE = "PluginError";

  /** What is answered when even the conversion failed. */
  private static final Error FALLBACK = Error.newBuilder()
      .setType(DEFAULT_TYPE)
      .setMessage("the plugin's error could not be converted")
      .build();

  /**
   * The wire error for {@code thrown}: a PluginException as it says, anything else by its class
   * name. A missing type is {@link #DEFAULT_TYPE} (or a subclass's name); an anonymous class is
   * named by its nearest named superclass; a missing message names the class, once.
   */
  public static Error toWire(Throwable thrown) {
    try {
      return convert(thrown);
    } catch (Throwable broken) {
      return FALLBACK;
    }
  }

  private static Error convert(Throwable thrown) {
    if (thrown == null) return FALLBACK;
    Throwable cause = unwrap(thrown);
    String className = namedClass(cause.getClass());
    if (cause instanceof PluginException error) {
      String type = error.type();
      if (type == null || type.isEmpty()) {
        type = className.equals("PluginException") ? DEFAULT_TYPE : className;
      }
      Error.Builder wire = Error.newBuilder()
          .setType(ResultJson.wellFormed(type))
          .setMessage(ResultJson.wellFormed(messageOf(cause, type, className)))
          .setRetryable(error.retryable())
          .setRetryAfter(error.retryAfterSeconds());
      String details = detailsJson(error);
      if (details != null) wire.setDetailsJson(ByteString.copyFrom(details, StandardCharsets.UTF_8));
      return wire.build();
    }
    return Error.newBuilder().setType(className).setMessage(ResultJson.wellFormed(messageOf(cause, className, className)))
        .setRetryable(false).build();
  }

  /**
   * The error's details as JSON text, or null for none and for details JSON cannot carry (a NaN,
   * an infinity, a string with a lone surrogate): the error goes without them rather than as an
   * answer that is no JSON, which {@code toString()} wrote ({@code {"ratio":NaN}}) until
   * 2026-12-07, or with each lone surrogate a {@code '?'}, until 2026-12-08.
   */
  private static String detailsJson(PluginException error) {
    if (error.details() == null) return null;
    try {
      return ResultJson.text(error.details(), "the error's details");
    } catch (PluginException notJson) {
      return null;
    }
  }

  /**
   * The message, or for none the class's name, unless the type already says it: the host shows
   * {@code type: message}, and {@code StackOverflowError: StackOverflowError} says it twice.
   */
  private static String messageOf(Throwable cause, String type, String className) {
    String message = cause.getMessage();
    if (message != null) return message;
    return type.equals(className) ? "(no message)" : className;
  }

  /** The simple name of {@code type}, or of its nearest named superclass (anonymous, local). */
  static String namedClass(Class<?> type) {
    for (Class<?> current = type; current != null; current = current.getSuperclass()) {
      String name = current.getSimpleName();
      if (!name.isEmpty()) return name;
    }
    return "Throwable";
  }

  private static Throwable unwrap(Throwable thrown) {
    Throwable current = thrown;
    while ((current instanceof CompletionException || current instanceof ExecutionException
            || current instanceof InvocationTargetException) && current.getCause() != null) {
      current = current.getCause();
    }
    return current;
  }
}
