//! How long a plugin's graceful stop waits (docs/protocol.md, "Stopping while called"):
//! the calls in flight get the grace to finish, then the stop and destroy hooks get the
//! hooks' cap together; a hook still running then is abandoned and the process exits
//! without it. Both are 5 s unless the environment sets them: both modes (`serve` and the
//! subprocess handshake) read [`ENV_STOP_GRACE_MS`] and [`ENV_STOP_HOOKS_MS`] once at start,
//! in whole milliseconds from 0 to [`MAX_STOP_MS`]. 0 does not wait: a grace of 0 cuts the
//! calls in flight off at once, hooks of 0 abandon the hooks at once. A malformed value
//! ends the plugin at start with one line naming the variable.

use std::time::Duration;

pub const ENV_STOP_GRACE_MS: &str = "LINCHKIT_PLUGIN_STOP_GRACE_MS";
pub const ENV_STOP_HOOKS_MS: &str = "LINCHKIT_PLUGIN_STOP_HOOKS_MS";
/// The most either may be set to: 10 minutes, past any platform's wait between SIGTERM
/// and SIGKILL (more is a mistake in the unit, seconds for milliseconds).
pub const MAX_STOP_MS: u64 = 600_000;

/// How much of a refused value its message quotes.
const SHOWN_CHARS: usize = 40;

/// How long a stop waits: `grace` for the calls in flight, `hooks` for the stop and
/// destroy hooks together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct StopCaps {
    pub(crate) grace: Duration,
    pub(crate) hooks: Duration,
}

impl Default for StopCaps {
    /// 5 s each, as in every SDK.
    fn default() -> Self {
        StopCaps {
            grace: Duration::from_secs(5),
            hooks: Duration::from_secs(5),
        }
    }
}

impl StopCaps {
    /// The caps `var` (a variable's value, "" when unset) sets, the default for each one
    /// unset or empty; the refusal of a malformed one, naming its variable.
    pub(crate) fn from_vars<'a>(var: impl Fn(&str) -> &'a str) -> Result<Self, String> {
        let mut caps = StopCaps::default();
        for (name, into) in [
            (ENV_STOP_GRACE_MS, &mut caps.grace),
            (ENV_STOP_HOOKS_MS, &mut caps.hooks),
        ] {
            let text = var(name);
            if !text.is_empty() {
                *into = Duration::from_millis(stop_ms(name, text)?);
            }
        }
        Ok(caps)
    }
}

/// `text`, the value of the variable `name`, as whole milliseconds in `0..=MAX_STOP_MS`.
/// Digits only: `u64::from_str` would also take `+5`.
fn stop_ms(name: &str, text: &str) -> Result<u64, String> {
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        let significant = text.trim_start_matches('0');
        if significant.len() <= MAX_STOP_MS.to_string().len() {
            let ms = if significant.is_empty() {
                0
            } else {
                significant.parse::<u64>().unwrap_or(u64::MAX)
            };
            if ms <= MAX_STOP_MS {
                return Ok(ms);
            }
        }
    }
    let mut shown: String = text.chars().take(SHOWN_CHARS).collect();
    if text.chars().count() > SHOWN_CHARS {
        shown.push('…');
    }
    Err(format!(
        "{name} must be a whole number of milliseconds from 0 to {MAX_STOP_MS} (10 minutes), \
         not {shown:?}"
    ))
}

/// A cap as the stop's warning names it: seconds, as few digits as it takes ("5", "1.5").
pub(crate) fn seconds(cap: Duration) -> String {
    format!("{}", cap.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn caps(vars: &[(&str, &str)]) -> Result<StopCaps, String> {
        let vars: HashMap<&str, &str> = vars.iter().copied().collect();
        StopCaps::from_vars(|name| vars.get(name).copied().unwrap_or(""))
    }

    fn ms(grace: u64, hooks: u64) -> StopCaps {
        StopCaps {
            grace: Duration::from_millis(grace),
            hooks: Duration::from_millis(hooks),
        }
    }

    #[test]
    fn the_caps_come_from_the_environment_in_whole_milliseconds() {
        assert_eq!(caps(&[]), Ok(ms(5_000, 5_000)));
        assert_eq!(
            caps(&[(ENV_STOP_GRACE_MS, ""), (ENV_STOP_HOOKS_MS, "")]),
            Ok(ms(5_000, 5_000))
        );
        assert_eq!(caps(&[(ENV_STOP_GRACE_MS, "1000")]), Ok(ms(1_000, 5_000)));
        assert_eq!(caps(&[(ENV_STOP_HOOKS_MS, "250")]), Ok(ms(5_000, 250)));
        assert_eq!(
            caps(&[(ENV_STOP_GRACE_MS, "0"), (ENV_STOP_HOOKS_MS, "0")]),
            Ok(ms(0, 0))
        );
        assert_eq!(
            caps(&[
                (ENV_STOP_GRACE_MS, "600000"),
                (ENV_STOP_HOOKS_MS, "0001500")
            ]),
            Ok(ms(600_000, 1_500))
        );
    }

    #[test]
    fn a_malformed_cap_is_refused_in_one_line_naming_its_variable() {
        for name in [ENV_STOP_GRACE_MS, ENV_STOP_HOOKS_MS] {
            for value in [
                "5s",
                "-1",
                "1.5",
                "+5",
                " 5",
                "1e3",
                "600001",
                "99999999999999999999999",
                "five",
            ] {
                let message = caps(&[(name, value)]).unwrap_err();
                assert!(
                    message.starts_with(&format!(
                        "{name} must be a whole number of milliseconds from 0 to 600000"
                    )),
                    "{message}"
                );
                assert!(message.contains(value), "{message}");
                assert!(!message.contains('\n'), "{message}");
            }
        }
    }

    #[test]
    fn the_warning_names_the_cap_in_seconds() {
        assert_eq!(seconds(Duration::from_secs(5)), "5");
        assert_eq!(seconds(Duration::from_millis(1_500)), "1.5");
        assert_eq!(seconds(Duration::ZERO), "0");
    }
}
