package plugin

// Tracing continues the dispatcher's trace inside the plugin.
//
// The dispatcher sends each attempt's W3C traceparent in the call context (and gRPC
// metadata). When the plugin's environment names an OTLP endpoint
// (OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, else OTEL_EXPORTER_OTLP_ENDPOINT + "/v1/traces"),
// each call runs inside a SERVER span "linchkit.plugin/<method>", child of the attempt
// span, exported over OTLP/HTTP (protobuf); the method's ctx carries it, so spans the
// plugin author starts from ctx nest under it. Without those variables nothing is set up:
// a call pays one nil check. A missing or malformed traceparent starts a new trace, never
// fails the call (the W3C rule is to ignore what cannot be parsed).
//
// A stop sends the spans still buffered for what remains of the hooks' cap, or
// spanFlushMargin when less remains: a collector that accepts the connection and never
// answers must not keep the plugin past grace + hooks + the margin. The spans it could not
// send are dropped then, with one warning that names the collector by scheme://host:port
// only (collectorShown), as every SDK names it: never the userinfo, path or query of its
// URL, nor the exporter's headers.

import (
	"context"
	"fmt"
	neturl "net/url"
	"os"
	"strconv"
	"strings"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracehttp"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/trace"
)

// The OTel variables that turn tracing on; spanexport.go reads the export's others.
const (
	EnvOTLPEndpoint       = "OTEL_EXPORTER_OTLP_ENDPOINT"
	EnvOTLPTracesEndpoint = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
	envServiceName        = "OTEL_SERVICE_NAME"
	envSDKDisabled        = "OTEL_SDK_DISABLED"
)

// maxTraceparent bounds what is parsed: a W3C traceparent is 55 characters; anything far
// longer is not one, and parsing it would only cost.
const maxTraceparent = 512

// Span attribute keys, shared with the dispatcher's and the Python SDK's spans.
const (
	attrMethod    = attribute.Key("linchkit.method")
	attrPlugin    = attribute.Key("linchkit.plugin")
	attrRequestID = attribute.Key("linchkit.request_id")
	attrOutcome   = attribute.Key("linchkit.outcome")
	attrErrorType = attribute.Key("error.type")
)

// tracing is the plugin's tracer and the provider that exports its spans; nil when
// tracing is off.
type tracing struct {
	provider *sdktrace.TracerProvider
	tracer   trace.Tracer
	// endpoint is the URL spans go to, which may hold credentials; collector is how a log
	// line names it (collectorShown).
	endpoint  string
	collector string
	// transport sends the spans and says an outage (collector.go); nil in tests that keep
	// spans in memory.
	transport *collectorTransport
}

// tracesEndpoint is the OTLP/HTTP traces URL the environment names, or "".
func tracesEndpoint(getenv func(string) string) string {
	if strings.EqualFold(getenv(envSDKDisabled), "true") {
		return ""
	}
	if url := strings.TrimSpace(getenv(EnvOTLPTracesEndpoint)); url != "" {
		return url // the signal-specific variable is the full URL, as the OTel spec says
	}
	base := strings.TrimSpace(getenv(EnvOTLPEndpoint))
	if base == "" {
		return ""
	}
	// /v1/traces joins the base's path, before its query (which the collector gets).
	if parsed, err := neturl.Parse(base); err == nil && parsed.RawQuery != "" {
		parsed.Path = strings.TrimRight(parsed.Path, "/") + "/v1/traces"
		parsed.RawPath = ""
		return parsed.String()
	}
	return strings.TrimRight(base, "/") + "/v1/traces"
}

// tracingFromEnv sets up span export when the environment names an endpoint; nil
// otherwise. Everything it is told comes from getenv, Run's Environment, never the
// process's own environment: the endpoint, the export's settings (spanexport.go), the
// sampler, the resource's attributes.
func tracingFromEnv(ctx context.Context, getenv func(string) string, p *Plugin) (*tracing, error) {
	endpoint := tracesEndpoint(getenv)
	if endpoint == "" {
		return nil, nil
	}
	collector := collectorShown(endpoint)
	if parsed, err := neturl.Parse(endpoint); err != nil || parsed.Hostname() == "" ||
		(!strings.EqualFold(parsed.Scheme, "http") && !strings.EqualFold(parsed.Scheme, "https")) {
		// Not given to the exporter: its parse error's line would quote the URL, password and all.
		return nil, fmt.Errorf("tracing: the trace collector's URL (%s) is not an http:// or https:// URL with a "+
			"host: no span is sent", collector)
	}
	settings, err := readExportSettings(getenv)
	if err != nil { // names the variable, never its value
		return nil, fmt.Errorf("tracing: %w: no span is sent to the trace collector at %s. Fix or unset the variable",
			err, collector)
	}
	if settings.otherProtocol != "" {
		sdkLog.Warn(fmt.Sprintf("linchkit plugin: %s names a protocol this SDK does not send: spans go to %s over "+
			"OTLP/HTTP (protobuf), which a collector's gRPC port does not take", settings.otherProtocol, collector))
	}
	sampler, warning := samplerFromEnv(getenv)
	// OpenTelemetry's provider reads the process's variables as it is made, whatever sampler
	// it is given, and says a bad one through its error handler: when it will, this line
	// would be the same news twice.
	if _, processWarning := samplerFromEnv(os.Getenv); warning != "" && warning != processWarning {
		sdkLog.Warn("linchkit plugin: " + warning)
	}
	client, transport := collectorClient(endpoint, settings)
	options := []otlptracehttp.Option{
		otlptracehttp.WithEndpointURL(endpoint),
		otlptracehttp.WithHTTPClient(client),
		otlptracehttp.WithTimeout(settings.timeout),
		otlptracehttp.WithCompression(settings.compression),
		otlptracehttp.WithEncoding(settings.encoding),
		otlptracehttp.WithMaxResponseSize(maxAnswerBytes),
		// Explicitly none when no variable names one: the exporter would read the process's.
		otlptracehttp.WithHeaders(settings.headers),
	}
	exporter, err := otlptracehttp.New(ctx, options...)
	if err != nil {
		// Its error may quote the URL, password and all: the collector as a line may name it.
		return nil, fmt.Errorf("tracing: OTLP exporter for the trace collector at %s: %s",
			collector, scrubbed(err, endpoint))
	}
	service := strings.TrimSpace(getenv(envServiceName))
	if service == "" {
		service = p.id
	}
	// OTEL_RESOURCE_ATTRIBUTES' first (read from getenv, not by resource.Default from the
	// process's environment); ours win.
	attributes := append(settings.resource,
		attribute.String("service.name", service), attribute.String("service.version", p.version))
	res, err := resource.New(ctx, resource.WithTelemetrySDK(), resource.WithAttributes(attributes...))
	if err != nil {
		res = resource.NewSchemaless(attributes...) // cannot fail today; still export
	}
	// Batched, so a call never waits on the collector; OTEL_BSP_* tune it.
	batcher := sdktrace.NewBatchSpanProcessor(saidExporter{exporter, transport, endpoint}, settings.batch.options()...)
	provider := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(batcher), sdktrace.WithResource(res),
		sdktrace.WithSampler(sampler))
	return &tracing{provider: provider, tracer: provider.Tracer("linchkit.plugin"),
		endpoint: endpoint, collector: collector, transport: transport}, nil
}

// start opens the call's span, continuing call.Traceparent when it is a valid one, and
// returns ctx carrying it. On a nil tracing it returns ctx and a nil span.
func (t *tracing) start(ctx context.Context, pluginID string, call *Call) (context.Context, trace.Span) {
	if t == nil {
		return ctx, nil
	}
	if tp := call.Traceparent; tp != "" && len(tp) <= maxTraceparent {
		// Extract leaves ctx as it was when tp is malformed: the span is then a root.
		ctx = propagation.TraceContext{}.Extract(ctx, propagation.MapCarrier{"traceparent": tp})
	}
	attributes := []attribute.KeyValue{attrMethod.String(call.Method), attrPlugin.String(pluginID)}
	if call.RequestID != "" {
		attributes = append(attributes, attrRequestID.String(truncate(call.RequestID, 128)))
	}
	return t.tracer.Start(ctx, "linchkit.plugin/"+call.Method,
		trace.WithSpanKind(trace.SpanKindServer), trace.WithAttributes(attributes...))
}

// endSpan records how the call ended ("ok" or the error's type) and ends span; a nil
// span (tracing off) is ignored.
func endSpan(span trace.Span, failure *Error) {
	if span == nil {
		return
	}
	if failure == nil {
		span.SetAttributes(attrOutcome.String("ok"))
	} else {
		span.SetAttributes(attrOutcome.String(failure.Type), attrErrorType.String(failure.Type))
		span.SetStatus(codes.Error, truncate(failure.Message, 512))
	}
	span.End()
}

// shutdown sends the spans still buffered, for within at most; called once the server has
// drained. Spans it could not send are dropped, with one warning naming the collector.
func (t *tracing) shutdown(within time.Duration) {
	if t == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), within)
	defer cancel()
	err := t.provider.Shutdown(ctx)
	// An export the stop gave up on may still end later: what it dropped is said below.
	t.transport.silence()
	switch {
	case err == nil:
	case ctx.Err() != nil:
		sdkLog.Warn(fmt.Sprintf("linchkit plugin: spans dropped at the stop: the trace collector at %s did not take "+
			"them within the %s s the stop's caps left; check that it is up and answers", t.collector, tenths(within)))
	default:
		// The exporter's own failure (a collector refusing a batch is said by the
		// collector's transport instead, not here).
		sdkLog.Warn(fmt.Sprintf("linchkit plugin: spans dropped at the stop: sending them to the trace collector at %s "+
			"failed: %s", t.collector, scrubbed(err, t.endpoint)))
	}
}

// malformedCollector is what a line says of a collector URL it cannot take apart.
const malformedCollector = "(its URL is malformed)"

// collectorShown is the collector a log line may name: scheme://host[:port], the port when
// the URL gives one, as the other SDKs name it. Never the userinfo, path or query of
// endpoint: they may hold a password or a token.
func collectorShown(endpoint string) string {
	parsed, err := neturl.Parse(strings.TrimSpace(endpoint))
	if err != nil || parsed.Scheme == "" || parsed.Hostname() == "" {
		return malformedCollector // url.Parse's error quotes the URL: not shown either
	}
	host := parsed.Hostname()
	if strings.Contains(host, ":") {
		host = "[" + host + "]"
	}
	shown := strings.ToLower(parsed.Scheme) + "://" + host
	if port := parsed.Port(); port != "" {
		shown += ":" + port
	}
	return shown
}

// scrubbed is err's text with endpoint, as written or as the exporter prints it, named as
// collectorShown names it: the exporter's errors quote the URL it posted to ("failed to
// send to http://user:password@host/…"). Should the password still show, the text is left
// out.
func scrubbed(err error, endpoint string) string {
	text := err.Error()
	shown := collectorShown(endpoint)
	parsed, parseErr := neturl.Parse(strings.TrimSpace(endpoint))
	if parseErr != nil {
		return strings.ReplaceAll(text, strings.TrimSpace(endpoint), shown)
	}
	for _, form := range []string{parsed.String(), parsed.Redacted(), strings.TrimSpace(endpoint)} {
		text = strings.ReplaceAll(text, form, shown)
	}
	if password, _ := parsed.User.Password(); password != "" && strings.Contains(text, password) {
		return "(its error is not shown: it quotes the URL's password)"
	}
	return text
}

// tenths is d in seconds to a tenth, as few digits as it takes ("1", "4.2").
func tenths(d time.Duration) string {
	return strconv.FormatFloat(float64(d.Round(100*time.Millisecond))/float64(time.Second), 'f', -1, 64)
}

// truncate cuts text to at most limit bytes without splitting a character: OTLP's
// protobuf refuses invalid UTF-8, and one bad string would lose the whole batch.
func truncate(text string, limit int) string {
	if len(text) <= limit {
		return text
	}
	return strings.ToValidUTF8(text[:limit], "")
}
