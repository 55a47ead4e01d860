package dev.linchkit.plugin.sdk;

import com.google.gson.JsonObject;

/**
 * An error a plugin answers with; its {@code type} travels to the host unchanged in
 * {@code CallReply.error}.
 *
 * <pre>
 *   PluginException(type, …)     the plugin's own type (e.g. "InsufficientFunds"), retryable as given
 *   invalidParams(…)             invalid_params       not retryable
 *   methodNotFound(…)            method_not_found     not retryable
 *   deadlineExceeded(…)          deadline_exceeded    retryable (with a new deadline)
 *   providerError(…)             provider_error       not retryable (protocol misuse)
 * </pre>
 *
 * Any other exception a method throws is answered with its simple class name as the type
 * ({@code IllegalStateException}, …), not retryable; see {@link Errors}.
 */
public class PluginException extends Exception {
  private final String type;
  private final boolean retryable;
  private final JsonObject details;
  private final double retryAfterSeconds;

  public PluginException(String type, String message) {
    this(type, message, false, null, 0);
  }

  public PluginException(String type, String message, boolean retryable) {
    this(type, message, retryable, null, 0);
  }

  public PluginException(String type, String message, boolean retryable, JsonObject details, double retryAfterSeconds) {
    super(message);
    this.type = type;
    this.retryable = retryable;
    this.details = details;
    this.retryAfterSeconds = retryAfterSeconds;
  }

  public static PluginException invalidParams(String message) {
    return new PluginException("invalid_params", message);
  }

  public static PluginException methodNotFound(String message) {
    return new PluginException("method_not_found", message);
  }

  public static PluginException deadlineExceeded(String message) {
    return new PluginException("deadline_exceeded", message, true);
  }

  public static PluginException providerError(String message) {
    return new PluginException("provider_error", message);
  }

  public String type() {
    return type;
  }

  public boolean retryable() {
    return retryable;
  }

  /** A JSON object, or null. */
  public JsonObject details() {
    return details;
  }

  /** Seconds; 0 when unknown. */
  public double retryAfterSeconds() {
    return retryAfterSeconds;
  }
}
