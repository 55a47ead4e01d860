package plugin

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
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
	writeFrame(t, hostConn, `{"type":"welcome"}`)
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
