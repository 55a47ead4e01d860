package plugin

import (
	"bufio"
	"bytes"
	"compress/flate"
	"context"
	"encoding/binary"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
)

const serveToken = "s3rve-t0ken-for-the-tests"

// servedPlugin runs p as `serve -websocket` on a free port with the environment env (and
// arguments extra), and returns its ws:// URL, its stop (SIGTERM) and a channel that
// receives what Run returned.
func servedPlugin(t *testing.T, p *Plugin, env map[string]string, extra ...string) (string, context.CancelFunc, <-chan error) {
	t.Helper()
	ctx, stop := context.WithCancel(context.Background())
	t.Cleanup(stop)
	out, in := io.Pipe()
	args := append([]string{"serve", "-websocket", "-address", "127.0.0.1:0"}, extra...)
	ended := make(chan error, 1)
	go func() {
		ended <- p.Run(ctx, Environment{Args: args, Getenv: func(name string) string { return env[name] },
			Stdin: strings.NewReader(""), Stdout: in})
		in.Close()
	}()
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil {
		t.Fatalf("serve -websocket printed no line: %v (Run: %v)", err, <-ended)
	}
	go func() { _, _ = io.Copy(io.Discard, out) }()
	parts := strings.Split(strings.TrimSpace(line), "|")
	if len(parts) != 6 || parts[0] != "1" || parts[1] != "1" || parts[2] != "tcp" || parts[4] != "websocket" || parts[5] != "" {
		t.Fatalf("the handshake line %q, want 1|1|tcp|HOST:PORT|websocket|", line)
	}
	return "ws://" + parts[3] + "/", stop, ended
}

func dialServed(t *testing.T, url string, header http.Header) *websocket.Conn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	conn, _, err := websocket.Dial(ctx, url, &websocket.DialOptions{HTTPHeader: header})
	if err != nil {
		t.Fatalf("dialling the served plugin: %v", err)
	}
	t.Cleanup(func() { conn.CloseNow() })
	conn.SetReadLimit(64 << 20)
	return conn
}

func bearer(token string) http.Header {
	return http.Header{"Authorization": {"Bearer " + token}}
}

func waitRunEnded(t *testing.T, ended <-chan error, within time.Duration) {
	t.Helper()
	select {
	case err := <-ended:
		if err != nil {
			t.Fatalf("serve -websocket, stopped: %v, want nil", err)
		}
	case <-time.After(within):
		t.Fatalf("serve -websocket still runs %v after its stop", within)
	}
}

// The dispatcher dials a Go plugin (`provider: websocket`, `url: ws://…`): its hello names
// the plugin and its methods, and calls, streams, events and health go over the
// connection; the init and start hooks ran with --config before it served.
func TestServeWebSocketServesTheBinding(t *testing.T) {
	p := testPlugin()
	var initConfig json.RawMessage
	started := false
	p.OnInit(func(_ context.Context, config json.RawMessage) error { initConfig = config; return nil })
	p.OnStart(func(context.Context) error { started = true; return nil })
	p.OnEvent("ping", func(_ context.Context, data json.RawMessage) { _ = p.Emit("pong", data) })
	url, stop, ended := servedPlugin(t, p, nil, "-config", `{"region":"eu"}`)
	if string(initConfig) != `{"region":"eu"}` || !started {
		t.Fatalf("before serving: init got %s, start ran %t; want --config and true", initConfig, started)
	}
	host := dialServed(t, url, nil)
	hello := readFrame(t, host)
	if hello["type"] != "hello" || hello["id"] != "test" || hello["version"] != "0.1.0" || hello["runtime"] != "go" ||
		hello["protocol"] != 1.0 || hello["max_message_bytes"] != float64(maxMessageBytes) {
		t.Fatalf("the first frame: %v, want the plugin's hello", hello)
	}
	if methods, _ := json.Marshal(hello["methods"]); !strings.Contains(string(methods), `"echo"`) {
		t.Fatalf("the hello's methods: %s, want echo among them", methods)
	}
	if streaming, _ := json.Marshal(hello["streaming"]); string(streaming) != `["count"]` {
		t.Fatalf("the hello's streaming methods: %s, want [\"count\"]", streaming)
	}
	writeFrame(t, host, `{"type":"call","id":1,"request":{"v":1,"plugin":"test","method":"echo","params":{"x":1},"context":{}}}`)
	if f := readFrame(t, host); f["type"] != "response" || f["id"] != 1.0 || f["response"].(map[string]any)["ok"] != true {
		t.Fatalf("the echo: %v", f)
	}
	writeFrame(t, host, `{"type":"stream","id":2,"request":{"v":1,"plugin":"test","method":"count","params":null,"context":{}}}`)
	for i := range 3 {
		if f := readFrame(t, host); f["type"] != "chunk" || f["data"].(map[string]any)["i"] != float64(i) {
			t.Fatalf("chunk %d: %v", i, f)
		}
	}
	if f := readFrame(t, host); f["type"] != "response" || f["id"] != 2.0 {
		t.Fatalf("the stream's end: %v", f)
	}
	writeFrame(t, host, `{"type":"event","event":"ping","data":{"seq":7}}`)
	if f := readFrame(t, host); f["type"] != "event" || f["event"] != "pong" {
		t.Fatalf("the answer to a host event: %v, want the plugin's pong", f)
	}
	writeFrame(t, host, `{"type":"health","id":3}`)
	if f := readFrame(t, host); f["type"] != "health" || f["status"] != "serving" {
		t.Fatalf("health: %v", f)
	}
	stop()
	if f := readFrame(t, host); f["type"] != "goaway" {
		t.Fatalf("after the stop: %v, want goaway", f)
	}
	_ = host.Close(websocket.StatusNormalClosure, "")
	waitRunEnded(t, ended, 10*time.Second)
}

// With a token configured, an upgrade without it, with another, twice, or in another
// scheme is answered 401 before it upgrades, in an envelope that quotes nothing sent;
// with it (the scheme in any case) the plugin is served.
func TestServeWebSocketRefusesAWrongOrMissingTokenAtTheUpgrade(t *testing.T) {
	url, _, _ := servedPlugin(t, testPlugin(), map[string]string{EnvToken: serveToken})
	const wrong = "wr0ng-t0ken-that-must-not-echo"
	for name, header := range map[string]http.Header{
		"none":    nil,
		"wrong":   bearer(wrong),
		"prefix":  bearer(serveToken[:len(serveToken)-1]),
		"longer":  bearer(serveToken + "x"),
		"basic":   {"Authorization": {"Basic " + serveToken}},
		"twice":   {"Authorization": {"Bearer " + serveToken, "Bearer " + serveToken}},
		"bare":    {"Authorization": {serveToken}},
		"other":   {"X-Authorization": {"Bearer " + serveToken}},
		"spliced": bearer(wrong + " " + serveToken),
	} {
		t.Run(name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			conn, response, err := websocket.Dial(ctx, url, &websocket.DialOptions{HTTPHeader: header})
			if err == nil {
				conn.CloseNow()
				t.Fatal("upgraded without the token")
			}
			if response == nil || response.StatusCode != http.StatusUnauthorized {
				t.Fatalf("the answer: %v, %v; want 401", response, err)
			}
			if got := response.Header.Get("WWW-Authenticate"); got != "Bearer" {
				t.Errorf("WWW-Authenticate: %q, want Bearer", got)
			}
			body, _ := io.ReadAll(response.Body)
			var envelope struct {
				Ok    bool `json:"ok"`
				Error struct {
					Type string `json:"type"`
				} `json:"error"`
			}
			if json.Unmarshal(body, &envelope) != nil || envelope.Ok || envelope.Error.Type != TypeUnauthorized {
				t.Errorf("the body: %s, want an unauthorized envelope", body)
			}
			if bytes.Contains(body, []byte(serveToken[:10])) || bytes.Contains(body, []byte(wrong)) {
				t.Errorf("the refusal quotes a token: %s", body)
			}
		})
	}
	host := dialServed(t, url, http.Header{"Authorization": {"bearer  " + serveToken + " "}})
	if f := readFrame(t, host); f["type"] != "hello" {
		t.Fatalf("with the token: %v, want the hello", f)
	}
}

// A request that is no upgrade (a browser, a health probe of the wrong kind) is told
// what the plugin speaks: 426 with an envelope, the connection not upgraded.
func TestServeWebSocketAnswersARequestThatIsNoUpgrade426(t *testing.T) {
	url, _, _ := servedPlugin(t, testPlugin(), nil)
	response, err := http.Get("http" + strings.TrimPrefix(url, "ws"))
	if err != nil {
		t.Fatal(err)
	}
	defer response.Body.Close()
	body, _ := io.ReadAll(response.Body)
	if response.StatusCode != http.StatusUpgradeRequired || !strings.Contains(string(body), `"invalid_params"`) {
		t.Fatalf("a plain GET: %d %s, want 426 and an invalid_params envelope", response.StatusCode, body)
	}
}

// Without a token the plugin serves anyone, and says so once at start, naming the
// variables that would set one.
func TestServeWebSocketWithoutATokenWarns(t *testing.T) {
	out := capture(t)
	url, _, _ := servedPlugin(t, testPlugin(), nil)
	host := dialServed(t, url, nil)
	if f := readFrame(t, host); f["type"] != "hello" {
		t.Fatalf("without a token: %v, want the hello", f)
	}
	got := out.String()
	if !strings.Contains(got, "level=WARN") || !strings.Contains(got, EnvToken) || !strings.Contains(got, EnvTokenFile) {
		t.Fatalf("the start's lines: %q, want a warning naming %s and %s", got, EnvTokenFile, EnvToken)
	}
}

// rawUpgrade dials url's host by hand and upgrades, offering permessage-deflate when
// deflate says so; it returns the connection after the server's 101 and what the server
// agreed in Sec-WebSocket-Extensions. Nothing reads from it unless the test does.
func rawUpgrade(t *testing.T, url string, deflate bool) (net.Conn, *bufio.Reader, string) {
	t.Helper()
	address := strings.TrimSuffix(strings.TrimPrefix(url, "ws://"), "/")
	conn, err := net.DialTimeout("tcp", address, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	request := "GET / HTTP/1.1\r\nHost: " + address + "\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
		"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
	if deflate {
		request += "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
	}
	if _, err := io.WriteString(conn, request+"\r\n"); err != nil {
		t.Fatal(err)
	}
	_ = conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	reader := bufio.NewReader(conn)
	response, err := http.ReadResponse(reader, nil)
	if err != nil || response.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("the upgrade: %v, %v; want 101", response, err)
	}
	_ = conn.SetReadDeadline(time.Time{})
	return conn, reader, response.Header.Get("Sec-WebSocket-Extensions")
}

// maskedFrame is one frame from a client (masked, RFC 6455 §5.3) with a zero key, so the
// payload goes as it is; first is FIN, RSV1 (deflated) and the opcode.
func maskedFrame(first byte, payload []byte) []byte {
	frame := []byte{first, 0x80 | 127}
	frame = binary.BigEndian.AppendUint64(frame, uint64(len(payload)))
	frame = append(frame, 0, 0, 0, 0)
	return append(frame, payload...)
}

// The dispatcher offers permessage-deflate for a target with `compress: true`: the served
// plugin accepts it, and a message of 65 KB on the wire that inflates to 64 MiB is inflated
// up to the 8 MiB read limit only, then the connection closes 1009, as for a plain message
// over the limit; the plugin serves the next connection.
func TestServeWebSocketAcceptsDeflateAndClosesADeflatedBomb1009(t *testing.T) {
	url, _, _ := servedPlugin(t, testPlugin(), nil)
	conn, _, agreed := rawUpgrade(t, url, false)
	conn.Close()
	if agreed != "" {
		t.Fatalf("without an offer the plugin agreed to %q", agreed)
	}
	var bomb bytes.Buffer
	deflater, _ := flate.NewWriter(&bomb, flate.BestCompression)
	chunk := bytes.Repeat([]byte("x"), 1<<20)
	for range 64 {
		_, _ = deflater.Write(chunk)
	}
	_ = deflater.Flush()
	payload := bytes.TrimSuffix(bomb.Bytes(), []byte{0, 0, 0xff, 0xff})
	conn, reader, agreed := rawUpgrade(t, url, true)
	if !strings.HasPrefix(agreed, "permessage-deflate") {
		t.Fatalf("the plugin agreed to %q, want permessage-deflate", agreed)
	}
	if _, err := conn.Write(maskedFrame(0xC1, payload)); err != nil {
		t.Fatalf("writing the bomb (%d bytes): %v", len(payload), err)
	}
	if code := readCloseCode(t, &readerConn{Conn: conn, reader: reader}); code != int(websocket.StatusMessageTooBig) {
		t.Fatalf("the plugin closed with %d, want 1009 (message too big)", code)
	}
	host := dialServed(t, url, nil)
	if f := readFrame(t, host); f["type"] != "hello" {
		t.Fatalf("after the bomb: %v, want a new connection served", f)
	}
}

// readerConn reads what a bufio.Reader already holds before the connection.
type readerConn struct {
	net.Conn
	reader *bufio.Reader
}

func (c *readerConn) Read(p []byte) (int, error) { return c.reader.Read(p) }

// A host that neither reads nor closes after goaway (its process hung) is cut off at the
// grace and closeHandshakeWait after it, not after coder/websocket's own 5 s to write the
// close and 5 s to wait for the answer: the stop stays within the operator's caps.
func TestServeWebSocketStopsWithinItsCapsWhenTheHostNeverAnswersTheClose(t *testing.T) {
	const grace = 100 * time.Millisecond
	url, stop, ended := servedPlugin(t, testPlugin(), map[string]string{EnvStopGraceMs: "100", EnvStopHooksMs: "100"})
	rawUpgrade(t, url, false) // upgraded, then never read from or written to again
	time.Sleep(100 * time.Millisecond)
	stop()
	began := time.Now()
	waitRunEnded(t, ended, 10*time.Second)
	if took := time.Since(began); took > grace+closeHandshakeWait+2*time.Second {
		t.Fatalf("the stop took %v, want the grace (%v) and the close's %v at most", took, grace, closeHandshakeWait)
	}
}

// Stopping, the plugin takes no new connection: the listener is closed, so a dispatcher
// dialling again is refused and waits for another instance (or this one, back).
func TestServeWebSocketTakesNoConnectionOnceStopping(t *testing.T) {
	url, stop, ended := servedPlugin(t, testPlugin(), nil)
	host := dialServed(t, url, nil)
	readFrame(t, host) // the hello
	stop()
	if f := readFrame(t, host); f["type"] != "goaway" {
		t.Fatalf("after the stop: %v, want goaway", f)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if conn, _, err := websocket.Dial(ctx, url, nil); err == nil {
		conn.CloseNow()
		t.Fatal("a new connection was upgraded after goaway")
	}
	_ = host.Close(websocket.StatusNormalClosure, "")
	waitRunEnded(t, ended, 10*time.Second)
}

// The command line of serve mode: what does not belong to the WebSocket server is refused
// by name, before anything listens.
func TestServeWebSocketRefusesWhatItWouldNotUse(t *testing.T) {
	for name, test := range map[string]struct {
		args []string
		env  map[string]string
		want string
	}{
		"a registry flag": {
			args: []string{"serve", "-websocket", "-register-etcd", "http://127.0.0.1:2379"},
			want: "--register-etcd: a WebSocket server is not registered in etcd",
		},
		// Before, served: every registry flag but -register-etcd was dropped.
		"a registry prefix": {
			args: []string{"serve", "-websocket", "-register-prefix", "/linchkit/plugins/echo"},
			want: "serve: --register-prefix: a WebSocket server is not registered",
		},
		"an advertised address, after an empty etcd flag": {
			args: []string{"serve", "-websocket", "-register-etcd=", "--advertise=" + serveToken},
			want: "serve: --advertise: a WebSocket server is not registered",
		},
		"a registry variable": {
			args: []string{"serve", "-websocket"}, env: map[string]string{EnvRegisterEtcd: "http://127.0.0.1:2379"},
			want: EnvRegisterEtcd + ": a WebSocket server is not registered in etcd",
		},
		"a config for gRPC": {
			args: []string{"serve", "-config", "{}"},
			want: "serve: --config needs --websocket",
		},
		"a config that is not JSON": {
			args: []string{"serve", "-websocket", "-config", "{region"},
			want: "serve: --config is not valid JSON",
		},
		// Before, served: an array or null was the init hook's config.
		"a config that is an array": {
			args: []string{"serve", "-websocket", "-config", " [\"" + serveToken + "\"]"},
			want: "serve: --config must be a JSON object",
		},
		"a config that is null": {
			args: []string{"serve", "-websocket", "-config", "null"},
			want: "serve: --config must be a JSON object",
		},
		"both token sources": {
			args: []string{"serve", "-websocket"}, env: map[string]string{EnvToken: serveToken, EnvTokenFile: "/nonexistent"},
			want: "set either",
		},
	} {
		t.Run(name, func(t *testing.T) {
			var stdout bytes.Buffer
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			err := testPlugin().Run(ctx, Environment{Args: test.args, Getenv: func(n string) string { return test.env[n] },
				Stdin: strings.NewReader(""), Stdout: &stdout})
			if err == nil || !strings.Contains(err.Error(), test.want) {
				t.Fatalf("Run: %v, want an error with %q", err, test.want)
			}
			if strings.Contains(err.Error(), serveToken) {
				t.Errorf("the error quotes the token: %v", err)
			}
			if stdout.Len() != 0 {
				t.Errorf("it printed %q: a handshake line before refusing", stdout.String())
			}
		})
	}
}

// Past its cap of connections (1,000, as `dispatcher-plugin serve` holds its HTTP ones)
// an upgrade is refused 503 before it happens, in a short overloaded envelope a
// dispatcher dials again on; a connection that closes frees its place. Before, every
// upgrade was taken, each holding a goroutine, buffers and a descriptor.
func TestServeWebSocketRefusesConnectionsPastItsCap(t *testing.T) {
	if maxWebSocketConnections != 1000 {
		t.Fatalf("the cap is %d, want the Python SDK's 1000", maxWebSocketConnections)
	}
	p := testPlugin()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	server := newWebSocketServer(ctx, p, nil, time.Second)
	server.maxConnections = 2
	httpServer := httptest.NewServer(server)
	t.Cleanup(func() { server.stop(httpServer.Config); httpServer.Close() })
	url := "ws" + strings.TrimPrefix(httpServer.URL, "http") + "/"
	first, second := dialServed(t, url, nil), dialServed(t, url, nil)
	readFrame(t, first)
	readFrame(t, second)

	dialCtx, dialCancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer dialCancel()
	conn, response, err := websocket.Dial(dialCtx, url, nil)
	if err == nil {
		conn.CloseNow()
		t.Fatal("a third connection was upgraded past a cap of 2")
	}
	if response == nil || response.StatusCode != http.StatusServiceUnavailable {
		t.Fatalf("the answer past the cap: %v, %v; want 503", response, err)
	}
	if got := response.Header.Get("Retry-After"); got != "1" {
		t.Errorf("Retry-After: %q, want 1", got)
	}
	body, _ := io.ReadAll(response.Body)
	var envelope struct {
		Ok    bool `json:"ok"`
		Error struct {
			Type       string  `json:"type"`
			Message    string  `json:"message"`
			Retryable  bool    `json:"retryable"`
			RetryAfter float64 `json:"retry_after"`
		} `json:"error"`
	}
	if json.Unmarshal(body, &envelope) != nil || envelope.Ok || envelope.Error.Type != TypeOverloaded ||
		!envelope.Error.Retryable || envelope.Error.RetryAfter != 1 || len(body) > 300 {
		t.Fatalf("the body: %s, want a short, retryable overloaded envelope", body)
	}

	// A connection that ends frees its place.
	_ = first.Close(websocket.StatusNormalClosure, "")
	deadline := time.Now().Add(10 * time.Second)
	for {
		conn, _, err := websocket.Dial(dialCtx, url, nil)
		if err == nil {
			t.Cleanup(func() { conn.CloseNow() })
			if f := readFrame(t, conn); f["type"] != "hello" {
				t.Fatalf("a connection once one closed: %v, want the hello", f)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no connection taken 10 s after one of two closed: %v", err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// Connections that never send a whole head are counted: past maxWaitingConnections the
// oldest closes to make room, so a flood of idle sockets neither holds a descriptor each
// nor keeps a dispatcher out. Before, every one was held until its head timeout.
func TestServeWebSocketClosesTheOldestConnectionsWaitingForAHead(t *testing.T) {
	url, _, _ := servedPlugin(t, testPlugin(), nil)
	address := strings.TrimSuffix(strings.TrimPrefix(url, "ws://"), "/")
	flood := make([]net.Conn, 0, maxWaitingConnections+50)
	t.Cleanup(func() {
		for _, c := range flood {
			c.Close()
		}
	})
	for range maxWaitingConnections + 50 {
		c, err := net.DialTimeout("tcp", address, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		flood = append(flood, c)
	}
	// Dialled after the flood, and served.
	if f := readFrame(t, dialServed(t, url, nil)); f["type"] != "hello" {
		t.Fatalf("a dispatcher after the flood: %v, want the hello", f)
	}
	// The oldest were closed: a read ends at once, where a waiting one would block.
	// (Within 3 s, well inside the 10 s head timeout that closes them all in the end.)
	closed, deadline := 0, time.Now().Add(3*time.Second)
	for _, c := range flood[:50] {
		_ = c.SetReadDeadline(deadline)
		if _, err := c.Read(make([]byte, 1)); err != nil && !isTimeout(err) {
			closed++
		}
	}
	if closed != 50 {
		t.Fatalf("%d of the 50 oldest waiting connections closed, want all", closed)
	}
}

// An upgrade that coder/websocket refuses (here an old version) ends its connection with
// the answer; before, it was kept alive for another head, 75 s, uncounted.
func TestServeWebSocketARefusedUpgradeEndsItsConnection(t *testing.T) {
	url, _, _ := servedPlugin(t, testPlugin(), nil)
	address := strings.TrimSuffix(strings.TrimPrefix(url, "ws://"), "/")
	conn, err := net.DialTimeout("tcp", address, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_, _ = io.WriteString(conn, "GET / HTTP/1.1\r\nHost: p\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"+
		"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n")
	_ = conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	answer, err := io.ReadAll(conn)
	if err != nil {
		t.Fatalf("the connection was not closed after %q: %v", answer, err)
	}
	if !bytes.HasPrefix(answer, []byte("HTTP/1.1 400 ")) {
		t.Fatalf("the answer: %q, want a 400", answer)
	}
}
