/**
 * Telling a plugin's author that a method answered long after its deadline.
 *
 * A call's deadline ends a method by a timer on the event loop, raced against the method.
 * A method that blocks the loop (a busy loop, a long synchronous computation, a sync
 * client) keeps that timer from running, and its answer comes whenever it is done. The
 * caller stopped waiting at the deadline (a remote host answered it `deadline_exceeded`);
 * every other call of the process waited too. Nothing else would say so: the host sees
 * timeouts, the plugin a call that succeeded.
 *
 * The answer itself is left as it is (the host ignores a late one), and the warning is said
 * at most once a minute per method: a method that always blocks must not fill the log. As
 * the Python SDK's `_late_answers.py`, in its words.
 */
import { performance } from 'node:perf_hooks';
import { log, shown } from './log';

/** How far past its deadline an answer must come to be told of. A timer on a loaded machine
 * runs some milliseconds late; half a second late, the loop was held. */
export const LATE_ANSWER_MS = 500;
/** The least time between two warnings about one method. */
const SAID_EVERY_MS = 60_000;

/** When each method was last said to have answered late (a `Plugin` holds one). */
export class LateAnswers {
  /** Keyed by registered methods only (an unknown one never answers): a bounded map. */
  private readonly said = new Map<string, number>();

  /**
   * `method` has its answer, and the deadline (epoch ms, as `CallContext.deadline`) did not
   * end it: said if it came more than `LATE_ANSWER_MS` after. One clock read a call; nothing
   * for a call without a deadline.
   */
  answered(method: string, deadline: number | undefined): void {
    if (deadline === undefined) return;
    const late = Date.now() - deadline;
    if (late > LATE_ANSWER_MS) this.tell(method, late);
  }

  private tell(method: string, lateMs: number): void {
    // Monotonic: a wall clock set back must not silence a method for longer than a minute.
    const now = performance.now();
    const said = this.said.get(method);
    if (said !== undefined && now - said < SAID_EVERY_MS) return;
    this.said.set(method, now);
    log.warn(
      `method '${shown(method, 64)}' answered ${(lateMs / 1000).toFixed(1)} s after its deadline: the event loop was held ` +
        'that long, by this method or another running meanwhile, so the deadline could not end it and no other call ran; ' +
        'a method must not block the event loop (move CPU-bound work to a worker_threads Worker or a child process, and ' +
        'use asynchronous I/O) (said at most once a minute)',
    );
  }
}
