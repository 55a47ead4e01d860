//! Continues the dispatcher's trace inside the plugin (docs/observability.md, "Rust plugins").
//!
//! The dispatcher sends each attempt's W3C `traceparent` in the call's context. When the
//! plugin's environment names an OTLP endpoint (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, else
//! `OTEL_EXPORTER_OTLP_ENDPOINT` + `/v1/traces`), each call runs inside a SERVER span
//! `linchkit.plugin/<method>`, child of the attempt span, with the attributes the Go,
//! TypeScript and Python SDKs give it (`linchkit.method`, `.plugin`, `.request_id`,
//! `.outcome`; `error.type` and an error status on failure), sent in batches over OTLP/HTTP
//! by [`crate::otlp`]. The method reads the span's own `traceparent` from
//! [`Call::span_traceparent`](crate::Call::span_traceparent), so the spans and requests it
//! starts continue the trace under it.
//!
//! Without those variables nothing is set up: a call pays one `Option` check. A missing or
//! malformed `traceparent` starts a new trace, never fails the call (the W3C rule is to
//! ignore what cannot be parsed). Which calls record a span is `OTEL_TRACES_SAMPLER`'s
//! (and `_ARG`'s) to say, as in the other SDKs ([`crate::sampler`]); by default the
//! parent's flag decides (`parentbased_always_on`): a call whose dispatcher did not sample
//! it records no span, a call without a parent does. An unsampled call's own
//! `traceparent` has the flag unset, so what the method starts is not sampled either.
//!
//! At a stop the spans still buffered are sent after the hooks, for what remains of the
//! hooks' cap or [`SPAN_FLUSH_MARGIN`] when less remains, then dropped with one warning that
//! names the collector by scheme, host and port only (docs/protocol.md, "Stopping while
//! called").

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rustls::crypto::SecureRandom;

use crate::otlp::{self, Pipeline, ENV_OTLP_ENDPOINT, ENV_OTLP_TRACES_ENDPOINT};
use crate::sampler::Sampler;
use crate::{Call, Error};

const ENV_SERVICE_NAME: &str = "OTEL_SERVICE_NAME";
const ENV_SDK_DISABLED: &str = "OTEL_SDK_DISABLED";

/// The least a stop gives the spans still buffered, after its hooks: they get what remains
/// of the hooks' cap, or this when less remains, so a whole stop ends within grace + hooks +
/// this margin whatever the collector does (1 s, as in every SDK that traces).
pub(crate) const SPAN_FLUSH_MARGIN: Duration = Duration::from_secs(1);

/// A W3C traceparent is 55 characters (version 00); a later version may add fields, but
/// anything far longer is not one, and parsing it would only cost.
const MAX_TRACEPARENT: usize = 512;
/// How much of the request id and of an error's message a span keeps, in bytes.
const MAX_REQUEST_ID: usize = 128;
const MAX_STATUS_MESSAGE: usize = 512;

/// The outcome of a call whose host stopped waiting for it (a cancelled RPC, a stream the
/// host stopped reading, a call cut off at the end of a stop's grace).
const CANCELLED: &str = "cancelled";

/// The W3C trace context of one span: its trace, its id and its trace flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SpanContext {
    pub(crate) trace_id: [u8; 16],
    pub(crate) span_id: [u8; 8],
    pub(crate) flags: u8,
}

impl SpanContext {
    const SAMPLED: u8 = 0x01;

    fn sampled(&self) -> bool {
        self.flags & Self::SAMPLED != 0
    }

    /// The `traceparent` header that names this span as the parent.
    pub(crate) fn traceparent(&self) -> String {
        format!(
            "00-{}-{}-{:02x}",
            hex(&self.trace_id),
            hex(&self.span_id),
            self.flags
        )
    }
}

/// A `traceparent` header's span context (https://www.w3.org/TR/trace-context/), or `None`
/// when it is not a valid one: a version other than two lowercase hex digits, `ff`, a
/// trace or parent id that is not lowercase hex of its length or is all zeros, flags that
/// are not two hex digits, or version 00 with anything after the flags. A later version
/// is read by version 00's fields when a `-` follows them, as the W3C asks.
pub(crate) fn parse_traceparent(text: &str) -> Option<SpanContext> {
    if text.len() > MAX_TRACEPARENT || text.len() < 55 || !text.is_ascii() {
        return None;
    }
    let bytes = text.as_bytes();
    let version = from_hex::<1>(&text[0..2])?[0];
    let dashes = [2, 35, 52].iter().all(|&at| bytes[at] == b'-');
    if version == 0xff || !dashes {
        return None;
    }
    if (version == 0 && text.len() != 55) || (text.len() > 55 && bytes[55] != b'-') {
        return None;
    }
    let trace_id = from_hex::<16>(&text[3..35])?;
    let span_id = from_hex::<8>(&text[36..52])?;
    let flags = from_hex::<1>(&text[53..55])?[0];
    if trace_id == [0; 16] || span_id == [0; 8] {
        return None;
    }
    Some(SpanContext {
        trace_id,
        span_id,
        flags,
    })
}

/// `N` bytes from `2 * N` lowercase hex digits (W3C: uppercase is invalid).
fn from_hex<const N: usize>(text: &str) -> Option<[u8; N]> {
    let digits = text.as_bytes();
    if digits.len() != 2 * N {
        return None;
    }
    let digit = |d: u8| match d {
        b'0'..=b'9' => Some(d - b'0'),
        b'a'..=b'f' => Some(d - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; N];
    for (i, pair) in digits.chunks_exact(2).enumerate() {
        out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Random bytes for trace and span ids, from the system (ring, which rustls already uses);
/// all zeros is no id, so that is drawn again.
fn random_id<const N: usize>() -> [u8; N] {
    static RANDOM: OnceLock<&'static dyn SecureRandom> = OnceLock::new();
    let random = RANDOM.get_or_init(|| rustls::crypto::ring::default_provider().secure_random);
    let mut id = [0u8; N];
    while id == [0; N] {
        // A system that cannot give random bytes leaves the id zero and is asked again;
        // such a system cannot run the plugin's TLS either.
        let _ = random.fill(&mut id);
    }
    id
}

/// The OTLP traces URL the environment names, or `None`: the signal's own variable as it
/// is (as the OpenTelemetry spec says), else the general one with `/v1/traces`; none when
/// `OTEL_SDK_DISABLED` is `true`.
pub(crate) fn traces_endpoint<'a>(var: impl Fn(&str) -> &'a str) -> Option<String> {
    if var(ENV_SDK_DISABLED).trim().eq_ignore_ascii_case("true") {
        return None;
    }
    let traces = var(ENV_OTLP_TRACES_ENDPOINT).trim();
    if !traces.is_empty() {
        return Some(traces.to_string());
    }
    let base = var(ENV_OTLP_ENDPOINT).trim();
    (!base.is_empty()).then(|| format!("{}/v1/traces", base.trim_end_matches('/')))
}

/// The plugin's tracer: what its spans are named by, and the pipeline that sends them.
/// Cheap to clone.
#[derive(Clone)]
pub(crate) struct Tracer(Arc<Inner>);

struct Inner {
    plugin: String,
    sampler: Sampler,
    pipeline: Pipeline,
}

impl Tracer {
    /// The tracer the environment asks for: `Ok(None)` without an endpoint (tracing off),
    /// `Err` when the settings cannot be used (the message names the variable, never its
    /// value: a URL may hold a password). Must run inside the Tokio runtime that serves.
    pub(crate) fn from_vars<'a>(
        var: impl Fn(&str) -> &'a str,
        plugin: &str,
        version: &str,
    ) -> Result<Option<Tracer>, String> {
        let Some(endpoint) = traces_endpoint(&var) else {
            return Ok(None);
        };
        let settings = otlp::Settings::from_vars(&endpoint, &var)?;
        let (sampler, warning) = Sampler::from_vars(&var);
        if let Some(warning) = warning {
            crate::log::warn(&warning);
        }
        let service = match var(ENV_SERVICE_NAME).trim() {
            "" => plugin,
            name => name,
        };
        let resource = otlp::resource(&var, service, version);
        let pipeline = Pipeline::start(settings, resource)?;
        Ok(Some(Tracer(Arc::new(Inner {
            plugin: plugin.to_string(),
            sampler,
            pipeline,
        }))))
    }

    /// Opens the span of `call`, continuing its `traceparent` when that is a valid one (a
    /// root of a new trace otherwise), and gives the call the span's own traceparent.
    pub(crate) fn start(&self, call: &mut Call) -> CallSpan {
        let parent = Some(call.traceparent.as_str())
            .filter(|text| !text.is_empty())
            .and_then(parse_traceparent);
        let trace_id = parent.map_or_else(random_id, |p| p.trace_id);
        let sampled = self
            .0
            .sampler
            .sampled(parent.map(|p| p.sampled()), &trace_id);
        // The parent's other flags as they were; the sampled one as decided here.
        let flags = parent.map_or(0, |p| p.flags & !SpanContext::SAMPLED);
        let context = SpanContext {
            trace_id,
            span_id: random_id(),
            flags: if sampled {
                flags | SpanContext::SAMPLED
            } else {
                flags
            },
        };
        call.span_traceparent = Some(context.traceparent());
        let mut attributes = vec![
            otlp::attribute("linchkit.method", &call.method),
            otlp::attribute("linchkit.plugin", &self.0.plugin),
        ];
        if !call.request_id.is_empty() {
            attributes.push(otlp::attribute(
                "linchkit.request_id",
                truncated(&call.request_id, MAX_REQUEST_ID),
            ));
        }
        CallSpan {
            tracer: context.sampled().then(|| self.clone()),
            context,
            parent: parent.map(|p| p.span_id),
            name: format!("linchkit.plugin/{}", call.method),
            started: SystemTime::now(),
            began: Instant::now(),
            attributes,
        }
    }

    /// Sends the spans still buffered, after the stop's hooks: for what remains of the
    /// hooks' cap, or [`SPAN_FLUSH_MARGIN`] when less remains. Spans the collector has not
    /// taken by then are dropped, with one warning naming it by scheme, host and port.
    pub(crate) async fn flush_at_stop(&self, hooks_left: Duration) {
        self.0
            .pipeline
            .flush_within(hooks_left.max(SPAN_FLUSH_MARGIN))
            .await;
    }
}

#[cfg(test)]
impl Tracer {
    /// A tracer whose spans stay in the returned queue, for tests of what a span holds.
    pub(crate) fn capturing(plugin: &str) -> (Tracer, tokio::sync::mpsc::Receiver<otlp::Span>) {
        Tracer::sampling(plugin, Sampler::default())
    }

    /// [`Tracer::capturing`], its calls sampled by `sampler`.
    pub(crate) fn sampling(
        plugin: &str,
        sampler: Sampler,
    ) -> (Tracer, tokio::sync::mpsc::Receiver<otlp::Span>) {
        let (pipeline, spans) = Pipeline::capturing();
        let tracer = Tracer(Arc::new(Inner {
            plugin: plugin.to_string(),
            sampler,
            pipeline,
        }));
        (tracer, spans)
    }
}

/// The span one call runs in, from [`Tracer::start`]: [`end`](CallSpan::end) it with the
/// call's outcome. One dropped without being ended is of a call its host stopped waiting
/// for, and ends as `cancelled`.
pub(crate) struct CallSpan {
    /// `None` when the span is not sampled (nothing to send) or was ended.
    tracer: Option<Tracer>,
    context: SpanContext,
    parent: Option<[u8; 8]>,
    name: String,
    started: SystemTime,
    began: Instant,
    attributes: Vec<otlp::KeyValue>,
}

impl CallSpan {
    /// Records how the call ended (`ok`, or the error's type as `linchkit.outcome` and
    /// `error.type`, with an error status carrying its message) and queues the span.
    pub(crate) fn end(mut self, failure: Option<&Error>) {
        match failure {
            None => self.finish("ok", None),
            Some(err) => self.finish(&err.error_type, Some(&err.message)),
        }
    }

    fn finish(&mut self, outcome: &str, failure: Option<&str>) {
        let Some(tracer) = self.tracer.take() else {
            return;
        };
        let mut attributes = std::mem::take(&mut self.attributes);
        attributes.push(otlp::attribute("linchkit.outcome", outcome));
        let status = failure.map(|message| {
            attributes.push(otlp::attribute("error.type", outcome));
            otlp::Status::error(truncated(message, MAX_STATUS_MESSAGE))
        });
        let start = unix_nanos(self.started);
        let span = otlp::Span {
            trace_id: self.context.trace_id.to_vec(),
            span_id: self.context.span_id.to_vec(),
            parent_span_id: self.parent.map(|id| id.to_vec()).unwrap_or_default(),
            flags: otlp::span_flags(self.context.flags, self.parent.is_some()),
            name: std::mem::take(&mut self.name),
            kind: otlp::SPAN_KIND_SERVER,
            start_time_unix_nano: start,
            end_time_unix_nano: start.saturating_add(self.began.elapsed().as_nanos() as u64),
            attributes,
            status,
        };
        tracer.0.pipeline.send(span);
    }
}

impl Drop for CallSpan {
    fn drop(&mut self) {
        // Not ended: the future running the call was dropped, its host gone.
        self.finish(CANCELLED, Some("the host stopped waiting for the call"));
    }
}

fn unix_nanos(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_nanos() as u64)
}

/// `text` cut to at most `limit` bytes, at a character's boundary.
fn truncated(text: &str, limit: usize) -> &str {
    if text.len() <= limit {
        return text;
    }
    let mut end = limit;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const SPAN: &str = "00f067aa0ba902b7";

    #[test]
    fn a_valid_traceparent_is_read() {
        let context = parse_traceparent(&format!("00-{TRACE}-{SPAN}-01")).unwrap();
        assert_eq!(hex(&context.trace_id), TRACE);
        assert_eq!(hex(&context.span_id), SPAN);
        assert!(context.sampled());
        let unsampled = parse_traceparent(&format!("00-{TRACE}-{SPAN}-00")).unwrap();
        assert!(!unsampled.sampled());
        assert_eq!(unsampled.traceparent(), format!("00-{TRACE}-{SPAN}-00"));
    }

    #[test]
    fn a_later_version_is_read_by_version_00s_fields() {
        let context = parse_traceparent(&format!("cc-{TRACE}-{SPAN}-01-what-comes-next"));
        assert_eq!(context.map(|c| hex(&c.span_id)), Some(SPAN.to_string()));
        assert!(parse_traceparent(&format!("cc-{TRACE}-{SPAN}-01")).is_some());
    }

    #[test]
    fn a_malformed_traceparent_is_none() {
        let zeros_trace = format!("00-{}-{SPAN}-01", "0".repeat(32));
        let zeros_span = format!("00-{TRACE}-{}-01", "0".repeat(16));
        for text in [
            "",
            "garbage",
            &format!("00-{TRACE}-{SPAN}"),          // no flags
            &format!("00-{TRACE}-{SPAN}-01-extra"), // version 00 has no more fields
            &format!("cc-{TRACE}-{SPAN}-01x"),      // a later version, no dash after
            &format!("ff-{TRACE}-{SPAN}-01"),       // ff is no version
            &format!("00-{}-{SPAN}-01", TRACE.to_uppercase()),
            &format!("00-{TRACE}-{SPAN}-0g"),
            &format!("00_{TRACE}_{SPAN}_01"),
            &format!("0-{TRACE}0-{SPAN}-01"),
            &zeros_trace,
            &zeros_span,
            &format!("00-{TRACE}-{SPAN}-é"),
            &"x".repeat(100_000),
            &format!("cc-{TRACE}-{SPAN}-01-{}", "x".repeat(1_000)),
        ] {
            assert_eq!(parse_traceparent(text), None, "{text:.80}");
        }
    }

    fn endpoint(vars: &[(&str, &str)]) -> Option<String> {
        let vars: HashMap<&str, &str> = vars.iter().copied().collect();
        traces_endpoint(|name| vars.get(name).copied().unwrap_or(""))
    }

    #[test]
    fn the_traces_endpoint_comes_from_the_standard_variables() {
        assert_eq!(
            endpoint(&[(ENV_OTLP_ENDPOINT, "http://collector:4318/")]),
            Some("http://collector:4318/v1/traces".to_string())
        );
        assert_eq!(
            endpoint(&[
                (ENV_OTLP_ENDPOINT, "http://a:4318"),
                (ENV_OTLP_TRACES_ENDPOINT, "http://b:9/traces")
            ]),
            Some("http://b:9/traces".to_string())
        );
        assert_eq!(endpoint(&[]), None);
        assert_eq!(
            endpoint(&[
                (ENV_OTLP_ENDPOINT, "http://a:4318"),
                (ENV_SDK_DISABLED, "TRUE")
            ]),
            None
        );
    }

    #[tokio::test]
    async fn without_an_endpoint_there_is_no_tracer() {
        let vars: HashMap<&str, &str> = [(ENV_SERVICE_NAME, "x")].into_iter().collect();
        let tracer = Tracer::from_vars(|n| vars.get(n).copied().unwrap_or(""), "p", "1");
        assert!(matches!(tracer, Ok(None)));
    }

    #[test]
    fn ids_are_random_and_never_zero() {
        let (a, b) = (random_id::<8>(), random_id::<8>());
        assert_ne!(a, [0; 8]);
        assert_ne!(a, b);
    }

    fn capturing() -> (Tracer, tokio::sync::mpsc::Receiver<otlp::Span>) {
        Tracer::capturing("test")
    }

    fn call(method: &str, traceparent: &str) -> Call {
        Call {
            method: method.to_string(),
            request_id: "r1".to_string(),
            caller: String::new(),
            traceparent: traceparent.to_string(),
            idempotency_key: String::new(),
            deadline: None,
            span_traceparent: None,
            params: crate::Json::raw("null"),
            config: Arc::new(crate::Json::raw("{}")),
            emitter: crate::Emitter::default(),
        }
    }

    fn attributes(span: &otlp::Span) -> HashMap<&str, &str> {
        span.attributes
            .iter()
            .map(|kv| match &kv.value.as_ref().unwrap().value {
                Some(otlp::any_value::Value::StringValue(value)) => {
                    (kv.key.as_str(), value.as_str())
                }
                None => (kv.key.as_str(), ""),
            })
            .collect()
    }

    #[tokio::test]
    async fn a_call_continues_the_dispatchers_trace() {
        let (tracer, mut spans) = capturing();
        let mut call = call("sees", &format!("00-{TRACE}-{SPAN}-01"));
        let span = tracer.start(&mut call);
        span.end(None);
        let span = spans.try_recv().unwrap();
        assert_eq!(span.name, "linchkit.plugin/sees");
        assert_eq!(span.kind, otlp::SPAN_KIND_SERVER);
        assert_eq!(hex(&span.trace_id), TRACE);
        assert_eq!(hex(&span.parent_span_id), SPAN);
        assert_eq!(span.flags, 0x301, "sampled, its parent remote");
        assert!(span.end_time_unix_nano >= span.start_time_unix_nano);
        assert!(span.status.is_none());
        let expected: HashMap<&str, &str> = [
            ("linchkit.method", "sees"),
            ("linchkit.plugin", "test"),
            ("linchkit.request_id", "r1"),
            ("linchkit.outcome", "ok"),
        ]
        .into_iter()
        .collect();
        assert_eq!(attributes(&span), expected);
        // The method sees the call's own span as the parent of what it starts.
        let own = parse_traceparent(call.span_traceparent().unwrap()).unwrap();
        assert_eq!(
            (own.trace_id.to_vec(), own.span_id.to_vec()),
            (span.trace_id, span.span_id)
        );
    }

    #[tokio::test]
    async fn a_failed_call_records_its_error_type() {
        let (tracer, mut spans) = capturing();
        let failure = Error::new("Overdrawn", format!("{}é", "x".repeat(511)));
        tracer.start(&mut call("typed", "")).end(Some(&failure));
        let span = spans.try_recv().unwrap();
        let found = attributes(&span);
        assert_eq!(found["linchkit.outcome"], "Overdrawn");
        assert_eq!(found["error.type"], "Overdrawn");
        let status = span.status.unwrap();
        assert_eq!(status.code, 2);
        assert_eq!(
            status.message,
            "x".repeat(511),
            "cut before the character it would split"
        );
    }

    #[tokio::test]
    async fn a_malformed_traceparent_starts_a_new_trace() {
        let (tracer, mut spans) = capturing();
        let zeros = format!("00-{}-{SPAN}-01", "0".repeat(32));
        let long = "x".repeat(100_000);
        for traceparent in ["garbage", zeros.as_str(), long.as_str(), ""] {
            tracer.start(&mut call("echo", traceparent)).end(None);
            let span = spans.try_recv().unwrap();
            assert!(span.parent_span_id.is_empty(), "{traceparent:.20}");
            assert_ne!(span.trace_id, vec![0; 16]);
            assert_ne!(hex(&span.trace_id), TRACE);
            assert_eq!(span.flags, 0x101, "a sampled root");
        }
    }

    #[tokio::test]
    async fn an_unsampled_parent_records_no_span() {
        let (tracer, mut spans) = capturing();
        let mut call = call("echo", &format!("00-{TRACE}-{SPAN}-00"));
        tracer.start(&mut call).end(None);
        assert!(spans.try_recv().is_err());
        let own = parse_traceparent(call.span_traceparent().unwrap()).unwrap();
        assert_eq!((hex(&own.trace_id), own.flags), (TRACE.to_string(), 0));
    }

    fn sampler(name: &str) -> Sampler {
        let (sampler, warning) = Sampler::from_vars(|var| match var {
            crate::sampler::ENV_SAMPLER => name,
            _ => "",
        });
        assert_eq!(warning, None);
        sampler
    }

    #[tokio::test]
    async fn the_sampler_decides_and_the_calls_own_traceparent_says_so() {
        let (tracer, mut spans) = Tracer::sampling("test", sampler("always_off"));
        let mut sampled_parent = call("echo", &format!("00-{TRACE}-{SPAN}-01"));
        tracer.start(&mut sampled_parent).end(None);
        assert!(
            spans.try_recv().is_err(),
            "always_off: no span, whatever the parent"
        );
        let own = parse_traceparent(sampled_parent.span_traceparent().unwrap()).unwrap();
        assert_eq!((hex(&own.trace_id), own.flags), (TRACE.to_string(), 0));

        let (tracer, mut spans) = Tracer::sampling("test", sampler("always_on"));
        let mut unsampled_parent = call("echo", &format!("00-{TRACE}-{SPAN}-00"));
        tracer.start(&mut unsampled_parent).end(None);
        let span = spans
            .try_recv()
            .expect("always_on: a span, whatever the parent");
        assert_eq!(span.flags, 0x301, "sampled, its parent remote");
        assert_eq!(hex(&span.parent_span_id), SPAN);
        let own = parse_traceparent(unsampled_parent.span_traceparent().unwrap()).unwrap();
        assert_eq!(own.flags, 1);

        let (tracer, mut spans) = Tracer::sampling("test", sampler("parentbased_always_off"));
        tracer.start(&mut call("echo", "")).end(None);
        assert!(
            spans.try_recv().is_err(),
            "parentbased_always_off: no root span"
        );
        tracer
            .start(&mut call("echo", &format!("00-{TRACE}-{SPAN}-01")))
            .end(None);
        assert!(spans.try_recv().is_ok(), "... but a sampled parent's child");
    }

    #[tokio::test]
    async fn a_span_dropped_unended_is_of_a_cancelled_call() {
        let (tracer, mut spans) = capturing();
        drop(tracer.start(&mut call("waits", "")));
        let span = spans.try_recv().unwrap();
        assert_eq!(attributes(&span)["linchkit.outcome"], "cancelled");
        assert_eq!(span.status.unwrap().code, 2);
    }

    #[test]
    fn truncation_keeps_whole_characters() {
        assert_eq!(truncated("aé", 2), "a");
        assert_eq!(truncated("abc", 3), "abc");
        assert_eq!(truncated("abcd", 3), "abc");
    }
}
