package dev.linchkit.plugin.sdk;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.time.Instant;
import java.util.List;
import java.util.logging.Handler;
import java.util.logging.Level;
import java.util.logging.LogRecord;
import java.util.regex.Matcher;
import java.util.regex.Pattern;
import org.junit.jupiter.api.Test;

/**
 * The SDK's stderr lines: one line a record, the level where a host reads it (the dispatcher's
 * providers/subprocess/levels.py: an optional timestamp, then an upper-case level word).
 */
class OneLineFormatterTest {
  private static final Pattern HOST_READS = Pattern.compile("^[0-9][0-9TZ:./+\\- ]*[ T](SEVERE|WARNING|INFO|FINE) ");

  private static String line(Level level, String message, Throwable thrown) {
    LogRecord record = new LogRecord(level, message);
    record.setLoggerName("dev.linchkit.plugin.sdk");
    record.setInstant(Instant.parse("2026-12-04T00:10:00.123Z"));
    record.setThrown(thrown);
    return new OneLineFormatter().format(record);
  }

  private static String levelOf(String line) {
    Matcher found = HOST_READS.matcher(line);
    assertTrue(found.find(), line);
    return found.group(1);
  }

  @Test
  void aRecordIsOneLineTimeLevelNameMessage() {
    assertEquals("2026-12-04T00:10:00.123Z WARNING dev.linchkit.plugin.sdk: dropping events" + System.lineSeparator(),
        line(Level.WARNING, "dropping events", null));
  }

  @Test
  void eachLevelIsAWordTheHostReads() {
    assertEquals(List.of("SEVERE", "WARNING", "INFO", "FINE", "FINE"),
        List.of(Level.SEVERE, Level.WARNING, Level.INFO, Level.CONFIG, Level.FINEST).stream()
            .map(level -> levelOf(line(level, "x", null))).toList());
  }

  @Test
  void aStackStaysOnTheRecordsLine() {
    String line = line(Level.SEVERE, "host event fail failed", new IllegalStateException("the ledger is gone"));
    assertEquals(1, line.split("\n", -1).length - 1, line);
    assertEquals("SEVERE", levelOf(line));
    assertTrue(line.contains("failed: java.lang.IllegalStateException: the ledger is gone\\n\tat "), line);
  }

  @Test
  void theSdksLoggerWritesItsOwnLinesOnce() {
    Handler[] handlers = Log.SDK.getHandlers();
    assertEquals(1, handlers.length);
    assertTrue(handlers[0].getFormatter() instanceof OneLineFormatter);
    assertTrue(!Log.SDK.getUseParentHandlers());
  }
}
