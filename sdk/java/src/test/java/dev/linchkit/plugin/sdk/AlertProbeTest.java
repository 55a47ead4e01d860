package dev.linchkit.plugin.sdk;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertInstanceOf;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import com.google.gson.JsonObject;
import java.io.IOException;
import java.math.BigInteger;
import java.net.ConnectException;
import java.net.InetAddress;
import java.net.ServerSocket;
import java.net.Socket;
import java.net.URI;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.security.KeyPair;
import java.security.KeyPairGenerator;
import java.security.KeyStore;
import java.security.SecureRandom;
import java.security.cert.X509Certificate;
import java.security.spec.ECGenParameterSpec;
import java.time.Duration;
import java.util.ArrayList;
import java.util.Base64;
import java.util.Date;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.concurrent.atomic.AtomicInteger;
import javax.net.ssl.KeyManagerFactory;
import javax.net.ssl.SSLContext;
import javax.net.ssl.SSLHandshakeException;
import javax.net.ssl.SSLServerSocket;
import javax.net.ssl.TrustManagerFactory;
import org.bouncycastle.asn1.x500.X500Name;
import org.bouncycastle.asn1.x509.BasicConstraints;
import org.bouncycastle.asn1.x509.Extension;
import org.bouncycastle.asn1.x509.GeneralName;
import org.bouncycastle.asn1.x509.GeneralNames;
import org.bouncycastle.cert.jcajce.JcaX509CertificateConverter;
import org.bouncycastle.cert.jcajce.JcaX509v3CertificateBuilder;
import org.bouncycastle.operator.jcajce.JcaContentSignerBuilder;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

/**
 * With TLS 1.3 etcd judges a client's certificate once the client's side of the handshake is over,
 * and its alert may reach the JDK's HttpClient only as a broken pipe on the request's write: the
 * gateway asks again on a connection of its own ({@link AlertProbe}) before it calls that an
 * outage. Against a local TLS 1.3 server that requires a client certificate, as etcd run with
 * {@code --client-cert-auth} does; a real etcd turns a Java plugin away in
 * tests/test_plugin_registry_secure.py.
 */
class AlertProbeTest {
  /** What the JDK's HttpClient reported when etcd's alert was lost with the request. */
  private static IOException brokenPipe() {
    return new IOException("HTTP/1.1 header parser received no bytes", new IOException("Broken pipe"));
  }

  private record Pair(X509Certificate certificate, KeyPair keys) {}

  /** A self-signed certificate for {@code 127.0.0.1}, its own trust root. */
  private static Pair selfSigned(String name) throws Exception {
    KeyPairGenerator generator = KeyPairGenerator.getInstance("EC");
    generator.initialize(new ECGenParameterSpec("secp256r1"));
    KeyPair keys = generator.generateKeyPair();
    X500Name subject = new X500Name("CN=" + name);
    long now = System.currentTimeMillis();
    var builder = new JcaX509v3CertificateBuilder(subject, new BigInteger(64, new SecureRandom()),
        new Date(now - 60_000), new Date(now + 3_600_000), subject, keys.getPublic());
    builder.addExtension(Extension.basicConstraints, true, new BasicConstraints(true));
    builder.addExtension(Extension.subjectAlternativeName, false,
        new GeneralNames(new GeneralName(GeneralName.iPAddress, "127.0.0.1")));
    X509Certificate certificate = new JcaX509CertificateConverter()
        .getCertificate(builder.build(new JcaContentSignerBuilder("SHA256withECDSA").build(keys.getPrivate())));
    return new Pair(certificate, keys);
  }

  private static Path pem(Path folder, String file, String kind, byte[] der) throws IOException {
    String body = Base64.getMimeEncoder(64, "\n".getBytes(StandardCharsets.US_ASCII)).encodeToString(der);
    return Files.writeString(folder.resolve(file), "-----BEGIN " + kind + "-----\n" + body + "\n-----END " + kind + "-----\n");
  }

  /**
   * A TLS 1.3 server on 127.0.0.1 that requires a client certificate issued by {@code trusted}:
   * it reads what a client sends and answers nothing. {@code accepted}: the connections it took.
   */
  private static final class CertificateCheckingServer implements AutoCloseable {
    final ServerSocket server;
    final AtomicInteger accepted = new AtomicInteger();
    private final Thread thread;

    CertificateCheckingServer(Pair own, X509Certificate trusted) throws Exception {
      char[] secret = "test".toCharArray();
      KeyStore keyStore = KeyStore.getInstance(KeyStore.getDefaultType());
      keyStore.load(null, null);
      keyStore.setKeyEntry("server", own.keys.getPrivate(), secret, new X509Certificate[] {own.certificate});
      KeyManagerFactory keys = KeyManagerFactory.getInstance(KeyManagerFactory.getDefaultAlgorithm());
      keys.init(keyStore, secret);
      KeyStore trustStore = KeyStore.getInstance(KeyStore.getDefaultType());
      trustStore.load(null, null);
      trustStore.setCertificateEntry("client-ca", trusted);
      TrustManagerFactory trust = TrustManagerFactory.getInstance(TrustManagerFactory.getDefaultAlgorithm());
      trust.init(trustStore);
      SSLContext context = SSLContext.getInstance("TLS");
      context.init(keys.getKeyManagers(), trust.getTrustManagers(), null);
      SSLServerSocket tls = (SSLServerSocket) context.getServerSocketFactory()
          .createServerSocket(0, 50, InetAddress.getByName("127.0.0.1"));
      tls.setEnabledProtocols(new String[] {"TLSv1.3"});
      tls.setNeedClientAuth(true);
      server = tls;
      thread = new Thread(this::serve, "certificate-checking-server");
      thread.setDaemon(true);
      thread.start();
    }

    /** A port that takes connections and never speaks. */
    CertificateCheckingServer() throws IOException {
      server = new ServerSocket(0, 50, InetAddress.getByName("127.0.0.1"));
      thread = new Thread(this::serve, "mute-server");
      thread.setDaemon(true);
      thread.start();
    }

    private void serve() {
      while (!server.isClosed()) {
        try {
          Socket connection = server.accept();
          accepted.incrementAndGet();
          Thread reader = new Thread(() -> drain(connection), "certificate-checking-connection");
          reader.setDaemon(true);
          reader.start();
        } catch (IOException closed) {
          return;
        }
      }
    }

    /** Reads until the client leaves; a TLS server refuses a certificate it does not trust here. */
    private static void drain(Socket connection) {
      try (connection) {
        while (connection.getInputStream().read() >= 0) {
          // a request is never answered
        }
      } catch (IOException refusedOrGone) {
        // the handshake failed (the alert is sent), or the client left
      }
    }

    String url() {
      return "https://127.0.0.1:" + server.getLocalPort();
    }

    @Override
    public void close() throws IOException {
      server.close();
    }
  }

  private static EtcdGateway gateway(String url, Path ca, Path cert, Path key, Duration timeout) throws Exception {
    Map<String, String> env = new HashMap<>();
    env.put(Registration.CA_FILE_ENV, ca.toString());
    if (cert != null) {
      env.put(Registration.CERT_FILE_ENV, cert.toString());
      env.put(Registration.KEY_FILE_ENV, key.toString());
    }
    return EtcdGateway.from(url, URI.create(url), new RegistrySettings(Map.of(), env), timeout, said -> {});
  }

  @Test
  void aBrokenPipeFromAnEtcdThatRefusesTheCertificateIsItsRefusal(@TempDir Path folder) throws Exception {
    Pair etcd = selfSigned("etcd");
    Pair client = selfSigned("linchkit-client");
    Pair stranger = selfSigned("stranger");
    Path ca = pem(folder, "ca.pem", "CERTIFICATE", etcd.certificate.getEncoded());
    Path strangerCert = pem(folder, "stranger.pem", "CERTIFICATE", stranger.certificate.getEncoded());
    Path strangerKey = pem(folder, "stranger.key", "PRIVATE KEY", stranger.keys.getPrivate().getEncoded());
    try (CertificateCheckingServer server = new CertificateCheckingServer(etcd, client.certificate)) {
      EtcdGateway refused = gateway(server.url(), ca, strangerCert, strangerKey, Duration.ofSeconds(5));
      var failure = refused.failure(brokenPipe());
      assertInstanceOf(EtcdGateway.Refused.class, failure, failure.getMessage());
      String expected = "the TLS handshake with etcd at " + server.url() + " failed (Received fatal alert: ";
      assertTrue(failure.getMessage().startsWith(expected), failure.getMessage());
      assertTrue(failure.getMessage().endsWith("): does etcd trust the certificate of "
          + Registration.CERT_FILE_ENV + "?"), failure.getMessage());
      assertEquals(1, server.accepted.get(), "one probe");

      var noCertificate = gateway(server.url(), ca, null, null, Duration.ofSeconds(5)).failure(brokenPipe());
      assertInstanceOf(EtcdGateway.Refused.class, noCertificate, noCertificate.getMessage());
      assertTrue(noCertificate.getMessage().endsWith("): etcd may require a client certificate"
          + " (--register-etcd-cert-file (or " + Registration.CERT_FILE_ENV + "))"), noCertificate.getMessage());

      // Whichever way each alert reaches the HttpClient, in the request's handshake or as its
      // write fails, every try is a refusal.
      for (int i = 0; i < 10; i++) {
        var each = assertThrows(EtcdGateway.Unavailable.class,
            () -> refused.post("/v3/kv/range", new JsonObject()));
        assertInstanceOf(EtcdGateway.Refused.class, each, each.getMessage());
      }
    }
  }

  @Test
  void noProbeKnocksWhereTheConnectionOrItsHandshakeFailed(@TempDir Path folder) throws Exception {
    Pair etcd = selfSigned("etcd");
    Pair client = selfSigned("linchkit-client");
    Path ca = pem(folder, "ca.pem", "CERTIFICATE", etcd.certificate.getEncoded());
    Path cert = pem(folder, "client.pem", "CERTIFICATE", client.certificate.getEncoded());
    Path key = pem(folder, "client.key", "PRIVATE KEY", client.keys.getPrivate().getEncoded());
    try (CertificateCheckingServer server = new CertificateCheckingServer(etcd, selfSigned("other").certificate)) {
      EtcdGateway gateway = gateway(server.url(), ca, cert, key, Duration.ofSeconds(5));
      // A flaky etcd or load balancer that cuts handshakes is tried again soon, each try one
      // connection; an etcd that refuses connections is not knocked on twice.
      List<Throwable> outages = List.of(new SSLHandshakeException("Remote host terminated the handshake"),
          new ConnectException(), new IOException("x", new ConnectException("Connection refused")));
      for (Throwable outage : outages) {
        var failure = gateway.failure(outage);
        assertFalse(failure instanceof EtcdGateway.Refused, failure.getMessage());
      }
      assertEquals(0, server.accepted.get(), "no probe");
    }
  }

  @Test
  void aBrokenPipeFromAnEtcdThatTakesTheCertificateOrSaysNothingIsAnOutage(@TempDir Path folder) throws Exception {
    Pair etcd = selfSigned("etcd");
    Pair client = selfSigned("linchkit-client");
    Path ca = pem(folder, "ca.pem", "CERTIFICATE", etcd.certificate.getEncoded());
    Path cert = pem(folder, "client.pem", "CERTIFICATE", client.certificate.getEncoded());
    Path key = pem(folder, "client.key", "PRIVATE KEY", client.keys.getPrivate().getEncoded());
    List<CertificateCheckingServer> servers = new ArrayList<>();
    try (CertificateCheckingServer trusting = new CertificateCheckingServer(etcd, client.certificate);
        CertificateCheckingServer mute = new CertificateCheckingServer()) {
      servers.add(trusting);
      servers.add(mute);
      for (CertificateCheckingServer server : servers) {
        // A port that never speaks holds the probe for the gateway's timeout, no longer.
        EtcdGateway gateway = gateway(server.url(), ca, cert, key, Duration.ofSeconds(1));
        long started = System.nanoTime();
        var failure = gateway.failure(brokenPipe());
        long tookSeconds = Duration.ofNanos(System.nanoTime() - started).toSeconds();
        assertFalse(failure instanceof EtcdGateway.Refused, failure.getMessage());
        assertEquals(server.url() + " does not answer (Broken pipe)", failure.getMessage());
        assertEquals(1, server.accepted.get(), "one probe");
        assertTrue(tookSeconds < 30, tookSeconds + " s");
      }
    }
  }
}
