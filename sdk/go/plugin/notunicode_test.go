package plugin

// A string that is not valid Unicode in what a plugin sends, on the served transports
// (gRPC Call, CallBatch, CallStream, Events; WebSocket call, stream, event): that call's
// provider_error, that batch item's, the stream's after the chunks before it; an event not
// sent and said once on stderr; an error's details left out, its type and message sent
// with U+FFFD for each byte that is not UTF-8. Until 2026-12-08 encoding/json sent U+FFFD
// in place of bytes that are not UTF-8 without a word (a result, a chunk, an event, an
// error's details), a json.RawMessage sent them, or a lone `\ud83d`, as they were (the
// host: "not a response envelope"), and over gRPC an error's message holding them failed
// the call: "grpc: error while marshaling: string field contains invalid UTF-8".

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/coder/websocket"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/linchkit/dispatcher/sdk/go/internal/pluginpb"
)

const (
	notUTF8Message       = "the plugin's result is not JSON: a string is not valid Unicode (bytes that are not UTF-8)"
	loneSurrogateMessage = "the plugin's result is not JSON: a string is not valid Unicode (a lone surrogate)"
)

// cafe is "café" as bytes read from a Latin-1 file: é is the one byte 0xe9, not UTF-8.
var cafe = string([]byte{'c', 'a', 'f', 0xe9})

// unchangedResult holds a real U+FFFD and a backslash followed by "ufffd" (encoding/json
// writes `\\ufffd`): no string in it is refused.
var unchangedResult = map[string]string{"real": "caf\ufffd", "literal": `caf\ufffd`, "both": "\ufffd\\ufffd\\\ufffd"}

const unchangedJSON = `{"both":"�\\ufffd\\�","literal":"caf\\ufffd","real":"caf�"}`

// unchangedRaw: a pre-built JSON text whose escapes are all characters (U+FFFD written as
// an escape, a surrogate pair, letters after a backslash).
const unchangedRaw = `{"escaped":"\ufffd","pair":"\ud83d\ude00","upper":"\uD83D\uDE00","literal":"\\ud83d \\ufffd","text":"smile 😀 ünïcødé"}`

type customer struct {
	Name  string `json:"name"`
	Notes []string
}

// notUnicodePlugin has one method per way a plugin hands the SDK a string that is not valid
// Unicode. Its streams ignore the error send returns: the stream must end with it anyway.
func notUnicodePlugin() *Plugin {
	p := New("test", "0.1.0")
	p.Method("echo", "", func(_ context.Context, call *Call) (any, error) { return call.Params, nil })
	results := map[string]any{
		"value":           map[string]any{"text": cafe},
		"key":             map[string]int{cafe: 1},
		"nested":          []any{1, map[string]any{"deep": []string{"ok", cafe}}},
		"struct":          &customer{Name: "ok", Notes: []string{cafe}},
		"after_backslash": map[string]string{"text": `\` + cafe},
		"raw":             json.RawMessage(`{"text":"` + cafe + `"}`),
		"raw_nested":      map[string]any{"x": json.RawMessage(`"` + cafe + `"`)},
		"raw_lone":        json.RawMessage(`{"text":"smile \ud83d"}`),
		"raw_low":         map[string]any{"x": json.RawMessage(`["\uDE00 after"]`)},
		"raw_high_at_end": json.RawMessage(`"\ud83d\u0041"`),
		"unchanged":       unchangedResult,
		"unchanged_raw":   json.RawMessage(unchangedRaw),
	}
	for name, result := range results {
		p.Method(name, "", func(context.Context, *Call) (any, error) { return result, nil })
	}
	p.Method("err_details", "", func(context.Context, *Call) (any, error) {
		return nil, &Error{Type: "Busy", Message: "details left out", Details: map[string]any{"text": cafe}}
	})
	p.Method("err_message", "", func(context.Context, *Call) (any, error) {
		return nil, &Error{Type: "Latin1" + string([]byte{0xe9}), Message: "bad " + cafe + " \ufffd",
			Details: map[string]any{"kept": true}}
	})
	p.Method("err_plain", "", func(context.Context, *Call) (any, error) { return nil, errors.New("bad " + cafe) })
	p.StreamingMethod("chunks", "", func(_ context.Context, _ *Call, send func(any) error) error {
		_ = send(map[string]int{"i": 0})
		_ = send(map[string]any{"i": 1, "text": "caf\ufffd"})
		_ = send(map[string]any{"i": 2, "text": cafe})
		_ = send(map[string]int{"i": 3})
		return nil
	})
	p.StreamingMethod("raw_chunks", "", func(_ context.Context, _ *Call, send func(any) error) error {
		_ = send(json.RawMessage(`{"i":0}`))
		_ = send(json.RawMessage(`{"i":"\ud800"}`))
		return nil
	})
	p.Method("events", "", func(_ context.Context, call *Call) (any, error) {
		_ = call.Emit("bad", map[string]string{"x": cafe})
		_ = call.Emit("raw", json.RawMessage(`["\udfff"]`))
		_ = call.Emit("n"+string([]byte{0xe9}), 1)
		return true, call.Emit("good", unchangedResult)
	})
	return p
}

// servedGRPC serves p as `serve` does and returns a client of it.
func servedGRPC(t *testing.T, p *Plugin) pluginpb.PluginServiceClient {
	t.Helper()
	conn := dial(t, startPlugin(t, p, []string{"serve", "--address", "127.0.0.1:0"}, nil), insecure.NewCredentials())
	return pluginpb.NewPluginServiceClient(conn)
}

// grpcCall calls method over a served gRPC connection; the call itself must not fail.
func grpcCall(t *testing.T, client pluginpb.PluginServiceClient, method string) *pluginpb.CallReply {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	reply, err := client.Call(ctx, &pluginpb.CallRequest{V: 1, Method: method, ParamsJson: []byte(`{}`)})
	if err != nil {
		t.Fatalf("Call %s: %v", method, err)
	}
	return reply
}

// wsFrame reads the next frame as the host's bytes, which must be UTF-8 (a WebSocket text
// frame that is not is the connection's end for the host), and decoded.
func wsFrame(t *testing.T, host *websocket.Conn) ([]byte, map[string]any) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, data, err := host.Read(ctx)
	if err != nil {
		t.Fatalf("reading a frame: %v", err)
	}
	if !utf8.Valid(data) {
		t.Fatalf("a frame that is not UTF-8: %q", data)
	}
	var f map[string]any
	if err := json.Unmarshal(data, &f); err != nil {
		t.Fatalf("frame %q: %v", data, err)
	}
	return data, f
}

// wsResponse reads frames until the response to id (events are skipped): its bytes and
// its envelope.
func wsResponse(t *testing.T, host *websocket.Conn, id float64) ([]byte, map[string]any) {
	t.Helper()
	for {
		data, f := wsFrame(t, host)
		if f["type"] == "response" && f["id"] == id {
			return data, f["response"].(map[string]any)
		}
		if f["type"] != "event" {
			t.Fatalf("waiting for the response to %v: %q", id, data)
		}
	}
}

// wantRefused: err is the provider_error of a result holding a string not valid Unicode.
func wantRefused(t *testing.T, what string, err *pluginpb.Error, message string) {
	t.Helper()
	if err == nil || err.Type != TypeProviderError || err.Retryable || err.Message != message || err.DetailsJson != nil {
		t.Fatalf("%s: got %v, want a provider_error, not retryable, %q", what, err, message)
	}
}

// wantWSRefused: response is the same over WebSocket.
func wantWSRefused(t *testing.T, what string, data []byte, response map[string]any, message string) {
	t.Helper()
	failure, _ := response["error"].(map[string]any)
	if response["ok"] != false || failure["type"] != TypeProviderError || failure["retryable"] != false ||
		failure["message"] != message || failure["details"] != nil {
		t.Fatalf("%s: got %s, want a provider_error, not retryable, %q", what, data, message)
	}
}

// The methods whose result is refused, and in which words.
var refusedResults = map[string]string{
	"value": notUTF8Message, "key": notUTF8Message, "nested": notUTF8Message, "struct": notUTF8Message,
	"after_backslash": notUTF8Message, "raw": notUTF8Message, "raw_nested": notUTF8Message,
	"raw_lone": loneSurrogateMessage, "raw_low": loneSurrogateMessage, "raw_high_at_end": loneSurrogateMessage,
	// A streaming method called once: the chunks before, and the one refused.
	"chunks": notUTF8Message, "raw_chunks": loneSurrogateMessage,
}

func TestAResultHoldingAStringNotUnicodeIsTheCallsProviderError(t *testing.T) {
	p := notUnicodePlugin()
	client := servedGRPC(t, p)
	for method, message := range refusedResults {
		reply := grpcCall(t, client, method)
		if reply.Ok {
			t.Fatalf("gRPC %s: ok %q, want an error", method, reply.ResultJson)
		}
		wantRefused(t, "gRPC "+method, reply.Error, message)
	}
	host, _, _ := dialledSession(t, p, time.Minute)
	id := 0
	for method, message := range refusedResults {
		id++
		writeFrame(t, host, callFrame(id, "call", method, `{}`))
		data, response := wsResponse(t, host, float64(id))
		wantWSRefused(t, "WebSocket "+method, data, response, message)
	}
	// The plugin serves on.
	if reply := grpcCall(t, client, "echo"); !reply.Ok || string(reply.ResultJson) != `{}` {
		t.Fatalf("echo after: %v", reply)
	}
	wantOpen(t, host, 100)
}

func TestABatchRefusesOnlyTheItemHoldingAStringNotUnicode(t *testing.T) {
	client := servedGRPC(t, notUnicodePlugin())
	item := func(method string) *pluginpb.CallRequest {
		return &pluginpb.CallRequest{V: 1, Method: method, ParamsJson: []byte(`[1]`)}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	reply, err := client.CallBatch(ctx, &pluginpb.BatchRequest{
		Calls: []*pluginpb.CallRequest{item("value"), item("echo"), item("raw_lone"), item("unchanged")},
	})
	if err != nil {
		t.Fatal(err)
	}
	value, echo, lone, unchanged := reply.Results[0], reply.Results[1], reply.Results[2], reply.Results[3]
	wantRefused(t, "the value item", value.Error, notUTF8Message)
	wantRefused(t, "the raw_lone item", lone.Error, loneSurrogateMessage)
	if !echo.Ok || string(echo.ResultJson) != `[1]` {
		t.Fatalf("the echo item: %v, want its answer", echo)
	}
	if !unchanged.Ok || string(unchanged.ResultJson) != unchangedJSON {
		t.Fatalf("the unchanged item: %v, want %s", unchanged, unchangedJSON)
	}
}

func TestAChunkHoldingAStringNotUnicodeEndsTheStreamAfterTheChunksBeforeIt(t *testing.T) {
	p := notUnicodePlugin()
	client := servedGRPC(t, p)
	for method, want := range map[string]string{
		"chunks":     `{"i":0} | {"i":1,"text":"caf�"} | error:a string is not valid Unicode (bytes that are not UTF-8)`,
		"raw_chunks": `{"i":0} | error:a string is not valid Unicode (a lone surrogate)`,
	} {
		if got := strings.Join(grpcStreamOf(t, client, method), " | "); got != want {
			t.Errorf("gRPC CallStream %s:\n got %s\nwant %s", method, got, want)
		}
	}

	host, _, _ := dialledSession(t, p, time.Minute)
	for id, stream := range map[int]struct {
		method, message string
		chunks          []string
	}{
		1: {"chunks", notUTF8Message, []string{`{"i":0}`, `{"i":1,"text":"caf�"}`}},
		2: {"raw_chunks", loneSurrogateMessage, []string{`{"i":0}`}},
	} {
		writeFrame(t, host, callFrame(id, "stream", stream.method, `{}`))
		for _, chunk := range stream.chunks {
			data, f := wsFrame(t, host)
			if f["type"] != "chunk" || !bytes.Contains(data, []byte(`"data":`+chunk)) {
				t.Fatalf("WebSocket stream %s: %q, want the chunk %s", stream.method, data, chunk)
			}
		}
		data, response := wsResponse(t, host, float64(id))
		wantWSRefused(t, "WebSocket stream "+stream.method, data, response, stream.message)
	}
	wantOpen(t, host, 3)
}

// wantOneWarningPerEventNotSent: the log holds one warning for each event refused, in
// every SDK's words.
func wantOneWarningPerEventNotSent(t *testing.T, log string) {
	t.Helper()
	var notSent []string
	for _, line := range strings.Split(log, "\n") {
		if strings.Contains(line, "not sent") {
			notSent = append(notSent, line)
		}
	}
	want := []string{
		`event 'bad' not sent: the data of event 'bad' is not JSON: a string is not valid Unicode (bytes that are not UTF-8)`,
		`event 'raw' not sent: the data of event 'raw' is not JSON: a string is not valid Unicode (a lone surrogate)`,
		`event 'n\\xe9' not sent: its name is not valid Unicode (bytes that are not UTF-8)`,
	}
	if len(notSent) != len(want) {
		t.Fatalf("the log: %q, want one line for each event not sent", log)
	}
	for i, line := range notSent {
		if !strings.Contains(line, "level=WARN") || !strings.Contains(line, want[i]) {
			t.Errorf("log line %q, want a warning with %q", line, want[i])
		}
	}
}

func TestOverGRPCAnEventHoldingAStringNotUnicodeIsNotSentWithOneWarning(t *testing.T) {
	out := capture(t)
	client := servedGRPC(t, notUnicodePlugin())
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	events, err := client.Events(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := events.Header(); err != nil { // the stream is registered
		t.Fatal(err)
	}
	if reply := grpcCall(t, client, "events"); !reply.Ok {
		t.Fatalf("events: %v", reply)
	}
	// Emitted after the two refused: the first to arrive.
	if event, err := events.Recv(); err != nil || event.Name != "good" || string(event.DataJson) != unchangedJSON {
		t.Fatalf("the first event: %v, %v; want good %s", event, err, unchangedJSON)
	}
	wantOneWarningPerEventNotSent(t, out.String())
}

func TestOverWebSocketAnEventHoldingAStringNotUnicodeIsNotSentWithOneWarning(t *testing.T) {
	out := capture(t)
	p := notUnicodePlugin()
	host, _, _ := dialledSession(t, p, time.Minute)
	waitSubscribedHosts(t, p, 1)
	writeFrame(t, host, callFrame(1, "call", "events", `{}`))
	var events []string
	answered := false
	for !answered || len(events) == 0 { // an event may come after its method's answer
		data, f := wsFrame(t, host)
		switch {
		case f["type"] == "event":
			events = append(events, string(data))
		case f["type"] == "response" && f["id"] == 1.0:
			answered = true
		default:
			t.Fatalf("waiting for the answer to events: %q", data)
		}
	}
	if want := `{"data":` + unchangedJSON + `,"event":"good","type":"event"}`; len(events) != 1 || events[0] != want {
		t.Fatalf("events sent: %q, want only %s", events, want)
	}
	wantOneWarningPerEventNotSent(t, out.String())
	if err := p.Emit("bad", []string{cafe}); err == nil ||
		err.Error() != "provider_error: event 'bad' not sent: the data of event 'bad' is not JSON: a string is not valid Unicode (bytes that are not UTF-8)" {
		t.Fatalf("Emit: %v, want the reason it was not sent", err)
	}
	wantOpen(t, host, 2)
}

func TestAnErrorsDetailsHoldingAStringNotUnicodeAreLeftOut(t *testing.T) {
	p := notUnicodePlugin()
	reply := grpcCall(t, servedGRPC(t, p), "err_details")
	if reply.Ok || reply.Error.Type != "Busy" || reply.Error.Message != "details left out" || reply.Error.DetailsJson != nil {
		t.Fatalf("over gRPC: %v, want Busy without details", reply)
	}
	host, _, _ := dialledSession(t, p, time.Minute)
	writeFrame(t, host, callFrame(1, "call", "err_details", `{}`))
	data, response := wsResponse(t, host, 1)
	failure, _ := response["error"].(map[string]any)
	if _, has := failure["details"]; failure["type"] != "Busy" || failure["message"] != "details left out" || has {
		t.Fatalf("over WebSocket: %s, want Busy without details", data)
	}
}

func TestAnErrorsMessageHoldingBytesNotUTF8IsSentWithUFFFD(t *testing.T) {
	p := notUnicodePlugin()
	client := servedGRPC(t, p)
	host, _, _ := dialledSession(t, p, time.Minute)
	for id, want := range map[int]struct{ method, errorType, message, details string }{
		// Each byte not UTF-8 is one U+FFFD; a real U+FFFD stays one.
		1: {"err_message", "Latin1\ufffd", "bad caf\ufffd \ufffd", `{"kept":true}`},
		2: {"err_plain", "PluginError", "bad caf\ufffd", ""},
	} {
		reply := grpcCall(t, client, want.method)
		if reply.Ok || reply.Error.Type != want.errorType || reply.Error.Message != want.message ||
			string(reply.Error.DetailsJson) != want.details {
			t.Fatalf("gRPC %s: %v, want %q %q %s", want.method, reply, want.errorType, want.message, want.details)
		}
		writeFrame(t, host, callFrame(id, "call", want.method, `{}`))
		data, response := wsResponse(t, host, float64(id))
		failure, _ := response["error"].(map[string]any)
		details, _ := json.Marshal(failure["details"])
		if want.details == "" {
			details = nil
		}
		if failure["type"] != want.errorType || failure["message"] != want.message || string(details) != want.details {
			t.Fatalf("WebSocket %s: %s, want %q %q %s", want.method, data, want.errorType, want.message, want.details)
		}
	}
}

// No false refusal: a real U+FFFD, a backslash followed by "ufffd", a pre-built JSON text's
// escapes of characters (U+FFFD, a surrogate pair) go out as they are, on every transport.
func TestAStringHoldingUFFFDOrABackslashUFFFDIsSentUnchanged(t *testing.T) {
	p := notUnicodePlugin()
	client := servedGRPC(t, p)
	echoed := `{"text":"smile 😀 ünïcødé \\ud83d \ufffd","escaped":"\ufffd \ud83d\ude00"}`
	for method, want := range map[string]string{"unchanged": unchangedJSON, "unchanged_raw": unchangedRaw} {
		if reply := grpcCall(t, client, method); !reply.Ok || string(reply.ResultJson) != want {
			t.Fatalf("gRPC %s: %v, want %s", method, reply, want)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	reply, err := client.Call(ctx, &pluginpb.CallRequest{V: 1, Method: "echo", ParamsJson: []byte(echoed)})
	if err != nil || !reply.Ok || string(reply.ResultJson) != echoed {
		t.Fatalf("gRPC echo: %v %v, want %s", reply, err, echoed)
	}

	host, _, _ := dialledSession(t, p, time.Minute)
	for id, call := range map[int]struct{ method, params, want string }{
		1: {"unchanged", `{}`, unchangedJSON},
		2: {"unchanged_raw", `{}`, unchangedRaw},
		3: {"echo", echoed, echoed},
	} {
		writeFrame(t, host, callFrame(id, "call", call.method, call.params))
		data, response := wsResponse(t, host, float64(id))
		if response["ok"] != true || !bytes.Contains(data, []byte(`"result":`+call.want+`}`)) {
			t.Fatalf("WebSocket %s: %s, want the result %s", call.method, data, call.want)
		}
	}
}
