//! The frames of the WebSocket binding (docs/protocol.md, "WebSocket binding";
//! `proto/websocket.schema.json`), without I/O: a message read as a [`Frame`], a call's
//! `request` as the gRPC binding's `CallRequest` (so both bindings run calls alike), and
//! the frames this side sends, as the JSON text of one message each.
//!
//! What a host sends wrong is told back in one short line that never quotes what it sent:
//! a message that is no frame (not UTF-8 JSON, nested deeper than [`MAX_FRAME_DEPTH`],
//! holding what JSON cannot carry both ways, not an object with a string `type`) or a
//! `call`/`stream` without an integer `id` is a [`FrameError`], answered with an `error`
//! frame; a `request` that is no envelope is that call's own `provider_error`.
//!
//! The host announces the largest message it reads (docs/protocol.md, "Message size"):
//! [`announced_cap`] reads the announcement (the upgrade's `LinchKit-Max-Message-Bytes`, on a
//! dispatcher's request or a gateway's 101, the `welcome`'s `max_message_bytes`), and a message over the session's send cap is replaced
//! by what [`response_within`] and [`too_large`] make, or dropped ([`event_over_cap`]).

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;

use crate::params::MAX_PARAMS_DEPTH;
use crate::{pb, types, Error, Json};

/// How deeply a frame may nest: a call's params may nest [`MAX_PARAMS_DEPTH`] levels under
/// the frame's object and its request's.
pub(crate) const MAX_FRAME_DEPTH: usize = MAX_PARAMS_DEPTH + 2;
/// The most of a peer's close reason shown, once escaped: a reason is at most 123 bytes,
/// which escaping may make four times longer.
const SHOWN_REASON_CHARS: usize = 200;
/// The largest message either side takes, inflated (the envelope's 8 MiB), and sends
/// unless the host reads less; the `hello` says it.
pub(crate) const MAX_MESSAGE_BYTES: usize = 8 << 20;
/// The most credit one `credit` frame may grant (a host grants half a window, 128).
const MAX_CREDIT: i64 = 1 << 20;
/// An announced cap below it is taken for a mistake, not obeyed: every control frame and
/// error response must still fit.
const SMALLEST_ANNOUNCED_CAP: u64 = 1024;
/// 2**53: the largest integer every host's JSON reads exactly.
const LARGEST_ANNOUNCED_CAP: u64 = 1 << 53;
/// 2**53 has 16 digits.
const MOST_CAP_DIGITS: usize = 16;

/// A message that is not a frame this side can use, as the `error` frame says it.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct FrameError(pub(crate) String);

/// One frame from the host.
#[derive(Debug)]
pub(crate) enum Frame<'a> {
    /// `call` (`stream: false`) or `stream`: run a method; `request` as it came.
    Call {
        stream: bool,
        id: i64,
        request: Option<&'a RawValue>,
    },
    Cancel(Option<i64>),
    Credit {
        id: Option<i64>,
        n: u32,
    },
    Health(Option<i64>),
    /// A host event; `None` when it names none (ignored).
    Event {
        name: Option<String>,
        data: Option<&'a RawValue>,
    },
    /// The gateway accepted the hello; the cap it announced, when a valid one.
    Welcome(Option<u64>),
    Dropped,
    /// The host could not use a frame of ours: never answered; its `error` as it came.
    Error(Option<&'a RawValue>),
    /// A type this side does not know: its name, cut, and its id when an integer.
    Unknown {
        kind: String,
        id: Option<i64>,
    },
}

#[derive(Deserialize)]
struct RawFrame<'a> {
    #[serde(rename = "type", borrow)]
    kind: Option<&'a RawValue>,
    #[serde(borrow)]
    id: Option<&'a RawValue>,
    #[serde(borrow)]
    request: Option<&'a RawValue>,
    #[serde(borrow)]
    n: Option<&'a RawValue>,
    #[serde(borrow)]
    event: Option<&'a RawValue>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
    #[serde(borrow)]
    max_message_bytes: Option<&'a RawValue>,
    #[serde(borrow)]
    error: Option<&'a RawValue>,
}

/// A JSON integer, exactly: `1.5`, `"7"` and `2**70` are none.
fn integer(value: Option<&RawValue>) -> Option<i64> {
    value.and_then(|raw| serde_json::from_str::<i64>(raw.get()).ok())
}

fn string(value: Option<&RawValue>) -> Option<String> {
    value.and_then(|raw| serde_json::from_str::<String>(raw.get()).ok())
}

/// Reads one message (text or binary alike) as a frame.
pub(crate) fn read_frame(message: &[u8]) -> Result<Frame<'_>, FrameError> {
    if message.iter().all(u8::is_ascii_whitespace) {
        return Err(FrameError("an empty message is not a frame".into()));
    }
    // The rules every transport holds params to, over the whole frame and before serde
    // sees it: it passes 1e400 and "\ud800" through, which the host could not read back.
    if let Some(why) = crate::params::check_nesting(message, MAX_FRAME_DEPTH) {
        return Err(FrameError(format!(
            "a WebSocket message whose contents {why}"
        )));
    }
    let not_a_frame = || FrameError("a frame must be a JSON object with a string 'type'".into());
    let first = message.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'{') {
        return Err(not_a_frame());
    }
    let text = std::str::from_utf8(message).map_err(|_| not_a_frame())?;
    let raw: RawFrame<'_> = serde_json::from_str(text).map_err(|_| not_a_frame())?;
    let kind = string(raw.kind).ok_or_else(not_a_frame)?;
    let id = integer(raw.id);
    Ok(match kind.as_str() {
        "call" | "stream" => match id {
            Some(id) => Frame::Call {
                stream: kind == "stream",
                id,
                request: raw.request,
            },
            None => return Err(FrameError(format!("{kind} needs a new integer id"))),
        },
        "cancel" => Frame::Cancel(id),
        "credit" => match integer(raw.n) {
            Some(n) if (1..=MAX_CREDIT).contains(&n) => Frame::Credit { id, n: n as u32 },
            _ => Frame::Credit { id: None, n: 0 },
        },
        "health" => Frame::Health(id),
        "event" => Frame::Event {
            name: string(raw.event),
            data: raw.data,
        },
        "welcome" => Frame::Welcome(
            raw.max_message_bytes
                .and_then(|cap| announced_cap(cap.get())),
        ),
        "dropped" => Frame::Dropped,
        "error" => Frame::Error(raw.error),
        _ => Frame::Unknown {
            kind: kind.chars().take(40).collect(),
            id,
        },
    })
}

#[derive(Deserialize)]
struct RawRequest<'a> {
    #[serde(borrow)]
    v: Option<&'a RawValue>,
    #[serde(borrow)]
    plugin: Option<&'a RawValue>,
    #[serde(borrow)]
    method: Option<&'a RawValue>,
    #[serde(borrow)]
    params: Option<&'a RawValue>,
    #[serde(borrow)]
    context: Option<&'a RawValue>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawContext {
    request_id: Value,
    deadline_ms: Value,
    caller: Value,
    traceparent: Value,
    idempotency_key: Value,
}

fn text_of(value: Value) -> String {
    match value {
        Value::String(text) => text,
        _ => String::new(),
    }
}

/// A call's `request` envelope as the gRPC binding's `CallRequest`: its params as the JSON
/// text they are (checked with the frame), its version and method for `Shared::prepare`
/// to judge. What is no envelope is the call's own `provider_error`.
pub(crate) fn call_request(request: Option<&RawValue>) -> Result<pb::CallRequest, Error> {
    let not_an_envelope = || {
        Error::new(
            types::PROVIDER_ERROR,
            "the request is not an envelope: a JSON object naming a method",
        )
    };
    let request = request.ok_or_else(not_an_envelope)?;
    if !request.get().starts_with('{') {
        return Err(not_an_envelope());
    }
    let raw: RawRequest<'_> = serde_json::from_str(request.get()).map_err(|_| not_an_envelope())?;
    let method = string(raw.method).ok_or_else(not_an_envelope)?;
    // 0 is the gRPC binding's "unset", version 1; `Shared::prepare` refuses any other.
    let v = match raw.v {
        None => 0,
        Some(v) => serde_json::from_str::<u32>(v.get()).map_err(|_| {
            Error::new(
                types::PROVIDER_ERROR,
                "the envelope's v must be a non-negative integer; this plugin speaks 1",
            )
        })?,
    };
    let context: RawContext = match raw.context {
        Some(context) if context.get().starts_with('{') => {
            serde_json::from_str(context.get()).unwrap_or_default()
        }
        _ => RawContext::default(),
    };
    // Past an i64, a deadline no clock holds: none, as 2^63-1 is.
    let deadline_ms = match &context.deadline_ms {
        Value::Number(n) => n
            .as_i64()
            .or_else(|| n.as_u64().map(|_| i64::MAX))
            .unwrap_or(0),
        _ => 0,
    };
    Ok(pb::CallRequest {
        v,
        plugin: string(raw.plugin).unwrap_or_default(),
        method,
        params_json: raw
            .params
            .map(|p| p.get().as_bytes().to_vec())
            .unwrap_or_default(),
        context: Some(pb::CallContext {
            request_id: text_of(context.request_id),
            deadline_ms,
            caller: text_of(context.caller),
            traceparent: text_of(context.traceparent),
            idempotency_key: text_of(context.idempotency_key),
        }),
    })
}

/// `{"type": "hello", …}`: the first frame on every connection, its lists sorted; with the
/// largest message this side reads, so the host sends no larger call or event.
pub(crate) fn hello(id: &str, version: &str, methods: &[&str], streaming: &[&str]) -> Vec<u8> {
    let mut methods = methods.to_vec();
    methods.sort_unstable();
    let mut streaming = streaming.to_vec();
    streaming.sort_unstable();
    serde_json::json!({
        "type": "hello",
        "protocol": crate::PROTOCOL_VERSION,
        "id": id,
        "version": version,
        "runtime": "rust",
        "methods": methods,
        "streaming": streaming,
        "max_message_bytes": MAX_MESSAGE_BYTES,
    })
    .to_string()
    .into_bytes()
}

/// The error object of the JSON envelope, from the gRPC binding's.
fn error_object(error: &pb::Error) -> Value {
    let mut object = serde_json::Map::new();
    object.insert("type".into(), error.r#type.clone().into());
    object.insert("message".into(), error.message.clone().into());
    object.insert("retryable".into(), error.retryable.into());
    if let Ok(details @ Value::Object(_)) = serde_json::from_slice::<Value>(&error.details_json) {
        object.insert("details".into(), details);
    }
    if error.retry_after > 0.0 && error.retry_after.is_finite() {
        object.insert("retry_after".into(), error.retry_after.into());
    }
    Value::Object(object)
}

/// A call's answer, as a `response` frame carries it: from a [`Json`] result (what the
/// session sends: the SDK knows what its bytes are) or a gRPC `CallReply` (bytes alone).
pub(crate) enum Answer<'a> {
    Result {
        json: &'a [u8],
        /// The bytes are known to fit a frame ([`Json::framable`]): not read again.
        framable: bool,
    },
    Failed(pb::Error),
}

impl<'a> From<&'a Result<Json, Error>> for Answer<'a> {
    fn from(answer: &'a Result<Json, Error>) -> Self {
        match answer {
            Ok(json) => Answer::Result {
                json: json.as_bytes(),
                framable: json.framable(),
            },
            Err(err) => Answer::Failed(err.to_proto()),
        }
    }
}

impl<'a> From<&'a pb::CallReply> for Answer<'a> {
    fn from(reply: &'a pb::CallReply) -> Self {
        if reply.ok {
            Answer::Result {
                json: &reply.result_json,
                framable: false,
            }
        } else {
            Answer::Failed(reply.error.clone().unwrap_or_default())
        }
    }
}

/// `{"type": "response", …}` answering `id` with `answer`. A result JSON cannot carry both
/// ways (not JSON, 1e400, nested past the params' bound) is the call's `provider_error`:
/// sent as it is, it would break the frame, and the host would wait for its deadline.
/// Only a result not known to fit ([`Answer::Result`]'s `framable`) is read for it: one
/// the SDK checked or encoded already costs a copy into the frame, no second look.
pub(crate) fn response<'a>(id: i64, answer: impl Into<Answer<'a>>) -> Vec<u8> {
    match answer.into() {
        Answer::Result { json, framable } => {
            let result: &[u8] = if json.is_empty() { b"null" } else { json };
            let refused = if framable {
                None
            } else {
                crate::params::check(result)
            };
            match refused {
                None => {
                    let mut frame = format!(
                        "{{\"type\":\"response\",\"id\":{id},\"response\":{{\"ok\":true,\"result\":"
                    )
                    .into_bytes();
                    frame.extend_from_slice(result);
                    frame.extend_from_slice(b"}}");
                    frame
                }
                Some(why) => {
                    let failure = Error::new(
                        types::PROVIDER_ERROR,
                        format!("the plugin's result cannot be sent: its contents {why}"),
                    );
                    failed_response(id, &failure.to_proto())
                }
            }
        }
        Answer::Failed(error) => failed_response(id, &error),
    }
}

fn failed_response(id: i64, error: &pb::Error) -> Vec<u8> {
    serde_json::json!({
        "type": "response",
        "id": id,
        "response": {"ok": false, "error": error_object(error)},
    })
    .to_string()
    .into_bytes()
}

/// `{"type": "chunk", …}` carrying `data`, which the caller checked is JSON (or knew it
/// for: `Json::not_framable_because`).
pub(crate) fn chunk(id: i64, data: &[u8]) -> Vec<u8> {
    let mut frame = format!("{{\"type\":\"chunk\",\"id\":{id},\"data\":").into_bytes();
    frame.extend_from_slice(data);
    frame.push(b'}');
    frame
}

/// `{"type": "event", …}`: a plugin event; `data` checked to be JSON by the caller (or
/// known to be: `Json::not_framable_because`).
pub(crate) fn event(name: &str, data: &[u8]) -> Vec<u8> {
    let name = Value::from(name).to_string();
    let data: &[u8] = if data.is_empty() { b"null" } else { data };
    let mut frame = format!("{{\"type\":\"event\",\"event\":{name},\"data\":").into_bytes();
    frame.extend_from_slice(data);
    frame.push(b'}');
    frame
}

/// A cap the host announced, `text` as it came (the header's value, the welcome field's
/// JSON): decimal digits only (no sign, point, exponent, quotes or spaces), at most 16 of
/// them, between 1,024 and 2**53. `None` for anything else, which leaves the SDK's own cap.
pub(crate) fn announced_cap(text: &str) -> Option<u64> {
    if text.is_empty() || text.len() > MOST_CAP_DIGITS || !text.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let cap: u64 = text.parse().ok()?;
    (SMALLEST_ANNOUNCED_CAP..=LARGEST_ANNOUNCED_CAP)
        .contains(&cap)
        .then_some(cap)
}

/// The send cap: the smaller of `own` (the SDK's read cap) and the host's `announced` one.
pub(crate) fn send_cap(own: usize, announced: Option<u64>) -> usize {
    announced
        .and_then(|cap| usize::try_from(cap).ok())
        .map_or(own, |cap| cap.min(own))
}

/// A method's or an event's name as the too-large messages show it: unquoted, what does
/// not print escaped as [`shown_name`](crate::error::shown_name) escapes it, cut to 64 bytes.
fn shown_bare_name(name: &str) -> String {
    let quoted = crate::error::shown_name(name);
    let (quoted, cut) = match quoted.strip_suffix('…') {
        Some(quoted) => (quoted, "…"),
        None => (quoted.as_str(), ""),
    };
    format!("{}{cut}", &quoted[1..quoted.len() - 1])
}

/// The error sent in place of a message of `bytes` over the cap `limit`: `what` is its
/// subject ("the result of", "the error of", "a chunk of"), `method` its method.
pub(crate) fn too_large(what: &str, method: &str, bytes: usize, limit: usize) -> Error {
    Error::new(
        types::PROVIDER_ERROR,
        format!(
            "{what} {} is {bytes} bytes, over the WebSocket message cap of {limit} bytes",
            shown_bare_name(method)
        ),
    )
    .with_details(serde_json::json!({"reason": "too_large", "bytes": bytes, "limit": limit}))
}

/// [`response`], or in its place, when it is over `limit`, that call's [`too_large`] error:
/// the host would close the connection (1009) under every call on it.
pub(crate) fn response_within<'a>(
    id: i64,
    answer: impl Into<Answer<'a>>,
    method: &str,
    limit: usize,
) -> Vec<u8> {
    let answer = answer.into();
    let what = match answer {
        Answer::Result { .. } => "the result of",
        Answer::Failed(_) => "the error of",
    };
    let frame = response(id, answer);
    if frame.len() <= limit {
        return frame;
    }
    failed_response(id, &too_large(what, method, frame.len(), limit).to_proto())
}

/// The line that says an event of `bytes` over `limit` was not sent.
pub(crate) fn event_over_cap(name: &str, bytes: usize, limit: usize) -> String {
    format!(
        "event {} is {bytes} bytes, over the WebSocket message cap of {limit} bytes: not sent",
        shown_bare_name(name)
    )
}

pub(crate) fn health(id: Option<i64>, serving: bool) -> Vec<u8> {
    let status = if serving { "serving" } else { "not_serving" };
    serde_json::json!({"type": "health", "id": id, "status": status, "detail": ""})
        .to_string()
        .into_bytes()
}

pub(crate) fn dropped(count: u64) -> Vec<u8> {
    format!("{{\"type\":\"dropped\",\"count\":{count}}}").into_bytes()
}

pub(crate) fn goaway() -> Vec<u8> {
    b"{\"type\":\"goaway\"}".to_vec()
}

/// `{"type": "error", …}`: a frame this side could not use. The `id` is given only for a
/// frame of an unknown type: an error answering a call in flight would end that call.
pub(crate) fn error(id: Option<i64>, message: &str) -> Vec<u8> {
    let error =
        serde_json::json!({"type": types::PROVIDER_ERROR, "message": message, "retryable": false});
    let frame = match id {
        Some(id) => serde_json::json!({"type": "error", "id": id, "error": error}),
        None => serde_json::json!({"type": "error", "error": error}),
    };
    frame.to_string().into_bytes()
}

/// What an `error` frame's `error` says, for the log: its `message`, an error given as a
/// bare string, or else its JSON text (for [`shown_close_reason`] to make safe to show).
pub(crate) fn error_text(error: Option<&RawValue>) -> String {
    #[derive(Deserialize)]
    struct Said {
        message: Option<String>,
    }
    let Some(raw) = error else {
        return "null".into();
    };
    let text = raw.get().trim_start();
    if text.starts_with('"') {
        if let Ok(bare) = serde_json::from_str::<String>(text) {
            return bare;
        }
    } else if text.starts_with('{') {
        if let Ok(Said {
            message: Some(message),
        }) = serde_json::from_str(text)
        {
            return message;
        }
    }
    raw.get().to_string()
}

/// A close reason the peer sent, as an error or a log line may show it: every character
/// that does not print (ESC, a newline, a bidi override, a byte that is not UTF-8)
/// escaped (`\x1b`, `\n`, `\u202e`), cut to 200 characters. The peer chose those bytes; the
/// operator's terminal must not run them.
pub(crate) fn shown_close_reason(reason: &[u8]) -> String {
    let mut shown = String::new();
    for chunk in reason.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\n' => shown.push_str("\\n"),
                '\r' => shown.push_str("\\r"),
                '\t' => shown.push_str("\\t"),
                c if (c as u32) < 0x100 && (c.is_control()) => {
                    shown.push_str(&format!("\\x{:02x}", c as u32))
                }
                c if !prints(c) => shown.push_str(&format!("\\u{:04x}", c as u32)),
                c => shown.push(c),
            }
        }
        for byte in chunk.invalid() {
            shown.push_str(&format!("\\x{byte:02x}"));
        }
    }
    if shown.chars().count() <= SHOWN_REASON_CHARS {
        return shown;
    }
    let mut cut: String = shown.chars().take(SHOWN_REASON_CHARS).collect();
    cut.push('…');
    cut
}

/// Whether `c` prints as itself: not a control, a format character (bidi overrides and
/// isolates, zero-width ones), a line or paragraph separator, nor a private or unassigned
/// plane's character a terminal may not know.
fn prints(c: char) -> bool {
    let code = c as u32;
    !(c.is_control()
        || matches!(code, 0x00AD | 0x061C | 0x180E | 0x200B..=0x200F | 0x2028..=0x202E)
        || matches!(code, 0x2060..=0x206F | 0xFEFF | 0xFFF9..=0xFFFB | 0xE000..=0xF8FF)
        || code >= 0xF0000)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame_error(message: &[u8]) -> String {
        match read_frame(message) {
            Err(FrameError(message)) => message,
            Ok(frame) => panic!("read {frame:?}"),
        }
    }

    #[test]
    fn frames_are_read_by_type() {
        let call = br#"{"type":"call","id":7,"request":{"v":1,"method":"echo","params":[1]}}"#;
        match read_frame(call).unwrap() {
            Frame::Call {
                stream: false,
                id: 7,
                request: Some(request),
            } => {
                assert_eq!(request.get(), r#"{"v":1,"method":"echo","params":[1]}"#)
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            read_frame(br#"{"type":"stream","id":-3}"#),
            Ok(Frame::Call {
                stream: true,
                id: -3,
                request: None
            })
        ));
        assert!(matches!(
            read_frame(br#"{"type":"cancel","id":987654321}"#),
            Ok(Frame::Cancel(Some(987654321)))
        ));
        assert!(matches!(
            read_frame(br#"{"type":"credit","id":8,"n":128}"#),
            Ok(Frame::Credit {
                id: Some(8),
                n: 128
            })
        ));
        assert!(matches!(
            read_frame(br#"{"type":"credit","id":8,"n":-1}"#),
            Ok(Frame::Credit { id: None, .. })
        ));
        assert!(matches!(
            read_frame(br#"{"type":"health","id":null}"#),
            Ok(Frame::Health(None))
        ));
        assert!(matches!(
            read_frame(br#"{"type":"welcome","instance":"x"}"#),
            Ok(Frame::Welcome(None))
        ));
        assert!(matches!(
            read_frame(br#"{"type":"welcome","instance":"x","max_message_bytes":2048}"#),
            Ok(Frame::Welcome(Some(2048)))
        ));
        match read_frame(br#"{"type":"event","event":"ping","data":{"seq":1}}"#).unwrap() {
            Frame::Event {
                name: Some(name),
                data: Some(data),
            } => {
                assert_eq!((name.as_str(), data.get()), ("ping", r#"{"seq":1}"#))
            }
            other => panic!("{other:?}"),
        }
        match read_frame(format!(r#"{{"type":"{}","id":5}}"#, "z".repeat(100)).as_bytes()).unwrap()
        {
            Frame::Unknown { kind, id: Some(5) } => assert_eq!(kind.len(), 40),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn what_is_no_frame_is_said_in_one_short_line_that_quotes_nothing() {
        let marker = "hostile-marker";
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let cases: Vec<Vec<u8>> = vec![
            b"".to_vec(),
            format!("{{not json {marker}").into_bytes(),
            [b"\xff\xfe\x00".as_slice(), marker.as_bytes()].concat(),
            b"[1, 2]".to_vec(),
            br#"{"id": 3}"#.to_vec(),
            br#"{"type": 7, "id": 3}"#.to_vec(),
            format!(r#"{{"type": "call", "request": "{marker}"}}"#).into_bytes(),
            br#"{"type": "call", "id": "7"}"#.to_vec(),
            br#"{"type": "call", "id": 1.5}"#.to_vec(),
            br#"{"type": "call", "id": 1180591620717411303424}"#.to_vec(),
            br#"{"type": "stream", "id": null}"#.to_vec(),
            deep.into_bytes(),
            format!(
                r#"{{"type":"call","id":1,"request":{{"params":{}{}}}}}"#,
                "[".repeat(251),
                "]".repeat(251)
            )
            .into_bytes(),
            br#"{"type":"call","id":1,"request":{"params":[1e400]}}"#.to_vec(),
            format!(
                r#"{{"type":"call","id":1,"request":{{"params":[{}]}}}}"#,
                "9".repeat(5000)
            )
            .into_bytes(),
            br#"{"type":"call","id":1,"request":{"params":["\ud800"]}}"#.to_vec(),
        ];
        for message in cases {
            let said = frame_error(&message);
            assert!(
                said.len() <= 200 && !said.contains('\n') && !said.contains(marker),
                "{said}"
            );
        }
        // 250 levels of params pass.
        let params = format!("{}{}", "[".repeat(250), "]".repeat(250));
        let deepest =
            format!(r#"{{"type":"call","id":1,"request":{{"method":"echo","params":{params}}}}}"#);
        assert!(read_frame(deepest.as_bytes()).is_ok());
    }

    #[test]
    fn a_request_becomes_the_grpc_bindings_call() {
        let raw = RawValue::from_string(
            r#"{"v":1,"plugin":"example","method":"sleep","params":{"ms":5},
                "context":{"request_id":"r1","deadline_ms":1500,"caller":"alice",
                           "traceparent":"00-x","idempotency_key":"k"}}"#
                .to_string(),
        )
        .unwrap();
        let call = call_request(Some(&raw)).unwrap();
        assert_eq!(
            (call.v, call.method.as_str(), call.plugin.as_str()),
            (1, "sleep", "example")
        );
        assert_eq!(call.params_json, br#"{"ms":5}"#);
        let context = call.context.unwrap();
        assert_eq!(context.deadline_ms, 1500);
        assert_eq!(
            (context.request_id.as_str(), context.caller.as_str()),
            ("r1", "alice")
        );
        for (deadline, read) in [
            ("9223372036854775807", i64::MAX),
            ("-1", -1),
            ("18446744073709551615", i64::MAX),
            ("1.5", 0),
        ] {
            let raw = RawValue::from_string(format!(
                r#"{{"method":"m","context":{{"deadline_ms":{deadline}}}}}"#
            ))
            .unwrap();
            assert_eq!(
                call_request(Some(&raw))
                    .unwrap()
                    .context
                    .unwrap()
                    .deadline_ms,
                read
            );
        }
        for wrong in [
            r#"["hostile-marker"]"#,
            r#"{"params":1}"#,
            r#"{"method":5}"#,
            r#""echo""#,
            r#"{"method":"m","v":"1"}"#,
        ] {
            let raw = RawValue::from_string(wrong.to_string()).unwrap();
            let error = call_request(Some(&raw)).unwrap_err();
            assert_eq!(error.error_type, "provider_error");
            assert!(!error.message.contains("hostile-marker"));
        }
        assert!(call_request(None).is_err());
    }

    #[test]
    fn answers_are_json_of_the_envelope() {
        let ok = pb::CallReply {
            ok: true,
            result_json: br#"{"x":1}"#.to_vec(),
            error: None,
        };
        let frame: Value = serde_json::from_slice(&response(7, &ok)).unwrap();
        assert_eq!(
            frame,
            serde_json::json!({"type": "response", "id": 7, "response": {"ok": true, "result": {"x": 1}}})
        );
        let empty = pb::CallReply {
            ok: true,
            result_json: Vec::new(),
            error: None,
        };
        let frame: Value = serde_json::from_slice(&response(8, &empty)).unwrap();
        assert_eq!(frame["response"]["result"], Value::Null);
        let failed = pb::CallReply {
            ok: false,
            result_json: Vec::new(),
            error: Some(
                Error::new("Overdrawn", "balance is 100")
                    .retryable(true)
                    .with_details(serde_json::json!({"balance": 100}))
                    .with_retry_after(1.5)
                    .to_proto(),
            ),
        };
        let frame: Value = serde_json::from_slice(&response(9, &failed)).unwrap();
        assert_eq!(
            frame["response"],
            serde_json::json!({"ok": false, "error": {"type": "Overdrawn", "message": "balance is 100", "retryable": true, "details": {"balance": 100}, "retry_after": 1.5}})
        );
        // A result the host could not read back is the call's error, in a frame it can.
        let broken = pb::CallReply {
            ok: true,
            result_json: b"[1e400]".to_vec(),
            error: None,
        };
        let frame: Value = serde_json::from_slice(&response(10, &broken)).unwrap();
        assert_eq!(frame["response"]["error"]["type"], "provider_error");
        let event: Value = serde_json::from_slice(&event("a \"name\"\n", b"")).unwrap();
        assert_eq!(
            event,
            serde_json::json!({"type": "event", "event": "a \"name\"\n", "data": null})
        );
        let chunk: Value = serde_json::from_slice(&chunk(3, br#"{"i":0}"#)).unwrap();
        assert_eq!(
            chunk,
            serde_json::json!({"type": "chunk", "id": 3, "data": {"i": 0}})
        );
        let hello: Value =
            serde_json::from_slice(&hello("example", "1.0.0", &["b", "a"], &["b"])).unwrap();
        assert_eq!(hello["methods"], serde_json::json!(["a", "b"]));
        assert_eq!(
            (hello["protocol"].as_i64(), hello["runtime"].as_str()),
            (Some(1), Some("rust"))
        );
        assert_eq!(
            hello["max_message_bytes"],
            8 << 20,
            "the largest message this side reads"
        );
        let error: Value = serde_json::from_slice(&error(None, "x")).unwrap();
        assert!(error.get("id").is_none());
        for frame in [health(Some(4), true), dropped(3), goaway()] {
            serde_json::from_slice::<Value>(&frame).unwrap();
        }
    }

    #[test]
    fn a_close_reason_is_shown_escaped_and_cut() {
        assert_eq!(
            shown_close_reason("\x1b[2J\nERROR forged line \u{202e}".as_bytes()),
            "\\x1b[2J\\nERROR forged line \\u202e"
        );
        assert_eq!(
            shown_close_reason(&[0x1b; 123]),
            format!("{}…", "\\x1b".repeat(50))
        );
        assert_eq!(
            shown_close_reason(b"admitted as version 2.0.0, said '1.0.0'"),
            "admitted as version 2.0.0, said '1.0.0'"
        );
        assert_eq!(shown_close_reason(b"bad \xff byte"), "bad \\xff byte");
        assert_eq!(shown_close_reason("déjà vu".as_bytes()), "déjà vu");
    }

    #[test]
    fn an_error_frames_text_is_its_message_or_else_what_it_is() {
        let text = |frame: &str| match read_frame(frame.as_bytes()) {
            Ok(Frame::Error(error)) => error_text(error),
            other => panic!("{frame}: {other:?}"),
        };
        let cases = [
            (
                r#"{"type":"error","error":{"type":"provider_error","message":"unknown frame type"}}"#,
                "unknown frame type",
            ),
            (
                r#"{"type":"error","error": "frame 7 went astray"}"#,
                "frame 7 went astray",
            ),
            (
                r#"{"type":"error","error":{"message":7}}"#,
                r#"{"message":7}"#,
            ),
            (r#"{"type":"error","error":["x"]}"#, r#"["x"]"#),
            (r#"{"type":"error","error":null}"#, "null"),
            (r#"{"type":"error"}"#, "null"),
        ];
        for (frame, said) in cases {
            assert_eq!(text(frame), said, "{frame}");
        }
    }

    #[test]
    fn an_announced_cap_is_decimal_digits_from_1024_to_2_pow_53() {
        for (text, cap) in [
            ("1024", 1024),
            ("2048", 2048),
            ("0000001024", 1024),
            ("9007199254740992", 1 << 53),
        ] {
            assert_eq!(announced_cap(text), Some(cap), "{text}");
        }
        for text in [
            "",
            "abc",
            "-5",
            "+2048",
            "1e6",
            "12.5",
            " 2048",
            "\"2048\"",
            "100",
            "1023",
            "0",
            "9007199254740993",
            "99999999999999999",
            "00000000000002048",
            "null",
            "true",
            "[2048]",
            "２０４８",
        ] {
            assert_eq!(announced_cap(text), None, "{text:?} is no cap");
        }
        let own = 8 << 20;
        assert_eq!(send_cap(own, None), own, "nothing announced: the SDK's own");
        assert_eq!(send_cap(own, Some(2048)), 2048);
        assert_eq!(
            send_cap(own, Some(1 << 53)),
            own,
            "never above the SDK's own"
        );
    }

    #[test]
    fn a_welcome_s_cap_is_taken_only_when_valid() {
        let welcome = |cap: &str| match read_frame(
            format!(r#"{{"type":"welcome","instance":"x","max_message_bytes":{cap}}}"#).as_bytes(),
        ) {
            Ok(Frame::Welcome(announced)) => announced,
            other => panic!("{other:?}"),
        };
        assert_eq!(welcome("2048"), Some(2048));
        for cap in [
            "\"2048\"",
            "12.5",
            "-1",
            "1e6",
            "100",
            "true",
            "null",
            "[2048]",
            "1152921504606846976",
            "2048.0",
        ] {
            assert_eq!(welcome(cap), None, "{cap}");
        }
    }

    #[test]
    fn an_answer_over_the_cap_is_that_call_s_too_large_error() {
        let ok = pb::CallReply {
            ok: true,
            result_json: format!("\"{}\"", "x".repeat(3000)).into_bytes(),
            error: None,
        };
        let under = response_within(7, &ok, "config", 8 << 20);
        assert_eq!(
            under,
            response(7, &ok),
            "under the cap: as before, byte for byte"
        );
        let replaced: Value =
            serde_json::from_slice(&response_within(7, &ok, "config", 2048)).unwrap();
        assert_eq!(
            replaced,
            serde_json::json!({"type": "response", "id": 7, "response": {"ok": false, "error": {
                "type": "provider_error",
                "message": format!("the result of config is {} bytes, over the WebSocket message cap of 2048 bytes", under.len()),
                "retryable": false,
                "details": {"reason": "too_large", "bytes": under.len(), "limit": 2048},
            }}})
        );
        let failed = pb::CallReply {
            ok: false,
            result_json: Vec::new(),
            error: Some(Error::new("Overdrawn", "x".repeat(3000)).to_proto()),
        };
        let replaced: Value =
            serde_json::from_slice(&response_within(8, &failed, "pay\n\"now\"", 2048)).unwrap();
        let message = replaced["response"]["error"]["message"].as_str().unwrap();
        assert!(
            message.starts_with(r#"the error of pay\n\"now\" is "#),
            "{message}"
        );
        let long = too_large("a chunk of", &"m".repeat(100), 5000, 2048).message;
        assert!(
            long.starts_with(&format!("a chunk of {}… is 5000 bytes", "m".repeat(64))),
            "{long}"
        );
        assert_eq!(
            event_over_cap("large", 40_000, 32_768),
            "event large is 40000 bytes, over the WebSocket message cap of 32768 bytes: not sent"
        );
    }
}
