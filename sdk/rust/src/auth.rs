//! The bearer token of service mode (docs/protocol.md, "gRPC binding"): read from
//! `LINCHKIT_PLUGIN_TOKEN_FILE` (a mounted secret) or `LINCHKIT_PLUGIN_TOKEN`, never from a
//! command-line argument (`ps` shows those to every user). A tonic interceptor on the plugin
//! service refuses every RPC without `authorization: Bearer <token>` as `UNAUTHENTICATED`;
//! the health service is not intercepted (orchestrators probe it without credentials).

use std::fmt;
use std::sync::Arc;

use tonic::{Request, Status};

pub const ENV_TOKEN: &str = "LINCHKIT_PLUGIN_TOKEN";
pub const ENV_TOKEN_FILE: &str = "LINCHKIT_PLUGIN_TOKEN_FILE";

/// All a refused caller learns: never what it sent.
const UNAUTHENTICATED: &str = "missing or wrong bearer token";

/// What the `authorization` metadata must carry. Its `Debug` hides it.
#[derive(Clone)]
pub(crate) struct BearerToken {
    expected: Arc<[u8]>,
}

impl fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BearerToken(hidden)")
    }
}

impl BearerToken {
    pub(crate) fn new(token: &str) -> Result<Self, String> {
        let token = token.trim();
        if token.is_empty() {
            return Err("the bearer token is empty".into());
        }
        if !token.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
            return Err("the bearer token must be printable ASCII without spaces".into());
        }
        Ok(BearerToken {
            expected: format!("bearer {token}").into_bytes().into(),
        })
    }

    /// The token from `LINCHKIT_PLUGIN_TOKEN_FILE`, else `LINCHKIT_PLUGIN_TOKEN`; `None` if
    /// neither is set. Both set is an error; no error message quotes the token.
    pub(crate) fn configured(var: impl Fn(&str) -> String) -> Result<Option<Self>, String> {
        let (file, value) = (var(ENV_TOKEN_FILE), var(ENV_TOKEN));
        match (file.is_empty(), value.is_empty()) {
            (false, false) => Err(format!(
                "set either {ENV_TOKEN_FILE} or {ENV_TOKEN}, not both"
            )),
            (false, true) => {
                let text = std::fs::read_to_string(&file).map_err(|err| {
                    format!("cannot read the token file {file:?}: {}", err.kind())
                })?;
                BearerToken::new(&text)
                    .map(Some)
                    .map_err(|err| format!("the token file {file:?}: {err}"))
            }
            (true, false) => BearerToken::new(&value).map(Some),
            (true, true) => Ok(None),
        }
    }

    /// The `Authorization` value that presents the token: what a plugin dialling the
    /// gateway sends (`connect`).
    pub(crate) fn authorization(&self) -> String {
        let token = &self.expected["bearer ".len()..];
        format!("Bearer {}", String::from_utf8_lossy(token))
    }

    /// Whether an `authorization` value carries the token (constant time for equal lengths).
    pub(crate) fn admits(&self, authorization: Option<&[u8]>) -> bool {
        let Some(value) = authorization else {
            return false;
        };
        let value = value.trim_ascii();
        let (scheme, credentials) = match value.iter().position(|&b| b == b' ') {
            Some(space) => (&value[..space], value[space + 1..].trim_ascii()),
            None => (value, &b""[..]),
        };
        let mut presented = scheme.to_ascii_lowercase();
        presented.push(b' ');
        presented.extend_from_slice(credentials);
        constant_time_eq(&presented, &self.expected)
    }

    /// The interceptor of the plugin service.
    pub(crate) fn check(&self, request: Request<()>) -> Result<Request<()>, Status> {
        let mut values = request.metadata().get_all("authorization").iter();
        let presented = match (values.next(), values.next()) {
            (Some(value), None) => Some(value.as_bytes()),
            _ => None,
        };
        if self.admits(presented) {
            Ok(request)
        } else {
            Err(Status::unauthenticated(UNAUTHENTICATED))
        }
    }
}

/// Compares every byte whatever the first difference (only the lengths show).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let difference = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(difference) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_only_the_token() {
        let token = BearerToken::new(" s3cret\n").unwrap();
        assert!(token.admits(Some(b"Bearer s3cret")));
        assert!(token.admits(Some(b"bearer  s3cret ")));
        for wrong in [
            &b"Bearer s3cret2"[..],
            b"Bearer s3cre",
            b"Basic s3cret",
            b"s3cret",
            b"",
        ] {
            assert!(!token.admits(Some(wrong)), "{wrong:?}");
        }
        assert!(!token.admits(None));
        assert_eq!(format!("{token:?}"), "BearerToken(hidden)");
    }

    #[test]
    fn configured_reads_one_source() {
        let dir = std::env::temp_dir().join(format!("lk-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("token");
        std::fs::write(&file, "from-file\n").unwrap();
        let path = file.to_string_lossy().to_string();
        let vars = |pairs: Vec<(&'static str, String)>| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default()
            }
        };
        assert!(BearerToken::configured(vars(vec![])).unwrap().is_none());
        let from_file = BearerToken::configured(vars(vec![(ENV_TOKEN_FILE, path.clone())]));
        assert!(from_file
            .unwrap()
            .unwrap()
            .admits(Some(b"Bearer from-file")));
        let both = vec![(ENV_TOKEN_FILE, path), (ENV_TOKEN, "s3cret".to_string())];
        let err = BearerToken::configured(vars(both)).unwrap_err();
        assert!(err.contains("not both") && !err.contains("s3cret"), "{err}");
        let missing = vec![(ENV_TOKEN_FILE, "/nonexistent/token".to_string())];
        assert!(BearerToken::configured(vars(missing)).is_err());
        assert!(BearerToken::configured(vars(vec![(ENV_TOKEN, "a b".to_string())])).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
