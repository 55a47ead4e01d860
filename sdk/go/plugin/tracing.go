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

import (
	"context"
	"fmt"
	"strings"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracehttp"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/trace"
)

// The OTel variables the SDK reads itself; the exporter reads the others (headers,
// timeouts, compression) and the batch processor its OTEL_BSP_* ones.
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
}

// tracesEndpoint is the OTLP/HTTP traces URL the environment names, or "".
func tracesEndpoint(getenv func(string) string) string {
	if strings.EqualFold(getenv(envSDKDisabled), "true") {
		return ""
	}
	if url := getenv(EnvOTLPTracesEndpoint); url != "" {
		return url // the signal-specific variable is the full URL, as the OTel spec says
	}
	if base := getenv(EnvOTLPEndpoint); base != "" {
		return strings.TrimRight(base, "/") + "/v1/traces"
	}
	return ""
}

// tracingFromEnv sets up span export when the environment names an endpoint; nil
// otherwise. The endpoint is passed explicitly (not left to the exporter's own reading of
// os.Environ) so Run's Environment decides, as it does for everything else.
func tracingFromEnv(ctx context.Context, getenv func(string) string, p *Plugin) (*tracing, error) {
	endpoint := tracesEndpoint(getenv)
	if endpoint == "" {
		return nil, nil
	}
	exporter, err := otlptracehttp.New(ctx, otlptracehttp.WithEndpointURL(endpoint))
	if err != nil {
		return nil, fmt.Errorf("tracing: OTLP exporter for %s: %w", endpoint, err)
	}
	service := getenv(envServiceName)
	if service == "" {
		service = p.id
	}
	// Default() first: it holds the SDK's and OTEL_RESOURCE_ATTRIBUTES' attributes; ours win.
	res, err := resource.Merge(resource.Default(), resource.NewSchemaless(
		attribute.String("service.name", service),
		attribute.String("service.version", p.version),
	))
	if err != nil {
		res = resource.Default() // schema URLs that disagree: keep the SDK's, still export
	}
	// Batched, so a call never waits on the collector; OTEL_BSP_* tune it.
	provider := sdktrace.NewTracerProvider(sdktrace.WithBatcher(exporter), sdktrace.WithResource(res))
	return &tracing{provider: provider, tracer: provider.Tracer("linchkit.plugin")}, nil
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

// shutdown sends the spans still buffered; called once the server has drained.
func (t *tracing) shutdown(ctx context.Context) {
	if t == nil {
		return
	}
	if err := t.provider.Shutdown(ctx); err != nil {
		sdkLog.Warn("linchkit plugin: tracing: could not send the last spans", "err", err)
	}
}

// truncate cuts text to at most limit bytes without splitting a character: OTLP's
// protobuf refuses invalid UTF-8, and one bad string would lose the whole batch.
func truncate(text string, limit int) string {
	if len(text) <= limit {
		return text
	}
	return strings.ToValidUTF8(text[:limit], "")
}
