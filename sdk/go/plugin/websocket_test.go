package plugin

import (
	"bufio"
	"bytes"
	"compress/flate"
	"context"
	"crypto/sha1"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coder/websocket"
)

// dialledSession runs a session of p dialled into a test host, as `connect` does, and
// returns the host's end of the connection, the session's stop (SIGTERM) and a channel
// closed once the session has ended.
func dialledSession(t *testing.T, p *Plugin, grace time.Duration) (*websocket.Conn, context.CancelFunc, <-chan struct{}) {
	t.Helper()
	return welcomedSession(t, p, grace, `{"type":"welcome"}`)
}

// welcomedSession is dialledSession whose host answers the hello with welcome.
func welcomedSession(t *testing.T, p *Plugin, grace time.Duration, welcome string) (*websocket.Conn, context.CancelFunc, <-chan struct{}) {
	t.Helper()
	accepted := make(chan *websocket.Conn, 1)
	host := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		conn, err := websocket.Accept(w, r, nil)
		if err != nil {
			return
		}
		accepted <- conn
		<-r.Context().Done() // the test holds the connection
	}))
	t.Cleanup(host.Close)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	conn, _, err := websocket.Dial(ctx, host.URL, nil)
	if err != nil {
		t.Fatal(err)
	}
	stopping, stop := context.WithCancel(context.Background())
	t.Cleanup(stop)
	ended := make(chan struct{})
	go func() {
		defer close(ended)
		(&wsSession{plugin: p, conn: conn, grace: grace}).run(stopping)
	}()
	hostConn := <-accepted
	t.Cleanup(func() { hostConn.CloseNow() })
	if f := readFrame(t, hostConn); f["type"] != "hello" {
		t.Fatalf("first frame: %v, want hello", f)
	}
	writeFrame(t, hostConn, welcome)
	return hostConn, stop, ended
}

func readFrame(t *testing.T, conn *websocket.Conn) map[string]any {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, data, err := conn.Read(ctx)
	if err != nil {
		t.Fatalf("reading a frame: %v", err)
	}
	var f map[string]any
	if err := json.Unmarshal(data, &f); err != nil {
		t.Fatalf("frame %s: %v", data, err)
	}
	return f
}

func writeFrame(t *testing.T, conn *websocket.Conn, f string) {
	t.Helper()
	if err := conn.Write(context.Background(), websocket.MessageText, []byte(f)); err != nil {
		t.Fatalf("writing %s: %v", f, err)
	}
}

func waitEnded(t *testing.T, ended <-chan struct{}, within time.Duration) {
	t.Helper()
	select {
	case <-ended:
	case <-time.After(within):
		t.Fatalf("the session still runs after %v", within)
	}
}

// The host may send calls before it reads goaway: they, and the call running when the
// plugin was told to stop, are answered, and the session ends when the host closes.
func TestGoAwayAnswersWhatStillArrives(t *testing.T) {
	p := testPlugin()
	started, release := make(chan struct{}), make(chan struct{})
	p.Method("held", "", func(ctx context.Context, _ *Call) (any, error) {
		close(started)
		select {
		case <-release:
			return "released", nil
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	})
	host, stop, ended := dialledSession(t, p, time.Minute)
	writeFrame(t, host, `{"type":"call","id":1,"request":{"v":1,"plugin":"test","method":"held","params":null,"context":{"request_id":"r1"}}}`)
	<-started

	stop()
	if f := readFrame(t, host); f["type"] != "goaway" {
		t.Fatalf("after the stop: %v, want goaway", f)
	}
	writeFrame(t, host, `{"type":"call","id":2,"request":{"v":1,"plugin":"test","method":"echo","params":{"n":2},"context":{"request_id":"r2"}}}`)
	f := readFrame(t, host)
	if f["type"] != "response" || f["id"] != 2.0 || f["response"].(map[string]any)["ok"] != true {
		t.Fatalf("a call after goaway: %v, want its answer", f)
	}
	// An older host answers goaway with an error frame: not answered in turn.
	writeFrame(t, host, `{"type":"error","error":{"type":"ProviderError","message":"unknown frame type"}}`)
	writeFrame(t, host, `{"type":"health","id":3}`)
	if f := readFrame(t, host); f["type"] != "health" {
		t.Fatalf("after the host's error frame: %v, want only the health answer", f)
	}
	close(release)
	f = readFrame(t, host)
	if f["type"] != "response" || f["id"] != 1.0 || f["response"].(map[string]any)["result"] != "released" {
		t.Fatalf("the call running at the stop: %v, want its answer", f)
	}
	if err := host.Close(websocket.StatusNormalClosure, ""); err != nil {
		t.Fatalf("closing as the host: %v", err)
	}
	waitEnded(t, ended, 5*time.Second)
}

// A host that does not close after goaway (an older one) is cut off after the grace.
func TestGoAwayClosesAfterTheGrace(t *testing.T) {
	const grace = 200 * time.Millisecond
	host, stop, ended := dialledSession(t, testPlugin(), grace)
	stop()
	said := time.Now()
	if f := readFrame(t, host); f["type"] != "goaway" {
		t.Fatalf("after the stop: %v, want goaway", f)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, data, err := host.Read(ctx)
	if code := websocket.CloseStatus(err); code != websocket.StatusGoingAway {
		t.Fatalf("after goaway: %q, %v; want a close with 1001", data, err)
	}
	if waited := time.Since(said); waited < grace {
		t.Fatalf("closed after %v, before the grace of %v", waited, grace)
	}
	waitEnded(t, ended, 5*time.Second)
}

// closingGateway stands in for the gateway: it upgrades every dial, reads the hello and
// closes the connection with code and reason. It counts the upgrades.
func closingGateway(t *testing.T, code websocket.StatusCode, reason string) (string, *atomic.Int32) {
	t.Helper()
	var upgrades atomic.Int32
	gateway := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		conn, err := websocket.Accept(w, r, nil)
		if err != nil {
			return
		}
		defer conn.CloseNow()
		upgrades.Add(1)
		ctx, cancel := context.WithTimeout(r.Context(), 5*time.Second)
		defer cancel()
		if _, _, err := conn.Read(ctx); err != nil { // the hello
			return
		}
		_ = conn.Close(code, reason)
	}))
	t.Cleanup(gateway.Close)
	return "ws" + strings.TrimPrefix(gateway.URL, "http") + "/v1/plugins/connect", &upgrades
}

// A close 4403 after the hello (it names another plugin than the one admitted) is final,
// as a 403 at the upgrade is: the same hello would get the same close.
func TestConnectEndsOnACloseWrongPluginWithoutDiallingAgain(t *testing.T) {
	const reason = "admitted as version 2.0.0, said '0.1.0'"
	url, upgrades := closingGateway(t, 4403, reason)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	env := Environment{Args: []string{"connect", "-url", url}, Getenv: func(string) string { return "" },
		Stdin: strings.NewReader(""), Stdout: io.Discard}
	began := time.Now()
	err := testPlugin().Run(ctx, env)
	if !errors.Is(err, ErrRefused) {
		t.Fatalf("connect after a close 4403: %v after %v, want ErrRefused", err, time.Since(began))
	}
	if want := "connect: the gateway refused the connection (4403): " + reason; err.Error() != want {
		t.Errorf("the error: %q, want %q", err, want)
	}
	if n := upgrades.Load(); n != 1 {
		t.Errorf("%d upgrades, want 1: a refusal is not dialled again", n)
	}
	if took := time.Since(began); took > 2*time.Second {
		t.Errorf("refused after %v, want at once", took)
	}
}

// A close reason is the gateway's text, printed to the operator's terminal with the error:
// its control characters (ESC, a newline, a bidi override) are escaped, and a long one cut.
func TestAHostileCloseReasonIsShownEscaped(t *testing.T) {
	for reason, shown := range map[string]string{
		"\x1b[2J\nERROR forged line \u202e": `\x1b[2J\nERROR forged line \u202e`,
		strings.Repeat("\x1b", 123):         strings.Repeat(`\x1b`, 50) + "…",
	} {
		url, _ := closingGateway(t, 4403, reason)
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		env := Environment{Args: []string{"connect", "-url", url}, Getenv: func(string) string { return "" },
			Stdin: strings.NewReader(""), Stdout: io.Discard}
		err := testPlugin().Run(ctx, env)
		cancel()
		if want := "connect: the gateway refused the connection (4403): " + shown; err == nil || err.Error() != want {
			t.Errorf("the error: %q, want %q", err, want)
		}
	}
}

// An error frame from the host is logged at INFO on one line, its message escaped (a
// newline, ESC); of a flood of them only the first loggedHostErrors and a line saying the
// rest are not, and the session serves on. Before, the Go SDK logged none of them.
func TestTheHostsErrorFramesAreLoggedEscapedAndOnlyTheFirstFew(t *testing.T) {
	out := capture(t)
	host, _, _ := dialledSession(t, testPlugin(), time.Minute)
	writeFrame(t, host, `{"type":"error","error":{"type":"provider_error","message":"\u001b[2J\nINFO forged: the plugin stopped"}}`)
	for range 999 {
		writeFrame(t, host, `{"type":"error","id":3,"error":{"message":"again"}}`)
	}
	// None is answered: the call's answer is the next frame.
	writeFrame(t, host, callFrame(1, "call", "echo", `"still here"`))
	if f := readFrame(t, host); f["type"] != "response" || f["id"] != 1.0 ||
		f["response"].(map[string]any)["result"] != "still here" {
		t.Fatalf("after the error frames: %v, want the call's answer", f)
	}
	want := []string{`linchkit plugin: the host could not use a frame: \x1b[2J\nINFO forged: the plugin stopped`}
	for range loggedHostErrors - 1 {
		want = append(want, "linchkit plugin: the host could not use a frame: again")
	}
	want = append(want, "linchkit plugin: the host sent more than 10 error frames on this connection; further ones are not logged")
	got := lines(out)
	if len(got) != len(want) {
		t.Fatalf("%d lines, want %d: %.600q", len(got), len(want), out.String())
	}
	for i, line := range got {
		match := slogLine.FindStringSubmatch(line)
		if match == nil || match[1] != "INFO" {
			t.Fatalf("line %d: %q, want an INFO line", i, line)
		}
		if message, err := strconv.Unquote(strings.TrimPrefix(line, match[0])); err != nil || message != want[i] {
			t.Fatalf("line %d: %q, want it to say %q", i, line, want[i])
		}
	}
}

func TestAnErrorFramesTextIsItsMessageOrElseWhatItIs(t *testing.T) {
	for raw, want := range map[string]string{
		`{"type":"provider_error","message":"unknown frame type"}`: "unknown frame type",
		` "frame 7 went astray"`:                                   "frame 7 went astray",
		`{"message":7}`:                                            `{"message":7}`,
		`{"message":null}`:                                         `{"message":null}`,
		`[1,2]`:                                                    `[1,2]`,
		`null`:                                                     "null",
		``:                                                         "null",
	} {
		if got := errorText(json.RawMessage(raw)); got != want {
			t.Errorf("errorText(%s) = %q, want %q", raw, got, want)
		}
	}
}

// 4400 (a bad hello, or none within 10 s: maybe a slow link) and the other closes are not
// refusals: connect dials again.
func TestConnectDialsAgainAfterEveryOtherClose(t *testing.T) {
	for _, code := range []websocket.StatusCode{4400, websocket.StatusGoingAway, websocket.StatusPolicyViolation, 1012} {
		t.Run(code.String(), func(t *testing.T) {
			url, upgrades := closingGateway(t, code, "closed by the test")
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			env := Environment{Args: []string{"connect", "-url", url}, Getenv: func(string) string { return "" },
				Stdin: strings.NewReader(""), Stdout: io.Discard}
			ended := make(chan error, 1)
			go func() { ended <- testPlugin().Run(ctx, env) }()
			deadline := time.Now().Add(10 * time.Second)
			for upgrades.Load() < 3 {
				select {
				case err := <-ended:
					t.Fatalf("connect ended after %d upgrades: %v; want it dialling again", upgrades.Load(), err)
				case <-time.After(10 * time.Millisecond):
				}
				if time.Now().After(deadline) {
					t.Fatalf("%d upgrades in 10 s, want 3", upgrades.Load())
				}
			}
			cancel()
			if err := <-ended; err != nil {
				t.Fatalf("connect, stopped: %v, want nil", err)
			}
		})
	}
}

// A plugin that dials the gateway registers nowhere: told to (LINCHKIT_REGISTER_ETCD), connect
// refuses in one line before its hooks run and before it dials, as every SDK's does.
// Before, it ignored the variable, and the operator believed it registered.
func TestConnectRefusesToRegisterInEtcdBeforeItDials(t *testing.T) {
	var requests atomic.Int32
	gateway := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		requests.Add(1)
		http.Error(w, "not a gateway", http.StatusServiceUnavailable)
	}))
	t.Cleanup(gateway.Close)
	vars := map[string]string{EnvRegisterEtcd: "http://127.0.0.1:2379", EnvRegisterPrefix: "/linchkit/plugins/test"}
	env := Environment{Args: []string{"connect", "-url", "ws" + strings.TrimPrefix(gateway.URL, "http")},
		Getenv: func(k string) string { return vars[k] }, Stdin: strings.NewReader(""), Stdout: io.Discard}
	p := testPlugin()
	var initialised atomic.Bool
	p.OnInit(func(context.Context, json.RawMessage) error { initialised.Store(true); return nil })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	err := p.Run(ctx, env)
	want := "connect: LINCHKIT_REGISTER_ETCD: a plugin that dials the gateway (connect) is not registered in etcd"
	if err == nil || !strings.HasPrefix(err.Error(), want) || strings.Contains(err.Error(), "\n") {
		t.Fatalf("connect with %s set: %v, want one line starting %q", EnvRegisterEtcd, err, want)
	}
	if n := requests.Load(); n != 0 {
		t.Errorf("%d requests reached the gateway, want none: the refusal comes before the dial", n)
	}
	if initialised.Load() {
		t.Error("the init hook ran: the refusal comes before the plugin's hooks")
	}
}

// A 400 at the upgrade (an id or version off the gateway's pattern) is what the same dial
// would get again, as a 401, 403 or 404 is: connect ends. Before, it dialled again for ever.
func TestConnectEndsOnA400AtTheUpgrade(t *testing.T) {
	var requests atomic.Int32
	server := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		requests.Add(1)
		http.Error(w, `{"ok":false,"error":{"type":"invalid_params"}}`, http.StatusBadRequest)
	}))
	t.Cleanup(server.Close)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	url := "ws" + strings.TrimPrefix(server.URL, "http")
	env := Environment{Args: []string{"connect", "-url", url}, Getenv: func(string) string { return "" },
		Stdin: strings.NewReader(""), Stdout: io.Discard}
	began := time.Now()
	err := testPlugin().Run(ctx, env)
	if !errors.Is(err, ErrRefused) {
		t.Fatalf("connect after a 400: %v after %v, want ErrRefused", err, time.Since(began))
	}
	if n := requests.Load(); n != 1 {
		t.Errorf("%d requests, want 1: a refusal is not dialled again", n)
	}
}

// deflateGateway stands in for a gateway whose target says `compress: true`: it accepts
// the plugin's permessage-deflate offer, if any. It hands the test each connection with
// the Sec-WebSocket-Extensions header the dial offered.
func deflateGateway(t *testing.T) (string, <-chan *websocket.Conn, <-chan string) {
	t.Helper()
	conns, offers := make(chan *websocket.Conn, 4), make(chan string, 4)
	gateway := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		offers <- r.Header.Get("Sec-WebSocket-Extensions")
		conn, err := websocket.Accept(w, r, &websocket.AcceptOptions{CompressionMode: websocket.CompressionContextTakeover})
		if err != nil {
			return
		}
		conn.SetReadLimit(maxMessageBytes)
		conns <- conn
		<-r.Context().Done() // the test holds the connection
	}))
	t.Cleanup(gateway.Close)
	return "ws" + strings.TrimPrefix(gateway.URL, "http") + "/v1/plugins/connect", conns, offers
}

// connect offers permessage-deflate on every dial, the gateway deciding (it accepts only
// for a target with `compress: true`). Before, it never offered it, so such a target
// deflated nothing for a Go plugin. Calls and answers go through the deflated connection.
func TestConnectOffersDeflateAndIsServedOverIt(t *testing.T) {
	url, conns, offers := deflateGateway(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	env := Environment{Args: []string{"connect", "-url", url}, Getenv: func(string) string { return "" },
		Stdin: strings.NewReader(""), Stdout: io.Discard}
	ended := make(chan error, 1)
	go func() { ended <- testPlugin().Run(ctx, env) }()
	var host *websocket.Conn
	select {
	case host = <-conns:
	case err := <-ended:
		t.Fatalf("connect ended: %v", err)
	case <-time.After(10 * time.Second):
		t.Fatal("connect did not dial within 10 s")
	}
	defer host.CloseNow()
	if offer := <-offers; !strings.HasPrefix(offer, "permessage-deflate") {
		t.Fatalf("the dial offered Sec-WebSocket-Extensions %q, want permessage-deflate", offer)
	}
	if f := readFrame(t, host); f["type"] != "hello" {
		t.Fatalf("first frame: %v, want hello", f)
	}
	writeFrame(t, host, `{"type":"welcome","instance":"x"}`)
	text := strings.Repeat("deflate me ", 20_000)
	writeFrame(t, host, `{"type":"call","id":1,"request":{"v":1,"plugin":"test","method":"echo","params":"`+text+`","context":{}}}`)
	f := readFrame(t, host)
	if f["type"] != "response" || f["response"].(map[string]any)["result"] != text {
		t.Fatalf("the echo over a deflated connection: %.200v", f)
	}
	cancel()
	host.CloseNow() // not waited for after goaway
	waitRun(t, ended)
}

// waitRun waits for a Run that was stopped to return nil.
func waitRun(t *testing.T, ended <-chan error) {
	t.Helper()
	select {
	case err := <-ended:
		if err != nil {
			t.Fatalf("connect, stopped: %v, want nil", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("connect still runs 10 s after its stop")
	}
}

// rawFrame writes one WebSocket frame from the gateway (unmasked) as it is given: the test
// says whether it is deflated (RSV1) and what its payload is, byte for byte.
func rawFrame(first byte, payload []byte) []byte {
	frame := []byte{first, 127}
	frame = binary.BigEndian.AppendUint64(frame, uint64(len(payload)))
	return append(frame, payload...)
}

// readCloseCode reads the plugin's frames (masked: it is the client) until its close frame,
// and returns that frame's status code.
func readCloseCode(t *testing.T, conn net.Conn) int {
	t.Helper()
	_ = conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	reader := bufio.NewReader(conn)
	for {
		var head [2]byte
		if _, err := io.ReadFull(reader, head[:]); err != nil {
			t.Fatalf("reading the plugin's frames: %v, before its close frame", err)
		}
		length := uint64(head[1] & 0x7f)
		switch length {
		case 126:
			var n [2]byte
			_, _ = io.ReadFull(reader, n[:])
			length = uint64(binary.BigEndian.Uint16(n[:]))
		case 127:
			var n [8]byte
			_, _ = io.ReadFull(reader, n[:])
			length = binary.BigEndian.Uint64(n[:])
		}
		var mask [4]byte
		if head[1]&0x80 != 0 {
			_, _ = io.ReadFull(reader, mask[:])
		}
		payload := make([]byte, length)
		if _, err := io.ReadFull(reader, payload); err != nil {
			t.Fatalf("reading a frame of %d bytes: %v", length, err)
		}
		for i := range payload {
			payload[i] ^= mask[i%4]
		}
		if head[0]&0x0f == 8 { // close
			if len(payload) < 2 {
				t.Fatalf("a close frame without a code")
			}
			return int(binary.BigEndian.Uint16(payload))
		}
	}
}

// A gateway that agreed to permessage-deflate sends one message of 65 KB on the wire that
// inflates to 64 MiB: connect inflates it up to its read limit (8 MiB) only and closes the
// connection 1009, as for a plain message over the limit, instead of inflating the bomb.
func TestConnectRefusesADeflatedBombPastItsReadLimit(t *testing.T) {
	var bomb bytes.Buffer
	deflater, _ := flate.NewWriter(&bomb, flate.BestCompression)
	chunk := bytes.Repeat([]byte("x"), 1<<20)
	for range 64 {
		_, _ = deflater.Write(chunk)
	}
	_ = deflater.Flush() // a sync flush: RFC 7692 leaves off its closing 00 00 ff ff
	payload := bytes.TrimSuffix(bomb.Bytes(), []byte{0, 0, 0xff, 0xff})

	conns, offers := make(chan net.Conn, 64), make(chan string, 64)
	t.Cleanup(func() { // the hijacked connections are the test's to close, redials' too
		for {
			select {
			case conn := <-conns:
				conn.Close()
			default:
				return
			}
		}
	})
	gateway := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		// Upgraded by hand, so what the test writes is what the plugin reads.
		offers <- r.Header.Get("Sec-WebSocket-Extensions")
		sum := sha1.Sum([]byte(r.Header.Get("Sec-WebSocket-Key") + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"))
		conn, buffered, err := http.NewResponseController(w).Hijack()
		if err != nil {
			return
		}
		_, _ = buffered.WriteString("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
			"Sec-WebSocket-Accept: " + base64.StdEncoding.EncodeToString(sum[:]) + "\r\n" +
			"Sec-WebSocket-Extensions: permessage-deflate\r\n\r\n")
		_ = buffered.Flush()
		conns <- conn
	}))
	t.Cleanup(gateway.Close)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	env := Environment{Args: []string{"connect", "-url", "ws" + strings.TrimPrefix(gateway.URL, "http")},
		Getenv: func(string) string { return "" }, Stdin: strings.NewReader(""), Stdout: io.Discard}
	ended := make(chan error, 1)
	go func() { ended <- testPlugin().Run(ctx, env) }()
	var conn net.Conn
	select {
	case conn = <-conns:
	case err := <-ended:
		t.Fatalf("connect ended: %v (offered %q)", err, <-offers)
	case <-time.After(10 * time.Second):
		t.Fatal("connect did not dial within 10 s")
	}
	defer conn.Close()
	if offer := <-offers; !strings.HasPrefix(offer, "permessage-deflate") {
		t.Fatalf("the dial offered Sec-WebSocket-Extensions %q, want permessage-deflate", offer)
	}
	// FIN, RSV1 (deflated), text: a length within the limit, so only what it inflates to
	// can be refused.
	if _, err := conn.Write(rawFrame(0xC1, payload)); err != nil {
		t.Fatalf("writing the bomb (%d bytes): %v", len(payload), err)
	}
	if code := readCloseCode(t, conn); code != int(websocket.StatusMessageTooBig) {
		t.Fatalf("the plugin closed with %d, want 1009 (message too big)", code)
	}
	cancel()
	waitRun(t, ended)
}

// A gateway that neither reads nor closes after goaway (hung) is cut off at the grace and
// closeHandshakeWait after it: before, connect's close waited coder/websocket's own 5 s
// for the gateway's close frame, past the operator's caps.
func TestConnectStopsWithinItsCapsWhenTheGatewayNeverAnswersTheClose(t *testing.T) {
	const grace = 100 * time.Millisecond
	upgraded := make(chan struct{}, 1)
	gateway := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		conn, err := websocket.Accept(w, r, nil)
		if err != nil {
			return
		}
		defer conn.CloseNow()
		upgraded <- struct{}{}
		<-r.Context().Done() // never reads: neither the goaway nor the close is answered
	}))
	t.Cleanup(gateway.Close)
	ctx, stop := context.WithCancel(context.Background())
	defer stop()
	env := Environment{Args: []string{"connect", "-url", "ws" + strings.TrimPrefix(gateway.URL, "http")},
		Getenv: func(name string) string {
			return map[string]string{EnvStopGraceMs: "100", EnvStopHooksMs: "100"}[name]
		}, Stdin: strings.NewReader(""), Stdout: io.Discard}
	ended := make(chan error, 1)
	go func() { ended <- testPlugin().Run(ctx, env) }()
	select {
	case <-upgraded:
	case <-time.After(10 * time.Second):
		t.Fatal("connect did not dial within 10 s")
	}
	time.Sleep(100 * time.Millisecond) // the hello is out
	stop()
	began := time.Now()
	waitRun(t, ended)
	if took := time.Since(began); took > grace+closeHandshakeWait+2*time.Second {
		t.Fatalf("the stop took %v, want the grace (%v) and the close's %v at most", took, grace, closeHandshakeWait)
	}
}

// A host that stops reading (hung, or reading nothing while it sends) is found: its pong
// never comes, or, once the session runs maxInFlight calls and reads no more (no pong
// either), no answer goes out for 1.5 heartbeats. The connection is dropped, the writes
// waiting for it (answers no one reads) are cut off with it, and the calls end.
func TestASessionDropsAHostThatStopsReading(t *testing.T) {
	t.Run("a few calls", func(t *testing.T) { dropsAHostThatStopsReading(t, 20, 200*time.Millisecond) })
	// The calls are all read, and the reader parked, well before the first ping, on a
	// loaded machine too.
	t.Run("more than it runs at once", func(t *testing.T) {
		dropsAHostThatStopsReading(t, maxInFlight+10, 1500*time.Millisecond)
	})
}

func dropsAHostThatStopsReading(t *testing.T, calls int, heartbeat time.Duration) {
	p := testPlugin()
	// More than the sockets hold in all (small buffers, below): each write waits for the
	// host, which never reads.
	answer := strings.Repeat("y", 10<<10)
	p.Method("large", "", func(context.Context, *Call) (any, error) { return answer, nil })
	accepted := make(chan *websocket.Conn, 1)
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	httpServer := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		conn, err := websocket.Accept(w, r, nil)
		if err == nil {
			accepted <- conn
		}
	})}
	go func() { _ = httpServer.Serve(smallBuffers{listener}) }()
	t.Cleanup(func() { httpServer.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	// The plugin's side is the dialling one here; the host is the server that stops reading.
	dialSmall := func(ctx context.Context, network, address string) (net.Conn, error) {
		conn, err := (&net.Dialer{}).DialContext(ctx, network, address)
		if err == nil {
			_ = conn.(*net.TCPConn).SetWriteBuffer(4096)
		}
		return conn, err
	}
	conn, _, err := websocket.Dial(ctx, "ws://"+listener.Addr().String(),
		&websocket.DialOptions{HTTPClient: &http.Client{Transport: &http.Transport{DialContext: dialSmall}}})
	if err != nil {
		t.Fatal(err)
	}
	host := <-accepted
	t.Cleanup(func() { host.CloseNow() })
	session := &wsSession{plugin: p, conn: conn, grace: time.Second, heartbeat: heartbeat}
	ended := make(chan struct{})
	go func() {
		defer close(ended)
		session.run(context.Background())
	}()
	readFrame(t, host) // the hello; then calls whose answers the host never reads
	for id := range calls {
		writeFrame(t, host, `{"type":"call","id":`+strconv.Itoa(id+1)+
			`,"request":{"v":1,"plugin":"test","method":"large","params":null,"context":{}}}`)
	}
	select {
	case <-ended:
	case <-time.After(10 * heartbeat):
		t.Fatalf("the session still runs %v after its host stopped reading (heartbeat %v)", 10*heartbeat, heartbeat)
	}
	if parked := session.parks.Load() > 0; parked != (calls > maxInFlight) {
		t.Fatalf("the session parked its reader: %t, want %t (%d calls)", parked, calls > maxInFlight, calls)
	}
	// What the sockets held is still there to read; then the connection is gone.
	for {
		if _, _, err := host.Read(ctx); err != nil {
			if errors.Is(err, context.DeadlineExceeded) {
				t.Fatalf("the host's side after the drop: %v, want the connection gone", err)
			}
			break
		}
	}
}

// smallBuffers accepts connections with a small receive buffer: what the peer writes and
// the host does not read fills it after a few KB, not megabytes.
type smallBuffers struct{ net.Listener }

func (l smallBuffers) Accept() (net.Conn, error) {
	conn, err := l.Listener.Accept()
	if err == nil {
		_ = conn.(*net.TCPConn).SetReadBuffer(4096)
	}
	return conn, err
}

// A session running maxInFlight calls stops reading, so TCP pushes back on the host; it
// reads no pong then either, and must not take the host for gone: before, a burst of
// over 1,024 calls longer than 1.5 heartbeats dropped the connection (15 s by default)
// and every call on it, with a host that answered every ping.
func TestASessionFullOfCallsKeepsAHostThatAnswersItsPings(t *testing.T) {
	// A pong within half of it on a loaded machine; the calls hold six of them.
	const heartbeat = 500 * time.Millisecond
	p := testPlugin()
	p.Method("holds", "", func(ctx context.Context, _ *Call) (any, error) {
		select {
		case <-time.After(6 * heartbeat):
			return "held", nil
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	})
	accepted := make(chan *websocket.Conn, 1)
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	httpServer := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if conn, err := websocket.Accept(w, r, nil); err == nil {
			accepted <- conn
		}
	})}
	go func() { _ = httpServer.Serve(listener) }()
	t.Cleanup(func() { httpServer.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, _, err := websocket.Dial(ctx, "ws://"+listener.Addr().String(), nil)
	if err != nil {
		t.Fatal(err)
	}
	host := <-accepted
	t.Cleanup(func() { host.CloseNow() })
	ended := make(chan struct{})
	go func() {
		defer close(ended)
		(&wsSession{plugin: p, conn: conn, grace: time.Second, heartbeat: heartbeat}).run(context.Background())
	}()
	answers := make(chan map[string]any, 2*maxInFlight)
	go func() { // the host reads all along: it answers every ping
		for {
			_, data, err := host.Read(ctx)
			if err != nil {
				close(answers)
				return
			}
			var f map[string]any
			_ = json.Unmarshal(data, &f)
			answers <- f
		}
	}()
	const calls = maxInFlight + 50
	for id := 1; id <= calls; id++ {
		if err := host.Write(ctx, websocket.MessageText, []byte(`{"type":"call","id":`+strconv.Itoa(id)+
			`,"request":{"v":1,"plugin":"test","method":"holds","params":null,"context":{}}}`)); err != nil {
			t.Fatalf("writing call %d: %v", id, err)
		}
	}
	held := 0
	for held < calls {
		f, open := <-answers
		if !open {
			t.Fatalf("the connection ended after %d of %d answers", held, calls)
		}
		if f["type"] == "response" {
			if result := f["response"].(map[string]any)["result"]; result != "held" {
				t.Fatalf("an answer: %v, want held", f)
			}
			held++
		}
	}
	select {
	case <-ended:
		t.Fatal("the session ended with its host still there")
	default:
	}
}

// A session whose calls all ran longer than 1.5 heartbeats sent nothing meanwhile; when they
// end, their answers may wait a moment for a host slow to read. That wait is counted from
// the first of them, not from the last frame sent before the calls began: before, the first
// tick during it took the host for one that reads nothing, and dropped the connection and
// every answer on it.
func TestASessionQuietForLongWaitsForItsFirstAnswersFromWhenTheyBegin(t *testing.T) {
	// The answers wait 1.05 heartbeats for the host: a tick falls in that wait, and 0.45
	// heartbeats (0.7 s) are left before it would be a stall (1.5).
	const heartbeat = 1500 * time.Millisecond
	p := testPlugin()
	// The first answer is larger than loopback's buffers hold (about 4 MB): its write waits
	// for the host, and every other answer behind it, so no call ends and the reader stays
	// parked (unparked, it would ping, and a host that does not read is rightly dropped).
	// Small buffers would hold less, but drain a few KB per delayed ACK once read.
	releaseFirst, releaseRest := make(chan struct{}), make(chan struct{})
	large := strings.Repeat("y", 7<<20)
	p.Method("held", "", func(ctx context.Context, call *Call) (any, error) {
		release, answer := releaseRest, any("small")
		if string(call.Params) == `"large"` {
			release, answer = releaseFirst, large
		}
		select {
		case <-release:
			return answer, nil
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	})
	accepted := make(chan *websocket.Conn, 1)
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	httpServer := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if conn, err := websocket.Accept(w, r, nil); err == nil {
			accepted <- conn
		}
	})}
	go func() { _ = httpServer.Serve(listener) }()
	t.Cleanup(func() { httpServer.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, _, err := websocket.Dial(ctx, "ws://"+listener.Addr().String(), nil)
	if err != nil {
		t.Fatal(err)
	}
	host := <-accepted
	host.SetReadLimit(8 << 20)
	t.Cleanup(func() { host.CloseNow() })
	session := &wsSession{plugin: p, conn: conn, grace: time.Second, heartbeat: heartbeat}
	ended := make(chan struct{})
	go func() {
		defer close(ended)
		session.run(context.Background())
	}()
	readFrame(t, host) // the hello: the last frame the session sends before the answers
	const calls = maxInFlight + 1
	for id := 1; id <= calls; id++ {
		params := `"small"`
		if id == 1 {
			params = `"large"`
		}
		writeFrame(t, host, `{"type":"call","id":`+strconv.Itoa(id)+
			`,"request":{"v":1,"plugin":"test","method":"held","params":`+params+`,"context":{}}}`)
	}
	for session.parks.Load() == 0 { // every slot taken, the reader waits
		select {
		case <-ended:
			t.Fatal("the session ended while its calls ran")
		case <-time.After(10 * time.Millisecond):
		}
	}
	time.Sleep(2 * heartbeat) // quiet: nothing sent for more than 1.5 heartbeats
	close(releaseFirst)
	for session.writing.Load() == 0 { // the large answer's write has begun
		time.Sleep(time.Millisecond)
	}
	close(releaseRest)
	time.Sleep(heartbeat * 105 / 100) // the answers wait for a host that reads only now
	responses := make(chan struct{}, calls)
	go func() {
		for {
			_, data, err := host.Read(ctx)
			if err != nil {
				return
			}
			if strings.Contains(string(data), `"type":"response"`) {
				responses <- struct{}{}
			}
		}
	}()
	for answered := 0; answered < calls; answered++ {
		select {
		case <-responses:
		case <-ended:
			t.Fatalf("the session dropped its host after %d of %d answers", answered, calls)
		case <-ctx.Done():
			t.Fatalf("%d of %d answers in 30 s", answered, calls)
		}
	}
	select {
	case <-ended:
		t.Fatal("the session ended with its host still there")
	default:
	}
}
