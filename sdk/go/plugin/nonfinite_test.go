package plugin

// What JSON cannot carry (a NaN, an infinity, a json.RawMessage that is not JSON), on every
// transport of the SDK: that call's provider_error, that batch item's, the stream's; an
// event not sent and said once on stderr. Until 2026-12-07 a result holding a NaN was a
// "PluginError" in encoding/json's words, a json.RawMessage holding one went out over gRPC
// as a bare NaN token no host can read, and over WebSocket the call got no answer at all
// (the host waited for its deadline) and a chunk or an event was skipped without a word.

import (
	"context"
	"encoding/json"
	"io"
	"math"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/credentials/insecure"

	"github.com/linchkit/dispatcher/sdk/go/internal/pluginpb"
)

const notJSONPrefix = "the plugin's result is not JSON: "

// nonFinitePlugin has one method per way a plugin hands the SDK what JSON cannot carry.
// Its streams ignore the error send returns: the stream must end with it all the same.
func nonFinitePlugin() *Plugin {
	p := New("test", "0.1.0")
	p.Method("echo", "", func(_ context.Context, call *Call) (any, error) { return call.Params, nil })
	p.Method("nan", "", func(context.Context, *Call) (any, error) {
		return map[string]any{"x": math.NaN(), "missing": nil}, nil
	})
	p.Method("nested_inf", "", func(context.Context, *Call) (any, error) {
		return []any{1.5, map[string][]float64{"deep": {math.Inf(-1)}}}, nil
	})
	p.Method("raw", "", func(context.Context, *Call) (any, error) { return json.RawMessage(`{"x":NaN}`), nil })
	p.Method("raw_nested", "", func(context.Context, *Call) (any, error) {
		return map[string]any{"x": json.RawMessage(`Infinity`)}, nil
	})
	p.Method("null", "", func(context.Context, *Call) (any, error) {
		return map[string]any{"x": 1.5, "missing": nil}, nil
	})
	p.Method("inf_retry_after", "", func(context.Context, *Call) (any, error) {
		return nil, &Error{Type: "Busy", Message: "never", Details: map[string]any{"score": math.NaN()}, RetryAfter: math.Inf(1)}
	})
	p.StreamingMethod("chunks", "", func(_ context.Context, _ *Call, send func(any) error) error {
		_ = send(map[string]float64{"i": 0})
		_ = send(map[string]float64{"i": math.Inf(1)})
		_ = send(map[string]float64{"i": 2})
		return nil
	})
	p.StreamingMethod("raw_chunks", "", func(_ context.Context, _ *Call, send func(any) error) error {
		_ = send(json.RawMessage(`{"i":0}`))
		_ = send(json.RawMessage(`NaN`))
		return nil
	})
	p.Method("events", "", func(_ context.Context, call *Call) (any, error) {
		_ = call.Emit("bad", map[string]float64{"x": math.NaN()})
		_ = call.Emit("raw", json.RawMessage(`[Infinity]`))
		return true, call.Emit("good", map[string]int{"x": 1})
	})
	return p
}

// wantNotJSON: err is the provider_error of a result JSON cannot carry, saying why.
func wantNotJSON(t *testing.T, what string, err *pluginpb.Error, reason string) {
	t.Helper()
	if err == nil || err.Type != TypeProviderError || err.Retryable || !strings.HasPrefix(err.Message, notJSONPrefix) ||
		!strings.Contains(err.Message, reason) {
		t.Fatalf("%s: got %v, want a provider_error %q…%q", what, err, notJSONPrefix, reason)
	}
}

func TestAResultJSONCannotCarryIsTheCallsProviderError(t *testing.T) {
	p := nonFinitePlugin()
	for method, reason := range map[string]string{
		"nan":        "NaN is not a JSON number",
		"nested_inf": "-Inf is not a JSON number",
		"raw":        "json.RawMessage: invalid character 'N' looking for beginning of value",
		"raw_nested": "json.RawMessage: invalid character 'I' looking for beginning of value",
		// A streaming method called once: its chunks, the one JSON cannot carry included.
		"chunks":     "+Inf is not a JSON number",
		"raw_chunks": "json.RawMessage: invalid character 'N' looking for beginning of value",
	} {
		reply := call(t, p, method, `{}`, 0)
		if reply.Ok {
			t.Fatalf("%s: ok %s, want an error", method, reply.ResultJson)
		}
		wantNotJSON(t, method, reply.Error, reason)
	}
	// A null the method returned is no NaN; and the plugin serves on.
	if reply := call(t, p, "null", `{}`, 0); !reply.Ok || string(reply.ResultJson) != `{"missing":null,"x":1.5}` {
		t.Fatalf("null: %v, want its result", reply)
	}
}

func TestABatchRefusesOnlyTheItemJSONCannotCarry(t *testing.T) {
	s := newService(nonFinitePlugin(), true)
	item := func(method string) *pluginpb.CallRequest {
		return &pluginpb.CallRequest{V: 1, Method: method, ParamsJson: []byte(`[1]`)}
	}
	reply, err := s.CallBatch(context.Background(), &pluginpb.BatchRequest{
		Calls: []*pluginpb.CallRequest{item("nan"), item("echo"), item("raw")},
	})
	if err != nil {
		t.Fatal(err)
	}
	nan, echo, raw := reply.Results[0], reply.Results[1], reply.Results[2]
	wantNotJSON(t, "the nan item", nan.Error, "NaN is not a JSON number")
	wantNotJSON(t, "the raw item", raw.Error, "invalid character 'N'")
	if !echo.Ok || string(echo.ResultJson) != `[1]` {
		t.Fatalf("the echo item: %v, want its answer", echo)
	}
}

// The details JSON cannot carry are dropped, and a retry_after of +Inf is none: the error
// still goes out, over gRPC and WebSocket alike.
func TestAnErrorsPartsJSONCannotCarryAreDropped(t *testing.T) {
	reply := call(t, nonFinitePlugin(), "inf_retry_after", `{}`, 0)
	if reply.Ok || reply.Error.Type != "Busy" || reply.Error.DetailsJson != nil {
		t.Fatalf("over gRPC: %v, want Busy without details", reply)
	}
	host, _, _ := dialledSession(t, nonFinitePlugin(), time.Minute)
	writeFrame(t, host, callFrame(1, "call", "inf_retry_after", `{}`))
	failure, _ := responseOf(t, host, 1)["error"].(map[string]any)
	if _, has := failure["retry_after"]; failure["type"] != "Busy" || failure["details"] != nil || has {
		t.Fatalf("over WebSocket: %v, want Busy without details or retry_after", failure)
	}
}

// grpcStreamOf calls method as a stream over a real gRPC server: each item, a chunk's JSON
// or "error:" and the error's message.
func grpcStreamOf(t *testing.T, client pluginpb.PluginServiceClient, method string) []string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	stream, err := client.CallStream(ctx, &pluginpb.CallRequest{V: 1, Method: method, ParamsJson: []byte(`{}`)})
	if err != nil {
		t.Fatal(err)
	}
	var items []string
	for {
		item, err := stream.Recv()
		if err == io.EOF {
			return items
		}
		if err != nil {
			t.Fatalf("%s: %v", method, err)
		}
		if e := item.GetError(); e != nil {
			wantNotJSON(t, method, e, "")
			items = append(items, "error:"+strings.TrimPrefix(e.Message, notJSONPrefix))
		} else {
			items = append(items, string(item.GetChunkJson()))
		}
	}
}

func TestOverGRPCAChunkJSONCannotCarryEndsTheStreamAndAnEventIsNotSent(t *testing.T) {
	out := capture(t)
	p := nonFinitePlugin()
	conn := dial(t, startPlugin(t, p, []string{"serve", "--address", "127.0.0.1:0"}, nil), insecure.NewCredentials())
	client := pluginpb.NewPluginServiceClient(conn)

	for method, want := range map[string]string{
		"chunks":     `{"i":0} | error:+Inf is not a JSON number`,
		"raw_chunks": `{"i":0} | error:error calling MarshalJSON for type json.RawMessage: invalid character 'N' looking for beginning of value`,
		"raw":        `error:error calling MarshalJSON for type json.RawMessage: invalid character 'N' looking for beginning of value`,
	} {
		if got := strings.Join(grpcStreamOf(t, client, method), " | "); got != want {
			t.Errorf("CallStream %s:\n got %s\nwant %s", method, got, want)
		}
	}

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	events, err := client.Events(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := events.Header(); err != nil { // the stream is registered
		t.Fatal(err)
	}
	if reply, err := client.Call(ctx, &pluginpb.CallRequest{V: 1, Method: "events"}); err != nil || !reply.Ok {
		t.Fatalf("events: %v, %v", reply, err)
	}
	// Emitted after the two JSON cannot carry: the first to arrive.
	if event, err := events.Recv(); err != nil || event.Name != "good" || string(event.DataJson) != `{"x":1}` {
		t.Fatalf("the first event: %v, %v; want good {\"x\":1}", event, err)
	}
	wantNotSentLogged(t, out)
}

// wantNotSentLogged: one warning for each event JSON cannot carry, in every SDK's words.
func wantNotSentLogged(t *testing.T, out interface{ String() string }) {
	t.Helper()
	var notSent []string
	for _, line := range strings.Split(out.String(), "\n") {
		if strings.Contains(line, "not sent") {
			notSent = append(notSent, line)
		}
	}
	want := []string{
		`event 'bad' not sent: the data of event 'bad' is not JSON: NaN is not a JSON number`,
		`event 'raw' not sent: the data of event 'raw' is not JSON: error calling MarshalJSON for type json.RawMessage: invalid character 'I'`,
	}
	if len(notSent) != len(want) {
		t.Fatalf("the log: %q, want one line for each event not sent", out.String())
	}
	for i, line := range notSent {
		if !strings.Contains(line, "level=WARN") || !strings.Contains(line, want[i]) {
			t.Errorf("log line %q, want a warning with %q", line, want[i])
		}
	}
}

func TestEmitSaysWhyAnEventIsNotSent(t *testing.T) {
	capture(t)
	err := New("test", "0.1.0").Emit("bad", math.Inf(-1))
	want := `event 'bad' not sent: the data of event 'bad' is not JSON: -Inf is not a JSON number`
	if err == nil || !strings.Contains(err.Error(), want) {
		t.Fatalf("Emit: %v, want %q", err, want)
	}
}

func TestOverWebSocketWhatJSONCannotCarryIsAnsweredAndAnEventIsNotSent(t *testing.T) {
	out := capture(t)
	p := nonFinitePlugin()
	host, _, _ := dialledSession(t, p, time.Minute)
	waitSubscribedHosts(t, p, 1)

	for id, method := range []string{"nan", "raw", "raw_nested", "chunks"} {
		writeFrame(t, host, callFrame(id+1, "call", method, `{}`))
		failure, _ := responseOf(t, host, float64(id+1))["error"].(map[string]any)
		if message, _ := failure["message"].(string); failure["type"] != TypeProviderError ||
			failure["retryable"] != false || !strings.HasPrefix(message, notJSONPrefix) {
			t.Fatalf("call %s: %v, want a provider_error %q…", method, failure, notJSONPrefix)
		}
	}
	for id, method := range map[int]string{11: "chunks", 12: "raw_chunks"} {
		writeFrame(t, host, callFrame(id, "stream", method, `{}`))
		if f := readFrame(t, host); f["type"] != "chunk" || f["data"].(map[string]any)["i"] != 0.0 {
			t.Fatalf("stream %s: %v, want its first chunk", method, f)
		}
		failure, _ := responseOf(t, host, float64(id))["error"].(map[string]any)
		if message, _ := failure["message"].(string); failure["type"] != TypeProviderError ||
			!strings.HasPrefix(message, notJSONPrefix) {
			t.Fatalf("stream %s: %v, want it ended by a provider_error %q…", method, failure, notJSONPrefix)
		}
	}

	writeFrame(t, host, callFrame(21, "call", "events", `{}`))
	var events []string
	for {
		f := readFrame(t, host)
		if f["type"] == "event" {
			events = append(events, f["event"].(string))
			continue
		}
		if f["type"] != "response" || f["id"] != 21.0 {
			t.Fatalf("waiting for the answer to events: %v", f)
		}
		break
	}
	if len(events) == 0 { // sent after its method's answer
		events = append(events, readFrame(t, host)["event"].(string))
	}
	if strings.Join(events, ",") != "good" {
		t.Fatalf("events sent: %v, want only good", events)
	}
	wantNotSentLogged(t, out)
	wantOpen(t, host, 22)
}
