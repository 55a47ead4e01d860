package dev.linchkit.plugin.sdk;

import java.util.logging.ConsoleHandler;
import java.util.logging.Handler;
import java.util.logging.Level;
import java.util.logging.LogRecord;
import java.util.logging.Logger;
import java.util.logging.SimpleFormatter;

/**
 * The SDK's own lines on stderr (a failed handler, dropped events, a refused stop): logger
 * {@code dev.linchkit.plugin.sdk}, one line a record ({@link OneLineFormatter}); errors at SEVERE,
 * dropped or refused things at WARNING.
 */
final class Log {
  private Log() {}

  static final Logger SDK = sdkLogger();

  private static Logger sdkLogger() {
    Logger logger = Logger.getLogger("dev.linchkit.plugin.sdk");
    ConsoleHandler console = new ConsoleHandler(); // System.err, flushed after each record
    console.setFormatter(new OneLineFormatter());
    logger.addHandler(console);
    logger.setUseParentHandlers(false); // the root's console would write each record twice
    return logger;
  }

  /**
   * A record of the SDK's written straight to stderr, in {@link OneLineFormatter}'s shape: for
   * what a stop says. A stop the SDK starts (a signal, stdin closed) runs before the JVM exits,
   * but one that the plugin's own {@code System.exit} starts runs in a shutdown hook, and the
   * JVM's {@code LogManager} resets every logger in a shutdown hook of its own, which runs
   * alongside it and takes their handlers away: a record logged through {@link #SDK} then is
   * dropped without a word (the stop hooks' failures and their abandonment were).
   */
  static void atExit(Level level, String message, Throwable thrown) {
    if (!SDK.isLoggable(level)) return;
    LogRecord record = new LogRecord(level, message);
    record.setLoggerName(SDK.getName());
    record.setThrown(thrown);
    System.err.print(new OneLineFormatter().format(record));
    System.err.flush();
  }

  /** grpc-java's server transport, which logs a failed stream with its whole stack. */
  static final Logger NETTY_SERVER = Logger.getLogger("io.grpc.netty.shaded.io.grpc.netty.NettyServerHandler");

  /**
   * grpc-java logs each HTTP/2 stream error ("Stream Error", a reset stream, a message its peer
   * refused) at WARNING with a 45-line stack, twice for one over-size reply, and a subprocess
   * plugin's host logs each line as a warning. The failed stream is one call, which its caller
   * sees failed already: the record becomes one line at FINE (shown only when asked for).
   */
  static void quietStreamErrors() {
    NETTY_SERVER.setFilter(record -> {
      if (!"Stream Error".equals(record.getMessage()) || record.getLevel().intValue() > Level.WARNING.intValue()) {
        return true;
      }
      if (SDK.isLoggable(Level.FINE)) {
        SDK.fine("gRPC stream error: " + record.getThrown());
      }
      return false;
    });
  }

  /**
   * Puts {@link OneLineFormatter} on the root logger's console handler, so the plugin's own
   * {@code java.util.logging} records (and grpc-java's) carry their level on their one line, unless
   * the plugin configured logging itself ({@code java.util.logging.config.file} or {@code .class}).
   */
  static void formatRootConsoleUnlessConfigured() {
    if (System.getProperty("java.util.logging.config.file") != null
        || System.getProperty("java.util.logging.config.class") != null) {
      return;
    }
    for (Handler handler : Logger.getLogger("").getHandlers()) {
      if (handler instanceof ConsoleHandler && handler.getFormatter() instanceof SimpleFormatter) {
        handler.setFormatter(new OneLineFormatter());
      }
    }
  }
}
