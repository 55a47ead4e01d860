package plugin

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"
)

// A malformed variable of the export leaves the plugin untraced with one error naming the
// variable, never its value; before, a non-positive queue size made OpenTelemetry's batch
// processor panic, a headers' item it could not read was printed, token and all, and a
// header decoding to a CR LF failed every export.
func TestAMalformedExportVariableIsAnErrorNamingIt(t *testing.T) {
	errs := handled(t)
	for variable, value := range map[string]string{
		"OTEL_BSP_MAX_QUEUE_SIZE":           "-5",
		"OTEL_BSP_MAX_EXPORT_BATCH_SIZE":    "lots",
		"OTEL_BSP_SCHEDULE_DELAY":           "-0",
		"OTEL_BSP_EXPORT_TIMEOUT":           "1e3",
		"OTEL_EXPORTER_OTLP_TIMEOUT":        "nan",
		"OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "-1",
		"OTEL_EXPORTER_OTLP_HEADERS":        "Authorization: Bearer " + collectorSecret,
		"OTEL_EXPORTER_OTLP_TRACES_HEADERS": "authorization=Bearer%20" + collectorSecret + "%0D%0AX-Injected:%201",
		"OTEL_EXPORTER_OTLP_COMPRESSION":    "zstd",
		"OTEL_EXPORTER_OTLP_CERTIFICATE":    "/nonexistent/ca.pem",
		"OTEL_EXPORTER_OTLP_CLIENT_KEY":     "/nonexistent/key.pem",
		"OTEL_RESOURCE_ATTRIBUTES":          "team",
	} {
		vars := map[string]string{EnvOTLPTracesEndpoint: "http://127.0.0.1:4318/v1/traces", variable: value}
		traces, err := tracingFromEnv(context.Background(), func(k string) string { return vars[k] }, testPlugin())
		var refused *exportSettingsError
		if traces != nil || !errors.As(err, &refused) || refused.variable != variable {
			t.Errorf("%s=%s: tracing %v, error %v; want an error naming the variable", variable, value, traces, err)
			continue
		}
		if strings.Contains(err.Error(), value) || !strings.Contains(err.Error(), "no span is sent to the trace collector at http://127.0.0.1:4318") {
			t.Errorf("%s=%s: %q", variable, value, err)
		}
	}
	if got := errs(); len(got) != 0 {
		t.Errorf("OpenTelemetry's error handler got %q", got)
	}
}

func TestExportSettingsDefaultToOpenTelemetrysAndFollowTheVariables(t *testing.T) {
	settings, err := readExportSettings(func(string) string { return "" })
	if err != nil || settings.timeout != 10*time.Second || settings.batch != (batchSettings{5 * time.Second, 30 * time.Second, 2048, 512}) {
		t.Fatalf("defaults %+v, %v", settings, err)
	}
	vars := map[string]string{
		"OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "2500", "OTEL_EXPORTER_OTLP_TIMEOUT": "x",
		"OTEL_BSP_MAX_QUEUE_SIZE":    "100",
		"OTEL_EXPORTER_OTLP_HEADERS": "a=1, b = two%20words ,", "OTEL_RESOURCE_ATTRIBUTES": "team=a%2Cb,tier=1",
	}
	settings, err = readExportSettings(func(k string) string { return vars[k] })
	if err != nil {
		t.Fatal(err)
	}
	// The traces' own variable wins; a queue under OpenTelemetry's batch of 512: batches of the queue.
	if settings.timeout != 2500*time.Millisecond || settings.batch.maxBatchSize != 100 {
		t.Errorf("settings %+v", settings)
	}
	if settings.headers["a"] != "1" || settings.headers["b"] != "two words" || len(settings.headers) != 2 {
		t.Errorf("headers %v", settings.headers)
	}
	if len(settings.resource) != 2 || settings.resource[0].Value.AsString() != "a,b" {
		t.Errorf("resource %v", settings.resource)
	}
	vars["OTEL_BSP_MAX_EXPORT_BATCH_SIZE"] = "4096"
	if _, err := readExportSettings(func(k string) string { return vars[k] }); err == nil ||
		!strings.HasPrefix(err.Error(), "OTEL_BSP_MAX_EXPORT_BATCH_SIZE: larger than the queue") {
		t.Errorf("a batch over the queue: %v", err)
	}
}

// A protocol the exporter does not send is said once at start; spans still go over
// OTLP/HTTP.
func TestAnotherProtocolIsSaidOnce(t *testing.T) {
	out := capture(t)
	collector := newTestCollector(t)
	traces := exportingTo(t, map[string]string{EnvOTLPTracesEndpoint: collector.URL + "/v1/traces",
		"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"})
	exportOne(t, traces)
	said := lines(out)
	if len(said) != 1 || !strings.Contains(said[0], "OTEL_EXPORTER_OTLP_PROTOCOL names a protocol this SDK does not send") {
		t.Errorf("said %q", said)
	}
	if len(collector.requests()) != 1 {
		t.Errorf("the span was not sent over OTLP/HTTP")
	}
}

// An endpoint that is no http(s) URL is refused before the exporter sees it: its parse
// error went to OpenTelemetry's logger, the URL, password and all, in it.
func TestAnEndpointThatIsNoHTTPURLIsRefusedWithoutItsPassword(t *testing.T) {
	errs := handled(t)
	for _, endpoint := range []string{
		"http://collector:" + collectorSecret + "@127.0.0.1:4318/%zz",
		"collector:" + collectorSecret,
		"ftp://collector:" + collectorSecret + "@127.0.0.1/",
	} {
		vars := map[string]string{EnvOTLPTracesEndpoint: endpoint}
		traces, err := tracingFromEnv(context.Background(), func(k string) string { return vars[k] }, testPlugin())
		if traces != nil || err == nil || strings.Contains(err.Error(), collectorSecret) ||
			!strings.Contains(err.Error(), "is not an http:// or https:// URL") {
			t.Errorf("%s: tracing %v, error %v", endpoint, traces, err)
		}
	}
	if got := errs(); len(got) != 0 {
		t.Errorf("OpenTelemetry's error handler got %q", got)
	}
}
