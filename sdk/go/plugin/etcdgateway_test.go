package plugin

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"io"
	"log"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// testCA issues certificates for a test's servers and clients.
type testCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
}

func newTestCA(t *testing.T, name string) *testCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	template := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: name},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, template, template, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return &testCA{cert: cert, key: key}
}

// issue writes a certificate for 127.0.0.1 (server and client use) and its key into dir,
// and returns the pair and the files' paths.
func (ca *testCA) issue(t *testing.T, dir, name string) (tls.Certificate, string, string) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	template := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()),
		Subject:      pkix.Name{CommonName: name},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		IPAddresses:  []net.IP{net.ParseIP("127.0.0.1")},
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, template, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	certPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	keyPEM := pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER})
	certFile, keyFile := filepath.Join(dir, name+".pem"), filepath.Join(dir, name+".key")
	writeFile(t, certFile, certPEM)
	writeFile(t, keyFile, keyPEM)
	pair, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		t.Fatal(err)
	}
	return pair, certFile, keyFile
}

func writeFile(t *testing.T, path string, data []byte) {
	t.Helper()
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
}

// handshakeCutter takes each connection, reads the client's first TLS message and closes
// the connection (reset: with a TCP reset), as a flaky etcd or load balancer would.
func handshakeCutter(t *testing.T, reset bool) string {
	t.Helper()
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { listener.Close() })
	go func() {
		for {
			conn, err := listener.Accept()
			if err != nil {
				return
			}
			_ = conn.SetReadDeadline(time.Now().Add(5 * time.Second))
			_, _ = conn.Read(make([]byte, 65536))
			if reset {
				_ = conn.(*net.TCPConn).SetLinger(0)
			}
			conn.Close()
		}
	}()
	return "https://" + listener.Addr().String()
}

// How soon a registering plugin tries again rests on telling these apart: what etcd
// turned away (its alert for a client certificate it does not trust or did not get, a
// certificate of etcd's the plugin does not trust, a port that does not speak TLS) from
// a handshake cut off under the plugin (an etcd that does not answer).
func TestTLSFailuresTellARefusalFromAHandshakeCutOff(t *testing.T) {
	dir := t.TempDir()
	ca, stranger := newTestCA(t, "etcd-ca"), newTestCA(t, "stranger-ca")
	caFile := filepath.Join(dir, "ca.pem")
	writeFile(t, caFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ca.cert.Raw}))
	serverPair, _, _ := ca.issue(t, dir, "etcd")
	_, clientCert, clientKey := ca.issue(t, dir, "client")
	_, strangerCert, strangerKey := stranger.issue(t, dir, "stranger")
	roots := x509.NewCertPool()
	roots.AddCert(ca.cert)

	// etcd as run with --client-cert-auth: a client certificate from its CA required.
	etcd := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		_, _ = io.WriteString(w, `{"header":{}}`)
	}))
	etcd.TLS = &tls.Config{Certificates: []tls.Certificate{serverPair}, ClientCAs: roots,
		ClientAuth: tls.RequireAndVerifyClientCert, MinVersion: tls.VersionTLS12}
	etcd.Config.ErrorLog = log.New(io.Discard, "", 0) // the handshakes it refuses, on purpose
	etcd.StartTLS()
	defer etcd.Close()
	plain := httptest.NewServer(http.NotFoundHandler())
	defer plain.Close()
	https := func(server *httptest.Server) string { return strings.Replace(server.URL, "http://", "https://", 1) }

	post := func(base string, settings map[string]string) error {
		parsed, _ := url.Parse(base)
		g, err := etcdGatewayFrom(parsed, registryConfigFromEnv(func(k string) string { return settings[k] }),
			5*time.Second, func(string, ...any) {})
		if err != nil {
			t.Fatal(err)
		}
		_, err = g.post("/v3/kv/range", map[string]any{})
		return err
	}
	trusted := map[string]string{EnvRegisterEtcdCAFile: caFile, EnvRegisterEtcdCertFile: clientCert, EnvRegisterEtcdKeyFile: clientKey}
	if err := post(etcd.URL, trusted); err != nil {
		t.Fatalf("a client etcd trusts: %v", err)
	}
	refusals := []struct {
		what, base string
		settings   map[string]string
		saying     string
	}{
		{"a client certificate etcd does not trust", etcd.URL,
			map[string]string{EnvRegisterEtcdCAFile: caFile, EnvRegisterEtcdCertFile: strangerCert, EnvRegisterEtcdKeyFile: strangerKey},
			"TLS handshake"},
		{"no client certificate", etcd.URL, map[string]string{EnvRegisterEtcdCAFile: caFile}, "TLS handshake"},
		{"a certificate of etcd's the plugin does not trust", etcd.URL,
			map[string]string{EnvRegisterEtcdCertFile: clientCert, EnvRegisterEtcdKeyFile: clientKey}, "cannot verify"},
		{"a port that does not speak TLS", https(plain), map[string]string{}, "TLS handshake"},
	}
	for _, c := range refusals {
		for range 10 { // with TLS 1.3 etcd's alert comes after the client's handshake: every time
			err := post(c.base, c.settings)
			var refused *etcdRefused
			if !errors.As(err, &refused) || !strings.Contains(err.Error(), c.saying) {
				t.Fatalf("%s: %v, want a refusal saying %q", c.what, err, c.saying)
			}
		}
	}
	for _, reset := range []bool{false, true} {
		cutter := handshakeCutter(t, reset)
		for range 3 {
			err := post(cutter, trusted)
			var refused *etcdRefused
			if err == nil || errors.As(err, &refused) {
				t.Fatalf("a handshake cut off (reset %v): %v, want an etcd that does not answer", reset, err)
			}
		}
	}
}
