package dev.linchkit.plugin.sdk;

import static org.junit.jupiter.api.Assertions.assertEquals;

import java.util.ArrayList;
import java.util.List;
import java.util.logging.Handler;
import java.util.logging.Level;
import java.util.logging.LogRecord;
import org.junit.jupiter.api.Test;

class LogTest {
  @Test
  void grpcStreamErrorsStayOffTheWarningsOtherRecordsDoNot() {
    List<String> published = new ArrayList<>();
    Handler handler = new Handler() {
      @Override
      public void publish(LogRecord record) {
        published.add(record.getLevel() + " " + record.getMessage());
      }

      @Override
      public void flush() {}

      @Override
      public void close() {}
    };
    Log.NETTY_SERVER.addHandler(handler);
    try {
      Log.quietStreamErrors();
      Log.NETTY_SERVER.log(Level.WARNING, "Stream Error", new IllegalStateException("Stream 3 does not exist"));
      Log.NETTY_SERVER.log(Level.WARNING, "Connection Error", new IllegalStateException("broken"));
      assertEquals(List.of("WARNING Connection Error"), published);
    } finally {
      Log.NETTY_SERVER.removeHandler(handler);
      Log.NETTY_SERVER.setFilter(null);
    }
  }
}
