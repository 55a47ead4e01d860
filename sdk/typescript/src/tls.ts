/**
 * AutoMTLS: a fresh self-signed ECDSA P-256 server certificate for each launch, with the
 * subject alternative name `localhost`, as hashicorp/go-plugin makes them. Its DER goes
 * into the handshake line; the host pins it.
 */
import 'reflect-metadata'; // @peculiar/x509 resolves its parts through tsyringe, which needs it
import { webcrypto, randomBytes } from 'node:crypto';
import * as x509 from '@peculiar/x509';

x509.cryptoProvider.set(webcrypto);

export interface ServerCertificate {
  certPem: string;
  keyPem: string;
  certDer: Uint8Array;
}

const ALGORITHM = { name: 'ECDSA', namedCurve: 'P-256', hash: 'SHA-256' };

function pem(label: string, der: ArrayBuffer): string {
  const body = Buffer.from(der).toString('base64').replace(/(.{64})/g, '$1\n').replace(/\n$/, '');
  return `-----BEGIN ${label}-----\n${body}\n-----END ${label}-----\n`;
}

export async function generateServerCertificate(commonName = 'localhost'): Promise<ServerCertificate> {
  const keys = (await webcrypto.subtle.generateKey(ALGORITHM, true, ['sign', 'verify'])) as webcrypto.CryptoKeyPair;
  const serial = randomBytes(16);
  serial[0] = (serial[0] as number) & 0x7f; // a positive integer
  const now = Date.now();
  const cert = await x509.X509CertificateGenerator.createSelfSigned({
    serialNumber: serial.toString('hex'),
    name: `CN=${commonName}, O=LinchKit plugin`,
    notBefore: new Date(now - 30_000), // the host's clock may be a little behind
    notAfter: new Date(now + 365 * 24 * 3600 * 1000),
    signingAlgorithm: ALGORITHM,
    keys,
    extensions: [
      // Self-signed and pinned by the host as its own trust root, so it is marked a CA.
      new x509.BasicConstraintsExtension(true, undefined, true),
      new x509.KeyUsagesExtension(
        x509.KeyUsageFlags.digitalSignature | x509.KeyUsageFlags.keyEncipherment | x509.KeyUsageFlags.keyCertSign,
        true,
      ),
      new x509.ExtendedKeyUsageExtension([x509.ExtendedKeyUsage.serverAuth, x509.ExtendedKeyUsage.clientAuth]),
      new x509.SubjectAlternativeNameExtension([{ type: 'dns', value: 'localhost' }]),
    ],
  });
  const pkcs8 = await webcrypto.subtle.exportKey('pkcs8', keys.privateKey);
  return { certPem: cert.toString('pem') + '\n', keyPem: pem('PRIVATE KEY', pkcs8), certDer: new Uint8Array(cert.rawData) };
}
