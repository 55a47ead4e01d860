package plugin

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coder/websocket"
)

// subscribedHosts is how many hosts take the plugin's events now.
func subscribedHosts(p *Plugin) int {
	p.events.mu.Lock()
	defer p.events.mu.Unlock()
	return len(p.events.subscribers)
}

// waitSubscribedHosts waits until n hosts take the plugin's events: a session that ended
// has left the hub, so what is emitted next waits for the next host.
func waitSubscribedHosts(t *testing.T, p *Plugin, n int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for subscribedHosts(p) != n {
		if time.Now().After(deadline) {
			t.Fatalf("%d hosts take the events after 10 s, want %d", subscribedHosts(p), n)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// emitSeq emits the events tick {"seq": from} … {"seq": to-1}.
func emitSeq(t *testing.T, p *Plugin, from, to int) {
	t.Helper()
	for seq := from; seq < to; seq++ {
		if err := p.Emit("tick", map[string]int{"seq": seq}); err != nil {
			t.Fatal(err)
		}
	}
}

// readTicks reads the events tick {"seq": from} … {"seq": to-1}, in that order.
func readTicks(t *testing.T, host *websocket.Conn, from, to int) {
	t.Helper()
	for seq := from; seq < to; seq++ {
		f := readFrame(t, host)
		data, _ := f["data"].(map[string]any)
		if f["type"] != "event" || f["event"] != "tick" || data["seq"] != float64(seq) {
			t.Fatalf("event %d of %d…%d: %v", seq, from, to-1, f)
		}
	}
}

// readNoDropped: after the events read so far comes no dropped frame (a health probe's
// answer is the next frame).
func readNoDropped(t *testing.T, host *websocket.Conn) {
	t.Helper()
	writeFrame(t, host, `{"type":"health","id":99}`)
	if f := readFrame(t, host); f["type"] != "health" {
		t.Fatalf("after the waiting events: %v, want nothing before the health answer", f)
	}
}

func readDropped(t *testing.T, host *websocket.Conn, count int) {
	t.Helper()
	if f := readFrame(t, host); f["type"] != "dropped" || f["count"] != float64(count) {
		t.Fatalf("after the waiting events: %v, want {\"type\":\"dropped\",\"count\":%d}", f, count)
	}
}

// Events the plugin emits while no host is connected wait, the newest 1,000 of them
// (websocketEventBuffer, as the Python SDK's max_buffered_events), and go to the host that
// connects next, followed by a dropped frame with the count lost; those emitted while it
// is connected follow. Before, the Go SDK kept 1,024 and lost the rest without a word.
func TestServeWebSocketKeepsTheEventsEmittedWithNoHostAndCountsThoseLost(t *testing.T) {
	p := testPlugin()
	url, _, _ := servedPlugin(t, p, nil)
	emitSeq(t, p, 0, websocketEventBuffer+5)

	host := dialServed(t, url, nil)
	if f := readFrame(t, host); f["type"] != "hello" {
		t.Fatalf("the first frame: %v, want the hello", f)
	}
	readTicks(t, host, 5, websocketEventBuffer+5)
	readDropped(t, host, 5)
	emitSeq(t, p, 2000, 2001)
	readTicks(t, host, 2000, 2001)

	// The count was the last host's: the next hears only of what it missed itself.
	_ = host.Close(websocket.StatusNormalClosure, "")
	waitSubscribedHosts(t, p, 0)
	emitSeq(t, p, 3000, 3003)
	next := dialServed(t, url, nil)
	readFrame(t, next) // the hello
	readTicks(t, next, 3000, 3003)
	readNoDropped(t, next)
}

// With several hosts connected each gets every event; those that waited for a host go to
// the first that connects, as in the Python SDK.
func TestServeWebSocketSendsEveryEventToEveryHost(t *testing.T) {
	p := testPlugin()
	url, _, _ := servedPlugin(t, p, nil)
	emitSeq(t, p, 0, 2)
	first := dialServed(t, url, nil)
	readFrame(t, first) // the hello
	readTicks(t, first, 0, 2)
	readNoDropped(t, first)
	second := dialServed(t, url, nil)
	readFrame(t, second) // the hello
	waitSubscribedHosts(t, p, 2)
	emitSeq(t, p, 10, 12)
	readTicks(t, first, 10, 12)
	readTicks(t, second, 10, 12)
}

// Dialling the gateway, the same: what the plugin emitted before the first connection and
// between two waits for the next, and the dropped frame says how many did not.
func TestConnectKeepsTheEventsEmittedWhileDisconnected(t *testing.T) {
	accepted := make(chan *websocket.Conn)
	// Upgrades are refused (503) while the test says so: the plugin dials again soon after a
	// close, and what it emits meanwhile must find no session.
	var refusing atomic.Bool
	gateway := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if refusing.Load() {
			http.Error(w, "not now", http.StatusServiceUnavailable)
			return
		}
		conn, err := websocket.Accept(w, r, nil)
		if err != nil {
			return
		}
		defer conn.CloseNow()
		select {
		case accepted <- conn:
			<-r.Context().Done() // the test holds the connection
		case <-time.After(10 * time.Second):
		}
	}))
	t.Cleanup(gateway.Close)
	p := testPlugin()
	// Emitted by the start hook, before the plugin first dials.
	p.OnStart(func(context.Context) error { emitSeq(t, p, 0, websocketEventBuffer+2); return nil })
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	url := "ws" + strings.TrimPrefix(gateway.URL, "http") + "/v1/plugins/connect"
	go func() {
		_ = p.Run(ctx, Environment{Args: []string{"connect", "-url", url}, Getenv: func(string) string { return "" },
			Stdin: strings.NewReader(""), Stdout: io.Discard})
	}()
	gatewayConn := func() *websocket.Conn {
		t.Helper()
		select {
		case conn := <-accepted:
			if f := readFrame(t, conn); f["type"] != "hello" {
				t.Fatalf("the first frame: %v, want the hello", f)
			}
			writeFrame(t, conn, `{"type":"welcome","instance":"x"}`)
			return conn
		case <-time.After(10 * time.Second):
			t.Fatal("the plugin did not dial the gateway within 10 s")
			return nil
		}
	}
	conn := gatewayConn()
	readTicks(t, conn, 2, websocketEventBuffer+2)
	readDropped(t, conn, 2)

	refusing.Store(true)
	_ = conn.Close(websocket.StatusGoingAway, "")
	waitSubscribedHosts(t, p, 0)
	emitSeq(t, p, 5000, 5003)
	refusing.Store(false)
	conn = gatewayConn()
	readTicks(t, conn, 5000, 5003)
	readNoDropped(t, conn)
}

func TestTheEventHubCountsWhatItDropsWithNoHost(t *testing.T) {
	hub := newEventHub()
	hub.keepAtMost(3)
	for seq := range 5 {
		hub.publish("tick", []byte(fmt.Sprint(seq)))
	}
	waited := hub.subscribe()
	defer hub.unsubscribe(waited.queue)
	if len(waited.events) != 3 || string(waited.events[0].GetDataJson()) != "2" || waited.lost != 2 {
		t.Fatalf("%d events from %s, %d lost; want 3 from 2, 2 lost", len(waited.events), waited.events[0].GetDataJson(), waited.lost)
	}
	if again := hub.subscribe(); len(again.events) != 0 || again.lost != 0 {
		t.Fatalf("a second host: %d events, %d lost; want none", len(again.events), again.lost)
	}
}
