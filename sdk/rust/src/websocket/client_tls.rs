//! `connect`'s TLS files, for a `wss://` gateway: the roots that verify it and the client
//! certificate the plugin logs in with (mutual TLS). The same options, variables and words
//! as every SDK's `connect` (the Python SDK's `linchkit_plugin/_connect_tls.py`):
//!
//! | flag          | variable                      | what                                          |
//! |---------------|-------------------------------|-----------------------------------------------|
//! | `--ca-file`   | `LINCHKIT_PLUGIN_GATEWAY_CA`  | PEM roots that verify the gateway (default: the system's) |
//! | `--cert-file` | `LINCHKIT_PLUGIN_CLIENT_CERT` | the client certificate (chain), PEM           |
//! | `--key-file`  | `LINCHKIT_PLUGIN_CLIENT_KEY`  | its unencrypted private key, PEM              |
//!
//! A flag wins over its variable; an empty variable counts as unset. Every file is read and
//! checked before the plugin dials, a refusal naming the flag (or the variable it came
//! from) and the file, never what it holds: neither a key's bytes nor a PEM parser's
//! message (which may quote a line of the file) is shown. Without any file, a `wss://`
//! gateway is verified by the system's roots ([`system_connector`]).

use std::sync::{Arc, OnceLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsConnector;

use super::gateway_url::GatewayUrl;

pub(crate) const ENV_GATEWAY_CA: &str = "LINCHKIT_PLUGIN_GATEWAY_CA";
/// A path here; a subprocess plugin's AutoMTLS reads the same name as the host's
/// certificate itself (`crate::tls`), and `connect` never runs as one.
pub(crate) const ENV_CLIENT_CERT: &str = "LINCHKIT_PLUGIN_CLIENT_CERT";
pub(crate) const ENV_CLIENT_KEY: &str = "LINCHKIT_PLUGIN_CLIENT_KEY";

/// The three flags as given on the command line (`None`: not given).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct TlsFlags {
    pub(crate) ca_file: Option<String>,
    pub(crate) cert_file: Option<String>,
    pub(crate) key_file: Option<String>,
}

/// One of the three settings: its value, and how a message names it.
struct Setting {
    value: String,
    name: String,
}

impl Setting {
    /// The flag's value if given, else the variable's; `None` if neither is set.
    fn of(
        flag: &str,
        given: &Option<String>,
        variable: &str,
        var: &dyn Fn(&str) -> String,
    ) -> Option<Setting> {
        if let Some(value) = given.as_deref().filter(|value| !value.is_empty()) {
            return Some(Setting {
                value: value.to_string(),
                name: flag.to_string(),
            });
        }
        let value = var(variable);
        (!value.is_empty()).then(|| Setting {
            value,
            name: variable.to_string(),
        })
    }

    /// The file's bytes, once the value is checked to be a path.
    fn read(&self) -> Result<Vec<u8>, String> {
        // The PEM text of a key pasted where its path goes would otherwise be printed.
        if self.value.contains("-----BEGIN") {
            return Err(format!(
                "{}: the value is PEM text, not a file's path: write it to a file and give \
                 that file's path",
                self.name
            ));
        }
        if self.value.chars().any(char::is_control) {
            return Err(format!(
                "{}: the value holds a line break or a control character",
                self.name
            ));
        }
        std::fs::read(&self.value).map_err(|err| {
            format!(
                "{}: cannot read {}: {}",
                self.name,
                self.value,
                reason(&err)
            )
        })
    }
}

/// An I/O error in the words the other SDKs say it (their runtimes' strerror).
fn reason(err: &std::io::Error) -> String {
    match err.kind() {
        std::io::ErrorKind::NotFound => "no such file or directory".into(),
        std::io::ErrorKind::PermissionDenied => "permission denied".into(),
        std::io::ErrorKind::IsADirectory => "is a directory".into(),
        _ => {
            let said = err.to_string();
            let said = said.split(" (os error").next().unwrap_or(&said);
            said.to_lowercase()
        }
    }
}

/// The TLS client `connect` dials `url` with: `None` when no file is given (a `wss://`
/// gateway is then verified by the system's roots, [`system_connector`]); the files'
/// otherwise, each checked. `var` reads the environment.
pub(crate) fn connector(
    url: &GatewayUrl,
    flags: &TlsFlags,
    var: &dyn Fn(&str) -> String,
) -> Result<Option<TlsConnector>, String> {
    let ca = Setting::of("--ca-file", &flags.ca_file, ENV_GATEWAY_CA, var);
    let cert = Setting::of("--cert-file", &flags.cert_file, ENV_CLIENT_CERT, var);
    let key = Setting::of("--key-file", &flags.key_file, ENV_CLIENT_KEY, var);
    if cert.is_some() != key.is_some() {
        return Err("--cert-file and --key-file go together".into());
    }
    if ca.is_none() && cert.is_none() {
        return Ok(None);
    }
    if !url.secure {
        return Err("--ca-file, --cert-file and --key-file need a wss:// --url".into());
    }
    let roots = match &ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(&ca.read()?).flatten() {
                let _ = roots.add(cert); // one rustls cannot read: as the system's
            }
            if roots.is_empty() {
                return Err(format!(
                    "{}: {} holds no PEM certificate",
                    ca.name, ca.value
                ));
            }
            roots
        }
        None => system_roots()?,
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|err| format!("TLS: {err}"))?
        .with_root_certificates(roots);
    let mut config = match (&cert, &key) {
        (Some(cert), Some(key)) => {
            let chain = client_chain(cert)?;
            let private_key = private_key(key)?;
            builder
                .with_client_auth_cert(chain, private_key)
                .map_err(|err| match err {
                    rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
                        format!(
                            "{}: {} is not the private key of the certificate in {}",
                            key.name, key.value, cert.name
                        )
                    }
                    // The certificate's DER does not parse, or the key is of a kind ring
                    // cannot sign with: said as the other SDKs say either.
                    rustls::Error::InvalidCertificate(_) => {
                        format!("{}: {} holds no PEM certificate", cert.name, cert.value)
                    }
                    _ => format!(
                        "{}: {} holds no unencrypted PEM private key",
                        key.name, key.value
                    ),
                })?
        }
        _ => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Some(TlsConnector::from(Arc::new(config))))
}

fn client_chain(cert: &Setting) -> Result<Vec<CertificateDer<'static>>, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert.read()?)
        .collect::<Result<_, _>>()
        .unwrap_or_default();
    if chain.is_empty() {
        return Err(format!(
            "{}: {} holds no PEM certificate",
            cert.name, cert.value
        ));
    }
    Ok(chain)
}

/// The first private key of the file (PKCS #8, PKCS #1 or SEC 1), not encrypted (rustls
/// reads none that is: an `ENCRYPTED PRIVATE KEY` is no item it knows).
fn private_key(key: &Setting) -> Result<PrivateKeyDer<'static>, String> {
    let text = key.read()?;
    PrivateKeyDer::from_pem_slice(&text).map_err(|_| {
        format!(
            "{}: {} holds no unencrypted PEM private key",
            key.name, key.value
        )
    })
}

/// The TLS client of a `wss` gateway `connect` was given no file for, checked by the
/// system's roots (`SSL_CERT_FILE` and `SSL_CERT_DIR` name others instead:
/// rustls-native-certs); made once.
pub(crate) fn system_connector() -> Result<TlsConnector, String> {
    static CONNECTOR: OnceLock<Result<TlsConnector, String>> = OnceLock::new();
    CONNECTOR
        .get_or_init(|| {
            let roots = system_roots()?;
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let mut config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|err| format!("TLS: {err}"))?
                .with_root_certificates(roots)
                .with_no_client_auth();
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            Ok(TlsConnector::from(Arc::new(config)))
        })
        .clone()
}

/// The system's root certificates (`SSL_CERT_FILE` and `SSL_CERT_DIR` name others instead:
/// rustls-native-certs), for a `wss` gateway `connect` was given no `--ca-file` for.
fn system_roots() -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert); // one the system trusts but rustls cannot read
    }
    if roots.is_empty() {
        return Err(
            "no root certificate to check a wss:// gateway with: the system has none".into(),
        );
    }
    Ok(roots)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(text: &str) -> GatewayUrl {
        GatewayUrl::parse(text).expect("a gateway's URL")
    }

    fn files(ca: Option<&str>, cert: Option<&str>, key: Option<&str>) -> TlsFlags {
        TlsFlags {
            ca_file: ca.map(str::to_string),
            cert_file: cert.map(str::to_string),
            key_file: key.map(str::to_string),
        }
    }

    fn refusal(flags: &TlsFlags, vars: &[(&str, &str)]) -> String {
        let var = |name: &str| {
            vars.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.to_string())
                .unwrap_or_default()
        };
        match connector(&url("wss://gw.example/v1/plugins/connect"), flags, &var) {
            Ok(_) => "accepted".into(),
            Err(why) => why,
        }
    }

    #[test]
    fn files_it_cannot_use_are_named_and_never_quoted() {
        let dir = std::env::temp_dir().join(format!("linchkit-client-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["plugin.example".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let other = rcgen::KeyPair::generate().unwrap();
        let write = |name: &str, text: &str| {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            path.to_string_lossy().into_owned()
        };
        let cert_file = write("plugin.pem", &cert.pem());
        let key_file = write("plugin.key", &key.serialize_pem());
        let other_key = write("other.key", &other.serialize_pem());
        let secret_line = "MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg";
        let broken = write(
            "broken.key",
            &format!("-----BEGIN PRIVATE KEY-----\n{secret_line}!!\n-----END PRIVATE KEY-----\n"),
        );
        let missing = dir.join("none.key").to_string_lossy().into_owned();
        let folder = dir.to_string_lossy().into_owned();
        let cases = [
            (
                files(None, Some(&cert_file), Some(&broken)),
                vec![],
                format!("--key-file: {broken} holds no unencrypted PEM private key"),
            ),
            (
                files(None, Some(&cert_file), Some(&cert_file)),
                vec![],
                format!("--key-file: {cert_file} holds no unencrypted PEM private key"),
            ),
            (
                files(None, Some(&cert_file), Some(&other_key)),
                vec![],
                format!(
                    "--key-file: {other_key} is not the private key of the certificate in --cert-file"
                ),
            ),
            (
                files(None, Some(&cert_file), Some(&missing)),
                vec![],
                format!("--key-file: cannot read {missing}: no such file or directory"),
            ),
            (
                files(None, Some(&cert_file), Some(&folder)),
                vec![],
                format!("--key-file: cannot read {folder}: is a directory"),
            ),
            (
                files(None, Some(&cert_file), None),
                vec![(ENV_CLIENT_KEY, key.serialize_pem())],
                "LINCHKIT_PLUGIN_CLIENT_KEY: the value is PEM text, not a file's path: \
                 write it to a file and give that file's path"
                    .to_string(),
            ),
            (
                files(Some(&key_file), None, None),
                vec![],
                format!("--ca-file: {key_file} holds no PEM certificate"),
            ),
            (
                files(None, None, None),
                vec![(ENV_CLIENT_KEY, key_file.clone())],
                "--cert-file and --key-file go together".to_string(),
            ),
        ];
        for (flags, vars, want) in cases {
            let vars: Vec<(&str, &str)> = vars.iter().map(|(n, v)| (*n, v.as_str())).collect();
            let said = refusal(&flags, &vars);
            assert_eq!(said, want);
            assert!(
                !said.contains(secret_line) && !said.contains("BEGIN"),
                "{said}"
            );
        }
        assert_eq!(
            refusal(&files(None, Some(&cert_file), Some(&key_file)), &[]),
            "accepted"
        );
        let plain = connector(
            &url("ws://gw.example/"),
            &files(Some(&cert_file), None, None),
            &|_| String::new(),
        );
        assert_eq!(
            plain.err().as_deref(),
            Some("--ca-file, --cert-file and --key-file need a wss:// --url")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
