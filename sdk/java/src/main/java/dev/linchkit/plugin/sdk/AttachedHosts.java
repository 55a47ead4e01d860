package dev.linchkit.plugin.sdk;

import io.grpc.Metadata;
import java.util.HashMap;
import java.util.HashSet;
import java.util.Map;
import java.util.Set;
import java.util.regex.Pattern;

/**
 * The hosts attached to a plugin service at once (docs/protocol.md, "Several hosts on one
 * service"): the replicas of a dispatcher, or one dispatcher and the next in a rolling
 * restart. Each names itself with the {@code linchkit-host} metadata on lifecycle RPCs; the
 * plugin's stop and destroy hooks run only when the last of them leaves, so no host's Stop
 * runs under another's calls. RPCs without it count as one host whose id is empty.
 * Lifecycle RPCs run concurrently on grpc-java's threads: every method holds the lock, and
 * a host whose Init is running holds a place already, so Inits of new hosts arriving
 * together cannot push the set past {@link #MAX_HOSTS}.
 */
final class AttachedHosts {
  /** The most hosts a service tracks: an Init from one more is refused. */
  static final int MAX_HOSTS = 1024;
  static final Metadata.Key<String> HOST = Metadata.Key.of("linchkit-host", Metadata.ASCII_STRING_MARSHALLER);
  /** The refusal of an id off the contract; it never quotes the id. */
  static final String BAD_ID = "linchkit-host must be 1-64 of A-Z a-z 0-9 . _ -";
  private static final Pattern ID = Pattern.compile("[A-Za-z0-9._-]{1,64}");

  private final Set<String> hosts = new HashSet<>();
  /** Inits running now, by host. */
  private final Map<String, Integer> joining = new HashMap<>();

  /** The calling host's id: "" when it sent none; null for an id off the contract. */
  static String hostOf(Metadata headers) {
    Iterable<String> values = headers == null ? null : headers.getAll(HOST);
    if (values == null) return "";
    String first = values.iterator().next();
    return first != null && ID.matcher(first).matches() ? first : null;
  }

  /** Holds a place for {@code host} while its Init runs; false when there is none. Every true is followed by one {@link #joined}. */
  synchronized boolean join(String host) {
    Set<String> places = new HashSet<>(hosts);
    places.addAll(joining.keySet());
    if (!places.contains(host) && places.size() >= MAX_HOSTS) return false;
    joining.merge(host, 1, Integer::sum);
    return true;
  }

  /** The end of {@code host}'s Init: attached when it succeeded. */
  synchronized void joined(String host, boolean succeeded) {
    joining.computeIfPresent(host, (key, count) -> count > 1 ? count - 1 : null);
    if (succeeded) hosts.add(host);
  }

  /** Takes {@code leaving} out; whether another host is still attached (then its Stop or Destroy runs nothing). */
  synchronized boolean othersStay(String leaving) {
    hosts.remove(leaving);
    return !hosts.isEmpty();
  }
}
