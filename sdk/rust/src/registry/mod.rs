//! Registration in an etcd registry, where a dispatcher's fleet finds the plugin
//! (docs/registry.md). The contract is the dispatcher's: one key `<prefix>/<instance id>`
//! per instance, on a lease the instance keeps alive, whose value is JSON
//! `{"address": "host:port"}` for a gRPC server. etcd is reached through its v3 JSON
//! gateway (`gateway`: TLS, a client certificate, one of etcd's users and its token), so
//! the SDK needs no etcd client crate. Only `serve` (the gRPC service) registers: a
//! subprocess plugin never does, and the WebSocket modes refuse to.
//!
//! An etcd that does not answer, or turns the plugin away (its certificate, its user's
//! password or permission), is not fatal: the plugin serves, says so once on stderr and
//! keeps trying, about every second while etcd does not answer, after waits that double
//! up to [`REFUSED_RETRY_CAP`] while it turns the plugin away ([`refused_retry_wait`]); it
//! registers again if etcd lost its lease. On SIGTERM or SIGINT the key is deleted and the
//! lease revoked, the server keeps serving `--leave-delay` (`LINCHKIT_LEAVE_DELAY`) seconds
//! (1) while dispatchers learn it left, and then the calls in flight are drained. Every
//! setting has a flag of `serve`'s and a variable (`settings`). The Go SDK's
//! `plugin/registry.go` does the same, message for message.

mod gateway;
pub(crate) mod settings;

use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine;
use serde_json::{json, Value};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use gateway::{number, why, EtcdError, EtcdUrl, Gateway, UrlProblem};
use settings::{RegistryConfig, ADVERTISE, ETCD, LEAVE_DELAY, PREFIX, TTL};

const DEFAULT_REGISTER_TTL: i64 = 10;
/// How long a server keeps serving once it has left the registry: the delete reaches each
/// dispatcher through etcd's watch within milliseconds on a LAN, not at once, and a call
/// one of them picks meanwhile must find the server serving, not stopping.
const DEFAULT_LEAVE_DELAY: Duration = Duration::from_secs(1);
const MAX_LEAVE_DELAY_SECONDS: f64 = 600.0;
/// The longest wait between two tries while etcd turns the plugin away. etcd checks a
/// password with bcrypt, tens of milliseconds of a core each time, and a wrong one stays
/// wrong until an operator mends it: a hundred plugins deployed with it and retrying every
/// second would keep several of etcd's cores busy refusing them; at this cap (waits drawn
/// between 15 and 30 s) they cost it about four checks a second. Longer would save little
/// more and keep a mended fleet out of the registry longer.
pub(crate) const REFUSED_RETRY_CAP: Duration = Duration::from_secs(30);

/// A registration checked and ready to start once the server serves.
pub(crate) struct Registration {
    etcd: Gateway,
    key: String,
    value: Vec<u8>,
    ttl: i64,
    lease: i64,
    written: bool,
    leave_delay: Duration,
}

impl Registration {
    /// `None` without an etcd (`--register-etcd`, `LINCHKIT_REGISTER_ETCD`); otherwise
    /// every setting is checked, so a mistake stops the plugin before it serves.
    /// `listening` is where the server listens.
    pub(crate) fn from_config(
        config: &RegistryConfig,
        listening: SocketAddr,
    ) -> Result<Option<Registration>, String> {
        let base = config.value(ETCD);
        if base.is_empty() {
            return Ok(None);
        }
        let url = EtcdUrl::parse(base).map_err(|problem| match problem {
            UrlProblem::NotHttp => format!("{} must be an http(s):// URL", config.name(ETCD)),
            UrlProblem::Credentials => format!(
                "{}: etcd authentication by URL credentials is not supported",
                config.name(ETCD)
            ),
            // Dialled, a port over 65535 fails as an outage would, retried for ever.
            UrlProblem::HostOrPort => format!(
                "{}: the etcd to register in must have a valid host name and a port in 1-65535",
                config.name(ETCD)
            ),
        })?;
        let prefix = config.value(PREFIX);
        if prefix.is_empty() {
            return Err(format!(
                "{} needs {}",
                config.name(ETCD),
                config.name(PREFIX)
            ));
        }
        if prefix.len() < 2
            || !prefix.starts_with('/')
            || prefix.ends_with('/')
            || prefix.contains([' ', '\t', '\r', '\n'])
        {
            return Err(format!(
                "{} must start with / and not end with one, e.g. /linchkit/plugins/echo; got {prefix:?}",
                config.name(PREFIX)
            ));
        }
        let ttl = match config.value(TTL) {
            "" => DEFAULT_REGISTER_TTL,
            text => match text.parse::<i64>() {
                Ok(ttl) if ttl >= 2 => ttl,
                _ => {
                    return Err(format!(
                        "{} must be a whole number of seconds, at least 2; got {text:?}",
                        config.name(TTL)
                    ))
                }
            },
        };
        let leave_delay = leave_delay_from(config.value(LEAVE_DELAY), &config.name(LEAVE_DELAY))?;
        let address =
            advertised_address(config.value(ADVERTISE), &config.name(ADVERTISE), listening)?;
        let value =
            serde_json::to_vec(&json!({ "address": address })).expect("a JSON object serializes");
        // Each request is bounded well inside a renewal period.
        let timeout = Duration::from_secs((ttl / 3).clamp(1, 5) as u64);
        let etcd = Gateway::new(url, config, timeout)?;
        Ok(Some(Registration {
            etcd,
            key: format!("{prefix}/{}", instance_id()),
            value,
            ttl,
            lease: 0,
            written: false,
            leave_delay,
        }))
    }

    /// Registers in the background, from now until [`Registered::leave`].
    pub(crate) fn start(self) -> Registered {
        let (stop, stopping) = oneshot::channel();
        // A new token costs two quick requests more; an etcd that hangs is not waited for
        // past this bound when leaving.
        let leaving_bound = self.etcd.timeout() * 4 + Duration::from_secs(1);
        let leave_delay = self.leave_delay;
        Registered {
            stop,
            task: tokio::spawn(self.run(stopping, tokio::time::sleep)),
            leaving_bound,
            leave_delay,
        }
    }

    /// Registers and keeps the key until `stopping`, waiting between two tries on `pause`
    /// (`tokio::time::sleep`; a test passes its own to see the waits asked for without
    /// taking them).
    async fn run<P, F>(mut self, mut stopping: oneshot::Receiver<()>, mut pause: P)
    where
        P: FnMut(Duration) -> F,
        F: std::future::Future<Output = ()>,
    {
        // Said once, not per retry; said again when the trouble changes (etcd answers
        // again, and now turns the plugin away), so what the operator sees is current.
        let mut failing = Trouble::None;
        // Refusals since etcd last admitted the plugin: an outage between two of them does
        // not start the waits again from a second, the credentials are as wrong.
        let mut refusals: u32 = 0;
        let period = Duration::from_secs(self.ttl as u64) / 3;
        let pace = period.min(Duration::from_secs(1));
        loop {
            let mut wait = period;
            match self.renew().await {
                Err(err) => {
                    let kind = match err.is_refusal() {
                        true => Trouble::Refused,
                        false => Trouble::Unavailable,
                    };
                    if kind != failing {
                        crate::log::warn(&format!(
                            "cannot register {} in etcd: {err}; serving anyway and trying again",
                            self.key
                        ));
                    }
                    failing = kind;
                    wait = pace;
                    if kind == Trouble::Refused {
                        refusals = refusals.saturating_add(1);
                        wait = refused_retry_wait(refusals, pace, random_fraction());
                    }
                }
                Ok(()) => {
                    if failing != Trouble::None {
                        crate::log::info(&format!(
                            "etcd answers again: {} is registered",
                            self.key
                        ));
                    }
                    failing = Trouble::None;
                    refusals = 0;
                }
            }
            tokio::select! {
                _ = &mut stopping => {
                    self.leave().await;
                    return;
                }
                () = pause(wait) => {}
            }
        }
    }

    /// Keeps the lease alive, grants another when etcd lost it, and puts the key on it
    /// when it is not there yet.
    async fn renew(&mut self) -> Result<(), EtcdError> {
        if self.lease != 0 {
            let answer = self
                .etcd
                .post("/v3/lease/keepalive", json!({"ID": self.lease.to_string()}))
                .await?;
            let Some(Value::Object(result)) = answer.get("result") else {
                return Err(EtcdError::Unavailable(format!(
                    "etcd did not renew the lease{}",
                    why(&answer)
                )));
            };
            if number(result.get("TTL")) <= 0 {
                // A lease no key was put on (etcd refused the key) ends unrenewed while the
                // plugin waits to try again, as expected: only a registered key is news.
                if self.written {
                    crate::log::warn(&format!(
                        "etcd lost the lease of {} (restarted?): registering again",
                        self.key
                    ));
                }
                self.lease = 0;
                self.written = false;
            }
        }
        if self.lease == 0 {
            let answer = self
                .etcd
                .post("/v3/lease/grant", json!({"TTL": self.ttl}))
                .await?;
            self.lease = number(answer.get("ID"));
            if self.lease == 0 {
                return Err(EtcdError::Unavailable(format!(
                    "etcd granted no lease{}",
                    why(&answer)
                )));
            }
        }
        if !self.written {
            let encode = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
            let answer = self
                .etcd
                .post(
                    "/v3/kv/put",
                    json!({
                        "key": encode(self.key.as_bytes()),
                        "value": encode(&self.value),
                        "lease": self.lease.to_string(),
                    }),
                )
                .await?;
            if !answer.contains_key("header") {
                // e.g. the lease ended between grant and put
                self.lease = 0;
                return Err(EtcdError::Unavailable(format!(
                    "etcd refused the registration{}",
                    why(&answer)
                )));
            }
            self.written = true;
            crate::log::info(&format!(
                "registered {} in etcd at {}",
                self.key,
                self.etcd.shown()
            ));
        }
        Ok(())
    }

    /// Deletes the key, then revokes the lease.
    async fn leave(&mut self) {
        if self.lease == 0 {
            return;
        }
        let lease = json!({"ID": self.lease.to_string()});
        if !self.written {
            // A lease for a key etcd refused (permission): let it go quietly.
            let _ = self.etcd.post("/v3/lease/revoke", lease).await;
            return;
        }
        // The key first: a dispatcher stops calling this instance from that moment.
        let key = base64::engine::general_purpose::STANDARD.encode(self.key.as_bytes());
        let _ = self
            .etcd
            .post("/v3/kv/deleterange", json!({ "key": key }))
            .await;
        match self.etcd.post("/v3/lease/revoke", lease).await {
            Err(err) => crate::log::warn(&format!(
                "cannot deregister {}: {err}; it leaves the registry when its lease ends, within {} s",
                self.key, self.ttl
            )),
            Ok(_) => crate::log::info(&format!("deregistered {}", self.key)),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Trouble {
    None,
    Unavailable,
    Refused,
}

/// A registration under way, owned by the server it announces.
pub(crate) struct Registered {
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
    leaving_bound: Duration,
    leave_delay: Duration,
}

impl Registered {
    /// Deletes the key and revokes the lease, and returns once that is done or a bounded
    /// time has passed, and then the leave delay later: the server serves meanwhile.
    pub(crate) async fn leave(self) {
        let Registered {
            stop,
            mut task,
            leaving_bound,
            leave_delay,
        } = self;
        let _ = stop.send(());
        if tokio::time::timeout(leaving_bound, &mut task)
            .await
            .is_err()
        {
            task.abort(); // etcd hangs: the key goes when the lease ends
        }
        tokio::time::sleep(leave_delay).await;
    }
}

/// Reads the leave delay (named `name` in a message): seconds in [0, 600], 1 when unset.
fn leave_delay_from(text: &str, name: &str) -> Result<Duration, String> {
    if text.is_empty() {
        return Ok(DEFAULT_LEAVE_DELAY);
    }
    match text.parse::<f64>() {
        // NaN fails the comparisons too.
        Ok(seconds) if (0.0..=MAX_LEAVE_DELAY_SECONDS).contains(&seconds) => {
            Ok(Duration::from_secs_f64(seconds))
        }
        _ => Err(format!(
            "{name} must be a number of seconds in [0, 600]; got {text:?}"
        )),
    }
}

/// The address to advertise (`host:port`, named `name` in a message) or where the server
/// listens, unless that is every interface, which no dispatcher can call.
fn advertised_address(
    advertise: &str,
    name: &str,
    listening: SocketAddr,
) -> Result<String, String> {
    if !advertise.is_empty() {
        if advertise.contains("://") {
            return Err(format!(
                "{name}: advertise a gRPC server as host:port, not a URL"
            ));
        }
        let Some((host, unspecified)) = host_and_port(advertise) else {
            return Err(format!("{name} must be host:port, got {advertise:?}"));
        };
        if unspecified {
            return Err(format!(
                "{name} must name an address others can call, not {host}"
            ));
        }
        return Ok(advertise.to_string());
    }
    if listening.ip().is_unspecified() {
        return Err(format!(
            "this server listens on {listening}, which no dispatcher can call: \
             say where it is reached with {name}, e.g. 10.0.0.5:50051"
        ));
    }
    Ok(listening.to_string())
}

/// `host:port` taken apart as Go's `net.SplitHostPort` does (an IPv6 host in brackets), a
/// port in 1-65535: the host, and whether it is an unspecified address (0.0.0.0, ::).
fn host_and_port(address: &str) -> Option<(&str, bool)> {
    let (host, port) = match address.strip_prefix('[') {
        Some(bracketed) => {
            let (host, after) = bracketed.split_once(']')?;
            (host, after.strip_prefix(':')?)
        }
        None => {
            let (host, port) = address.rsplit_once(':')?;
            if host.contains(':') {
                return None; // an IPv6 address must be in brackets
            }
            (host, port)
        }
    };
    let port_ok = !port.is_empty()
        && port.bytes().all(|b| b.is_ascii_digit())
        && port.parse::<u16>().is_ok_and(|port| port >= 1);
    if host.is_empty() || !port_ok || host.contains(['[', ']']) {
        return None;
    }
    let unspecified = host
        .parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_unspecified());
    Some((host, unspecified))
}

/// The wait after the `refusals`-th refusal in a row (1, 2, ...): `pace`, the wait after
/// an etcd that does not answer, doubled at each refusal up to [`REFUSED_RETRY_CAP`], less
/// a random part of up to half of it (`draw`, in [0, 1)), so that a fleet turned away at
/// once does not try again in step. Never less than `pace`.
pub(crate) fn refused_retry_wait(refusals: u32, pace: Duration, draw: f64) -> Duration {
    let ceiling = match refusals {
        0..32 => pace
            .checked_mul(1 << refusals)
            .filter(|wait| *wait < REFUSED_RETRY_CAP)
            .unwrap_or(REFUSED_RETRY_CAP),
        _ => REFUSED_RETRY_CAP,
    };
    ceiling.mul_f64(1.0 - draw / 2.0)
}

/// A number in [0, 1) from the system's random source.
fn random_fraction() -> f64 {
    let bytes: [u8; 8] = random_bytes();
    (u64::from_le_bytes(bytes) >> 11) as f64 / (1u64 << 53) as f64
}

fn random_bytes<const N: usize>() -> [u8; N] {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; N];
    // The system's random source failing is past what a plugin could mend; the draws
    // only spread retries and tell restarts apart.
    let _ = ring::rand::SystemRandom::new().fill(&mut bytes);
    bytes
}

/// Unique and readable: `<hostname>-<pid>-<6 hex>`, the random part for restarts that
/// reuse a pid (containers are often pid 1).
fn instance_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_default();
    let clean: String = host
        .trim()
        .chars()
        .map(|c| match c {
            '-' | '_' | '.' | 'a'..='z' | 'A'..='Z' | '0'..='9' => c,
            _ => '-',
        })
        .collect();
    let clean = if clean.is_empty() {
        "plugin".to_string()
    } else {
        clean
    };
    let suffix: [u8; 3] = random_bytes();
    format!(
        "{clean}-{}-{:02x}{:02x}{:02x}",
        std::process::id(),
        suffix[0],
        suffix[1],
        suffix[2]
    )
}

#[cfg(test)]
mod tests {
    use super::gateway::tests::{answer, fake_etcd};
    use super::*;
    use std::collections::HashMap;

    fn config(vars: &[(&str, &str)]) -> RegistryConfig {
        let vars: HashMap<&str, &str> = vars.iter().copied().collect();
        RegistryConfig::new([], |name| vars.get(name).copied().unwrap_or(""))
    }

    fn registration(vars: &[(&str, &str)], listening: &str) -> Result<Registration, String> {
        let mut all = vec![
            (settings::ENV_REGISTER_ETCD, "http://127.0.0.1:2379"),
            (settings::ENV_REGISTER_PREFIX, "/linchkit/plugins/echo"),
        ];
        all.extend_from_slice(vars);
        Registration::from_config(&config(&all), listening.parse().unwrap())
            .map(|found| found.expect("an etcd is named"))
    }

    #[test]
    fn without_an_etcd_nothing_registers() {
        let listening = "127.0.0.1:1".parse().unwrap();
        let none = Registration::from_config(&config(&[]), listening).unwrap();
        assert!(none.is_none());
    }

    #[test]
    fn the_key_holds_the_address_it_listens_on_or_the_one_advertised() {
        let listening = registration(&[], "127.0.0.2:50051").unwrap();
        assert_eq!(listening.value, br#"{"address":"127.0.0.2:50051"}"#);
        assert!(listening.key.starts_with("/linchkit/plugins/echo/"));
        let id = listening.key.rsplit('/').next().unwrap();
        let (rest, suffix) = id.rsplit_once('-').unwrap();
        assert!(rest.ends_with(&format!("-{}", std::process::id())), "{id}");
        assert!(suffix.len() == 6 && suffix.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(listening.ttl, 10);
        assert_eq!(listening.leave_delay, Duration::from_secs(1));
        let advertised =
            registration(&[(settings::ENV_ADVERTISE, "[fd00::5]:7")], "0.0.0.0:1").unwrap();
        assert_eq!(advertised.value, br#"{"address":"[fd00::5]:7"}"#);
        let ipv6 = registration(&[], "[::1]:9").unwrap();
        assert_eq!(ipv6.value, br#"{"address":"[::1]:9"}"#);
    }

    #[test]
    fn every_mistake_is_refused_naming_the_setting_as_given() {
        /// Variables, where the server listens, and what the refusal says.
        type Case<'a> = (&'a [(&'a str, &'a str)], &'a str, &'a str);
        let cases: &[Case] = &[
            (&[], "0.0.0.0:1", "this server listens on 0.0.0.0:1, which no dispatcher can call: say where it is reached with --advertise (or LINCHKIT_ADVERTISE)"),
            (&[], "[::]:1", "which no dispatcher can call"),
            (&[(settings::ENV_ADVERTISE, "http://h:1")], "127.0.0.1:1", "LINCHKIT_ADVERTISE: advertise a gRPC server as host:port, not a URL"),
            (&[(settings::ENV_ADVERTISE, "h")], "127.0.0.1:1", "LINCHKIT_ADVERTISE must be host:port, got \"h\""),
            (&[(settings::ENV_ADVERTISE, "h:0")], "127.0.0.1:1", "must be host:port"),
            (&[(settings::ENV_ADVERTISE, "::1:5")], "127.0.0.1:1", "must be host:port"),
            (&[(settings::ENV_ADVERTISE, "0.0.0.0:5")], "127.0.0.1:1", "LINCHKIT_ADVERTISE must name an address others can call, not 0.0.0.0"),
            (&[(settings::ENV_REGISTER_PREFIX, "")], "127.0.0.1:1", "LINCHKIT_REGISTER_ETCD needs --register-prefix (or LINCHKIT_REGISTER_PREFIX)"),
            (&[(settings::ENV_REGISTER_PREFIX, "/ends/")], "127.0.0.1:1", "LINCHKIT_REGISTER_PREFIX must start with / and not end with one"),
            (&[(settings::ENV_REGISTER_PREFIX, "no-slash")], "127.0.0.1:1", "must start with /"),
            (&[(settings::ENV_REGISTER_PREFIX, "/a b")], "127.0.0.1:1", "must start with /"),
            (&[(settings::ENV_REGISTER_TTL, "1")], "127.0.0.1:1", "LINCHKIT_REGISTER_TTL must be a whole number of seconds, at least 2; got \"1\""),
            (&[(settings::ENV_REGISTER_TTL, "ten")], "127.0.0.1:1", "at least 2"),
            (&[(settings::ENV_LEAVE_DELAY, "601")], "127.0.0.1:1", "LINCHKIT_LEAVE_DELAY must be a number of seconds in [0, 600]; got \"601\""),
            (&[(settings::ENV_LEAVE_DELAY, "nan")], "127.0.0.1:1", "[0, 600]"),
            (&[(settings::ENV_LEAVE_DELAY, "-1")], "127.0.0.1:1", "[0, 600]"),
            (&[(settings::ENV_REGISTER_ETCD, "ftp://h:1")], "127.0.0.1:1", "LINCHKIT_REGISTER_ETCD must be an http(s):// URL"),
            (&[(settings::ENV_REGISTER_ETCD, "http://u:SECRET@h:1")], "127.0.0.1:1", "by URL credentials is not supported"),
            (&[(settings::ENV_REGISTER_ETCD, "http://h:0")], "127.0.0.1:1", "a valid host name and a port in 1-65535"),
            (&[(settings::ENV_REGISTER_ETCD_PASSWORD, "SECRET")], "127.0.0.1:1", "LINCHKIT_REGISTER_ETCD_PASSWORD needs --register-etcd-user (or LINCHKIT_REGISTER_ETCD_USER) too"),
            (&[(settings::ENV_REGISTER_ETCD_USER, "u")], "127.0.0.1:1", "LINCHKIT_REGISTER_ETCD_USER needs LINCHKIT_REGISTER_ETCD_PASSWORD too"),
            (&[(settings::ENV_REGISTER_ETCD_CA_FILE, "/ca.pem")], "127.0.0.1:1", "LINCHKIT_REGISTER_ETCD_CA_FILE is for an https:// etcd"),
            (&[(settings::ENV_REGISTER_ETCD_KEY_FILE, "/k.pem")], "127.0.0.1:1", "LINCHKIT_REGISTER_ETCD_KEY_FILE needs --register-etcd-cert-file (or LINCHKIT_REGISTER_ETCD_CERT_FILE) too"),
            (&[(settings::ENV_REGISTER_ETCD, "http://10.0.0.5:2379"), (settings::ENV_REGISTER_ETCD_USER, "u"), (settings::ENV_REGISTER_ETCD_PASSWORD, "SECRET")], "127.0.0.1:1", "LINCHKIT_REGISTER_ETCD_PASSWORD would cross the network in clear to http://10.0.0.5:2379"),
            (&[(settings::ENV_REGISTER_ETCD, "https://e:2379"), (settings::ENV_REGISTER_ETCD_CA_FILE, "/no/such/ca.pem")], "127.0.0.1:1", "LINCHKIT_REGISTER_ETCD_CA_FILE: cannot read /no/such/ca.pem"),
        ];
        for (vars, listening, said) in cases {
            let refused = registration(vars, listening).err().expect(said);
            assert!(refused.contains(said), "{refused:?} lacks {said:?}");
            assert!(
                !refused.contains("SECRET") && !refused.contains('\n'),
                "{refused}"
            );
        }
    }

    #[test]
    fn a_password_over_http_to_a_loopback_etcd_is_taken() {
        let vars = [
            (settings::ENV_REGISTER_ETCD, "http://localhost:2379"),
            (settings::ENV_REGISTER_ETCD_USER, "u"),
            (settings::ENV_REGISTER_ETCD_PASSWORD, "SECRET"),
        ];
        assert!(registration(&vars, "127.0.0.1:1").is_ok());
    }

    #[test]
    fn the_leave_delay_is_seconds_from_0_to_600() {
        assert_eq!(leave_delay_from("", "x"), Ok(DEFAULT_LEAVE_DELAY));
        assert_eq!(leave_delay_from("0", "x"), Ok(Duration::ZERO));
        assert_eq!(
            leave_delay_from("0.25", "x"),
            Ok(Duration::from_millis(250))
        );
        assert_eq!(leave_delay_from("600", "x"), Ok(Duration::from_secs(600)));
        for wrong in ["-0.1", "600.5", "inf", "NaN", "soon", "1s"] {
            assert!(leave_delay_from(wrong, "x").is_err(), "{wrong}");
        }
    }

    #[test]
    fn the_waits_after_refusals_double_to_the_cap_and_are_spread() {
        let second = Duration::from_secs(1);
        let longest = 0.0; // draw 0: the ceiling itself
        assert_eq!(
            refused_retry_wait(1, second, longest),
            Duration::from_secs(2)
        );
        assert_eq!(
            refused_retry_wait(4, second, longest),
            Duration::from_secs(16)
        );
        assert_eq!(refused_retry_wait(5, second, longest), REFUSED_RETRY_CAP);
        for refusals in [31, 32, 64, u32::MAX] {
            assert_eq!(
                refused_retry_wait(refusals, second, longest),
                REFUSED_RETRY_CAP
            );
        }
        assert_eq!(
            refused_retry_wait(5, second, 0.5),
            Duration::from_secs_f64(22.5)
        );
        let pace = Duration::from_secs(2) / 3; // TTL 2 s
        assert_eq!(refused_retry_wait(1, pace, longest), pace * 2);
        let draws: Vec<Duration> = (0..20)
            .map(|_| refused_retry_wait(5, second, random_fraction()))
            .collect();
        assert!(draws
            .iter()
            .all(|wait| *wait > Duration::from_secs(15) && *wait <= REFUSED_RETRY_CAP));
        assert!(draws.iter().any(|wait| *wait != draws[0]), "spread");
    }

    /// The loop's waits, as it asks for them (`run`'s pause), against a fake etcd gateway
    /// (gateway.rs's, on a loopback port) that answers each try as `TRIES` scripts it: `R`
    /// refuses (HTTP 403, permission denied), `U` answers nothing etcd would (an etcd that
    /// does not answer, for the loop), `A` admits. The test above holds the waits' values;
    /// this one holds the loop to them: the refusal counted, doubled, capped, started
    /// again after a success and kept across an outage.
    #[tokio::test]
    async fn the_loop_waits_as_the_backoff_says() {
        const TRIES: &str = "RRRRRRARURUURAU";
        let refuse = answer(
            403,
            r#"{"error":"etcdserver: permission denied","code":7,"message":"etcdserver: permission denied"}"#,
        );
        let silent = answer(200, "{}"); // no lease granted, none renewed: not etcd's answer
        let renewed = answer(200, r#"{"result":{"ID":"7587","TTL":"10"}}"#);
        let mut answers = Vec::new();
        let mut lease = false;
        for outcome in TRIES.chars() {
            match (outcome, lease) {
                ('R', _) => answers.push(refuse.clone()),
                ('U', true) => answers.push(silent.clone()),
                ('A', false) => {
                    answers.push(answer(200, r#"{"header":{},"ID":"7587","TTL":"10"}"#));
                    answers.push(answer(200, r#"{"header":{}}"#)); // the put
                    lease = true;
                }
                ('A', true) => answers.push(renewed.clone()),
                _ => unreachable!("a script this test does not answer"),
            }
        }
        answers.push(answer(200, r#"{"header":{}}"#)); // leaving: the delete
        answers.push(answer(200, r#"{"header":{}}"#)); // and the revoke
        let (url, seen) = fake_etcd(answers).await;
        let registration = registration(&[(settings::ENV_REGISTER_ETCD, &url)], "127.0.0.1:50051")
            .expect("good settings");
        let (stop, stopping) = oneshot::channel();
        let mut stop = Some(stop);
        let mut waits = Vec::new();
        let pause = |wait: Duration| {
            waits.push(wait);
            if waits.len() < TRIES.len() {
                return tokio::time::sleep(Duration::ZERO);
            }
            let _ = stop.take().map(|stop| stop.send(()));
            tokio::time::sleep(Duration::from_secs(3600)) // the loop leaves on the stop
        };
        tokio::time::timeout(Duration::from_secs(60), registration.run(stopping, pause))
            .await
            .expect("the loop ends once every try is made");
        let seen = seen.await.unwrap();
        let paths: Vec<&str> = seen.iter().map(|(path, _, _)| path.as_str()).collect();
        assert_eq!(
            paths[paths.len() - 2..],
            ["/v3/kv/deleterange", "/v3/lease/revoke"]
        );
        // The span each try's wait must lie in: (pace 1 s) 1-2 s after the first refusal,
        // twice as long after each in a row, up to 15-30 s; a success's, the renewal
        // period, TTL/3, which starts them again; an outage's, the pace, which keeps them.
        let span =
            |low: f64, high: f64| (Duration::from_secs_f64(low), Duration::from_secs_f64(high));
        let period = Duration::from_secs(10) / 3;
        let second = Duration::from_secs(1);
        let expected = [
            span(1.0, 2.0),   // R
            span(2.0, 4.0),   // R
            span(4.0, 8.0),   // R
            span(8.0, 16.0),  // R
            span(15.0, 30.0), // R: the cap
            span(15.0, 30.0), // R
            (period, period), // A
            span(1.0, 2.0),   // R: from the first again
            (second, second), // U: the pace
            span(2.0, 4.0),   // R: the second in a row still
            (second, second), // U
            (second, second), // U
            span(4.0, 8.0),   // R
            (period, period), // A
            (second, second), // U
        ];
        assert_eq!(waits.len(), expected.len(), "{waits:?}");
        for (index, (wait, (low, high))) in waits.iter().zip(expected).enumerate() {
            assert!(
                low <= *wait && *wait <= high,
                "try {} ({}): {wait:?}, want {low:?} to {high:?}; every wait: {waits:?}",
                index + 1,
                &TRIES[index..=index],
            );
        }
    }
}
