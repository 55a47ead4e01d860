package dev.linchkit.plugin.sdk;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.util.List;
import java.util.concurrent.CopyOnWriteArrayList;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicInteger;
import org.junit.jupiter.api.Test;

class HostEventRunnerTest {
  @Test
  void aFloodOfSlowHostEventsStartsBoundedThreadsAndDropsTheOldestWaiting() throws Exception {
    AtomicInteger started = new AtomicInteger();
    HostEventRunner runner = new HostEventRunner(2, 4, runnable -> {
      started.incrementAndGet();
      Thread thread = new Thread(runnable);
      thread.setDaemon(true);
      return thread;
    });
    try {
      CountDownLatch release = new CountDownLatch(1);
      List<Integer> ran = new CopyOnWriteArrayList<>();
      for (int i = 0; i < 1000; i++) {
        int event = i;
        runner.run(() -> {
          try {
            release.await();
          } catch (InterruptedException interrupted) {
            return;
          }
          ran.add(event);
        });
      }
      assertEquals(2, started.get(), "a thread per event before");
      assertTrue(runner.threads() <= 2);
      assertTrue(runner.dropped());
      release.countDown();
      long end = System.nanoTime() + TimeUnit.SECONDS.toNanos(5);
      while (ran.size() < 6 && System.nanoTime() < end) Thread.sleep(5);
      Thread.sleep(50);
      // The two first events were running; of the rest only the newest four waited.
      assertEquals(6, ran.size(), ran.toString());
      assertTrue(ran.containsAll(List.of(0, 1, 996, 997, 998, 999)), ran.toString());
    } finally {
      runner.close();
    }
  }

  @Test
  void eventsWithinTheBoundAllRunAndNothingIsSaid() throws Exception {
    HostEventRunner runner = new HostEventRunner(2, 16, Thread::new);
    try {
      CountDownLatch done = new CountDownLatch(10);
      for (int i = 0; i < 10; i++) runner.run(done::countDown);
      assertTrue(done.await(5, TimeUnit.SECONDS));
      assertFalse(runner.dropped());
    } finally {
      runner.close();
    }
  }
}
