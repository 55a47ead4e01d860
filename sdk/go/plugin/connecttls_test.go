package plugin

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// Files connect cannot use are refused before it dials, in one line naming the flag (or
// the variable) and the file, never a byte of a key (before, connect had no such flags).
func TestConnectRefusesTLSFilesItCannotUseByName(t *testing.T) {
	dir := t.TempDir()
	ca := newTestCA(t, "client CA")
	_, certFile, keyFile := ca.issue(t, dir, "plugin")
	_, _, otherKey := ca.issue(t, dir, "other")
	keyPEM, err := os.ReadFile(keyFile)
	if err != nil {
		t.Fatal(err)
	}
	notPEM := filepath.Join(dir, "not.pem")
	writeFile(t, notPEM, []byte("not PEM\n"))
	url := "wss://127.0.0.1:9/v1/plugins/connect"
	cases := []struct {
		args []string
		env  map[string]string
		want string
	}{
		{[]string{"-cert-file", certFile}, nil, "connect: --cert-file and --key-file go together"},
		{nil, map[string]string{EnvClientKey: keyFile}, "connect: --cert-file and --key-file go together"},
		{[]string{"-ca-file", notPEM}, nil, "connect: --ca-file: " + notPEM + " holds no PEM certificate"},
		{nil, map[string]string{EnvGatewayCA: dir + "/none.pem"},
			"connect: LINCHKIT_PLUGIN_GATEWAY_CA: cannot read " + dir + "/none.pem: no such file or directory"},
		{[]string{"-cert-file", certFile, "-key-file", dir}, nil,
			"connect: --key-file: cannot read " + dir + ": is a directory"},
		{[]string{"-cert-file", certFile, "-key-file", certFile}, nil,
			"connect: --key-file: " + certFile + " holds no unencrypted PEM private key"},
		{[]string{"-cert-file", notPEM, "-key-file", keyFile}, nil,
			"connect: --cert-file: " + notPEM + " holds no PEM certificate"},
		{[]string{"-cert-file", certFile, "-key-file", otherKey}, nil,
			"connect: --key-file: " + otherKey + " is not the private key of the certificate in --cert-file"},
		{[]string{"-cert-file", certFile}, map[string]string{EnvClientKey: string(keyPEM)},
			"connect: LINCHKIT_PLUGIN_CLIENT_KEY: the value is PEM text, not a file's path: " +
				"write it to a file and give that file's path"},
	}
	for _, c := range cases {
		env := Environment{Args: append([]string{"connect", "-url", url}, c.args...),
			Getenv: func(name string) string { return c.env[name] }, Stdin: strings.NewReader(""), Stdout: io.Discard}
		// Bounded: a plugin that took no notice of a file would dial until cancelled.
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		err := testPlugin().Run(ctx, env)
		cancel()
		if err == nil || err.Error() != c.want {
			t.Errorf("%v %v:\n got %v\nwant %s", c.args, c.env, err, c.want)
		}
		if err != nil && strings.Contains(err.Error(), "PRIVATE KEY") {
			t.Errorf("a key shows: %v", err)
		}
	}
	// Files on a ws:// URL would not be used: the plugin would believe it logs in with one.
	err = testPlugin().Run(context.Background(), Environment{
		Args:   []string{"connect", "-url", "ws://127.0.0.1:9/", "-ca-file", certFile},
		Getenv: func(string) string { return "" }, Stdin: strings.NewReader(""), Stdout: io.Discard})
	if err == nil || err.Error() != "connect: --ca-file, --cert-file and --key-file need a wss:// --url" {
		t.Errorf("ws://: %v", err)
	}
}

// A gateway that requires a client certificate is dialled with the one given, and says
// why it refuses a dial without: one line, the URL once, masked (before, the line held the
// URL twice, the second time in net/http's "Get ..." under the dial's own words).
func TestConnectPresentsItsCertificateAndSaysWhyAGatewayRefusedIt(t *testing.T) {
	dir := t.TempDir()
	serverCA, clientCA := newTestCA(t, "server CA"), newTestCA(t, "client CA")
	serverPair, _, _ := serverCA.issue(t, dir, "gateway")
	_, certFile, keyFile := clientCA.issue(t, dir, "plugin")
	caFile := filepath.Join(dir, "server-ca.pem")
	writeFile(t, caFile, pemOf(serverCA.cert))
	clients := x509.NewCertPool()
	clients.AddCert(clientCA.cert)
	upgraded := make(chan string, 1)
	gateway := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case upgraded <- r.TLS.PeerCertificates[0].Subject.CommonName:
		default:
		}
		w.WriteHeader(http.StatusServiceUnavailable)
	}))
	gateway.TLS = &tls.Config{Certificates: []tls.Certificate{serverPair}, ClientCAs: clients,
		ClientAuth: tls.RequireAndVerifyClientCert}
	gateway.StartTLS()
	defer gateway.Close()
	url := "wss" + strings.TrimPrefix(gateway.URL, "https") + "/v1/plugins/connect?token=" + collectorSecret

	out := capture(t)
	ctx, cancel := context.WithTimeout(context.Background(), 1500*time.Millisecond)
	defer cancel()
	env := Environment{Args: []string{"connect", "-url", url, "-ca-file", caFile},
		Getenv: func(string) string { return "" }, Stdin: strings.NewReader(""), Stdout: io.Discard}
	if err := testPlugin().Run(ctx, env); err != nil {
		t.Fatal(err)
	}
	line := lines(out)[0]
	masked := maskedURL(url)
	if !strings.Contains(line, "cannot reach the gateway at "+masked+": TLS: the gateway requires a client certificate") ||
		strings.Count(line, strings.TrimPrefix(gateway.URL, "https://")) != 1 || strings.Contains(line, collectorSecret) {
		t.Errorf("want one line naming the gateway once and saying why: %s", line)
	}

	ctx, cancel = context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	env.Args = []string{"connect", "-url", url, "-ca-file", caFile, "-cert-file", certFile, "-key-file", keyFile}
	go func() { _ = testPlugin().Run(ctx, env) }()
	select {
	case name := <-upgraded:
		if name != "plugin" {
			t.Errorf("presented %q", name)
		}
	case <-ctx.Done():
		t.Fatal("the plugin's certificate never reached the gateway")
	}
}

// The gateway's own certificate not verifying is said in one line, the URL once.
func TestAGatewayCertificateThatDoesNotVerifyIsOneLine(t *testing.T) {
	gateway := httptest.NewTLSServer(http.NotFoundHandler())
	defer gateway.Close()
	url := "wss" + strings.TrimPrefix(gateway.URL, "https") + "/v1/plugins/connect"
	out := capture(t)
	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()
	env := Environment{Args: []string{"connect", "-url", url}, Getenv: func(string) string { return "" },
		Stdin: strings.NewReader(""), Stdout: io.Discard}
	if err := testPlugin().Run(ctx, env); err != nil {
		t.Fatal(err)
	}
	line := lines(out)[0]
	want := "cannot reach the gateway at " + url + ": TLS: the gateway's certificate does not verify: " +
		"x509: certificate signed by unknown authority; retrying"
	if !strings.Contains(line, want) || strings.Count(line, strings.TrimPrefix(gateway.URL, "https://")) != 1 {
		t.Errorf("got  %s\nwant %s", line, want)
	}
}

func pemOf(cert *x509.Certificate) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Raw})
}
