//! The plugin over WebSocket (docs/protocol.md, "WebSocket binding"), both ways:
//!
//! * `serve --websocket [--address HOST:PORT] [--config JSON]`: the plugin listens and the
//!   dispatcher dials it (`provider: websocket`, `url: ws://…`); the first line on stdout
//!   is `1|1|tcp|HOST:PORT|websocket|`. With a token (`LINCHKIT_PLUGIN_TOKEN_FILE` or
//!   `LINCHKIT_PLUGIN_TOKEN`) the upgrade must carry it, else `401`; without one the
//!   plugin serves anyone and warns at start.
//! * `connect --url ws://HOST/v1/plugins/connect [--config JSON]`: the plugin dials the
//!   gateway (`provider: websocket`, `mode: inbound`) with that token, and exits 1 with
//!   one line when the gateway refuses it (`dial`).
//!
//! Either way the plugin runs its own lifecycle: the init and start hooks with `--config`
//! before it serves, the stop and destroy hooks after the drain, within the stop's caps
//! (`LINCHKIT_PLUGIN_STOP_GRACE_MS`, `_STOP_HOOKS_MS`), then the spans still buffered.
//! Calls run through the gRPC binding's [`Shared`](crate::service::Shared), so params, deadlines, errors and
//! spans (`linchkit.plugin/<method>`) read the same on both bindings. Neither mode is
//! registered in etcd (no dispatcher finds a WebSocket plugin in a registry):
//! `LINCHKIT_REGISTER_ETCD` set (or `serve --websocket --register-etcd URL`, or any other
//! registry flag given a value) is refused at start, as the Go and Python SDKs refuse it;
//! only the gRPC `serve` registers (`crate::registry`).
//!
//! The parts, from the top down (each uses only parts on the lines below its own):
//!
//! 1. this file: [`run`], a mode from its command line to its stop.
//! 2. `cli`: the command lines | `dial`: `connect`'s dialling, again after every drop.
//! 3. `server`: the listener of `serve --websocket` (its reading of an HTTP head serves
//!    `dial` too).
//! 4. `client_tls`: the TLS client `connect` dials `wss://` with | `session`: one open
//!    connection, whichever side dialled.
//! 5. `served`: the plugin as every connection serves it ([`Core`](served::Core)).
//! 6. `protocol`: the protocol's frames | `handshake`: the upgrade | `gateway_url`: a
//!    gateway's URL, and how a line shows it.
//! 7. `frames`: the WebSocket frames and permessage-deflate (neither `frames` nor
//!    `handshake` does I/O).

mod cli;
mod client_tls;
mod dial;
mod frames;
mod gateway_url;
mod handshake;
mod protocol;
mod served;
mod server;
mod session;

use std::future::Future;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::auth::{BearerToken, ENV_TOKEN, ENV_TOKEN_FILE};
use crate::process::{Environment, ServeError, CORE_VERSION};
use crate::registry::settings::{self as registry_settings, RegistryConfig};
use crate::stop::StopCaps;
use crate::tracing::Tracer;
use crate::{Json, Plugin};

pub(crate) use cli::asked_for;
use cli::Command;
use served::Core;

/// What asks a plugin to register in etcd; the WebSocket modes refuse it.
const ENV_REGISTER_ETCD: &str = registry_settings::ENV_REGISTER_ETCD;

/// Runs the WebSocket mode `env.args` ask for ([`asked_for`]) until `shutdown`.
pub(crate) async fn run(
    plugin: Plugin,
    mut env: Environment,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let command = cli::command(&env.args)?;
    let mode = match &command {
        Command::Help(text) => {
            let written = async {
                env.stdout.write_all(text.as_bytes()).await?;
                env.stdout.flush().await
            };
            return written
                .await
                .map_err(|err| ServeError::Failed(format!("cannot write the help: {err}")));
        }
        Command::Serve { .. } => "serve",
        Command::Connect { .. } => "connect",
    };
    let var = |name: &str| env.vars.get(name).map(String::as_str).unwrap_or("");
    let failed = |why: String| ServeError::Failed(format!("{mode}: {why}"));
    // Refused, not ignored: an operator who set it expects the plugin to be found there.
    // `serve --websocket` takes the flag too, which wins over the variable (an empty one
    // turns it off), and is named as it was given.
    let etcd = match &command {
        Command::Serve { registry, .. } => {
            let config = RegistryConfig::new(registry.iter().cloned(), var);
            let named = config.name(registry_settings::ETCD);
            (!config.value(registry_settings::ETCD).is_empty()).then_some(named)
        }
        _ => (!var(ENV_REGISTER_ETCD).is_empty()).then(|| ENV_REGISTER_ETCD.to_string()),
    };
    if let Some(named) = etcd {
        return Err(failed(etcd_refusal(mode, &named)));
    }
    // Any other registry flag with a value: refused too, not dropped (the operator would
    // believe it in force). An empty one says "none", over a variable.
    if let Command::Serve { registry, .. } = &command {
        if let Some((flag, _)) = registry.iter().find(|(_, value)| !value.is_empty()) {
            return Err(failed(format!(
                "{flag}: a WebSocket server is not registered, as a dispatcher dials a websocket \
                 target at its one url and finds none in a registry: serve over gRPC to be \
                 registered, or leave the flag out"
            )));
        }
    }
    let token = BearerToken::configured(|name| var(name).to_string()).map_err(failed)?;
    let caps = StopCaps::from_vars(var).map_err(failed)?;
    let (Command::Serve { config, .. } | Command::Connect { config, .. }) = &command else {
        unreachable!("help returned above");
    };
    if serde_json::from_str::<serde::de::IgnoredAny>(config).is_err() {
        return Err(failed("--config is not valid JSON".into()));
    }
    // The init hook's config is an object, as every SDK says: until 2026-12-06 an array or
    // null was passed on. Its text is never quoted (a config may hold a secret).
    if serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(config).is_err() {
        return Err(failed("--config must be a JSON object".into()));
    }
    let config = Json::raw(config.as_bytes());
    let tracer = Tracer::from_vars(var, &plugin.id, &plugin.version).unwrap_or_else(|err| {
        crate::log::warn(&format!("serving without tracing: {err}"));
        None
    });
    let (id, version) = (plugin.id.clone(), plugin.version.clone());
    match command {
        Command::Help(_) => unreachable!("returned above"),
        Command::Serve { address, .. } => {
            let listener = TcpListener::bind(&address)
                .await
                .map_err(|err| failed(format!("cannot listen on {address}: {err}")))?;
            let bound = listener
                .local_addr()
                .map_err(|err| failed(err.to_string()))?
                .to_string();
            if token.is_none() {
                crate::log::warn(&format!(
                    "no bearer token configured ({ENV_TOKEN_FILE} or {ENV_TOKEN}): \
                     anybody who can reach {bound} can call this plugin"
                ));
            }
            let core = Core::new(plugin, tracer).await;
            core.open(config).await.map_err(failed)?;
            let line = format!(
                "{}|{}|tcp|{bound}|websocket|\n",
                CORE_VERSION,
                crate::PROTOCOL_VERSION
            );
            let written = async {
                env.stdout.write_all(line.as_bytes()).await?;
                env.stdout.flush().await
            };
            written
                .await
                .map_err(|err| failed(format!("cannot write the handshake line: {err}")))?;
            server::serve_until(core.clone(), listener, token, shutdown, caps.grace).await;
            stop(&core, caps).await;
            Ok(())
        }
        Command::Connect { url, tls, .. } => {
            // Checked before the hooks run, as the URL is (client_tls).
            let tls =
                client_tls::connector(&url, &tls, &|name| var(name).to_string()).map_err(failed)?;
            let core = Core::new(plugin, tracer).await;
            core.open(config).await.map_err(failed)?;
            crate::log::info(&format!(
                "{id}@{version} dialling {} (Ctrl+C stops it)",
                url.shown()
            ));
            let mut headers = vec![
                ("X-Plugin-Id".to_string(), id),
                ("X-Plugin-Version".to_string(), version),
            ];
            if let Some(token) = &token {
                headers.push(("Authorization".to_string(), token.authorization()));
            }
            let (stop_dialling, stopping) = watch::channel(None);
            let dialling = dial::dial(core.clone(), url, headers, stopping, tls);
            tokio::pin!(dialling, shutdown);
            // A signal does not end the dialling: the connection says goaway, and the
            // gateway finishes the calls it sent within the grace.
            let outcome = tokio::select! {
                outcome = &mut dialling => outcome,
                () = &mut shutdown => {
                    let _ = stop_dialling.send(Some(Instant::now() + caps.grace));
                    dialling.await
                }
            };
            stop(&core, caps).await;
            outcome.map_err(|refused| failed(refused.to_string()))
        }
    }
}

/// The end of a stop, once the connections are drained: the hooks (at most the hooks'
/// cap), then the spans still buffered.
async fn stop(core: &Core, caps: StopCaps) {
    core.stop_serving();
    let hooks_left = core.shared.run_remaining_hooks(caps.hooks).await;
    core.shared.flush_spans(hooks_left).await;
}

/// Why registering (asked for by `named`) is refused in `mode`, in the Python SDK's words.
fn etcd_refusal(mode: &str, named: &str) -> String {
    if mode == "connect" {
        format!(
            "{named}: a plugin that dials the gateway (connect) is not registered \
             in etcd, as no dispatcher dials it: the gateway knows it by its connection. Serve \
             over HTTP or gRPC to be found there, or leave it unset"
        )
    } else {
        format!(
            "{named}: a WebSocket server is not registered in etcd, as a dispatcher \
             dials a websocket target at its one url and finds none in a registry: serve over \
             HTTP or gRPC to be found there, or leave it unset"
        )
    }
}

#[cfg(test)]
mod tests {
    //! Both modes end to end through [`Plugin::run`], on real loopback sockets, with a
    //! host written here from the SDK's own frames.

    use std::collections::HashMap;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use serde_json::{json, Value};
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
    use tokio::net::TcpStream;
    use tokio::sync::oneshot;

    use super::frames::{Decoder, Encoder, Incoming, Role};
    use super::*;
    use crate::{Call, ServeError};

    /// The test plugin, and how many times its stop and destroy hooks ran.
    fn counted() -> (Plugin, Arc<AtomicUsize>) {
        let stopped = Arc::new(AtomicUsize::new(0));
        let (on_stop, on_destroy) = (stopped.clone(), stopped.clone());
        let plugin = Plugin::new("example", "1.0.0")
            .method("config", "", |call: Call| async move {
                Ok(call.config().clone())
            })
            .on_stop(move || {
                on_stop.fetch_add(1, Ordering::SeqCst);
                async { Ok(()) }
            })
            .on_destroy(move || {
                on_destroy.fetch_add(1, Ordering::SeqCst);
                async { Ok(()) }
            });
        (plugin, stopped)
    }

    struct Running {
        stop: Option<oneshot::Sender<()>>,
        task: tokio::task::JoinHandle<Result<(), ServeError>>,
        line: String,
    }

    async fn run_with(plugin: Plugin, args: &[&str], vars: &[(&str, &str)]) -> Running {
        let (stdout, from_plugin) = tokio::io::duplex(4096);
        let env = Environment {
            args: args.iter().map(|a| a.to_string()).collect(),
            vars: vars
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<HashMap<_, _>>(),
            stdin: Box::new(tokio::io::empty()),
            stdout: Box::new(stdout),
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(plugin.run(env, async move {
            let _ = stopped.await;
        }));
        let mut line = String::new();
        let _ = tokio::time::timeout(
            Duration::from_secs(10),
            BufReader::new(from_plugin).read_line(&mut line),
        )
        .await;
        Running {
            stop: Some(stop),
            task,
            line: line.trim_end().to_string(),
        }
    }

    /// A host's raw connection: an upgrade sent with `authorization`, the answer's head,
    /// and what came after it.
    async fn dial_raw(address: &str, authorization: Option<&str>) -> (TcpStream, String, Vec<u8>) {
        let mut socket = TcpStream::connect(address).await.unwrap();
        let credential = authorization
            .map(|a| format!("Authorization: {a}\r\n"))
            .unwrap_or_default();
        let request = format!(
            "GET / HTTP/1.1\r\nHost: {address}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{credential}\r\n"
        );
        socket.write_all(request.as_bytes()).await.unwrap();
        let (head, rest) = server::read_head(&mut socket)
            .await
            .ok()
            .expect("an answer");
        (socket, String::from_utf8(head).unwrap(), rest)
    }

    async fn next(socket: &mut TcpStream, decoder: &mut Decoder) -> Incoming {
        let mut buffer = [0u8; 4096];
        loop {
            if let Some(incoming) = decoder.next().unwrap() {
                return incoming;
            }
            let read = tokio::time::timeout(Duration::from_secs(10), socket.read(&mut buffer))
                .await
                .unwrap()
                .unwrap();
            assert!(read > 0, "the connection ended");
            decoder.feed(&buffer[..read]);
        }
    }

    async fn frame(socket: &mut TcpStream, decoder: &mut Decoder) -> Value {
        match next(socket, decoder).await {
            Incoming::Message(message) => serde_json::from_slice(&message).unwrap(),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn serve_checks_the_token_serves_and_stops_after_the_hosts_close() {
        let (plugin, stopped) = counted();
        let token = [("LINCHKIT_PLUGIN_TOKEN", "s3cret-token")];
        let mut running = run_with(
            plugin,
            &[
                "serve",
                "--websocket",
                "--address",
                "127.0.0.1:0",
                "--config",
                "{\"a\":1}",
            ],
            &token,
        )
        .await;
        let fields: Vec<&str> = running.line.split('|').collect();
        assert_eq!(
            (fields[..3].to_vec(), fields[4], fields[5]),
            (vec!["1", "1", "tcp"], "websocket", ""),
            "{}",
            running.line
        );
        let address = fields[3].to_string();

        for wrong in [None, Some("Bearer wrong"), Some("s3cret-token")] {
            let (_, head, _) = dial_raw(&address, wrong).await;
            assert!(
                head.starts_with("HTTP/1.1 401 ") && !head.contains("s3cret"),
                "{head}"
            );
        }
        let (mut socket, head, rest) = dial_raw(&address, Some("bearer s3cret-token")).await;
        assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
        let (mut decoder, mut encoder) = (
            Decoder::new(Role::Client, 1 << 20, None),
            Encoder::new(Role::Client, None),
        );
        decoder.feed(&rest);
        assert_eq!(
            frame(&mut socket, &mut decoder).await["methods"],
            json!(["config"])
        );
        let call = json!({"type": "call", "id": 1, "request": {"method": "config", "params": {}}});
        socket
            .write_all(&encoder.message(call.to_string().as_bytes()))
            .await
            .unwrap();
        assert_eq!(
            frame(&mut socket, &mut decoder).await["response"]["result"],
            json!({"a": 1})
        );

        running.stop.take().unwrap().send(()).unwrap();
        assert_eq!(
            frame(&mut socket, &mut decoder).await,
            json!({"type": "goaway"})
        );
        assert_eq!(
            stopped.load(Ordering::SeqCst),
            0,
            "no hook runs before the drain"
        );
        socket.write_all(&encoder.close(1000, "")).await.unwrap();
        assert!(matches!(
            next(&mut socket, &mut decoder).await,
            Incoming::Close(Some(1000), _)
        ));
        let outcome = tokio::time::timeout(Duration::from_secs(10), running.task)
            .await
            .unwrap()
            .unwrap();
        assert!(outcome.is_ok(), "{outcome:?}");
        assert_eq!(
            stopped.load(Ordering::SeqCst),
            2,
            "the stop and destroy hooks ran once each"
        );
        assert!(
            TcpStream::connect(&address).await.is_err(),
            "the listener closed"
        );
    }

    /// A gateway on loopback that upgrades one dial, reads its hello and closes it with
    /// `code` and `reason` (or refuses the upgrade with `status`): its URL, and the
    /// upgrade's head and the hello, once read.
    async fn gateway(
        status: u16,
        code: u16,
        reason: &'static str,
    ) -> (String, oneshot::Receiver<(String, Value)>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("ws://{}/v1/plugins/connect", listener.local_addr().unwrap());
        let (seen, heard) = oneshot::channel();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let (head, _) = server::read_head(&mut socket).await.ok().unwrap();
            let head = String::from_utf8(head).unwrap();
            if status != 101 {
                socket
                    .write_all(&handshake::refusal(status, "unauthorized", "no"))
                    .await
                    .unwrap();
                let _ = seen.send((head, Value::Null));
                return;
            }
            let key = head
                .lines()
                .find_map(|line| line.strip_prefix("Sec-WebSocket-Key: "))
                .unwrap()
                .to_string();
            socket
                .write_all(&handshake::switching_protocols(&key, None))
                .await
                .unwrap();
            let mut decoder = Decoder::new(Role::Server, 1 << 20, None);
            let hello = frame(&mut socket, &mut decoder).await;
            socket
                .write_all(&Encoder::new(Role::Server, None).close(code, reason))
                .await
                .unwrap();
            let _ = seen.send((head, hello));
            let mut rest = Vec::new();
            let _ =
                tokio::time::timeout(Duration::from_secs(5), socket.read_to_end(&mut rest)).await;
        });
        (url, heard)
    }

    #[tokio::test]
    async fn connect_ends_on_a_close_4403_naming_the_gateways_reason() {
        let (plugin, stopped) = counted();
        let (url, heard) =
            gateway(101, 4403, "admitted as version 2.0.0, said '1.0.0'\x1b[2J").await;
        let vars = [("LINCHKIT_PLUGIN_TOKEN", "s3cret-token")];
        let running = run_with(plugin, &["connect", "--url", &url], &vars).await;
        let outcome = tokio::time::timeout(Duration::from_secs(10), running.task)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            outcome.unwrap_err().to_string(),
            "connect: the gateway refused the connection (4403): admitted as version 2.0.0, said '1.0.0'\\x1b[2J"
        );
        let (head, hello) = heard.await.unwrap();
        assert!(
            head.contains("Authorization: Bearer s3cret-token\r\n"),
            "{head}"
        );
        assert!(
            head.contains("X-Plugin-Id: example\r\nX-Plugin-Version: 1.0.0\r\n"),
            "{head}"
        );
        assert!(
            head.contains("Sec-WebSocket-Extensions: permessage-deflate\r\n"),
            "offered: {head}"
        );
        assert_eq!(
            (hello["type"].as_str(), hello["id"].as_str()),
            (Some("hello"), Some("example"))
        );
        assert_eq!(
            stopped.load(Ordering::SeqCst),
            2,
            "the hooks ran at the end all the same"
        );
    }

    #[tokio::test]
    async fn connect_ends_on_a_refused_upgrade() {
        let (url, _heard) = gateway(401, 0, "").await;
        let running = run_with(counted().0, &["connect", "--url", &url], &[]).await;
        let outcome = tokio::time::timeout(Duration::from_secs(10), running.task)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            outcome.unwrap_err().to_string(),
            "connect: the gateway refused the connection (401)"
        );
    }

    #[tokio::test]
    async fn what_cannot_run_is_refused_in_one_line_before_serving() {
        /// Arguments, variables, and how the one line starts.
        type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
        let cases: [Case; 10] = [
            (
                &["connect", "--url", "ws://127.0.0.1:9/"],
                &[("LINCHKIT_REGISTER_ETCD", "http://e:2379")],
                "connect: LINCHKIT_REGISTER_ETCD: a plugin that dials the gateway",
            ),
            (
                &["serve", "--websocket"],
                &[("LINCHKIT_REGISTER_ETCD", "http://e:2379")],
                "serve: LINCHKIT_REGISTER_ETCD: a WebSocket server is not registered",
            ),
            (
                &["serve", "--websocket", "--register-etcd", "http://e:2379"],
                &[],
                "serve: --register-etcd: a WebSocket server is not registered",
            ),
            // Before, served: every registry flag but --register-etcd was dropped.
            (
                &["serve", "--websocket", "--register-prefix", "/p"],
                &[],
                "serve: --register-prefix: a WebSocket server is not registered",
            ),
            (
                &[
                    "serve",
                    "--websocket",
                    "--register-etcd=",
                    "--advertise=h:1",
                ],
                &[("LINCHKIT_REGISTER_ETCD", "http://e:2379")],
                "serve: --advertise: a WebSocket server is not registered",
            ),
            (
                &["serve", "--websocket", "--register-etcd-password", "SECRET"],
                &[],
                "serve: --register-etcd-password: no flag takes etcd's password",
            ),
            (
                &["serve", "--websocket", "--config", "{nope"],
                &[],
                "serve: --config is not valid JSON",
            ),
            (
                &["serve", "--websocket", "--config", " [\"SECRET\"]"],
                &[],
                "serve: --config must be a JSON object",
            ),
            (
                &["connect", "--url", "ws://127.0.0.1:9/", "--config", "null"],
                &[],
                "connect: --config must be a JSON object",
            ),
            (
                &["connect", "--url", "ws://127.0.0.1:9/"],
                &[("LINCHKIT_PLUGIN_STOP_GRACE_MS", "1.5")],
                "connect: LINCHKIT_PLUGIN_STOP_GRACE_MS must be a whole number",
            ),
        ];
        for (args, vars, said) in cases {
            let running = run_with(counted().0, args, vars).await;
            assert_eq!(running.line, "", "nothing on stdout");
            let outcome = tokio::time::timeout(Duration::from_secs(10), running.task)
                .await
                .unwrap()
                .unwrap();
            let message = outcome.unwrap_err().to_string();
            assert!(
                message.starts_with(said) && !message.contains('\n'),
                "{message}"
            );
        }
    }

    /// A gateway on loopback whose 101 carries `announced` (one `LinchKit-Max-Message-Bytes`
    /// line each) and that never welcomes: `plugin` dialling it through `connect`, and the
    /// gateway's end once the hello is read (its socket and decoder).
    async fn connected_announcing(
        plugin: Plugin,
        announced: &[&str],
    ) -> (
        TcpStream,
        Decoder,
        tokio::task::JoinHandle<Result<(), ServeError>>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("ws://{}/v1/plugins/connect", listener.local_addr().unwrap());
        let env = Environment {
            args: ["connect", "--url", &url].map(String::from).to_vec(),
            vars: HashMap::new(),
            stdin: Box::new(tokio::io::empty()),
            stdout: Box::new(tokio::io::sink()),
        };
        let task = tokio::spawn(plugin.run(env, std::future::pending()));
        let (mut socket, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
            .await
            .expect("the plugin dials within 10 s")
            .unwrap();
        let (head, _) = server::read_head(&mut socket).await.ok().unwrap();
        let head = String::from_utf8(head).unwrap();
        let key = head
            .lines()
            .find_map(|line| line.strip_prefix("Sec-WebSocket-Key: "))
            .unwrap();
        let mut answer = String::from_utf8(handshake::switching_protocols(key, None)).unwrap();
        answer.truncate(answer.len() - 2); // before its blank line
        for value in announced {
            answer.push_str(&format!("LinchKit-Max-Message-Bytes: {value}\r\n"));
        }
        answer.push_str("\r\n");
        socket.write_all(answer.as_bytes()).await.unwrap();
        let mut decoder = Decoder::new(Role::Server, 64 << 20, None);
        assert_eq!(frame(&mut socket, &mut decoder).await["type"], "hello");
        (socket, decoder, task)
    }

    /// The test plugin, and `big`, which answers `n` letters x.
    fn sized() -> Plugin {
        counted().0.method("big", "", |call: Call| async move {
            let n = call.params::<Value>()?["n"].as_u64().unwrap_or(0) as usize;
            Ok(Json::from(json!("x".repeat(n))))
        })
    }

    async fn send(socket: &mut TcpStream, frame: Value) {
        let message = Encoder::new(Role::Server, None).message(frame.to_string().as_bytes());
        socket.write_all(&message).await.unwrap();
    }

    fn big(id: i64, n: usize) -> Value {
        json!({"type": "call", "id": id, "request": {"v": 1, "method": "big", "params": {"n": n}, "context": {}}})
    }

    /// A frame as an assertion shows it: its first 80 characters.
    fn short(frame: &Value) -> String {
        frame.to_string().chars().take(80).collect()
    }

    /// The answer to `big` of 3000 letters under `limit`: the result, or its `too_large`.
    fn assert_answered_under(response: &Value, limit: usize, announced: &[&str]) {
        if limit >= 3100 {
            assert_eq!(
                response["ok"],
                true,
                "announced {announced:?}: {}",
                short(response)
            );
            return;
        }
        let error = &response["error"];
        assert_eq!(
            (error["type"].as_str(), error["details"]["reason"].as_str()),
            (Some("provider_error"), Some("too_large")),
            "announced {announced:?}: {}",
            short(response)
        );
        assert_eq!(error["details"]["limit"], limit, "{error}");
    }

    /// The gateway's cap comes on its 101 and is read before the hello: what the plugin
    /// sends before any welcome keeps under it, the events it kept while no gateway was
    /// connected first (the one over it not sent, the small one sent), and the answers. An
    /// announcement that is none (as on a dispatcher's upgrade, two headers too) leaves the
    /// SDK's own cap.
    #[tokio::test]
    async fn connect_keeps_under_the_cap_the_gateway_s_upgrade_announces() {
        let cases: [(&[&str], usize); 7] = [
            (&["2048"], 2048),
            (&["abc"], protocol::MAX_MESSAGE_BYTES),
            (&["-5"], protocol::MAX_MESSAGE_BYTES),
            (&["1e6"], protocol::MAX_MESSAGE_BYTES),
            (&["1023"], protocol::MAX_MESSAGE_BYTES),
            (&["2048", "4096"], protocol::MAX_MESSAGE_BYTES),
            (&["99999999999999999"], protocol::MAX_MESSAGE_BYTES),
        ];
        for (announced, limit) in cases {
            let plugin = sized();
            // Kept while no gateway is connected: one over 2048 bytes, then a small one.
            let emitter = plugin.emitter();
            emitter.emit("loud", Json::from(json!("x".repeat(3000))));
            emitter.emit("loud", Json::from(json!("x".repeat(10))));
            let (mut socket, mut decoder, task) = connected_announcing(plugin, announced).await;
            if limit > 3100 {
                let kept = frame(&mut socket, &mut decoder).await;
                assert_eq!(kept["data"], "x".repeat(3000), "announced {announced:?}");
            }
            let kept = frame(&mut socket, &mut decoder).await;
            assert_eq!(
                (kept["type"].as_str(), kept["data"].as_str()),
                (Some("event"), Some("xxxxxxxxxx")),
                "announced {announced:?}: {}",
                short(&kept)
            );
            send(&mut socket, big(1, 3000)).await;
            let answer = frame(&mut socket, &mut decoder).await;
            assert_eq!(answer["id"], 1, "{}", short(&answer));
            assert_answered_under(&answer["response"], limit, announced);
            task.abort();
        }
    }

    /// A valid welcome cap replaces the 101's, larger or not; one that is not valid leaves
    /// the 101's in place.
    #[tokio::test]
    async fn the_welcome_s_cap_replaces_the_upgrade_s() {
        let (mut socket, mut decoder, task) = connected_announcing(sized(), &["2048"]).await;
        let steps = [
            (None, 2048),
            (
                Some(json!({"type": "welcome", "max_message_bytes": "100000"})),
                2048,
            ),
            (
                Some(json!({"type": "welcome", "max_message_bytes": 100000})),
                100000,
            ),
            (
                Some(json!({"type": "welcome", "max_message_bytes": 2500})),
                2500,
            ),
            (Some(json!({"type": "welcome"})), 2500),
        ];
        for (id, (welcome, limit)) in steps.into_iter().enumerate() {
            if let Some(welcome) = &welcome {
                send(&mut socket, welcome.clone()).await;
            }
            send(&mut socket, big(id as i64, 3000)).await;
            let answer = frame(&mut socket, &mut decoder).await;
            assert_eq!(answer["id"], id, "{}", short(&answer));
            assert_answered_under(&answer["response"], limit, &["2048"]);
        }
        task.abort();
    }
}
