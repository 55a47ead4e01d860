//! The hosts attached to a plugin service at once (docs/protocol.md, "Several hosts on one
//! service"): the replicas of a dispatcher, or one dispatcher and the next in a rolling
//! restart. Each names itself with the `linchkit-host` metadata on lifecycle RPCs; the
//! plugin's stop and destroy hooks run only when the last of them leaves, so no host's
//! `Stop` runs under another's calls. RPCs without it count as one host whose id is empty.

use std::collections::HashSet;

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

/// Hosts whose `Init` succeeded and that have not sent `Stop` or `Destroy` since.
#[derive(Default)]
pub(crate) struct AttachedHosts(HashSet<String>);

impl AttachedHosts {
    pub(crate) fn has_room_for(&self, host: &str) -> bool {
        self.0.contains(host) || self.0.len() < MAX_HOSTS
    }

    pub(crate) fn add(&mut self, host: String) {
        self.0.insert(host);
    }

    /// Takes `leaving` out; whether another host is still attached (then its `Stop` or
    /// `Destroy` runs nothing).
    pub(crate) fn others_stay(&mut self, leaving: &str) -> bool {
        self.0.remove(leaving);
        !self.0.is_empty()
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

    #[test]
    fn the_last_host_to_leave_is_told_so() {
        let mut hosts = AttachedHosts::default();
        hosts.add("a".into());
        hosts.add("b".into());
        assert!(hosts.others_stay("a"));
        assert!(hosts.others_stay("a"), "b is still attached");
        assert!(!hosts.others_stay("b"));
        assert!(!hosts.others_stay("never-attached"));
    }

    #[test]
    fn a_service_has_room_for_1024_hosts() {
        let mut hosts = AttachedHosts::default();
        for index in 0..MAX_HOSTS {
            assert!(hosts.has_room_for(&format!("h{index}")));
            hosts.add(format!("h{index}"));
        }
        assert!(!hosts.has_room_for("one-more"));
        assert!(
            hosts.has_room_for("h0"),
            "a host already attached may Init again"
        );
    }
}
