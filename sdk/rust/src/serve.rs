//! Serving a plugin: the subprocess handshake (docs/protocol.md, "Subprocess plugins: the
//! handshake") and the service mode (`serve --address 127.0.0.1:0`).

use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener};
use tokio::sync::{mpsc, oneshot};
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream, UnixListenerStream};
use tokio_stream::{Stream, StreamExt};
use tonic::codec::CompressionEncoding;
use tonic::transport::server::{Connected, Router};
use tonic::transport::Server;

use crate::auth::{BearerToken, ENV_TOKEN, ENV_TOKEN_FILE};
use crate::command_line::{check_address, program_name, refused, DEFAULT_ADDRESS};
use crate::late_streams::LateStreams;
use crate::otlp::{ENV_OTLP_ENDPOINT, ENV_OTLP_TRACES_ENDPOINT};
use crate::pb::plugin_service_server::PluginServiceServer;
use crate::process::{Environment, ServeError, CORE_VERSION};
use crate::registry::settings::{self as registry_settings, RegistryConfig};
use crate::registry::{Registered, Registration};
use crate::service::{Service, Shared};
use crate::size_status::SizeStatus;
use crate::stop::{StopCaps, ENV_STOP_GRACE_MS, ENV_STOP_HOOKS_MS, MAX_STOP_MS};
use crate::tracing::Tracer;
use crate::{tls, Plugin, PROTOCOL_VERSION};

pub const ENV_MAGIC_COOKIE: &str = "LINCHKIT_PLUGIN_MAGIC_COOKIE";
pub const MAGIC_COOKIE_VALUE: &str = "d1spatch3r-pl4g1n";
pub const ENV_PROTOCOL_VERSIONS: &str = "LINCHKIT_PLUGIN_PROTOCOL_VERSIONS";
pub const ENV_NETWORK: &str = "LINCHKIT_PLUGIN_NETWORK";
pub const ENV_SOCKET_DIR: &str = "LINCHKIT_PLUGIN_SOCKET_DIR";

/// The largest gRPC message the plugin takes or sends (Call, CallBatch, CallStream items,
/// Events), decompressed: 64 MiB, the dispatcher's own limit (its channel's
/// `grpc.max_receive_message_length` and `grpc.max_send_message_length`), not tonic's
/// default 4 MiB decoding limit. A larger request is refused with RESOURCE_EXHAUSTED
/// (tonic's OUT_OF_RANGE restated by [`SizeStatus`]); a larger reply with tonic's
/// OUT_OF_RANGE, which the dispatcher reads by its words.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

fn failed(context: &str) -> impl FnOnce(io::Error) -> ServeError + '_ {
    move |err| ServeError::Failed(format!("{context}: {err}"))
}

impl Plugin {
    /// Runs the plugin until it is told to stop, then exits the process. With the
    /// arguments `serve [--address HOST:PORT]` it is a gRPC service on that address (a
    /// mistyped address is refused before listening; `serve --help` prints the usage);
    /// otherwise it expects the handshake environment of a subprocess plugin and exits with
    /// status 1 without it. It stops gracefully on SIGTERM or SIGINT, and as a subprocess
    /// also when its stdin reaches end-of-file (the host died).
    pub fn serve(self) -> ! {
        crate::log::install_panic_hook();
        let runtime = match tokio::runtime::Runtime::new() {
            Ok(runtime) => runtime,
            Err(err) => {
                crate::log::error(&format!("cannot start the async runtime: {err}"));
                std::process::exit(1);
            }
        };
        let outcome = runtime.block_on(async {
            let shutdown = termination().map_err(failed("cannot handle signals"))?;
            self.run(Environment::from_process(), shutdown).await
        });
        // Exit without dropping the runtime: a blocking read of stdin may still be pending.
        match outcome {
            Ok(()) => std::process::exit(0),
            Err(err) => {
                eprintln!("{err}");
                std::process::exit(1);
            }
        }
    }

    /// Serves until `shutdown` completes (or, as a subprocess, stdin closes). `serve` is
    /// `run` on the real process; it is public for tests and for embedding.
    pub async fn run(
        self,
        mut env: Environment,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), ServeError> {
        if crate::websocket::asked_for(&env.args) {
            return crate::websocket::run(self, env, shutdown).await;
        }
        if env.args.first().map(String::as_str) == Some("serve") {
            let (address, registry) = match serve_request(&env.args[1..])? {
                ServeRequest::ShowHelp => return write_help(&mut env.stdout).await,
                ServeRequest::Listen { address, registry } => (address, registry),
            };
            let registry = RegistryConfig::new(registry, |name| env.var(name));
            let token = BearerToken::configured(|name| env.var(name).to_string())
                .map_err(|err| ServeError::Failed(format!("serve: {err}")))?;
            let caps = StopCaps::from_vars(|name| env.var(name))
                .map_err(|err| ServeError::Failed(format!("serve: {err}")))?;
            let listener = TcpListener::bind(&address)
                .await
                .map_err(failed(&format!("serve: cannot listen on {address}")))?;
            let listening = listener.local_addr().map_err(failed("serve"))?;
            let bound = listening.to_string();
            // Every registry setting is checked before serving.
            let registration = Registration::from_config(&registry, listening)
                .map_err(|err| ServeError::Failed(format!("serve: {err}")))?;
            if token.is_none() {
                crate::log::warn(&format!(
                    "no bearer token configured ({ENV_TOKEN_FILE} or {ENV_TOKEN}): \
                     anybody who can reach {bound} can call this plugin"
                ));
            }
            let tracer = tracer(&env, &self);
            let (shared, router) = build(self, true, token, tracer).await;
            write_line(
                &mut env.stdout,
                &handshake_line(PROTOCOL_VERSION, "tcp", &bound, ""),
            )
            .await?;
            let registered = registration.map(Registration::start);
            return serve_on(
                shared,
                router,
                accepted_without_delay(listener),
                None,
                shutdown,
                registered,
                caps,
            )
            .await;
        }

        if env.var(ENV_MAGIC_COOKIE) != MAGIC_COOKIE_VALUE {
            return Err(ServeError::NotLaunchedByHost);
        }
        let version =
            negotiate_version(env.var(ENV_PROTOCOL_VERSIONS)).map_err(ServeError::Failed)?;
        let caps = StopCaps::from_vars(|name| env.var(name)).map_err(ServeError::Failed)?;
        let network = match env.var(ENV_NETWORK) {
            "" => "unix".to_string(),
            other => other.to_string(),
        };
        let (acceptor, server_cert) = match env.var(tls::ENV_CLIENT_CERT) {
            "" => (None, String::new()),
            pem => {
                let (config, cert) = tls::auto_mtls(pem).map_err(ServeError::Failed)?;
                (Some(TlsAcceptor::from(config)), cert)
            }
        };
        let socket_dir = env.var(ENV_SOCKET_DIR).to_string();
        // No token here: AutoMTLS already admits only the host that launched us.
        let tracer = tracer(&env, &self);
        let (shared, router) = build(self, false, None, tracer).await;

        // The host holds our stdin's write end: end-of-file means it is gone, however it died.
        let mut stdin = env.stdin;
        let stdin_closed = async move {
            let mut buffer = [0u8; 512];
            while let Ok(read) = stdin.read(&mut buffer).await {
                if read == 0 {
                    break;
                }
            }
            crate::log::info("stdin closed, the host is gone; stopping");
        };
        let stop = async move {
            tokio::select! {
                () = shutdown => {}
                () = stdin_closed => {}
            }
        };

        match network.as_str() {
            "unix" => {
                let path = socket_path(&socket_dir);
                let listener =
                    UnixListener::bind(&path).map_err(failed("cannot listen for the host"))?;
                let line = handshake_line(version, "unix", &path.to_string_lossy(), &server_cert);
                write_line(&mut env.stdout, &line).await?;
                let outcome = serve_on(
                    shared,
                    router,
                    UnixListenerStream::new(listener),
                    acceptor,
                    stop,
                    None,
                    caps,
                )
                .await;
                let _ = std::fs::remove_file(&path);
                outcome
            }
            "tcp" => {
                let listener = TcpListener::bind("127.0.0.1:0")
                    .await
                    .map_err(failed("cannot listen for the host"))?;
                let bound = listener
                    .local_addr()
                    .map_err(failed("cannot listen for the host"))?
                    .to_string();
                write_line(
                    &mut env.stdout,
                    &handshake_line(version, "tcp", &bound, &server_cert),
                )
                .await?;
                serve_on(
                    shared,
                    router,
                    accepted_without_delay(listener),
                    acceptor,
                    stop,
                    None,
                    caps,
                )
                .await
            }
            other => Err(ServeError::Failed(format!(
                "{ENV_NETWORK}={other:?}: expected unix or tcp"
            ))),
        }
    }
}

/// The tracer the OTEL_* variables ask for (`crate::tracing`), or none. Settings it
/// cannot use leave the plugin serving untraced, with a warning: tracing is an aid, not
/// the plugin's job.
fn tracer(env: &Environment, plugin: &Plugin) -> Option<Tracer> {
    Tracer::from_vars(|name| env.var(name), &plugin.id, &plugin.version).unwrap_or_else(|err| {
        crate::log::warn(&format!("serving without tracing: {err}"));
        None
    })
}

/// The encoded descriptors of proto/plugin.proto (build.rs), for server reflection.
const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("plugin_descriptor");

/// The plugin's shared state and its gRPC router: the plugin service (behind `token`, if
/// any), health and server reflection (never behind it: reflection tells only the schema,
/// which proto/plugin.proto publishes anyway).
async fn build(
    plugin: Plugin,
    serving_from_start: bool,
    token: Option<BearerToken>,
    tracer: Option<Tracer>,
) -> (Arc<Shared>, Router) {
    let (health, health_service) = tonic_health::server::health_reporter();
    let shared = Shared::new(plugin, health, serving_from_start, tracer).await;
    // gRPC's gzip: the dispatcher sends large calls in it (docs/protocol.md,
    // "Compression"); tonic caps the decompressed message at its decoding limit
    // (MAX_MESSAGE_BYTES). Answers stay plain: tonic's send_compressed has no size threshold and
    // would compress every small answer, which costs more than it saves on a fast link.
    let service = PluginServiceServer::new(Service(shared.clone()))
        .accept_compressed(CompressionEncoding::Gzip)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let router = Server::builder()
        .add_service(health_service)
        .add_service(
            reflection()
                .build_v1()
                .expect("the descriptors built into the SDK are valid"),
        )
        .add_service(
            reflection()
                .build_v1alpha()
                .expect("the descriptors built into the SDK are valid"),
        );
    let router = match token {
        None => router.add_service(SizeStatus(service)),
        Some(token) => router.add_service(tonic::service::interceptor::InterceptedService::new(
            SizeStatus(service),
            move |request| token.check(request),
        )),
    };
    (shared, router)
}

/// Serves on `incoming` (through TLS when there is an acceptor) until `stop` completes,
/// then leaves the registry (`registered`: the key deleted before the calls in flight are
/// drained, the server answering the leave delay longer), then ends the plugin's streams, stops gracefully (the calls in flight have
/// `caps.grace` to finish) and only then runs the plugin's remaining hooks (`caps.hooks`
/// at most), then sends the spans still buffered (what remains of the hooks' cap, 1 s at
/// least; docs/protocol.md, "Stopping while called"). Each
/// connection is read through [`LateStreams`], so a call the client sent too late for the
/// stop cannot make h2 close the connection under the calls still running on it.
async fn serve_on<St, IO>(
    shared: Arc<Shared>,
    router: Router,
    incoming: St,
    acceptor: Option<TlsAcceptor>,
    stop: impl Future<Output = ()>,
    registered: Option<Registered>,
    caps: StopCaps,
) -> Result<(), ServeError>
where
    St: Stream<Item = io::Result<IO>> + Send + Unpin + 'static,
    IO: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static,
{
    let (stop_server, server_stopped) = oneshot::channel::<()>();
    let signal = async move {
        let _ = server_stopped.await;
    };
    let mut server = match acceptor {
        None => {
            tokio::spawn(router.serve_with_incoming_shutdown(incoming.map(late_streams), signal))
        }
        Some(acceptor) => tokio::spawn(router.serve_with_incoming_shutdown(
            tls_incoming(incoming, acceptor).map(late_streams),
            signal,
        )),
    };
    let outcome =
        |done: Result<Result<(), tonic::transport::Error>, tokio::task::JoinError>| match done {
            Ok(Ok(())) => Ok(()),
            Ok(Err(err)) => Err(ServeError::Failed(format!("gRPC server failed: {err}"))),
            Err(err) => Err(ServeError::Failed(format!("gRPC server failed: {err}"))),
        };
    tokio::select! {
        done = &mut server => return outcome(done),
        () = stop => {}
    }
    if let Some(registered) = registered {
        registered.leave().await;
    }
    shared.stop_serving().await;
    let _ = stop_server.send(());
    let served = match tokio::time::timeout(caps.grace, &mut server).await {
        Ok(done) => outcome(done),
        Err(_) => {
            server.abort();
            Ok(())
        }
    };
    let hooks_left = shared.run_remaining_hooks(caps.hooks).await;
    shared.flush_spans(hooks_left).await;
    served
}

/// The connections `listener` accepts, each with `TCP_NODELAY` set before TLS or gRPC reads
/// it. Tonic sets it only on the listeners it binds itself, not on a stream handed to
/// `serve_with_incoming`; without it Nagle's algorithm holds a reply's last small write (the
/// trailers after a large DATA frame) until the host acknowledges the one before, and the
/// host delays that acknowledgement: a call then took 40 ms instead of a fraction of one.
fn accepted_without_delay(
    listener: TcpListener,
) -> impl Stream<Item = io::Result<TcpStream>> + Send + Unpin + 'static {
    TcpListenerStream::new(listener).map(|accepted| {
        if let Ok(stream) = &accepted {
            if let Err(err) = stream.set_nodelay(true) {
                // Still served, only slower: not a reason to refuse the connection.
                crate::log::warn(&format!("cannot set TCP_NODELAY on a connection: {err}"));
            }
        }
        accepted
    })
}

fn late_streams<IO>(accepted: io::Result<IO>) -> io::Result<LateStreams<IO>> {
    accepted.map(LateStreams::new)
}

/// Completes TLS handshakes off the accept loop, so one slow client cannot hold up others.
fn tls_incoming<St, IO>(
    mut incoming: St,
    acceptor: TlsAcceptor,
) -> ReceiverStream<io::Result<tokio_rustls::server::TlsStream<IO>>>
where
    St: Stream<Item = io::Result<IO>> + Send + Unpin + 'static,
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (connections, receiver) = mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            let next = tokio::select! {
                next = incoming.next() => next,
                () = connections.closed() => return,
            };
            match next {
                None => return,
                Some(Err(err)) => {
                    crate::log::warn(&format!("accept failed: {err}"));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Some(Ok(stream)) => {
                    let acceptor = acceptor.clone();
                    let connections = connections.clone();
                    tokio::spawn(async move {
                        match acceptor.accept(stream).await {
                            Ok(tls) => {
                                let _ = connections.send(Ok(tls)).await;
                            }
                            Err(err) => {
                                crate::log::warn(&format!("refused a TLS connection: {err}"))
                            }
                        }
                    });
                }
            }
        }
    });
    ReceiverStream::new(receiver)
}

/// Completes on SIGTERM or SIGINT. The handlers are installed now, not at the first poll,
/// so a signal sent right after the handshake line is not lost.
fn termination() -> io::Result<impl Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
    })
}

async fn write_line(
    stdout: &mut (dyn AsyncWrite + Send + Unpin),
    line: &str,
) -> Result<(), ServeError> {
    let write = async {
        stdout.write_all(format!("{line}\n").as_bytes()).await?;
        stdout.flush().await
    };
    write
        .await
        .map_err(failed("cannot write the handshake line"))
}

pub(crate) fn handshake_line(
    version: u32,
    network: &str,
    address: &str,
    server_cert: &str,
) -> String {
    format!("{CORE_VERSION}|{version}|{network}|{address}|grpc|{server_cert}")
}

/// The highest protocol version both sides speak; a host that names none speaks 1.
pub(crate) fn negotiate_version(offered: &str) -> Result<u32, String> {
    if offered.trim().is_empty() {
        return Ok(PROTOCOL_VERSION);
    }
    let mut best = None;
    for field in offered.split(',') {
        let version: u32 = field.trim().parse().map_err(|_| {
            format!("{ENV_PROTOCOL_VERSIONS}={offered:?}: expected comma-separated integers")
        })?;
        if version == PROTOCOL_VERSION {
            best = best.max(Some(version));
        }
    }
    best.ok_or_else(|| {
        format!(
            "the host speaks protocol versions {offered}; this plugin speaks {PROTOCOL_VERSION}"
        )
    })
}

/// What `serve --help` prints on stdout. In service mode the plugin reads the token and
/// the stop's caps from its environment; the handshake variables
/// (LINCHKIT_PLUGIN_MAGIC_COOKIE, LINCHKIT_PLUGIN_CLIENT_CERT, ...) belong to subprocess
/// mode, so they are not listed.
fn serve_help() -> String {
    format!(
        "usage: {program} serve [--address HOST:PORT] [--register-etcd URL ...]

Serve the plugin as a gRPC service until SIGTERM or Ctrl+C; the first line on stdout is
the handshake line, which names the address it listens on.

flags:
  --address HOST:PORT
      where to serve gRPC: a name, an IPv4 address or an [IPv6] address, and a port
      (0 for any free one; default {DEFAULT_ADDRESS})
  -h, --help
      print this help and exit

{registry}
environment (docs/protocol.md, \"Authentication (service mode)\"):
  {ENV_TOKEN_FILE}
      a file holding the bearer token every call must carry (a mounted secret)
  {ENV_TOKEN}
      the bearer token itself; set one of the two, not both (without a token anybody
      who can reach the address may call the plugin)
  {ENV_STOP_GRACE_MS}, {ENV_STOP_HOOKS_MS}
      on SIGTERM, the milliseconds the calls in flight get to finish, then the stop and
      destroy hooks together, 0-{MAX_STOP_MS} (default 5000 each; 0 does not wait)
  {ENV_OTLP_ENDPOINT}, {ENV_OTLP_TRACES_ENDPOINT}
      export a span per call over OTLP/HTTP (docs/observability.md)
",
        program = program_name(),
        registry = registry_settings::help(),
    )
}

async fn write_help(stdout: &mut (dyn AsyncWrite + Send + Unpin)) -> Result<(), ServeError> {
    let write = async {
        stdout.write_all(serve_help().as_bytes()).await?;
        stdout.flush().await
    };
    write.await.map_err(failed("serve: cannot write the help"))
}

/// What the arguments after `serve` ask for.
#[derive(Debug, PartialEq)]
enum ServeRequest {
    ShowHelp,
    /// Listen on `address`, already checked by [`check_address`]; `registry`: the registry
    /// flags given, each with its value (`crate::registry::settings`).
    Listen {
        address: String,
        registry: Vec<(&'static str, String)>,
    },
}

fn serve_request(args: &[String]) -> Result<ServeRequest, ServeError> {
    // Before anything reads the arguments: no message may quote a password.
    if registry_settings::password_flag_given(args) {
        return Err(ServeError::Failed(format!(
            "serve: {}",
            registry_settings::password_flag_refusal()
        )));
    }
    let mut address = DEFAULT_ADDRESS.to_string();
    let mut registry = Vec::new();
    // `args` follow `serve`: the first is the command line's second (`$2`).
    let mut args = args.iter().zip(2..);
    while let Some((arg, position)) = args.next() {
        let flag = arg.split_once('=').map_or(arg.as_str(), |(flag, _)| flag);
        if arg == "--help" || arg == "-h" {
            return Ok(ServeRequest::ShowHelp);
        } else if let Some(setting) = registry_settings::setting_of_flag(flag) {
            let value = match arg.split_once('=') {
                Some((_, value)) => value.to_string(),
                None => args.next().map(|(value, _)| value.clone()).ok_or_else(|| {
                    ServeError::Failed(format!(
                        "serve: {flag} needs {} (serve --help)",
                        setting.value_name
                    ))
                })?,
            };
            registry.push((setting.flag, value));
        } else if let Some(value) = arg.strip_prefix("--address=") {
            address = value.to_string();
        } else if arg == "--address" {
            address = args.next().map(|(value, _)| value.clone()).ok_or_else(|| {
                ServeError::Failed("serve: --address needs HOST:PORT (serve --help)".into())
            })?;
        } else {
            return Err(ServeError::Failed(format!(
                "serve: {}; usage: serve [--address HOST:PORT] \
                 [--register-etcd URL ...] [--help]",
                refused(arg, position)
            )));
        }
    }
    check_address(&address)?;
    Ok(ServeRequest::Listen { address, registry })
}

fn socket_path(dir: &str) -> PathBuf {
    let dir = if dir.is_empty() {
        std::env::temp_dir()
    } else {
        PathBuf::from(dir)
    };
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    dir.join(format!("plugin-{}-{nanos:08x}.sock", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(args: &[&str]) -> Result<ServeRequest, ServeError> {
        serve_request(&args.iter().map(|a| a.to_string()).collect::<Vec<_>>())
    }

    fn listen(address: &str) -> ServeRequest {
        ServeRequest::Listen {
            address: address.to_string(),
            registry: Vec::new(),
        }
    }

    #[test]
    fn serve_request_reads_the_address_or_the_default() {
        assert_eq!(request(&[]).unwrap(), listen(DEFAULT_ADDRESS));
        assert_eq!(
            request(&["--address", "0.0.0.0:50051"]).unwrap(),
            listen("0.0.0.0:50051")
        );
        assert_eq!(request(&["--address=[::1]:0"]).unwrap(), listen("[::1]:0"));
        assert_eq!(
            request(&["--address", "localhost:0"]).unwrap(),
            listen("localhost:0")
        );
        assert_eq!(
            request(&["--address", "h:65535"]).unwrap(),
            listen("h:65535")
        );
    }

    #[test]
    fn the_registry_flags_are_read_in_either_form_and_the_password_flag_refused() {
        let Ok(ServeRequest::Listen { registry, .. }) = request(&[
            "--register-etcd",
            "http://127.0.0.1:2379",
            "--register-prefix=/p",
            "--register-etcd-user",
            "",
        ]) else {
            panic!("refused");
        };
        assert_eq!(
            registry,
            [
                ("--register-etcd", "http://127.0.0.1:2379".to_string()),
                ("--register-prefix", "/p".to_string()),
                ("--register-etcd-user", String::new()),
            ]
        );
        let missing = request(&["--register-ttl"]).unwrap_err().to_string();
        assert_eq!(
            missing,
            "serve: --register-ttl needs SECONDS (serve --help)"
        );
        for password in [
            &["--register-etcd-password", "SECRET"][..],
            &["--register-etcd-password=SECRET"],
            &["--address", "oops", "-register-etcd-password", "SECRET"],
        ] {
            let refused = request(password).unwrap_err().to_string();
            assert!(
                refused.starts_with("serve: --register-etcd-password: no flag takes")
                    && refused.contains("LINCHKIT_REGISTER_ETCD_PASSWORD")
                    && !refused.contains("SECRET"),
                "{refused}"
            );
        }
    }

    #[test]
    fn help_wins_over_the_address() {
        assert_eq!(request(&["--help"]).unwrap(), ServeRequest::ShowHelp);
        assert_eq!(request(&["-h"]).unwrap(), ServeRequest::ShowHelp);
        assert_eq!(
            request(&["--address", "oops", "-h"]).unwrap(),
            ServeRequest::ShowHelp
        );
    }

    #[test]
    fn a_mistyped_address_is_refused_with_the_expected_form() {
        for address in [
            "",
            "not-an-address",
            "127.0.0.1:",
            "127.0.0.1:99999",
            "127.0.0.1:65536",
            "127.0.0.1:-1",
            "127.0.0.1:+80",
            "127.0.0.1:http",
            ":50051",
            "::1:50051",
            "[::1]",
            "[not-ipv6]:0",
            "[::1:0",
        ] {
            let message = request(&["--address", address]).unwrap_err().to_string();
            assert_eq!(
                message,
                format!(
                    "serve: --address must be host:port with a port in 0-65535 \
                     (e.g. 127.0.0.1:50051), not '{address}'"
                ),
            );
        }
    }

    #[test]
    fn unknown_arguments_and_a_missing_value_are_refused() {
        let unknown = request(&["--port", "1"]).unwrap_err().to_string();
        assert!(
            unknown.starts_with("serve: unknown option --port; usage") && unknown.contains("usage"),
            "{unknown}"
        );
        let missing = request(&["--address"]).unwrap_err().to_string();
        assert!(missing.contains("--address needs HOST:PORT"), "{missing}");
        assert!(!missing.contains('\n') && !unknown.contains('\n'));
    }

    /// A command line can carry a secret where an operator slipped: a refusal names the
    /// option or the place, never the value (before, `unknown argument "--x=SECRET"`).
    #[test]
    fn a_refusal_never_repeats_a_value() {
        let secret = "hunter2-5f1d";
        for (args, said) in [
            (
                vec![format!("--register-etcd-pasword={secret}")],
                "serve: unknown option --register-etcd-pasword (its value is not shown); usage",
            ),
            (
                vec![format!("--url=ws://me:{secret}@127.0.0.1:9/")],
                "serve: unknown option --url (its value is not shown); usage",
            ),
            (
                vec!["--address".into(), "127.0.0.1:0".into(), secret.into()],
                "serve: unexpected argument #4 (its text is not shown); usage",
            ),
            // One dash: by its place (before, named whole, as an option).
            (
                vec![format!("-{secret}")],
                "serve: unknown option (argument #2, its text is not shown); usage",
            ),
            (
                vec!["--address=127.0.0.1:0".into(), format!("-{secret}=1")],
                "serve: unknown option (argument #3, its text is not shown); usage",
            ),
        ] {
            let refused = serve_request(&args).unwrap_err().to_string();
            assert!(refused.starts_with(said), "{refused}");
            assert!(!refused.contains(secret), "{refused}");
        }
    }

    /// The conformance suite checks it on the real plugin's sockets
    /// (tests/conformance/test_tcp_nodelay.py); this is the function both TCP modes use.
    #[tokio::test]
    async fn accepted_connections_send_without_delay() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let mut incoming = accepted_without_delay(listener);
        let _client = TcpStream::connect(address).await.unwrap();
        let accepted = incoming.next().await.unwrap().unwrap();
        assert!(accepted.nodelay().unwrap(), "Nagle's algorithm left on");
    }

    #[test]
    fn help_names_the_flags_and_the_environment() {
        let help = serve_help();
        for needed in [
            "--address",
            DEFAULT_ADDRESS,
            "--help",
            ENV_TOKEN_FILE,
            ENV_TOKEN,
            ENV_STOP_GRACE_MS,
            ENV_STOP_HOOKS_MS,
            ENV_OTLP_ENDPOINT,
            ENV_OTLP_TRACES_ENDPOINT,
            "--register-etcd URL",
            "--leave-delay SECONDS",
            "LINCHKIT_REGISTER_ETCD_PASSWORD",
        ] {
            assert!(help.contains(needed), "{needed} missing from:\n{help}");
        }
    }
}
