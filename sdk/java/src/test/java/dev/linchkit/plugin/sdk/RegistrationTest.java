package dev.linchkit.plugin.sdk;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertNull;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import com.sun.net.httpserver.HttpExchange;
import com.sun.net.httpserver.HttpServer;
import java.io.IOException;
import java.net.InetAddress;
import java.net.InetSocketAddress;
import java.net.URI;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.time.Duration;
import java.util.ArrayList;
import java.util.Base64;
import java.util.Collections;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicInteger;
import java.util.function.Function;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

/**
 * The registry's settings, checks and backoff without etcd, and the gateway's token and lease
 * handling against a stand-in for etcd's JSON gateway (an in-process HTTP server answering as
 * etcd 3.5 does): a real etcd, with TLS and users, runs the Java example plugin in
 * tests/test_plugin_registry.py and tests/test_plugin_registry_secure.py.
 */
class RegistrationTest {
  private static final String SECRET = "SECRET-pw-0d41";
  private static final InetSocketAddress LOOPBACK = new InetSocketAddress(InetAddress.getLoopbackAddress(), 50051);

  private static RegistrySettings settings(Map<String, String> flags, Map<String, String> env) {
    return new RegistrySettings(flags, env);
  }

  private static String refusal(Map<String, String> flags, Map<String, String> env) {
    var refused = assertThrows(Handshake.HandshakeException.class,
        () -> Registration.from(settings(flags, env), LOOPBACK));
    assertFalse(refused.getMessage().contains(SECRET), refused.getMessage());
    assertFalse(refused.getMessage().contains("\n"), refused.getMessage());
    return refused.getMessage();
  }

  @Test
  void aFlagWinsOverItsVariableAnEmptyOneTooAndMistakesAreNamedAsGiven() throws Exception {
    Map<String, String> env = Map.of(Registration.ETCD_ENV, "http://127.0.0.1:2379",
        Registration.PREFIX_ENV, "/from/env", Registration.TTL_ENV, "ten");
    assertNull(Registration.from(settings(Map.of("register-etcd", ""), env), LOOPBACK), "turned off");
    assertTrue(refusal(Map.of(), env).startsWith("LINCHKIT_REGISTER_TTL must be a whole number of seconds, at least 2;"));
    assertTrue(refusal(Map.of("register-ttl", "1"), env).startsWith("--register-ttl must be a whole number"));
    assertEquals("LINCHKIT_REGISTER_ETCD needs --register-prefix (or LINCHKIT_REGISTER_PREFIX)",
        refusal(Map.of(), Map.of(Registration.ETCD_ENV, "http://127.0.0.1:1")));
    Registration chosen = Registration.from(settings(Map.of("register-ttl", "4"), env), LOOPBACK);
    assertTrue(chosen.key.startsWith("/from/env/"), chosen.key);
    assertTrue(chosen.key.contains("-" + ProcessHandle.current().pid() + "-"), chosen.key);
    assertEquals("{\"address\":\"127.0.0.1:50051\"}", new String(chosen.value, StandardCharsets.UTF_8));
  }

  @Test
  void everyMistakeIsRefusedBeforeServing(@TempDir Path folder) throws Exception {
    Path notPem = Files.writeString(folder.resolve("ca.pem"), "not a certificate\n");
    String pem = notPem.toString();
    String secure = "https://127.0.0.1:1";
    Map<String, String> prefix = Map.of(Registration.PREFIX_ENV, "/p");
    Object[][] mistakes = {
        {Map.of("register-etcd", "unix:///x"), "http(s):// URL"},
        {Map.of("register-etcd", "http://user:" + SECRET + "@127.0.0.1:1"), "credentials"},
        {Map.of("register-etcd", "http://127.0.0.1:99999"), "port in 1-65535"},
        {Map.of("register-etcd", "http://127.0.0.1:0"), "port in 1-65535"},
        {Map.of("register-etcd", "http://etcd..internal:2379"), "valid host name"},
        {Map.of("register-etcd", "http://127.0.0.1:1", "register-prefix", "/ends/"), "not end with one"},
        {Map.of("register-etcd", "http://127.0.0.1:1", "register-prefix", "no-slash"), "must start with /"},
        {Map.of("register-etcd", "http://127.0.0.1:1", "leave-delay", "601"), "--leave-delay must be a number of seconds in [0, 600]"},
        {Map.of("register-etcd", "http://127.0.0.1:1", "leave-delay", "NaN"), "[0, 600]"},
        {Map.of("register-etcd", "http://127.0.0.1:1", "advertise", "0.0.0.0:8081"), "not 0.0.0.0"},
        {Map.of("register-etcd", "http://127.0.0.1:1", "advertise", "[::]:8081"), "not ::"},
        {Map.of("register-etcd", "http://127.0.0.1:1", "advertise", "http://x:1"), "not a URL"},
        {Map.of("register-etcd", "http://127.0.0.1:1", "advertise", "no-port"), "must be host:port"},
        {Map.of("register-etcd", "http://127.0.0.1:1", "register-etcd-ca-file", pem), "--register-etcd-ca-file is for an https:// etcd"},
        {Map.of("register-etcd", "http://10.1.2.3:2379", "register-etcd-user", "registrar"), "LINCHKIT_REGISTER_ETCD_PASSWORD would cross the network in clear"},
        {Map.of("register-etcd", "http://localhost.example:2379", "register-etcd-user", "registrar"), "in clear"},
        {Map.of("register-etcd", secure, "register-etcd-cert-file", pem), "--register-etcd-cert-file needs --register-etcd-key-file (or LINCHKIT_REGISTER_ETCD_KEY_FILE) too"},
        {Map.of("register-etcd", secure, "register-etcd-ca-file", folder.resolve("missing.pem").toString()), "--register-etcd-ca-file: cannot read"},
        {Map.of("register-etcd", secure, "register-etcd-ca-file", pem), "holds no PEM certificate"},
        {Map.of("register-etcd", secure, "register-etcd-cert-file", pem, "register-etcd-key-file", pem), "--register-etcd-cert-file and --register-etcd-key-file: cannot read"},
    };
    for (Object[] mistake : mistakes) {
      @SuppressWarnings("unchecked")
      Map<String, String> flags = (Map<String, String>) mistake[0];
      Map<String, String> env = new HashMap<>(prefix);
      if (flags.containsKey("register-etcd-user")) env.put(Registration.PASSWORD_ENV, SECRET);
      String said = refusal(flags, env);
      assertTrue(said.contains((String) mistake[1]), flags + ": " + said);
    }
    // A user without a password, a password without a user: each named as given.
    assertEquals("--register-etcd-user needs LINCHKIT_REGISTER_ETCD_PASSWORD too: etcd takes both or neither",
        refusal(Map.of("register-etcd", secure, "register-etcd-user", "registrar"), prefix));
    Map<String, String> passwordOnly = new HashMap<>(prefix);
    passwordOnly.put(Registration.PASSWORD_ENV, SECRET);
    assertEquals("LINCHKIT_REGISTER_ETCD_PASSWORD needs --register-etcd-user (or LINCHKIT_REGISTER_ETCD_USER) too:"
        + " etcd takes both or neither", refusal(Map.of("register-etcd", secure), passwordOnly));
    // A password over http:// to a loopback etcd crosses no network.
    Map<String, String> loopback = new HashMap<>(passwordOnly);
    loopback.put(Registration.USER_ENV, "registrar");
    for (String host : List.of("127.8.9.10", "localhost", "[::1]", "[::ffff:127.0.0.1]")) {
      assertTrue(EtcdGateway.isLoopback(host), host);
      Registration.from(settings(Map.of("register-etcd", "http://" + host + ":2379"), loopback), LOOPBACK);
    }
    for (String host : List.of("10.0.0.5", "[fd00::5]", "localhost.example", "127.0.0.1.nip.io")) {
      assertFalse(EtcdGateway.isLoopback(host), host);
    }
  }

  @Test
  void aServerOnEveryInterfaceMustSayWhereItIsReached() throws Exception {
    for (String any : List.of("0.0.0.0", "::")) {
      var refused = assertThrows(Handshake.HandshakeException.class, () -> Registration.advertisedAddress("",
          "--advertise (or LINCHKIT_ADVERTISE)", new InetSocketAddress(InetAddress.getByName(any), 4000)));
      assertTrue(refused.getMessage().contains("which no dispatcher can call: say where it is reached with --advertise"),
          refused.getMessage());
    }
    assertEquals("10.0.0.5:50051", Registration.advertisedAddress("10.0.0.5:50051", "--advertise", LOOPBACK));
    assertEquals("[::1]:50051", Registration.advertisedAddress("",
        "--advertise", new InetSocketAddress(InetAddress.getByName("::1"), 50051)));
    assertEquals("[fd00::5:0:0:7]:1", Registration.hostPort(
        new InetSocketAddress(InetAddress.getByName("fd00:0:0:0:5:0:0:7"), 1)));
  }

  @Test
  void theWaitsAfterRefusalsDoubleToTheCapAndAreSpread() {
    assertEquals(2000, Registration.refusedRetryWaitMs(1, 1000, () -> 0.0));
    assertEquals(1000, Registration.refusedRetryWaitMs(1, 1000, () -> 0.999999), 1);
    assertEquals(16_000, Registration.refusedRetryWaitMs(4, 1000, () -> 0.0));
    for (int refusals : new int[] {5, 31, 32, 64, 1_000_000}) {
      assertEquals(Registration.REFUSED_RETRY_CAP_MS, Registration.refusedRetryWaitMs(refusals, 1000, () -> 0.0));
    }
    assertEquals(22_500, Registration.refusedRetryWaitMs(5, 1000, () -> 0.5));
  }

  @Test
  void aPasswordOnTheCommandLineIsRefusedByNameAndNotRepeated() throws Exception {
    for (String[] args : new String[][] {
        {"serve", "--register-etcd-password", SECRET},
        {"serve", "--address", "127.0.0.1:0", "--register-etcd-password=" + SECRET},
        {"serve", "--register-etcd", "http://127.0.0.1:2379", "--register-etcd-password", SECRET, "--bogus"}}) {
      var refused = assertThrows(Handshake.HandshakeException.class, () -> Handshake.parseCommand(args));
      assertTrue(refused.getMessage().contains(Registration.PASSWORD_ENV), refused.getMessage());
      assertFalse(refused.getMessage().contains(SECRET), refused.getMessage());
    }
    Handshake.Command command = Handshake.parseCommand(new String[] {"serve", "--register-etcd", "http://e:2379",
        "--register-prefix=/p", "--advertise", "", "--address", "127.0.0.1:0"});
    assertEquals(Map.of("register-etcd", "http://e:2379", "register-prefix", "/p", "advertise", ""),
        command.registryFlags());
    assertThrows(Handshake.HandshakeException.class,
        () -> Handshake.parseCommand(new String[] {"serve", "--register-etcd"}));
    assertFalse(Serve.SERVICE_HELP.contains(RegistrySettings.PASSWORD_FLAG), "there only to be refused");
    for (RegistrySettings.Setting setting : RegistrySettings.Setting.values()) {
      assertTrue(Serve.SERVICE_HELP.contains("--" + setting.flag + " "), setting.flag);
      assertTrue(Serve.SERVICE_HELP.contains(setting.env), setting.env);
    }
  }

  /** A stand-in for etcd's JSON gateway: each POST answered by {@code answer} (status, JSON). */
  private static final class FakeGateway implements AutoCloseable {
    final HttpServer server;
    final List<String> seen = Collections.synchronizedList(new ArrayList<>());

    FakeGateway(Function<Request, Object[]> answer) throws IOException {
      server = HttpServer.create(new InetSocketAddress(InetAddress.getLoopbackAddress(), 0), 0);
      server.createContext("/", exchange -> {
        Request request = new Request(exchange.getRequestURI().getPath(),
            JsonParser.parseString(new String(exchange.getRequestBody().readAllBytes(), StandardCharsets.UTF_8))
                .getAsJsonObject(),
            exchange.getRequestHeaders().getFirst("Authorization"));
        seen.add(request.path + (request.token == null ? "" : " " + request.token));
        Object[] reply = answer.apply(request);
        respond(exchange, (Integer) reply[0], reply[1].toString().getBytes(StandardCharsets.UTF_8));
      });
      server.start();
    }

    static void respond(HttpExchange exchange, int status, byte[] body) throws IOException {
      exchange.sendResponseHeaders(status, body.length);
      exchange.getResponseBody().write(body);
      exchange.close();
    }

    String url() {
      return "http://127.0.0.1:" + server.getAddress().getPort();
    }

    @Override
    public void close() {
      server.stop(0);
    }
  }

  private record Request(String path, JsonObject body, String token) {}

  private static EtcdGateway gateway(String url, String user, List<String> said) throws Exception {
    Map<String, String> env = new HashMap<>();
    if (user != null) {
      env.put(Registration.USER_ENV, user);
      env.put(Registration.PASSWORD_ENV, SECRET);
    }
    return EtcdGateway.from(url, URI.create(url), settings(Map.of(), env), Duration.ofSeconds(5), said::add);
  }

  private static JsonObject json(String text) {
    return JsonParser.parseString(text).getAsJsonObject();
  }

  @Test
  void aTokenEtcdForgotIsReplacedOnceAndTheRequestSentAgain() throws Exception {
    AtomicInteger tokens = new AtomicInteger();
    try (FakeGateway etcd = new FakeGateway(request -> {
      if (request.path.equals("/v3/auth/authenticate")) {
        return new Object[] {200, "{\"header\":{},\"token\":\"t" + tokens.incrementAndGet() + "\"}"};
      }
      if ("t1".equals(request.token)) {
        return new Object[] {401, "{\"error\":\"etcdserver: invalid auth token\",\"code\":16,\"message\":\"etcdserver: invalid auth token\"}"};
      }
      return new Object[] {200, "{\"header\":{\"revision\":\"7\"}}"};
    })) {
      List<String> said = new ArrayList<>();
      JsonObject answer = gateway(etcd.url(), "registrar", said).post("/v3/kv/put", json("{\"key\":\"a2V5\"}"));
      assertTrue(answer.has("header"), answer.toString());
      assertEquals(List.of("/v3/auth/authenticate", "/v3/kv/put t1", "/v3/auth/authenticate", "/v3/kv/put t2"), etcd.seen);
      assertEquals(List.of(), said, "an expired token is routine, not worth a word");
    }
  }

  @Test
  void refusalsAreTypedAndNeverQuoteThePassword() throws Exception {
    try (FakeGateway etcd = new FakeGateway(request -> request.path.equals("/v3/auth/authenticate")
        ? new Object[] {400, "{\"error\":\"etcdserver: authentication failed, invalid user ID or password\",\"code\":3}"}
        : new Object[] {200, "{}"})) {
      var refused = assertThrows(EtcdGateway.Refused.class,
          () -> gateway(etcd.url(), "registrar", new ArrayList<>()).post("/v3/kv/put", new JsonObject()));
      assertTrue(refused.getMessage().contains("refused user 'registrar': authentication failed"), refused.getMessage());
      assertFalse(refused.getMessage().contains(SECRET));
    }
    try (FakeGateway etcd = new FakeGateway(request -> request.path.equals("/v3/auth/authenticate")
        ? new Object[] {400, "{\"error\":\"etcdserver: authentication is not enabled\",\"code\":9}"}
        : new Object[] {200, "{\"header\":{}}"})) {
      List<String> said = new ArrayList<>();
      EtcdGateway gateway = gateway(etcd.url(), "registrar", said);
      gateway.post("/v3/kv/put", new JsonObject());
      gateway.post("/v3/kv/put", new JsonObject());
      assertEquals(List.of("/v3/auth/authenticate", "/v3/kv/put", "/v3/kv/put"), etcd.seen, "no token asked again");
      assertEquals(1, said.size(), said.toString());
      assertTrue(said.get(0).contains("authentication off") && said.get(0).contains("'registrar'"), said.get(0));
    }
  }

  @Test
  void anAnswerThatIsNotEtcdsIsAnOutageNotACrash() throws Exception {
    String huge = "{\"x\":\"" + "a".repeat(EtcdGateway.MAX_ANSWER_BYTES) + "\"}";
    for (String answer : List.of("<html>not json</html>", "[1, 2]", huge)) {
      try (FakeGateway etcd = new FakeGateway(request -> new Object[] {200, answer})) {
        var failed = assertThrows(EtcdGateway.Unavailable.class,
            () -> gateway(etcd.url(), null, new ArrayList<>()).post("/v3/lease/grant", new JsonObject()));
        assertFalse(failed instanceof EtcdGateway.Refused);
        assertTrue(failed.getMessage().contains("not a JSON object"), failed.getMessage());
      }
    }
    var refused = assertThrows(EtcdGateway.Unavailable.class,
        () -> gateway("http://127.0.0.1:1", null, new ArrayList<>()).post("/v3/lease/grant", new JsonObject()));
    assertEquals("http://127.0.0.1:1 does not answer (connection refused)", refused.getMessage());
  }

  @Test
  void aLeaseEtcdLostIsGrantedAgainAndTheKeyPutAgainThenLeftOnStop() throws Exception {
    AtomicInteger leases = new AtomicInteger();
    Map<String, String> keys = Collections.synchronizedMap(new HashMap<>());
    try (FakeGateway etcd = new FakeGateway(request -> switch (request.path) {
      case "/v3/lease/grant" -> new Object[] {200, "{\"header\":{},\"ID\":\"" + (100 + leases.incrementAndGet()) + "\",\"TTL\":\"3\"}"};
      case "/v3/kv/put" -> {
        keys.put(request.body.get("key").getAsString(), request.body.get("lease").getAsString());
        yield new Object[] {200, "{\"header\":{}}"};
      }
      // The first lease is forgotten (an etcd restarted without its data); the second lives.
      case "/v3/lease/keepalive" -> new Object[] {200, "{\"result\":{\"ID\":\"" + request.body.get("ID").getAsString()
          + "\",\"TTL\":\"" + ("101".equals(request.body.get("ID").getAsString()) ? "0" : "3") + "\"}}"};
      case "/v3/kv/deleterange" -> {
        keys.remove(request.body.get("key").getAsString());
        yield new Object[] {200, "{\"header\":{},\"deleted\":\"1\"}"};
      }
      default -> new Object[] {200, "{\"header\":{}}"};
    })) {
      Map<String, String> env = Map.of(Registration.ETCD_ENV, etcd.url(), Registration.PREFIX_ENV, "/p",
          Registration.TTL_ENV, "3", Registration.LEAVE_DELAY_ENV, "0");
      Registration registration = Registration.from(settings(Map.of(), env), LOOPBACK);
      String key = Base64.getEncoder().encodeToString(registration.key.getBytes(StandardCharsets.UTF_8));
      registration.start();
      long deadline = System.nanoTime() + Duration.ofSeconds(60).toNanos();
      while (!"102".equals(keys.get(key)) && System.nanoTime() < deadline) Thread.sleep(50);
      assertEquals("102", keys.get(key), etcd.seen.toString());
      registration.deregister();
      assertFalse(keys.containsKey(key), "deleted at the stop");
      List<String> seen = List.copyOf(etcd.seen);
      assertEquals(List.of("/v3/kv/deleterange", "/v3/lease/revoke"), seen.subList(seen.size() - 2, seen.size()));
    }
  }

  /**
   * The loop's waits, as it asks for them (its {@link Registration.Pause}), against the stand-in
   * answering each try as {@code tries} scripts it: R refuses (HTTP 403, permission denied), U
   * answers nothing etcd would (an etcd that does not answer, for the loop), A admits. The test of
   * {@code refusedRetryWaitMs} holds the waits' values; this one holds the loop to them: the
   * refusal counted, doubled, capped, started again after a success and kept across an outage.
   */
  @Test
  void theLoopWaitsAsTheBackoffSays() throws Exception {
    String tries = "RRRRRRARURUURAU";
    AtomicInteger tried = new AtomicInteger();
    try (FakeGateway etcd = new FakeGateway(request -> {
      char outcome = tried.get() < tries.length() ? tries.charAt(tried.get()) : 'A'; // leaving, every try made
      if (outcome == 'R') {
        return new Object[] {403, "{\"error\":\"etcdserver: permission denied\",\"code\":7,\"message\":\"etcdserver: permission denied\"}"};
      }
      if (outcome == 'U') return new Object[] {200, "{}"}; // no lease granted, none renewed: not etcd's answer
      return switch (request.path) {
        case "/v3/lease/grant" -> new Object[] {200, "{\"header\":{},\"ID\":\"7587\",\"TTL\":\"10\"}"};
        case "/v3/lease/keepalive" -> new Object[] {200, "{\"result\":{\"ID\":\"7587\",\"TTL\":\"10\"}}"};
        default -> new Object[] {200, "{\"header\":{}}"};
      };
    })) {
      Map<String, String> env = Map.of(Registration.ETCD_ENV, etcd.url(), Registration.PREFIX_ENV, "/p",
          Registration.TTL_ENV, "10", Registration.LEAVE_DELAY_ENV, "0");
      Registration registration = Registration.from(settings(Map.of(), env), LOOPBACK);
      List<Long> waits = Collections.synchronizedList(new ArrayList<>());
      CountDownLatch everyTryMade = new CountDownLatch(1);
      registration.start(waitMs -> {
        waits.add(waitMs);
        if (tried.incrementAndGet() < tries.length()) return false;
        everyTryMade.countDown();
        return true; // stop: the loop leaves
      });
      assertTrue(everyTryMade.await(60, TimeUnit.SECONDS), "the loop stopped short: " + waits);
      registration.deregister();
      List<String> seen = List.copyOf(etcd.seen);
      assertEquals(List.of("/v3/kv/deleterange", "/v3/lease/revoke"), seen.subList(seen.size() - 2, seen.size()));
      // The span each try's wait must lie in, in ms: (pace 1 s) 1-2 s after the first refusal,
      // twice as long after each in a row, up to 15-30 s; a success's, the renewal period (TTL/3),
      // which starts them again; an outage's, the pace, which keeps them.
      long[][] expected = {
        {1000, 2000}, // R
        {2000, 4000}, // R
        {4000, 8000}, // R
        {8000, 16_000}, // R
        {15_000, 30_000}, // R: the cap
        {15_000, 30_000}, // R
        {3333, 3333}, // A
        {1000, 2000}, // R: from the first again
        {1000, 1000}, // U: the pace
        {2000, 4000}, // R: the second in a row still
        {1000, 1000}, // U
        {1000, 1000}, // U
        {4000, 8000}, // R
        {3333, 3333}, // A
        {1000, 1000}, // U
      };
      assertEquals(expected.length, waits.size(), waits.toString());
      for (int i = 0; i < expected.length; i++) {
        long wait = waits.get(i);
        assertTrue(expected[i][0] <= wait && wait <= expected[i][1], "try " + (i + 1) + " (" + tries.charAt(i) + "): "
            + wait + " ms, want " + expected[i][0] + " to " + expected[i][1] + "; every wait: " + waits);
      }
    }
  }
}
