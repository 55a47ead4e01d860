//! A gateway's URL as `connect --url` names it: read into what the plugin dials
//! ([`GatewayUrl`]), and shown masked in every line that names it ([`masked_url`]).

/// A gateway's URL, as the plugin dials it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct GatewayUrl {
    /// `wss` (or `https`): TLS, the gateway verified by the system's roots.
    pub(crate) secure: bool,
    /// The host to reach and to verify: a name or an address, without brackets.
    pub(crate) host: String,
    pub(crate) port: u16,
    /// The `Host` header: the authority as written.
    pub(crate) authority: String,
    /// The path and query the upgrade asks for.
    pub(crate) path: String,
}

impl GatewayUrl {
    /// `text` as a URL that can name a gateway: `ws`, `wss` (or `http`, `https`, dialled
    /// alike) with a host and a port that is one; `None` for anything else, which would be
    /// dialled for ever in vain. No spaces or control characters (they would end up in
    /// the upgrade's head) and no user and password (the token is for credentials).
    pub(crate) fn parse(text: &str) -> Option<GatewayUrl> {
        if text.bytes().any(|b| b <= b' ' || b == 0x7f) {
            return None;
        }
        let (scheme, rest) = text.split_once("://")?;
        let secure = match scheme.to_ascii_lowercase().as_str() {
            "ws" | "http" => false,
            "wss" | "https" => true,
            _ => return None,
        };
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(end);
        if authority.contains('@') {
            return None;
        }
        let (host, port) = match authority.strip_prefix('[') {
            Some(bracketed) => {
                let (inside, after) = bracketed.split_once(']')?;
                inside.parse::<std::net::Ipv6Addr>().ok()?;
                match after {
                    "" => (inside, None),
                    _ => (inside, Some(after.strip_prefix(':')?)),
                }
            }
            None => match authority.split_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            },
        };
        if host.is_empty() || (!authority.starts_with('[') && host.contains(['[', ']'])) {
            return None;
        }
        let default = if secure { 443 } else { 80 };
        let port = match port {
            None | Some("") => default,
            Some(digits) if digits.bytes().all(|b| b.is_ascii_digit()) => digits.parse().ok()?,
            Some(_) => return None,
        };
        let tail = tail.split('#').next().unwrap_or("");
        let path = if tail.starts_with('/') {
            tail.to_string()
        } else {
            format!("/{tail}")
        };
        Some(GatewayUrl {
            secure,
            host: host.to_string(),
            port,
            authority: authority.to_string(),
            path,
        })
    }

    /// The URL as a log line shows it: its query masked as `masked_url` masks it (the
    /// authority holds no userinfo, the path no fragment: `parse` took neither).
    pub(crate) fn shown(&self) -> String {
        let scheme = if self.secure { "wss" } else { "ws" };
        format!(
            "{scheme}://{}",
            masked_url(&format!("{}{}", self.authority, self.path))
        )
    }
}

/// What stands for a credential in a URL a line shows.
const URL_MASK: &str = "***";

/// `text` (a URL, or what was meant as one) as a line may show it, as the dispatcher shows
/// a URL (`providers.model.masked_url`): the password of its userinfo masked (a user
/// without a password whole: a token may be the user), the value of every query item and
/// an item without `=` whole (`?TOKEN`: it is a value itself); no fragment. Read as
/// written, without a URL parser, so that text no parser takes is masked too.
pub(crate) fn masked_url(text: &str) -> String {
    let text = text.split('#').next().unwrap_or("");
    let (scheme, rest) = match text.split_once("://") {
        Some((scheme, rest)) => (&text[..scheme.len() + 3], rest),
        None => ("", text),
    };
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:{URL_MASK}@{host}"),
            None => format!("{URL_MASK}@{host}"),
        },
        None => authority.to_string(),
    };
    let Some((path, query)) = tail.split_once('?') else {
        return format!("{scheme}{authority}{tail}");
    };
    if query.is_empty() {
        return format!("{scheme}{authority}{path}");
    }
    let query: Vec<String> = query
        .split('&')
        .map(|item| match item.split_once('=') {
            Some((name, _)) => format!("{name}={URL_MASK}"),
            None => URL_MASK.to_string(),
        })
        .collect();
    format!("{scheme}{authority}{path}?{}", query.join("&"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gateway_url_reads_its_parts() {
        let url = GatewayUrl::parse("WSS://[::1]/").unwrap();
        assert_eq!(
            (url.host.as_str(), url.port, url.secure, url.path.as_str()),
            ("::1", 443, true, "/")
        );
        let url = GatewayUrl::parse("http://gw.example:81?q").unwrap();
        assert_eq!(
            (url.port, url.path.as_str(), url.authority.as_str()),
            (81, "/?q", "gw.example:81")
        );
        assert_eq!(url.shown(), "ws://gw.example:81/?***");
    }

    #[test]
    fn a_url_is_shown_as_the_dispatcher_shows_it() {
        for (url, shown) in [
            (
                "ws://127.0.0.1:8080/v1/plugins/connect",
                "ws://127.0.0.1:8080/v1/plugins/connect",
            ),
            (
                "wss://gw.example/c?token=t0k&region=eu",
                "wss://gw.example/c?token=***&region=***",
            ),
            (
                "ws://me:t0k@gw.example/c?debug#frag",
                "ws://me:***@gw.example/c?***",
            ),
            ("ws://t0k@gw.example:8080/c", "ws://***@gw.example:8080/c"),
            (
                "ws://gw.example/c?t0k&region=eu",
                "ws://gw.example/c?***&region=***",
            ),
            ("ws://gw.example/c#t0k", "ws://gw.example/c"),
            ("ws://gw.example?", "ws://gw.example"),
            ("me:t0k@gw.example/c", "me:***@gw.example/c"),
            ("not-a-url", "not-a-url"),
        ] {
            assert_eq!(masked_url(url), shown, "{url}");
        }
        // What a log line says of the URL it dials: the query masked, the fragment gone.
        let url = GatewayUrl::parse("ws://gw.example/c?token=t0k&t1k#t2k").unwrap();
        assert_eq!(url.shown(), "ws://gw.example/c?token=***&***");
    }
}
