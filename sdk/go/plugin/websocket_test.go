package plugin

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
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
