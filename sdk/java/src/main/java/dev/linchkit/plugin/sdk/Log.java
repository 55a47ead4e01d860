package dev.linchkit.plugin.sdk;

import java.util.logging.ConsoleHandler;
import java.util.logging.Handler;
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
