//! The WebSocket modes' command lines, as every SDK's executable takes them
//! (docs/protocol.md, "The example plugin, in every language"):
//!
//! * `serve --websocket [--address HOST:PORT] [--config JSON]`: serve; the dispatcher
//!   dials in (`provider: websocket`, `url: ws://…`);
//! * `connect --url ws://HOST/v1/plugins/connect [--config JSON] [--ca-file PEM]
//!   [--cert-file PEM --key-file PEM]`: dial the gateway (`provider: websocket`, `mode:
//!   inbound`), over `wss://` with the TLS files of `client_tls`.
//!
//! A mistake is one line naming the flag and what it takes, before anything starts.

use super::client_tls::{TlsFlags, ENV_CLIENT_CERT, ENV_CLIENT_KEY, ENV_GATEWAY_CA};
use super::gateway_url::{masked_url, GatewayUrl};
use crate::auth::{ENV_TOKEN, ENV_TOKEN_FILE};
use crate::command_line::{check_address, program_name, refused, DEFAULT_ADDRESS};
use crate::otlp::{ENV_OTLP_ENDPOINT, ENV_OTLP_TRACES_ENDPOINT};
use crate::process::ServeError;
use crate::registry::settings as registry_settings;
use crate::stop::{ENV_STOP_GRACE_MS, ENV_STOP_HOOKS_MS, MAX_STOP_MS};

const SERVE_USAGE: &str = "serve --websocket [--address HOST:PORT] [--config JSON] [--help]";
const CONNECT_USAGE: &str = "connect --url ws://HOST:PORT/v1/plugins/connect [--config JSON] \
     [--ca-file PEM] [--cert-file PEM --key-file PEM] [--help]";

/// What the arguments ask for.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Command {
    /// Print this text on stdout and exit 0.
    Help(String),
    /// Serve on `address` (checked), the plugin's lifecycle run with `config` (unchecked).
    /// `registry`: the registry flags given (as a gRPC `serve` takes them), only to be
    /// refused by the name they came by (`websocket::run`).
    Serve {
        address: String,
        config: String,
        registry: Vec<(&'static str, String)>,
    },
    /// Dial the gateway at `url`, with the TLS files given as flags (`client_tls`: the
    /// variables fill in the others).
    Connect {
        url: GatewayUrl,
        config: String,
        tls: TlsFlags,
    },
}

/// Whether `args` ask for a WebSocket mode: `connect`, or `serve` with `--websocket`.
pub(crate) fn asked_for(args: &[String]) -> bool {
    match args.first().map(String::as_str) {
        Some("connect") => true,
        Some("serve") => args[1..].iter().any(|arg| arg == "--websocket"),
        _ => false,
    }
}

/// Reads `args` (`serve …` or `connect …`, as [`asked_for`] took them).
pub(crate) fn command(args: &[String]) -> Result<Command, ServeError> {
    let connecting = args.first().map(String::as_str) == Some("connect");
    let (mode, usage) = if connecting {
        ("connect", CONNECT_USAGE)
    } else {
        ("serve", SERVE_USAGE)
    };
    let mistake = |what: String| ServeError::Failed(format!("{mode}: {what}; usage: {usage}"));
    // Before anything reads the arguments: no message may quote a password.
    if !connecting && registry_settings::password_flag_given(&args[1..]) {
        return Err(ServeError::Failed(format!(
            "{mode}: {}",
            registry_settings::password_flag_refusal()
        )));
    }
    let mut registry = Vec::new();
    let mut address = DEFAULT_ADDRESS.to_string();
    let mut url = None;
    let mut tls = TlsFlags::default();
    let mut config = "{}".to_string();
    let mut help = false;
    // After the mode: the first is the command line's second (`$2`).
    let mut args = args[1..].iter().zip(2..);
    while let Some((arg, position)) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => (flag, Some(value.to_string())),
            _ => (arg.as_str(), None),
        };
        let mut value = |flag: &str| {
            inline
                .clone()
                .or_else(|| args.next().map(|(value, _)| value.clone()))
                .ok_or_else(|| mistake(format!("{flag} needs a value")))
        };
        match flag {
            "--help" | "-h" => help = true,
            "--websocket" if !connecting && inline.is_none() => {}
            "--websocket" if !connecting => {
                return Err(mistake(
                    "--websocket takes no value (its value is not shown)".into(),
                ))
            }
            "--address" if !connecting => address = value(flag)?,
            "--url" if connecting => url = Some(value(flag)?),
            "--ca-file" if connecting => tls.ca_file = Some(value(flag)?),
            "--cert-file" if connecting => tls.cert_file = Some(value(flag)?),
            "--key-file" if connecting => tls.key_file = Some(value(flag)?),
            "--config" => config = value(flag)?,
            _ if !connecting && registry_settings::setting_of_flag(flag).is_some() => {
                let setting = registry_settings::setting_of_flag(flag).expect("matched");
                registry.push((setting.flag, value(flag)?));
            }
            _ => return Err(mistake(refused(arg, position))),
        }
    }
    if help {
        return Ok(Command::Help(if connecting {
            connect_help()
        } else {
            serve_help()
        }));
    }
    if !connecting {
        check_address(&address)?;
        return Ok(Command::Serve {
            address,
            config,
            registry,
        });
    }
    let Some(url) = url else {
        return Err(mistake("--url is required".into()));
    };
    let url = GatewayUrl::parse(&url).ok_or_else(|| {
        ServeError::Failed(format!(
            "connect: --url must be a ws:// or wss:// URL \
             (e.g. ws://127.0.0.1:8080/v1/plugins/connect), not '{}'",
            masked_url(&url)
        ))
    })?;
    Ok(Command::Connect { url, config, tls })
}

fn environment_help(token: &str, grace: &str) -> String {
    format!(
        "environment:
  {ENV_TOKEN_FILE}
      a file holding the bearer token {token} (a mounted secret)
  {ENV_TOKEN}
      the bearer token itself; set one of the two, not both
  {ENV_STOP_GRACE_MS}, {ENV_STOP_HOOKS_MS}
      on SIGTERM, the milliseconds {grace},
      then the stop and destroy hooks together, 0-{MAX_STOP_MS} (default 5000 each; 0 does not wait)
  {ENV_OTLP_ENDPOINT}, {ENV_OTLP_TRACES_ENDPOINT}
      export a span per call over OTLP/HTTP (docs/observability.md)
"
    )
}

fn serve_help() -> String {
    format!(
        "usage: {program} {SERVE_USAGE}

Serve the plugin over WebSocket until SIGTERM or Ctrl+C: the dispatcher dials it
(provider: websocket, url: ws://HOST:PORT/). The first line on stdout is the handshake
line, which names the address it listens on. The plugin runs its own lifecycle: its
init and start hooks with --config before it serves, its stop and destroy hooks after.

flags:
  --address HOST:PORT
      where to listen: a name, an IPv4 address or an [IPv6] address, and a port
      (0 for any free one; default {DEFAULT_ADDRESS})
  --config JSON
      the config its init hook gets (default {{}})
  -h, --help
      print this help and exit

{}",
        environment_help(
            "every upgrade must carry (without one anybody who can reach the address may call the plugin)",
            "the dispatcher gets to finish its calls after goaway"
        ),
        program = program_name(),
    )
}

fn connect_help() -> String {
    format!(
        "usage: {program} {CONNECT_USAGE}

Dial the dispatcher's gateway (provider: websocket, mode: inbound) and take calls over
that connection until SIGTERM or Ctrl+C, dialling again with backoff when it drops. A
refusal (401, 403 or 404 at the upgrade, or a close 4403 after the hello) ends it with
status 1. The plugin runs its own lifecycle, as with serve --websocket.

flags:
  --url ws://HOST:PORT/v1/plugins/connect
      the gateway (wss:// verifies it by the system's certificates, or --ca-file's)
  --config JSON
      the config its init hook gets (default {{}})
  --ca-file PEM
      wss://: the roots that verify the gateway, instead of the system's [{ENV_GATEWAY_CA}]
  --cert-file PEM
      wss://: the client certificate (chain) to log in with, for a gateway that requires
      one or whose auth.mtls names it as the target's principal [{ENV_CLIENT_CERT}]
  --key-file PEM
      the unencrypted private key of --cert-file [{ENV_CLIENT_KEY}]
  -h, --help
      print this help and exit

{}",
        environment_help(
            "presented to the gateway",
            "the gateway gets to finish its calls after goaway"
        ),
        program = program_name(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command_of(args: &[&str]) -> Result<Command, String> {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        command(&args).map_err(|err| err.to_string())
    }

    #[test]
    fn the_modes_are_asked_for_by_connect_or_websocket() {
        let asked =
            |args: &[&str]| asked_for(&args.iter().map(|a| a.to_string()).collect::<Vec<_>>());
        assert!(asked(&["connect"]));
        assert!(asked(&["serve", "--address", "x:0", "--websocket"]));
        assert!(!asked(&["serve", "--address", "127.0.0.1:0"]));
        assert!(!asked(&[]));
    }

    #[test]
    fn serve_reads_its_flags() {
        assert_eq!(
            command_of(&["serve", "--websocket"]),
            Ok(Command::Serve {
                address: DEFAULT_ADDRESS.into(),
                config: "{}".into(),
                registry: Vec::new(),
            })
        );
        assert_eq!(
            command_of(&[
                "serve",
                "--address=[::1]:0",
                "--websocket",
                "--config",
                "{\"a\":1}"
            ]),
            Ok(Command::Serve {
                address: "[::1]:0".into(),
                config: "{\"a\":1}".into(),
                registry: Vec::new(),
            })
        );
        let wrong = command_of(&["serve", "--websocket", "--address", "::1:50051"]).unwrap_err();
        assert!(
            wrong.contains("--address")
                && wrong.contains("host:port")
                && wrong.contains("::1:50051"),
            "{wrong}"
        );
        let unknown = command_of(&["serve", "--websocket", "--url", "ws://x"]).unwrap_err();
        assert!(
            unknown.starts_with("serve: unknown option --url; usage") && !unknown.contains('\n'),
            "{unknown}"
        );
        // Named, never quoted: a token may sit in what was refused.
        for (args, said) in [
            (
                &["serve", "--websocket", "--url=ws://me:t0ken@h/"][..],
                "serve: unknown option --url (its value is not shown); usage",
            ),
            (
                &["serve", "--websocket", "--websocket=t0ken"],
                "serve: --websocket takes no value (its value is not shown); usage",
            ),
            (
                &["connect", "--url", "ws://h/", "--token=t0ken"],
                "connect: unknown option --token (its value is not shown); usage",
            ),
            (
                &["connect", "--url", "ws://h/", "t0ken"],
                "connect: unexpected argument #4 (its text is not shown); usage",
            ),
            (
                &["connect", "--url", "ws://h/", "-t0ken"],
                "connect: unknown option (argument #4, its text is not shown); usage",
            ),
        ] {
            let refused = command_of(args).unwrap_err();
            assert!(
                refused.starts_with(said) && !refused.contains("t0ken"),
                "{refused}"
            );
        }
        assert!(command_of(&["serve", "--websocket", "--config"])
            .unwrap_err()
            .contains("--config needs a value"));
        assert!(
            matches!(command_of(&["serve", "--websocket", "-h"]), Ok(Command::Help(help)) if help.contains("--config"))
        );
    }

    #[test]
    fn connect_reads_its_flags_and_refuses_a_url_that_names_no_gateway() {
        match command_of(&[
            "connect",
            "--url",
            "ws://127.0.0.1:8080/v1/plugins/connect?x=1#f",
        ])
        .unwrap()
        {
            Command::Connect { url, config, .. } => {
                assert_eq!(config, "{}");
                assert_eq!(
                    (url.host.as_str(), url.port, url.secure),
                    ("127.0.0.1", 8080, false)
                );
                assert_eq!(url.path, "/v1/plugins/connect?x=1");
                assert_eq!(url.authority, "127.0.0.1:8080");
            }
            other => panic!("{other:?}"),
        }
        let missing = command_of(&["connect"]).unwrap_err();
        assert!(missing.contains("--url is required"), "{missing}");
        for url in [
            "not-a-url",
            "ftp://127.0.0.1/v1/plugins/connect",
            "ws://",
            "ws//127.0.0.1:8080/v1/plugins/connect",
            "ws://h:99999/",
            "ws://h:http/",
            "ws://h /",
            "ws://::1/",
        ] {
            let said = command_of(&["connect", "--url", url]).unwrap_err();
            assert!(
                said.contains("--url") && said.contains("ws://") && said.contains(url),
                "{said}"
            );
        }
        // A refused URL is shown masked: before, a token in it was quoted as written.
        for (url, shown) in [
            ("ws://u:t0ken@h/", "ws://u:***@h/"),
            ("ws://t0ken@h/", "ws://***@h/"),
            ("ftp://h/?token=t0ken", "ftp://h/?token=***"),
            ("ws://h:99999/?t0ken", "ws://h:99999/?***"),
            ("ftp://h/#t0ken", "ftp://h/"),
        ] {
            let said = command_of(&["connect", "--url", url]).unwrap_err();
            assert!(
                said.contains(&format!("not '{shown}'")) && !said.contains("t0ken"),
                "{said}"
            );
        }
        assert!(
            matches!(command_of(&["connect", "--help"]), Ok(Command::Help(help)) if help.contains("LINCHKIT_PLUGIN_TOKEN"))
        );
    }

    #[test]
    fn help_names_the_environment() {
        for help in [serve_help(), connect_help()] {
            for needed in [
                ENV_TOKEN_FILE,
                ENV_TOKEN,
                ENV_STOP_GRACE_MS,
                ENV_STOP_HOOKS_MS,
            ] {
                assert!(help.contains(needed), "{needed} missing from:\n{help}");
            }
        }
    }
}
