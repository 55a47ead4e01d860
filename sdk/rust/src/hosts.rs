//! The hosts attached to a plugin service at once (docs/protocol.md, "Several hosts on one
//! service"): the replicas of a dispatcher, or one dispatcher and the next in a rolling
//! restart. Each names itself with the `linchkit-host` metadata on lifecycle RPCs; the
//! plugin's stop and destroy hooks run only when the last of them leaves, so no host's
//! `Stop` runs under another's calls. RPCs without it count as one host whose id is empty.

use std::collections::{HashMap, HashSet};

use tonic::metadata::MetadataMap;
use tonic::Status;

/// The metadata key a host names itself with.
pub const HOST_METADATA: &str = "linchkit-host";

/// The most hosts a service tracks: an `Init` from one more is refused.
pub const MAX_HOSTS: usize = 1024;

/// The calling host's id; "" when it sent none. INVALID_ARGUMENT for an id off the
/// contract (the message does not quote it).
pub(crate) fn host_of(metadata: &MetadataMap) -> Result<String, Status> {
    let Some(value) = metadata.get(HOST_METADATA) else {
        return Ok(String::new());
    };
    let id = value.as_bytes();
    let allowed = |byte: &u8| byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b'-');
    if (1..=64).contains(&id.len()) && id.iter().all(allowed) {
        // Only ASCII passed the check: this cannot lose anything.
        return Ok(String::from_utf8_lossy(id).into_owned());
    }
    Err(Status::invalid_argument(format!(
        "{HOST_METADATA} must be 1-64 of A-Z a-z 0-9 . _ -"
    )))
}

/// Hosts whose `Init` succeeded and that have not sent `Stop` or `Destroy` since. A host
/// whose `Init` is running holds a place already: tonic runs handlers concurrently, and
/// Inits of new hosts arriving together must not push the set past `MAX_HOSTS`.
#[derive(Default)]
pub(crate) struct AttachedHosts {
    attached: HashSet<String>,
    /// Inits running now, by host.
    joining: HashMap<String, usize>,
}

impl AttachedHosts {
    /// Holds a place for `host` while its `Init` runs; false when there is none. Every
    /// true is followed by one `joined` (`Joining` sees to it).
    pub(crate) fn join(&mut self, host: &str) -> bool {
        let known = self.attached.contains(host) || self.joining.contains_key(host);
        let places = self.attached.len()
            + self
                .joining
                .keys()
                .filter(|each| !self.attached.contains(*each))
                .count();
        if !known && places >= MAX_HOSTS {
            return false;
        }
        *self.joining.entry(host.to_string()).or_default() += 1;
        true
    }

    /// The end of `host`'s `Init`: attached when it succeeded.
    pub(crate) fn joined(&mut self, host: &str, succeeded: bool) {
        if let Some(running) = self.joining.get_mut(host) {
            *running -= 1;
            if *running == 0 {
                self.joining.remove(host);
            }
        }
        if succeeded {
            self.attached.insert(host.to_string());
        }
    }

    /// Takes `leaving` out; whether another host is still attached (then its `Stop` or
    /// `Destroy` runs nothing).
    pub(crate) fn others_stay(&mut self, leaving: &str) -> bool {
        self.attached.remove(leaving);
        !self.attached.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::metadata::MetadataValue;

    fn with(value: &str) -> MetadataMap {
        let mut metadata = MetadataMap::new();
        metadata.insert(HOST_METADATA, MetadataValue::try_from(value).unwrap());
        metadata
    }

    #[test]
    fn a_host_id_is_1_to_64_of_the_safe_characters() {
        assert_eq!(host_of(&MetadataMap::new()).unwrap(), "");
        assert_eq!(host_of(&with("0123abcdEF._-")).unwrap(), "0123abcdEF._-");
        assert_eq!(host_of(&with(&"x".repeat(64))).unwrap(), "x".repeat(64));
        for bad in ["", "bad id", "a/b", "é", &"x".repeat(65)] {
            let Ok(value) = MetadataValue::try_from(bad) else {
                continue; // not even metadata: tonic refuses it before us
            };
            let mut metadata = MetadataMap::new();
            metadata.insert(HOST_METADATA, value);
            let status = host_of(&metadata).unwrap_err();
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
            assert!(!status.message().contains(bad) || bad.is_empty());
        }
    }

    fn attached(hosts: &mut AttachedHosts, host: &str) {
        assert!(hosts.join(host));
        hosts.joined(host, true);
    }

    #[test]
    fn the_last_host_to_leave_is_told_so() {
        let mut hosts = AttachedHosts::default();
        attached(&mut hosts, "a");
        attached(&mut hosts, "b");
        assert!(hosts.others_stay("a"));
        assert!(hosts.others_stay("a"), "b is still attached");
        assert!(!hosts.others_stay("b"));
        assert!(!hosts.others_stay("never-attached"));
    }

    #[test]
    fn a_service_has_room_for_1024_hosts() {
        let mut hosts = AttachedHosts::default();
        for index in 0..MAX_HOSTS {
            attached(&mut hosts, &format!("h{index}"));
        }
        assert!(!hosts.join("one-more"));
        assert!(hosts.join("h0"), "a host already attached may Init again");
        hosts.joined("h0", true);
    }

    #[test]
    fn inits_under_way_hold_their_places() {
        let mut hosts = AttachedHosts::default();
        for index in 0..MAX_HOSTS {
            assert!(hosts.join(&format!("h{index}")));
        }
        // None has finished its Init: one more host still finds no place.
        assert!(!hosts.join("one-more"));
        hosts.joined("h1", false); // a failed Init gives its place back
        assert!(hosts.join("one-more"));
    }
}
