package dev.linchkit.plugin.sdk;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

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

  @Test
  void parsesTheCommandLine() throws Exception {
    assertFalse(Handshake.parseCommand(new String[0]).isService());
    assertEquals("127.0.0.1:0", Handshake.parseCommand(new String[] {"serve", "--address", "127.0.0.1:0"}).serviceAddress());
    assertEquals("0.0.0.0:9", Handshake.parseCommand(new String[] {"serve", "--address=0.0.0.0:9"}).serviceAddress());
    assertEquals("127.0.0.1:0", Handshake.parseCommand(new String[] {"serve"}).serviceAddress());
    assertThrows(Handshake.HandshakeException.class, () -> Handshake.parseCommand(new String[] {"run"}));
    assertThrows(Handshake.HandshakeException.class, () -> Handshake.parseCommand(new String[] {"serve", "--port", "1"}));
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
