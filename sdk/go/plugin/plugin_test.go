package plugin

import (
	"bufio"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math/big"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/linchkit/dispatcher/sdk/go/internal/pluginpb"
)

// testPlugin has one method per way a method can end.
func testPlugin() *Plugin {
	p := New("test", "0.1.0")
	p.Method("echo", "", func(_ context.Context, call *Call) (any, error) { return call.Params, nil })
	p.Method("typed", "", func(context.Context, *Call) (any, error) {
		return nil, &Error{Type: "Overdrawn", Message: "balance is 100", Retryable: true,
			Details: map[string]any{"balance": 100}, RetryAfter: 1.5}
	})
	p.Method("wrapped", "", func(context.Context, *Call) (any, error) {
		return nil, fmt.Errorf("while paying: %w", NewError("Overdrawn", "balance is 100"))
	})
	p.Method("plain", "", func(context.Context, *Call) (any, error) { return nil, errors.New("disk full") })
	p.Method("panics", "", func(context.Context, *Call) (any, error) { panic("boom") })
	p.Method("waits", "", func(ctx context.Context, _ *Call) (any, error) {
		<-ctx.Done()
		return nil, ctx.Err()
	})
	p.Method("needs", "", func(_ context.Context, call *Call) (any, error) {
		var params struct {
			N int `json:"n" plugin:"required"`
		}
		if err := call.Bind(&params); err != nil {
			return nil, err
		}
		return params.N, nil
	})
	p.StreamingMethod("count", "", func(_ context.Context, _ *Call, send func(any) error) error {
		for i := range 3 {
			if err := send(map[string]int{"i": i}); err != nil {
				return err
			}
		}
		return nil
	})
	p.Method("emit", "", func(_ context.Context, call *Call) (any, error) { return true, call.Emit("hello", call.Params) })
	p.OnEvent("ping", func(_ context.Context, data json.RawMessage) { _ = p.Emit("pong", data) })
	return p
}

func call(t *testing.T, p *Plugin, method, params string, deadlineMs int64) *pluginpb.CallReply {
	t.Helper()
	return p.invoke(context.Background(), &pluginpb.CallRequest{
		V: 1, Method: method, ParamsJson: []byte(params),
		Context: &pluginpb.CallContext{RequestId: "r1", DeadlineMs: deadlineMs},
	})
}

func TestErrorMapping(t *testing.T) {
	p := testPlugin()
	cases := []struct {
		method, params string
		want           *pluginpb.Error
	}{
		{"nope", `{}`, &pluginpb.Error{Type: "method_not_found",
			Message: `plugin test has no method "nope"; it has: count, echo, emit, needs, panics, plain, typed, waits, wrapped`}},
		{"typed", `{}`, &pluginpb.Error{Type: "Overdrawn", Message: "balance is 100", Retryable: true,
			DetailsJson: []byte(`{"balance":100}`), RetryAfter: 1.5}},
		{"wrapped", `{}`, &pluginpb.Error{Type: "Overdrawn", Message: "balance is 100"}},
		{"plain", `{}`, &pluginpb.Error{Type: "PluginError", Message: "disk full"}},
		{"panics", `{}`, &pluginpb.Error{Type: "PluginError", Message: "method panicked: boom"}},
		{"needs", `{}`, &pluginpb.Error{Type: "invalid_params", Message: `params of needs: missing required field "n"`}},
		{"needs", `{"n": "three"}`, &pluginpb.Error{Type: "invalid_params", Message: "needs: 'n' must be an integer, got a string"}},
		{"needs", `{"n": 2.5}`, &pluginpb.Error{Type: "invalid_params", Message: "needs: 'n' must be an integer, got 2.5"}},
		// Positional params fill the fields in order (docs/protocol.md); no Go type in a message.
		{"needs", `["four"]`, &pluginpb.Error{Type: "invalid_params", Message: "needs: 'n' must be an integer, got a string"}},
		{"needs", `[1, 2]`, &pluginpb.Error{Type: "invalid_params", Message: "needs takes at most 1 positional params, got 2"}},
		{"needs", `"four"`, &pluginpb.Error{Type: "invalid_params", Message: "needs takes an object of named params, got a string"}},
		{"needs", `4`, &pluginpb.Error{Type: "invalid_params", Message: "needs takes an object of named params, got a number"}},
		{"needs", ` true`, &pluginpb.Error{Type: "invalid_params", Message: "needs takes an object of named params, got a boolean"}},
		// null or none: decoded as today (nothing set), so the required field is missing.
		{"needs", `null`, &pluginpb.Error{Type: "invalid_params", Message: `params of needs: missing required field "n"`}},
		{"needs", ``, &pluginpb.Error{Type: "invalid_params", Message: `params of needs: missing required field "n"`}},
		{"echo", `{not json`, &pluginpb.Error{Type: "invalid_params", Message: "params of echo are not valid JSON"}},
	}
	for _, c := range cases {
		reply := call(t, p, c.method, c.params, 0)
		if reply.Ok {
			t.Fatalf("%s(%s): ok, want an error", c.method, c.params)
		}
		got := reply.Error
		if got.Type != c.want.Type || got.Message != c.want.Message || got.Retryable != c.want.Retryable ||
			string(got.DetailsJson) != string(c.want.DetailsJson) || got.RetryAfter != c.want.RetryAfter {
			t.Errorf("%s(%s):\n got %v\nwant %v", c.method, c.params, got, c.want)
		}
	}
}

func TestDeadlineFromContextBecomesDeadlineExceeded(t *testing.T) {
	start := time.Now()
	reply := call(t, testPlugin(), "waits", `{}`, 50)
	if reply.Ok || reply.Error.Type != "deadline_exceeded" || !reply.Error.Retryable {
		t.Fatalf("got %v, want a retryable deadline_exceeded", reply)
	}
	if elapsed := time.Since(start); elapsed > 2*time.Second {
		t.Fatalf("gave up after %v, want about 50ms", elapsed)
	}
}

func TestResults(t *testing.T) {
	p := testPlugin()
	for _, c := range []struct{ method, params, want string }{
		{"echo", `{"a": [1, 2.5, "x"], "big": 12345678901234567890}`, `{"a": [1, 2.5, "x"], "big": 12345678901234567890}`},
		{"echo", ``, `null`},
		{"needs", `{"n": 3}`, `3`},
		{"needs", `[4]`, `4`},                        // positional
		{"count", `{}`, `[{"i":0},{"i":1},{"i":2}]`}, // a streaming method called once
	} {
		reply := call(t, p, c.method, c.params, 0)
		if !reply.Ok || string(reply.ResultJson) != c.want {
			t.Errorf("%s(%s): got %v, want %s", c.method, c.params, reply, c.want)
		}
	}
	if reply := call(t, p, "echo", `1`, 0); reply.Error != nil {
		t.Errorf("an envelope of version 1 was refused: %v", reply)
	}
	reply := p.invoke(context.Background(), &pluginpb.CallRequest{V: 2, Method: "echo"})
	if reply.Ok || reply.Error.Type != "provider_error" {
		t.Errorf("envelope version 2: got %v, want provider_error", reply)
	}
}

func TestNegotiateVersion(t *testing.T) {
	for offered, want := range map[string]int{"": 1, "1": 1, "1,2": 1, " 2 , 1 ": 1} {
		if got, err := negotiateVersion(offered); err != nil || got != want {
			t.Errorf("negotiateVersion(%q) = %d, %v; want %d", offered, got, err, want)
		}
	}
	for _, offered := range []string{"2", "2,3", "one"} {
		if _, err := negotiateVersion(offered); err == nil {
			t.Errorf("negotiateVersion(%q): no error, want one", offered)
		}
	}
}

func TestRunWithoutTheHandshakeEnvironmentRefuses(t *testing.T) {
	env := Environment{Getenv: func(string) string { return "" }, Stdin: strings.NewReader(""), Stdout: io.Discard}
	if err := testPlugin().Run(context.Background(), env); !errors.Is(err, ErrNotLaunchedByHost) {
		t.Fatalf("got %v, want ErrNotLaunchedByHost", err)
	}
}

// runWith runs the test plugin with args and an empty environment, to its end: what it
// wrote on stdout and the error it returned (the process's exit 1).
func runWith(args ...string) (string, error) {
	var out strings.Builder
	env := Environment{Args: args, Getenv: func(string) string { return "" }, Stdin: strings.NewReader(""), Stdout: &out}
	err := testPlugin().Run(context.Background(), env)
	return out.String(), err
}

func TestServeHelpNamesTheEnvironmentAndAMistakeSaysWhereToLook(t *testing.T) {
	out, err := runWith("serve", "-help")
	if err != nil {
		t.Fatalf("serve -help: %v, want no error (exit 0)", err)
	}
	for _, name := range []string{"-address", EnvToken, EnvRegisterEtcd, EnvAdvertise, EnvLeaveDelay, EnvStopGraceMs, EnvStopHooksMs} {
		if !strings.Contains(out, name) {
			t.Errorf("serve -help does not name %s:\n%s", name, out)
		}
	}
	for _, flag := range []string{"-register-etcd ", "-register-prefix ", "-register-etcd-ca-file ", "-register-etcd-user ",
		EnvRegisterEtcdPassword} {
		if !strings.Contains(out, flag) {
			t.Errorf("serve -help does not name %s:\n%s", flag, out)
		}
	}
	if strings.Contains(out, "-"+passwordFlag) {
		t.Errorf("serve -help shows -%s, a flag there only to be refused:\n%s", passwordFlag, out)
	}
	if _, err := runWith("serve", "-port", "1"); err == nil || !strings.Contains(err.Error(), "serve -help") {
		t.Errorf("serve -port 1: %v, want an error pointing at serve -help", err)
	}
}

// A refusal names a flag or a place, never the text: a command line can carry a secret
// where an operator slipped. Before, a stray argument was ignored (and every flag after it
// with it: the plugin served on the default address), and -websocket=VALUE was quoted.
func TestACommandLineMistakeIsRefusedWithoutItsText(t *testing.T) {
	const secret = "hunter2-5f1d"
	for _, test := range []struct {
		args []string
		want string
	}{
		{[]string{"serve", "--register-etcd-pasword=" + secret}, "serve: flag provided but not defined: -register-etcd-pasword"},
		{[]string{"serve", secret, "-address", "127.0.0.1:0"}, "serve: unexpected argument #2 (its text is not shown)"},
		{[]string{"serve", "-address", "127.0.0.1:0", secret}, "serve: unexpected argument #4 (its text is not shown)"},
		{[]string{"serve", "-websocket=" + secret}, "serve: -websocket takes true or false (its value is not shown)"},
		{[]string{"connect", "-url", "ws://127.0.0.1:9/", secret}, "connect: unexpected argument #4 (its text is not shown)"},
		{[]string{"connect", "--token=" + secret}, "connect: flag provided but not defined: -token"},
		// One dash: by its place. Before, "-hunter2-5f1d" was named whole, as a flag.
		{[]string{"connect", "-url", "ws://127.0.0.1:9/", "-token=" + secret},
			"connect: flag provided but not defined (argument #4, its text is not shown)"},
		{[]string{"serve", "-" + secret}, "serve: flag provided but not defined (argument #2, its text is not shown)"},
		{[]string{"serve", "---token=" + secret}, "serve: bad flag syntax (its text is not shown)"},
	} {
		// Bounded: before, a stray argument was served on.
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		var stdout strings.Builder
		err := testPlugin().Run(ctx, Environment{Args: test.args, Getenv: func(string) string { return "" },
			Stdin: strings.NewReader(""), Stdout: &stdout})
		cancel()
		out := stdout.String()
		if err == nil || !strings.HasPrefix(err.Error(), test.want) || strings.Contains(err.Error(), secret) {
			t.Errorf("%v: %v, want an error starting %q, without the text refused", test.args, err, test.want)
		}
		if out != "" {
			t.Errorf("%v: wrote %q, want no handshake line: it must not serve", test.args, out)
		}
	}
}

// A password on the command line shows in the process list: refused before serving,
// naming the variable to use, never repeating it, however it was written.
func TestServeRefusesAPasswordOnTheCommandLine(t *testing.T) {
	const secret = "SECRET-pw-77"
	for _, args := range [][]string{
		{"serve", "-register-etcd-password", secret},
		{"serve", "--register-etcd-password=" + secret, "-address", "127.0.0.1:0"},
		{"serve", "-address", "127.0.0.1:0", "--register-etcd", "http://127.0.0.1:2379", "--register-etcd-password", secret},
	} {
		out, err := runWith(args...)
		if err == nil || !strings.Contains(err.Error(), EnvRegisterEtcdPassword) || strings.Contains(err.Error(), secret) {
			t.Errorf("%v: %v, want a refusal naming %s and not quoting the password", args, err, EnvRegisterEtcdPassword)
		}
		if out != "" {
			t.Errorf("%v: wrote %q, want no handshake line: it must not serve", args, out)
		}
	}
}

// started is a plugin running in this process, as its host would see it.
type started struct {
	fields []string // the handshake line's
	stdin  *io.PipeWriter
	done   chan error
}

func start(t *testing.T, args []string, vars map[string]string) *started {
	t.Helper()
	return startPlugin(t, testPlugin(), args, vars)
}

func startPlugin(t *testing.T, p *Plugin, args []string, vars map[string]string) *started {
	t.Helper()
	stdinReader, stdinWriter := io.Pipe()
	stdoutReader, stdoutWriter := io.Pipe()
	env := Environment{Args: args, Getenv: func(k string) string { return vars[k] }, Stdin: stdinReader, Stdout: stdoutWriter}
	ctx, cancel := context.WithCancel(context.Background())
	s := &started{stdin: stdinWriter, done: make(chan error, 1)}
	go func() { s.done <- p.Run(ctx, env) }()
	t.Cleanup(func() {
		cancel()
		stdinWriter.Close()
		<-s.done
	})
	line, err := bufio.NewReader(stdoutReader).ReadString('\n')
	if err != nil {
		t.Fatalf("no handshake line: %v", err)
	}
	go func() { _, _ = io.Copy(io.Discard, stdoutReader) }()
	s.fields = strings.Split(strings.TrimSuffix(line, "\n"), "|")
	if len(s.fields) != 6 {
		t.Fatalf("handshake line %q: want 6 fields", line)
	}
	return s
}

func dial(t *testing.T, s *started, creds credentials.TransportCredentials) *grpc.ClientConn {
	t.Helper()
	target := s.fields[3]
	if s.fields[2] == "unix" {
		target = "unix:" + target
	}
	conn, err := grpc.NewClient(target, grpc.WithTransportCredentials(creds))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

func healthOf(t *testing.T, conn *grpc.ClientConn, service string) healthpb.HealthCheckResponse_ServingStatus {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	reply, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{Service: service})
	if err != nil {
		t.Fatalf("health %q: %v", service, err)
	}
	return reply.Status
}

func TestServiceMode(t *testing.T) {
	s := start(t, []string{"serve", "--address", "127.0.0.1:0"}, nil)
	if got := strings.Join(s.fields[:3], "|"); got != "1|1|tcp" || s.fields[4] != "grpc" || s.fields[5] != "" ||
		!strings.HasPrefix(s.fields[3], "127.0.0.1:") {
		t.Fatalf("handshake fields %q", s.fields)
	}
	conn := dial(t, s, insecure.NewCredentials())
	for _, service := range []string{"", ServiceName} {
		if got := healthOf(t, conn, service); got != healthpb.HealthCheckResponse_SERVING {
			t.Errorf("health %q = %v, want SERVING from the start", service, got)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	client := pluginpb.NewPluginServiceClient(conn)
	info, err := client.Describe(ctx, &pluginpb.DescribeRequest{})
	if err != nil || info.Id != "test" || info.Runtime != "go" || info.ProtocolVersion != 1 {
		t.Fatalf("Describe = %v, %v", info, err)
	}

	// Events: one emitted before the host opens the stream still arrives, and ping → pong.
	if reply, err := client.Call(ctx, &pluginpb.CallRequest{V: 1, Method: "emit", ParamsJson: []byte(`{"x":1}`)}); err != nil || !reply.Ok {
		t.Fatalf("emit: %v, %v", reply, err)
	}
	events, err := client.Events(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := events.Send(&pluginpb.HostEvent{Name: "ping", DataJson: []byte(`[7]`)}); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{`hello {"x":1}`, `pong [7]`} {
		event, err := events.Recv()
		if err != nil {
			t.Fatal(err)
		}
		if got := event.Name + " " + string(event.DataJson); got != want {
			t.Errorf("event %q, want %q", got, want)
		}
	}

	// A unary method streamed gives one chunk; an unknown one gives one error item.
	for method, want := range map[string]string{"echo": "chunk", "nope": "error:method_not_found"} {
		stream, err := client.CallStream(ctx, &pluginpb.CallRequest{V: 1, Method: method, ParamsJson: []byte(`5`)})
		if err != nil {
			t.Fatal(err)
		}
		var items []string
		for {
			item, err := stream.Recv()
			if err == io.EOF {
				break
			}
			if err != nil {
				t.Fatal(err)
			}
			if e := item.GetError(); e != nil {
				items = append(items, "error:"+e.Type)
			} else {
				items = append(items, "chunk")
			}
		}
		if got := strings.Join(items, ","); got != want {
			t.Errorf("CallStream %s: items %q, want %q", method, got, want)
		}
	}
}

// hostCert makes a certificate as a host would for AutoMTLS.
func hostCert(t *testing.T) (tls.Certificate, string) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	template := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "host"},
		NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour),
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, template, template, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key},
		string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}))
}

func TestSubprocessModeWithAutoMTLS(t *testing.T) {
	clientCert, clientPEM := hostCert(t)
	s := start(t, nil, map[string]string{
		EnvMagicCookie: MagicCookieValue, EnvProtocolVersions: "1,2", EnvNetwork: "unix",
		EnvSocketDir: t.TempDir(), EnvClientCert: clientPEM,
	})
	if s.fields[0] != "1" || s.fields[1] != "1" || s.fields[2] != "unix" || s.fields[4] != "grpc" {
		t.Fatalf("handshake fields %q", s.fields)
	}
	der, err := base64.RawStdEncoding.DecodeString(s.fields[5])
	if err != nil {
		t.Fatalf("SERVER-CERT is not base64 without padding: %v", err)
	}
	serverCert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	if serverCert.DNSNames[0] != "localhost" || serverCert.PublicKeyAlgorithm != x509.ECDSA {
		t.Fatalf("server cert: SAN %v, key %v", serverCert.DNSNames, serverCert.PublicKeyAlgorithm)
	}
	roots := x509.NewCertPool()
	roots.AddCert(serverCert)

	conn := dial(t, s, credentials.NewTLS(&tls.Config{RootCAs: roots, ServerName: "localhost", Certificates: []tls.Certificate{clientCert}}))
	if got := healthOf(t, conn, ServiceName); got != healthpb.HealthCheckResponse_NOT_SERVING {
		t.Errorf("health before Start = %v, want NOT_SERVING", got)
	}
	client := pluginpb.NewPluginServiceClient(conn)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := client.Start(ctx, &pluginpb.LifecycleRequest{}); err != nil {
		t.Fatal(err)
	}
	if got := healthOf(t, conn, ServiceName); got != healthpb.HealthCheckResponse_SERVING {
		t.Errorf("health after Start = %v, want SERVING", got)
	}

	// Another client certificate, or none, is refused.
	otherCert, _ := hostCert(t)
	for name, certs := range map[string][]tls.Certificate{"none": nil, "another": {otherCert}} {
		stranger := dial(t, s, credentials.NewTLS(&tls.Config{RootCAs: roots, ServerName: "localhost", Certificates: certs}))
		shortCtx, shortCancel := context.WithTimeout(context.Background(), 2*time.Second)
		if _, err := pluginpb.NewPluginServiceClient(stranger).Describe(shortCtx, &pluginpb.DescribeRequest{}); err == nil {
			t.Errorf("client certificate %s: accepted", name)
		}
		shortCancel()
	}

	// The host is gone: its end of stdin closes, and the plugin stops by itself.
	s.stdin.Close()
	select {
	case err := <-s.done:
		if err != nil {
			t.Fatalf("Run after stdin EOF: %v", err)
		}
		s.done <- nil // for the cleanup
	case <-time.After(10 * time.Second):
		t.Fatal("the plugin did not stop when its stdin closed")
	}
}

func TestServeAddressesAreHostAndPort(t *testing.T) {
	for address, want := range map[string]bool{
		"127.0.0.1:0": true, "localhost:50051": true, "[::1]:0": true, "127.0.0.1:65535": true,
		"": false, ":50051": false, "127.0.0.1:": false, "127.0.0.1:65536": false,
		"127.0.0.1:-1": false, "127.0.0.1:http": false, "::1:50051": false, "not-an-address": false,
	} {
		if got := isHostPort(address); got != want {
			t.Errorf("isHostPort(%q) = %v, want %v", address, got, want)
		}
	}
}

func TestGatewayURLsNameAHost(t *testing.T) {
	good := []string{"ws://127.0.0.1:8080/v1/plugins/connect", "wss://gw.example/v1/plugins/connect",
		"http://[::1]:8080/v1/plugins/connect"}
	bad := []string{"not-a-url", "ftp://127.0.0.1/x", "ws://", "ws//127.0.0.1:8080/x", "ws://127.0.0.1:99999/x", ""}
	for _, url := range good {
		if !isGatewayURL(url) {
			t.Errorf("isGatewayURL(%q) = false, want true", url)
		}
	}
	for _, url := range bad {
		if isGatewayURL(url) {
			t.Errorf("isGatewayURL(%q) = true, want false", url)
		}
	}
}

func TestConnectHelpGoesToStdoutWithStatusZero(t *testing.T) {
	out, err := runWith("connect", "-help")
	if err != nil {
		t.Fatalf("connect -help: %v, want no error (exit 0)", err)
	}
	for _, name := range []string{"-url", "-config", EnvToken} {
		if !strings.Contains(out, name) {
			t.Errorf("connect -help does not name %s:\n%s", name, out)
		}
	}
}
