//! What params every SDK can hold: the checks a call's params pass before any method sees
//! them (docs/protocol.md, "gRPC binding"), and the decoding of params into a method's
//! type with errors in JSON's words.

use serde::de::DeserializeOwned;

use crate::Error;

/// How deeply params may nest arrays and objects; deeper params are `invalid_params` in
/// every SDK. The dispatcher's own encoder writes at most 254 levels, and a method that
/// deserializes params into `serde_json::Value` stops at 128 anyway.
pub const MAX_PARAMS_DEPTH: usize = 250;

/// Why params are unusable ("are not valid JSON", …), or `None`.
///
/// Ignoring a value, serde_json passes what the other SDKs and the dispatcher reading an
/// echo back cannot hold: invalid UTF-8 inside a string, a number beyond an f64 (1e400,
/// an integer of 5,000 digits), a lone surrogate escape (`"\ud800"`), nesting 100,000
/// deep. One pass without recursion; the message never quotes the params.
pub fn check(raw: &[u8]) -> Option<String> {
    check_nesting(raw, MAX_PARAMS_DEPTH)
}

/// [`check`] with another bound on nesting: a WebSocket frame holds a call's params two
/// levels down (`crate::websocket::protocol`).
pub(crate) fn check_nesting(raw: &[u8], max_depth: usize) -> Option<String> {
    unusable(raw, max_depth).map(|why| why.to_string())
}

/// Why JSON bytes are unusable, as [`check`] finds it: shown in params' words ("are not
/// UTF-8"), and told apart so that a result's refusal words it as a result's
/// (`crate::json`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Unusable {
    /// Bytes that are not UTF-8; `in_string` when the first such byte is inside a string
    /// (a key or a value), where JSON would otherwise allow any character.
    NotUtf8 {
        in_string: bool,
    },
    /// A `\ud800`-`\udfff` escape that does not form a pair: it names no character.
    LoneSurrogate,
    NestedDeeper(usize),
    BeyondDouble,
    NotJson,
}

impl std::fmt::Display for Unusable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unusable::NotUtf8 { .. } => f.write_str("are not UTF-8"),
            Unusable::LoneSurrogate => f.write_str(
                "hold a lone surrogate escape (\\ud800-\\udfff), which names no character",
            ),
            Unusable::NestedDeeper(max) => write!(f, "are nested deeper than {max} levels"),
            Unusable::BeyondDouble => f.write_str("hold a number beyond the range of a double"),
            Unusable::NotJson => f.write_str("are not valid JSON"),
        }
    }
}

/// The one pass of [`check`]: UTF-8, then each string's escapes, the nesting and the
/// numbers, then serde_json's parse.
pub(crate) fn unusable(raw: &[u8], max_depth: usize) -> Option<Unusable> {
    usable_depth(raw, max_depth).err()
}

/// [`unusable`], saying of usable bytes how deeply they nest arrays and objects (0 for a
/// scalar): what a value checked once keeps (`crate::json`), so that JSON built of it
/// (a streamed method's list of chunks) is known without a second pass.
pub(crate) fn usable_depth(raw: &[u8], max_depth: usize) -> Result<usize, Unusable> {
    #[cfg(test)]
    looked_at::note(raw);
    if let Err(err) = std::str::from_utf8(raw) {
        let in_string = inside_a_string(raw, err.valid_up_to());
        return Err(Unusable::NotUtf8 { in_string });
    }
    let mut depth = 0usize;
    let mut deepest = 0usize;
    let mut i = 0;
    while i < raw.len() {
        match raw[i] {
            b'"' => match scan_string(raw, i + 1) {
                Ok(end) => i = end,
                Err(why) => return Err(why),
            },
            b'[' | b'{' => {
                depth += 1;
                if depth > max_depth {
                    return Err(Unusable::NestedDeeper(max_depth));
                }
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            b'-' | b'0'..=b'9' => {
                let end = raw[i + 1..]
                    .iter()
                    .position(|c| !b"0123456789+-.eE".contains(c))
                    .map_or(raw.len(), |n| i + 1 + n);
                let number = &raw[i..end];
                // Only an exponent or over 300 digits can pass an f64's range.
                if number.len() > 300 || number.iter().any(|c| matches!(c, b'e' | b'E')) {
                    let text = std::str::from_utf8(number).unwrap_or_default();
                    if text.parse::<f64>().is_ok_and(f64::is_infinite) {
                        return Err(Unusable::BeyondDouble);
                    }
                }
                i = end - 1;
            }
            _ => {}
        }
        i += 1;
    }
    if serde_json::from_slice::<serde::de::IgnoredAny>(raw).is_err() {
        return Err(Unusable::NotJson);
    }
    Ok(deepest)
}

/// What the check read, on this thread, since [`start`](looked_at::start): a test counts
/// how often a value's bytes were checked on their way out (once for a raw value, never
/// for one encoded or checked already).
#[cfg(test)]
pub(crate) mod looked_at {
    use std::cell::RefCell;

    thread_local! {
        static READ: RefCell<Option<Vec<Vec<u8>>>> = const { RefCell::new(None) };
    }

    /// Starts noting every check's bytes on this thread (a `#[tokio::test]` runs its
    /// tasks on it).
    pub(crate) fn start() {
        READ.with(|read| *read.borrow_mut() = Some(Vec::new()));
    }

    pub(crate) fn note(raw: &[u8]) {
        READ.with(|read| {
            if let Some(read) = read.borrow_mut().as_mut() {
                read.push(raw.to_vec());
            }
        });
    }

    /// How many checks since `start` read exactly `bytes`.
    pub(crate) fn times(bytes: &[u8]) -> usize {
        READ.with(|read| {
            read.borrow().as_ref().map_or(0, |read| {
                read.iter().filter(|r| r.as_slice() == bytes).count()
            })
        })
    }
}

/// Whether byte `at` of `raw` is inside a string, reading from the start. Only for bytes
/// that are not UTF-8, a refusal: the usual path never walks this.
fn inside_a_string(raw: &[u8], at: usize) -> bool {
    let mut inside = false;
    let mut i = 0;
    while i < at {
        match raw[i] {
            b'"' => inside = !inside,
            b'\\' if inside => i += 1, // what it escapes
            _ => {}
        }
        i += 1;
    }
    inside
}

/// Reads a JSON string from `raw[i]` (after its opening quote) to its closing quote.
fn scan_string(raw: &[u8], mut i: usize) -> Result<usize, Unusable> {
    const LONE: Unusable = Unusable::LoneSurrogate;
    while i < raw.len() {
        match raw[i] {
            b'"' => return Ok(i),
            b'\\' if raw.get(i + 1) == Some(&b'u') => {
                match hex4(raw, i + 2) {
                    Some(0xDC00..=0xDFFF) => return Err(LONE),
                    Some(0xD800..=0xDBFF) => {
                        let paired = raw.get(i + 6) == Some(&b'\\')
                            && raw.get(i + 7) == Some(&b'u')
                            && matches!(hex4(raw, i + 8), Some(0xDC00..=0xDFFF));
                        if !paired {
                            return Err(LONE);
                        }
                        i += 12;
                        continue;
                    }
                    _ => i += 6,
                }
                continue;
            }
            b'\\' => i += 2,
            _ => i += 1,
        }
    }
    Ok(i) // not closed: serde_json says so
}

fn hex4(raw: &[u8], i: usize) -> Option<u32> {
    let digits = std::str::from_utf8(raw.get(i..i + 4)?).ok()?;
    u32::from_str_radix(digits, 16).ok()
}

/// What a JSON value is, as a message says it: "an object", "an array", "a string",
/// "a number", "a boolean" or "null" (Java's words, and TypeScript's).
fn json_kind(value: &[u8]) -> &'static str {
    match value.iter().find(|c| !c.is_ascii_whitespace()) {
        Some(b'{') => "an object",
        Some(b'[') => "an array",
        Some(b'"') => "a string",
        Some(b't' | b'f') => "a boolean",
        Some(b'n') | None => "null",
        Some(_) => "a number",
    }
}

/// Whether `c` ends a number or a literal (`true`, `false`, `null`).
fn ends_token(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\r' | b'\n' | b',' | b':' | b']' | b'}')
}

/// A value as a message says it got it: a number as it was written (cut to 40 bytes),
/// anything else by its kind, so a message never quotes what a caller sent.
fn shown_value(value: &[u8]) -> String {
    let kind = json_kind(value);
    if kind != "a number" {
        return kind.into();
    }
    let start = value
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(0);
    let number = &value[start..];
    let end = number
        .iter()
        .position(|&c| ends_token(c))
        .unwrap_or(number.len());
    let text = String::from_utf8_lossy(&number[..end.min(40)]).into_owned();
    if end > 40 {
        text + "…"
    } else {
        text
    }
}

/// The value an error at byte `offset` of `params` is about (params are valid JSON): its
/// path from the top (`items[0].name`, empty for params themselves) and where it begins.
/// One pass over params up to `offset`, without recursion.
///
/// The offset is where serde_json stopped: just past a scalar, at the `{` or `[` of a
/// container of the wrong kind, just past the `}` of an object that misses a field. The
/// value is the last one begun in the innermost container still open there.
fn value_at(params: &[u8], offset: usize) -> (String, &[u8]) {
    struct Frame<'a> {
        object: bool,
        key: &'a [u8], // the current member's key, as written (escapes kept: one line)
        colon: bool,   // past the current member's ':'
        index: usize,
        start: Option<usize>, // where the current member's value begins, once it has
    }
    fn begin(stack: &mut [Frame], i: usize) {
        if let Some(top) = stack.last_mut() {
            if top.start.is_none() && (!top.object || top.colon) {
                top.start = Some(i);
            }
        }
    }
    let offset = offset.min(params.len());
    let mut stack: Vec<Frame> = Vec::new();
    let mut i = 0;
    while i < offset {
        match params[i] {
            b' ' | b'\t' | b'\r' | b'\n' => {}
            b'"' => {
                let end = scan_string(params, i + 1).unwrap_or(params.len());
                match stack.last_mut() {
                    Some(top) if top.object && !top.colon => {
                        top.key = &params[i + 1..end.min(params.len())];
                    }
                    _ => begin(&mut stack, i),
                }
                i = end;
            }
            c @ (b'{' | b'[') => {
                begin(&mut stack, i);
                stack.push(Frame {
                    object: c == b'{',
                    key: b"",
                    colon: false,
                    index: 0,
                    start: None,
                });
            }
            b'}' | b']' => {
                stack.pop();
            }
            b':' => {
                if let Some(top) = stack.last_mut() {
                    top.colon = true;
                }
            }
            b',' => {
                if let Some(top) = stack.last_mut() {
                    top.index += 1;
                    (top.key, top.colon, top.start) = (b"", false, None);
                }
            }
            _ => {
                // a number, true, false, null
                begin(&mut stack, i);
                while i + 1 < offset && !ends_token(params[i + 1]) {
                    i += 1;
                }
            }
        }
        i += 1;
    }
    // A container of the wrong kind: serde_json stopped at its '{' or '['.
    if matches!(params.get(offset), Some(b'{' | b'[')) {
        begin(&mut stack, offset);
    }
    let mut path = String::new();
    let mut value = params;
    for frame in &stack {
        let Some(start) = frame.start else { break };
        if frame.object {
            if !path.is_empty() {
                path.push('.');
            }
            path.push_str(&String::from_utf8_lossy(frame.key));
        } else {
            path.push_str(&format!("[{}]", frame.index));
        }
        value = &params[start..];
    }
    if path.len() > 100 {
        let mut cut = 100;
        while !path.is_char_boundary(cut) {
            cut -= 1;
        }
        path.truncate(cut);
        path.push('…');
    }
    (path, value)
}

/// The byte offset of serde_json's line (from 1) and column (bytes into the line).
fn offset_of(raw: &[u8], line: usize, column: usize) -> usize {
    let start = if line <= 1 {
        0
    } else {
        raw.iter()
            .enumerate()
            .filter(|(_, &c)| c == b'\n')
            .nth(line - 2)
            .map_or(raw.len(), |(i, _)| i + 1)
    };
    start + column
}

/// What serde's expectation asks for, in JSON's words: a message must not name Rust
/// types (the caller may not know Rust; "expected struct GreetParams" tells nothing).
/// An expectation a type's own `Deserialize` wrote ("a date") is kept as it is.
fn expected_json(expected: &str) -> String {
    let words = match expected {
        "i8" => "an integer from -128 to 127",
        "i16" => "an integer from -32768 to 32767",
        "i32" => "an integer from -2147483648 to 2147483647",
        "i64" | "i128" | "isize" => "an integer",
        "u8" => "an integer from 0 to 255",
        "u16" => "an integer from 0 to 65535",
        "u32" => "an integer from 0 to 4294967295",
        "u64" | "u128" | "usize" => "a non-negative integer",
        "f32" | "f64" => "a number",
        "a string" | "a borrowed string" => "a string",
        "a character" => "a string of one character",
        "a boolean" => "a boolean",
        "a sequence" => "an array",
        "a map" => "an object",
        "unit" => "null",
        _ => {
            let items = |rest: &str| -> Option<String> {
                let n: usize = rest.split_whitespace().next()?.parse().ok()?;
                Some(format!("an array of {n} items"))
            };
            if let Some(rest) = expected.strip_prefix("an array of length ") {
                return items(rest).unwrap_or_else(|| "an array".into());
            }
            if let Some(rest) = expected.strip_prefix("a tuple of size ") {
                return items(rest).unwrap_or_else(|| "an array".into());
            }
            if let Some(rest) = expected.strip_prefix("tuple struct ") {
                return rest
                    .split_once(" with ")
                    .and_then(|(_, n)| items(n))
                    .unwrap_or_else(|| "an array".into());
            }
            if expected.starts_with("struct ") || expected.starts_with("struct variant ") {
                return "an object".into();
            }
            if expected.starts_with("tuple variant ") {
                return "an array".into();
            }
            if expected.starts_with("unit struct ") {
                return "null".into();
            }
            if expected.starts_with("enum ") {
                return "one of the values it takes".into();
            }
            return expected.into();
        }
    };
    words.into()
}

/// serde_json's error in the words of the TypeScript and Java SDKs: which param had the
/// wrong kind of value, what it takes and what it got, in JSON's words.
fn explain(method: &str, raw: &[u8], err: &serde_json::Error) -> String {
    let text = err.to_string();
    let message = match text.rfind(" at line ") {
        Some(at) if err.line() > 0 => &text[..at],
        _ => &text,
    };
    let Some((what, expected)) = message.split_once(", expected ") else {
        return format!("params of {method}: {text}");
    };
    let want = expected_json(expected);
    if !(what.starts_with("invalid type: ") || what.starts_with("invalid value: ")) {
        if want == expected {
            return format!("params of {method}: {text}"); // no type named: as it was
        }
        return format!("params of {method}: {what}, expected {want}");
    }
    let (path, value) = value_at(raw, offset_of(raw, err.line(), err.column()));
    if !path.is_empty() {
        format!(
            "{method}: '{path}' must be {want}, got {}",
            shown_value(value)
        )
    } else if want == "an object" {
        format!(
            "{method} takes an object of named params, got {}",
            json_kind(value)
        )
    } else {
        format!("{method} takes {want}, got {}", shown_value(value))
    }
}

/// How [`takes_named_params`] learns what a type asks of its deserializer first.
#[derive(Debug)]
struct Asked(bool);

impl std::fmt::Display for Asked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("asked")
    }
}

impl std::error::Error for Asked {}

impl serde::de::Error for Asked {
    fn custom<T: std::fmt::Display>(_: T) -> Self {
        Asked(false)
    }
}

/// A deserializer that holds nothing: it answers whether the type asked for an object
/// (a struct or a map), through `Option` and newtypes, and fails every request.
struct Probe;

impl<'de> serde::Deserializer<'de> for Probe {
    type Error = Asked;

    fn deserialize_any<V: serde::de::Visitor<'de>>(self, _: V) -> Result<V::Value, Asked> {
        Err(Asked(false))
    }

    fn deserialize_struct<V: serde::de::Visitor<'de>>(
        self,
        _: &'static str,
        _: &'static [&'static str],
        _: V,
    ) -> Result<V::Value, Asked> {
        Err(Asked(true))
    }

    fn deserialize_map<V: serde::de::Visitor<'de>>(self, _: V) -> Result<V::Value, Asked> {
        Err(Asked(true))
    }

    fn deserialize_option<V: serde::de::Visitor<'de>>(self, visitor: V) -> Result<V::Value, Asked> {
        visitor.visit_some(self)
    }

    fn deserialize_newtype_struct<V: serde::de::Visitor<'de>>(
        self,
        _: &'static str,
        visitor: V,
    ) -> Result<V::Value, Asked> {
        visitor.visit_newtype_struct(self)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        unit unit_struct seq tuple tuple_struct enum identifier ignored_any
    }
}

/// Whether `T` is named params: a struct or a map (behind `Option` or a newtype too), which
/// only a JSON object fills. A type with its own `Deserialize` asking for any value, a
/// sequence or a scalar takes what it takes.
fn takes_named_params<T: DeserializeOwned>() -> bool {
    matches!(T::deserialize(Probe), Err(Asked(true)))
}

/// Decodes a method's params into `T`. Into named params (a struct, a map) a string, a
/// number or a boolean is refused, "greet takes an object of named params, got a string",
/// as the TypeScript and Java SDKs say it (`null` is left to `T`); an array is positional,
/// serde filling a struct's fields in order (docs/protocol.md); a field of the wrong kind
/// names the param and what it takes in JSON's words, never a Rust type.
pub(crate) fn decode<T: DeserializeOwned>(method: &str, raw: &[u8]) -> Result<T, Error> {
    let kind = json_kind(raw);
    let named_or_positional = matches!(kind, "an object" | "an array" | "null");
    if !named_or_positional && takes_named_params::<T>() {
        return Err(Error::invalid_params(format!(
            "{method} takes an object of named params, got {kind}"
        )));
    }
    serde_json::from_slice(raw).map_err(|err| Error::invalid_params(explain(method, raw, &err)))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn deep(n: usize) -> String {
        "[".repeat(n) + &"]".repeat(n)
    }

    #[test]
    fn refuses_what_no_sdk_can_hold() {
        let nines = "9".repeat(5000);
        let (ok, over, far) = (
            deep(MAX_PARAMS_DEPTH),
            deep(MAX_PARAMS_DEPTH + 1),
            deep(100_000),
        );
        let cases: Vec<(&[u8], Option<&str>)> = vec![
            (br#"{"a": [1, 2.5e3, -0.0, "\ud83d\ude00", "\"[{"]}"#, None),
            (ok.as_bytes(), None),
            (b"1.7976931348623157e308", None),
            (over.as_bytes(), Some("are nested deeper")),
            (far.as_bytes(), Some("are nested deeper")),
            (b"1e400", Some("hold a number beyond")),
            (b"[-1E+400]", Some("hold a number beyond")),
            (nines.as_bytes(), Some("hold a number beyond")),
            (br#""\ud800""#, Some("hold a lone surrogate")),
            (br#""\udc00""#, Some("hold a lone surrogate")),
            (b"\"caf\xe9\"", Some("are not UTF-8")),
            (br#"{"a": "#, Some("are not valid JSON")),
        ];
        for (raw, want) in cases {
            let why = check(raw);
            match (why.as_deref(), want) {
                (None, None) => {}
                (Some(why), Some(want)) if why.starts_with(want) => {}
                (got, _) => panic!(
                    "check({:.40?}) = {got:?}, want {want:?}",
                    String::from_utf8_lossy(raw)
                ),
            }
        }
    }

    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct Item {
        name: String,
    }

    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct Inner {
        deep: Vec<String>,
    }

    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct Greet {
        #[serde(default)]
        name: String,
        #[serde(default)]
        small: i8,
        #[serde(default)]
        count: u64,
        #[serde(default)]
        ratio: f64,
        #[serde(default)]
        on: bool,
        #[serde(default)]
        items: Vec<Item>,
        #[serde(default)]
        tags: std::collections::HashMap<String, i64>,
        inner: Option<Inner>,
    }

    fn message_of<T: DeserializeOwned + std::fmt::Debug>(params: &str) -> String {
        let err = decode::<T>("greet", params.as_bytes()).expect_err(params);
        assert_eq!(err.error_type, "invalid_params", "{params}");
        err.message
    }

    #[test]
    fn named_params_take_only_an_object() {
        for (params, got) in [
            (r#""Ada""#, "a string"),
            ("-1.5e3", "a number"),
            (" true", "a boolean"),
        ] {
            let want = format!("greet takes an object of named params, got {got}");
            assert_eq!(message_of::<Greet>(params), want);
            assert_eq!(message_of::<Option<Greet>>(params), want);
            assert_eq!(message_of::<HashMap<String, i64>>(params), want);
        }
        // null is left to the type, as before: a struct refuses it, an Option takes it.
        assert_eq!(
            message_of::<Greet>("null"),
            "greet takes an object of named params, got null"
        );
        assert!(decode::<Option<Greet>>("greet", b"null").unwrap().is_none());
        // An array is positional: a struct's fields in order (docs/protocol.md).
        #[derive(serde::Deserialize, Debug)]
        struct Pair {
            name: String,
            count: u64,
        }
        let pair = decode::<Pair>("greet", br#"["Ada", 3]"#).expect("positional");
        assert_eq!((pair.name.as_str(), pair.count), ("Ada", 3));
        assert_eq!(
            message_of::<Pair>("[1, 2]"),
            "greet: '[0]' must be a string, got 1"
        );
        // A map has no order to fill: it takes named params only.
        assert_eq!(
            message_of::<HashMap<String, i64>>("[1]"),
            "greet takes an object of named params, got an array"
        );
        // What is not named params takes what it takes.
        assert_eq!(decode::<Vec<i64>>("m", b"[1, 2]").unwrap(), [1, 2]);
        assert_eq!(decode::<(i64, String)>("m", br#"[1, "a"]"#).unwrap().1, "a");
        assert_eq!(
            decode::<serde_json::Value>("m", b"[1]").unwrap(),
            serde_json::json!([1])
        );
        assert_eq!(decode::<String>("m", br#""Ada""#).unwrap(), "Ada");
    }

    #[test]
    fn a_field_of_the_wrong_kind_is_named_in_jsons_words() {
        for (params, want) in [
            (r#"{"name": 5}"#, "greet: 'name' must be a string, got 5"),
            (
                r#"{"name": null}"#,
                "greet: 'name' must be a string, got null",
            ),
            (
                r#"{"name": {"first": "Ada"}}"#,
                "greet: 'name' must be a string, got an object",
            ),
            (
                r#"{"name": ["Ada"]}"#,
                "greet: 'name' must be a string, got an array",
            ),
            (
                r#"{"small": 300}"#,
                "greet: 'small' must be an integer from -128 to 127, got 300",
            ),
            (
                r#"{"count": -1}"#,
                "greet: 'count' must be a non-negative integer, got -1",
            ),
            (
                r#"{"count": 2.5}"#,
                "greet: 'count' must be a non-negative integer, got 2.5",
            ),
            (
                r#"{"ratio": "half"}"#,
                "greet: 'ratio' must be a number, got a string",
            ),
            (
                r#"{"on": "yes"}"#,
                "greet: 'on' must be a boolean, got a string",
            ),
            (
                r#"{"name": "Ada", "items": [{"name": "a"}, {"name": true}]}"#,
                "greet: 'items[1].name' must be a string, got a boolean",
            ),
            (
                r#"{"items": {"name": "a"}}"#,
                "greet: 'items' must be an array, got an object",
            ),
            (
                r#"{"tags": {"a": 1, "b": "two"}}"#,
                "greet: 'tags.b' must be an integer, got a string",
            ),
            (
                "{\n  \"inner\": {\"deep\": [\"x\", 7]}\n}",
                "greet: 'inner.deep[1]' must be a string, got 7",
            ),
            (
                r#"{"inner": "deep"}"#,
                "greet: 'inner' must be an object, got a string",
            ),
        ] {
            assert_eq!(message_of::<Greet>(params), want, "{params}");
        }
        assert_eq!(
            message_of::<Vec<i64>>(r#"[1, "x"]"#),
            "greet: '[1]' must be an integer, got a string"
        );
        assert_eq!(
            message_of::<i64>(r#""x""#),
            "greet takes an integer, got a string"
        );
        assert_eq!(
            message_of::<(i64, i64)>("[1]"),
            "params of greet: invalid length 1, expected an array of 2 items"
        );
        // No Rust type in what serde says otherwise either; what names none is kept.
        assert_eq!(
            message_of::<Inner>("{}"),
            "params of greet: missing field `deep` at line 1 column 2"
        );
    }

    #[test]
    fn value_at_never_quotes_much_of_the_params() {
        let long = format!(r#"{{"{}": "x"}}"#, "k".repeat(500));
        let (path, value) = value_at(long.as_bytes(), long.len() - 1);
        assert!(path.len() < 110 && path.ends_with('…'), "{path}");
        assert_eq!(shown_value(value), "a string");
        assert!(shown_value("9".repeat(300).as_bytes()).len() < 50);
    }
}
