//! The SDK's own lines on stderr (start-up, a failed handler, dropped events, shutdown), in
//! the shape of `tracing-subscriber`'s fmt layer, one line a record:
//!
//! ```text
//! 2026-12-04T00:10:00.123456Z  WARN linchkit_plugin: the host is not reading its Events stream; …
//! ```
//!
//! A host reading a subprocess plugin's stderr logs each line at the level it carries (a
//! `WARN` stays a warning there, not INFO: the dispatcher's providers/subprocess/levels.py).
//! A newline inside a message is written as `\n`, so a record never spills onto lines
//! without a level. [`Plugin::serve`](crate::Plugin::serve) also writes a panic of plugin
//! code this way (`install_panic_hook`), where Rust's default hook wrote three bare lines.

use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Level {
    Info,
    Warn,
    Error,
}

impl Level {
    fn word(self) -> &'static str {
        match self {
            Level::Info => "INFO",
            Level::Warn => "WARN",
            Level::Error => "ERROR",
        }
    }
}

/// One record as its line, ending in a newline.
pub(crate) fn line(level: Level, message: &str, now: SystemTime) -> String {
    let message = message
        .replace("\r\n", "\\n")
        .replace('\n', "\\n")
        .replace('\r', "\\r");
    format!(
        "{} {:>5} linchkit_plugin: {message}\n",
        timestamp(now),
        level.word()
    )
}

/// Writes one record to stderr, whole (one write, so lines of two threads never interleave).
pub(crate) fn log(level: Level, message: &str) {
    let text = line(level, message, SystemTime::now());
    #[cfg(test)]
    if captured::keep(&text) {
        return;
    }
    let _ = std::io::stderr().lock().write_all(text.as_bytes());
}

pub(crate) fn info(message: &str) {
    log(Level::Info, message);
}

pub(crate) fn warn(message: &str) {
    log(Level::Warn, message);
}

pub(crate) fn error(message: &str) {
    log(Level::Error, message);
}

/// A test's own stderr: while a test captures, the records logged on its thread are kept
/// for it instead of written (a `#[tokio::test]` runs the tasks it spawns on its thread).
#[cfg(test)]
pub(crate) mod captured {
    use std::cell::RefCell;

    thread_local! {
        static LINES: RefCell<Option<Vec<String>>> = const { RefCell::new(None) };
    }

    /// Keeps this thread's records from here on.
    pub(crate) fn start() {
        LINES.with(|lines| *lines.borrow_mut() = Some(Vec::new()));
    }

    /// This thread's records since `start`, each a line without its newline.
    pub(crate) fn lines() -> Vec<String> {
        LINES.with(|lines| {
            lines
                .borrow()
                .iter()
                .flatten()
                .map(|line| line.trim_end_matches('\n').to_string())
                .collect()
        })
    }

    /// Keeps `text` when this thread captures.
    pub(super) fn keep(text: &str) -> bool {
        LINES.with(|lines| match lines.borrow_mut().as_mut() {
            Some(kept) => {
                kept.push(text.to_string());
                true
            }
            None => false,
        })
    }
}

/// Makes every panic one ERROR line (where, what, and the backtrace when `RUST_BACKTRACE`
/// asks for one), in place of Rust's default hook. The SDK answers a panicking method with
/// a `PluginError` and goes on; the line is what is left of it for whoever reads the logs.
pub(crate) fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let payload = info.payload();
        let what = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a non-string panic".to_string());
        let thread = std::thread::current();
        let place = info
            .location()
            .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()))
            .unwrap_or_default();
        let mut message = format!(
            "thread '{}' panicked at {place}: {what}",
            thread.name().unwrap_or("<unnamed>")
        );
        let backtrace = std::backtrace::Backtrace::capture();
        if backtrace.status() == std::backtrace::BacktraceStatus::Captured {
            message.push_str(&format!("\nbacktrace:\n{backtrace}"));
        }
        error(&message);
    }));
}

/// RFC 3339 in UTC with microseconds, as tracing-subscriber writes it.
fn timestamp(now: SystemTime) -> String {
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let seconds = since.as_secs();
    let (days, of_day) = ((seconds / 86_400) as i64, seconds % 86_400);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        of_day / 3600,
        of_day / 60 % 60,
        of_day % 60,
        since.subsec_micros()
    )
}

/// The proleptic Gregorian date of a day counted from 1970-01-01 (Howard Hinnant's
/// `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn at(seconds: u64, micros: u32) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(seconds) + Duration::from_micros(u64::from(micros))
    }

    #[test]
    fn a_record_is_one_line_in_tracings_shape() {
        // 2026-12-04T00:10:00Z
        let line = line(Level::Warn, "dropping events", at(1_796_343_000, 123_456));
        assert_eq!(
            line,
            "2026-12-04T00:10:00.123456Z  WARN linchkit_plugin: dropping events\n"
        );
        let error = super::line(Level::Error, "x", at(0, 0));
        assert_eq!(
            error,
            "1970-01-01T00:00:00.000000Z ERROR linchkit_plugin: x\n"
        );
    }

    #[test]
    fn newlines_stay_on_the_records_line() {
        let line = line(Level::Error, "panicked\nbacktrace:\r\n  0: main", at(0, 0));
        assert_eq!(line.matches('\n').count(), 1, "{line:?}");
        assert!(
            line.ends_with("panicked\\nbacktrace:\\n  0: main\n"),
            "{line:?}"
        );
    }

    #[test]
    fn dates_across_leap_years_and_centuries() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        assert_eq!(civil_from_days(47_541), (2100, 3, 1));
    }
}
