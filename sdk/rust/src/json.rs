//! The JSON a plugin and its host exchange ([`Json`]): params, results, chunks, config and
//! event data travel as UTF-8 JSON bytes, passed through as they are.
//!
//! JSON has no NaN or infinity: what cannot be JSON never reaches the host, as `null` or as
//! a bare `NaN` token (docs/protocol.md). [`Json::encode`] refuses a value holding one,
//! where serde_json would write `null`; a [`Json::raw`] value is checked when it is sent,
//! and one that is no JSON is refused then: a result or a chunk is the call's
//! `provider_error`, an event is not sent.

use std::fmt;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{types, Error};

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
    /// event's data, and refused then if it is not JSON (a bare `NaN` token, `1e400`).
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
    /// "… hold a number beyond the range of a double"), or `None`; raw bytes are checked
    /// here, each time they are sent.
    pub(crate) fn not_json_because(&self) -> Option<String> {
        if self.known_json {
            return None;
        }
        crate::params::check(&self.bytes).map(|why| format!("its contents {why}"))
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
}
