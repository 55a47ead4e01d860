//! What params every SDK can hold: the checks a call's params pass before any method sees
//! them (docs/protocol.md, "gRPC binding").

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
    if std::str::from_utf8(raw).is_err() {
        return Some("are not UTF-8".into());
    }
    let mut depth = 0usize;
    let mut i = 0;
    while i < raw.len() {
        match raw[i] {
            b'"' => match scan_string(raw, i + 1) {
                Ok(end) => i = end,
                Err(why) => return Some(why.into()),
            },
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_PARAMS_DEPTH {
                    return Some(format!("are nested deeper than {MAX_PARAMS_DEPTH} levels"));
                }
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
                        return Some("hold a number beyond the range of a double".into());
                    }
                }
                i = end - 1;
            }
            _ => {}
        }
        i += 1;
    }
    if serde_json::from_slice::<serde::de::IgnoredAny>(raw).is_err() {
        return Some("are not valid JSON".into());
    }
    None
}

/// Reads a JSON string from `raw[i]` (after its opening quote) to its closing quote.
fn scan_string(raw: &[u8], mut i: usize) -> Result<usize, &'static str> {
    const LONE: &str = "hold a lone surrogate escape (\\ud800-\\udfff), which names no character";
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

/// A caller's method name as an error message shows it: quoted (a NUL or a newline
/// escaped) and cut to 64 bytes, so a 10,000-character name is not sent back whole.
pub fn shown_name(name: &str) -> String {
    if name.len() <= 64 {
        return format!("{name:?}");
    }
    let mut cut = 64;
    while !name.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{:?}…", &name[..cut])
}

#[cfg(test)]
mod tests {
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

    #[test]
    fn a_long_name_is_cut() {
        assert!(shown_name(&"é".repeat(10_000)).len() < 80);
        assert_eq!(shown_name("a\0\nb"), r#""a\0\nb""#);
    }
}
