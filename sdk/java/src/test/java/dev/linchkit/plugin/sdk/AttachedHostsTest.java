package dev.linchkit.plugin.sdk;

import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertTrue;

import org.junit.jupiter.api.Test;

/** The bound on hosts holds while their Inits are still running (docs/protocol.md, "Several hosts on one service"). */
class AttachedHostsTest {
  @Test
  void initsUnderWayHoldTheirPlaces() {
    AttachedHosts hosts = new AttachedHosts();
    for (int index = 0; index < AttachedHosts.MAX_HOSTS; index++) assertTrue(hosts.join("h" + index));
    // None has finished its Init: one more host still finds no place.
    assertFalse(hosts.join("one-more"));
    assertTrue(hosts.join("h0")); // a host already holding a place may Init again
    hosts.joined("h0", true);
    hosts.joined("h0", false);
    hosts.joined("h1", false); // a failed Init gives its place back
    assertTrue(hosts.join("one-more"));
  }

  @Test
  void theLastHostToLeaveIsTold() {
    AttachedHosts hosts = new AttachedHosts();
    for (String host : new String[] {"a", "b"}) {
      assertTrue(hosts.join(host));
      hosts.joined(host, true);
    }
    assertTrue(hosts.othersStay("a"));
    assertFalse(hosts.othersStay("b"));
  }
}
