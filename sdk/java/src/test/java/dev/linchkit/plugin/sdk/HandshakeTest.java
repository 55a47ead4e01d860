package dev.linchkit.plugin.sdk;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.io.IOException;
import java.net.BindException;
import java.security.cert.X509Certificate;
import java.security.interfaces.ECPublicKey;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.OptionalInt;
import org.junit.jupiter.api.Test;

class HandshakeTest {
  private static Map<String, String> withCookie() {
    Map<String, String> env = new HashMap<>();
    env.put(Handshake.MAGIC_COOKIE_KEY, Handshake.MAGIC_COOKIE_VALUE);
    return env;
  }

  @Test
  void negotiatesTheHighestCommonVersion() {
    assertEquals(OptionalInt.of(1), Handshake.negotiate("1", List.of(1)));
    assertEquals(OptionalInt.of(1), Handshake.negotiate(" 3, 1 ,2", List.of(1)));
    assertEquals(OptionalInt.of(2), Handshake.negotiate("1,2", List.of(1, 2)));
    assertEquals(OptionalInt.empty(), Handshake.negotiate("2", List.of(1)));
    assertEquals(OptionalInt.of(1), Handshake.negotiate(null, List.of(1)), "a host that offers nothing speaks 1");
  }

  @Test
  void refusesToRunWithoutTheMagicCookie() {
    var error = assertThrows(Handshake.HandshakeException.class, () -> Handshake.readEnv(Map.of()));
    assertTrue(error.getMessage().contains("not by hand"), error.getMessage());
    assertThrows(Handshake.HandshakeException.class,
        () -> Handshake.readEnv(Map.of(Handshake.MAGIC_COOKIE_KEY, "wrong")));
  }

  @Test
  void readsTheHandshakeEnvironment() throws Exception {
    assertEquals(new Handshake.Config(1, "unix", null, null), Handshake.readEnv(withCookie()));
    String pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
    Map<String, String> env = withCookie();
    env.put(Handshake.PROTOCOL_VERSIONS_KEY, "1");
    env.put(Handshake.NETWORK_KEY, "tcp");
    env.put(Handshake.SOCKET_DIR_KEY, "/tmp/x");
    env.put(Handshake.CLIENT_CERT_KEY, pem);
    assertEquals(new Handshake.Config(1, "tcp", "/tmp/x", pem), Handshake.readEnv(env));

    Map<String, String> udp = withCookie();
    udp.put(Handshake.NETWORK_KEY, "udp");
    assertThrows(Handshake.HandshakeException.class, () -> Handshake.readEnv(udp));
    Map<String, String> future = withCookie();
    future.put(Handshake.PROTOCOL_VERSIONS_KEY, "7,8");
    var error = assertThrows(Handshake.HandshakeException.class, () -> Handshake.readEnv(future));
    assertTrue(error.getMessage().contains("no common protocol version"));
    Map<String, String> badCert = withCookie();
    badCert.put(Handshake.CLIENT_CERT_KEY, "not a pem");
    assertThrows(Handshake.HandshakeException.class, () -> Handshake.readEnv(badCert));
  }

  @Test
  void writesTheLineWithAnUnpaddedCertificate() {
    assertEquals("1|1|tcp|127.0.0.1:4000|grpc|", Handshake.line(1, "tcp", "127.0.0.1:4000", null));
    // base64 of these bytes is "AQIDBA==" with padding
    assertEquals("1|1|unix|/tmp/p.sock|grpc|AQIDBA", Handshake.line(1, "unix", "/tmp/p.sock", new byte[] {1, 2, 3, 4}));
  }

  private static Handshake.Command parse(String... args) throws Handshake.HandshakeException {
    return Handshake.parseCommand(args);
  }

  @Test
  void parsesTheCommandLine() throws Exception {
    assertFalse(parse().isService());
    assertFalse(parse().helpWanted());
    assertEquals(new Handshake.ServiceAddress("127.0.0.1", 0), parse("serve", "--address", "127.0.0.1:0").serviceAddress());
    assertEquals(new Handshake.ServiceAddress("0.0.0.0", 9), parse("serve", "--address=0.0.0.0:9").serviceAddress());
    assertEquals(new Handshake.ServiceAddress("127.0.0.1", 0), parse("serve").serviceAddress());
    assertThrows(Handshake.HandshakeException.class, () -> parse("run"));
    var unknown = assertThrows(Handshake.HandshakeException.class, () -> parse("serve", "--port", "1"));
    assertTrue(unknown.getMessage().contains("--port") && unknown.getMessage().contains("usage: serve"), unknown.getMessage());
  }

  /** A command line can carry a secret where an operator slipped: a refusal never repeats it. */
  @Test
  void refusesAnArgumentWithoutRepeatingWhatFollowedIt() {
    String secret = "hunter2-5f1d";
    String[][] mistakes = {
        {"serve", "--register-etcd-pasword=" + secret},
        {"serve", "--url=ws://me:" + secret + "@127.0.0.1:9/v1/plugins/connect"},
        {"serve", "--address", "127.0.0.1:0", secret},
        {"--url=ws://me:" + secret + "@127.0.0.1:9/"},
        {secret},
        // One dash: by its place (before, named whole, as an option).
        {"serve", "-" + secret},
        {"serve", "--address=127.0.0.1:0", "-" + secret + "=1"},
        {"-" + secret},
    };
    // After serve, begun with it as Go's, Rust's and TypeScript's are (until 2026-12-06 not).
    String[] said = {
        "serve: unknown option --register-etcd-pasword (its value is not shown); usage: serve",
        "serve: unknown option --url (its value is not shown); usage: serve",
        "serve: unexpected argument #4 (its text is not shown); usage: serve",
        "unknown option --url (its value is not shown); usage: serve",
        "unknown command (argument #1, its text is not shown); usage: serve",
        "serve: unknown option (argument #2, its text is not shown); usage: serve",
        "serve: unknown option (argument #3, its text is not shown); usage: serve",
        "unknown option (argument #1, its text is not shown); usage: serve",
    };
    for (int i = 0; i < mistakes.length; i++) {
      String[] mistake = mistakes[i];
      var error = assertThrows(Handshake.HandshakeException.class, () -> parse(mistake), String.join(" ", mistake));
      assertTrue(error.getMessage().startsWith(said[i]), error.getMessage());
      assertFalse(error.getMessage().contains(secret), error.getMessage());
    }
    var bare = assertThrows(Handshake.HandshakeException.class, () -> parse("serve", "--no-such-flag"));
    assertTrue(bare.getMessage().startsWith("serve: unknown option --no-such-flag; usage: serve"), bare.getMessage());
    var missing = assertThrows(Handshake.HandshakeException.class, () -> parse("serve", "--address"));
    assertTrue(missing.getMessage().startsWith("serve: --address needs a value; usage: serve"), missing.getMessage());
  }

  @Test
  void helpIsAskedForByEitherSpelling() throws Exception {
    for (String help : new String[] {"--help", "-h"}) {
      Handshake.Command command = parse("serve", help);
      assertTrue(command.helpWanted(), help);
      assertFalse(command.isService(), "help serves nothing: " + help);
    }
    assertTrue(parse("serve", "--address", "127.0.0.1:1", "--help").helpWanted());
    // `example-plugin --help` too: an author asks the executable, not its serve command.
    for (String help : new String[] {"--help", "-h"}) {
      assertTrue(parse(help).helpWanted(), help);
      assertFalse(parse(help).isService(), help);
    }
  }

  @Test
  void acceptsEveryKindOfHostAndThePortRange() throws Exception {
    assertEquals(new Handshake.ServiceAddress("localhost", 65535), Handshake.ServiceAddress.parse("localhost:65535"));
    assertEquals(new Handshake.ServiceAddress("10.0.0.7", 50051), Handshake.ServiceAddress.parse("10.0.0.7:50051"));
    Handshake.ServiceAddress ipv6 = Handshake.ServiceAddress.parse("[::1]:0");
    assertEquals("[::1]", ipv6.host(), "kept with brackets for the handshake line");
    assertEquals("::1", ipv6.bindHost());
    assertEquals("[::1]:0", ipv6.toString());
    assertEquals("example.org", Handshake.ServiceAddress.parse("example.org:1").bindHost());
  }

  @Test
  void refusesAMistypedAddressBeforeListening() {
    String[] mistakes = {"", "not-an-address", "127.0.0.1:", "127.0.0.1:99999", "127.0.0.1:65536", "127.0.0.1:-1",
        "127.0.0.1:+1", "127.0.0.1:http", ":50051", "::1:50051", "[]:1", "[::1:1", "[::1]x:1", "127.0.0.1:0x10",
        "127.0.0.1:123456"};
    for (String mistake : mistakes) {
      var error = assertThrows(Handshake.HandshakeException.class, () -> parse("serve", "--address", mistake), mistake);
      assertEquals("serve: --address must be host:port with a port in 0-65535 (e.g. 127.0.0.1:50051), not '"
          + mistake + "'", error.getMessage());
    }
  }

  @Test
  void saysWhyABindFailedInTheSystemsWords() {
    var epoll = new IOException("Failed to bind to address /127.0.0.1:4000",
        new IOException("bind(..) failed: Address already in use"));
    assertEquals("Address already in use", Serve.bindFailure(epoll));
    assertEquals("Cannot assign requested address",
        Serve.bindFailure(new IOException("wrapped", new BindException("Cannot assign requested address"))));
    assertEquals("the bind failed", Serve.bindFailure(new IOException("wrapped", new BindException())));
  }

  @Test
  void helpNamesTheFlagsAndTheEnvironment() {
    for (String name : new String[] {"--address", "127.0.0.1:0", "--help", "-h", BearerToken.TOKEN_FILE_ENV, BearerToken.TOKEN_ENV}) {
      assertTrue(Serve.SERVICE_HELP.contains(name), name);
    }
  }

  @Test
  void autoTlsMakesAnEcdsaP256CertificateForLocalhost() throws Exception {
    X509Certificate certificate = AutoTls.generate().certificate();
    certificate.verify(certificate.getPublicKey()); // self-signed
    assertEquals("secp256r1", ((ECPublicKey) certificate.getPublicKey()).getParams().toString().split(" ")[0]);
    assertEquals(List.of(List.of(2, "localhost")), certificate.getSubjectAlternativeNames().stream().map(List::copyOf).toList());
    assertTrue(certificate.getBasicConstraints() >= 0, "marked a CA, so the host can pin it as a root");
  }
}
