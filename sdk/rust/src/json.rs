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
use std::io;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::ser::{CompactFormatter, Formatter};

use crate::error::{types, Error};
use crate::params::{Unusable, MAX_PARAMS_DEPTH};

/// A raw value holding a `\ud800`-`\udfff` escape that forms no pair: it names no
/// character, and the host's decoder refuses it (RFC 8259 §8.2). Worded as in every SDK.
const NOT_UNICODE_LONE_SURROGATE: &str = "a string is not valid Unicode (a lone surrogate)";
/// A raw value whose string holds bytes that are not UTF-8 (RFC 8259 §8.1).
const NOT_UNICODE_BYTES: &str = "a string is not valid Unicode (bytes that are not UTF-8)";

/// UTF-8 JSON text: params, results, chunks, config and event data travel as JSON bytes.
#[derive(Clone, Debug)]
pub struct Json {
    bytes: Vec<u8>,
    /// What is known of the bytes: only raw ones are checked when sent, so an encoded
    /// result costs no second look, and a raw one is checked once however it is sent.
    known: Known,
}

/// What is known of a value's bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Known {
    /// Taken as given ([`Json::raw`]): checked when sent.
    Nothing,
    /// JSON a host reads, as serde_json sees it (its encoding): sent over gRPC as it is;
    /// but not all that the SDK's check holds it to, for serde_json wrote some of it
    /// unchecked (a `RawValue`'s text, which may hold `1e400` or `"\ud800"`), so a
    /// WebSocket frame checks it, as it did every value until 2026-12-08.
    Json,
    /// JSON a host reads, and all the SDK's check holds JSON to (`crate::params::check`),
    /// but maybe not its bound on nesting: checked by it, or encoded by serde_json of
    /// values alone. `depth` is how deeply it nests arrays and objects (0: a scalar); a
    /// WebSocket frame looks at it again only when that is past the bound.
    Checked { depth: usize },
}

impl Json {
    /// JSON text taken as it is: checked only when it is sent, as a result, a chunk or an
    /// event's data, and refused then if it is not JSON (a bare `NaN` token, `1e400`) or
    /// holds a string that is not valid Unicode (a lone surrogate escape `"\ud83d"`, bytes
    /// that are not UTF-8).
    pub fn raw(bytes: impl Into<Vec<u8>>) -> Self {
        Json {
            bytes: bytes.into(),
            known: Known::Nothing,
        }
    }

    /// Encodes a value. One that JSON cannot carry (a NaN or an infinity anywhere in it, a
    /// map whose keys are not strings) is `provider_error`, "the plugin's result is not
    /// JSON: NaN is not a JSON number": a method that returns it answers that error.
    pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Self, Error> {
        let (json, wrote_null) = encoded(value).map_err(not_json)?;
        // serde_json writes a NaN or an infinity as `null`: only then is there one to find.
        if wrote_null {
            if let Some(number) = crate::finite::first_non_finite(value) {
                return Err(not_json(format_args!("{number} is not a JSON number")));
            }
        }
        Ok(json)
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

    /// This value checked as params are (`crate::params::check`): known from then on
    /// (echoed back as a result, it is not checked again), or why it is unusable.
    pub(crate) fn checked(self) -> Result<Self, Unusable> {
        match self.known {
            Known::Nothing => {
                let depth = crate::params::usable_depth(&self.bytes, MAX_PARAMS_DEPTH)?;
                Ok(Json {
                    bytes: self.bytes,
                    known: Known::Checked { depth },
                })
            }
            Known::Json | Known::Checked { .. } => Ok(self),
        }
    }

    /// This value as it is sent (a method's result, a stream's chunk, an event's data): a
    /// raw one checked, once, and known from then on; encoded JSON not looked at. Or why
    /// the host could not read it ("its contents are not valid JSON", "… hold a number
    /// beyond the range of a double", "a string is not valid Unicode (a lone
    /// surrogate)"). The check's one pass reads every string's escapes already: a lone
    /// surrogate costs the usual path nothing more.
    pub(crate) fn vouched(self) -> Result<Self, String> {
        self.checked().map_err(|why| match why {
            Unusable::LoneSurrogate => NOT_UNICODE_LONE_SURROGATE.into(),
            Unusable::NotUtf8 { in_string: true } => NOT_UNICODE_BYTES.into(),
            // Bytes that are not UTF-8 outside any string: no string to name.
            other => format!("its contents {other}"),
        })
    }

    /// This value as a method's result or a stream's chunk: one the host could not read
    /// is the call's `provider_error`, as [`Json::encode`] refuses one.
    pub(crate) fn sendable(self) -> Result<Self, Error> {
        self.vouched().map_err(not_json)
    }

    /// Whether a WebSocket frame may carry these bytes as they are, unchecked: they were
    /// checked (or encoded) already, and nest no deeper than params may, so that the
    /// frame around them stays within what a host reads.
    pub(crate) fn framable(&self) -> bool {
        matches!(self.known, Known::Checked { depth } if depth <= MAX_PARAMS_DEPTH)
    }

    /// Why a WebSocket frame cannot carry this value (the rules params are held to, in
    /// their words: "are nested deeper than 250 levels"), or `None`: only a value that is
    /// not [`framable`](Json::framable) is read for it, the rare one.
    pub(crate) fn not_framable_because(&self) -> Option<String> {
        if self.framable() {
            return None;
        }
        crate::params::check(&self.bytes)
    }
}

/// `value` as serde_json's compact encoding (the bytes of `serde_json::to_vec`), known as
/// far as its writing shows, and whether it wrote a `null` (what a NaN becomes).
fn encoded<T: Serialize + ?Sized>(value: &T) -> Result<(Json, bool), serde_json::Error> {
    let mut bytes = Vec::with_capacity(128);
    let mut measured = Measured::default();
    value.serialize(&mut serde_json::Serializer::with_formatter(
        &mut bytes,
        Measuring(&mut measured),
    ))?;
    let known = if measured.unchecked_text {
        Known::Json
    } else {
        Known::Checked {
            depth: measured.deepest,
        }
    };
    Ok((Json { bytes, known }, measured.wrote_null))
}

/// What [`Measuring`] noted of an encoding: how deeply it nests, whether it holds text
/// serde_json wrote as it was given (a `RawValue`'s, a number's under
/// `arbitrary_precision`) and whether it wrote a `null`. All else serde_json writes is
/// what the SDK's check passes: UTF-8 (a Rust string), escapes only of control
/// characters, finite numbers of few digits.
#[derive(Default)]
struct Measured {
    depth: usize,
    deepest: usize,
    unchecked_text: bool,
    wrote_null: bool,
}

/// serde_json's compact formatter, byte for byte, noting what it writes in a [`Measured`].
struct Measuring<'a>(&'a mut Measured);

impl Measuring<'_> {
    #[inline]
    fn open(&mut self) {
        self.0.depth += 1;
        self.0.deepest = self.0.deepest.max(self.0.depth);
    }

    #[inline]
    fn close(&mut self) {
        self.0.depth = self.0.depth.saturating_sub(1);
    }
}

impl Formatter for Measuring<'_> {
    #[inline]
    fn write_null<W: ?Sized + io::Write>(&mut self, writer: &mut W) -> io::Result<()> {
        self.0.wrote_null = true;
        CompactFormatter.write_null(writer)
    }

    #[inline]
    fn begin_array<W: ?Sized + io::Write>(&mut self, writer: &mut W) -> io::Result<()> {
        self.open();
        CompactFormatter.begin_array(writer)
    }

    #[inline]
    fn end_array<W: ?Sized + io::Write>(&mut self, writer: &mut W) -> io::Result<()> {
        self.close();
        CompactFormatter.end_array(writer)
    }

    #[inline]
    fn begin_object<W: ?Sized + io::Write>(&mut self, writer: &mut W) -> io::Result<()> {
        self.open();
        CompactFormatter.begin_object(writer)
    }

    #[inline]
    fn end_object<W: ?Sized + io::Write>(&mut self, writer: &mut W) -> io::Result<()> {
        self.close();
        CompactFormatter.end_object(writer)
    }

    #[inline]
    fn write_number_str<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        value: &str,
    ) -> io::Result<()> {
        self.0.unchecked_text = true;
        CompactFormatter.write_number_str(writer, value)
    }

    #[inline]
    fn write_raw_fragment<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        fragment: &str,
    ) -> io::Result<()> {
        self.0.unchecked_text = true;
        CompactFormatter.write_raw_fragment(writer, fragment)
    }
}

/// The list of a stream's chunks, for a streaming method called once: JSON made of
/// values sent (each [`Json::sendable`]), known as they are, one level deeper.
pub(crate) struct List(Json);

impl List {
    pub(crate) fn new() -> Self {
        List(Json {
            bytes: b"[".to_vec(),
            known: Known::Checked { depth: 1 },
        })
    }

    pub(crate) fn push(&mut self, item: &Json) {
        let list = &mut self.0;
        if list.bytes.len() > 1 {
            list.bytes.push(b',');
        }
        list.bytes.extend_from_slice(&item.bytes);
        list.known = match (list.known, item.known) {
            (Known::Checked { depth }, Known::Checked { depth: its }) => Known::Checked {
                depth: depth.max(its + 1),
            },
            // Made of chunks each sent as JSON: known, as it always was.
            _ => Known::Json,
        };
    }

    pub(crate) fn end(mut self) -> Json {
        self.0.bytes.push(b']');
        self.0
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
        // Its keys are strings, its numbers finite: its encoding does not fail (its
        // `to_string`, used until 2026-12-08, panicked if it did).
        encoded(&value).expect("a serde_json::Value encodes").0
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

    /// `n` arrays, one in the other, around a number.
    fn nested(n: usize) -> serde_json::Value {
        (0..n).fold(serde_json::json!(1), |inner, _| serde_json::json!([inner]))
    }

    #[test]
    fn an_encoding_is_serde_json_s_byte_for_byte_and_known_to_fit_a_frame() {
        #[derive(Serialize)]
        enum Shape {
            Unit,
            Pair(u8, Vec<u8>),
            Named { a: Option<f32> },
        }
        let values = [
            serde_json::json!(null),
            serde_json::json!([]),
            serde_json::json!({}),
            serde_json::json!({"a": [1, -2, 3.5e-300, 1.7976931348623157e308], "b": {"c": [[]]}}),
            serde_json::json!(["\u{0}\n\"\\ é 😀", u64::MAX, i64::MIN, true]),
            nested(250),
        ];
        for value in &values {
            let encoded = Json::encode(value).unwrap();
            assert_eq!(encoded.as_bytes(), serde_json::to_vec(value).unwrap());
            assert_eq!(
                Json::from(value.clone()).as_bytes(),
                value.to_string().as_bytes()
            );
            assert!(encoded.framable(), "{value}");
            assert_eq!(encoded.not_framable_because(), None);
        }
        let shapes = (
            [Shape::Unit, Shape::Named { a: None }],
            Shape::Pair(7, b"ab".to_vec()),
            std::collections::BTreeMap::from([(3, u128::MAX)]),
            (),
        );
        assert_eq!(
            Json::encode(&shapes).unwrap().as_bytes(),
            serde_json::to_vec(&shapes).unwrap()
        );
        assert!(Json::encode(&shapes).unwrap().framable());
    }

    /// What serde_json writes without the SDK's check: nested past the params' bound, or
    /// holding a `RawValue`'s text. Known JSON for `sendable` (gRPC sends it, as before);
    /// a WebSocket frame reads it, and refuses it, as it did every value before.
    #[test]
    fn an_encoding_a_frame_cannot_carry_is_read_for_it_and_refused() {
        let deep = Json::encode(&nested(251)).unwrap();
        assert!(!deep.framable());
        let deep = deep.sendable().expect("known JSON: not looked at");
        assert_eq!(
            deep.not_framable_because().as_deref(),
            Some("are nested deeper than 250 levels")
        );
        #[derive(Serialize)]
        struct Holding {
            n: Box<serde_json::value::RawValue>,
        }
        for (raw, why) in [
            ("1e400", "hold a number beyond the range of a double"),
            (
                r#""\ud800""#,
                "hold a lone surrogate escape (\\ud800-\\udfff), which names no character",
            ),
            ("[1]", ""),
        ] {
            let n = serde_json::value::RawValue::from_string(raw.into()).unwrap();
            let held = Json::encode(&Holding { n }).unwrap().sendable().unwrap();
            assert_eq!(held.as_bytes(), format!(r#"{{"n":{raw}}}"#).as_bytes());
            assert!(!held.framable(), "{raw}: serde_json did not check it");
            let said = held.not_framable_because();
            assert_eq!(said.as_deref(), (!why.is_empty()).then_some(why), "{raw}");
        }
    }

    /// A raw value is checked once, however it is sent and whatever is built of it; an
    /// encoded one never. A WebSocket frame read every value again until 2026-12-08
    /// (milliseconds a MB of every answer); a second look would show here.
    #[test]
    fn a_raw_value_is_checked_once_and_an_encoded_one_never() {
        const RAW: &str = r#"{"raw":[1,"two"]}"#;
        crate::params::looked_at::start();
        let sent = Json::raw(RAW).sendable().unwrap();
        assert!(sent.framable());
        assert_eq!(sent.not_framable_because(), None);
        let again = sent.clone().sendable().unwrap().vouched().unwrap();
        let mut list = List::new();
        list.push(&again);
        list.push(&sent);
        let list = list.end().sendable().unwrap();
        assert_eq!(list.as_bytes(), format!("[{RAW},{RAW}]").as_bytes());
        assert!(list.framable());
        assert_eq!(crate::params::looked_at::times(RAW.as_bytes()), 1);

        let encoded = Json::encode(&serde_json::json!({"encoded": [1, "two"]})).unwrap();
        let encoded = encoded.sendable().unwrap().vouched().unwrap();
        assert_eq!(encoded.not_framable_because(), None);
        assert_eq!(crate::params::looked_at::times(encoded.as_bytes()), 0);
    }

    /// A list of chunks is one level deeper than its deepest chunk: at 250 levels a
    /// chunk fits a frame, the list of it not, and says so as before.
    #[test]
    fn a_list_of_chunks_knows_its_depth() {
        let at_the_bound = Json::raw(nested(250).to_string()).sendable().unwrap();
        assert!(at_the_bound.framable());
        let mut list = List::new();
        list.push(&Json::encode(&[1]).unwrap());
        assert!(list.0.framable());
        list.push(&at_the_bound);
        let list = list.end();
        assert!(!list.framable());
        assert_eq!(
            list.not_framable_because().as_deref(),
            Some("are nested deeper than 250 levels")
        );
        assert_eq!(List::new().end().as_bytes(), b"[]");
        assert!(List::new().end().framable());
    }
}
