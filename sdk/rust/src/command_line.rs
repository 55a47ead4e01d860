//! What the command lines of `serve` (gRPC or WebSocket) and `connect` share: the program's
//! name in a usage line, the address `serve` listens on unless told otherwise and the check
//! of one given, and how a refused argument is named (never by its text).

use std::path::PathBuf;

use crate::process::ServeError;

/// The address `serve` listens on when not told otherwise: loopback only, any free port.
pub(crate) const DEFAULT_ADDRESS: &str = "127.0.0.1:0";

/// This executable's file name, so the usage line reads as the operator typed it.
pub(crate) fn program_name() -> String {
    std::env::args_os()
        .next()
        .map(PathBuf::from)
        .and_then(|path| {
            path.file_name()
                .map(|name| name.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| "plugin".to_string())
}

/// What a refusal says of `arg`, the `position`-th argument (as the shell counts `$1`,
/// `$2`): an option by its name, never its value; one given with a single dash, and
/// anything else, by its place, never its text. A command line can carry a secret where
/// an operator slipped (a mistyped `--register-etcd-pasword=…`, a token pasted as an
/// argument, or after a dash: a token may begin with one), and the message goes to stderr
/// and on to the logs.
pub(crate) fn refused(arg: &str, position: usize) -> String {
    match arg.split_once('=') {
        _ if !arg.starts_with('-') || arg == "-" => {
            format!("unexpected argument #{position} (its text is not shown)")
        }
        _ if !arg.starts_with("--") => {
            format!("unknown option (argument #{position}, its text is not shown)")
        }
        Some((name, _)) => format!("unknown option {name} (its value is not shown)"),
        None => format!("unknown option {arg}"),
    }
}

/// Refuses a mistyped address before listening: left to the resolver, an empty host would
/// listen on every interface and `::1:50051` would fail with a message naming neither the
/// flag nor the expected form.
pub(crate) fn check_address(address: &str) -> Result<(), ServeError> {
    let well_formed = address
        .rsplit_once(':')
        .is_some_and(|(host, port)| is_host(host) && is_port(port));
    if well_formed {
        return Ok(());
    }
    Err(ServeError::Failed(format!(
        "serve: --address must be host:port with a port in 0-65535 \
         (e.g. 127.0.0.1:50051), not '{address}'"
    )))
}

/// A name or an IPv4 address, or an IPv6 address in brackets (unbracketed, its colons
/// would be taken for the port's).
fn is_host(host: &str) -> bool {
    match host
        .strip_prefix('[')
        .and_then(|rest| rest.strip_suffix(']'))
    {
        Some(ipv6) => ipv6.parse::<std::net::Ipv6Addr>().is_ok(),
        None => !host.is_empty() && !host.contains([':', '[', ']']),
    }
}

/// Decimal digits only: `u16::from_str` would also take `+80`, and names like `http` are
/// not ports here.
fn is_port(port: &str) -> bool {
    !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) && port.parse::<u16>().is_ok()
}
