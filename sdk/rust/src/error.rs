//! The error a method answers with. It travels to the host inside `CallReply.error`, never
//! as a gRPC status: gRPC status codes are for the transport (docs/protocol.md).

use std::fmt;

use crate::pb;

/// The dispatcher's stable error types. A plugin may use its own type names too; the host
/// then raises `PluginError` carrying that name.
pub mod types {
    pub const METHOD_NOT_FOUND: &str = "method_not_found";
    pub const INVALID_PARAMS: &str = "invalid_params";
    pub const UNAUTHORIZED: &str = "unauthorized";
    pub const FORBIDDEN: &str = "forbidden";
    pub const RATE_LIMITED: &str = "rate_limited";
    pub const OVERLOADED: &str = "overloaded";
    pub const DEADLINE_EXCEEDED: &str = "deadline_exceeded";
    pub const TARGET_UNAVAILABLE: &str = "target_unavailable";
    pub const PROVIDER_ERROR: &str = "provider_error";
    /// What any failure without a type of its own becomes.
    pub const PLUGIN_ERROR: &str = "PluginError";
}

/// A typed failure: `type`, `message`, `retryable`, optional `details` (a JSON object)
/// and `retry_after` (seconds).
#[derive(Debug, Clone, PartialEq)]
pub struct Error {
    pub error_type: String,
    pub message: String,
    pub retryable: bool,
    pub details: Option<serde_json::Value>,
    pub retry_after: Option<f64>,
}

impl Error {
    /// A non-retryable error of the plugin's own type.
    pub fn new(error_type: impl Into<String>, message: impl Into<String>) -> Self {
        Error {
            error_type: error_type.into(),
            message: message.into(),
            retryable: false,
            details: None,
            retry_after: None,
        }
    }

    /// The params do not have the shape the method needs.
    pub fn invalid_params(message: impl Into<String>) -> Self {
        Error::new(types::INVALID_PARAMS, message)
    }

    /// The plugin has no method of that name (a call the SDK cannot route is answered with
    /// more: the plugin's id and the methods it has).
    pub fn method_not_found(method: &str) -> Self {
        Error::new(
            types::METHOD_NOT_FOUND,
            format!("plugin has no method {}", shown_name(method)),
        )
    }

    /// The call's deadline passed before the method finished (retryable with a new one).
    pub fn deadline_exceeded(message: impl Into<String>) -> Self {
        Error::new(types::DEADLINE_EXCEEDED, message).retryable(true)
    }

    pub fn retryable(mut self, retryable: bool) -> Self {
        self.retryable = retryable;
        self
    }

    /// Details for the host, a JSON object.
    pub fn with_details(mut self, details: serde_json::Value) -> Self {
        self.details = Some(details);
        self
    }

    pub fn with_retry_after(mut self, seconds: f64) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    pub(crate) fn to_proto(&self) -> pb::Error {
        pb::Error {
            r#type: self.error_type.clone(),
            message: self.message.clone(),
            retryable: self.retryable,
            details_json: match &self.details {
                Some(details) => serde_json::to_vec(details).unwrap_or_default(),
                None => Vec::new(),
            },
            retry_after: self.retry_after.unwrap_or(0.0),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.error_type, self.message)
    }
}

impl std::error::Error for Error {}

/// A caller's method name as an error message shows it: quoted (a NUL or a newline
/// escaped) and cut to 64 bytes, so a 10,000-character name is not sent back whole.
pub(crate) fn shown_name(name: &str) -> String {
    let (kept, cut) = cut_to_64_bytes(name);
    format!("{kept:?}{cut}")
}

/// A name as a warning shows it: in single quotes, as every SDK's `event 'tick' not sent`
/// (Python's repr), escaped and cut as [`shown_name`] does.
pub(crate) fn quoted_name(name: &str) -> String {
    let (kept, cut) = cut_to_64_bytes(name);
    format!("'{}'{cut}", kept.escape_debug())
}

/// The first 64 bytes of `name` or fewer (a whole character), and "…" if that cut some.
fn cut_to_64_bytes(name: &str) -> (&str, &'static str) {
    if name.len() <= 64 {
        return (name, "");
    }
    let mut cut = 64;
    while !name.is_char_boundary(cut) {
        cut -= 1;
    }
    (&name[..cut], "…")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_name_is_cut() {
        assert!(shown_name(&"é".repeat(10_000)).len() < 80);
        assert_eq!(shown_name("a\0\nb"), r#""a\0\nb""#);
        assert_eq!(quoted_name("tick"), "'tick'");
        assert_eq!(quoted_name("a'\nb"), r"'a\'\nb'");
        assert!(quoted_name(&"é".repeat(10_000)).ends_with("'…"));
    }
}
