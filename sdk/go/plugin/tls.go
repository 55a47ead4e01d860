package plugin

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"time"
)

// autoMTLS makes the TLS config of a subprocess plugin: a fresh self-signed ECDSA P-256
// server certificate for "localhost" (returned as DER for the handshake line), and a
// demand for exactly the host's certificate from LINCHKIT_PLUGIN_CLIENT_CERT.
func autoMTLS(clientPEM []byte) (*tls.Config, []byte, error) {
	block, _ := pem.Decode(clientPEM)
	if block == nil || block.Type != "CERTIFICATE" {
		return nil, nil, fmt.Errorf("%s holds no PEM certificate", EnvClientCert)
	}
	hostCert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		return nil, nil, fmt.Errorf("%s: %w", EnvClientCert, err)
	}
	serverCert, certDER, err := generateServerCert()
	if err != nil {
		return nil, nil, err
	}
	roots := x509.NewCertPool()
	roots.AddCert(hostCert)
	config := &tls.Config{
		Certificates: []tls.Certificate{serverCert},
		MinVersion:   tls.VersionTLS12,
		// Verified below: the host's certificate itself, or one it signed.
		ClientAuth: tls.RequireAnyClientCert,
		VerifyPeerCertificate: func(rawCerts [][]byte, _ [][]*x509.Certificate) error {
			return verifyHost(rawCerts, hostCert, roots)
		},
	}
	return config, certDER, nil
}

func verifyHost(rawCerts [][]byte, hostCert *x509.Certificate, roots *x509.CertPool) error {
	if len(rawCerts) == 0 {
		return errors.New("the host sent no client certificate")
	}
	if bytes.Equal(rawCerts[0], hostCert.Raw) {
		return nil
	}
	leaf, err := x509.ParseCertificate(rawCerts[0])
	if err != nil {
		return fmt.Errorf("client certificate: %w", err)
	}
	intermediates := x509.NewCertPool()
	for _, raw := range rawCerts[1:] {
		if cert, err := x509.ParseCertificate(raw); err == nil {
			intermediates.AddCert(cert)
		}
	}
	_, err = leaf.Verify(x509.VerifyOptions{
		Roots: roots, Intermediates: intermediates, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny},
	})
	if err != nil {
		return fmt.Errorf("client certificate is not the host's: %w", err)
	}
	return nil
}

// generateServerCert makes the per-launch certificate. It is its own CA (as
// hashicorp/go-plugin's is) so a host can use it directly as its trusted root.
func generateServerCert() (tls.Certificate, []byte, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, nil, fmt.Errorf("AutoMTLS: generating a key: %w", err)
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 128))
	if err != nil {
		return tls.Certificate{}, nil, fmt.Errorf("AutoMTLS: generating a serial number: %w", err)
	}
	now := time.Now()
	template := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: "localhost", Organization: []string{"LinchKit plugin"}},
		DNSNames:              []string{"localhost"},
		NotBefore:             now.Add(-30 * time.Second),
		NotAfter:              now.Add(262980 * time.Hour), // ~30 years: the cert lives as long as the process
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, template, template, &key.PublicKey, key)
	if err != nil {
		return tls.Certificate{}, nil, fmt.Errorf("AutoMTLS: creating the certificate: %w", err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, der, nil
}

// encodeCert is the handshake line's SERVER-CERT: DER in base64 without padding.
func encodeCert(der []byte) string { return base64.RawStdEncoding.EncodeToString(der) }
