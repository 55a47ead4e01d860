package plugin

import (
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"go.opentelemetry.io/otel"
)

// seenRequest is what a test collector was sent.
type seenRequest struct {
	uri           string
	authorization string
	apiKey        string
}

// testCollector answers each request with the next of answers (200 once they run out),
// keeping what it was sent.
type testCollector struct {
	*httptest.Server
	mu      sync.Mutex
	answers []int
	seen    []seenRequest
}

func newTestCollector(t *testing.T, answers ...int) *testCollector {
	t.Helper()
	c := &testCollector{answers: answers}
	c.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c.mu.Lock()
		c.seen = append(c.seen, seenRequest{r.RequestURI, r.Header.Get("Authorization"), r.Header.Get("X-Api-Key")})
		status := http.StatusOK
		if len(c.answers) > 0 {
			status, c.answers = c.answers[0], c.answers[1:]
		}
		c.mu.Unlock()
		if status >= 300 && status < 400 {
			w.Header().Set("Location", "/elsewhere")
		}
		w.WriteHeader(status)
	}))
	t.Cleanup(c.Close)
	return c
}

func (c *testCollector) requests() []seenRequest {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]seenRequest(nil), c.seen...)
}

// exportingTo is tracing set up from vars alone (the process's environment has none of
// them), shut down at the test's end.
func exportingTo(t *testing.T, vars map[string]string) *tracing {
	t.Helper()
	traces, err := tracingFromEnv(context.Background(), func(k string) string { return vars[k] }, testPlugin())
	if err != nil || traces == nil {
		t.Fatalf("tracing %v, error %v", traces, err)
	}
	t.Cleanup(func() { traces.shutdown(time.Second) })
	return traces
}

// exportOne ends one span and sends it (a flush, bounded).
func exportOne(t *testing.T, traces *tracing) {
	t.Helper()
	_, span := traces.tracer.Start(context.Background(), "one")
	span.End()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := traces.provider.ForceFlush(ctx); err != nil {
		t.Fatalf("flush: %v", err)
	}
}

// handled collects what reaches OpenTelemetry's error handler for one test.
func handled(t *testing.T) func() []string {
	t.Helper()
	var mu sync.Mutex
	var errs []string
	saved := otel.GetErrorHandler()
	otel.SetErrorHandler(otel.ErrorHandlerFunc(func(err error) {
		mu.Lock()
		defer mu.Unlock()
		errs = append(errs, err.Error())
	}))
	t.Cleanup(func() { otel.SetErrorHandler(saved) })
	return func() []string {
		mu.Lock()
		defer mu.Unlock()
		return append([]string(nil), errs...)
	}
}

// An outage is two lines, a warning when the collector stops taking spans and one when it
// takes them again, naming it by scheme://host:port; before, OpenTelemetry's error handler
// printed a plain line (no level) per failed batch, the collector's path in it.
func TestAnOutageIsSaidOnceAndItsEndOnce(t *testing.T) {
	out := capture(t)
	errs := handled(t)
	collector := newTestCollector(t, 500, 500, 500)
	traces := exportingTo(t, map[string]string{EnvOTLPTracesEndpoint: collector.URL + "/v1/traces"})
	for range 5 {
		exportOne(t, traces)
	}
	if got := len(collector.requests()); got != 5 {
		t.Fatalf("%d requests, want 5", got)
	}
	said := lines(out)
	if len(said) != 2 {
		t.Fatalf("want two lines, got %q", said)
	}
	for _, line := range said {
		if match := slogLine.FindStringSubmatch(line); match == nil || match[1] != "WARN" {
			t.Errorf("want a level=WARN line, got %q", line)
		}
		if strings.Contains(line, "/v1/traces") {
			t.Errorf("the line shows the collector's path: %q", line)
		}
	}
	if !strings.Contains(said[0], "spans are not reaching the trace collector at "+collector.URL+": it answered 500") {
		t.Errorf("want the outage and its cause, got %q", said[0])
	}
	if !strings.Contains(said[1], "the trace collector at "+collector.URL+" takes spans again") {
		t.Errorf("want the outage's end, got %q", said[1])
	}
	if got := errs(); len(got) != 0 {
		t.Errorf("OpenTelemetry's error handler got %q", got)
	}
}

func TestAnUnreachableCollectorIsSaidOnceWithoutItsQuery(t *testing.T) {
	out := capture(t)
	errs := handled(t)
	collector := newTestCollector(t)
	address := collector.URL
	collector.Close() // nothing listens there now
	traces := exportingTo(t, map[string]string{
		EnvOTLPTracesEndpoint:        address + "/v1/traces?api_key=" + collectorSecret,
		"OTEL_EXPORTER_OTLP_TIMEOUT": "2000",
	})
	exportOne(t, traces)
	exportOne(t, traces)
	said := lines(out)
	if len(said) != 1 || !strings.Contains(said[0], "spans are not reaching the trace collector at "+address+
		": could not be reached (connection refused)") {
		t.Fatalf("want one line saying the collector could not be reached, got %q", said)
	}
	if strings.Contains(out.String(), collectorSecret) || len(errs()) != 0 {
		t.Errorf("said %q, handled %q", out.String(), errs())
	}
}

// The endpoint's query and the user and password of its URL reach the collector, as the
// Python and Rust SDKs send them; OpenTelemetry's exporter dropped both without a word.
func TestTheEndpointsQueryAndUserReachTheCollector(t *testing.T) {
	collector := newTestCollector(t)
	endpoint := strings.Replace(collector.URL, "http://", "http://me:"+collectorSecret+"@", 1) + "/v1/traces?api_key=k1"
	traces := exportingTo(t, map[string]string{EnvOTLPTracesEndpoint: endpoint})
	exportOne(t, traces)
	seen := collector.requests()
	if len(seen) != 1 {
		t.Fatalf("%d requests, want 1", len(seen))
	}
	if seen[0].uri != "/v1/traces?api_key=k1" {
		t.Errorf("the collector was sent %q, want the query too", seen[0].uri)
	}
	request := &http.Request{Header: http.Header{"Authorization": {seen[0].authorization}}}
	if user, password, ok := request.BasicAuth(); !ok || user != "me" || password != collectorSecret {
		t.Errorf("authorization %q, want the URL's user and password", seen[0].authorization)
	}
	// An authorization the headers' variable sets wins over the URL's user, as in the
	// other SDKs (before, the URL's basic credentials replaced it).
	bearer := newTestCollector(t)
	withUser := strings.Replace(bearer.URL, "http://", "http://me:"+collectorSecret+"@", 1) + "/v1/traces"
	traces = exportingTo(t, map[string]string{
		EnvOTLPTracesEndpoint: withUser, "OTEL_EXPORTER_OTLP_HEADERS": "Authorization=Bearer%20t0ken",
	})
	exportOne(t, traces)
	if seen := bearer.requests(); len(seen) != 1 || seen[0].authorization != "Bearer t0ken" {
		t.Errorf("the collector was sent %v, want the headers' authorization", seen)
	}
	// The base variable: /v1/traces goes before the query.
	base := newTestCollector(t)
	traces = exportingTo(t, map[string]string{EnvOTLPEndpoint: base.URL + "/otlp/?tenant=t1"})
	exportOne(t, traces)
	if seen := base.requests(); len(seen) != 1 || seen[0].uri != "/otlp/v1/traces?tenant=t1" {
		t.Errorf("the collector was sent %v", seen)
	}
}

// A redirect is not followed (Go's client re-sent the request, its headers' tokens too,
// wherever the collector pointed) and is said once.
func TestARedirectIsSaidOnceAndNotFollowed(t *testing.T) {
	out := capture(t)
	handled(t)
	collector := newTestCollector(t, 307, 307)
	traces := exportingTo(t, map[string]string{
		EnvOTLPTracesEndpoint:               collector.URL + "/v1/traces",
		"OTEL_EXPORTER_OTLP_TRACES_HEADERS": "x-api-key=" + collectorSecret,
	})
	exportOne(t, traces)
	exportOne(t, traces)
	seen := collector.requests()
	if len(seen) != 2 || seen[0].uri != "/v1/traces" || seen[1].uri != "/v1/traces" {
		t.Fatalf("the collector was sent %v, want two requests to /v1/traces and none to /elsewhere", seen)
	}
	if seen[0].apiKey != collectorSecret {
		t.Errorf("the headers of Run's environment were not sent: %v", seen[0])
	}
	said := lines(out)
	if len(said) != 1 || !strings.Contains(said[0], "the trace collector at "+collector.URL+" answered 307, a redirect") {
		t.Fatalf("want one line saying the redirect, got %q", said)
	}
	if strings.Contains(out.String(), collectorSecret) {
		t.Errorf("the secret shows: %q", out.String())
	}
}

// An answer longer than maxAnswerBytes is dropped, not read: the export still ends, and
// the collector is not said to fail (its status was 200).
func TestALongAnswerIsNotRead(t *testing.T) {
	out := capture(t)
	errs := handled(t)
	var sent int
	endless := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/x-protobuf")
		chunk := make([]byte, 1<<16)
		for sent < 64<<20 {
			if _, err := w.Write(chunk); err != nil {
				return
			}
			sent += len(chunk)
		}
	}))
	t.Cleanup(endless.Close)
	traces := exportingTo(t, map[string]string{EnvOTLPTracesEndpoint: endless.URL + "/v1/traces"})
	exportOne(t, traces)
	if out.Len() != 0 || len(errs()) != 0 {
		t.Errorf("said %q, handled %q", out.String(), errs())
	}
}

// OTEL_TRACES_SAMPLER and _ARG come from Run's environment, as every other variable does
// (OpenTelemetry read them from the process's).
func TestTheSamplerComesFromRunsEnvironment(t *testing.T) {
	out := capture(t)
	collector := newTestCollector(t)
	vars := map[string]string{EnvOTLPTracesEndpoint: collector.URL, "OTEL_TRACES_SAMPLER": "always_off"}
	traces := exportingTo(t, vars)
	_, span := traces.tracer.Start(context.Background(), "one")
	if span.SpanContext().IsSampled() {
		t.Error("OTEL_TRACES_SAMPLER=always_off in Run's environment, yet the span is sampled")
	}
	span.End()
	for sampler, sampled := range map[string]bool{"traceidratio": false, "parentbased_traceidratio": false} {
		traces := exportingTo(t, map[string]string{EnvOTLPTracesEndpoint: collector.URL,
			"OTEL_TRACES_SAMPLER": sampler, "OTEL_TRACES_SAMPLER_ARG": "0"})
		_, span := traces.tracer.Start(context.Background(), "one")
		if span.SpanContext().IsSampled() != sampled {
			t.Errorf("%s at 0: sampled %v", sampler, span.SpanContext().IsSampled())
		}
	}
	if out.Len() != 0 {
		t.Errorf("said %q", out.String())
	}
	// An unknown sampler, a ratio that is none: the default, with a warning naming the
	// variable.
	for vars, variable := range map[[2]string]string{
		{"jaeger_remote", ""}:          "OTEL_TRACES_SAMPLER",
		{"traceidratio", "lots"}:       "OTEL_TRACES_SAMPLER_ARG",
		{"traceidratio", "1.5"}:        "OTEL_TRACES_SAMPLER_ARG",
		{"parentbased_always_off", ""}: "",
	} {
		out.Reset()
		traces := exportingTo(t, map[string]string{EnvOTLPTracesEndpoint: collector.URL,
			"OTEL_TRACES_SAMPLER": vars[0], "OTEL_TRACES_SAMPLER_ARG": vars[1]})
		_, span := traces.tracer.Start(context.Background(), "one")
		if span.SpanContext().IsSampled() != (variable != "") {
			t.Errorf("%v: sampled %v", vars, span.SpanContext().IsSampled())
		}
		if variable != "" && !strings.Contains(out.String(), "level=WARN msg=\"linchkit plugin: "+variable+":") {
			t.Errorf("%v: want a warning naming %s, got %q", vars, variable, out.String())
		}
	}
}
