//! etcd's v3 JSON gateway as a registering plugin reaches it (`super`): over `http://` or
//! `https://`, with a client certificate, as one of etcd's users, the same contract as the
//! Go and Python SDKs' (docs/registry.md, "A plugin registers itself"). hyper's HTTP/1.1
//! client and rustls, both in the gRPC stack already, carry it: no etcd client crate.
//!
//! Every setting is checked before the plugin serves: TLS files only with an `https://`
//! etcd, a client certificate with its key, a user with a password, and a password over
//! plain `http://` only to a loopback etcd, where it crosses no network. A user
//! authenticates (`/v3/auth/authenticate`) and sends its token with every request; etcd
//! forgets a simple token left unused for its `--auth-token-ttl`, and every token when it
//! restarts, so a request it refuses for that (HTTP 401, gRPC code 16) is sent once more
//! with a new token. An etcd whose authentication is off is used without a token, as
//! etcd's own clients do (said once); should it turn authentication on, the first request
//! it refuses is sent once more with a token.
//!
//! Errors: [`EtcdError::Refused`] when etcd answered and turned the plugin away (the TLS
//! handshake, the user's password or permission), [`EtcdError::Unavailable`] for anything
//! else (no answer, an answer cut off or not etcd's JSON). No message holds the password
//! or a token.

use std::error::Error;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::Request;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::{json, Map, Value};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_rustls::TlsConnector;

use super::settings::{
    RegistryConfig, Setting, CA_FILE, CERT_FILE, ENV_REGISTER_ETCD_PASSWORD, KEY_FILE, USER,
};

/// gRPC status codes etcd's gateway reports: `code` in a unary answer, `error.grpc_code`
/// in a stream's (the lease keepalive's).
const CODE_INVALID_ARGUMENT: i64 = 3; // authentication failed: a wrong user name or password
const CODE_PERMISSION_DENIED: i64 = 7; // the user may not do this
const CODE_FAILED_PRECONDITION: i64 = 9; // authentication is not enabled
const CODE_UNAUTHENTICATED: i64 = 16; // invalid auth token: expired unused, or etcd restarted

/// The largest answer read from etcd: its answers here are a few hundred bytes.
const MAX_ETCD_ANSWER: usize = 1 << 20;

/// Why a request to etcd did not do what it asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum EtcdError {
    /// etcd does not answer, or not as etcd: tried again about every second.
    Unavailable(String),
    /// etcd answered and turned the plugin away: retried after waits that grow, as an
    /// operator may mend etcd's side while the plugin serves.
    Refused(String),
}

impl EtcdError {
    pub(crate) fn is_refusal(&self) -> bool {
        matches!(self, EtcdError::Refused(_))
    }
}

impl fmt::Display for EtcdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EtcdError::Unavailable(message) | EtcdError::Refused(message) => f.write_str(message),
        }
    }
}

/// Why an etcd URL is not taken.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum UrlProblem {
    NotHttp,
    Credentials,
    HostOrPort,
}

/// The etcd's URL, taken apart.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct EtcdUrl {
    pub(crate) https: bool,
    /// A name or an IP address, without brackets.
    pub(crate) host: String,
    pub(crate) port: u16,
    /// The `Host` header: the authority as written.
    authority: String,
    /// A path the gateway is under (behind a proxy), without its last `/`; mostly empty.
    path: String,
    /// The URL as messages show it, without its last `/`.
    pub(crate) shown: String,
}

impl EtcdUrl {
    /// `http://` or `https://`, a host and a port in 1-65535 (the scheme's by default), no
    /// user and password, no query.
    pub(crate) fn parse(text: &str) -> Result<EtcdUrl, UrlProblem> {
        if text.bytes().any(|b| b <= b' ' || b == 0x7f) {
            return Err(UrlProblem::NotHttp);
        }
        let (scheme, rest) = text.split_once("://").ok_or(UrlProblem::NotHttp)?;
        let https = match scheme.to_ascii_lowercase().as_str() {
            "http" => false,
            "https" => true,
            _ => return Err(UrlProblem::NotHttp),
        };
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(end);
        if authority.is_empty() || path.contains(['?', '#']) {
            return Err(UrlProblem::NotHttp);
        }
        if authority.contains('@') {
            return Err(UrlProblem::Credentials);
        }
        let (host, port) = match authority.strip_prefix('[') {
            Some(bracketed) => {
                let (inside, after) = bracketed.split_once(']').ok_or(UrlProblem::HostOrPort)?;
                inside
                    .parse::<std::net::Ipv6Addr>()
                    .map_err(|_| UrlProblem::HostOrPort)?;
                match after {
                    "" => (inside, None),
                    _ => (
                        inside,
                        Some(after.strip_prefix(':').ok_or(UrlProblem::HostOrPort)?),
                    ),
                }
            }
            None => match authority.split_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            },
        };
        if !authority.starts_with('[') && !is_host_name(host) {
            return Err(UrlProblem::HostOrPort);
        }
        let port = match port {
            None | Some("") => {
                if https {
                    443
                } else {
                    80
                }
            }
            Some(digits) if digits.bytes().all(|b| b.is_ascii_digit()) => {
                match digits.parse::<u16>() {
                    Ok(port) if port >= 1 => port,
                    _ => return Err(UrlProblem::HostOrPort),
                }
            }
            Some(_) => return Err(UrlProblem::HostOrPort),
        };
        Ok(EtcdUrl {
            https,
            host: host.to_string(),
            port,
            authority: authority.to_string(),
            path: path.trim_end_matches('/').to_string(),
            shown: text.trim_end_matches('/').to_string(),
        })
    }
}

/// An IPv4 address or a DNS name: dot-separated labels of letters, digits, `-` and `_`,
/// none empty (`etcd..internal` would fail as an outage would, retried for ever).
fn is_host_name(host: &str) -> bool {
    let host = host.strip_suffix('.').unwrap_or(host);
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// 127.0.0.0/8, `::1` (and `::ffff:127.x.y.z`), `localhost`: hosts this machine's own
/// traffic never leaves.
pub(crate) fn is_loopback(host: &str) -> bool {
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    match host.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(ip)) => ip.is_loopback(),
        Ok(std::net::IpAddr::V6(ip)) => {
            ip.is_loopback() || ip.to_ipv4_mapped().is_some_and(|ip| ip.is_loopback())
        }
        Err(_) => false,
    }
}

/// An HTTP/1.1 connection: the handle to send on, and the task that drives it, which ends
/// with the connection's error, if any.
struct Connection {
    sender: SendRequest<Full<Bytes>>,
    driver: JoinHandle<Result<(), hyper::Error>>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// Posts to etcd's JSON gateway as the configured user, over one kept-open connection.
/// Used by the registration's task alone.
pub(crate) struct Gateway {
    url: EtcdUrl,
    timeout: Duration,
    tls: Option<TlsConnector>,
    connection: Option<Connection>,
    user: String,
    password: String,
    token: String,
    /// Whether a CA file and a client certificate were given, for the hints of messages.
    ca_given: bool,
    cert_given: bool,
    /// How messages name the CA, certificate and user settings, as they were given.
    ca_name: String,
    cert_name: String,
    user_name: String,
    /// etcd answered that its authentication is off: requests go without a token.
    authentication_off: bool,
}

impl fmt::Debug for Gateway {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the password or the token.
        f.debug_struct("Gateway")
            .field("etcd", &self.url.shown)
            .field("user", &self.user)
            .field("has_token", &!self.token.is_empty())
            .field("authentication_off", &self.authentication_off)
            .finish_non_exhaustive()
    }
}

impl Gateway {
    /// Checks how etcd at `url` is reached, as `config` says, and returns a gateway whose
    /// requests are each bounded by `timeout`. Messages name each setting as it was given.
    pub(crate) fn new(
        url: EtcdUrl,
        config: &RegistryConfig,
        timeout: Duration,
    ) -> Result<Gateway, String> {
        let (ca_file, cert_file, key_file) = (
            config.value(CA_FILE),
            config.value(CERT_FILE),
            config.value(KEY_FILE),
        );
        let (user, password) = (config.value(USER), config.var(ENV_REGISTER_ETCD_PASSWORD));
        let name = |setting: Setting| config.name(setting);
        if user.is_empty() != password.is_empty() {
            let (given, missing) = if user.is_empty() {
                (ENV_REGISTER_ETCD_PASSWORD.to_string(), name(USER))
            } else {
                (name(USER), ENV_REGISTER_ETCD_PASSWORD.to_string())
            };
            return Err(format!(
                "{given} needs {missing} too: etcd takes both or neither"
            ));
        }
        if cert_file.is_empty() != key_file.is_empty() {
            let (given, missing) = if cert_file.is_empty() {
                (name(KEY_FILE), name(CERT_FILE))
            } else {
                (name(CERT_FILE), name(KEY_FILE))
            };
            return Err(format!(
                "{given} needs {missing} too: a client certificate and its key"
            ));
        }
        let tls = if !url.https {
            for (setting, file) in [
                (CA_FILE, ca_file),
                (CERT_FILE, cert_file),
                (KEY_FILE, key_file),
            ] {
                if !file.is_empty() {
                    return Err(format!(
                        "{} is for an https:// etcd, and {} is not: use https:// or leave it unset",
                        name(setting),
                        url.shown
                    ));
                }
            }
            if !password.is_empty() && !is_loopback(&url.host) {
                return Err(format!(
                    "{ENV_REGISTER_ETCD_PASSWORD} would cross the network in clear to {}: \
                     reach etcd over https://, or on a loopback address",
                    url.shown
                ));
            }
            None
        } else {
            Some(tls_connector(
                (ca_file, &name(CA_FILE)),
                (cert_file, &name(CERT_FILE)),
                (key_file, &name(KEY_FILE)),
            )?)
        };
        Ok(Gateway {
            timeout,
            tls,
            connection: None,
            user: user.to_string(),
            password: password.to_string(),
            token: String::new(),
            ca_given: !ca_file.is_empty(),
            cert_given: !cert_file.is_empty(),
            ca_name: name(CA_FILE),
            cert_name: name(CERT_FILE),
            user_name: name(USER),
            authentication_off: false,
            url,
        })
    }

    /// The etcd as messages show it.
    pub(crate) fn shown(&self) -> &str {
        &self.url.shown
    }

    /// What bounds each request.
    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Sends `body` to `path` as the configured user; etcd's answer (its error answers are
    /// JSON too), or why there is none.
    pub(crate) async fn post(
        &mut self,
        path: &str,
        body: Value,
    ) -> Result<Map<String, Value>, EtcdError> {
        if !self.user.is_empty() && self.token.is_empty() && !self.authentication_off {
            self.authenticate().await?;
        }
        let (mut status, mut answer) = self.exchange(path, &body, true).await?;
        let mut code = grpc_code(&answer);
        // A token that expired unused or that a restarted etcd forgot; or none, and etcd
        // has turned its authentication on since: a new token, and one more try.
        let stale = status == 401 && code == CODE_UNAUTHENTICATED;
        let tokenless = status == 403 && code == CODE_PERMISSION_DENIED && self.token.is_empty();
        if !self.user.is_empty() && (stale || tokenless) {
            self.token.clear();
            self.authentication_off = false;
            self.authenticate().await?;
            (status, answer) = self.exchange(path, &body, true).await?;
            code = grpc_code(&answer);
        }
        if (status == 401 || status == 403)
            && (code == CODE_UNAUTHENTICATED || code == CODE_PERMISSION_DENIED)
        {
            return Err(self.refusal(path, code, &answer));
        }
        Ok(answer)
    }

    /// Sets the user's token, or notes that etcd's authentication is off.
    async fn authenticate(&mut self) -> Result<(), EtcdError> {
        let body = json!({"name": self.user, "password": self.password});
        let (status, answer) = self.exchange("/v3/auth/authenticate", &body, false).await?;
        if let (200, Some(Value::String(token))) = (status, answer.get("token")) {
            if !token.is_empty() {
                self.token = token.clone();
                return Ok(());
            }
        }
        match grpc_code(&answer) {
            CODE_INVALID_ARGUMENT => Err(EtcdError::Refused(format!(
                "etcd at {} refused user '{}': authentication failed (a wrong user name or {})",
                self.url.shown, self.user, ENV_REGISTER_ETCD_PASSWORD
            ))),
            CODE_FAILED_PRECONDITION => {
                // "authentication is not enabled"
                self.authentication_off = true;
                crate::log::warn(&format!(
                    "etcd at {} has authentication off: registering without user '{}' ({} can be unset)",
                    self.url.shown, self.user, self.user_name
                ));
                Ok(())
            }
            _ => Err(EtcdError::Unavailable(format!(
                "etcd at {} did not authenticate user '{}'{}",
                self.url.shown,
                self.user,
                why(&answer)
            ))),
        }
    }

    fn refusal(&self, path: &str, code: i64, answer: &Map<String, Value>) -> EtcdError {
        let shown = &self.url.shown;
        EtcdError::Refused(if self.user.is_empty() {
            format!(
                "etcd at {shown} requires a user ({}): set {} and {ENV_REGISTER_ETCD_PASSWORD}",
                message(answer),
                self.user_name
            )
        } else if code == CODE_PERMISSION_DENIED {
            format!(
                "etcd at {shown} denies user '{}' {path} (permission denied): \
                 grant the user's role READWRITE on the registry prefix",
                self.user
            )
        } else {
            format!(
                "etcd at {shown} refused the token it just gave user '{}' ({})",
                self.user,
                message(answer)
            )
        })
    }

    /// One POST, with the token when `with_token` and there is one; the status and the
    /// JSON answer, all within the timeout.
    async fn exchange(
        &mut self,
        path: &str,
        body: &Value,
        with_token: bool,
    ) -> Result<(u16, Map<String, Value>), EtcdError> {
        let payload = Bytes::from(serde_json::to_vec(body).expect("a JSON value serializes"));
        let token = match with_token && !self.token.is_empty() {
            true => {
                let mut value = HeaderValue::from_str(&self.token).map_err(|_| {
                    EtcdError::Unavailable(format!(
                        "etcd at {} gave a token that is no HTTP header",
                        self.url.shown
                    ))
                })?;
                value.set_sensitive(true);
                Some(value)
            }
            false => None,
        };
        match tokio::time::timeout(self.timeout, self.round_trip(path, payload, token)).await {
            Ok(outcome) => outcome,
            Err(_) => {
                // It may yet answer that request: the connection is not used again.
                self.connection = None;
                Err(EtcdError::Unavailable(format!(
                    "{} does not answer within {}",
                    self.url.shown,
                    seconds(self.timeout)
                )))
            }
        }
    }

    async fn round_trip(
        &mut self,
        path: &str,
        payload: Bytes,
        token: Option<HeaderValue>,
    ) -> Result<(u16, Map<String, Value>), EtcdError> {
        let reused = self
            .connection
            .as_ref()
            .is_some_and(|connection| !connection.sender.is_closed());
        if !reused {
            self.connection = Some(self.connect().await?);
        }
        let sent = match self.send(path, payload.clone(), token.clone()).await {
            // A kept-open connection etcd closed as the request went: once more, afresh.
            Err(_) if reused => {
                self.connection = Some(self.connect().await?);
                self.send(path, payload, token).await
            }
            sent => sent,
        };
        let response = match sent {
            Ok(response) => response,
            Err(err) => {
                // The request may fail only as "channel closed" while the connection's
                // driver holds why: etcd's TLS alert, which TLS 1.3 brings after the
                // client's side of the handshake is over, read with the answer.
                let cause = match self.connection.take() {
                    Some(mut connection) => {
                        let ended = Duration::from_secs(1);
                        match tokio::time::timeout(ended, &mut connection.driver).await {
                            Ok(Ok(Err(cause))) => Some(cause),
                            _ => None,
                        }
                    }
                    None => None,
                };
                return Err(match cause {
                    Some(cause) if rustls_error(&cause).is_some() => self.failure(&cause),
                    _ => self.failure(err.as_ref()),
                });
            }
        };
        let status = response.status().as_u16();
        let raw = match Limited::new(response.into_body(), MAX_ETCD_ANSWER)
            .collect()
            .await
        {
            Ok(collected) => collected.to_bytes(),
            Err(err) => {
                self.connection = None;
                return Err(EtcdError::Unavailable(format!(
                    "{}: the answer broke off ({})",
                    self.url.shown,
                    chain(err.as_ref())
                )));
            }
        };
        match serde_json::from_slice::<Value>(&raw) {
            Ok(Value::Object(answer)) => Ok((status, answer)),
            _ => Err(EtcdError::Unavailable(format!(
                "{} answered something that is not a JSON object",
                self.url.shown
            ))),
        }
    }

    async fn send(
        &mut self,
        path: &str,
        payload: Bytes,
        token: Option<HeaderValue>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, Box<dyn Error + Send + Sync>> {
        let connection = self.connection.as_mut().expect("connected before sending");
        let mut request =
            Request::post(format!("{}{path}", self.url.path)).body(Full::new(payload))?;
        let headers = request.headers_mut();
        headers.insert(HOST, HeaderValue::from_str(&self.url.authority)?);
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(token) = token {
            headers.insert(AUTHORIZATION, token);
        }
        connection.sender.ready().await?;
        Ok(connection.sender.send_request(request).await?)
    }

    async fn connect(&self) -> Result<Connection, EtcdError> {
        let shown = &self.url.shown;
        let tcp = TcpStream::connect((self.url.host.as_str(), self.url.port))
            .await
            .map_err(|err| EtcdError::Unavailable(format!("{shown} does not answer ({err})")))?;
        let _ = tcp.set_nodelay(true);
        let Some(tls) = &self.tls else {
            return handshake(tcp, shown).await;
        };
        let name = ServerName::try_from(self.url.host.clone()).map_err(|err| {
            EtcdError::Unavailable(format!("{shown}: no name TLS can verify ({err})"))
        })?;
        let stream = tls
            .connect(name, tcp)
            .await
            .map_err(|err| self.failure(&err))?;
        handshake(stream, shown).await
    }

    /// Why a request got no answer: etcd turned the plugin away in the TLS handshake (a
    /// refusal, after which it waits longer to try again), or it does not answer.
    fn failure(&self, err: &(dyn Error + 'static)) -> EtcdError {
        let shown = &self.url.shown;
        let Some(tls) = rustls_error(err) else {
            // A connection refused or reset, or closed mid-handshake (an end of file) by a
            // flaky etcd or load balancer: tried again soon.
            return EtcdError::Unavailable(format!("{shown} does not answer ({})", chain(err)));
        };
        EtcdError::Refused(match tls {
            rustls::Error::InvalidCertificate(_) => {
                let hint = if self.ca_given {
                    format!("is {} the CA that issued it?", self.ca_name)
                } else {
                    format!("name the CA that issued it with {}", self.ca_name)
                };
                format!("cannot verify etcd's certificate at {shown} ({tls}): {hint}")
            }
            // etcd's word: it does not trust the client's certificate, or got none. With
            // TLS 1.3 it comes after the client's side of the handshake is over, read
            // with the answer to the request.
            rustls::Error::AlertReceived(_) => {
                let hint = if self.cert_given {
                    format!("does etcd trust the certificate of {}?", self.cert_name)
                } else {
                    format!("etcd may require a client certificate ({})", self.cert_name)
                };
                format!(
                    "the TLS handshake with etcd at {shown} failed (remote error: {tls}): {hint}"
                )
            }
            // What answered does not speak TLS (an http:// etcd, another service).
            _ => format!(
                "the TLS handshake with etcd at {shown} failed ({tls}): \
                 is it etcd's TLS port, speaking TLS 1.2 or later?"
            ),
        })
    }
}

/// The rustls error somewhere in `err`'s chain, through the I/O errors that carry it.
fn rustls_error<'a>(mut err: &'a (dyn Error + 'static)) -> Option<&'a rustls::Error> {
    loop {
        if let Some(tls) = err.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        // An io::Error's source() skips the error it wraps: look at that one itself.
        if let Some(inner) = err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            err = inner;
            continue;
        }
        err = err.source()?;
    }
}

/// `err` and what caused it, each said once.
fn chain(err: &(dyn Error + 'static)) -> String {
    let mut said = err.to_string();
    let mut next = err.source();
    while let Some(cause) = next {
        let text = cause.to_string();
        if !said.contains(&text) {
            said = format!("{said}: {text}");
        }
        next = cause.source();
    }
    said
}

fn seconds(duration: Duration) -> String {
    format!("{}s", duration.as_secs_f64())
}

async fn handshake<IO>(io: IO, shown: &str) -> Result<Connection, EtcdError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|err| EtcdError::Unavailable(format!("{shown} does not answer ({err})")))?;
    let driver = tokio::spawn(connection);
    Ok(Connection { sender, driver })
}

/// The TLS client of an `https://` etcd: the roots of the CA file, else the system's, and
/// the client certificate, if any. Each file is `(path, how messages name it)`.
fn tls_connector(
    (ca_file, ca_name): (&str, &str),
    (cert_file, cert_name): (&str, &str),
    (key_file, key_name): (&str, &str),
) -> Result<TlsConnector, String> {
    let mut roots = rustls::RootCertStore::empty();
    if ca_file.is_empty() {
        for cert in rustls_native_certs::load_native_certs().certs {
            let _ = roots.add(cert); // one the system trusts but rustls cannot read
        }
    } else {
        let certs = CertificateDer::pem_file_iter(ca_file)
            .map_err(|err| format!("{ca_name}: cannot read {ca_file} ({})", pem_reason(&err)))?;
        for cert in certs {
            let cert = cert.map_err(|err| {
                format!("{ca_name}: cannot read {ca_file} ({})", pem_reason(&err))
            })?;
            roots.add(cert).map_err(|err| {
                format!("{ca_name}: {ca_file} holds a certificate that cannot be used ({err})")
            })?;
        }
        if roots.is_empty() {
            return Err(format!("{ca_name}: {ca_file} holds no PEM certificate"));
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|err| format!("TLS: {err}"))?
        .with_root_certificates(roots);
    let mut config = if cert_file.is_empty() {
        builder.with_no_client_auth()
    } else {
        let unreadable = |reason: String| {
            format!(
                "{cert_name} and {key_name}: cannot read {cert_file} and {key_file} as a PEM \
                 certificate and its unencrypted key ({reason})"
            )
        };
        let certs = CertificateDer::pem_file_iter(cert_file)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|err| unreadable(pem_reason(&err)))?;
        if certs.is_empty() {
            return Err(unreadable(format!("no certificate in {cert_file}")));
        }
        let key =
            PrivateKeyDer::from_pem_file(key_file).map_err(|err| unreadable(pem_reason(&err)))?;
        builder
            .with_client_auth_cert(certs, key)
            .map_err(|err| unreadable(err.to_string()))?
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsConnector::from(Arc::new(config)))
}

/// What went wrong reading a PEM file, without the file's content.
fn pem_reason(err: &rustls::pki_types::pem::Error) -> String {
    match err {
        rustls::pki_types::pem::Error::Io(io) => io.to_string(),
        rustls::pki_types::pem::Error::NoItemsFound => "no PEM data".to_string(),
        other => format!("{other:?}"),
    }
}

/// Reads the gateway's int64s, which it writes as strings.
pub(crate) fn number(value: Option<&Value>) -> i64 {
    match value {
        Some(Value::String(text)) => text.parse().unwrap_or(0),
        Some(Value::Number(number)) => number
            .as_i64()
            .or_else(|| number.as_f64().map(|float| float as i64))
            .unwrap_or(0),
        _ => 0,
    }
}

/// The gRPC status code of an error answer, 0 in any other.
fn grpc_code(answer: &Map<String, Value>) -> i64 {
    if let Some(code) = answer.get("code") {
        return number(Some(code));
    }
    match answer.get("error") {
        Some(Value::Object(stream)) => number(stream.get("grpc_code")),
        _ => 0,
    }
}

/// etcd's message in an error answer (a stream's is inside `error`), on one line and at
/// most 200 bytes.
pub(crate) fn message(answer: &Map<String, Value>) -> String {
    let mut text = match answer.get("message") {
        Some(Value::String(text)) => text.as_str(),
        _ => "",
    };
    if text.is_empty() {
        if let Some(Value::Object(stream)) = answer.get("error") {
            if let Some(Value::String(inner)) = stream.get("message") {
                text = inner;
            }
        }
    }
    let mut end = text.len().min(200);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].split_whitespace().collect::<Vec<_>>().join(" ")
}

/// etcd's message in an error answer as `: <message>` to append, or nothing.
pub(crate) fn why(answer: &Map<String, Value>) -> String {
    match message(answer) {
        text if text.is_empty() => String::new(),
        text => format!(": {text}"),
    }
}

#[cfg(test)]
pub(super) mod tests {
    //! The gateway against a fake etcd on a loopback port that answers what each test
    //! scripts (a real etcd: tests/test_plugin_registry_secure.py).

    use super::*;
    use std::collections::HashMap;
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    use tokio::net::TcpListener;

    const PASSWORD: &str = "SECRET-pw-77";

    /// One request as the fake etcd saw it: its path, its `authorization`, its body.
    type Seen = (String, Option<String>, String);

    /// A fake etcd answering `answers` in order, one per request, on kept-open
    /// connections; what it saw, once the answers ran out.
    pub(in crate::registry) async fn fake_etcd(
        answers: Vec<(u16, String)>,
    ) -> (String, JoinHandle<Vec<Seen>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let mut answers = answers.into_iter();
            let mut seen = Vec::new();
            'connections: loop {
                let (stream, _) = listener.accept().await.unwrap();
                let mut stream = BufReader::new(stream);
                loop {
                    let (mut path, mut auth, mut length) = (String::new(), None, 0);
                    let mut line = String::new();
                    if stream.read_line(&mut line).await.unwrap_or(0) == 0 {
                        if answers.len() == 0 {
                            return seen; // every answer given, and the client gone
                        }
                        continue 'connections;
                    }
                    path.push_str(line.split(' ').nth(1).unwrap_or(""));
                    loop {
                        line.clear();
                        stream.read_line(&mut line).await.unwrap();
                        let header = line.trim_end();
                        if header.is_empty() {
                            break;
                        }
                        let (name, value) = header.split_once(": ").unwrap();
                        match name.to_ascii_lowercase().as_str() {
                            "content-length" => length = value.parse().unwrap(),
                            "authorization" => auth = Some(value.to_string()),
                            _ => {}
                        }
                    }
                    let mut body = vec![0; length];
                    stream.read_exact(&mut body).await.unwrap();
                    seen.push((path, auth, String::from_utf8(body).unwrap()));
                    let Some((status, answer)) = answers.next() else {
                        return seen;
                    };
                    let head = format!(
                        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n\
                         content-length: {}\r\n\r\n",
                        answer.len()
                    );
                    let stream = stream.get_mut();
                    let written = async {
                        stream.write_all(head.as_bytes()).await?;
                        stream.write_all(answer.as_bytes()).await
                    };
                    if written.await.is_err() {
                        continue 'connections; // the client stopped reading
                    }
                }
            }
        });
        (url, task)
    }

    fn gateway(url: &str, user: &str) -> Gateway {
        let vars: HashMap<&str, &str> = HashMap::from([
            ("LINCHKIT_REGISTER_ETCD_USER", user),
            (
                ENV_REGISTER_ETCD_PASSWORD,
                if user.is_empty() { "" } else { PASSWORD },
            ),
        ]);
        let config = RegistryConfig::new([], |name| vars.get(name).copied().unwrap_or(""));
        Gateway::new(
            EtcdUrl::parse(url).unwrap(),
            &config,
            Duration::from_secs(5),
        )
        .unwrap()
    }

    pub(in crate::registry) fn answer(status: u16, body: &str) -> (u16, String) {
        (status, body.to_string())
    }

    #[tokio::test]
    async fn a_token_etcd_forgot_is_replaced_and_the_request_sent_once_more() {
        let (url, seen) = fake_etcd(vec![
            answer(200, r#"{"token":"t1"}"#),
            answer(
                401,
                r#"{"code":16,"message":"etcdserver: invalid auth token"}"#,
            ),
            answer(200, r#"{"token":"t2"}"#),
            answer(200, r#"{"header":{}}"#),
        ])
        .await;
        let mut etcd = gateway(&url, "registrar");
        let put = etcd.post("/v3/kv/put", json!({"key": "a"})).await.unwrap();
        assert!(put.contains_key("header"));
        drop(etcd);
        let seen = seen.await.unwrap();
        let asked: Vec<(&str, Option<&str>)> = seen
            .iter()
            .map(|(path, auth, _)| (path.as_str(), auth.as_deref()))
            .collect();
        assert_eq!(
            asked,
            [
                ("/v3/auth/authenticate", None),
                ("/v3/kv/put", Some("t1")),
                ("/v3/auth/authenticate", None),
                ("/v3/kv/put", Some("t2")),
            ]
        );
        assert!(
            seen[0].2.contains(PASSWORD),
            "the password goes to etcd only"
        );
    }

    #[tokio::test]
    async fn a_wrong_password_is_a_refusal_that_names_the_user_and_not_the_password() {
        let (url, _seen) = fake_etcd(vec![answer(
            400,
            r#"{"code":3,"message":"etcdserver: authentication failed, invalid user ID or password"}"#,
        )])
        .await;
        let mut etcd = gateway(&url, "registrar");
        let refused = etcd.post("/v3/lease/grant", json!({"TTL": 10})).await;
        let Err(EtcdError::Refused(said)) = refused else {
            panic!("{refused:?}");
        };
        assert!(said.contains("'registrar'") && said.contains("authentication failed"));
        assert!(!said.contains(PASSWORD) && !format!("{etcd:?}").contains(PASSWORD));
    }

    #[tokio::test]
    async fn a_user_whose_role_may_not_write_is_told_what_to_grant() {
        let (url, _seen) = fake_etcd(vec![
            answer(200, r#"{"token":"t1"}"#),
            answer(
                403,
                r#"{"code":7,"message":"etcdserver: permission denied"}"#,
            ),
        ])
        .await;
        let mut etcd = gateway(&url, "reader");
        let refused = etcd.post("/v3/kv/put", json!({})).await.unwrap_err();
        assert!(refused.is_refusal());
        assert!(refused
            .to_string()
            .contains("denies user 'reader' /v3/kv/put"));
        assert!(refused.to_string().contains("READWRITE"));
    }

    #[tokio::test]
    async fn a_user_for_an_etcd_without_authentication_goes_without_a_token() {
        let (url, seen) = fake_etcd(vec![
            answer(
                400,
                r#"{"code":9,"message":"etcdserver: authentication is not enabled"}"#,
            ),
            answer(200, r#"{"ID":"7","TTL":"10"}"#),
            answer(200, r#"{"ID":"8","TTL":"10"}"#),
        ])
        .await;
        let mut etcd = gateway(&url, "registrar");
        for _ in 0..2 {
            let granted = etcd.post("/v3/lease/grant", json!({})).await.unwrap();
            assert!(number(granted.get("ID")) > 0);
        }
        drop(etcd);
        let seen = seen.await.unwrap();
        assert_eq!(seen.len(), 3, "authenticated once: {seen:?}");
        assert!(seen.iter().all(|(_, auth, _)| auth.is_none()));
    }

    #[tokio::test]
    async fn an_answer_that_is_not_etcds_json_or_too_large_is_an_outage() {
        let large = format!(r#"{{"pad":"{}"}}"#, "x".repeat(MAX_ETCD_ANSWER));
        let (url, _seen) = fake_etcd(vec![answer(200, "<html>proxy</html>"), (200, large)]).await;
        let mut etcd = gateway(&url, "");
        let html = etcd.post("/v3/lease/grant", json!({})).await.unwrap_err();
        assert!(!html.is_refusal() && html.to_string().contains("not a JSON object"));
        let large = etcd.post("/v3/lease/grant", json!({})).await.unwrap_err();
        assert!(
            !large.is_refusal() && large.to_string().contains("the answer broke off"),
            "{large}"
        );
    }

    #[tokio::test]
    async fn an_etcd_that_refuses_connections_does_not_answer() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        drop(listener);
        let failed = gateway(&url, "")
            .post("/v3/lease/grant", json!({}))
            .await
            .unwrap_err();
        assert!(!failed.is_refusal());
        assert!(failed
            .to_string()
            .starts_with(&format!("{url} does not answer (")));
    }

    #[test]
    fn an_etcd_url_is_http_or_https_with_a_host_and_a_port() {
        let parsed = EtcdUrl::parse("https://[::1]:2379/").unwrap();
        assert_eq!(
            (parsed.https, parsed.host.as_str(), parsed.port),
            (true, "::1", 2379)
        );
        assert_eq!(parsed.shown, "https://[::1]:2379");
        assert_eq!(EtcdUrl::parse("http://etcd.internal").unwrap().port, 80);
        assert_eq!(EtcdUrl::parse("http://e:2379/gw/").unwrap().path, "/gw");
        for (url, problem) in [
            ("unix:///x", UrlProblem::NotHttp),
            ("http://", UrlProblem::NotHttp),
            ("http://e:2379/?a=1", UrlProblem::NotHttp),
            ("http://e :2379", UrlProblem::NotHttp),
            ("http://user:SECRET@e:2379", UrlProblem::Credentials),
            ("http://etcd..internal:2379", UrlProblem::HostOrPort),
            ("http://127.0.0.1:99999", UrlProblem::HostOrPort),
            ("http://127.0.0.1:0", UrlProblem::HostOrPort),
            ("http://127.0.0.1:+1", UrlProblem::HostOrPort),
            ("http://[::1:2379", UrlProblem::HostOrPort),
            ("http://::1:2379", UrlProblem::HostOrPort),
        ] {
            assert_eq!(EtcdUrl::parse(url), Err(problem), "{url}");
        }
    }

    #[test]
    fn a_password_goes_over_http_only_to_a_loopback_host() {
        for host in [
            "127.0.0.1",
            "127.8.9.10",
            "localhost",
            "::1",
            "::ffff:127.0.0.1",
        ] {
            assert!(is_loopback(host), "{host}");
        }
        for host in [
            "10.0.0.5",
            "fd00::5",
            "localhost.example",
            "127.0.0.1.nip.io",
            "::",
        ] {
            assert!(!is_loopback(host), "{host}");
        }
    }

    #[test]
    fn etcds_messages_are_one_line_of_at_most_200_bytes() {
        let answer = json!({"error": {"grpc_code": 16, "message": "a\n  b\t".repeat(100)}});
        let Value::Object(answer) = answer else {
            unreachable!()
        };
        assert_eq!(grpc_code(&answer), 16);
        let said = message(&answer);
        assert!(said.len() <= 200 && !said.contains('\n') && said.starts_with("a b a b"));
        assert_eq!(why(&Map::new()), "");
        let long = Map::from_iter([("message".to_string(), json!("é".repeat(150)))]);
        assert!(message(&long).len() <= 200, "cut on a character's boundary");
    }
}
