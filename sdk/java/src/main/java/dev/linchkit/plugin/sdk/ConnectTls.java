package dev.linchkit.plugin.sdk;

import io.netty.handler.ssl.SslContext;
import io.netty.handler.ssl.SslContextBuilder;
import java.io.ByteArrayInputStream;
import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.AccessDeniedException;
import java.nio.file.Files;
import java.nio.file.NoSuchFileException;
import java.nio.file.Path;
import java.security.PrivateKey;
import java.security.Signature;
import java.security.cert.CertPathValidatorException;
import java.security.cert.Certificate;
import java.security.cert.CertificateException;
import java.security.cert.CertificateExpiredException;
import java.security.cert.CertificateFactory;
import java.security.cert.X509Certificate;
import java.util.ArrayList;
import java.util.List;
import java.util.Locale;
import java.util.Map;
import java.util.regex.Matcher;
import java.util.regex.Pattern;

/**
 * {@code connect}'s TLS files, for a {@code wss://} gateway: the roots that verify it and the
 * client certificate the plugin logs in with (mutual TLS). The same options, variables and
 * words as every SDK's {@code connect} (Go's connecttls.go, TypeScript's connecttls.ts):
 *
 * <pre>
 *   --ca-file    LINCHKIT_PLUGIN_GATEWAY_CA    PEM roots that verify the gateway (default: SSL_CERT_FILE, else the JDK's)
 *   --cert-file  LINCHKIT_PLUGIN_CLIENT_CERT   the client certificate (chain), PEM
 *   --key-file   LINCHKIT_PLUGIN_CLIENT_KEY    its unencrypted private key, PEM (PKCS#8, PKCS#1, SEC 1)
 * </pre>
 *
 * A flag wins over its variable; an empty variable counts as unset. Every file is read and
 * checked before the plugin dials, a refusal naming the flag (or the variable it came from)
 * and the file, never what it holds. Without {@code --ca-file} the roots are those of
 * {@code SSL_CERT_FILE} when it is set, as OpenSSL, Go and rustls read it in the Python, Go
 * and Rust SDKs, else the JDK's own: one variable adds a private CA in every SDK but
 * TypeScript's. {@link #whyRefused} says in the same words as every SDK why a TLS handshake
 * failed.
 */
final class ConnectTls {
  static final String GATEWAY_CA_ENV = "LINCHKIT_PLUGIN_GATEWAY_CA";
  /** A path here; a subprocess plugin reads the same name as the host's certificate itself, and connect never runs as one. */
  static final String CLIENT_CERT_ENV = "LINCHKIT_PLUGIN_CLIENT_CERT";
  static final String CLIENT_KEY_ENV = "LINCHKIT_PLUGIN_CLIENT_KEY";
  /** The roots OpenSSL, Go and rustls read in place of the system's; the JDK does not, so this class does. */
  static final String SSL_CERT_FILE_ENV = "SSL_CERT_FILE";

  private ConnectTls() {}

  /** One of the three: its value and how a message names it (the flag, or the variable it came from). */
  private record Setting(String value, String name) {}

  private static Setting setting(String flag, String given, String variable, Map<String, String> env) {
    if (given != null && !given.isEmpty()) return new Setting(given, flag);
    String value = env.getOrDefault(variable, "");
    return value.isEmpty() ? null : new Setting(value, variable);
  }

  /**
   * What {@code connect} dials {@code url} (checked already) with: null for a {@code ws://} url
   * without files; otherwise its TLS context. {@code given}: the three flags' values, null when
   * not given. Refused in one line each.
   */
  static SslContext context(String url, String caFile, String certFile, String keyFile, Map<String, String> env)
      throws Handshake.HandshakeException {
    Setting ca = setting("--ca-file", caFile, GATEWAY_CA_ENV, env);
    Setting cert = setting("--cert-file", certFile, CLIENT_CERT_ENV, env);
    Setting key = setting("--key-file", keyFile, CLIENT_KEY_ENV, env);
    if ((cert == null) != (key == null)) throw refusal("--cert-file and --key-file go together");
    boolean secure = url.regionMatches(true, 0, "wss:", 0, 4) || url.regionMatches(true, 0, "https:", 0, 6);
    if (!secure) {
      if (ca != null || cert != null) throw refusal("--ca-file, --cert-file and --key-file need a wss:// --url");
      return null;
    }
    SslContextBuilder builder = SslContextBuilder.forClient().endpointIdentificationAlgorithm("HTTPS");
    if (ca == null) {
      String bundle = env.getOrDefault(SSL_CERT_FILE_ENV, "");
      if (!bundle.isEmpty()) ca = new Setting(bundle, SSL_CERT_FILE_ENV);
    }
    if (ca != null) builder.trustManager(certificates(ca));
    if (cert != null) {
      List<X509Certificate> chain = certificates(cert);
      PrivateKey privateKey = privateKey(key);
      if (!pairs(privateKey, chain.get(0))) {
        throw refusal(key.name() + ": " + key.value() + " is not the private key of the certificate in " + cert.name());
      }
      builder.keyManager(privateKey, chain);
    }
    try {
      return builder.build();
    } catch (IOException | RuntimeException broken) {
      throw refusal("cannot set up TLS for the gateway: " + broken.getClass().getSimpleName());
    }
  }

  private static Handshake.HandshakeException refusal(String message) {
    return new Handshake.HandshakeException("connect: " + message);
  }

  /** The file's bytes, once the value is checked to be a path. */
  private static byte[] read(Setting file) throws Handshake.HandshakeException {
    // The PEM text of a key pasted where its path goes would otherwise be printed in full.
    if (file.value().contains("-----BEGIN")) {
      throw refusal(file.name() + ": the value is PEM text, not a file's path: write it to a file and give that file's path");
    }
    if (file.value().chars().anyMatch(c -> c < 0x20 || c == 0x7f)) {
      throw refusal(file.name() + ": the value holds a line break or a control character");
    }
    Path path = Path.of(file.value());
    try {
      if (Files.isDirectory(path)) throw refusal(file.name() + ": cannot read " + file.value() + ": is a directory");
      return Files.readAllBytes(path);
    } catch (NoSuchFileException missing) {
      throw refusal(file.name() + ": cannot read " + file.value() + ": no such file or directory");
    } catch (AccessDeniedException denied) {
      throw refusal(file.name() + ": cannot read " + file.value() + ": permission denied");
    } catch (IOException other) {
      String reason = String.valueOf(other.getMessage()).toLowerCase(Locale.ROOT);
      if (reason.contains("not permitted") || reason.contains("permission denied")) reason = "permission denied";
      else if (reason.contains("is a directory")) reason = "is a directory";
      else reason = other.getClass().getSimpleName();
      throw refusal(file.name() + ": cannot read " + file.value() + ": " + reason);
    }
  }

  private static final Pattern CERTIFICATE =
      Pattern.compile("-----BEGIN CERTIFICATE-----[\\s\\S]*?-----END CERTIFICATE-----");

  /** The file's PEM certificates that parse, in order; refused when none does. */
  private static List<X509Certificate> certificates(Setting file) throws Handshake.HandshakeException {
    String text = new String(read(file), StandardCharsets.ISO_8859_1);
    List<X509Certificate> found = new ArrayList<>();
    Matcher block = CERTIFICATE.matcher(text);
    while (block.find()) {
      try {
        Certificate parsed = CertificateFactory.getInstance("X.509")
            .generateCertificate(new ByteArrayInputStream(block.group().getBytes(StandardCharsets.ISO_8859_1)));
        if (parsed instanceof X509Certificate x509) found.add(x509);
      } catch (CertificateException unparsable) {
        // the next one, if any
      }
    }
    if (found.isEmpty()) throw refusal(file.name() + ": " + file.value() + " holds no PEM certificate");
    return found;
  }

  /** The file's first private key, not encrypted; its bytes and the parser's words never shown. */
  private static PrivateKey privateKey(Setting file) throws Handshake.HandshakeException {
    byte[] pem = read(file);
    String text = new String(pem, StandardCharsets.ISO_8859_1);
    Handshake.HandshakeException refused = refusal(file.name() + ": " + file.value() + " holds no unencrypted PEM private key");
    if (text.contains("ENCRYPTED")) throw refused;
    try {
      return EtcdGateway.privateKey(pem);
    } catch (IOException | RuntimeException unreadable) {
      throw refused;
    }
  }

  /** Whether {@code key} signs what {@code certificate}'s public key verifies. */
  private static boolean pairs(PrivateKey key, X509Certificate certificate) {
    try {
      String algorithm = switch (key.getAlgorithm()) {
        case "EC" -> "SHA256withECDSA";
        case "RSA" -> "SHA256withRSA";
        case "Ed25519", "EdDSA" -> "Ed25519";
        default -> null;
      };
      if (algorithm == null) return key.getAlgorithm().equals(certificate.getPublicKey().getAlgorithm());
      byte[] probe = "linchkit".getBytes(StandardCharsets.US_ASCII);
      Signature signer = Signature.getInstance(algorithm);
      signer.initSign(key);
      signer.update(probe);
      byte[] signature = signer.sign();
      Signature verifier = Signature.getInstance(algorithm);
      verifier.initVerify(certificate.getPublicKey());
      verifier.update(probe);
      return verifier.verify(signature);
    } catch (java.security.GeneralSecurityException | RuntimeException mismatch) {
      return false;
    }
  }

  /** The gateway's TLS alerts about this plugin's client certificate, in the words every SDK says them. */
  private static final Map<String, String> ALERTS = Map.of(
      "certificate_required", "the gateway requires a client certificate and got none (--cert-file and --key-file)",
      "unknown_ca", "the gateway does not trust this plugin's client certificate: no CA it trusts signed it",
      "certificate_expired", "this plugin's client certificate has expired: the gateway refused it");

  private static final Pattern ALERT = Pattern.compile("Received fatal alert: ([a-z_]+)");

  /**
   * Why a TLS handshake with the gateway failed, in one line's words that quote no URL, or null
   * when {@code error} is no TLS failure: the gateway's alert about this plugin's certificate,
   * or why the gateway's own did not verify (no root trusts it, another host's, expired).
   */
  static String whyRefused(Throwable error) {
    for (Throwable each = error; each != null; each = each.getCause() == each ? null : each.getCause()) {
      String message = String.valueOf(each.getMessage());
      Matcher alert = ALERT.matcher(message);
      if (alert.find()) {
        String name = alert.group(1);
        return "TLS: " + ALERTS.getOrDefault(name, "the gateway refused the handshake (" + name.replace('_', ' ') + ")");
      }
      if (each instanceof CertificateExpiredException
          || (each instanceof CertPathValidatorException path && path.getReason() == CertPathValidatorException.BasicReason.EXPIRED)) {
        return "TLS: the gateway's certificate does not verify: it has expired";
      }
      if (message.contains("No subject alternative") || message.contains("No name matching")) {
        return "TLS: the gateway's certificate does not verify: it is not valid for the host name dialled";
      }
      if (message.contains("unable to find valid certification path") || message.contains("PKIX path building failed")) {
        return "TLS: the gateway's certificate does not verify: unknown issuer (unable to get local issuer"
            + " certificate: no root this plugin trusts signed it)";
      }
    }
    for (Throwable each = error; each != null; each = each.getCause() == each ? null : each.getCause()) {
      if (each instanceof javax.net.ssl.SSLException) {
        return "TLS: the handshake with the gateway failed (" + each.getClass().getSimpleName() + ")";
      }
    }
    return null;
  }
}
