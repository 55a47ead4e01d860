package dev.linchkit.plugin.sdk;

import com.google.gson.JsonElement;
import com.google.gson.JsonObject;
import java.io.IOException;
import java.net.Inet6Address;
import java.net.InetAddress;
import java.net.InetSocketAddress;
import java.net.URI;
import java.net.URISyntaxException;
import java.net.UnknownHostException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.security.SecureRandom;
import java.time.Duration;
import java.util.Base64;
import java.util.HexFormat;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.ThreadLocalRandom;
import java.util.concurrent.TimeUnit;
import java.util.function.DoubleSupplier;
import java.util.logging.Level;
import java.util.regex.Pattern;

/**
 * Registration in an etcd registry, where a dispatcher's fleet finds the plugin (docs/registry.md).
 * The contract is the dispatcher's: one key {@code <prefix>/<instance id>} per instance, on a lease
 * the instance keeps alive, whose value is JSON {@code {"address": "host:port"}} for a gRPC server.
 * etcd is reached through its v3 JSON gateway ({@link EtcdGateway}: TLS, a client certificate, one
 * of etcd's users and its token), so the SDK needs no etcd client library.
 *
 * <p>Once the service listens: a lease is granted, the key put on it, the lease renewed every TTL/3
 * on a thread of its own. An etcd that does not answer, or turns the plugin away (its certificate,
 * its user's password or permission), is not fatal: the plugin serves, says so once on stderr and
 * keeps trying, about every second while etcd does not answer, after waits that double up to
 * {@link #REFUSED_RETRY_CAP_MS} while it turns the plugin away ({@link #refusedRetryWaitMs}); it
 * registers again if etcd lost its lease. On SIGTERM or SIGINT ({@link #deregister}) the key is
 * deleted and the lease revoked, the server keeps serving {@code --leave-delay} seconds (1) while
 * dispatchers learn it left, and then the calls in flight are drained. Every setting has a flag of
 * {@code serve}'s and a variable ({@link RegistrySettings}); every mistake is refused before the
 * plugin serves. The same behaviour, flags, variables and messages as the Go and Python SDKs'.
 */
public final class Registration {
  /** The registry's environment variables, the same in every SDK. */
  public static final String ETCD_ENV = "LINCHKIT_REGISTER_ETCD";
  public static final String PREFIX_ENV = "LINCHKIT_REGISTER_PREFIX";
  public static final String TTL_ENV = "LINCHKIT_REGISTER_TTL";
  public static final String ADVERTISE_ENV = "LINCHKIT_ADVERTISE";
  public static final String LEAVE_DELAY_ENV = "LINCHKIT_LEAVE_DELAY";
  public static final String CA_FILE_ENV = "LINCHKIT_REGISTER_ETCD_CA_FILE";
  public static final String CERT_FILE_ENV = "LINCHKIT_REGISTER_ETCD_CERT_FILE";
  public static final String KEY_FILE_ENV = "LINCHKIT_REGISTER_ETCD_KEY_FILE";
  public static final String USER_ENV = "LINCHKIT_REGISTER_ETCD_USER";
  /** The user's password: no flag takes it, a command line shows in the process list. */
  public static final String PASSWORD_ENV = "LINCHKIT_REGISTER_ETCD_PASSWORD";

  public static final int DEFAULT_TTL_SECONDS = 10;
  /**
   * How long a server keeps serving once it has left the registry: the delete reaches each
   * dispatcher through etcd's watch within milliseconds on a LAN, not at once, and a call one of
   * them picks meanwhile must find the server serving, not stopping.
   */
  public static final long DEFAULT_LEAVE_DELAY_MS = 1000;
  public static final long MAX_LEAVE_DELAY_MS = 600_000;
  /**
   * The longest wait between two tries while etcd turns the plugin away. etcd checks a password
   * with bcrypt, tens of milliseconds of a core each time, and a wrong one stays wrong until an
   * operator mends it: a hundred plugins retrying every second would keep several of etcd's cores
   * busy refusing them; at this cap (waits drawn between 15 and 30 s) they cost it about four
   * checks a second, and a mended fleet is back within half a minute.
   */
  public static final long REFUSED_RETRY_CAP_MS = 30_000;

  private final EtcdGateway etcd;
  final String key;
  final byte[] value;
  private final long ttl;
  private final long leaveDelayMs;
  private final CountDownLatch stop = new CountDownLatch(1);
  private final CountDownLatch done = new CountDownLatch(1);
  private long lease;
  private boolean written;
  private Thread thread;

  private Registration(RegistrySettings settings, String base, URI url, String key, byte[] value, long ttl,
      long leaveDelayMs) throws Handshake.HandshakeException {
    this.key = key;
    this.value = value;
    this.ttl = ttl;
    this.leaveDelayMs = leaveDelayMs;
    // Each request is bounded well inside a renewal period.
    Duration timeout = Duration.ofSeconds(Math.min(Math.max(ttl / 3, 1), 5));
    this.etcd = EtcdGateway.from(base, url, settings, timeout, said -> say(Level.WARNING, said));
  }

  private static final Pattern PORT = Pattern.compile("\\d{1,5}");

  /**
   * The registration {@code settings} ask for, of a server listening on {@code listening}, or null
   * without an etcd ({@code --register-etcd}, {@code LINCHKIT_REGISTER_ETCD}); every setting is
   * checked, so a mistake stops the plugin before it serves.
   */
  static Registration from(RegistrySettings settings, InetSocketAddress listening) throws Handshake.HandshakeException {
    String base = settings.value(RegistrySettings.Setting.ETCD);
    if (base.isEmpty()) return null;
    String etcdName = settings.name(RegistrySettings.Setting.ETCD);
    URI url;
    try {
      url = new URI(base);
    } catch (URISyntaxException malformed) {
      throw new Handshake.HandshakeException(etcdName + " must be an http(s):// URL");
    }
    if (!"http".equals(url.getScheme()) && !"https".equals(url.getScheme()) || url.getRawAuthority() == null) {
      throw new Handshake.HandshakeException(etcdName + " must be an http(s):// URL");
    }
    if (url.getRawUserInfo() != null || url.getRawAuthority().contains("@")) {
      throw new Handshake.HandshakeException(etcdName + ": etcd authentication by URL credentials is not supported");
    }
    if (url.getHost() == null || url.getHost().isEmpty() || url.getPort() == 0 || url.getPort() > 65535
        || url.getPort() < -1) {
      // Dialled, a port over 65535 fails as an outage would, retried every second for ever.
      throw new Handshake.HandshakeException(etcdName
          + ": the etcd to register in must have a valid host name and a port in 1-65535");
    }
    String prefix = settings.value(RegistrySettings.Setting.PREFIX);
    String prefixName = settings.name(RegistrySettings.Setting.PREFIX);
    if (prefix.isEmpty()) throw new Handshake.HandshakeException(etcdName + " needs " + prefixName);
    if (prefix.length() < 2 || !prefix.startsWith("/") || prefix.endsWith("/") || prefix.matches("(?s).*[ \t\r\n].*")) {
      throw new Handshake.HandshakeException(prefixName
          + " must start with / and not end with one, e.g. /linchkit/plugins/echo; got " + quoted(prefix));
    }
    long ttl = DEFAULT_TTL_SECONDS;
    String ttlText = settings.value(RegistrySettings.Setting.TTL);
    if (!ttlText.isEmpty()) {
      try {
        ttl = ttlText.matches("[+-]?\\d{1,18}") ? Long.parseLong(ttlText) : -1;
      } catch (NumberFormatException notANumber) {
        ttl = -1;
      }
      if (ttl < 2) {
        throw new Handshake.HandshakeException(settings.name(RegistrySettings.Setting.TTL)
            + " must be a whole number of seconds, at least 2; got " + quoted(ttlText));
      }
    }
    long leaveDelayMs = leaveDelayMs(settings.value(RegistrySettings.Setting.LEAVE_DELAY),
        settings.name(RegistrySettings.Setting.LEAVE_DELAY));
    String address = advertisedAddress(settings.value(RegistrySettings.Setting.ADVERTISE),
        settings.name(RegistrySettings.Setting.ADVERTISE), listening);
    JsonObject value = new JsonObject();
    value.addProperty("address", address);
    return new Registration(settings, base.replaceAll("/+$", ""), url, prefix + "/" + instanceId(),
        value.toString().getBytes(StandardCharsets.UTF_8), ttl, leaveDelayMs);
  }

  private static final Pattern SECONDS = Pattern.compile("[+-]?(\\d+\\.?\\d*|\\.\\d+)([eE][+-]?\\d+)?");

  /** The leave delay ({@code name} in a message): seconds in [0, 600], 1 when unset. */
  static long leaveDelayMs(String text, String name) throws Handshake.HandshakeException {
    if (text.isEmpty()) return DEFAULT_LEAVE_DELAY_MS;
    double seconds = SECONDS.matcher(text).matches() ? Double.parseDouble(text) : Double.NaN;
    if (!(seconds >= 0 && seconds * 1000 <= MAX_LEAVE_DELAY_MS)) { // NaN fails too
      throw new Handshake.HandshakeException(name + " must be a number of seconds in [0, 600]; got " + quoted(text));
    }
    return Math.round(seconds * 1000);
  }

  /**
   * The address to advertise ({@code host:port}, named {@code name} in a message) or where the
   * server listens, unless that is every interface, which no dispatcher can call.
   */
  static String advertisedAddress(String advertise, String name, InetSocketAddress listening)
      throws Handshake.HandshakeException {
    if (!advertise.isEmpty()) {
      if (advertise.contains("://")) {
        throw new Handshake.HandshakeException(name + ": advertise a gRPC server as host:port, not a URL");
      }
      String host;
      String port;
      if (advertise.startsWith("[")) {
        int close = advertise.indexOf("]:");
        host = close < 0 ? "" : advertise.substring(1, close);
        port = close < 0 ? "" : advertise.substring(close + 2);
        if (host.contains("[") || host.contains("]")) host = "";
      } else {
        int colon = advertise.indexOf(':');
        boolean one = colon >= 0 && colon == advertise.lastIndexOf(':');
        host = one ? advertise.substring(0, colon) : "";
        port = one ? advertise.substring(colon + 1) : "";
        if (host.contains("[") || host.contains("]")) host = "";
      }
      if (host.isEmpty() || !PORT.matcher(port).matches() || Integer.parseInt(port) < 1
          || Integer.parseInt(port) > 65535) {
        throw new Handshake.HandshakeException(name + " must be host:port, got " + quoted(advertise));
      }
      InetAddress literal = addressLiteral(host);
      if (literal != null && literal.isAnyLocalAddress()) {
        throw new Handshake.HandshakeException(name + " must name an address others can call, not " + host);
      }
      return advertise;
    }
    InetAddress ip = listening.getAddress();
    String where = hostPort(listening);
    if (ip == null || ip.isAnyLocalAddress()) {
      throw new Handshake.HandshakeException("this server listens on " + where + ", which no dispatcher can call: "
          + "say where it is reached with " + name + ", e.g. 10.0.0.5:50051");
    }
    return where;
  }

  /** {@code host}, an IPv4 or IPv6 address (without brackets), as an address; null for a name. */
  private static InetAddress addressLiteral(String host) {
    if (!host.contains(":") && !host.matches("\\d{1,3}(\\.\\d{1,3}){3}")) return null;
    try {
      return InetAddress.getByName(host); // a literal: no lookup
    } catch (UnknownHostException malformed) {
      return null;
    }
  }

  /** {@code host:port}, an IPv6 address in brackets and in its short form ({@code [::1]:50051}). */
  static String hostPort(InetSocketAddress address) {
    InetAddress ip = address.getAddress();
    if (ip == null) return address.getHostString() + ":" + address.getPort();
    if (!(ip instanceof Inet6Address)) return ip.getHostAddress() + ":" + address.getPort();
    byte[] bytes = ip.getAddress();
    int[] groups = new int[8];
    for (int i = 0; i < 8; i++) groups[i] = ((bytes[2 * i] & 0xff) << 8) | (bytes[2 * i + 1] & 0xff);
    int bestStart = -1;
    int bestLength = 1; // a lone zero group is written as 0, not ::
    for (int i = 0; i < 8; ) {
      int j = i;
      while (j < 8 && groups[j] == 0) j++;
      if (j - i > bestLength) {
        bestStart = i;
        bestLength = j - i;
      }
      i = j == i ? i + 1 : j;
    }
    StringBuilder text = new StringBuilder("[");
    for (int i = 0; i < 8; i++) {
      if (i == bestStart) {
        text.append("::");
        i += bestLength - 1;
        continue;
      }
      if (text.length() > 1 && text.charAt(text.length() - 1) != ':') text.append(':');
      text.append(Integer.toHexString(groups[i]));
    }
    return text.append("]:").append(address.getPort()).toString();
  }

  /**
   * Unique and readable: {@code <hostname>-<pid>-<6 hex>}, the random part for restarts that reuse
   * a pid (containers are often pid 1). The host's name as the kernel has it: never looked up.
   */
  static String instanceId() {
    String host = "";
    try {
      host = Files.readString(Path.of("/proc/sys/kernel/hostname")).strip();
    } catch (IOException | RuntimeException unreadable) {
      host = System.getenv().getOrDefault("HOSTNAME", "");
    }
    String clean = host.replaceAll("[^-_.a-zA-Z0-9]", "-");
    if (clean.isEmpty()) clean = "plugin";
    byte[] suffix = new byte[3];
    new SecureRandom().nextBytes(suffix);
    return clean + "-" + ProcessHandle.current().pid() + "-" + HexFormat.of().formatHex(suffix);
  }

  /** {@code text} in double quotes, as Go's %q writes it for printable text. */
  private static String quoted(String text) {
    StringBuilder quoted = new StringBuilder("\"");
    for (char c : text.toCharArray()) {
      switch (c) {
        case '"' -> quoted.append("\\\"");
        case '\\' -> quoted.append("\\\\");
        case '\n' -> quoted.append("\\n");
        case '\t' -> quoted.append("\\t");
        case '\r' -> quoted.append("\\r");
        default -> {
          if (c < 0x20 || c == 0x7f) quoted.append(String.format("\\x%02x", (int) c));
          else quoted.append(c);
        }
      }
    }
    return quoted.append('"').toString();
  }

  /**
   * How the loop waits between two tries: {@code true} when it should stop. By default until
   * {@link #deregister()} or the time is up; a test passes its own to see the waits asked for
   * without taking them.
   */
  @FunctionalInterface
  interface Pause {
    boolean pause(long waitMs) throws InterruptedException;
  }

  /** Starts registering, on a daemon thread of its own. */
  void start() {
    start(waitMs -> stop.await(waitMs, TimeUnit.MILLISECONDS));
  }

  /** Starts registering, waiting between two tries on {@code pause}. */
  void start(Pause pause) {
    thread = new Thread(() -> run(pause), "linchkit-registry");
    thread.setDaemon(true);
    thread.start();
  }

  /**
   * Deletes the key and revokes the lease, and returns once that is done or bounded time has
   * passed, and then the leave delay later: the server serves meanwhile.
   */
  void deregister() {
    stop.countDown();
    boolean interrupted = false;
    // A new token costs two quick requests more; an etcd that hangs is not waited for past this bound.
    long bound = 4 * etcd.timeout.toMillis() + 1000;
    long deadline = System.nanoTime() + TimeUnit.MILLISECONDS.toNanos(bound);
    while (true) {
      try {
        done.await(Math.max(0, deadline - System.nanoTime()), TimeUnit.NANOSECONDS);
        break;
      } catch (InterruptedException again) {
        interrupted = true; // bounded: wait all the same
      }
    }
    long leaveAt = System.nanoTime() + TimeUnit.MILLISECONDS.toNanos(leaveDelayMs);
    for (long left = leaveDelayMs; left > 0; left = TimeUnit.NANOSECONDS.toMillis(leaveAt - System.nanoTime())) {
      try {
        Thread.sleep(left);
      } catch (InterruptedException again) {
        interrupted = true;
      }
    }
    if (interrupted) Thread.currentThread().interrupt();
  }

  private static void say(Level level, String message) {
    Log.SDK.log(level, message);
  }

  /**
   * The wait in milliseconds after the {@code refusals}-th refusal in a row (1, 2, ...):
   * {@code paceMs}, the wait after an etcd that does not answer, doubled at each refusal up to
   * {@link #REFUSED_RETRY_CAP_MS}, less a random part of up to half of it, so that a fleet turned
   * away at once does not try again in step. {@code draw} gives a number in [0, 1), the random part.
   */
  static long refusedRetryWaitMs(int refusals, long paceMs, DoubleSupplier draw) {
    long ceiling = REFUSED_RETRY_CAP_MS;
    if (refusals < 32 && (paceMs << refusals) < REFUSED_RETRY_CAP_MS) ceiling = paceMs << refusals;
    return (long) (ceiling * (1 - draw.getAsDouble() / 2));
  }

  private static final int FINE = 0;
  private static final int UNAVAILABLE = 1;
  private static final int REFUSED = 2;

  private void run(Pause pause) {
    try {
      // Said once, not per retry; said again when the trouble changes (etcd answers again, and now
      // turns the plugin away), so what the operator sees is current.
      int failing = FINE;
      // Refusals since etcd last admitted the plugin: an outage between two of them does not start
      // the waits again from a second, the credentials are as wrong.
      int refusals = 0;
      long paceMs = Math.min(ttl * 1000 / 3, 1000);
      while (true) {
        long waitMs = ttl * 1000 / 3;
        try {
          renew();
          if (failing != FINE) say(Level.INFO, "etcd answers again: " + key + " is registered");
          failing = FINE;
          refusals = 0;
        } catch (EtcdGateway.Unavailable | RuntimeException error) {
          int kind = error instanceof EtcdGateway.Refused ? REFUSED : UNAVAILABLE;
          if (kind != failing) {
            say(Level.WARNING, "cannot register " + key + " in etcd: " + error.getMessage()
                + "; serving anyway and trying again");
          }
          failing = kind;
          waitMs = paceMs;
          if (kind == REFUSED) {
            refusals++;
            waitMs = refusedRetryWaitMs(refusals, paceMs, ThreadLocalRandom.current()::nextDouble);
          }
        }
        if (pause.pause(waitMs)) {
          leave();
          return;
        }
      }
    } catch (InterruptedException interrupted) {
      Thread.currentThread().interrupt();
    } finally {
      done.countDown();
    }
  }

  private JsonObject leaseId() {
    JsonObject lease = new JsonObject();
    lease.addProperty("ID", Long.toString(this.lease));
    return lease;
  }

  private void renew() throws EtcdGateway.Unavailable {
    if (lease != 0) {
      JsonObject answer = etcd.post("/v3/lease/keepalive", leaseId());
      JsonElement result = answer.get("result");
      if (result == null || !result.isJsonObject()) {
        throw new EtcdGateway.Unavailable("etcd did not renew the lease" + EtcdGateway.why(answer));
      }
      if (EtcdGateway.number(result.getAsJsonObject().get("TTL")) <= 0) {
        // A lease no key was put on (etcd refused the key) ends unrenewed while the plugin waits to
        // try again, as expected: only a registered key is news.
        if (written) say(Level.WARNING, "etcd lost the lease of " + key + " (restarted?): registering again");
        lease = 0;
        written = false;
      }
    }
    if (lease == 0) {
      JsonObject grant = new JsonObject();
      grant.addProperty("TTL", ttl);
      JsonObject answer = etcd.post("/v3/lease/grant", grant);
      lease = EtcdGateway.number(answer.get("ID"));
      if (lease == 0) throw new EtcdGateway.Unavailable("etcd granted no lease" + EtcdGateway.why(answer));
    }
    if (!written) {
      JsonObject put = new JsonObject();
      put.addProperty("key", Base64.getEncoder().encodeToString(key.getBytes(StandardCharsets.UTF_8)));
      put.addProperty("value", Base64.getEncoder().encodeToString(value));
      put.addProperty("lease", Long.toString(lease));
      JsonObject answer = etcd.post("/v3/kv/put", put);
      if (!answer.has("header")) { // e.g. the lease ended between grant and put
        lease = 0;
        throw new EtcdGateway.Unavailable("etcd refused the registration" + EtcdGateway.why(answer));
      }
      written = true;
      say(Level.INFO, "registered " + key + " in etcd at " + etcd.base);
    }
  }

  /**
   * The key first, then the lease. Said straight to stderr ({@link Log#atExit}): a stop that the
   * plugin's own {@code System.exit} starts runs alongside {@code LogManager}'s reset.
   */
  private void leave() {
    if (lease == 0) return;
    if (!written) { // a lease for a key etcd refused (permission): let it go quietly
      try {
        etcd.post("/v3/lease/revoke", leaseId());
      } catch (EtcdGateway.Unavailable | RuntimeException ignored) {
        // it ends with its TTL
      }
      return;
    }
    // The key first: a dispatcher stops calling this instance from that moment.
    JsonObject range = new JsonObject();
    range.addProperty("key", Base64.getEncoder().encodeToString(key.getBytes(StandardCharsets.UTF_8)));
    try {
      etcd.post("/v3/kv/deleterange", range);
    } catch (EtcdGateway.Unavailable | RuntimeException ignored) {
      // the revoke below takes the key too, or says why not
    }
    try {
      etcd.post("/v3/lease/revoke", leaseId());
    } catch (EtcdGateway.Unavailable | RuntimeException error) {
      Log.atExit(Level.WARNING, "cannot deregister " + key + ": " + error.getMessage()
          + "; it leaves the registry when its lease ends, within " + ttl + " s", null);
      return;
    }
    Log.atExit(Level.INFO, "deregistered " + key, null);
  }

  @Override
  public String toString() {
    return "Registration[" + key + " in " + etcd.base + ", lease " + lease + (written ? ", registered" : "") + "]";
  }
}
