//! `connect`: the plugin dials the dispatcher's gateway (`provider: websocket`, `mode:
//! inbound`) with `X-Plugin-Id`, `X-Plugin-Version` and its bearer token, and takes calls
//! over that connection, dialling again after every drop with exponential backoff and full
//! jitter (100 ms doubling to 10 s, reset only once the gateway welcomed the plugin: one
//! that closes every connection at once is not dialled 20 times a second).
//!
//! A refusal is final, as the same dial would get the same answer: a `400`, `401`, `403` or
//! `404` at the upgrade (a malformed id or version, a wrong token, another principal, no
//! such inbound plugin), or a close `4403` after the `hello` (it names another id or
//! version than the one admitted, or a protocol the gateway does not speak). Every other
//! close is dialled again, `4400` too (a `hello` that took over 10 s may have been a slow
//! link), as are a gateway not up yet and an answer that is no upgrade.

use std::hash::{BuildHasher, Hasher};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::client_tls;
use super::frames::Role;
use super::gateway_url::GatewayUrl;
use super::handshake::{self, Answer};
use super::served::Core;
use super::server::{read_head, HeadError};
use super::session::{self, Opened, Socket, Stopping};

const INITIAL_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// How long one dial may take, TCP, TLS and the upgrade together.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
/// The close code of a gateway that upgraded the connection but not the hello.
pub(crate) const CLOSE_WRONG_PLUGIN: u16 = 4403;

/// The gateway refused the plugin: its HTTP status at the upgrade, or the close code 4403
/// with the gateway's reason (made safe to show).
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Refused {
    pub(crate) status: u16,
    pub(crate) reason: String,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the gateway refused the connection ({})", self.status)?;
        if !self.reason.is_empty() {
            write!(f, ": {}", self.reason)?;
        }
        Ok(())
    }
}

/// Why one dial did not open a connection.
enum Failed {
    Refused(u16),
    Again(String),
}

/// Dials `url` and serves each connection until the plugin stops (then the connection in
/// use winds down: `goaway`, the gateway's close or the grace) or the gateway refuses it.
/// `tls`: the client of a `wss` gateway made of `connect`'s TLS files (`client_tls`);
/// `None`: the system's roots, no client certificate.
pub(crate) async fn dial(
    core: Arc<Core>,
    url: GatewayUrl,
    headers: Vec<(String, String)>,
    mut stopping: Stopping,
    tls: Option<TlsConnector>,
) -> Result<(), Refused> {
    let mut backoff = INITIAL_BACKOFF;
    loop {
        if stopping.borrow().is_some() {
            return Ok(());
        }
        let attempt = tokio::select! {
            attempt = open(&url, &headers, tls.as_ref()) => attempt,
            _ = stopping.wait_for(Option::is_some) => return Ok(()),
        };
        match attempt {
            Err(Failed::Refused(status)) => {
                return Err(Refused {
                    status,
                    reason: String::new(),
                });
            }
            Err(Failed::Again(why)) => {
                crate::log::info(&format!(
                    "cannot reach the gateway at {}: {why}; retrying",
                    url.shown()
                ));
            }
            Ok(opened) => {
                let ended = session::serve(core.clone(), opened, stopping.clone()).await;
                if stopping.borrow().is_some() {
                    return Ok(());
                }
                match ended.close {
                    // The hello names another plugin than the upgrade admitted: the next
                    // connection would send the same hello and get the same close.
                    Some((CLOSE_WRONG_PLUGIN, reason)) => {
                        return Err(Refused {
                            status: CLOSE_WRONG_PLUGIN,
                            reason,
                        });
                    }
                    Some((code, reason)) => {
                        let said = if reason.is_empty() {
                            String::new()
                        } else {
                            format!(": {reason}")
                        };
                        crate::log::info(&format!(
                            "connection to {} closed ({code}{said}); reconnecting",
                            url.shown()
                        ));
                    }
                    None => crate::log::info(&format!(
                        "connection to {} dropped; reconnecting",
                        url.shown()
                    )),
                }
                if ended.welcomed {
                    backoff = INITIAL_BACKOFF;
                }
            }
        }
        // Full jitter: a gateway coming back is not hit by every plugin at once.
        tokio::select! {
            () = tokio::time::sleep(jitter(backoff)) => {}
            _ = stopping.wait_for(Option::is_some) => return Ok(()),
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// A wait drawn evenly from zero to `backoff`.
fn jitter(backoff: Duration) -> Duration {
    static SEED: OnceLock<std::hash::RandomState> = OnceLock::new();
    let mut hasher = SEED.get_or_init(std::hash::RandomState::new).build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    backoff.mul_f64((hasher.finish() >> 11) as f64 / (1u64 << 53) as f64)
}

/// One dial: TCP, TLS for `wss` (with `tls`, else the system's roots), the upgrade.
async fn open(
    url: &GatewayUrl,
    headers: &[(String, String)],
    tls: Option<&TlsConnector>,
) -> Result<Opened, Failed> {
    let dialled = async {
        let tcp = TcpStream::connect((url.host.as_str(), url.port))
            .await
            .map_err(|err| Failed::Again(err.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let mut socket: Box<dyn Socket> = if url.secure {
            let name = rustls::pki_types::ServerName::try_from(url.host.clone())
                .map_err(|_| Failed::Again("the URL's host is no TLS server name".into()))?;
            let connector = match tls {
                Some(connector) => connector.clone(),
                None => client_tls::system_connector().map_err(Failed::Again)?,
            };
            let tls = connector
                .connect(name, tcp)
                .await
                .map_err(|err| Failed::Again(tls_failure(&err)))?;
            Box::new(tls)
        } else {
            Box::new(tcp)
        };
        let key = handshake::new_key();
        let headers: Vec<(&str, &str)> = headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        let request = handshake::upgrade_request(&url.authority, &url.path, &key, &headers);
        socket
            .write_all(&request)
            .await
            .map_err(|err| Failed::Again(err.to_string()))?;
        socket
            .flush()
            .await
            .map_err(|err| Failed::Again(err.to_string()))?;
        let (head, leftover) = read_head(&mut socket).await.map_err(|err| match err {
            HeadError::TooLarge => Failed::Again("the answer's head is too large".into()),
            HeadError::Closed => Failed::Again("the connection closed before an answer".into()),
            // Over TLS, the gateway's alert (it refused this plugin's certificate).
            HeadError::Failed(err) if url.secure => Failed::Again(tls_failure(&err)),
            HeadError::Failed(err) => Failed::Again(err.to_string()),
        })?;
        match handshake::read_answer(&head, &key) {
            Answer::Upgraded {
                deflate,
                max_message_bytes,
            } => Ok(Opened {
                socket,
                role: Role::Client,
                deflate,
                leftover,
                // The gateway's read cap, on its 101: the session takes it before the
                // hello, so what it sends before the welcome keeps under it too.
                announced_cap: max_message_bytes,
            }),
            Answer::NotUpgraded(status @ (400 | 401 | 403 | 404), _) => {
                Err(Failed::Refused(status))
            }
            Answer::NotUpgraded(0, why) => Err(Failed::Again(why.into())),
            Answer::NotUpgraded(status, _) => {
                Err(Failed::Again(format!("the gateway answered {status}")))
            }
        }
    };
    tokio::time::timeout(DIAL_TIMEOUT, dialled)
        .await
        .unwrap_or_else(|_| {
            Err(Failed::Again(format!(
                "no upgrade within {} s",
                DIAL_TIMEOUT.as_secs()
            )))
        })
}

/// Why the TLS handshake with the gateway failed, as the line of a dial that could not
/// reach it says. rustls shows some errors by their variant's name (`invalid peer
/// certificate: UnknownIssuer`, `received fatal alert: CertificateRequired`) and an expired
/// certificate's times in Unix seconds; these are put in words, the same as every SDK's:
/// a certificate no root this plugin trusts signed (a private CA it was not given, a
/// self-signed certificate), one expired or not valid yet (with the date, in UTC), and the
/// gateway's alert when it refused this plugin's client certificate. Other errors read as
/// rustls writes them (`certificate not valid for name "gw"; …`).
fn tls_failure(err: &std::io::Error) -> String {
    use rustls::{AlertDescription, CertificateError, Error};
    let refused = err
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<Error>());
    match refused {
        Some(Error::InvalidCertificate(CertificateError::UnknownIssuer)) => {
            "TLS: the gateway's certificate has an unknown issuer: no root this plugin trusts \
             signed it (--ca-file, or the system's: SSL_CERT_FILE or SSL_CERT_DIR name others)"
                .into()
        }
        Some(Error::InvalidCertificate(CertificateError::ExpiredContext { not_after, .. })) => {
            format!(
                "TLS: the gateway's certificate has expired (not valid after {})",
                utc_date(not_after.as_secs())
            )
        }
        Some(Error::InvalidCertificate(CertificateError::Expired)) => {
            "TLS: the gateway's certificate has expired".into()
        }
        Some(Error::InvalidCertificate(CertificateError::NotValidYetContext {
            not_before,
            ..
        })) => format!(
            "TLS: the gateway's certificate is not valid yet (not before {})",
            utc_date(not_before.as_secs())
        ),
        Some(Error::AlertReceived(alert)) => format!(
            "TLS: {}",
            match alert {
                AlertDescription::CertificateRequired => "the gateway requires a client \
                    certificate and got none (--cert-file and --key-file)"
                    .to_string(),
                AlertDescription::UnknownCA => "the gateway does not trust this plugin's \
                    client certificate: no CA it trusts signed it"
                    .to_string(),
                AlertDescription::CertificateExpired => {
                    "this plugin's client certificate has expired: the gateway refused it"
                        .to_string()
                }
                other => format!("the gateway refused the handshake ({})", alert_words(other)),
            }
        ),
        _ => format!("TLS: {err}"),
    }
}

/// An alert's name in words: `BadCertificate` reads "bad certificate".
fn alert_words(alert: &rustls::AlertDescription) -> String {
    let name = format!("{alert:?}");
    let mut words = String::with_capacity(name.len() + 4);
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            words.push(' ');
        }
        words.push(c.to_ascii_lowercase());
    }
    words
}

/// Seconds since 1970 as a date and time in UTC, `2026-12-04 11:07:38 UTC` (the civil
/// calendar from a day count, after Howard Hinnant's `civil_from_days`).
fn utc_date(seconds: u64) -> String {
    let (days, time) = ((seconds / 86_400) as i64, seconds % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        time / 3_600,
        time % 3_600 / 60,
        time % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_the_backoff() {
        let waits: Vec<Duration> = (0..100)
            .map(|_| jitter(Duration::from_millis(100)))
            .collect();
        assert!(waits.iter().all(|w| *w <= Duration::from_millis(100)));
        assert!(waits.iter().any(|w| *w != waits[0]), "drawn, not fixed");
    }

    #[test]
    fn an_unknown_issuer_is_said_in_words_and_other_tls_errors_as_rustls_says_them() {
        let unknown = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        );
        let said = tls_failure(&unknown);
        assert!(said.contains("unknown issuer"), "{said}");
        assert!(said.contains("SSL_CERT_FILE"), "{said}");
        assert!(!said.contains("UnknownIssuer"), "{said}");
        let revoked = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked),
        );
        assert!(tls_failure(&revoked).starts_with("TLS: invalid peer certificate"));
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert!(tls_failure(&reset).starts_with("TLS: "));
    }

    #[test]
    fn an_expired_certificate_is_said_with_its_date_not_unix_seconds() {
        // Before: "certificate expired: verification time 1796555258 (UNIX), but
        // certificate is not valid after 1796382458 (172800 seconds ago)".
        let expired = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::ExpiredContext {
                time: rustls::pki_types::UnixTime::since_unix_epoch(Duration::from_secs(
                    1_796_555_258,
                )),
                not_after: rustls::pki_types::UnixTime::since_unix_epoch(Duration::from_secs(
                    1_796_382_458,
                )),
            }),
        );
        assert_eq!(
            tls_failure(&expired),
            "TLS: the gateway's certificate has expired (not valid after 2026-12-04 11:07:38 UTC)"
        );
        assert_eq!(utc_date(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc_date(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc_date(4_107_542_399), "2100-02-28 23:59:59 UTC");
    }

    #[test]
    fn the_gateways_alert_about_the_client_certificate_is_said_in_words() {
        let alert = |description| {
            tls_failure(&std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                rustls::Error::AlertReceived(description),
            ))
        };
        use rustls::AlertDescription;
        assert_eq!(
            alert(AlertDescription::CertificateRequired),
            "TLS: the gateway requires a client certificate and got none (--cert-file and --key-file)"
        );
        assert_eq!(
            alert(AlertDescription::UnknownCA),
            "TLS: the gateway does not trust this plugin's client certificate: no CA it trusts signed it"
        );
        assert_eq!(
            alert(AlertDescription::CertificateExpired),
            "TLS: this plugin's client certificate has expired: the gateway refused it"
        );
        assert_eq!(
            alert(AlertDescription::BadCertificate),
            "TLS: the gateway refused the handshake (bad certificate)"
        );
    }

    #[test]
    fn a_refusal_says_its_status_and_the_gateways_reason() {
        let at_upgrade = Refused {
            status: 401,
            reason: String::new(),
        };
        assert_eq!(
            at_upgrade.to_string(),
            "the gateway refused the connection (401)"
        );
        let closed = Refused {
            status: 4403,
            reason: "admitted as version 2.0.0, said '1.0.0'".into(),
        };
        assert_eq!(
            closed.to_string(),
            "the gateway refused the connection (4403): admitted as version 2.0.0, said '1.0.0'"
        );
    }
}
