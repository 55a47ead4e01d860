//! Serving a plugin: the subprocess handshake (docs/protocol.md, "Subprocess plugins: the
//! handshake") and the service mode (`serve --address 127.0.0.1:0`).

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{mpsc, oneshot};
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream, UnixListenerStream};
use tokio_stream::{Stream, StreamExt};
use tonic::transport::server::{Connected, Router};
use tonic::codec::CompressionEncoding;
use tonic::transport::Server;

use crate::auth::{BearerToken, ENV_TOKEN, ENV_TOKEN_FILE};
use crate::pb::plugin_service_server::PluginServiceServer;
use crate::service::{Service, Shared};
use crate::{tls, Plugin, PROTOCOL_VERSION};

pub const ENV_MAGIC_COOKIE: &str = "LINCHKIT_PLUGIN_MAGIC_COOKIE";
pub const MAGIC_COOKIE_VALUE: &str = "d1spatch3r-pl4g1n";
pub const ENV_PROTOCOL_VERSIONS: &str = "LINCHKIT_PLUGIN_PROTOCOL_VERSIONS";
pub const ENV_NETWORK: &str = "LINCHKIT_PLUGIN_NETWORK";
pub const ENV_SOCKET_DIR: &str = "LINCHKIT_PLUGIN_SOCKET_DIR";

/// The version of the handshake line's format.
pub const CORE_VERSION: u32 = 1;

/// How long in-flight calls may take to finish at shutdown.
const GRACE_PERIOD: Duration = Duration::from_secs(5);

/// Why a plugin could not serve.
#[derive(Debug)]
pub enum ServeError {
    /// Run without the handshake environment and without `serve`.
    NotLaunchedByHost,
    Failed(String),
}

impl fmt::Display for ServeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServeError::NotLaunchedByHost => f.write_str(
                "this is a LinchKit dispatcher plugin: the dispatcher starts it as a subprocess; \
                 to run it by hand as a gRPC service use `serve --address 127.0.0.1:0`",
            ),
            ServeError::Failed(message) => f.write_str(message),
        }
    }
}

impl std::error::Error for ServeError {}

fn failed(context: &str) -> impl FnOnce(io::Error) -> ServeError + '_ {
    move |err| ServeError::Failed(format!("{context}: {err}"))
}

/// What [`Plugin::run`] reads from the process; tests pass their own.
pub struct Environment {
    pub args: Vec<String>,
    pub vars: HashMap<String, String>,
    pub stdin: Box<dyn AsyncRead + Send + Unpin>,
    pub stdout: Box<dyn AsyncWrite + Send + Unpin>,
}

impl Environment {
    /// This process's arguments (without the program name), variables, stdin and stdout.
    pub fn from_process() -> Self {
        Environment {
            args: std::env::args().skip(1).collect(),
            vars: std::env::vars().collect(),
            stdin: Box::new(tokio::io::stdin()),
            stdout: Box::new(tokio::io::stdout()),
        }
    }

    fn var(&self, name: &str) -> &str {
        self.vars.get(name).map(String::as_str).unwrap_or("")
    }
}

impl Plugin {
    /// Runs the plugin until it is told to stop, then exits the process. With the
    /// arguments `serve [--address HOST:PORT]` it is a gRPC service on that address;
    /// otherwise it expects the handshake environment of a subprocess plugin and exits with
    /// status 1 without it. It stops gracefully on SIGTERM or SIGINT, and as a subprocess
    /// also when its stdin reaches end-of-file (the host died).
    pub fn serve(self) -> ! {
        let runtime = match tokio::runtime::Runtime::new() {
            Ok(runtime) => runtime,
            Err(err) => {
                eprintln!("linchkit plugin: cannot start the async runtime: {err}");
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
        if env.args.first().map(String::as_str) == Some("serve") {
            let address = service_address(&env.args[1..])?;
            let token = BearerToken::configured(|name| env.var(name).to_string())
                .map_err(|err| ServeError::Failed(format!("serve: {err}")))?;
            let listener = TcpListener::bind(&address)
                .await
                .map_err(failed(&format!("serve: cannot listen on {address}")))?;
            let bound = listener.local_addr().map_err(failed("serve"))?.to_string();
            if token.is_none() {
                eprintln!(
                    "linchkit plugin: warning: no bearer token configured ({ENV_TOKEN_FILE} or \
                     {ENV_TOKEN}): anybody who can reach {bound} can call this plugin"
                );
            }
            let (shared, router) = build(self, true, token).await;
            write_line(
                &mut env.stdout,
                &handshake_line(PROTOCOL_VERSION, "tcp", &bound, ""),
            )
            .await?;
            return serve_on(
                shared,
                router,
                TcpListenerStream::new(listener),
                None,
                shutdown,
            )
            .await;
        }

        if env.var(ENV_MAGIC_COOKIE) != MAGIC_COOKIE_VALUE {
            return Err(ServeError::NotLaunchedByHost);
        }
        let version =
            negotiate_version(env.var(ENV_PROTOCOL_VERSIONS)).map_err(ServeError::Failed)?;
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
        let (shared, router) = build(self, false, None).await;

        // The host holds our stdin's write end: end-of-file means it is gone, however it died.
        let mut stdin = env.stdin;
        let stdin_closed = async move {
            let mut buffer = [0u8; 512];
            while let Ok(read) = stdin.read(&mut buffer).await {
                if read == 0 {
                    break;
                }
            }
            eprintln!("linchkit plugin: stdin closed, the host is gone; stopping");
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
                    TcpListenerStream::new(listener),
                    acceptor,
                    stop,
                )
                .await
            }
            other => Err(ServeError::Failed(format!(
                "{ENV_NETWORK}={other:?}: expected unix or tcp"
            ))),
        }
    }
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
) -> (Arc<Shared>, Router) {
    let (health, health_service) = tonic_health::server::health_reporter();
    let shared = Shared::new(plugin, health, serving_from_start).await;
    // gRPC's gzip: the dispatcher sends large calls in it (docs/protocol.md,
    // "Compression"); tonic caps the decompressed message at its decoding limit (4 MiB by
    // default). Answers stay plain: tonic's send_compressed has no size threshold and
    // would compress every small answer, which costs more than it saves on a fast link.
    let service = PluginServiceServer::new(Service(shared.clone()))
        .accept_compressed(CompressionEncoding::Gzip);
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
        None => router.add_service(service),
        Some(token) => router.add_service(tonic::service::interceptor::InterceptedService::new(
            service,
            move |request| token.check(request),
        )),
    };
    (shared, router)
}

/// Serves on `incoming` (through TLS when there is an acceptor) until `stop` completes,
/// then ends the plugin's streams, runs its remaining hooks and stops gracefully.
async fn serve_on<St, IO>(
    shared: Arc<Shared>,
    router: Router,
    incoming: St,
    acceptor: Option<TlsAcceptor>,
    stop: impl Future<Output = ()>,
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
        None => tokio::spawn(router.serve_with_incoming_shutdown(incoming, signal)),
        Some(acceptor) => tokio::spawn(
            router.serve_with_incoming_shutdown(tls_incoming(incoming, acceptor), signal),
        ),
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
    shared.shutdown().await;
    let _ = stop_server.send(());
    match tokio::time::timeout(GRACE_PERIOD, &mut server).await {
        Ok(done) => outcome(done),
        Err(_) => {
            server.abort();
            Ok(())
        }
    }
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
                    eprintln!("linchkit plugin: accept failed: {err}");
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
                                eprintln!("linchkit plugin: refused a TLS connection: {err}")
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

fn service_address(args: &[String]) -> Result<String, ServeError> {
    let mut address = "127.0.0.1:0".to_string();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        if let Some(value) = arg.strip_prefix("--address=") {
            address = value.to_string();
        } else if arg == "--address" {
            address = args
                .next()
                .cloned()
                .ok_or_else(|| ServeError::Failed("serve: --address needs HOST:PORT".into()))?;
        } else {
            return Err(ServeError::Failed(format!(
                "serve: unknown argument {arg:?}; usage: serve [--address HOST:PORT]"
            )));
        }
    }
    Ok(address)
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
