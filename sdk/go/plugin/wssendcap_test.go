package plugin

import (
	"context"
	"encoding/json"
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

// capAfter: a new session's send cap once the host announced text (the header's value, or
// the welcome field's JSON).
func capAfter(text string) int64 {
	var session wsSession
	session.announce(text)
	return session.limit()
}

func TestAnnouncedCapTakesOnlyDecimalDigitsWithinItsRange(t *testing.T) {
	for text, want := range map[string]int64{
		"1024": 1024, "2048": 2048, "0000001024": 1024, "8388607": 8388607,
		"8388608": maxMessageBytes, "9007199254740992": maxMessageBytes, // never above the SDK's own
	} {
		if got := capAfter(text); got != want {
			t.Errorf("announced %q: the cap is %d, want %d", text, got, want)
		}
	}
	for _, text := range []string{
		"", "abc", "-5", "+2048", "1e6", "12.5", " 2048", "2048 ", `"2048"`, "100", "1023", "0",
		"9007199254740993", "99999999999999999", "00000000000002048", "2048\x00", "２０４８", "null", "true",
	} {
		if limit, ok := announcedCap(text); ok {
			t.Errorf("announced %q: taken as %d, want it ignored", text, limit)
		}
		if got := capAfter(text); got != maxMessageBytes {
			t.Errorf("announced %q: the cap is %d, want the SDK's own %d", text, got, maxMessageBytes)
		}
	}
	for name, want := range map[string]string{
		"config": "config", "a\nb\"c": `a\nb\"c`, strings.Repeat("m", 70): strings.Repeat("m", 64) + "…",
	} {
		if got := shownBareName(name); got != want {
			t.Errorf("the name %q is shown %q, want %q", name, got, want)
		}
	}
	if _, ok := announcedCap("9007199254740992"); !ok {
		t.Error("2**53 is the largest valid announcement, refused")
	}
}

// sizedPlugin: big answers a result string of params.n letters x (or U+2028 when
// params.sep), bad an error message of n letters; stream sends small, then n letters,
// then small again, telling whether it was stopped; shout emits an event of n letters.
func sizedPlugin(stopped chan<- bool) *Plugin {
	p := testPlugin()
	type sized struct {
		N   int  `json:"n"`
		Sep bool `json:"sep"`
	}
	letters := func(call *Call) string {
		var params sized
		_ = call.Bind(&params)
		if params.Sep {
			return strings.Repeat("\u2028", params.N)
		}
		return strings.Repeat("x", params.N)
	}
	p.Method("big", "", func(_ context.Context, call *Call) (any, error) { return letters(call), nil })
	p.Method("bad", "", func(_ context.Context, call *Call) (any, error) {
		return nil, NewError("Overdrawn", letters(call))
	})
	p.StreamingMethod("stream", "", func(ctx context.Context, call *Call, send func(any) error) error {
		if err := send("small"); err != nil {
			return err
		}
		bigErr := send(letters(call))
		select {
		case <-ctx.Done():
			stopped <- true
		case <-time.After(2 * time.Second):
			stopped <- false
		}
		if bigErr != nil {
			return bigErr
		}
		return send("small again")
	})
	p.Method("shout", "", func(_ context.Context, call *Call) (any, error) {
		return "shouted", call.Emit("loud", letters(call))
	})
	return p
}

func callFrame(id int, kind, method, params string) string {
	return fmt.Sprintf(`{"type":%q,"id":%d,"request":{"v":1,"plugin":"test","method":%q,"params":%s,"context":{}}}`,
		kind, id, method, params)
}

// responseOf reads frames until the response to id, and returns its envelope.
func responseOf(t *testing.T, host *websocket.Conn, id float64) map[string]any {
	t.Helper()
	for {
		f := readFrame(t, host)
		if f["type"] == "response" && f["id"] == id {
			return f["response"].(map[string]any)
		}
		if f["type"] != "event" {
			t.Fatalf("waiting for the response to %v: %v", id, f)
		}
	}
}

func wantTooLarge(t *testing.T, response map[string]any, message string, limit int) {
	t.Helper()
	failure, _ := response["error"].(map[string]any)
	if response["ok"] != false || failure == nil {
		t.Fatalf("the response: %v, want a provider_error in its place", response)
	}
	details, _ := failure["details"].(map[string]any)
	if failure["type"] != TypeProviderError || failure["retryable"] != false || details == nil ||
		details["reason"] != "too_large" || details["limit"] != float64(limit) {
		t.Fatalf("the error: %v, want provider_error, not retryable, details too_large with limit %d", failure, limit)
	}
	want := fmt.Sprintf("%s is %d bytes, over the WebSocket message cap of %d bytes", message, int(details["bytes"].(float64)), limit)
	if failure["message"] != want || details["bytes"].(float64) <= float64(limit) {
		t.Fatalf("the error's message: %q (bytes %v), want %q", failure["message"], details["bytes"], want)
	}
}

// wantOpen: the connection still serves calls.
func wantOpen(t *testing.T, host *websocket.Conn, id int) {
	t.Helper()
	writeFrame(t, host, callFrame(id, "call", "echo", `{"still":"open"}`))
	if response := responseOf(t, host, float64(id)); response["ok"] != true {
		t.Fatalf("a call after the refused message: %v, want its answer", response)
	}
}

func TestAResponseOverTheWelcomedCapIsReplacedByATypedError(t *testing.T) {
	p := sizedPlugin(make(chan bool, 1))
	host, _, _ := welcomedSession(t, p, time.Minute, `{"type":"welcome","instance":"i-1","max_message_bytes":2048}`)
	host.SetReadLimit(64 << 20)

	writeFrame(t, host, callFrame(1, "call", "big", `{"n":1900}`))
	if response := responseOf(t, host, 1); response["result"] != strings.Repeat("x", 1900) {
		t.Fatalf("a result under the cap: %v, want it sent", response)
	}
	writeFrame(t, host, callFrame(2, "call", "big", `{"n":2048}`))
	wantTooLarge(t, responseOf(t, host, 2), `the result of big`, 2048)
	writeFrame(t, host, callFrame(3, "call", "bad", `{"n":2048}`))
	wantTooLarge(t, responseOf(t, host, 3), `the error of bad`, 2048)
	// Measured as sent: 400 U+2028 are 1,200 bytes of UTF-8, and 2,400 once escaped.
	writeFrame(t, host, callFrame(4, "call", "big", `{"n":400,"sep":true}`))
	wantTooLarge(t, responseOf(t, host, 4), `the result of big`, 2048)
	wantOpen(t, host, 5)
}

func TestAChunkOverTheCapEndsItsStreamWithTheErrorAndStopsTheProducer(t *testing.T) {
	stopped := make(chan bool, 1)
	p := sizedPlugin(stopped)
	host, _, _ := welcomedSession(t, p, time.Minute, `{"type":"welcome","instance":"i-1","max_message_bytes":2048}`)
	host.SetReadLimit(64 << 20)

	writeFrame(t, host, callFrame(1, "stream", "stream", `{"n":3000}`))
	if f := readFrame(t, host); f["type"] != "chunk" || f["data"] != "small" {
		t.Fatalf("the first chunk: %v, want it sent", f)
	}
	wantTooLarge(t, responseOf(t, host, 1), `a chunk of stream`, 2048)
	if !<-stopped {
		t.Fatal("the producer's context did not end after its chunk over the cap")
	}
	wantOpen(t, host, 2)
}

func TestAnEventOverTheCapIsNotSentAndLoggedOnce(t *testing.T) {
	out := capture(t)
	p := sizedPlugin(make(chan bool, 1))
	host, _, _ := welcomedSession(t, p, time.Minute, `{"type":"welcome","instance":"i-1","max_message_bytes":2048}`)
	host.SetReadLimit(64 << 20)
	waitSubscribedHosts(t, p, 1)

	sawSmall := false
	for id := 1; id <= 3; id++ {
		n := map[bool]int{true: 3000, false: 10}[id < 3]
		writeFrame(t, host, callFrame(id, "call", "shout", fmt.Sprintf(`{"n":%d}`, n)))
		// Every frame until this call's answer, events included: only the small one comes.
		for {
			f := readFrame(t, host)
			if f["type"] == "event" {
				if f["data"] != strings.Repeat("x", 10) {
					t.Fatalf("an event over the cap was sent: %.80v", f)
				}
				sawSmall = true
				continue
			}
			if response := f["response"].(map[string]any); f["id"] != float64(id) || response["result"] != "shouted" {
				t.Fatalf("the method that emitted the event: %v, want its result", f)
			}
			break
		}
	}
	if !sawSmall { // sent after its method's answer
		if f := readFrame(t, host); f["type"] != "event" || f["data"] != strings.Repeat("x", 10) {
			t.Fatalf("after the events over the cap: %.80v, want the small one", f)
		}
	}
	got := lines(out)
	if len(got) != 1 || !strings.Contains(got[0], "level=WARN") ||
		!strings.Contains(got[0], `event loud is 3041 bytes, over the WebSocket message cap of 2048 bytes: not sent`) {
		t.Fatalf("the log: %q, want one warning for the first event over the cap", out.String())
	}
}

func TestAWelcomeWithoutAValidCapLeavesTheSDKsOwn(t *testing.T) {
	for _, welcome := range []string{
		`{"type":"welcome"}`, `{"type":"welcome","max_message_bytes":"2048"}`, `{"type":"welcome","max_message_bytes":12.5}`,
		`{"type":"welcome","max_message_bytes":-5}`, `{"type":"welcome","max_message_bytes":1e6}`,
		`{"type":"welcome","max_message_bytes":100}`, `{"type":"welcome","max_message_bytes":null}`,
		`{"type":"welcome","max_message_bytes":[2048]}`, `{"type":"welcome","max_message_bytes":18014398509481984}`,
	} {
		t.Run(welcome, func(t *testing.T) {
			host, _, _ := welcomedSession(t, sizedPlugin(make(chan bool, 1)), time.Minute, welcome)
			host.SetReadLimit(64 << 20)
			writeFrame(t, host, callFrame(1, "call", "big", `{"n":3000}`))
			if response := responseOf(t, host, 1); response["result"] != strings.Repeat("x", 3000) {
				t.Fatalf("after %s: %v, want the result sent", welcome, response)
			}
		})
	}
}

// With no announcement the cap is the SDK's own read cap, 8 MiB, to the byte.
func TestTheDefaultSendCapIsTheSDKsOwnReadCap(t *testing.T) {
	host, _, _ := dialledSession(t, sizedPlugin(make(chan bool, 1)), time.Minute)
	host.SetReadLimit(64 << 20)
	empty, _ := json.Marshal(map[string]any{"type": "response", "id": 1, "response": map[string]any{"ok": true, "result": ""}})
	fits := maxMessageBytes - len(empty)
	writeFrame(t, host, callFrame(1, "call", "big", fmt.Sprintf(`{"n":%d}`, fits)))
	if response := responseOf(t, host, 1); response["ok"] != true {
		t.Fatalf("a response of exactly 8 MiB: %v, want it sent", response["error"])
	}
	writeFrame(t, host, callFrame(2, "call", "big", fmt.Sprintf(`{"n":%d}`, fits+1)))
	wantTooLarge(t, responseOf(t, host, 2), `the result of big`, maxMessageBytes)
	wantOpen(t, host, 3)
}

func TestServeWebSocketKeepsUnderTheCapTheDispatcherAnnounces(t *testing.T) {
	url, _, _ := servedPlugin(t, sizedPlugin(make(chan bool, 1)), nil)
	for _, tc := range []struct {
		announced []string
		limit     int
	}{
		{[]string{"2048"}, 2048},
		{nil, maxMessageBytes},
		{[]string{"abc"}, maxMessageBytes},
		{[]string{"-5"}, maxMessageBytes},
		{[]string{"1e6"}, maxMessageBytes},
		{[]string{"100"}, maxMessageBytes},
		{[]string{"2048", "4096"}, maxMessageBytes},
		{[]string{"99999999999999999"}, maxMessageBytes},
	} {
		header := http.Header{maxMessageCapHeader: tc.announced}
		host := dialServed(t, url, header)
		if f := readFrame(t, host); f["type"] != "hello" {
			t.Fatalf("the first frame: %v", f)
		}
		writeFrame(t, host, callFrame(1, "call", "big", `{"n":3000}`))
		response := responseOf(t, host, 1)
		if tc.limit == 2048 {
			wantTooLarge(t, response, `the result of big`, 2048)
			wantOpen(t, host, 2)
		} else if response["ok"] != true {
			t.Fatalf("announced %q: %v, want the result sent under the SDK's own cap", tc.announced, response)
		}
	}
}

// A stream whose chunks fit is not touched: the counter counts every chunk sent.
func TestChunksUnderTheCapAreSentAsBefore(t *testing.T) {
	p := testPlugin()
	var sent atomic.Int32
	p.StreamingMethod("many", "", func(_ context.Context, _ *Call, send func(any) error) error {
		for i := range 5 {
			if err := send(map[string]int{"i": i}); err != nil {
				return err
			}
			sent.Add(1)
		}
		return nil
	})
	host, _, _ := welcomedSession(t, p, time.Minute, `{"type":"welcome","max_message_bytes":1024}`)
	writeFrame(t, host, callFrame(1, "stream", "many", `null`))
	for i := range 5 {
		f := readFrame(t, host)
		raw, _ := json.Marshal(f)
		if f["type"] != "chunk" || string(raw) != fmt.Sprintf(`{"data":{"i":%d},"id":1,"type":"chunk"}`, i) {
			t.Fatalf("chunk %d: %s", i, raw)
		}
	}
	if response := responseOf(t, host, 1); response["ok"] != true || sent.Load() != 5 {
		t.Fatalf("the stream's end: %v after %d chunks", response, sent.Load())
	}
}

// upgradeCapGateway: a gateway whose 101 carries announced as LinchKit-Max-Message-Bytes
// (one header line per value) and that sends no welcome: the test reads and writes its end.
func upgradeCapGateway(t *testing.T, announced []string) (string, <-chan *websocket.Conn) {
	t.Helper()
	accepted := make(chan *websocket.Conn, 1)
	gateway := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header()[maxMessageCapHeader] = announced
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
	return "ws" + strings.TrimPrefix(gateway.URL, "http") + "/v1/plugins/connect", accepted
}

// connectedTo runs p in connect mode against url until the test ends (no stop grace, so
// it ends at once), and returns the gateway's end of the first connection, the hello read.
func connectedTo(t *testing.T, p *Plugin, url string, accepted <-chan *websocket.Conn) *websocket.Conn {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	ended := make(chan error, 1)
	go func() {
		env := map[string]string{EnvStopGraceMs: "0", EnvStopHooksMs: "0"}
		ended <- p.Run(ctx, Environment{Args: []string{"connect", "-url", url}, Getenv: func(name string) string { return env[name] },
			Stdin: strings.NewReader(""), Stdout: io.Discard})
	}()
	t.Cleanup(func() { cancel(); waitRun(t, ended) })
	select {
	case conn := <-accepted:
		conn.SetReadLimit(64 << 20)
		t.Cleanup(func() { conn.CloseNow() })
		if f := readFrame(t, conn); f["type"] != "hello" {
			t.Fatalf("the first frame: %v, want the hello", f)
		}
		return conn
	case <-time.After(10 * time.Second):
		t.Fatal("the plugin did not dial the gateway within 10 s")
		return nil
	}
}

// The gateway's cap comes on its 101, read before the hello: what the plugin sends before
// any welcome is held to it, the events it kept while no gateway was connected first (the
// one over the cap not sent, and logged), the answers of calls too. An announcement that
// is not one (the same as on a dispatcher's upgrade, two headers included) leaves the
// SDK's own cap.
func TestConnectKeepsUnderTheCapTheGatewaysUpgradeAnnounces(t *testing.T) {
	for _, tc := range []struct {
		announced []string
		limit     int
	}{
		{[]string{"2048"}, 2048},
		{[]string{"abc"}, maxMessageBytes},
		{[]string{"-5"}, maxMessageBytes},
		{[]string{"1e6"}, maxMessageBytes},
		{[]string{"100"}, maxMessageBytes},
		{[]string{"2048", "4096"}, maxMessageBytes},
		{[]string{"99999999999999999"}, maxMessageBytes},
	} {
		t.Run(strings.Join(tc.announced, ","), func(t *testing.T) {
			out := capture(t)
			p := sizedPlugin(make(chan bool, 1))
			// Kept while no gateway is connected: one over 2048 bytes, then a small one.
			p.OnStart(func(context.Context) error {
				if err := p.Emit("loud", strings.Repeat("x", 3000)); err != nil {
					return err
				}
				return p.Emit("loud", strings.Repeat("x", 10))
			})
			url, accepted := upgradeCapGateway(t, tc.announced)
			gateway := connectedTo(t, p, url, accepted)

			if tc.limit == maxMessageBytes {
				if f := readFrame(t, gateway); f["type"] != "event" || f["data"] != strings.Repeat("x", 3000) {
					t.Fatalf("the first kept event: %.80v, want it sent under the SDK's own cap", f)
				}
			}
			if f := readFrame(t, gateway); f["type"] != "event" || f["data"] != strings.Repeat("x", 10) {
				t.Fatalf("announced %q: %.80v, want the small kept event next", tc.announced, f)
			}
			warned := strings.Contains(out.String(),
				"event loud is 3041 bytes, over the WebSocket message cap of 2048 bytes: not sent")
			if warned != (tc.limit == 2048) {
				t.Fatalf("announced %q: the log %q", tc.announced, out.String())
			}
			writeFrame(t, gateway, callFrame(1, "call", "big", `{"n":3000}`))
			response := responseOf(t, gateway, 1)
			if tc.limit == 2048 {
				wantTooLarge(t, response, `the result of big`, 2048)
				wantOpen(t, gateway, 2)
			} else if response["ok"] != true {
				t.Fatalf("announced %q: %v, want the result sent under the SDK's own cap", tc.announced, response)
			}
		})
	}
}

// A valid welcome cap replaces the upgrade's, larger or not; one that is not valid
// leaves the upgrade's in place.
func TestTheWelcomesCapReplacesTheUpgrades(t *testing.T) {
	url, accepted := upgradeCapGateway(t, []string{"2048"})
	gateway := connectedTo(t, sizedPlugin(make(chan bool, 1)), url, accepted)
	for id, step := range []struct {
		welcome string
		limit   int
	}{
		{"", 2048},
		{`{"type":"welcome","max_message_bytes":"100000"}`, 2048},
		{`{"type":"welcome","max_message_bytes":100000}`, 100000},
		{`{"type":"welcome","max_message_bytes":4096}`, 4096},
		{`{"type":"welcome"}`, 4096},
	} {
		if step.welcome != "" {
			writeFrame(t, gateway, step.welcome)
		}
		writeFrame(t, gateway, callFrame(id+1, "call", "big", `{"n":5000}`))
		response := responseOf(t, gateway, float64(id+1))
		if step.limit < 5000 {
			wantTooLarge(t, response, `the result of big`, step.limit)
		} else if response["ok"] != true {
			t.Fatalf("after %s: %v, want the result sent", step.welcome, response)
		}
	}
}
