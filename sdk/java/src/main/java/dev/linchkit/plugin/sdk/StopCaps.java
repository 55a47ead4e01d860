package dev.linchkit.plugin.sdk;

import java.math.BigDecimal;
import java.util.Map;

/**
 * How long a plugin's graceful stop waits (docs/protocol.md, "Stopping while called"): the calls
 * in flight get {@code graceMs} to finish, then the stop and destroy hooks get {@code hooksMs}
 * together; a hook still running then is abandoned and the process exits without it. Both are 5 s
 * unless the environment sets them: both modes read {@link Serve#STOP_GRACE_ENV} and
 * {@link Serve#STOP_HOOKS_ENV} once at start, in whole milliseconds from 0 to
 * {@link Serve#MAX_STOP_MS}. 0 does not wait: a grace of 0 cuts the calls in flight off at once,
 * hooks of 0 abandon the hooks at once. A malformed value ends the plugin at start with one line
 * naming the variable.
 */
record StopCaps(long graceMs, long hooksMs) {
  /** How much of a refused value its message quotes. */
  private static final int SHOWN_CHARACTERS = 40;

  /** 5 s each, as in every SDK. */
  static final StopCaps DEFAULT =
      new StopCaps(Serve.STOP_GRACE_SECONDS * 1000, Serve.STOP_HOOKS_SECONDS * 1000);

  /** The caps {@code env} sets, the default for each one unset or empty. */
  static StopCaps fromEnv(Map<String, String> env) throws Handshake.HandshakeException {
    return new StopCaps(
        orDefault(env, Serve.STOP_GRACE_ENV, DEFAULT.graceMs()),
        orDefault(env, Serve.STOP_HOOKS_ENV, DEFAULT.hooksMs()));
  }

  private static long orDefault(Map<String, String> env, String name, long fallback)
      throws Handshake.HandshakeException {
    String text = env.getOrDefault(name, "");
    return text.isEmpty() ? fallback : stopMs(name, text);
  }

  /**
   * {@code text}, the value of the variable {@code name}, as whole milliseconds from 0 to
   * {@link Serve#MAX_STOP_MS}. Digits only: {@code Long.parseLong} would also take "+5" and "-0".
   */
  static long stopMs(String name, String text) throws Handshake.HandshakeException {
    if (!text.isEmpty() && text.chars().allMatch(c -> c >= '0' && c <= '9')) {
      String significant = text.replaceFirst("^0+", "");
      if (significant.length() <= Long.toString(Serve.MAX_STOP_MS).length()) {
        long ms = significant.isEmpty() ? 0 : Long.parseLong(significant);
        if (ms <= Serve.MAX_STOP_MS) return ms;
      }
    }
    // The operator's text, cut short, a control character escaped: the refusal stays one line.
    StringBuilder shown = new StringBuilder();
    text.codePoints().limit(SHOWN_CHARACTERS).forEach(c -> {
      if (Character.isISOControl(c)) shown.append(String.format("\\u%04x", c));
      else shown.appendCodePoint(c);
    });
    if (text.codePointCount(0, text.length()) > SHOWN_CHARACTERS) shown.append('…');
    throw new Handshake.HandshakeException(name + " must be a whole number of milliseconds from 0 to "
        + Serve.MAX_STOP_MS + " (10 minutes), not '" + shown + "'");
  }

  /** A cap in milliseconds as the stop's warning names it: seconds, as few digits as it takes ("5", "1.5"). */
  static String seconds(long ms) {
    return BigDecimal.valueOf(ms, 3).stripTrailingZeros().toPlainString();
  }
}
