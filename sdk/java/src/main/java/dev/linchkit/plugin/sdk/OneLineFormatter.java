package dev.linchkit.plugin.sdk;

import java.io.PrintWriter;
import java.io.StringWriter;
import java.time.ZoneOffset;
import java.time.format.DateTimeFormatter;
import java.util.logging.Formatter;
import java.util.logging.Level;
import java.util.logging.LogRecord;

/**
 * A {@code java.util.logging} record as one line, the time and the level first:
 *
 * <pre>2026-12-04T00:10:00.123Z WARNING dev.linchkit.plugin.sdk: the host is not reading its Events stream; …</pre>
 *
 * A host reading a subprocess plugin's stderr logs each line at the level it carries (a
 * WARNING stays a warning there, SEVERE is an error: the dispatcher's
 * providers/subprocess/levels.py). JUL's own SimpleFormatter writes two lines, the level on the
 * second; a thrown exception's stack here stays on the record's line, its newlines written as
 * {@code \n}. Levels below INFO (CONFIG, FINE, FINER, FINEST) are written FINE, which the host
 * reads as DEBUG. The SDK's own logger uses it, and {@link Serve} puts it on the root logger's
 * console handler unless the plugin configured {@code java.util.logging} itself.
 */
public final class OneLineFormatter extends Formatter {
  private static final DateTimeFormatter TIME =
      DateTimeFormatter.ofPattern("yyyy-MM-dd'T'HH:mm:ss.SSS'Z'").withZone(ZoneOffset.UTC);

  @Override
  public String format(LogRecord record) {
    StringBuilder text = new StringBuilder(formatMessage(record));
    if (record.getThrown() != null) {
      StringWriter stack = new StringWriter();
      record.getThrown().printStackTrace(new PrintWriter(stack));
      text.append(": ").append(stack.toString().stripTrailing());
    }
    String message = text.toString().replace("\r\n", "\\n").replace("\n", "\\n").replace("\r", "\\r");
    return TIME.format(record.getInstant()) + " " + word(record.getLevel()) + " " + record.getLoggerName() + ": "
        + message + System.lineSeparator();
  }

  /** The level as a word the host reads: SEVERE, WARNING, INFO, or FINE for anything below INFO. */
  static String word(Level level) {
    int value = level.intValue();
    if (value >= Level.SEVERE.intValue()) return "SEVERE";
    if (value >= Level.WARNING.intValue()) return "WARNING";
    if (value >= Level.INFO.intValue()) return "INFO";
    return "FINE";
  }
}
