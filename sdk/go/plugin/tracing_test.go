package plugin

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"go.opentelemetry.io/otel/attribute"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"

	"github.com/linchkit/dispatcher/sdk/go/internal/pluginpb"
)

const (
	parentTrace = "4bf92f3577b34da6a3ce929d0e0e4736"
	parentSpan  = "00f067aa0ba902b7"
)

// tracedPlugin is testPlugin with tracing on, its spans kept in memory (the OTLP export
// itself is tested end to end by tests/test_telemetry_tracing.py).
func tracedPlugin(t *testing.T) (*Plugin, *tracetest.InMemoryExporter) {
	t.Helper()
	exporter := tracetest.NewInMemoryExporter()
	provider := sdktrace.NewTracerProvider(sdktrace.WithSyncer(exporter))
	t.Cleanup(func() { _ = provider.Shutdown(context.Background()) })
	p := testPlugin()
	p.tracing = &tracing{provider: provider, tracer: provider.Tracer("linchkit.plugin")}
	return p, exporter
}

func tracedCall(p *Plugin, method, traceparent string) *pluginpb.CallReply {
	return p.invoke(context.Background(), &pluginpb.CallRequest{
		V: 1, Method: method, ParamsJson: []byte(`{"n": 1}`),
		Context: &pluginpb.CallContext{RequestId: "r1", Traceparent: traceparent},
	})
}

func attributes(span tracetest.SpanStub) map[attribute.Key]string {
	found := map[attribute.Key]string{}
	for _, kv := range span.Attributes {
		found[kv.Key] = kv.Value.Emit()
	}
	return found
}

func TestACallContinuesTheDispatchersTrace(t *testing.T) {
	p, exporter := tracedPlugin(t)
	var inHandler trace.SpanContext
	p.Method("sees", "", func(ctx context.Context, _ *Call) (any, error) {
		inHandler = trace.SpanContextFromContext(ctx)
		return nil, nil
	})
	reply := tracedCall(p, "sees", "00-"+parentTrace+"-"+parentSpan+"-01")
	if !reply.GetOk() {
		t.Fatalf("reply %v", reply)
	}
	spans := exporter.GetSpans()
	if len(spans) != 1 {
		t.Fatalf("%d spans, want 1", len(spans))
	}
	span := spans[0]
	if span.Name != "linchkit.plugin/sees" || span.SpanKind != trace.SpanKindServer {
		t.Errorf("span %q of kind %v", span.Name, span.SpanKind)
	}
	if got := span.SpanContext.TraceID().String(); got != parentTrace {
		t.Errorf("trace id %s, want the dispatcher's %s", got, parentTrace)
	}
	if got := span.Parent.SpanID().String(); got != parentSpan || !span.Parent.IsRemote() {
		t.Errorf("parent %s (remote %v), want the attempt span %s", got, span.Parent.IsRemote(), parentSpan)
	}
	if inHandler.SpanID() != span.SpanContext.SpanID() {
		t.Errorf("the method's ctx carries span %s, not the call's %s", inHandler.SpanID(), span.SpanContext.SpanID())
	}
	want := map[attribute.Key]string{attrMethod: "sees", attrPlugin: "test", attrRequestID: "r1", attrOutcome: "ok"}
	for key, value := range want {
		if got := attributes(span)[key]; got != value {
			t.Errorf("%s = %q, want %q", key, got, value)
		}
	}
}

func TestAFailedCallRecordsItsErrorType(t *testing.T) {
	p, exporter := tracedPlugin(t)
	tracedCall(p, "typed", "00-"+parentTrace+"-"+parentSpan+"-01")
	tracedCall(p, "panics", "")
	spans := exporter.GetSpans()
	if len(spans) != 2 {
		t.Fatalf("%d spans, want 2", len(spans))
	}
	for i, want := range []string{"Overdrawn", "PluginError"} {
		got := attributes(spans[i])
		if got[attrOutcome] != want || got[attrErrorType] != want || spans[i].Status.Code.String() != "Error" {
			t.Errorf("span %d: outcome %q, error.type %q, status %v; want %s", i, got[attrOutcome], got[attrErrorType], spans[i].Status, want)
		}
	}
}

func TestAMalformedTraceparentStartsANewTrace(t *testing.T) {
	for _, traceparent := range []string{
		"garbage",
		"00-" + strings.Repeat("0", 32) + "-" + strings.Repeat("0", 16) + "-01", // all-zero ids are invalid
		"00-" + parentTrace + "-" + parentSpan,                                  // no flags
		strings.Repeat("x", 100_000),
		"",
	} {
		p, exporter := tracedPlugin(t)
		if reply := tracedCall(p, "echo", traceparent); !reply.GetOk() {
			t.Fatalf("traceparent %.20q: the call failed: %v", traceparent, reply)
		}
		spans := exporter.GetSpans()
		if len(spans) != 1 {
			t.Fatalf("traceparent %.20q: %d spans, want 1", traceparent, len(spans))
		}
		if spans[0].Parent.IsValid() || !spans[0].SpanContext.IsValid() || spans[0].SpanContext.TraceID().String() == parentTrace {
			t.Errorf("traceparent %.20q: want a root span of a new trace, got parent %v", traceparent, spans[0].Parent)
		}
	}
}

func TestAStreamedCallIsTracedToo(t *testing.T) {
	p, exporter := tracedPlugin(t)
	s := newService(p, true)
	defer s.health.Shutdown()
	conn := serveOnLoopback(t, s)
	stream, err := pluginpb.NewPluginServiceClient(conn).CallStream(context.Background(), &pluginpb.CallRequest{
		V: 1, Method: "count", Context: &pluginpb.CallContext{Traceparent: "00-" + parentTrace + "-" + parentSpan + "-01"},
	})
	if err != nil {
		t.Fatal(err)
	}
	for {
		if _, err := stream.Recv(); err != nil {
			break
		}
	}
	spans := exporter.GetSpans()
	if len(spans) != 1 || spans[0].Name != "linchkit.plugin/count" || spans[0].Parent.SpanID().String() != parentSpan {
		t.Fatalf("spans %+v", spans)
	}
}

func TestTracingIsOffWithoutAnEndpoint(t *testing.T) {
	empty := func(string) string { return "" }
	traces, err := tracingFromEnv(context.Background(), empty, testPlugin())
	if traces != nil || err != nil {
		t.Fatalf("tracing %v, error %v; want neither", traces, err)
	}
	disabled := map[string]string{EnvOTLPEndpoint: "http://127.0.0.1:4318", envSDKDisabled: "true"}
	if traces, _ := tracingFromEnv(context.Background(), func(k string) string { return disabled[k] }, testPlugin()); traces != nil {
		t.Fatal("OTEL_SDK_DISABLED=true still traced")
	}
	// Off, a call goes through untouched: no span, nothing in ctx.
	p := testPlugin()
	var inHandler trace.SpanContext
	p.Method("sees", "", func(ctx context.Context, _ *Call) (any, error) {
		inHandler = trace.SpanContextFromContext(ctx)
		return nil, nil
	})
	tracedCall(p, "sees", "00-"+parentTrace+"-"+parentSpan+"-01")
	if inHandler.IsValid() {
		t.Errorf("tracing off, yet the method's ctx carries %v", inHandler)
	}
}

func TestTheTracesEndpoint(t *testing.T) {
	cases := []struct {
		vars map[string]string
		want string
	}{
		{map[string]string{EnvOTLPEndpoint: "http://collector:4318/"}, "http://collector:4318/v1/traces"},
		{map[string]string{EnvOTLPEndpoint: "http://a:4318", EnvOTLPTracesEndpoint: "http://b:9/traces"}, "http://b:9/traces"},
		{map[string]string{}, ""},
	}
	for _, c := range cases {
		if got := tracesEndpoint(func(k string) string { return c.vars[k] }); got != c.want {
			t.Errorf("%v: %q, want %q", c.vars, got, c.want)
		}
	}
}

func TestTruncateKeepsUTF8Valid(t *testing.T) {
	if got := truncate("aé", 2); got != "a" {
		t.Errorf("truncate split a character: %q", got)
	}
}

// serveOnLoopback serves s on a loopback port for the test's length; a client of it.
func serveOnLoopback(t *testing.T, s *service) *grpc.ClientConn {
	t.Helper()
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	server := grpc.NewServer()
	pluginpb.RegisterPluginServiceServer(server, s)
	go func() { _ = server.Serve(listener) }()
	t.Cleanup(server.Stop)
	conn, err := grpc.NewClient(listener.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

// collectorSecret is in the collector's URL (its password and its query) and headers: no
// line may show it.
const collectorSecret = "s3cret-collector-token"

// stoppedAfterATracedCall serves testPlugin with its spans going to collector (both stop
// caps 0, the secret in the headers too), makes one call (one span buffered for the flush
// at the stop), stops it, and returns how long the stop took and what the SDK logged.
func stoppedAfterATracedCall(t *testing.T, collector string) (time.Duration, string) {
	t.Helper()
	out := capture(t)
	vars := map[string]string{
		EnvOTLPTracesEndpoint:               collector,
		"OTEL_EXPORTER_OTLP_TRACES_HEADERS": "authorization=Bearer%20" + collectorSecret,
		EnvStopGraceMs:                      "0",
		EnvStopHooksMs:                      "0",
	}
	for name, value := range vars {
		t.Setenv(name, value) // the exporter reads its headers from the process's environment
	}
	reader, writer := io.Pipe()
	env := Environment{Args: []string{"serve", "--address", "127.0.0.1:0"}, Getenv: func(k string) string { return vars[k] },
		Stdin: strings.NewReader(""), Stdout: writer}
	p := testPlugin()
	ctx, stop := context.WithCancel(context.Background())
	defer stop()
	returned := make(chan error, 1)
	go func() { returned <- p.Run(ctx, env) }()
	if _, err := bufio.NewReader(reader).ReadString('\n'); err != nil { // the handshake line
		t.Fatal(err)
	}
	go func() { _, _ = io.Copy(io.Discard, reader) }()
	tracedCall(p, "echo", "") // one span buffered for the flush at the stop
	began := time.Now()
	stop()
	select {
	case err := <-returned:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the plugin did not stop within 30 s")
	}
	return time.Since(began), out.String() // Run has returned: nothing writes to out any more
}

// droppedLine is the one line of said that says spans were dropped, after checking it is
// one, a warning, and shows nothing of the collector's URL but shown.
func droppedLine(t *testing.T, said, shown string) string {
	t.Helper()
	var dropped []string
	for _, line := range strings.Split(said, "\n") {
		if strings.Contains(line, "spans dropped") {
			dropped = append(dropped, line)
		}
	}
	if len(dropped) != 1 {
		t.Fatalf("want one line saying the spans were dropped, got %q", said)
	}
	line := dropped[0]
	if match := slogLine.FindStringSubmatch(line); match == nil || match[1] != "WARN" {
		t.Errorf("want a level=WARN line, got %q", line)
	}
	if !strings.Contains(line, "the trace collector at "+shown+" ") {
		t.Errorf("want the collector named as %s, got %q", shown, line)
	}
	for _, hidden := range []string{collectorSecret, "/v1/traces", "collector@", "?"} {
		if strings.Contains(line, hidden) {
			t.Errorf("the line shows %q of the collector's URL: %q", hidden, line)
		}
	}
	if strings.Contains(said, collectorSecret) {
		t.Errorf("the secret shows in what the SDK said: %q", said)
	}
	return line
}

// A collector that accepts and never answers keeps the stop no longer than grace + hooks +
// spanFlushMargin: the spans still buffered get what remains of the hooks' cap (here none),
// not a fixed 5 s past the operator's caps. The spans are dropped then, with one line
// naming the collector by scheme://host:port only, as every SDK names it.
func TestASilentCollectorDoesNotOutlastTheStopsCaps(t *testing.T) {
	silent, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { silent.Close() })
	go func() {
		for {
			conn, err := silent.Accept()
			if err != nil {
				return
			}
			t.Cleanup(func() { conn.Close() }) // held open, never answered
		}
	}()
	took, said := stoppedAfterATracedCall(t,
		"http://collector:"+collectorSecret+"@"+silent.Addr().String()+"/v1/traces?key="+collectorSecret)
	// The margin is 1 s; the rest is slack for a slow machine, well short of the old 5 s.
	if took > spanFlushMargin+2500*time.Millisecond {
		t.Errorf("the stop took %v with a silent collector, want about grace + hooks + %v", took, spanFlushMargin)
	}
	line := droppedLine(t, said, "http://"+silent.Addr().String())
	if !strings.Contains(line, "did not take them within the 1 s the stop's caps left") {
		t.Errorf("want the time the stop gave them, got %q", line)
	}
}

func TestTheCollectorIsNamedByItsSchemeHostAndPortOnly(t *testing.T) {
	for endpoint, want := range map[string]string{
		"http://127.0.0.1:4318/v1/traces":                       "http://127.0.0.1:4318",
		"https://user:pass@collector.example:443/v1/traces?k=v": "https://collector.example:443",
		"HTTP://collector.example/v1/traces#frag":               "http://collector.example",
		"http://[::1]:4318/v1/traces":                           "http://[::1]:4318",
		" http://collector.example:4318 ":                       "http://collector.example:4318",
		"collector.example:4318":                                malformedCollector,
		"http://user:pass@/v1/traces":                           malformedCollector,
		"http://collector.example:port/":                        malformedCollector,
		"http://%zz@collector.example/":                         malformedCollector,
		"":                                                      malformedCollector,
	} {
		if got := collectorShown(endpoint); got != want {
			t.Errorf("collectorShown(%q) = %q, want %q", endpoint, got, want)
		}
	}
}

func TestScrubbedNeverShowsThePassword(t *testing.T) {
	endpoint := "http://collector:" + collectorSecret + "@127.0.0.1:4318/v1/traces"
	quoting := fmt.Errorf("failed to send to %s: 401 Unauthorized", endpoint)
	if got, want := scrubbed(quoting, endpoint), "failed to send to http://127.0.0.1:4318: 401 Unauthorized"; got != want {
		t.Errorf("scrubbed = %q, want %q", got, want)
	}
	elsewhere := fmt.Errorf("the password %s is wrong", collectorSecret)
	if got := scrubbed(elsewhere, endpoint); strings.Contains(got, collectorSecret) {
		t.Errorf("scrubbed shows the password: %q", got)
	}
}

// Over WebSocket a call and a stream are traced as over gRPC: one span each, child of the
// attempt, a stream's lasting until its last chunk and ending with its outcome.
func TestWebSocketCallsAndStreamsAreTraced(t *testing.T) {
	p, exporter := tracedPlugin(t)
	p.StreamingMethod("breaks", "", func(_ context.Context, _ *Call, send func(any) error) error {
		if err := send(1); err != nil {
			return err
		}
		return &Error{Type: "Overdrawn", Message: "balance is 100"}
	})
	host, _, _ := dialledSession(t, p, time.Minute)
	traceparent := "00-" + parentTrace + "-" + parentSpan + "-01"
	writeFrame(t, host, `{"type":"call","id":1,"request":{"v":1,"plugin":"test","method":"echo","params":{"n":1},"context":{"request_id":"r1","traceparent":"`+traceparent+`"}}}`)
	if f := readFrame(t, host); f["type"] != "response" || f["id"] != 1.0 {
		t.Fatalf("the call's answer: %v", f)
	}
	writeFrame(t, host, `{"type":"stream","id":2,"request":{"v":1,"plugin":"test","method":"count","params":null,"context":{"request_id":"r2","traceparent":"`+traceparent+`"}}}`)
	for {
		if f := readFrame(t, host); f["type"] == "response" {
			break
		}
	}
	long := strings.Repeat("r", 300)
	writeFrame(t, host, `{"type":"stream","id":3,"request":{"v":1,"plugin":"test","method":"breaks","params":null,"context":{"request_id":"`+long+`","traceparent":"garbage"}}}`)
	for {
		if f := readFrame(t, host); f["type"] == "response" {
			break
		}
	}

	spans := exporter.GetSpans()
	if len(spans) != 3 {
		t.Fatalf("%d spans, want 3 (a call, a stream, a failed stream): %+v", len(spans), spans)
	}
	for i, want := range []struct {
		method, requestID, outcome string
		child                      bool
	}{{"echo", "r1", "ok", true}, {"count", "r2", "ok", true}, {"breaks", long[:128], "Overdrawn", false}} {
		span := spans[i]
		if span.Name != "linchkit.plugin/"+want.method || span.SpanKind != trace.SpanKindServer {
			t.Errorf("span %d: %q of kind %v", i, span.Name, span.SpanKind)
		}
		if want.child && (span.SpanContext.TraceID().String() != parentTrace || span.Parent.SpanID().String() != parentSpan) {
			t.Errorf("span %d: trace %s parent %s, want the attempt span %s", i, span.SpanContext.TraceID(), span.Parent.SpanID(), parentSpan)
		}
		if !want.child && (span.Parent.IsValid() || span.SpanContext.TraceID().String() == parentTrace) {
			t.Errorf("span %d: a malformed traceparent, yet parent %v", i, span.Parent)
		}
		got := attributes(span)
		expected := map[attribute.Key]string{attrMethod: want.method, attrPlugin: "test", attrRequestID: want.requestID, attrOutcome: want.outcome}
		if want.outcome != "ok" {
			expected[attrErrorType] = want.outcome
		}
		for key, value := range expected {
			if got[key] != value {
				t.Errorf("span %d: %s = %q, want %q", i, key, got[key], value)
			}
		}
		if failed := span.Status.Code.String() == "Error"; failed != (want.outcome != "ok") {
			t.Errorf("span %d: status %v with outcome %s", i, span.Status, want.outcome)
		}
	}
}

// Untraced (no OTLP variables), a WebSocket stream runs with no span in its ctx.
func TestAnUntracedWebSocketStreamHasNoSpan(t *testing.T) {
	p := testPlugin()
	seen := make(chan trace.SpanContext, 1)
	p.StreamingMethod("sees", "", func(ctx context.Context, _ *Call, _ func(any) error) error {
		seen <- trace.SpanContextFromContext(ctx)
		return nil
	})
	host, _, _ := dialledSession(t, p, time.Minute)
	writeFrame(t, host, `{"type":"stream","id":1,"request":{"v":1,"plugin":"test","method":"sees","params":null,"context":{"traceparent":"00-`+parentTrace+`-`+parentSpan+`-01"}}}`)
	if f := readFrame(t, host); f["type"] != "response" {
		t.Fatalf("the stream's end: %v", f)
	}
	if inHandler := <-seen; inHandler.IsValid() {
		t.Errorf("tracing off, yet the stream's ctx carries %v", inHandler)
	}
}
