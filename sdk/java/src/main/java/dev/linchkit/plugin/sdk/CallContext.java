package dev.linchkit.plugin.sdk;

import java.util.concurrent.TimeUnit;

/** What a method knows about the call it is serving. */
public final class CallContext {
  private final String method;
  private final String requestId;
  private final String caller;
  private final String traceparent;
  private final String idempotencyKey;
  /** System.nanoTime() after which the host has given up; Long.MAX_VALUE for none. */
  private final long deadlineNanos;
  private volatile boolean cancelled;

  CallContext(String method, String requestId, String caller, String traceparent, String idempotencyKey, long deadlineNanos) {
    this.method = method;
    this.requestId = requestId;
    this.caller = caller;
    this.traceparent = traceparent;
    this.idempotencyKey = idempotencyKey;
    this.deadlineNanos = deadlineNanos;
  }

  public String method() { return method; }
  public String requestId() { return requestId; }
  public String caller() { return caller; }
  public String traceparent() { return traceparent; }
  public String idempotencyKey() { return idempotencyKey; }

  public boolean hasDeadline() {
    return deadlineNanos != Long.MAX_VALUE;
  }

  /** Milliseconds left before the deadline; Long.MAX_VALUE for none. */
  public long remainingMillis() {
    if (!hasDeadline()) return Long.MAX_VALUE;
    return Math.max(0, TimeUnit.NANOSECONDS.toMillis(deadlineNanos - System.nanoTime()));
  }

  /** True once the deadline passed or the host cancelled the call. */
  public boolean isOver() {
    return cancelled || (hasDeadline() && System.nanoTime() - deadlineNanos >= 0);
  }

  /** Throws {@code deadline_exceeded} when the call is over; for loops that do long work. */
  public void checkDeadline() throws PluginException {
    if (isOver()) throw overError();
  }

  /** Sleeps {@code millis}, or throws {@code deadline_exceeded} as soon as the call is over. */
  public void sleep(long millis) throws PluginException, InterruptedException {
    long until = System.nanoTime() + TimeUnit.MILLISECONDS.toNanos(millis);
    while (true) {
      checkDeadline();
      long left = until - System.nanoTime();
      if (left <= 0) return;
      long slice = Math.min(TimeUnit.NANOSECONDS.toMillis(left) + 1, Math.min(remainingMillis(), 50));
      Thread.sleep(Math.max(1, slice));
    }
  }

  PluginException overError() {
    return PluginException.deadlineExceeded(cancelled
        ? method + " was cancelled by the host"
        : method + " did not finish before its deadline");
  }

  void cancel() {
    cancelled = true;
  }

  long deadlineNanos() {
    return deadlineNanos;
  }
}
