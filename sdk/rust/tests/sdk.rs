//! The SDK as a host sees it: a plugin served in this process on real sockets, called
//! with a tonic client; the handshake, AutoMTLS and the mapping of errors.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use linchkit_plugin::pb::plugin_service_client::PluginServiceClient;
use linchkit_plugin::pb::{self, stream_item};
use linchkit_plugin::{
    Call, ChunkSender, Environment, Error, Json, Plugin, ServeError, ENV_STOP_GRACE_MS,
    ENV_STOP_HOOKS_MS, SERVICE_NAME,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader, DuplexStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

fn test_plugin() -> Plugin {
    Plugin::new("test", "0.1.0")
        .method("echo", "", |call: Call| async move {
            Ok(call.raw_params().clone())
        })
        .method("typed", "", |_: Call| async move {
            Err::<Json, _>(
                Error::new("Overdrawn", "balance is 100")
                    .retryable(true)
                    .with_details(json!({"balance": 100}))
                    .with_retry_after(1.5),
            )
        })
        .method("panics", "", |_: Call| async move {
            if true {
                panic!("boom");
            }
            Ok(Json::raw("null"))
        })
        .method("needs", "", |call: Call| async move {
            #[derive(serde::Deserialize)]
            struct Params {
                n: i64,
            }
            let params: Params = call.params()?;
            Ok(json!(params.n).into())
        })
        .method("waits", "", |_: Call| async move {
            tokio::time::sleep(Duration::from_secs(30)).await;
            Ok(Json::raw("null"))
        })
        .streaming_method("count", "", |_: Call, chunks: ChunkSender| async move {
            for i in 0..3 {
                chunks.send(json!({ "i": i })).await?;
            }
            Ok(())
        })
        .on_event("ping", |data, events| events.emit("pong", data))
        .on_event("boom", |_, _| panic!("a handler that fails"))
}

/// A plugin running in this process; dropping `stdin` is the host dying.
struct Running {
    fields: Vec<String>,
    stdin: Option<DuplexStream>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), ServeError>>,
}

async fn start(args: &[&str], vars: &[(&str, &str)]) -> Running {
    start_plugin(test_plugin(), args, vars).await
}

async fn start_plugin(plugin: Plugin, args: &[&str], vars: &[(&str, &str)]) -> Running {
    let (stdin_host, stdin_plugin) = tokio::io::duplex(64);
    let (stdout_plugin, stdout_host) = tokio::io::duplex(4096);
    let env = Environment {
        args: args.iter().map(|s| s.to_string()).collect(),
        vars: vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<HashMap<_, _>>(),
        stdin: Box::new(stdin_plugin),
        stdout: Box::new(stdout_plugin),
    };
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(plugin.run(env, async move {
        let _ = stopped.await;
    }));
    let mut line = String::new();
    BufReader::new(stdout_host)
        .read_line(&mut line)
        .await
        .expect("a handshake line");
    let fields: Vec<String> = line.trim_end().split('|').map(String::from).collect();
    assert_eq!(fields.len(), 6, "handshake line {line:?}");
    Running {
        fields,
        stdin: Some(stdin_host),
        stop: Some(stop),
        task,
    }
}

impl Running {
    async fn client(&self) -> (PluginServiceClient<Channel>, HealthClient<Channel>) {
        let channel = Channel::from_shared(format!("http://{}", self.fields[3]))
            .unwrap()
            .connect()
            .await
            .unwrap();
        (
            PluginServiceClient::new(channel.clone()),
            HealthClient::new(channel),
        )
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        let outcome = tokio::time::timeout(Duration::from_secs(10), self.task).await;
        assert!(
            matches!(outcome, Ok(Ok(Ok(())))),
            "plugin did not stop cleanly"
        );
    }
}

fn request(method: &str, params: &str, deadline_ms: i64) -> pb::CallRequest {
    pb::CallRequest {
        v: 1,
        plugin: "test".into(),
        method: method.into(),
        params_json: params.as_bytes().to_vec(),
        context: Some(pb::CallContext {
            request_id: "r1".into(),
            deadline_ms,
            ..Default::default()
        }),
    }
}

async fn health(client: &mut HealthClient<Channel>, service: &str) -> i32 {
    client
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status
}

#[tokio::test]
async fn service_mode_maps_errors_into_call_reply() {
    let running = start(&["serve", "--address", "127.0.0.1:0"], &[]).await;
    assert_eq!(running.fields[..3], ["1", "1", "tcp"]);
    assert!(running.fields[3].starts_with("127.0.0.1:"));
    assert_eq!(running.fields[4..], ["grpc", ""]);
    let (mut client, mut health_client) = running.client().await;
    for service in ["", SERVICE_NAME] {
        assert_eq!(
            health(&mut health_client, service).await,
            ServingStatus::Serving as i32
        );
    }
    let info = client
        .describe(pb::DescribeRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            info.id.as_str(),
            info.runtime.as_str(),
            info.protocol_version
        ),
        ("test", "rust", 1)
    );

    let error_of = |reply: pb::CallReply| {
        assert!(!reply.ok);
        reply.error.unwrap()
    };
    let unknown = error_of(
        client
            .call(request("nope", "{}", 0))
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!(
        (
            unknown.r#type.as_str(),
            unknown.message.as_str(),
            unknown.retryable
        ),
        (
            "method_not_found",
            r#"plugin test has no method "nope"; it has: count, echo, needs, panics, typed, waits"#,
            false
        )
    );

    let typed = error_of(
        client
            .call(request("typed", "{}", 0))
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!(typed.r#type, "Overdrawn");
    assert_eq!(typed.message, "balance is 100");
    assert!(typed.retryable);
    assert_eq!(typed.details_json, br#"{"balance":100}"#);
    assert_eq!(typed.retry_after, 1.5);

    let panicked = error_of(
        client
            .call(request("panics", "{}", 0))
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!(
        (panicked.r#type.as_str(), panicked.message.as_str()),
        ("PluginError", "method panicked: boom")
    );

    for (params, message) in [
        (
            "{}",
            "params of needs: missing field `n` at line 1 column 2",
        ),
        (
            r#"{"n": "three"}"#,
            "needs: 'n' must be an integer, got a string",
        ),
        ("{not json", "params of needs are not valid JSON"),
        // Positional params fill the fields in order (docs/protocol.md); no Rust type in a
        // message.
        (
            r#"["four"]"#,
            "needs: '[0]' must be an integer, got a string",
        ),
        (
            r#""four""#,
            "needs takes an object of named params, got a string",
        ),
        ("4", "needs takes an object of named params, got a number"),
        (
            "true",
            "needs takes an object of named params, got a boolean",
        ),
        // null or none: refused as before, now without the struct's name.
        ("null", "needs takes an object of named params, got null"),
        ("", "needs takes an object of named params, got null"),
    ] {
        let invalid = error_of(
            client
                .call(request("needs", params, 0))
                .await
                .unwrap()
                .into_inner(),
        );
        assert_eq!(
            (invalid.r#type.as_str(), invalid.message.as_str()),
            ("invalid_params", message),
            "params {params}"
        );
    }

    let started = Instant::now();
    let late = error_of(
        client
            .call(request("waits", "{}", 50))
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!(
        (late.r#type.as_str(), late.retryable),
        ("deadline_exceeded", true)
    );
    assert!(started.elapsed() < Duration::from_secs(5));

    let version = error_of(
        client
            .call(pb::CallRequest {
                v: 2,
                ..request("echo", "1", 0)
            })
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!(version.r#type, "provider_error");

    // Results: bytes kept as sent, a streaming method called once gives the list.
    let echoed = client
        .call(request("echo", r#"{"big": 12345678901234567890}"#, 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(echoed.result_json, br#"{"big": 12345678901234567890}"#);
    let listed = client
        .call(request("count", "{}", 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.result_json, br#"[{"i":0},{"i":1},{"i":2}]"#);

    // CallStream: chunks of a streaming method, one chunk of a unary one, one error item.
    for (method, want) in [
        ("count", vec!["chunk"; 3]),
        ("echo", vec!["chunk"]),
        ("nope", vec!["error"]),
    ] {
        let mut stream = client
            .call_stream(request(method, "5", 0))
            .await
            .unwrap()
            .into_inner();
        let mut items = Vec::new();
        while let Some(item) = stream.message().await.unwrap() {
            items.push(match item.item.unwrap() {
                stream_item::Item::ChunkJson(_) => "chunk",
                stream_item::Item::Error(_) => "error",
            });
        }
        assert_eq!(items, want, "CallStream {method}");
    }

    // Events: ping → pong, after a host event whose handler panicked: that one is lost,
    // the stream goes on.
    let outgoing = tokio_stream::iter(vec![
        pb::HostEvent {
            name: "boom".into(),
            data_json: b"null".to_vec(),
        },
        pb::HostEvent {
            name: "ping".into(),
            data_json: b"[7]".to_vec(),
        },
    ]);
    let mut events = client.events(outgoing).await.unwrap().into_inner();
    let pong = tokio::time::timeout(Duration::from_secs(5), events.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        (pong.name.as_str(), pong.data_json.as_slice()),
        ("pong", b"[7]".as_slice())
    );

    running.stop().await;
}

#[tokio::test]
async fn without_the_handshake_environment_it_refuses() {
    let env = Environment {
        args: vec![],
        vars: HashMap::new(),
        stdin: Box::new(tokio::io::empty()),
        stdout: Box::new(tokio::io::sink()),
    };
    let outcome = test_plugin().run(env, std::future::pending()).await;
    assert!(matches!(outcome, Err(ServeError::NotLaunchedByHost)));
}

#[tokio::test]
async fn subprocess_mode_negotiates_and_exits_when_stdin_closes() {
    let dir = std::env::temp_dir().join(format!("lk-rust-sdk-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut running = start(
        &[],
        &[
            ("LINCHKIT_PLUGIN_MAGIC_COOKIE", "d1spatch3r-pl4g1n"),
            ("LINCHKIT_PLUGIN_PROTOCOL_VERSIONS", "2, 1"),
            ("LINCHKIT_PLUGIN_SOCKET_DIR", dir.to_str().unwrap()),
        ],
    )
    .await;
    assert_eq!(running.fields[..3], ["1", "1", "unix"]);
    let socket = std::path::PathBuf::from(&running.fields[3]);
    assert_eq!(socket.parent(), Some(dir.as_path()));
    assert!(socket.exists());

    drop(running.stdin.take()); // the host died
    let outcome = tokio::time::timeout(Duration::from_secs(10), &mut running.task).await;
    assert!(
        matches!(outcome, Ok(Ok(Ok(())))),
        "plugin did not stop when its stdin closed"
    );
    assert!(!socket.exists(), "socket left behind");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A collector that takes one OTLP/HTTP request and answers 200: the request's body.
async fn collect_one(listener: tokio::net::TcpListener) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (socket, _) = listener.accept().await.unwrap();
    let mut socket = BufReader::new(socket);
    let mut length = 0;
    loop {
        let mut line = String::new();
        socket.read_line(&mut line).await.unwrap();
        if line == "\r\n" || line.is_empty() {
            break;
        }
        if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = value.trim().parse().unwrap();
        }
    }
    let mut body = vec![0; length];
    socket.read_exact(&mut body).await.unwrap();
    socket
        .get_mut()
        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
        .await
        .unwrap();
    body
}

#[tokio::test]
async fn subprocess_mode_sends_the_spans_buffered_when_its_host_goes() {
    let collector = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", collector.local_addr().unwrap());
    let received = tokio::spawn(collect_one(collector));
    let mut running = start(
        &[],
        &[
            ("LINCHKIT_PLUGIN_MAGIC_COOKIE", "d1spatch3r-pl4g1n"),
            ("LINCHKIT_PLUGIN_NETWORK", "tcp"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_BSP_SCHEDULE_DELAY", "600000"), // sent only at the stop
        ],
    )
    .await;
    let (mut client, _) = running.client().await;
    let mut traced = request("echo", "{}", 0);
    traced.context.as_mut().unwrap().traceparent =
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into();
    assert!(client.call(traced).await.unwrap().into_inner().ok);
    drop(client);

    drop(running.stdin.take()); // the host died
    let outcome = tokio::time::timeout(Duration::from_secs(20), &mut running.task).await;
    assert!(matches!(outcome, Ok(Ok(Ok(())))), "plugin did not stop");
    let body = tokio::time::timeout(Duration::from_secs(5), received)
        .await
        .expect("the span was sent at the stop")
        .unwrap();
    let has = |text: &[u8]| body.windows(text.len()).any(|window| window == text);
    assert!(has(b"linchkit.plugin/echo"), "{body:?}");
    assert!(has(
        &hex::decode("4bf92f3577b34da6a3ce929d0e0e4736").unwrap()
    ));
}

#[tokio::test]
async fn subprocess_mode_refuses_a_host_it_cannot_speak_to() {
    let env = Environment {
        args: vec![],
        vars: [
            ("LINCHKIT_PLUGIN_MAGIC_COOKIE", "d1spatch3r-pl4g1n"),
            ("LINCHKIT_PLUGIN_PROTOCOL_VERSIONS", "2,3"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect(),
        stdin: Box::new(tokio::io::empty()),
        stdout: Box::new(tokio::io::sink()),
    };
    let outcome = test_plugin().run(env, std::future::pending()).await;
    assert!(matches!(outcome, Err(ServeError::Failed(message)) if message.contains("speaks 1")));
}

/// Both modes read how long a stop waits at start: a malformed value is refused then, in one
/// line naming the variable, before the handshake line (which a host takes for serving).
#[tokio::test]
async fn a_malformed_stop_cap_is_refused_at_start_in_both_modes() {
    let subprocess = [
        ("LINCHKIT_PLUGIN_MAGIC_COOKIE", "d1spatch3r-pl4g1n"),
        ("LINCHKIT_PLUGIN_PROTOCOL_VERSIONS", "1"),
    ];
    for (args, vars, prefix) in [
        (
            vec!["serve", "--address", "127.0.0.1:0"],
            &[][..],
            "serve: ",
        ),
        (vec![], &subprocess[..], ""),
    ] {
        for (name, value) in [(ENV_STOP_GRACE_MS, "1.5"), (ENV_STOP_HOOKS_MS, "5s")] {
            let (stdout_plugin, mut stdout_host) = tokio::io::duplex(4096);
            let env = Environment {
                args: args.iter().map(|s| s.to_string()).collect(),
                vars: vars
                    .iter()
                    .chain([(name, value)].iter())
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                stdin: Box::new(tokio::io::empty()),
                stdout: Box::new(stdout_plugin),
            };
            let outcome = test_plugin().run(env, std::future::pending()).await;
            let expected = format!("{prefix}{name} must be a whole number of milliseconds");
            assert!(
                matches!(&outcome, Err(ServeError::Failed(message)) if message.starts_with(&expected) && message.contains(value)),
                "{args:?} {name}={value}: {outcome:?}"
            );
            let mut written = String::new();
            tokio::io::AsyncReadExt::read_to_string(&mut stdout_host, &mut written)
                .await
                .unwrap();
            assert_eq!(written, "", "a line written before the refusal");
        }
    }
}

/// The host's side of AutoMTLS in a test: trusts exactly the certificate of the handshake.
#[derive(Debug)]
struct PinnedServer(CertificateDer<'static>);

impl ServerCertVerifier for PinnedServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        assert_eq!(end_entity.as_ref(), self.0.as_ref());
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = rustls::crypto::ring::default_provider().signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(m, c, d, &algorithms)
    }

    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = rustls::crypto::ring::default_provider().signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(m, c, d, &algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn host_identity() -> (String, Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let cert = rcgen::CertificateParams::new(vec!["host".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    (cert.pem(), vec![cert.der().clone()], der)
}

/// A TLS handshake with the plugin: the ALPN protocol it chose, or the failure.
async fn handshake(
    address: &str,
    server_cert: CertificateDer<'static>,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<Option<Vec<u8>>, std::io::Error> {
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(PinnedServer(server_cert)));
    let mut config = match identity {
        Some((certs, key)) => builder.with_client_auth_cert(certs, key).unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(address).await?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let mut tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await?;
    // TLS 1.3 reports a refused client certificate after the handshake: read to see it.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await?;
    let mut first = [0u8; 9];
    tls.read_exact(&mut first).await?;
    Ok(tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec))
}

#[tokio::test]
async fn auto_mtls_serves_only_the_host() {
    let (host_pem, host_certs, host_key) = host_identity();
    let running = start(
        &[],
        &[
            ("LINCHKIT_PLUGIN_MAGIC_COOKIE", "d1spatch3r-pl4g1n"),
            ("LINCHKIT_PLUGIN_NETWORK", "tcp"),
            ("LINCHKIT_PLUGIN_CLIENT_CERT", &host_pem),
        ],
    )
    .await;
    assert_eq!(running.fields[..3], ["1", "1", "tcp"]);
    let der = base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(&running.fields[5])
        .expect("SERVER-CERT is base64 without padding");
    let server_cert = CertificateDer::from(der);

    let alpn = handshake(
        &running.fields[3],
        server_cert.clone(),
        Some((host_certs, host_key)),
    )
    .await;
    assert_eq!(alpn.expect("the host is served"), Some(b"h2".to_vec()));

    let (_, stranger_certs, stranger_key) = host_identity();
    assert!(handshake(
        &running.fields[3],
        server_cert.clone(),
        Some((stranger_certs, stranger_key))
    )
    .await
    .is_err());
    assert!(handshake(&running.fields[3], server_cert, None)
        .await
        .is_err());
    running.stop().await;
}

#[tokio::test]
async fn service_mode_with_a_token_refuses_calls_without_it() {
    let running = start(
        &["serve", "--address", "127.0.0.1:0"],
        &[(linchkit_plugin::ENV_TOKEN, "s3cret")],
    )
    .await;
    let (mut client, mut health_client) = running.client().await;
    assert_eq!(
        health(&mut health_client, "").await,
        ServingStatus::Serving as i32
    );
    for authorization in [None, Some("Bearer n0pe-value"), Some("Basic s3cret")] {
        let mut call = tonic::Request::new(request("echo", "1", 5000));
        let mut describe = tonic::Request::new(pb::DescribeRequest {});
        if let Some(value) = authorization {
            call.metadata_mut()
                .insert("authorization", value.parse().unwrap());
            describe
                .metadata_mut()
                .insert("authorization", value.parse().unwrap());
        }
        let status = client.call(call).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
        assert!(!status.message().contains("n0pe"), "{}", status.message());
        let status = client.describe(describe).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
    }
    let mut call = tonic::Request::new(request("echo", "1", 5000));
    call.metadata_mut()
        .insert("authorization", "Bearer s3cret".parse().unwrap());
    let reply = client.call(call).await.unwrap().into_inner();
    assert!(reply.ok);
    assert_eq!(reply.result_json, b"1");
    running.stop().await;
}

/// A plugin that counts its stop and destroy hooks.
fn counting_plugin() -> (Plugin, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let stops = Arc::new(AtomicUsize::new(0));
    let destroys = Arc::new(AtomicUsize::new(0));
    let (on_stop, on_destroy) = (stops.clone(), destroys.clone());
    let plugin = Plugin::new("rounds", "0.1.0")
        .method("echo", "", |call: Call| async move {
            Ok(call.raw_params().clone())
        })
        .on_stop(move || {
            let stops = on_stop.clone();
            async move {
                stops.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        })
        .on_destroy(move || {
            let destroys = on_destroy.clone();
            async move {
                destroys.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        });
    (plugin, stops, destroys)
}

/// A service outlives its hosts: once the last host sent Stop and Destroy, the next host's
/// Init and Start run the hooks anew, so when the service is stopped after that host started
/// it and went away, the SDK still runs the Stop and Destroy that host did not, though the
/// first host's were run by the host itself.
#[tokio::test]
async fn service_mode_stops_the_round_of_the_last_host_at_shutdown() {
    let (plugin, stops, destroys) = counting_plugin();
    let running = start_plugin(plugin, &["serve", "--address", "127.0.0.1:0"], &[]).await;
    let (mut client, mut health_client) = running.client().await;
    let init = || pb::InitRequest {
        config_json: b"{}".to_vec(),
    };
    // The first host: a whole round, ended by the host.
    client.init(init()).await.unwrap();
    client.start(pb::LifecycleRequest {}).await.unwrap();
    client.stop(pb::LifecycleRequest {}).await.unwrap();
    client.destroy(pb::LifecycleRequest {}).await.unwrap();
    assert_eq!(
        (
            stops.load(Ordering::SeqCst),
            destroys.load(Ordering::SeqCst)
        ),
        (1, 1)
    );
    assert_eq!(
        health(&mut health_client, SERVICE_NAME).await,
        ServingStatus::Serving as i32,
        "a service serves the next host after one detaches"
    );
    // The second host starts it and goes away without Stop or Destroy.
    client.init(init()).await.unwrap();
    client.start(pb::LifecycleRequest {}).await.unwrap();
    drop(client);
    drop(health_client);
    running.stop().await;
    assert_eq!(
        (
            stops.load(Ordering::SeqCst),
            destroys.load(Ordering::SeqCst)
        ),
        (2, 2)
    );
}

fn as_host<T>(host: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("linchkit-host", host.parse().unwrap());
    request
}

/// A second host's Init while the first has started the plugin does not forget that start:
/// when both go away without Stop (killed), shutdown still runs the stop hook, once.
#[tokio::test]
async fn service_mode_stops_at_shutdown_what_any_host_started() {
    let (plugin, stops, destroys) = counting_plugin();
    let running = start_plugin(plugin, &["serve", "--address", "127.0.0.1:0"], &[]).await;
    let (mut client, mut health_client) = running.client().await;
    let init = || pb::InitRequest {
        config_json: b"{}".to_vec(),
    };
    client.init(as_host("first", init())).await.unwrap();
    client
        .start(as_host("first", pb::LifecycleRequest {}))
        .await
        .unwrap();
    client.init(as_host("second", init())).await.unwrap();
    // The first detaches while the second stays: nothing runs, the plugin serves on.
    client
        .stop(as_host("first", pb::LifecycleRequest {}))
        .await
        .unwrap();
    client
        .destroy(as_host("first", pb::LifecycleRequest {}))
        .await
        .unwrap();
    let counted = || {
        (
            stops.load(Ordering::SeqCst),
            destroys.load(Ordering::SeqCst),
        )
    };
    assert_eq!(counted(), (0, 0));
    assert_eq!(
        health(&mut health_client, SERVICE_NAME).await,
        ServingStatus::Serving as i32
    );
    drop(client);
    drop(health_client);
    running.stop().await;
    assert_eq!(counted(), (1, 1));
}

/// A stop and a destroy hook that never return (each stuck on a peer that does not answer)
/// hold a stop once, for the cap the two share (`LINCHKIT_PLUGIN_STOP_HOOKS_MS`, 2 s here;
/// 5 s by default, as in every SDK: tests/conformance/test_stop_drains_first.py): the
/// destroy hook is not begun after the stop hook was given up on. Before, each hook had
/// 5 s of its own, and the two held the exit 10 s.
#[tokio::test]
async fn hooks_that_never_return_hold_the_stop_for_one_cap() {
    let stops = Arc::new(AtomicUsize::new(0));
    let destroys = Arc::new(AtomicUsize::new(0));
    let (on_stop, on_destroy) = (stops.clone(), destroys.clone());
    let plugin = Plugin::new("stuck", "0.1.0")
        .method("echo", "", |call: Call| async move {
            Ok(call.raw_params().clone())
        })
        .on_stop(move || {
            on_stop.fetch_add(1, Ordering::SeqCst);
            std::future::pending::<Result<(), Error>>()
        })
        .on_destroy(move || {
            on_destroy.fetch_add(1, Ordering::SeqCst);
            std::future::pending::<Result<(), Error>>()
        });
    let mut running = start_plugin(
        plugin,
        &["serve", "--address", "127.0.0.1:0"],
        &[(ENV_STOP_HOOKS_MS, "2000")],
    )
    .await;
    let (mut client, health_client) = running.client().await;
    client
        .init(pb::InitRequest {
            config_json: b"{}".to_vec(),
        })
        .await
        .unwrap();
    client.start(pb::LifecycleRequest {}).await.unwrap();
    drop(client);
    drop(health_client);

    let stopped_at = Instant::now();
    let _ = running.stop.take().unwrap().send(());
    let outcome = tokio::time::timeout(Duration::from_secs(20), running.task).await;
    let took = stopped_at.elapsed();
    assert!(
        matches!(outcome, Ok(Ok(Ok(())))),
        "plugin did not stop cleanly"
    );
    assert!(
        took >= Duration::from_millis(1_800),
        "the hooks got {took:?}, not their 2 s"
    );
    assert!(
        took < Duration::from_millis(3_500),
        "two stuck hooks held the stop {took:?}"
    );
    assert_eq!(
        (
            stops.load(Ordering::SeqCst),
            destroys.load(Ordering::SeqCst)
        ),
        (1, 0)
    );
}

/// A collector that accepts and never answers keeps the stop no longer than grace + hooks +
/// the span flush margin (1 s): the spans still buffered get what remains of the hooks' cap
/// (here none), then are dropped (docs/protocol.md, "Stopping while called").
#[tokio::test]
async fn a_silent_collector_does_not_outlast_the_stops_caps() {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!(
        "http://collector:s3cret@{}/v1/traces",
        silent.local_addr().unwrap()
    );
    let held = tokio::spawn(async move {
        let mut sockets = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            sockets.push(socket); // held open, never answered
        }
    });
    let mut running = start(
        &["serve", "--address", "127.0.0.1:0"],
        &[
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", &endpoint),
            ("OTEL_BSP_SCHEDULE_DELAY", "600000"), // sent only at the stop
            (ENV_STOP_GRACE_MS, "0"),
            (ENV_STOP_HOOKS_MS, "0"),
        ],
    )
    .await;
    let (mut client, _) = running.client().await;
    let reply = client
        .call(request("echo", "{}", 0))
        .await
        .unwrap()
        .into_inner();
    assert!(reply.ok, "{reply:?}");
    drop(client);

    let stopped_at = Instant::now();
    let _ = running.stop.take().unwrap().send(());
    let outcome = tokio::time::timeout(Duration::from_secs(20), running.task).await;
    let took = stopped_at.elapsed();
    assert!(
        matches!(outcome, Ok(Ok(Ok(())))),
        "plugin did not stop cleanly"
    );
    // The margin is 1 s; the rest is slack for a slow machine.
    assert!(
        took >= Duration::from_millis(900),
        "the spans got {took:?}, not the 1 s margin"
    );
    assert!(
        took < Duration::from_millis(3_500),
        "a silent collector held the stop {took:?}"
    );
    held.abort();
}

/// One HTTP/2 frame, as a test client writes it or reads it.
struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

impl Frame {
    fn encoded(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut bytes = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        bytes.extend([kind, flags]);
        bytes.extend(stream.to_be_bytes());
        bytes.extend(payload);
        bytes
    }

    async fn read(socket: &mut tokio::net::TcpStream) -> Option<Frame> {
        use tokio::io::AsyncReadExt;
        let mut head = [0u8; 9];
        socket.read_exact(&mut head).await.ok()?;
        let length = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let mut payload = vec![0; length];
        socket.read_exact(&mut payload).await.ok()?;
        Some(Frame {
            kind: head[3],
            flags: head[4],
            stream: u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff,
            payload,
        })
    }
}

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const WINDOW_UPDATE: u8 = 0x8;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const ACK: u8 = 0x1;

/// A `Call` on `stream` as grpc core writes one: HEADERS (here HPACK literals, no
/// Huffman), a WINDOW_UPDATE on the stream, then the message in one DATA frame.
fn raw_call(stream: u32, method: &str) -> Vec<u8> {
    let mut block = Vec::new();
    for (name, value) in [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/linchkit.plugin.v1.PluginService/Call"),
        (":authority", "127.0.0.1"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ] {
        block.push(0x00); // a literal without indexing, its name too
        block.push(name.len() as u8);
        block.extend(name.as_bytes());
        block.push(value.len() as u8);
        block.extend(value.as_bytes());
    }
    let message = prost::Message::encode_to_vec(&request(method, "1", 0));
    let mut body = vec![0];
    body.extend((message.len() as u32).to_be_bytes());
    body.extend(message);
    let mut bytes = Frame::encoded(HEADERS, END_HEADERS, stream, &block);
    bytes.extend(Frame::encoded(
        WINDOW_UPDATE,
        0,
        stream,
        &5u32.to_be_bytes(),
    ));
    bytes.extend(Frame::encoded(DATA, END_STREAM, stream, &body));
    bytes
}

/// At a graceful stop h2 caps the streams it takes when the client acknowledges its PING.
/// grpc core may send, after that acknowledgement and in the same write, a call it
/// numbered before it read the first GOAWAY, with a WINDOW_UPDATE on its stream. That call
/// is ignored (the second GOAWAY tells the client to send it again elsewhere), and the call
/// already running is still answered: h2 took that WINDOW_UPDATE for a protocol error
/// (GOAWAY PROTOCOL_ERROR) and closed the connection under the running call, whose answer
/// was lost.
#[tokio::test]
async fn a_call_sent_too_late_for_the_stop_costs_no_call_in_flight() {
    use tokio::io::AsyncWriteExt;
    let plugin = Plugin::new("test", "0.1.0").method("naps", "", |_: Call| async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        Ok(Json::raw("\"rested\""))
    });
    let mut running = start_plugin(plugin, &["serve", "--address", "127.0.0.1:0"], &[]).await;
    let mut socket = tokio::net::TcpStream::connect(&running.fields[3])
        .await
        .unwrap();
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend(Frame::encoded(0x4, 0, 0, &[])); // SETTINGS
    hello.extend(raw_call(1, "naps"));
    hello.extend(Frame::encoded(PING, 0, 0, b"in-order"));
    socket.write_all(&hello).await.unwrap();
    // Its acknowledgement says the server has read the call on stream 1.
    let mut frames = Vec::new();
    loop {
        let frame = Frame::read(&mut socket).await.expect("a frame");
        let acknowledged = frame.kind == PING && frame.flags & ACK != 0;
        frames.push(frame);
        if acknowledged {
            break;
        }
    }

    let _ = running.stop.take().unwrap().send(());
    let stopped = tokio::time::timeout(Duration::from_secs(10), async {
        let mut raced = false;
        while let Some(frame) = Frame::read(&mut socket).await {
            if frame.kind == PING && frame.flags & ACK == 0 && !raced {
                raced = true;
                let mut late = Frame::encoded(PING, ACK, 0, &frame.payload);
                late.extend(raw_call(3, "naps"));
                socket.write_all(&late).await.unwrap();
            }
            frames.push(frame);
        }
    });
    stopped.await.expect("the plugin closed the connection");
    assert!(
        frames
            .iter()
            .any(|f| f.kind == GOAWAY && f.payload[..4] == [0, 0, 0, 1]),
        "a GOAWAY names stream 1 the last one taken"
    );
    let errors: Vec<u32> = frames
        .iter()
        .filter(|f| f.kind == GOAWAY)
        .map(|f| u32::from_be_bytes([f.payload[4], f.payload[5], f.payload[6], f.payload[7]]))
        .filter(|&code| code != 0)
        .collect();
    assert_eq!(errors, Vec::<u32>::new(), "GOAWAY error codes");
    let answer = frames
        .iter()
        .find(|f| f.kind == DATA && f.stream == 1)
        .expect("the call in flight is answered");
    let reply: pb::CallReply = prost::Message::decode(&answer.payload[5..]).unwrap();
    assert!(reply.ok, "{reply:?}");
    assert_eq!(reply.result_json, b"\"rested\"");
    assert!(frames
        .iter()
        .any(|f| f.kind == HEADERS && f.stream == 1 && f.flags & END_STREAM != 0));
    assert!(
        frames.iter().all(|f| f.stream != 3),
        "the late call is not taken"
    );
    let outcome = tokio::time::timeout(Duration::from_secs(10), running.task).await;
    assert!(
        matches!(outcome, Ok(Ok(Ok(())))),
        "plugin did not stop cleanly"
    );
}

/// Methods whose result, chunks or events JSON cannot carry: a NaN encoded as a plugin
/// author encodes a result, and pre-built JSON that is none (a bare `NaN` token).
fn non_finite_plugin() -> Plugin {
    #[derive(serde::Serialize)]
    struct Reading {
        score: f64,
    }
    Plugin::new("test", "0.1.0")
        .method("echo", "", |call: Call| async move {
            Ok(call.raw_params().clone())
        })
        .method("nan", "", |_: Call| async move {
            Json::encode(&Reading { score: f64::NAN })
        })
        .method("raw", "", |_: Call| async move {
            Ok(Json::raw(r#"{"score": NaN}"#))
        })
        .streaming_method("chunks", "", |_: Call, chunks: ChunkSender| async move {
            chunks.send(json!({"i": 0})).await?;
            // The refusal its send returns is ignored: the stream ends with it all the same.
            let _ = chunks.send(Json::raw(r#"{"i": Infinity}"#)).await;
            let _ = chunks.send(json!({"i": 2})).await;
            Ok(())
        })
        .streaming_method(
            "nan_chunks",
            "",
            |_: Call, chunks: ChunkSender| async move {
                chunks.send(json!({"i": 0})).await?;
                let score = f64::INFINITY;
                chunks.send(Json::encode(&Reading { score })?).await
            },
        )
        .method("emits", "", |call: Call| async move {
            call.emit("bad", Json::raw(r#"{"score": NaN}"#));
            call.emit("good", json!({"score": 1.5}).into());
            Ok(json!(true).into())
        })
}

/// The message of a `provider_error` saying the plugin's result is not JSON.
fn not_json(error: Option<pb::Error>) -> String {
    let error = error.expect("an error");
    assert_eq!(
        (error.r#type.as_str(), error.retryable),
        ("provider_error", false),
        "{error:?}"
    );
    let message = error.message;
    assert!(
        message.starts_with("the plugin's result is not JSON: "),
        "{message}"
    );
    message
}

/// JSON has no NaN or infinity: until 2026-12-07 a NaN went to the host as `null`, a
/// different answer and no word of it, and pre-built JSON holding a bare `NaN` went out
/// as it was, which no host can read (over gRPC; WebSocket refused it in words about
/// params).
#[tokio::test]
async fn what_json_cannot_carry_is_refused_call_by_call_and_the_plugin_serves_on() {
    let plugin = non_finite_plugin();
    let running = start_plugin(plugin, &["serve", "--address", "127.0.0.1:0"], &[]).await;
    let (mut client, _) = running.client().await;
    let mut events = client
        .events(tokio_stream::iter(Vec::<pb::HostEvent>::new()))
        .await
        .unwrap()
        .into_inner();

    let answer = |reply: pb::CallReply| {
        assert!(!reply.ok, "{reply:?}");
        not_json(reply.error)
    };
    let called = client.call(request("nan", "{}", 0)).await.unwrap();
    assert_eq!(
        answer(called.into_inner()),
        "the plugin's result is not JSON: NaN is not a JSON number"
    );
    // A streaming method called once: its list is refused whole.
    for method in ["raw", "chunks", "nan_chunks"] {
        answer(
            client
                .call(request(method, "{}", 0))
                .await
                .unwrap()
                .into_inner(),
        );
    }

    let batch = pb::BatchRequest {
        calls: vec![
            request("nan", "{}", 0),
            request("echo", "[1]", 0),
            request("raw", "{}", 0),
        ],
    };
    let results = client.call_batch(batch).await.unwrap().into_inner().results;
    assert_eq!(results.len(), 3);
    answer(results[0].clone());
    assert!(results[1].ok, "{:?}", results[1]);
    assert_eq!(results[1].result_json, b"[1]");
    answer(results[2].clone());

    // CallStream: the chunk before goes out, the stream ends with the refusal.
    for method in ["chunks", "nan_chunks"] {
        let mut stream = client
            .call_stream(request(method, "{}", 0))
            .await
            .unwrap()
            .into_inner();
        let mut items = Vec::new();
        while let Some(item) = stream.message().await.unwrap() {
            items.push(item.item.unwrap());
        }
        assert_eq!(items.len(), 2, "{method}: {items:?}");
        assert_eq!(
            items[0],
            stream_item::Item::ChunkJson(br#"{"i":0}"#.to_vec())
        );
        let stream_item::Item::Error(error) = items[1].clone() else {
            panic!("{method}: {items:?}");
        };
        not_json(Some(error));
    }

    // An event whose data is not JSON is not sent; the next one is.
    let emitted = client.call(request("emits", "{}", 0)).await.unwrap();
    assert!(emitted.into_inner().ok);
    let event = tokio::time::timeout(Duration::from_secs(5), events.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        (event.name.as_str(), event.data_json.as_slice()),
        ("good", br#"{"score":1.5}"#.as_slice())
    );

    let echoed = client.call(request("echo", "2", 0)).await.unwrap();
    assert_eq!(echoed.into_inner().result_json, b"2");
    running.stop().await;
}

/// Methods whose result, chunks or events hold a string that is not valid Unicode. A Rust
/// `String` is always UTF-8: only pre-built JSON can hold one, a lone surrogate escape
/// (`\ud83d`, as a UTF-16 string cut inside an emoji encodes) or bytes that are not UTF-8.
fn not_unicode_plugin() -> Plugin {
    Plugin::new("test", "0.1.0")
        .method("echo", "", |call: Call| async move {
            Ok(call.raw_params().clone())
        })
        .method("lone", "", |_: Call| async move {
            Ok(Json::raw(r#"{"text":"smile \ud83d"}"#))
        })
        .method("reversed", "", |_: Call| async move {
            Ok(Json::raw(r#"{"text":"\udc00\ud800"}"#))
        })
        .method("latin1", "", |_: Call| async move {
            Ok(Json::raw(b"{\"text\":\"caf\xe9\"}".to_vec()))
        })
        .method("in_a_key", "", |_: Call| async move {
            Ok(Json::raw(r#"{"items":[{"\ude00":1}]}"#))
        })
        .method("pair", "", |_: Call| async move {
            Ok(Json::raw(r#"{"text":"smile \ud83d\ude00"}"#))
        })
        .method("backslash", "", |_: Call| async move {
            Ok(Json::raw(r#"{"text":"\\ud83d"}"#))
        })
        .streaming_method("chunks", "", |_: Call, chunks: ChunkSender| async move {
            chunks.send(json!({"i": 0})).await?;
            // Its refusal ignored: the stream ends with it all the same.
            let _ = chunks.send(Json::raw(r#"{"i":"\ud83d"}"#)).await;
            let _ = chunks.send(json!({"i": 2})).await;
            Ok(())
        })
        .method("emits", "", |call: Call| async move {
            call.emit("bad", Json::raw(r#"{"text":"smile \ud83d"}"#));
            call.emit("good", Json::raw(r#"{"text":"smile \ud83d\ude00"}"#));
            Ok(json!(true).into())
        })
}

const LONE_SURROGATE: &str =
    "the plugin's result is not JSON: a string is not valid Unicode (a lone surrogate)";
const NOT_UTF8: &str =
    "the plugin's result is not JSON: a string is not valid Unicode (bytes that are not UTF-8)";

/// A string that is not valid Unicode, which the host's decoder refuses: the call's
/// `provider_error` in words of its own (until 2026-12-08 the words were about params:
/// "its contents hold a lone surrogate escape …", "its contents are not UTF-8"), a batch's
/// item, a stream after the chunks before it, an event not sent; valid escapes pass.
#[tokio::test]
async fn a_string_that_is_not_valid_unicode_is_refused_call_by_call() {
    let running = start_plugin(
        not_unicode_plugin(),
        &["serve", "--address", "127.0.0.1:0"],
        &[],
    )
    .await;
    let (mut client, _) = running.client().await;
    let mut events = client
        .events(tokio_stream::iter(Vec::<pb::HostEvent>::new()))
        .await
        .unwrap()
        .into_inner();

    for (method, expected) in [
        ("lone", LONE_SURROGATE),
        ("reversed", LONE_SURROGATE),
        ("in_a_key", LONE_SURROGATE),
        ("latin1", NOT_UTF8),
    ] {
        let reply = client
            .call(request(method, "{}", 0))
            .await
            .unwrap()
            .into_inner();
        assert!(!reply.ok, "{method}: {reply:?}");
        assert_eq!(not_json(reply.error), expected, "{method}");
    }
    for (method, sent) in [
        ("pair", r#"{"text":"smile \ud83d\ude00"}"#),
        ("backslash", r#"{"text":"\\ud83d"}"#),
        ("echo", r#"{"text": "smile 😀 ünïcødé"}"#),
    ] {
        let reply = client
            .call(request(method, sent, 0))
            .await
            .unwrap()
            .into_inner();
        assert!(reply.ok, "{method}: {reply:?}");
        assert_eq!(reply.result_json, sent.as_bytes(), "{method}");
    }

    let batch = pb::BatchRequest {
        calls: vec![
            request("lone", "{}", 0),
            request("pair", "{}", 0),
            request("latin1", "{}", 0),
        ],
    };
    let results = client.call_batch(batch).await.unwrap().into_inner().results;
    assert_eq!(results.len(), 3);
    assert_eq!(not_json(results[0].error.clone()), LONE_SURROGATE);
    assert!(results[1].ok, "{:?}", results[1]);
    assert_eq!(
        results[1].result_json,
        br#"{"text":"smile \ud83d\ude00"}"#.to_vec()
    );
    assert_eq!(not_json(results[2].error.clone()), NOT_UTF8);

    // CallStream: the chunk before goes out, the stream ends with the refusal; a unary
    // method streamed, its result the one chunk, is refused as its call is.
    for (method, before) in [("chunks", 1), ("lone", 0)] {
        let mut stream = client
            .call_stream(request(method, "{}", 0))
            .await
            .unwrap()
            .into_inner();
        let mut items = Vec::new();
        while let Some(item) = stream.message().await.unwrap() {
            items.push(item.item.unwrap());
        }
        assert_eq!(items.len(), before + 1, "{method}: {items:?}");
        if before == 1 {
            assert_eq!(
                items[0],
                stream_item::Item::ChunkJson(br#"{"i":0}"#.to_vec())
            );
        }
        let stream_item::Item::Error(error) = items[before].clone() else {
            panic!("{method}: {items:?}");
        };
        assert_eq!(not_json(Some(error)), LONE_SURROGATE, "{method}");
    }
    // Called once, a streaming method's list is refused whole.
    let reply = client
        .call(request("chunks", "{}", 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(not_json(reply.error), LONE_SURROGATE);

    // An event whose data holds one is not sent; the next one is.
    let emitted = client.call(request("emits", "{}", 0)).await.unwrap();
    assert!(emitted.into_inner().ok);
    let event = tokio::time::timeout(Duration::from_secs(5), events.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        (event.name.as_str(), event.data_json.as_slice()),
        ("good", br#"{"text":"smile \ud83d\ude00"}"#.as_slice())
    );
    running.stop().await;
}
