//! Telling a plugin's author that a method answered long after its deadline.
//!
//! A call's deadline ends its method by a timer (`tokio::time::timeout_at`, in
//! `Shared::within`), and tokio's `Timeout` polls the method before its timer. A method
//! that holds its runtime worker inside an async fn (`std::thread::sleep`, a blocking
//! client, a long loop that never yields) keeps that timer, or the task waiting on it, from
//! running; when it returns, the timeout takes its answer as in time and sends it. The host
//! had stopped waiting at the deadline (it answered its caller `deadline_exceeded`), and
//! nothing else would say why: the host sees timeouts, the plugin a call that succeeded.
//!
//! The answer is left as it is, and the warning is said at most once a minute per method:
//! a method that always blocks must not fill the log. The Python SDK says the same
//! (`linchkit_plugin/_late_answers.py`).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// How far past its deadline an answer must come to be told of. A timer on a loaded
/// machine fires some milliseconds late; half a second late, a worker was held.
pub(crate) const LATE_ANSWER: Duration = Duration::from_millis(500);
/// The least time between two warnings about one method.
const SAID_EVERY: Duration = Duration::from_secs(60);

/// When each method was last said to have answered late (a service holds one). Touched
/// only by a late answer; it holds at most one entry per method the plugin registered.
#[derive(Default)]
pub(crate) struct LateAnswers {
    said: Mutex<HashMap<String, Instant>>,
}

impl LateAnswers {
    /// `method` answered and its `deadline` did not end it: more than [`LATE_ANSWER`] past
    /// that deadline, one WARN says so. One clock read; whether it spoke.
    pub(crate) fn check(&self, method: &str, deadline: Instant) -> bool {
        let now = Instant::now();
        let late = now.saturating_duration_since(deadline);
        late > LATE_ANSWER && self.tell(method, late, now)
    }

    /// Says that `method` answered `late`, unless it was said of it within the minute
    /// before `now`; whether it spoke.
    fn tell(&self, method: &str, late: Duration, now: Instant) -> bool {
        {
            let mut said = self.said.lock().unwrap();
            let recent = said
                .get(method)
                .is_some_and(|at| now.saturating_duration_since(*at) < SAID_EVERY);
            if recent {
                return false;
            }
            said.insert(method.to_string(), now);
        }
        crate::log::warn(&message(method, late));
        true
    }
}

/// The warning, in the Python SDK's words with the runtime's own advice.
fn message(method: &str, late: Duration) -> String {
    format!(
        "method {} answered {:.1} s after its deadline: a runtime worker was held that long \
         without yielding, by this method's task or another's, so the deadline could not end \
         it; an async method must not block (run blocking work with \
         tokio::task::spawn_blocking) (said at most once a minute)",
        crate::error::quoted_name(method),
        late.as_secs_f64()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_warning_names_the_method_and_how_late_it_answered() {
        assert_eq!(
            message("pay", Duration::from_millis(740)),
            "method 'pay' answered 0.7 s after its deadline: a runtime worker was held that \
             long without yielding, by this method's task or another's, so the deadline could \
             not end it; an async method must not block (run blocking work with \
             tokio::task::spawn_blocking) (said at most once a minute)"
        );
        assert!(message("a'\nb", Duration::from_secs(3))
            .starts_with("method 'a\\'\\nb' answered 3.0 s"));
    }

    #[test]
    fn said_at_most_once_a_minute_per_method() {
        crate::log::captured::start();
        let late = LateAnswers::default();
        let now = Instant::now();
        let second = Duration::from_secs(1);
        assert!(late.tell("pay", second, now));
        assert!(!late.tell("pay", second, now + Duration::from_secs(59)));
        assert!(late.tell("refund", second, now + Duration::from_secs(59)));
        assert!(late.tell("pay", second, now + Duration::from_secs(60)));
        let lines = crate::log::captured::lines();
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert!(
            lines.iter().all(|line| line.contains(" WARN ")),
            "{lines:?}"
        );
    }

    #[test]
    fn only_an_answer_over_half_a_second_late_is_said() {
        crate::log::captured::start();
        let late = LateAnswers::default();
        let now = Instant::now();
        assert!(!late.check("pay", now + Duration::from_secs(1)));
        assert!(!late.check("pay", now - Duration::from_millis(100)));
        assert!(late.check("pay", now - Duration::from_millis(600)));
        assert_eq!(crate::log::captured::lines().len(), 1);
    }
}
