//! The HTTP/1.1 upgrade that opens a WebSocket (RFC 6455 §4), both ways, without I/O:
//! the request a dialling plugin sends and the answer it checks, the request a served
//! plugin reads and the answers it gives. permessage-deflate (RFC 7692) is negotiated
//! here: the side that dials offers it, the side that serves accepts the first offer it
//! can keep (a 15-bit window, with or without context takeover).

use base64::Engine;

use super::frames::Deflate;
use crate::types;

/// The most an upgrade's head (request or answer) may hold.
pub(crate) const MAX_HEAD_BYTES: usize = 64 * 1024;
/// The most headers an upgrade's head may have.
const MAX_HEADERS: usize = 100;
const ACCEPT_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
const EXTENSION: &str = "permessage-deflate";

/// Where a head ends: the offset just past its blank line, once it is all there.
pub(crate) fn head_end(bytes: &[u8]) -> Option<usize> {
    bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|at| at + 4)
}

/// The `Sec-WebSocket-Accept` that answers `key`.
pub(crate) fn accept_key(key: &str) -> String {
    let mut input = key.as_bytes().to_vec();
    input.extend_from_slice(ACCEPT_GUID.as_bytes());
    let digest = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, &input);
    base64::engine::general_purpose::STANDARD.encode(digest.as_ref())
}

/// What a served plugin read of a request head.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Request {
    /// A `GET`: its one `Authorization` value (`None` when there is none, or more than
    /// one), checked first, and the upgrade it asks for.
    Get {
        authorization: Option<Vec<u8>>,
        upgrade: Result<Upgrade, Refusal>,
    },
    /// Anything else, refused.
    Refused(Refusal),
}

/// The header a host announces the largest message it reads with: on the upgrade request
/// a dispatcher sends, and on the 101 a gateway answers.
const MAX_MESSAGE_BYTES_HEADER: &str = "linchkit-max-message-bytes";

/// The one `LinchKit-Max-Message-Bytes` value of a head's `headers`, as it came (trimmed;
/// the session judges it): `None` without one, with two (two values are no announcement),
/// or with one that is not UTF-8.
fn announced_max_message_bytes(headers: &[httparse::Header<'_>]) -> Option<String> {
    let mut values = headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case(MAX_MESSAGE_BYTES_HEADER));
    match (values.next(), values.next()) {
        (Some(one), None) => std::str::from_utf8(one.value)
            .ok()
            .map(|v| v.trim().to_string()),
        _ => None,
    }
}

/// A WebSocket upgrade: its key, the deflate it offers that this side can keep, and the
/// one `LinchKit-Max-Message-Bytes` value it carries, as it came (the session judges it).
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Upgrade {
    pub(crate) key: String,
    pub(crate) deflate: Option<Deflate>,
    pub(crate) max_message_bytes: Option<String>,
}

/// A request answered with `status` and `message`, the connection then closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub(crate) status: u16,
    pub(crate) message: &'static str,
}

/// Reads a request head (`bytes`, through its blank line).
pub(crate) fn read_request(bytes: &[u8]) -> Request {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let refused = |status, message| Refusal { status, message };
    match request.parse(bytes) {
        Ok(httparse::Status::Complete(_)) => {}
        Err(httparse::Error::TooManyHeaders) => {
            return Request::Refused(refused(431, "too many headers"));
        }
        _ => return Request::Refused(refused(400, "a malformed HTTP request")),
    }
    let is_get = request.method == Some("GET");
    let values = |name: &str| -> Vec<&[u8]> {
        request
            .headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
            .collect()
    };
    let authorization = match values("authorization")[..] {
        [one] => Some(one.to_vec()),
        _ => None,
    };
    let upgrade = (|| {
        // Refused after the token is checked, as everything a request could learn.
        if !is_get {
            return Err(refused(
                405,
                "this plugin speaks WebSocket: send a GET upgrade",
            ));
        }
        let upgrade = values("upgrade")
            .iter()
            .any(|v| tokens(v).any(|t| t.eq_ignore_ascii_case("websocket")));
        let connection = values("connection")
            .iter()
            .any(|v| tokens(v).any(|t| t.eq_ignore_ascii_case("upgrade")));
        if !upgrade || !connection {
            return Err(refused(
                426,
                "this plugin speaks WebSocket: send an upgrade",
            ));
        }
        if values("sec-websocket-version").as_slice() != [&b"13"[..]] {
            return Err(refused(426, "this plugin speaks WebSocket version 13"));
        }
        let key = match values("sec-websocket-key")[..] {
            [key] => std::str::from_utf8(key).ok().map(str::trim).filter(|k| {
                base64::engine::general_purpose::STANDARD
                    .decode(k)
                    .is_ok_and(|bytes| bytes.len() == 16)
            }),
            _ => None,
        };
        let Some(key) = key else {
            return Err(refused(400, "Sec-WebSocket-Key must be 16 bytes in base64"));
        };
        let deflate = values("sec-websocket-extensions")
            .iter()
            .flat_map(|v| split_commas(v))
            .find_map(|offer| acceptable_offer(&offer));
        Ok(Upgrade {
            key: key.to_string(),
            deflate,
            max_message_bytes: announced_max_message_bytes(request.headers),
        })
    })();
    Request::Get {
        authorization,
        upgrade,
    }
}

/// A header value's comma-separated tokens, trimmed.
fn tokens(value: &[u8]) -> impl Iterator<Item = &str> {
    std::str::from_utf8(value)
        .unwrap_or("")
        .split(',')
        .map(str::trim)
}

fn split_commas(value: &[u8]) -> Vec<String> {
    tokens(value).map(str::to_string).collect()
}

/// The deflate of one permessage-deflate offer this side can keep, or `None`: another
/// extension, an unknown or repeated parameter, or a server window under 15 bits, which
/// the deflate this SDK uses cannot keep to (the offer is declined, not failed).
fn acceptable_offer(offer: &str) -> Option<Deflate> {
    let mut parts = offer.split(';').map(str::trim);
    if !parts.next()?.eq_ignore_ascii_case(EXTENSION) {
        return None;
    }
    let mut agreed = Deflate::default();
    let mut seen = Vec::new();
    for parameter in parts {
        let (name, value) = match parameter.split_once('=') {
            Some((name, value)) => (name.trim(), Some(value.trim().trim_matches('"'))),
            None => (parameter, None),
        };
        let name = name.to_ascii_lowercase();
        if seen.contains(&name) {
            return None;
        }
        match (name.as_str(), value) {
            ("server_no_context_takeover", None) => agreed.server_no_context_takeover = true,
            ("client_no_context_takeover", None) => agreed.client_no_context_takeover = true,
            // The client's own window: any size inflates with a 15-bit window.
            ("client_max_window_bits", None) => {}
            ("client_max_window_bits", Some(bits)) if window_bits(bits).is_some() => {}
            ("server_max_window_bits", Some(bits)) if window_bits(bits) == Some(15) => {}
            _ => return None,
        }
        seen.push(name);
    }
    Some(agreed)
}

fn window_bits(text: &str) -> Option<u8> {
    let bits: u8 = text.parse().ok()?;
    (8..=15).contains(&bits).then_some(bits)
}

/// The `Sec-WebSocket-Extensions` value that accepts `agreed`.
fn agreed_extension(agreed: Deflate) -> String {
    let mut value = EXTENSION.to_string();
    if agreed.server_no_context_takeover {
        value.push_str("; server_no_context_takeover");
    }
    if agreed.client_no_context_takeover {
        value.push_str("; client_no_context_takeover");
    }
    value
}

/// The answer that completes an upgrade.
pub(crate) fn switching_protocols(key: &str, deflate: Option<Deflate>) -> Vec<u8> {
    let mut head = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\n",
        accept_key(key)
    );
    if let Some(agreed) = deflate {
        head.push_str(&format!(
            "Sec-WebSocket-Extensions: {}\r\n",
            agreed_extension(agreed)
        ));
    }
    head.push_str("\r\n");
    head.into_bytes()
}

/// The answer to an upgrade past the server's cap of connections: `503` with a short,
/// retryable `overloaded` envelope and `Retry-After: 1`, closing the connection.
pub(crate) fn overloaded(message: &str) -> Vec<u8> {
    let body = serde_json::json!({
        "ok": false,
        "error": {"type": types::OVERLOADED, "message": message, "retryable": true, "retry_after": 1.0},
    })
    .to_string();
    format!(
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// An answer refusing the request: `status` with the protocol's error envelope
/// (`error_type`, `message`), closing the connection. A `401` asks for a bearer token.
pub(crate) fn refusal(status: u16, error_type: &str, message: &str) -> Vec<u8> {
    let body = serde_json::json!({
        "ok": false,
        "error": {"type": error_type, "message": message, "retryable": status == 503},
    })
    .to_string();
    let reason = match status {
        400 => "Bad Request",
        401 => "Unauthorized",
        405 => "Method Not Allowed",
        426 => "Upgrade Required",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    };
    let mut extra = String::new();
    match status {
        401 => extra.push_str("WWW-Authenticate: Bearer\r\n"),
        405 => extra.push_str("Allow: GET\r\n"),
        426 => extra.push_str("Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"),
        _ => {}
    }
    format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n{extra}\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// The request a dialling plugin opens its connection with: `host` as the `Host` header
/// (with its port when the URL named one), `path` with its query, permessage-deflate
/// offered (the gateway decides), and `headers` (name, value) after.
pub(crate) fn upgrade_request(
    host: &str,
    path: &str,
    key: &str,
    headers: &[(&str, &str)],
) -> Vec<u8> {
    let mut head = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Extensions: {EXTENSION}\r\n"
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    head.into_bytes()
}

/// What the gateway answered an upgrade.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Answer {
    /// Upgraded: the deflate agreed, if any, and the one `LinchKit-Max-Message-Bytes`
    /// value the 101 carries, as it came (the gateway's read cap; the session judges it).
    Upgraded {
        deflate: Option<Deflate>,
        max_message_bytes: Option<String>,
    },
    /// Not upgraded: the status, or 0 with why when the answer is no HTTP this side can
    /// use (which is dialled again, as a gateway not yet up).
    NotUpgraded(u16, &'static str),
}

/// Reads the answer's head (`bytes`, through its blank line) to an upgrade sent with `key`.
pub(crate) fn read_answer(bytes: &[u8], key: &str) -> Answer {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    match response.parse(bytes) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Answer::NotUpgraded(0, "the answer is not HTTP"),
    }
    let status = response.code.unwrap_or(0);
    if status != 101 {
        return Answer::NotUpgraded(status, "");
    }
    let value = |name: &str| -> Vec<&str> {
        response
            .headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name))
            .filter_map(|h| std::str::from_utf8(h.value).ok())
            .collect()
    };
    let accepted = value("sec-websocket-accept");
    if accepted.len() != 1 || accepted[0].trim() != accept_key(key) {
        return Answer::NotUpgraded(
            0,
            "the gateway's Sec-WebSocket-Accept does not answer the key",
        );
    }
    let extensions: Vec<String> = value("sec-websocket-extensions")
        .iter()
        .flat_map(|v| split_commas(v.as_bytes()))
        .filter(|e| !e.is_empty())
        .collect();
    let upgraded = |deflate| Answer::Upgraded {
        deflate,
        max_message_bytes: announced_max_message_bytes(response.headers),
    };
    match extensions.as_slice() {
        [] => upgraded(None),
        [one] => match agreed_by_server(one) {
            Some(agreed) => upgraded(Some(agreed)),
            None => Answer::NotUpgraded(
                0,
                "the gateway agreed to an extension this plugin did not offer",
            ),
        },
        _ => Answer::NotUpgraded(0, "the gateway agreed to more extensions than offered"),
    }
}

/// The deflate a server's answer agreed to, or `None` when it is not one this side
/// offered: another extension, an unknown parameter, or `client_max_window_bits`, which
/// an offer without it does not allow (RFC 7692 §7.1.2.2).
fn agreed_by_server(answer: &str) -> Option<Deflate> {
    let mut parts = answer.split(';').map(str::trim);
    if !parts.next()?.eq_ignore_ascii_case(EXTENSION) {
        return None;
    }
    let mut agreed = Deflate::default();
    for parameter in parts {
        let (name, value) = match parameter.split_once('=') {
            Some((name, value)) => (name.trim(), Some(value.trim().trim_matches('"'))),
            None => (parameter, None),
        };
        match (name.to_ascii_lowercase().as_str(), value) {
            ("server_no_context_takeover", None) => agreed.server_no_context_takeover = true,
            ("client_no_context_takeover", None) => agreed.client_no_context_takeover = true,
            // The server's own window: any size inflates with a 15-bit window.
            ("server_max_window_bits", Some(bits)) if window_bits(bits).is_some() => {}
            _ => return None,
        }
    }
    Some(agreed)
}

/// A new `Sec-WebSocket-Key`: 16 bytes that need not be secret, only new.
pub(crate) fn new_key() -> String {
    let mut bytes = [0u8; 16];
    let random = ring::rand::SystemRandom::new();
    // A system that cannot give random bytes leaves zeros: the key need only be new to
    // this connection, which it is for the server all the same.
    let _ = ring::rand::SecureRandom::fill(&random, &mut bytes);
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upgrade(extra: &str) -> Vec<u8> {
        format!(
            "GET / HTTP/1.1\r\nHost: p\r\nUpgrade: WebSocket\r\nConnection: keep-alive, Upgrade\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n"
        )
        .into_bytes()
    }

    #[test]
    fn the_accept_key_of_rfc_6455() {
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    fn read(bytes: &[u8]) -> (Option<Vec<u8>>, Result<Upgrade, Refusal>) {
        match read_request(bytes) {
            Request::Get {
                authorization,
                upgrade,
            } => (authorization, upgrade),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_upgrade_is_read_with_its_token_and_deflate_offer() {
        let read_back = read(&upgrade(
            "Authorization: Bearer t\r\nSec-WebSocket-Extensions: x-other, permessage-deflate; client_max_window_bits\r\n",
        ));
        assert_eq!(
            read_back,
            (
                Some(b"Bearer t".to_vec()),
                Ok(Upgrade {
                    key: "dGhlIHNhbXBsZSBub25jZQ==".into(),
                    deflate: Some(Deflate::default()),
                    max_message_bytes: None,
                })
            )
        );
        let (authorization, upgraded) = read(&upgrade("Authorization: a\r\nAuthorization: b\r\n"));
        assert_eq!(authorization, None, "two credentials are none");
        assert_eq!(upgraded.unwrap().deflate, None);
        // The token is read even from a GET that is no upgrade: it is checked first.
        let (authorization, upgraded) = read(b"GET / HTTP/1.1\r\nAuthorization: Bearer t\r\n\r\n");
        assert_eq!(
            (authorization.as_deref(), upgraded.unwrap_err().status),
            (Some(&b"Bearer t"[..]), 426)
        );
    }

    #[test]
    fn the_announced_cap_is_the_one_header_value_as_it_came() {
        let announced = |headers: &str| read(&upgrade(headers)).1.unwrap().max_message_bytes;
        assert_eq!(
            announced("LinchKit-Max-Message-Bytes: 2048\r\n").as_deref(),
            Some("2048")
        );
        assert_eq!(
            announced("linchkit-max-message-bytes: abc\r\n").as_deref(),
            Some("abc")
        );
        assert_eq!(announced(""), None);
        assert_eq!(
            announced("LinchKit-Max-Message-Bytes: 2048\r\nLinchKit-Max-Message-Bytes: 4096\r\n"),
            None,
            "two values are none"
        );
    }

    #[test]
    fn the_gateways_announced_cap_is_the_one_header_value_of_its_101_as_it_came() {
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        let announced = |headers: &str| {
            let head = format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\
                 Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n{headers}\r\n"
            );
            match read_answer(head.as_bytes(), key) {
                Answer::Upgraded {
                    max_message_bytes, ..
                } => max_message_bytes,
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(
            announced("LinchKit-Max-Message-Bytes: 2048\r\n").as_deref(),
            Some("2048")
        );
        assert_eq!(
            announced("linchkit-max-message-bytes:  1e6 \r\n").as_deref(),
            Some("1e6")
        );
        assert_eq!(announced(""), None);
        assert_eq!(
            announced("LinchKit-Max-Message-Bytes: 2048\r\nLinchKit-Max-Message-Bytes: 4096\r\n"),
            None,
            "two values are none"
        );
    }

    #[test]
    fn offers_this_side_cannot_keep_are_declined_and_the_next_taken() {
        let offer = |text: &str| {
            read(&upgrade(&format!("Sec-WebSocket-Extensions: {text}\r\n")))
                .1
                .unwrap()
                .deflate
        };
        assert_eq!(offer("permessage-deflate; server_max_window_bits=10"), None);
        assert_eq!(
            offer("permessage-deflate; server_max_window_bits=15"),
            Some(Deflate::default())
        );
        assert_eq!(
            offer("permessage-deflate; client_max_window_bits=9"),
            Some(Deflate::default())
        );
        assert_eq!(offer("permessage-deflate; mystery"), None);
        assert_eq!(
            offer("permessage-deflate; server_no_context_takeover; server_no_context_takeover"),
            None
        );
        assert_eq!(
            offer("permessage-deflate; server_max_window_bits=9, permessage-deflate; server_no_context_takeover; client_no_context_takeover"),
            Some(Deflate { server_no_context_takeover: true, client_no_context_takeover: true })
        );
    }

    #[test]
    fn what_is_not_an_upgrade_is_refused_with_its_status() {
        let status = |bytes: &[u8]| match read_request(bytes) {
            Request::Refused(refusal) => refusal.status,
            Request::Get { upgrade, .. } => upgrade.unwrap_err().status,
        };
        assert_eq!(status(b"GET / HTTP/1.1\r\nHost: p\r\n\r\n"), 426);
        assert_eq!(status(b"POST / HTTP/1.1\r\nHost: p\r\n\r\n"), 405);
        assert_eq!(status(b"\x16\x03\x01 tls\r\n\r\n"), 400);
        let no_key = b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n";
        assert_eq!(status(no_key), 400);
        let old = String::from_utf8(upgrade(""))
            .unwrap()
            .replace("Version: 13", "Version: 8");
        assert_eq!(status(old.as_bytes()), 426);
        let many: String = (0..200).map(|i| format!("X-{i}: y\r\n")).collect();
        assert_eq!(status(&upgrade(&many)), 431);
    }

    #[test]
    fn the_answers_are_whole_http() {
        let answer = String::from_utf8(switching_protocols(
            "dGhlIHNhbXBsZSBub25jZQ==",
            Some(Deflate::default()),
        ))
        .unwrap();
        assert!(answer.starts_with("HTTP/1.1 101 "));
        assert!(answer.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
        assert!(answer.contains("Sec-WebSocket-Extensions: permessage-deflate\r\n"));
        assert!(answer.ends_with("\r\n\r\n"));
        let refused = String::from_utf8(refusal(
            401,
            "unauthorized",
            "missing or wrong bearer token",
        ))
        .unwrap();
        let (head, body) = refused.split_once("\r\n\r\n").unwrap();
        assert!(
            head.starts_with("HTTP/1.1 401 Unauthorized")
                && head.contains("WWW-Authenticate: Bearer")
        );
        assert!(head.contains(&format!("Content-Length: {}", body.len())));
        let envelope: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(envelope["error"]["type"], "unauthorized");
    }

    #[test]
    fn a_dialler_reads_the_gateways_answer() {
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        let head = |extra: &str| {
            format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\
                 Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n{extra}\r\n"
            )
        };
        assert_eq!(
            read_answer(head("").as_bytes(), key),
            Answer::Upgraded {
                deflate: None,
                max_message_bytes: None
            }
        );
        assert_eq!(
            read_answer(
                head(
                    "Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover\r\n"
                )
                .as_bytes(),
                key
            ),
            Answer::Upgraded {
                deflate: Some(Deflate {
                    server_no_context_takeover: true,
                    client_no_context_takeover: false
                }),
                max_message_bytes: None
            }
        );
        let bits =
            head("Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits=10\r\n");
        assert!(matches!(
            read_answer(bits.as_bytes(), key),
            Answer::NotUpgraded(0, _)
        ));
        assert!(matches!(
            read_answer(head("").as_bytes(), "b3RoZXIga2V5IGhlcmUhIQ=="),
            Answer::NotUpgraded(0, _)
        ));
        let refused = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(read_answer(refused, key), Answer::NotUpgraded(403, ""));
        assert!(matches!(
            read_answer(b"SSH-2.0\r\n\r\n", key),
            Answer::NotUpgraded(0, _)
        ));
        let request = String::from_utf8(upgrade_request(
            "gw:8080",
            "/v1/plugins/connect?x=1",
            key,
            &[("X-Plugin-Id", "example")],
        ))
        .unwrap();
        assert!(request.starts_with("GET /v1/plugins/connect?x=1 HTTP/1.1\r\nHost: gw:8080\r\n"));
        assert!(request.contains(
            "Sec-WebSocket-Extensions: permessage-deflate\r\nX-Plugin-Id: example\r\n\r\n"
        ));
        assert_ne!(new_key(), new_key());
    }

    #[test]
    fn a_head_ends_at_its_blank_line() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n\r\nrest"), Some(18));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n"), None);
    }
}
