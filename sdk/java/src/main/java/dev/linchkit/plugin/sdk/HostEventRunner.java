package dev.linchkit.plugin.sdk;

import java.util.concurrent.ArrayBlockingQueue;
import java.util.concurrent.ThreadFactory;
import java.util.concurrent.ThreadPoolExecutor;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicBoolean;

/**
 * Runs the handlers of host events on a fixed number of threads with a bounded queue, so a host
 * that floods a plugin whose handlers are slow costs it bounded threads and memory. Past the queue
 * the oldest waiting event is dropped, as a plugin's own events are on a stream its host does not
 * read (docs/protocol.md, "Events"); the first drop is said once on stderr.
 */
final class HostEventRunner {
  /** Threads running host-event handlers at once. */
  static final int THREADS = 8;
  /** Host events waiting for a thread; past this the oldest is dropped. */
  static final int QUEUED = 1024;

  private final ThreadPoolExecutor pool;
  private final AtomicBoolean told = new AtomicBoolean();

  HostEventRunner(ThreadFactory threads) {
    this(THREADS, QUEUED, threads);
  }

  HostEventRunner(int threads, int queued, ThreadFactory factory) {
    pool = new ThreadPoolExecutor(threads, threads, 30, TimeUnit.SECONDS, new ArrayBlockingQueue<>(queued), factory,
        (task, executor) -> {
          if (executor.isShutdown()) return;
          if (!told.getAndSet(true)) {
            Log.SDK.warning("host events arrive faster than their handlers finish; "
                + "dropping the oldest waiting ones (at most " + queued + " wait)");
          }
          // Make room by dropping the oldest waiting event, then queue this one; another
          // thread may fill the slot first, and then this event is the one dropped.
          executor.getQueue().poll();
          executor.getQueue().offer(task);
        });
    pool.allowCoreThreadTimeOut(true);
  }

  /** Runs {@code handler} on one of the threads, or drops an older waiting event to queue it. */
  void run(Runnable handler) {
    pool.execute(handler);
  }

  /** Threads alive now (for tests). */
  int threads() {
    return pool.getPoolSize();
  }

  /** Whether a drop happened and was logged. */
  boolean dropped() {
    return told.get();
  }

  void close() {
    pool.shutdownNow();
  }
}
