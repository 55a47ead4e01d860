//! Sends finished spans to an OpenTelemetry collector over OTLP/HTTP in protobuf, in batches
//! (docs/observability.md, "Rust plugins").
//!
//! The messages a span batch needs (opentelemetry-proto's `collector/trace/v1`,
//! `trace/v1`, `common/v1`, `resource/v1`) are written out below for prost with the
//! protocol's field numbers; one HTTP/1.1 connection is kept open to the collector (hyper,
//! through rustls for `https`), and one task sends what a bounded queue collects. The SDK
//! builds prost, hyper, rustls and flate2 for gRPC already, so this costs its release build
//! about 2 s on 2 cores. The `opentelemetry-otlp` crates cost 55 s more with the HTTP
//! client their batch processor can drive (reqwest's blocking one, and that without TLS),
//! 20 s with hyper's, which their default processor cannot drive (it sends from a thread
//! of its own, where hyper finds no Tokio: only an experimental processor runs on Tokio)
//! and which speaks plain HTTP only.
//!
//! Settings are the standard ones, read once at start; a malformed value is warned about
//! and its default used (tracing is an aid: it never keeps a plugin from serving):
//!
//! | variable | default |
//! |---|---|
//! | `OTEL_EXPORTER_OTLP_(TRACES_)HEADERS`: `key=value,…`, values percent-encoded | none |
//! | `OTEL_EXPORTER_OTLP_(TRACES_)TIMEOUT`: one request, in ms | 10000 |
//! | `OTEL_EXPORTER_OTLP_(TRACES_)COMPRESSION`: `gzip` or `none` | none |
//! | `OTEL_EXPORTER_OTLP_(TRACES_)CERTIFICATE`: PEM roots to trust for `https` | the system's |
//! | `OTEL_BSP_SCHEDULE_DELAY`: how long a span may wait for its batch, in ms | 5000 |
//! | `OTEL_BSP_MAX_QUEUE_SIZE`: spans waiting at most; more are dropped | 2048 |
//! | `OTEL_BSP_MAX_EXPORT_BATCH_SIZE` | 512 |
//! | `OTEL_BSP_EXPORT_TIMEOUT`: one batch, retries included, in ms | 30000 |
//! | `OTEL_RESOURCE_ATTRIBUTES`: `key=value,…` (the SDK's own `service.*` win) | none |
//!
//! Spans go as `http/protobuf` only: an `OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL` asking for
//! another (`grpc`, `http/json`) is said once at start and changes nothing, as in the Java
//! SDK ([`protocol_warning`]).
//!
//! A user and password in the endpoint's URL are sent as HTTP basic authentication, unless
//! the headers carry an `authorization` of their own. Nothing the SDK says names more of
//! the collector than its scheme, host and port ([`Endpoint::shown`]): never a header, the
//! URL's user, password, path or query.
//!
//! A batch the collector does not take is tried up to three times when the failure may pass
//! (no connection, no answer, HTTP 429, 502, 503, 504), then dropped: the first batch
//! dropped says so in one warning, and the next one the collector takes says how many were
//! lost meanwhile. No failure reaches a call.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper::header::{
    HeaderMap, HeaderName, HeaderValue, AUTHORIZATION, CONTENT_ENCODING, CONTENT_TYPE, HOST,
    RETRY_AFTER, USER_AGENT,
};
use hyper::{Request, Uri};
use hyper_util::rt::TokioIo;
use percent_encoding::percent_decode_str;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;

// -- the OTLP messages ------------------------------------------------------------------

/// `opentelemetry.proto.collector.trace.v1.ExportTraceServiceRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct ExportTraceServiceRequest {
    #[prost(message, repeated, tag = "1")]
    pub(crate) resource_spans: Vec<ResourceSpans>,
}

/// `opentelemetry.proto.trace.v1.ResourceSpans`.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct ResourceSpans {
    #[prost(message, optional, tag = "1")]
    pub(crate) resource: Option<Resource>,
    #[prost(message, repeated, tag = "2")]
    pub(crate) scope_spans: Vec<ScopeSpans>,
}

/// `opentelemetry.proto.resource.v1.Resource`.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct Resource {
    #[prost(message, repeated, tag = "1")]
    pub(crate) attributes: Vec<KeyValue>,
}

/// `opentelemetry.proto.trace.v1.ScopeSpans`.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct ScopeSpans {
    #[prost(message, optional, tag = "1")]
    pub(crate) scope: Option<InstrumentationScope>,
    #[prost(message, repeated, tag = "2")]
    pub(crate) spans: Vec<Span>,
}

/// `opentelemetry.proto.common.v1.InstrumentationScope`.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct InstrumentationScope {
    #[prost(string, tag = "1")]
    pub(crate) name: String,
    #[prost(string, tag = "2")]
    pub(crate) version: String,
}

/// `opentelemetry.proto.trace.v1.Span`, the fields a call's span has.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct Span {
    #[prost(bytes = "vec", tag = "1")]
    pub(crate) trace_id: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    pub(crate) span_id: Vec<u8>,
    #[prost(bytes = "vec", tag = "4")]
    pub(crate) parent_span_id: Vec<u8>,
    #[prost(string, tag = "5")]
    pub(crate) name: String,
    /// A `SpanKind`.
    #[prost(int32, tag = "6")]
    pub(crate) kind: i32,
    #[prost(fixed64, tag = "7")]
    pub(crate) start_time_unix_nano: u64,
    #[prost(fixed64, tag = "8")]
    pub(crate) end_time_unix_nano: u64,
    #[prost(message, repeated, tag = "9")]
    pub(crate) attributes: Vec<KeyValue>,
    #[prost(message, optional, tag = "15")]
    pub(crate) status: Option<Status>,
    /// The W3C trace flags in bits 0-7; bit 8 says bit 9 is set, bit 9 that the parent is
    /// remote.
    #[prost(fixed32, tag = "16")]
    pub(crate) flags: u32,
}

/// `SpanKind.SPAN_KIND_SERVER`.
pub(crate) const SPAN_KIND_SERVER: i32 = 2;
/// `StatusCode.STATUS_CODE_ERROR`.
const STATUS_CODE_ERROR: i32 = 2;
/// `SpanFlags.SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK` and `_IS_REMOTE_MASK`.
const HAS_IS_REMOTE: u32 = 0x100;
const IS_REMOTE: u32 = 0x200;

/// A span's `flags`: its trace flags, and whether its parent (if any) is remote: a call's
/// parent always is, in the dispatcher.
pub(crate) fn span_flags(trace_flags: u8, remote_parent: bool) -> u32 {
    u32::from(trace_flags) | HAS_IS_REMOTE | if remote_parent { IS_REMOTE } else { 0 }
}

/// `opentelemetry.proto.trace.v1.Status`.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct Status {
    #[prost(string, tag = "2")]
    pub(crate) message: String,
    /// A `StatusCode`.
    #[prost(int32, tag = "3")]
    pub(crate) code: i32,
}

impl Status {
    pub(crate) fn error(message: &str) -> Self {
        Status {
            message: message.to_string(),
            code: STATUS_CODE_ERROR,
        }
    }
}

/// `opentelemetry.proto.common.v1.KeyValue`.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct KeyValue {
    #[prost(string, tag = "1")]
    pub(crate) key: String,
    #[prost(message, optional, tag = "2")]
    pub(crate) value: Option<AnyValue>,
}

/// `opentelemetry.proto.common.v1.AnyValue`: every attribute the SDK sets is a string.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct AnyValue {
    #[prost(oneof = "any_value::Value", tags = "1")]
    pub(crate) value: Option<any_value::Value>,
}

pub(crate) mod any_value {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub(crate) enum Value {
        #[prost(string, tag = "1")]
        StringValue(String),
    }
}

/// A string attribute.
pub(crate) fn attribute(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.to_string())),
        }),
    }
}

// -- settings -----------------------------------------------------------------------------

/// Where spans go: the general endpoint (`/v1/traces` appended) or the traces one as it is
/// (`crate::tracing` reads them to know whether to trace at all).
pub(crate) const ENV_OTLP_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
pub(crate) const ENV_OTLP_TRACES_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT";
const ENV_RESOURCE_ATTRIBUTES: &str = "OTEL_RESOURCE_ATTRIBUTES";
const ENV_BSP_SCHEDULE_DELAY: &str = "OTEL_BSP_SCHEDULE_DELAY";
const ENV_BSP_MAX_QUEUE_SIZE: &str = "OTEL_BSP_MAX_QUEUE_SIZE";
const ENV_BSP_MAX_EXPORT_BATCH_SIZE: &str = "OTEL_BSP_MAX_EXPORT_BATCH_SIZE";
const ENV_BSP_EXPORT_TIMEOUT: &str = "OTEL_BSP_EXPORT_TIMEOUT";

/// The instrumentation scope of the SDK's spans, as the Go SDK names its tracer.
const SCOPE: &str = "linchkit.plugin";
/// The most of a collector's answer read (it is an `ExportTraceServiceResponse`, a few
/// bytes); a longer one is not read, and its connection not used again.
const MAX_ANSWER_BYTES: usize = 64 * 1024;
/// The waits before a batch is tried again, when its failure may pass: three tries at most
/// (each within `OTEL_BSP_EXPORT_TIMEOUT`). A collector's `Retry-After` (in seconds) is
/// waited instead, up to `MAX_RETRY_AFTER`.
const BACKOFF: [Duration; 2] = [Duration::from_secs(1), Duration::from_secs(2)];
const MAX_RETRY_AFTER: Duration = Duration::from_secs(5);

/// Where and how spans are sent, from the environment.
pub(crate) struct Settings {
    endpoint: Endpoint,
    headers: HeaderMap,
    /// One request's time.
    timeout: Duration,
    gzip: bool,
    /// A PEM file of the roots to trust for `https`, in place of the system's.
    certificate: Option<String>,
    schedule_delay: Duration,
    max_queue: usize,
    max_batch: usize,
    /// One batch's time, retries included.
    export_timeout: Duration,
}

impl Settings {
    /// The settings for sending to `url` (the traces endpoint the environment names).
    pub(crate) fn from_vars<'a>(
        url: &str,
        var: &impl Fn(&str) -> &'a str,
    ) -> Result<Settings, String> {
        let endpoint = Endpoint::parse(url).ok_or_else(|| {
            // Not the value: a URL may carry a password.
            format!(
                "{ENV_OTLP_TRACES_ENDPOINT} (or {ENV_OTLP_ENDPOINT}) is not an http:// or \
                 https:// URL with a host"
            )
        })?;
        if let Some(warning) = protocol_warning(var, &endpoint.shown()) {
            crate::log::warn(&warning);
        }
        let mut headers = HeaderMap::new();
        let (traces_headers, general_headers) = signal_var("HEADERS");
        // The general variable first: the signal's own overrides the same keys.
        for name in [general_headers, traces_headers] {
            for (key, value) in key_values(&name, var(&name)) {
                match header(&key, &value) {
                    Some((key, value)) => {
                        headers.insert(key, value);
                    }
                    None => crate::log::warn(&format!(
                        "{name}: the entry of key {key:?} is not a valid HTTP header; \
                         it is not sent"
                    )),
                }
            }
        }
        if let (Some(basic), false) = (&endpoint.basic_auth, headers.contains_key(AUTHORIZATION)) {
            headers.insert(AUTHORIZATION, basic.clone());
        }
        let compression = signal_value(var, "COMPRESSION");
        let gzip = match compression.1.trim() {
            "gzip" => true,
            "" | "none" => false,
            _ => {
                crate::log::warn(&format!(
                    "{} must be gzip or none; sending spans uncompressed",
                    compression.0
                ));
                false
            }
        };
        let certificate = Some(signal_value(var, "CERTIFICATE").1.trim())
            .filter(|path| !path.is_empty())
            .map(str::to_string);
        let timeout = signal_value(var, "TIMEOUT");
        let max_queue = count(ENV_BSP_MAX_QUEUE_SIZE, var(ENV_BSP_MAX_QUEUE_SIZE), 2048);
        Ok(Settings {
            endpoint,
            headers,
            // A timeout of 0 would fail every request: at least 1 ms.
            timeout: millis(&timeout.0, timeout.1, 10_000, 1),
            gzip,
            certificate,
            schedule_delay: millis(
                ENV_BSP_SCHEDULE_DELAY,
                var(ENV_BSP_SCHEDULE_DELAY),
                5_000,
                0,
            ),
            max_queue,
            max_batch: count(
                ENV_BSP_MAX_EXPORT_BATCH_SIZE,
                var(ENV_BSP_MAX_EXPORT_BATCH_SIZE),
                512,
            )
            .min(max_queue),
            export_timeout: millis(
                ENV_BSP_EXPORT_TIMEOUT,
                var(ENV_BSP_EXPORT_TIMEOUT),
                30_000,
                1,
            ),
        })
    }
}

/// The traces variable of a setting and the general one: `OTEL_EXPORTER_OTLP_TRACES_<what>`,
/// `OTEL_EXPORTER_OTLP_<what>`.
fn signal_var(what: &str) -> (String, String) {
    (
        format!("OTEL_EXPORTER_OTLP_TRACES_{what}"),
        format!("OTEL_EXPORTER_OTLP_{what}"),
    )
}

/// The variable that sets `what` for traces, and its value: the traces one when set.
fn signal_value<'a>(var: &impl Fn(&str) -> &'a str, what: &str) -> (String, &'a str) {
    let (traces, general) = signal_var(what);
    match var(&traces) {
        "" => {
            let value = var(&general);
            (general, value)
        }
        value => (traces, value),
    }
}

/// The one protocol the SDK sends spans in.
const HTTP_PROTOBUF: &str = "http/protobuf";

/// What to say when `OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL` (the traces one when set) asks
/// for another protocol than http/protobuf: the spans still go as http/protobuf to
/// `collector` (as [`Endpoint::shown`] names it), so the operator who asked for `grpc`
/// learns why a gRPC-only collector port gets nothing.
pub(crate) fn protocol_warning<'a>(
    var: &impl Fn(&str) -> &'a str,
    collector: &str,
) -> Option<String> {
    let (traces, general) = signal_var("PROTOCOL");
    let (name, value) = match var(&traces).trim() {
        "" => (general.clone(), var(&general).trim()),
        value => (traces, value),
    };
    if value.is_empty() || value == HTTP_PROTOBUF {
        return None;
    }
    Some(format!(
        "{name} is {}, but this SDK sends spans as {HTTP_PROTOBUF} only (OTLP over HTTP); \
         sending them so to {collector}",
        quoted(value)
    ))
}

/// A value that is no secret as a warning quotes it: in quotes, cut to 40 characters,
/// control characters as `?`.
fn quoted(text: &str) -> String {
    let shown: String = text
        .chars()
        .take(40)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    let cut = if text.chars().nth(40).is_some() {
        "…"
    } else {
        ""
    };
    format!("'{shown}{cut}'")
}

/// Whole milliseconds, at least `least`; `default` when unset or malformed (with a warning).
fn millis(name: &str, text: &str, default: u64, least: u64) -> Duration {
    Duration::from_millis(number(name, text, default, least))
}

/// A count of at least 1, `default` when unset or malformed (with a warning).
fn count(name: &str, text: &str, default: u64) -> usize {
    usize::try_from(number(name, text, default, 1)).unwrap_or(usize::MAX)
}

/// A whole number of at least `least` (digits only: `u64::from_str` takes `+5` too).
fn number(name: &str, text: &str, default: u64, least: u64) -> u64 {
    let text = text.trim();
    if text.is_empty() {
        return default;
    }
    match text.parse::<u64>() {
        Ok(value) if value >= least && text.bytes().all(|b| b.is_ascii_digit()) => value,
        _ => {
            crate::log::warn(&format!(
                "{name} must be a whole number, {least} or more; using {default}"
            ));
            default
        }
    }
}

/// `key=value` entries of a comma-separated list (OTel's headers and resource attributes),
/// percent-decoded and trimmed; an entry without `=` or with an empty key is left out, with
/// a warning naming the variable and the entry's place (not the entry: it may be a secret).
fn key_values(name: &str, text: &str) -> Vec<(String, String)> {
    let mut found = Vec::new();
    for (place, entry) in text.split(',').enumerate() {
        if entry.trim().is_empty() {
            continue;
        }
        let decoded = entry.split_once('=').and_then(|(key, value)| {
            let key = percent_decode_str(key.trim()).decode_utf8().ok()?;
            let value = percent_decode_str(value.trim()).decode_utf8().ok()?;
            (!key.is_empty()).then(|| (key.into_owned(), value.into_owned()))
        });
        match decoded {
            Some(pair) => found.push(pair),
            None => crate::log::warn(&format!(
                "{name}: entry {} is not key=value (percent-encoded UTF-8); it is left out",
                place + 1
            )),
        }
    }
    found
}

/// An HTTP header, its value marked sensitive (kept out of hyper's debug output).
fn header(key: &str, value: &str) -> Option<(HeaderName, HeaderValue)> {
    let key = HeaderName::from_bytes(key.as_bytes()).ok()?;
    let mut value = HeaderValue::from_str(value).ok()?;
    value.set_sensitive(true);
    Some((key, value))
}

/// The resource of the plugin's spans: `OTEL_RESOURCE_ATTRIBUTES`, then the SDK's own
/// (`service.name`, `service.version`, `telemetry.sdk.*`), which win.
pub(crate) fn resource<'a>(
    var: &impl Fn(&str) -> &'a str,
    service: &str,
    version: &str,
) -> Resource {
    let ours = [
        ("service.name", service),
        ("service.version", version),
        ("telemetry.sdk.name", "linchkit-plugin"),
        ("telemetry.sdk.language", "rust"),
        ("telemetry.sdk.version", env!("CARGO_PKG_VERSION")),
    ];
    let mut attributes: Vec<KeyValue> =
        key_values(ENV_RESOURCE_ATTRIBUTES, var(ENV_RESOURCE_ATTRIBUTES))
            .into_iter()
            .filter(|(key, _)| !ours.iter().any(|(own, _)| own == key))
            .map(|(key, value)| attribute(&key, &value))
            .collect();
    attributes.extend(ours.iter().map(|(key, value)| attribute(key, value)));
    Resource { attributes }
}

/// The collector's URL, taken apart.
pub(crate) struct Endpoint {
    https: bool,
    /// The host to connect to: a name or an IP address, without brackets.
    host: String,
    port: u16,
    /// The `Host` header: the URL's host and port as written, without its user.
    host_header: String,
    /// The path and query to post to.
    path: String,
    /// The URL's user and password as a basic `authorization` header.
    basic_auth: Option<HeaderValue>,
}

impl Endpoint {
    /// An `http` or `https` URL with a host; `None` for anything else.
    pub(crate) fn parse(url: &str) -> Option<Endpoint> {
        let uri: Uri = url.trim().parse().ok()?;
        let https = match uri.scheme_str()?.to_ascii_lowercase().as_str() {
            "http" => false,
            "https" => true,
            _ => return None,
        };
        let authority = uri.authority()?;
        let bracketed = authority.host();
        let host = bracketed.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return None;
        }
        let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
        let host_header = match authority.port() {
            Some(port) => format!("{bracketed}:{port}"),
            None => bracketed.to_string(),
        };
        let path = match uri.path_and_query().map(|p| p.as_str()) {
            None | Some("") => "/".to_string(),
            Some(path) => path.to_string(),
        };
        let basic_auth = authority
            .as_str()
            .rsplit_once('@')
            .and_then(|(userinfo, _)| basic_auth(userinfo));
        Some(Endpoint {
            https,
            host: host.to_string(),
            port,
            host_header,
            path,
            basic_auth,
        })
    }

    /// The collector as the SDK names it in what it says: scheme://host:port, never the
    /// URL's user, password, path or query.
    pub(crate) fn shown(&self) -> String {
        let scheme = if self.https { "https" } else { "http" };
        if self.host.contains(':') {
            format!("{scheme}://[{}]:{}", self.host, self.port)
        } else {
            format!("{scheme}://{}:{}", self.host, self.port)
        }
    }
}

/// `user:password` (percent-encoded, as in a URL) as a basic `authorization` header.
fn basic_auth(userinfo: &str) -> Option<HeaderValue> {
    let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
    let user = percent_decode_str(user).decode_utf8().ok()?;
    let password = percent_decode_str(password).decode_utf8().ok()?;
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    let mut value = HeaderValue::from_str(&format!("Basic {encoded}")).ok()?;
    value.set_sensitive(true);
    Some(value)
}

/// The TLS client of an `https` collector: the roots of `certificate` (a PEM file), else
/// the system's.
fn tls_connector(certificate: Option<&str>) -> Result<TlsConnector, String> {
    let mut roots = rustls::RootCertStore::empty();
    match certificate {
        Some(path) => {
            let (variable, _) = signal_var("CERTIFICATE");
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|err| format!("{variable} (or its general variable): {path}: {err}"))?;
            for cert in certs {
                let cert = cert.map_err(|err| {
                    format!("{variable} (or its general variable): {path}: {err}")
                })?;
                roots
                    .add(cert)
                    .map_err(|err| format!("{path} holds a certificate rustls refuses: {err}"))?;
            }
        }
        None => {
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert); // one the system trusts but rustls cannot read
            }
        }
    }
    if roots.is_empty() {
        return Err(
            "no root certificate to check an https collector with: the system has none; \
             name a PEM file in OTEL_EXPORTER_OTLP_CERTIFICATE"
                .to_string(),
        );
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|err| format!("TLS: {err}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsConnector::from(Arc::new(config)))
}

// -- the batch pipeline ---------------------------------------------------------------------

/// The spans' way out: a bounded queue and the task that sends what it holds, in batches.
/// Dropping it ends the task.
pub(crate) struct Pipeline {
    spans: mpsc::Sender<Span>,
    /// Asks the task to send all it holds and end; answered when it has.
    stop: Mutex<Option<oneshot::Sender<oneshot::Sender<()>>>>,
    task: JoinHandle<()>,
    /// Spans refused since the queue was last found full.
    overflow: Arc<AtomicU64>,
    max_queue: usize,
    collector: String,
}

impl Pipeline {
    /// Starts the task that sends the spans (inside the Tokio runtime).
    pub(crate) fn start(settings: Settings, resource: Resource) -> Result<Pipeline, String> {
        let tls = match settings.endpoint.https {
            true => Some(tls_connector(settings.certificate.as_deref())?),
            false => None,
        };
        let collector = settings.endpoint.shown();
        let (spans, queue) = mpsc::channel(settings.max_queue);
        let (stop, stopping) = oneshot::channel();
        let overflow = Arc::new(AtomicU64::new(0));
        let batches = Batches {
            delay: settings.schedule_delay,
            max_batch: settings.max_batch,
            overflow: overflow.clone(),
        };
        let client = Client {
            request: ExportTraceServiceRequest {
                resource_spans: vec![ResourceSpans {
                    resource: Some(resource),
                    scope_spans: vec![ScopeSpans {
                        scope: Some(InstrumentationScope {
                            name: SCOPE.to_string(),
                            version: env!("CARGO_PKG_VERSION").to_string(),
                        }),
                        spans: Vec::new(),
                    }],
                }],
            },
            collector: collector.clone(),
            endpoint: settings.endpoint,
            headers: settings.headers,
            timeout: settings.timeout,
            export_timeout: settings.export_timeout,
            gzip: settings.gzip,
            tls,
            connection: None,
            lost: None,
        };
        let task = tokio::spawn(batches.run(client, queue, stopping));
        Ok(Pipeline {
            spans,
            stop: Mutex::new(Some(stop)),
            task,
            overflow,
            max_queue: settings.max_queue,
            collector,
        })
    }

    /// Queues a finished span; never waits. A full queue drops it, saying so once until the
    /// queue has room again.
    pub(crate) fn send(&self, span: Span) {
        if let Err(mpsc::error::TrySendError::Full(_)) = self.spans.try_send(span) {
            if self.overflow.fetch_add(1, Ordering::Relaxed) == 0 {
                crate::log::warn(&format!(
                    "{} spans wait for the trace collector at {} ({ENV_BSP_MAX_QUEUE_SIZE}): \
                     spans are dropped until it takes them",
                    self.max_queue, self.collector
                ));
            }
        }
    }

    /// Sends what the queue holds and ends the task, for `within` at most: true when the
    /// collector took the spans or refused them in time, false when the time ran out (the
    /// spans are dropped then, with one warning).
    pub(crate) async fn flush_within(&self, within: Duration) -> bool {
        let Some(stop) = self.stop.lock().unwrap().take() else {
            return true;
        };
        let (done, flushed) = oneshot::channel();
        if stop.send(done).is_err() {
            return true; // the task has ended: nothing is left to send
        }
        if tokio::time::timeout(within, flushed).await.is_ok() {
            return true;
        }
        self.task.abort();
        crate::log::warn(&format!(
            "spans dropped at the stop: the trace collector at {} did not take them within \
             the {} s the stop's caps left; check that it is up and answers",
            self.collector,
            tenths(within)
        ));
        false
    }
}

#[cfg(test)]
impl Pipeline {
    /// A pipeline whose spans stay in the returned queue, for tests of what a span holds.
    pub(crate) fn capturing() -> (Pipeline, mpsc::Receiver<Span>) {
        let (spans, queue) = mpsc::channel(64);
        let pipeline = Pipeline {
            spans,
            stop: Mutex::new(None),
            task: tokio::spawn(async {}),
            overflow: Arc::new(AtomicU64::new(0)),
            max_queue: 64,
            collector: "http://captured:0".to_string(),
        };
        (pipeline, queue)
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A duration in seconds, to a tenth, as few digits as it takes ("1", "4.2").
fn tenths(duration: Duration) -> String {
    format!("{}", (duration.as_secs_f64() * 10.0).round() / 10.0)
}

/// How the task gathers spans into batches.
struct Batches {
    /// How long the first span of a batch waits for others.
    delay: Duration,
    max_batch: usize,
    overflow: Arc<AtomicU64>,
}

impl Batches {
    async fn run(
        self,
        mut client: Client,
        mut queue: mpsc::Receiver<Span>,
        mut stopping: oneshot::Receiver<oneshot::Sender<()>>,
    ) {
        let mut batch = Vec::new();
        let mut due: Option<Instant> = None;
        loop {
            let timer = async move {
                match due {
                    Some(due) => tokio::time::sleep_until(due).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                asked = &mut stopping => {
                    queue.close();
                    while let Some(span) = queue.recv().await {
                        batch.push(span);
                    }
                    while !batch.is_empty() {
                        let rest = batch.split_off(batch.len().min(self.max_batch));
                        client.export(std::mem::replace(&mut batch, rest)).await;
                    }
                    if let Ok(done) = asked {
                        let _ = done.send(());
                    }
                    return;
                }
                span = queue.recv() => match span {
                    Some(span) => {
                        batch.push(span);
                        due.get_or_insert_with(|| Instant::now() + self.delay);
                        if batch.len() < self.max_batch {
                            continue;
                        }
                    }
                    None => return,
                },
                () = timer => {}
            }
            due = None;
            client.export(std::mem::take(&mut batch)).await;
            let overflowed = self.overflow.swap(0, Ordering::Relaxed);
            if overflowed > 0 {
                crate::log::warn(&format!(
                    "{overflowed} spans were dropped while the queue for the trace collector \
                     at {} was full",
                    client.collector
                ));
            }
        }
    }
}

// -- the HTTP client ------------------------------------------------------------------------

/// Posts batches to the collector over one kept-open connection.
struct Client {
    /// The message sent, its spans replaced by each batch's.
    request: ExportTraceServiceRequest,
    collector: String,
    endpoint: Endpoint,
    headers: HeaderMap,
    timeout: Duration,
    export_timeout: Duration,
    gzip: bool,
    tls: Option<TlsConnector>,
    connection: Option<Connection>,
    /// Spans dropped since the collector last took a batch; `None` while it takes them.
    lost: Option<u64>,
}

/// An HTTP/1.1 connection: the handle to send on, and the task that drives it.
struct Connection {
    sender: SendRequest<Full<Bytes>>,
    driver: JoinHandle<()>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// Why a batch was not taken, in words with no secret in them.
struct Failure {
    reason: String,
    /// It may pass: the batch is tried again.
    transient: bool,
    retry_after: Option<Duration>,
}

impl Failure {
    fn transient(reason: String) -> Self {
        Failure {
            reason,
            transient: true,
            retry_after: None,
        }
    }
}

impl Client {
    /// Sends one batch, tried again while its failure may pass; a batch not taken is
    /// dropped.
    async fn export(&mut self, spans: Vec<Span>) {
        let count = spans.len() as u64;
        let body = match self.encode(spans) {
            Ok(body) => body,
            Err(err) => {
                return self.dropped(count, &format!("cannot compress them: {err}"));
            }
        };
        let began = Instant::now();
        let mut backoff = BACKOFF.iter();
        loop {
            let sent = tokio::time::timeout(self.timeout, self.post(body.clone())).await;
            let failure = match sent {
                Ok(Ok(())) => return self.taken(),
                Ok(Err(failure)) => failure,
                Err(_) => {
                    // It may yet answer that request: the connection is not used again.
                    self.connection = None;
                    Failure::transient(format!(
                        "no answer within {} s ({})",
                        tenths(self.timeout),
                        signal_var("TIMEOUT").0
                    ))
                }
            };
            let wait = match (failure.transient, backoff.next()) {
                (true, Some(&wait)) => failure
                    .retry_after
                    .map_or(wait, |asked| asked.min(MAX_RETRY_AFTER)),
                _ => return self.dropped(count, &failure.reason),
            };
            if began.elapsed() + wait + self.timeout > self.export_timeout {
                return self.dropped(count, &failure.reason);
            }
            tokio::time::sleep(wait).await;
        }
    }

    /// The request's body: the batch as an `ExportTraceServiceRequest`, gzipped if asked.
    fn encode(&mut self, spans: Vec<Span>) -> std::io::Result<Bytes> {
        self.request.resource_spans[0].scope_spans[0].spans = spans;
        let encoded = prost::Message::encode_to_vec(&self.request);
        self.request.resource_spans[0].scope_spans[0].spans.clear();
        if !self.gzip {
            return Ok(Bytes::from(encoded));
        }
        let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gzip.write_all(&encoded)?;
        Ok(Bytes::from(gzip.finish()?))
    }

    async fn post(&mut self, body: Bytes) -> Result<(), Failure> {
        if self
            .connection
            .as_ref()
            .is_none_or(|c| c.sender.is_closed())
        {
            self.connection = Some(self.connect().await?);
        }
        let mut request = Request::post(self.endpoint.path.as_str())
            .body(Full::new(body))
            .map_err(|err| Failure::transient(format!("cannot make the request: {err}")))?;
        let headers = request.headers_mut();
        headers.extend(self.headers.clone());
        headers.insert(HOST, header_value(&self.endpoint.host_header)?);
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/x-protobuf"),
        );
        headers.insert(
            USER_AGENT,
            HeaderValue::from_static(concat!("linchkit-plugin-rust/", env!("CARGO_PKG_VERSION"))),
        );
        if self.gzip {
            headers.insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        }
        let connection = self.connection.as_mut().expect("connected above");
        let answered = async {
            connection.sender.ready().await?;
            connection.sender.send_request(request).await
        };
        let response = match answered.await {
            Ok(response) => response,
            Err(err) => {
                self.connection = None;
                return Err(Failure::transient(format!("the request failed: {err}")));
            }
        };
        let status = response.status();
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|value| value.to_str().ok()?.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        // Read to the end, so the connection can carry the next batch.
        if Limited::new(response.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await
            .is_err()
        {
            self.connection = None;
        }
        if status.is_success() {
            return Ok(());
        }
        Err(Failure {
            reason: format!("it answered HTTP {status}"),
            transient: matches!(status.as_u16(), 429 | 502 | 503 | 504),
            retry_after,
        })
    }

    async fn connect(&self) -> Result<Connection, Failure> {
        let address = (self.endpoint.host.as_str(), self.endpoint.port);
        let tcp = TcpStream::connect(address)
            .await
            .map_err(|err| Failure::transient(format!("cannot connect: {err}")))?;
        let _ = tcp.set_nodelay(true);
        let Some(tls) = &self.tls else {
            return handshake(tcp).await;
        };
        let name = ServerName::try_from(self.endpoint.host.clone())
            .map_err(|err| Failure::transient(format!("TLS: {err}")))?;
        let stream = tls
            .connect(name, tcp)
            .await
            .map_err(|err| Failure::transient(format!("TLS: {err}")))?;
        handshake(stream).await
    }

    /// The collector took a batch: after spans were lost, says how many.
    fn taken(&mut self) {
        if let Some(lost) = self.lost.take() {
            crate::log::info(&format!(
                "the trace collector at {} takes spans again; {lost} were dropped while it did not",
                self.collector
            ));
        }
    }

    /// The collector did not take a batch: the first of an outage says so.
    fn dropped(&mut self, count: u64, reason: &str) {
        match &mut self.lost {
            Some(lost) => *lost += count,
            None => {
                crate::log::warn(&format!(
                    "could not send {count} spans to the trace collector at {}: {reason}; \
                     they are dropped, and so are later ones until it takes them again",
                    self.collector
                ));
                self.lost = Some(count);
            }
        }
    }
}

fn header_value(text: &str) -> Result<HeaderValue, Failure> {
    HeaderValue::from_str(text).map_err(|_| Failure {
        reason: "the endpoint's host is not a valid Host header".to_string(),
        transient: false,
        retry_after: None,
    })
}

async fn handshake<IO>(io: IO) -> Result<Connection, Failure>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|err| Failure::transient(format!("HTTP: {err}")))?;
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(Connection { sender, driver })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    use tokio::net::TcpListener;

    fn settings(url: &str, vars: &[(&str, &str)]) -> Result<Settings, String> {
        let vars: HashMap<&str, &str> = vars.iter().copied().collect();
        Settings::from_vars(url, &|name: &str| vars.get(name).copied().unwrap_or(""))
    }

    fn protocol_said(vars: &[(&str, &str)]) -> Option<String> {
        let vars: HashMap<&str, &str> = vars.iter().copied().collect();
        protocol_warning(
            &|name: &str| vars.get(name).copied().unwrap_or(""),
            "http://127.0.0.1:4318",
        )
    }

    /// As the Java SDK's OtlpSettingsTest has it.
    #[test]
    fn a_protocol_other_than_http_protobuf_is_said_and_spans_go_as_http_protobuf() {
        assert_eq!(protocol_said(&[]), None);
        assert_eq!(
            protocol_said(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")]),
            None
        );
        assert_eq!(
            protocol_said(&[("OTEL_EXPORTER_OTLP_PROTOCOL", " http/protobuf ")]),
            None
        );
        assert_eq!(
            protocol_said(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")]).as_deref(),
            Some(
                "OTEL_EXPORTER_OTLP_PROTOCOL is 'grpc', but this SDK sends spans as \
                 http/protobuf only (OTLP over HTTP); sending them so to http://127.0.0.1:4318"
            )
        );
        let traces = protocol_said(&[
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/json"),
        ])
        .unwrap();
        assert!(
            traces.starts_with("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL is 'http/json'"),
            "{traces}"
        );
        let traces_wins = protocol_said(&[
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf"),
        ]);
        assert_eq!(traces_wins, None);
        let odd = protocol_said(&[(
            "OTEL_EXPORTER_OTLP_PROTOCOL",
            &format!("x\ny{}", "z".repeat(60)),
        )])
        .unwrap();
        assert!(odd.contains(&format!("'x?y{}…'", "z".repeat(37))), "{odd}");
    }

    #[test]
    fn the_collector_is_named_by_scheme_host_and_port_only() {
        for (url, shown) in [
            (
                "http://collector:s3cret@127.0.0.1:4318/v1/traces?token=s3cret",
                "http://127.0.0.1:4318",
            ),
            (
                "https://otlp.example.com/v1/traces",
                "https://otlp.example.com:443",
            ),
            ("HTTP://collector/v1/traces", "http://collector:80"),
            ("http://[::1]:4318/v1/traces", "http://[::1]:4318"),
            ("http://us%3Aer:p%40ss@[::1]:9/", "http://[::1]:9"),
        ] {
            assert_eq!(Endpoint::parse(url).unwrap().shown(), shown, "{url}");
        }
    }

    #[test]
    fn an_endpoint_that_is_not_an_http_url_is_refused_without_its_value() {
        for url in [
            "",
            "collector:4318",
            "ftp://collector/v1/traces",
            "http:///v1/traces",
            "http://user:s3cret@/v1/traces",
            "not a url s3cret",
        ] {
            assert!(Endpoint::parse(url).is_none(), "{url}");
            let refused = settings(url, &[]).err().unwrap();
            assert!(!refused.contains("s3cret"), "{refused}");
            assert!(refused.contains(ENV_OTLP_TRACES_ENDPOINT), "{refused}");
        }
    }

    #[test]
    fn the_path_host_header_and_user_come_from_the_url() {
        let endpoint = Endpoint::parse("http://us%3Aer:p%40ss@127.0.0.1:4318/a/b?c=d").unwrap();
        assert_eq!(endpoint.path, "/a/b?c=d");
        assert_eq!(endpoint.host_header, "127.0.0.1:4318");
        let basic = base64::engine::general_purpose::STANDARD.encode("us:er:p@ss");
        assert_eq!(
            endpoint.basic_auth.unwrap().to_str().unwrap(),
            format!("Basic {basic}")
        );
        let bare = Endpoint::parse("https://[::1]").unwrap();
        assert_eq!((bare.host.as_str(), bare.port), ("::1", 443));
        assert_eq!(
            (bare.host_header.as_str(), bare.path.as_str()),
            ("[::1]", "/")
        );
        assert!(bare.basic_auth.is_none());
    }

    #[test]
    fn headers_come_from_both_variables_the_traces_one_winning() {
        let settings = settings(
            "http://user:pw@collector:4318/v1/traces",
            &[
                ("OTEL_EXPORTER_OTLP_HEADERS", "a=1, b = x%20y ,,c"),
                ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "a=2,bad name=3"),
            ],
        )
        .unwrap();
        let headers = &settings.headers;
        assert_eq!(headers["a"], "2");
        assert_eq!(headers["b"], "x y");
        assert!(
            headers.get("c").is_none() && headers.len() == 3,
            "{headers:?}"
        );
        // The URL's user, as basic authentication.
        assert!(headers[AUTHORIZATION]
            .to_str()
            .unwrap()
            .starts_with("Basic "));
        assert!(headers[AUTHORIZATION].is_sensitive());
        let own = self::settings(
            "http://user:pw@collector:4318/v1/traces",
            &[("OTEL_EXPORTER_OTLP_HEADERS", "Authorization=Bearer%20t")],
        )
        .unwrap();
        assert_eq!(own.headers[AUTHORIZATION], "Bearer t");
    }

    #[test]
    fn malformed_numbers_and_compression_keep_their_defaults() {
        let settings = settings(
            "http://collector:4318/v1/traces",
            &[
                (ENV_BSP_SCHEDULE_DELAY, "5s"),
                (ENV_BSP_MAX_QUEUE_SIZE, "0"),
                (ENV_BSP_MAX_EXPORT_BATCH_SIZE, "+5"),
                ("OTEL_EXPORTER_OTLP_TIMEOUT", "250"),
                (ENV_BSP_EXPORT_TIMEOUT, "0"),
                ("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "zstd"),
            ],
        )
        .unwrap();
        assert_eq!(settings.schedule_delay, Duration::from_secs(5));
        assert_eq!((settings.max_queue, settings.max_batch), (2048, 512));
        assert_eq!(settings.timeout, Duration::from_millis(250));
        assert_eq!(settings.export_timeout, Duration::from_secs(30));
        assert!(!settings.gzip);
    }

    #[test]
    fn the_sdks_own_resource_attributes_win() {
        let vars: HashMap<&str, &str> = [(
            ENV_RESOURCE_ATTRIBUTES,
            "service.name=theirs,deployment.environment=prod%201",
        )]
        .into_iter()
        .collect();
        let resource = resource(&|n: &str| vars.get(n).copied().unwrap_or(""), "ours", "1.2");
        let found: HashMap<String, String> = resource
            .attributes
            .into_iter()
            .map(|kv| match kv.value.and_then(|v| v.value) {
                Some(any_value::Value::StringValue(value)) => (kv.key, value),
                None => (kv.key, String::new()),
            })
            .collect();
        assert_eq!(found["service.name"], "ours");
        assert_eq!(found["service.version"], "1.2");
        assert_eq!(found["deployment.environment"], "prod 1");
        assert_eq!(found["telemetry.sdk.language"], "rust");
    }

    fn a_span(name: &str) -> Span {
        Span {
            trace_id: vec![1; 16],
            span_id: vec![2; 8],
            name: name.to_string(),
            kind: SPAN_KIND_SERVER,
            ..Default::default()
        }
    }

    /// One HTTP/1.1 request as a collector reads it: its head and its body.
    async fn read_request<IO: AsyncRead + Unpin>(stream: &mut BufReader<IO>) -> (String, Vec<u8>) {
        let mut head = String::new();
        loop {
            let mut line = String::new();
            stream.read_line(&mut line).await.unwrap();
            if line == "\r\n" || line.is_empty() {
                break;
            }
            head.push_str(&line);
        }
        let length: usize = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().parse().unwrap())
            })
            .unwrap();
        let mut body = vec![0; length];
        stream.read_exact(&mut body).await.unwrap();
        (head, body)
    }

    #[tokio::test]
    async fn a_batch_reaches_the_collector_as_otlp_protobuf() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let url = format!("http://user:pw@127.0.0.1:{port}/v1/traces");
        let settings = settings(
            &url,
            &[
                (ENV_BSP_SCHEDULE_DELAY, "10"),
                ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "x-tenant=t1"),
            ],
        )
        .unwrap();
        let pipeline = Pipeline::start(settings, Resource::default()).unwrap();
        pipeline.send(a_span("first"));
        let (socket, _) = listener.accept().await.unwrap();
        let mut socket = BufReader::new(socket);
        let (head, body) = read_request(&mut socket).await;
        socket
            .get_mut()
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            .await
            .unwrap();
        assert!(head.starts_with("POST /v1/traces HTTP/1.1\r\n"), "{head}");
        let head = head.to_ascii_lowercase();
        for needed in [
            "content-type: application/x-protobuf",
            &format!("host: 127.0.0.1:{port}"),
            "x-tenant: t1",
            "authorization: basic ",
        ] {
            assert!(head.contains(needed), "{needed} missing from {head}");
        }
        let request: ExportTraceServiceRequest = prost::Message::decode(body.as_slice()).unwrap();
        let scope = &request.resource_spans[0].scope_spans[0];
        assert_eq!(scope.scope.as_ref().unwrap().name, SCOPE);
        assert_eq!(scope.spans, vec![a_span("first")]);

        // The next batch, on the same connection, at the stop.
        pipeline.send(a_span("second"));
        let collector = async {
            let (_, body) = read_request(&mut socket).await;
            socket
                .get_mut()
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                .await
                .unwrap();
            body
        };
        let (flushed, body) =
            tokio::join!(pipeline.flush_within(Duration::from_secs(20)), collector);
        assert!(flushed);
        let request: ExportTraceServiceRequest = prost::Message::decode(body.as_slice()).unwrap();
        assert_eq!(
            request.resource_spans[0].scope_spans[0].spans,
            vec![a_span("second")]
        );
    }

    #[tokio::test]
    async fn an_https_collector_is_checked_against_the_certificate_variable() {
        // A CA, and the collector's certificate for "localhost" that it signed.
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = rcgen::CertifiedIssuer::self_signed(ca, ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        let cert = params.signed_by(&key, &ca).unwrap().der().clone();
        let key = rustls::pki_types::PrivatePkcs8KeyDer::from(key.serialize_der());
        let roots = std::env::temp_dir().join(format!("otlp-roots-{}.pem", std::process::id()));
        std::fs::write(&roots, ca.pem()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert], key.into())
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let settings = settings(
            &format!("https://localhost:{port}/v1/traces"),
            &[
                (ENV_BSP_SCHEDULE_DELAY, "600000"),
                ("OTEL_EXPORTER_OTLP_CERTIFICATE", roots.to_str().unwrap()),
                ("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip"),
            ],
        )
        .unwrap();
        let pipeline = Pipeline::start(settings, Resource::default()).unwrap();
        std::fs::remove_file(&roots).unwrap();
        pipeline.send(a_span("secure"));
        let collector = async {
            let (socket, _) = listener.accept().await.unwrap();
            let mut stream = BufReader::new(acceptor.accept(socket).await.unwrap());
            let (head, body) = read_request(&mut stream).await;
            stream
                .get_mut()
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                .await
                .unwrap();
            stream.get_mut().flush().await.unwrap();
            (head, body)
        };
        let (flushed, (head, body)) =
            tokio::join!(pipeline.flush_within(Duration::from_secs(20)), collector);
        assert!(flushed);
        assert!(
            head.to_ascii_lowercase().contains("content-encoding: gzip"),
            "{head}"
        );
        let mut encoded = Vec::new();
        std::io::Read::read_to_end(
            &mut flate2::read::GzDecoder::new(body.as_slice()),
            &mut encoded,
        )
        .unwrap();
        let request: ExportTraceServiceRequest =
            prost::Message::decode(encoded.as_slice()).unwrap();
        assert_eq!(
            request.resource_spans[0].scope_spans[0].spans,
            vec![a_span("secure")]
        );
    }

    #[tokio::test]
    async fn a_silent_collector_holds_the_flush_for_its_bound_only() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let held = tokio::spawn(async move {
            let mut sockets = Vec::new();
            loop {
                let (socket, _) = listener.accept().await.unwrap();
                sockets.push(socket); // accepted, never answered
            }
        });
        let settings = settings(
            &format!("http://127.0.0.1:{port}/v1/traces"),
            &[(ENV_BSP_SCHEDULE_DELAY, "600000")],
        )
        .unwrap();
        let pipeline = Pipeline::start(settings, Resource::default()).unwrap();
        pipeline.send(a_span("held"));
        let began = std::time::Instant::now();
        assert!(!pipeline.flush_within(Duration::from_millis(300)).await);
        let took = began.elapsed();
        assert!(took < Duration::from_secs(3), "the flush took {took:?}");
        // Asked again, there is nothing left to wait for.
        assert!(pipeline.flush_within(Duration::from_secs(5)).await);
        held.abort();
    }

    #[test]
    fn tenths_reads_as_few_digits_as_it_takes() {
        assert_eq!(tenths(Duration::from_secs(1)), "1");
        assert_eq!(tenths(Duration::from_millis(4_234)), "4.2");
        assert_eq!(tenths(Duration::ZERO), "0");
    }
}
