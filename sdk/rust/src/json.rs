//! The JSON a plugin and its host exchange ([`Json`]): params, results, chunks, config and
//! event data travel as UTF-8 JSON bytes, passed through as they are.
//!
//! JSON has no NaN or infinity: what cannot be JSON never reaches the host, as `null` or as
//! a bare `NaN` token (docs/protocol.md). [`Json::encode`] refuses a value holding one,
//! where serde_json would write `null`; a [`Json::raw`] value is checked when it is sent,
//! and one that is no JSON is refused then: a result or a chunk is the call's
//! `provider_error`, an event is not sent. So is one holding a string that is not valid
//! Unicode, the one way a Rust plugin can send one (its `String` is always UTF-8): a lone
//! surrogate escape (`"\ud83d"`, as a UTF-16 string cut inside an emoji encodes) or bytes
//! that are not UTF-8 (`b"caf\xe9"`, read from a Latin-1 file).

use std::fmt;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{types, Error};
use crate::params::Unusable;

/// A raw value holding a `\ud800`-`\udfff` escape that forms no pair: it names no
/// character, and the host's decoder refuses it (RFC 8259 §8.2). Worded as in every SDK.
const NOT_UNICODE_LONE_SURROGATE: &str = "a string is not valid Unicode (a lone surrogate)";
/// A raw value whose string holds bytes that are not UTF-8 (RFC 8259 §8.1).
const NOT_UNICODE_BYTES: &str = "a string is not valid Unicode (bytes that are not UTF-8)";

/// UTF-8 JSON text: params, results, chunks, config and event data travel as JSON bytes.
#[derive(Clone, Debug)]
pub struct Json {
    bytes: Vec<u8>,
    /// The bytes are JSON a host reads: serde_json's encoding, or checked already. Only the
    /// others are checked when sent, so an encoded result costs no second look.
    known_json: bool,
}

impl Json {
    /// JSON text taken as it is: checked only when it is sent, as a result, a chunk or an
    /// event's data, and refused then if it is not JSON (a bare `NaN` token, `1e400`) or
    /// holds a string that is not valid Unicode (a lone surrogate escape `"\ud83d"`, bytes
    /// that are not UTF-8).
    pub fn raw(bytes: impl Into<Vec<u8>>) -> Self {
        Json {
            bytes: bytes.into(),
            known_json: false,
        }
    }

    /// Encodes a value. One that JSON cannot carry (a NaN or an infinity anywhere in it, a
    /// map whose keys are not strings) is `provider_error`, "the plugin's result is not
    /// JSON: NaN is not a JSON number": a method that returns it answers that error.
    pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Self, Error> {
        let text = serde_json::to_string(value).map_err(not_json)?;
        // serde_json writes a NaN or an infinity as `null`: only then is there one to find.
        // A str's search is vectorised (1 ms in a 9 MB result, a fifth of a byte window's).
        if text.contains("null") {
            if let Some(number) = crate::finite::first_non_finite(value) {
                return Err(not_json(format_args!("{number} is not a JSON number")));
            }
        }
        Ok(Json::known(text.into_bytes()))
    }

    /// Decodes into a value.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_slice(&self.bytes)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }

    /// Empty bytes on the wire mean JSON `null`.
    pub(crate) fn from_wire(bytes: Vec<u8>) -> Self {
        if bytes.is_empty() {
            Json::raw("null")
        } else {
            Json::raw(bytes)
        }
    }

    /// Bytes known to be JSON: checked by the SDK (`crate::params::check`), or built of such.
    pub(crate) fn known(bytes: Vec<u8>) -> Self {
        Json {
            bytes,
            known_json: true,
        }
    }

    /// Why the host could not read this value as JSON ("its contents are not valid JSON",
    /// "… hold a number beyond the range of a double", "a string is not valid Unicode (a
    /// lone surrogate)"), or `None`; raw bytes are checked here, each time they are sent.
    /// The check's one pass reads every string's escapes already: a lone surrogate costs
    /// the usual path nothing more, and encoded JSON is not looked at.
    pub(crate) fn not_json_because(&self) -> Option<String> {
        if self.known_json {
            return None;
        }
        let why = crate::params::unusable(&self.bytes, crate::params::MAX_PARAMS_DEPTH)?;
        Some(match why {
            Unusable::LoneSurrogate => NOT_UNICODE_LONE_SURROGATE.into(),
            Unusable::NotUtf8 { in_string: true } => NOT_UNICODE_BYTES.into(),
            // Bytes that are not UTF-8 outside any string: no string to name.
            other => format!("its contents {other}"),
        })
    }

    /// This value as a method's result or a stream's chunk: one the host could not read
    /// is the call's `provider_error`, as [`Json::encode`] refuses one.
    pub(crate) fn sendable(self) -> Result<Self, Error> {
        match self.not_json_because() {
            Some(why) => Err(not_json(why)),
            None => Ok(self),
        }
    }
}

/// Two values are equal when their bytes are, however each was made.
impl PartialEq for Json {
    fn eq(&self, other: &Self) -> bool {
        self.bytes == other.bytes
    }
}

impl Eq for Json {}

impl From<serde_json::Value> for Json {
    /// A `serde_json::Value` holds no NaN: `json!({"x": f64::NAN})` is `{"x": null}`
    /// already, before the SDK sees it. A float that may be NaN goes through
    /// [`Json::encode`], which refuses it.
    fn from(value: serde_json::Value) -> Self {
        Json::known(value.to_string().into_bytes())
    }
}

/// The `provider_error` of a result JSON cannot carry, worded as in every SDK.
fn not_json(why: impl fmt::Display) -> Error {
    Error::new(
        types::PROVIDER_ERROR,
        format!("the plugin's result is not JSON: {why}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types;

    #[derive(Serialize)]
    struct Reading {
        score: f64,
        note: Option<String>,
    }

    #[test]
    fn a_float_json_has_no_form_for_is_refused_however_deep() {
        let nested = |x: f32| std::collections::BTreeMap::from([("scores", vec![vec![1.0, x]])]);
        for (encoded, shown) in [
            (
                Json::encode(&Reading {
                    score: f64::NAN,
                    note: None,
                }),
                "NaN",
            ),
            (Json::encode(&vec![Some(1.5), Some(f64::INFINITY)]), "inf"),
            (Json::encode(&nested(f32::NEG_INFINITY)), "-inf"),
        ] {
            let refused = encoded.expect_err("JSON has no form for it");
            assert_eq!(
                (refused.error_type.as_str(), refused.retryable),
                (types::PROVIDER_ERROR, false)
            );
            assert_eq!(
                refused.message,
                format!("the plugin's result is not JSON: {shown} is not a JSON number")
            );
        }
    }

    #[test]
    fn a_map_json_has_no_form_for_is_refused_too() {
        let keyed_by_pairs = std::collections::BTreeMap::from([((1, 2), "a")]);
        let refused = Json::encode(&keyed_by_pairs).unwrap_err();
        assert_eq!(
            (refused.error_type.as_str(), refused.message.as_str()),
            (
                types::PROVIDER_ERROR,
                "the plugin's result is not JSON: key must be a string"
            )
        );
    }

    #[test]
    fn nulls_and_finite_floats_are_encoded_as_they_are() {
        let reading = Reading {
            score: -0.5,
            note: None,
        };
        assert_eq!(
            Json::encode(&reading).unwrap().as_bytes(),
            br#"{"score":-0.5,"note":null}"#
        );
        assert_eq!(Json::encode(&"null").unwrap().as_bytes(), br#""null""#);
        assert_eq!(
            Json::encode(&f64::MAX).unwrap().as_bytes(),
            b"1.7976931348623157e+308"
        );
    }

    /// A raw result holding a string that is not valid Unicode: serde_json 1.0.154's parse
    /// into `IgnoredAny`, which the check ends with, passes both kinds (a string ignored is
    /// read neither as UTF-8 nor for its escapes); the SDK's own scan before it refused
    /// them in words about params ("its contents hold a lone surrogate escape …", "its
    /// contents are not UTF-8") until 2026-12-08.
    #[test]
    fn a_raw_result_with_a_string_that_is_not_valid_unicode_is_refused() {
        const LONE: &str =
            "the plugin's result is not JSON: a string is not valid Unicode (a lone surrogate)";
        const NOT_UTF8: &str = "the plugin's result is not JSON: a string is not valid Unicode (bytes that are not UTF-8)";
        for (raw, expected) in [
            (br#"{"text":"smile \ud83d"}"#.to_vec(), LONE),
            (br#"{"text":"smile \uD83D!"}"#.to_vec(), LONE),
            (br#"["\udc00\ud800"]"#.to_vec(), LONE), // a pair reversed
            (br#"["\ud800\\udc00"]"#.to_vec(), LONE), // the second one is no escape
            (br#"{"a":[{"\ude00":1}]}"#.to_vec(), LONE), // a key, nested
            (b"{\"text\":\"caf\xe9\"}".to_vec(), NOT_UTF8),
            (b"[{\"caf\xe9\":1}]".to_vec(), NOT_UTF8),
        ] {
            let refused = Json::raw(raw.clone())
                .sendable()
                .expect_err("not valid Unicode");
            assert_eq!(
                (refused.error_type.as_str(), refused.retryable),
                (types::PROVIDER_ERROR, false)
            );
            assert_eq!(
                refused.message,
                expected,
                "{}",
                String::from_utf8_lossy(&raw)
            );
        }
        // Bytes that are not UTF-8 outside any string: no string to name.
        let refused = Json::raw(b"[1,\xff]".to_vec()).sendable().unwrap_err();
        assert_eq!(
            refused.message,
            "the plugin's result is not JSON: its contents are not UTF-8"
        );
    }

    #[test]
    fn a_raw_result_of_valid_unicode_escapes_is_sent_unchanged() {
        for raw in [
            r#"{"text":"smile \ud83d\ude00"}"#, // a pair
            r#"{"text":"\\ud83d"}"#,            // a backslash, then the letters ud83d
            r#"{"\uD83D\uDE00 \u00e9":"smile 😀 ünïcødé \\\ud83d\ude00"}"#,
        ] {
            let sent = Json::raw(raw).sendable().expect("valid Unicode");
            assert_eq!(sent.as_bytes(), raw.as_bytes());
        }
    }
}
