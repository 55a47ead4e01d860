package dev.linchkit.plugin.sdk;

import java.io.ByteArrayInputStream;
import java.math.BigInteger;
import java.nio.charset.StandardCharsets;
import java.security.GeneralSecurityException;
import java.security.KeyPair;
import java.security.KeyPairGenerator;
import java.security.PrivateKey;
import java.security.SecureRandom;
import java.security.cert.CertificateFactory;
import java.security.cert.X509Certificate;
import java.security.spec.ECGenParameterSpec;
import java.util.Date;
import org.bouncycastle.asn1.x500.X500Name;
import org.bouncycastle.asn1.x509.BasicConstraints;
import org.bouncycastle.asn1.x509.ExtendedKeyUsage;
import org.bouncycastle.asn1.x509.Extension;
import org.bouncycastle.asn1.x509.GeneralName;
import org.bouncycastle.asn1.x509.GeneralNames;
import org.bouncycastle.asn1.x509.KeyPurposeId;
import org.bouncycastle.asn1.x509.KeyUsage;
import org.bouncycastle.cert.X509v3CertificateBuilder;
import org.bouncycastle.cert.jcajce.JcaX509CertificateConverter;
import org.bouncycastle.cert.jcajce.JcaX509v3CertificateBuilder;
import org.bouncycastle.operator.OperatorCreationException;
import org.bouncycastle.operator.jcajce.JcaContentSignerBuilder;

/**
 * AutoMTLS: a fresh self-signed ECDSA P-256 server certificate for each launch, with the
 * subject alternative name {@code localhost}, as hashicorp/go-plugin makes them. Its DER
 * goes into the handshake line; the host pins it.
 */
public final class AutoTls {
  private AutoTls() {}

  public record ServerCertificate(X509Certificate certificate, PrivateKey privateKey) {}

  public static ServerCertificate generate() throws GeneralSecurityException {
    KeyPairGenerator generator = KeyPairGenerator.getInstance("EC");
    generator.initialize(new ECGenParameterSpec("secp256r1"));
    KeyPair keys = generator.generateKeyPair();
    X500Name name = new X500Name("CN=localhost, O=LinchKit plugin");
    long now = System.currentTimeMillis();
    X509v3CertificateBuilder builder = new JcaX509v3CertificateBuilder(
        name,
        new BigInteger(127, new SecureRandom()),
        new Date(now - 30_000), // the host's clock may be a little behind
        new Date(now + 365L * 24 * 3600 * 1000),
        name,
        keys.getPublic());
    try {
      // Self-signed and pinned by the host as its own trust root, so it is marked a CA.
      builder.addExtension(Extension.basicConstraints, true, new BasicConstraints(true));
      builder.addExtension(Extension.keyUsage, true,
          new KeyUsage(KeyUsage.digitalSignature | KeyUsage.keyEncipherment | KeyUsage.keyCertSign));
      builder.addExtension(Extension.extendedKeyUsage, false,
          new ExtendedKeyUsage(new KeyPurposeId[] {KeyPurposeId.id_kp_serverAuth, KeyPurposeId.id_kp_clientAuth}));
      builder.addExtension(Extension.subjectAlternativeName, false,
          new GeneralNames(new GeneralName(GeneralName.dNSName, "localhost")));
      X509Certificate certificate = new JcaX509CertificateConverter()
          .getCertificate(builder.build(new JcaContentSignerBuilder("SHA256withECDSA").build(keys.getPrivate())));
      return new ServerCertificate(certificate, keys.getPrivate());
    } catch (OperatorCreationException | java.io.IOException error) {
      throw new GeneralSecurityException("cannot make the AutoMTLS certificate: " + error.getMessage(), error);
    }
  }

  /** The host's certificate from LINCHKIT_PLUGIN_CLIENT_CERT. */
  public static X509Certificate parsePem(String pem) throws GeneralSecurityException {
    return (X509Certificate) CertificateFactory.getInstance("X.509")
        .generateCertificate(new ByteArrayInputStream(pem.getBytes(StandardCharsets.US_ASCII)));
  }
}
