package plugin

// The span export's settings, read from the environment Run is given (Environment.Getenv),
// once, as the Python SDK reads them (linchkit_plugin._span_export): OpenTelemetry's Go
// exporter, batch processor and sampler would read the process's own environment instead,
// and react to a malformed value in ways a served plugin must not. A non-positive
// OTEL_BSP_MAX_QUEUE_SIZE made the batch processor panic (the plugin did not start); an
// OTEL_EXPORTER_OTLP_HEADERS item it cannot read was printed, token and all, by its
// parser's error line; a header decoding to a CR LF failed every export; a timeout that is
// no number was one line and the default. So a malformed variable is an exportSettingsError
// that names it, never its value, and the exporter and the processor are given explicit
// values. OTEL_TRACES_SAMPLER and _ARG are read here too, as the Java and Rust SDKs read
// them: an unknown sampler is parentbased_always_on, an argument that is no ratio from 0 to
// 1 is 1, each with a warning.

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	neturl "net/url"
	"os"
	"regexp"
	"strconv"
	"strings"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracehttp"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
)

// exportSettingsError: a variable of the span export holds what cannot be used. Its text
// names the variable and what is wrong, never the value (a header's token, say).
type exportSettingsError struct {
	variable, reason string
}

func (e *exportSettingsError) Error() string { return e.variable + ": " + e.reason }

// exportSettings is what the span export was told, checked.
type exportSettings struct {
	timeout     time.Duration // each export request, the collector's answer included
	headers     map[string]string
	compression otlptracehttp.Compression
	encoding    otlptracehttp.Encoding
	// otherProtocol names the variable asking for a protocol the exporter does not send
	// (grpc): said once at start, spans still go over OTLP/HTTP.
	otherProtocol string
	tls           *tls.Config // nil: the system's roots
	batch         batchSettings
	resource      []attribute.KeyValue // OTEL_RESOURCE_ATTRIBUTES'
}

type batchSettings struct {
	scheduleDelay, exportTimeout time.Duration
	maxQueueSize, maxBatchSize   int
}

// OpenTelemetry's defaults, which an unset variable keeps.
const (
	defaultExportTimeout = 10 * time.Second
	defaultScheduleDelay = 5000
	defaultQueueSize     = 2048
	defaultBatchSize     = 512
	defaultBatchTimeout  = 30000
)

// readExportSettings reads and checks the export's variables from getenv: the first
// malformed one is an *exportSettingsError.
func readExportSettings(getenv func(string) string) (exportSettings, error) {
	var settings exportSettings
	var err error
	if settings.timeout, err = exportTimeout(getenv); err != nil {
		return settings, err
	}
	if settings.headers, err = exportHeaders(getenv); err != nil {
		return settings, err
	}
	if settings.compression, err = exportCompression(getenv); err != nil {
		return settings, err
	}
	settings.encoding, settings.otherProtocol = exportEncoding(getenv)
	if settings.tls, err = exportTLS(getenv); err != nil {
		return settings, err
	}
	if settings.batch, err = readBatchSettings(getenv); err != nil {
		return settings, err
	}
	if settings.resource, err = resourceAttributes(getenv); err != nil {
		return settings, err
	}
	return settings, nil
}

// firstSet is the first of variables that is set (not blank), and its trimmed value.
func firstSet(getenv func(string) string, variables ...string) (string, string) {
	for _, variable := range variables {
		if value := strings.TrimSpace(getenv(variable)); value != "" {
			return variable, value
		}
	}
	return "", ""
}

func exportTimeout(getenv func(string) string) (time.Duration, error) {
	variable, raw := firstSet(getenv, "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "OTEL_EXPORTER_OTLP_TIMEOUT")
	if variable == "" {
		return defaultExportTimeout, nil
	}
	millis, err := strconv.Atoi(raw)
	if err != nil || millis <= 0 {
		return 0, &exportSettingsError{variable, "not a whole number of milliseconds greater than 0 (OpenTelemetry: 10000)"}
	}
	return time.Duration(millis) * time.Millisecond, nil
}

// headerName is an HTTP token; a header's value, decoded, is printable ASCII or tabs.
var (
	headerName  = regexp.MustCompile("^[!#$%&'*+\\-.^_`|~0-9A-Za-z]+$")
	headerValue = regexp.MustCompile(`^[\x20-\x7e\t]*$`)
)

// exportHeaders: the traces' own variable, else the root one (as the exporter reads them),
// name=value items separated by commas, each value URL-decoded.
func exportHeaders(getenv func(string) string) (map[string]string, error) {
	variable, raw := firstSet(getenv, "OTEL_EXPORTER_OTLP_TRACES_HEADERS", "OTEL_EXPORTER_OTLP_HEADERS")
	if variable == "" {
		return nil, nil
	}
	headers := map[string]string{}
	for _, item := range strings.Split(raw, ",") {
		if strings.TrimSpace(item) == "" {
			continue
		}
		name, value, found := strings.Cut(item, "=")
		name = strings.TrimSpace(name)
		decoded, err := neturl.PathUnescape(value)
		if !found || !headerName.MatchString(name) || err != nil {
			return nil, &exportSettingsError{variable, "every header is name=value, separated by commas: the name a " +
				"token (letters, digits and !#$%&'*+-.^_`|~), the value URL-encoded"}
		}
		decoded = strings.TrimSpace(decoded)
		if !headerValue.MatchString(decoded) {
			return nil, &exportSettingsError{variable, fmt.Sprintf("the value of header %q, decoded, holds a control "+
				"character (CR, LF, NUL...) that no header may carry", truncate(name, 40))}
		}
		headers[name] = decoded
	}
	return headers, nil
}

func exportCompression(getenv func(string) string) (otlptracehttp.Compression, error) {
	variable, raw := firstSet(getenv, "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "OTEL_EXPORTER_OTLP_COMPRESSION")
	switch strings.ToLower(raw) {
	case "", "none":
		return otlptracehttp.NoCompression, nil
	case "gzip":
		return otlptracehttp.GzipCompression, nil
	}
	return 0, &exportSettingsError{variable, "neither gzip nor none"}
}

// exportEncoding: JSON for http/json, else protobuf; a protocol the exporter does not
// send (grpc) is named, for a warning.
func exportEncoding(getenv func(string) string) (otlptracehttp.Encoding, string) {
	variable, raw := firstSet(getenv, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")
	switch strings.ToLower(raw) {
	case "", "http/protobuf":
		return otlptracehttp.EncodingProtobuf, ""
	case "http/json":
		return otlptracehttp.EncodingJSON, ""
	}
	return otlptracehttp.EncodingProtobuf, variable
}

// exportTLS: the CA certificates the collector's is checked against, and the client's own
// certificate and key, from PEM files.
func exportTLS(getenv func(string) string) (*tls.Config, error) {
	caVariable, caFile := firstSet(getenv, "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE", "OTEL_EXPORTER_OTLP_CERTIFICATE")
	certVariable, certFile := firstSet(getenv, "OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE", "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE")
	keyVariable, keyFile := firstSet(getenv, "OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY", "OTEL_EXPORTER_OTLP_CLIENT_KEY")
	if caFile == "" && certFile == "" && keyFile == "" {
		return nil, nil
	}
	config := &tls.Config{MinVersion: tls.VersionTLS12}
	if caFile != "" {
		pem, err := os.ReadFile(caFile)
		if err != nil {
			return nil, &exportSettingsError{caVariable, "its file cannot be read: " + errorReason(err)}
		}
		config.RootCAs = x509.NewCertPool()
		if !config.RootCAs.AppendCertsFromPEM(pem) {
			return nil, &exportSettingsError{caVariable, "its file holds no PEM certificate"}
		}
	}
	if certFile != "" && keyFile == "" {
		return nil, &exportSettingsError{certVariable, "set without OTEL_EXPORTER_OTLP_CLIENT_KEY"}
	}
	if keyFile != "" && certFile == "" {
		return nil, &exportSettingsError{keyVariable, "set without OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE"}
	}
	if certFile != "" {
		pair, err := tls.LoadX509KeyPair(certFile, keyFile)
		if err != nil {
			return nil, &exportSettingsError{certVariable + " / " + keyVariable,
				"not a readable PEM certificate and its key"}
		}
		config.Certificates = []tls.Certificate{pair}
	}
	return config, nil
}

// errorReason is what the OS said of a file, without the path (*PathError's Err).
func errorReason(err error) string {
	if pathErr, ok := err.(*os.PathError); ok {
		return pathErr.Err.Error()
	}
	return err.Error()
}

func readBatchSettings(getenv func(string) string) (batchSettings, error) {
	var batch batchSettings
	var err error
	var delay, timeout int
	if delay, err = positiveInt(getenv, "OTEL_BSP_SCHEDULE_DELAY", defaultScheduleDelay); err != nil {
		return batch, err
	}
	if timeout, err = positiveInt(getenv, "OTEL_BSP_EXPORT_TIMEOUT", defaultBatchTimeout); err != nil {
		return batch, err
	}
	if batch.maxQueueSize, err = positiveInt(getenv, "OTEL_BSP_MAX_QUEUE_SIZE", defaultQueueSize); err != nil {
		return batch, err
	}
	if batch.maxBatchSize, err = positiveInt(getenv, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", defaultBatchSize); err != nil {
		return batch, err
	}
	if batch.maxBatchSize > batch.maxQueueSize {
		if strings.TrimSpace(getenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE")) != "" {
			return batch, &exportSettingsError{"OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
				"larger than the queue (OTEL_BSP_MAX_QUEUE_SIZE) it is taken from"}
		}
		batch.maxBatchSize = batch.maxQueueSize // unset: batches of the queue, as OpenTelemetry's
	}
	batch.scheduleDelay = time.Duration(delay) * time.Millisecond
	batch.exportTimeout = time.Duration(timeout) * time.Millisecond
	return batch, nil
}

func positiveInt(getenv func(string) string, variable string, otelDefault int) (int, error) {
	raw := strings.TrimSpace(getenv(variable))
	if raw == "" {
		return otelDefault, nil
	}
	value, err := strconv.Atoi(raw)
	if err != nil || value <= 0 {
		return 0, &exportSettingsError{variable, fmt.Sprintf("not a whole number greater than 0 (OpenTelemetry: %d)", otelDefault)}
	}
	return value, nil
}

// batchOptions are the batch processor's options for these settings, so that it reads
// none of the variables itself.
func (b batchSettings) options() []sdktrace.BatchSpanProcessorOption {
	return []sdktrace.BatchSpanProcessorOption{
		sdktrace.WithBatchTimeout(b.scheduleDelay),
		sdktrace.WithExportTimeout(b.exportTimeout),
		sdktrace.WithMaxQueueSize(b.maxQueueSize),
		sdktrace.WithMaxExportBatchSize(b.maxBatchSize),
	}
}

// resourceAttributes: OTEL_RESOURCE_ATTRIBUTES' key=value items, separated by commas,
// each value URL-decoded (as OpenTelemetry reads it).
func resourceAttributes(getenv func(string) string) ([]attribute.KeyValue, error) {
	const variable = "OTEL_RESOURCE_ATTRIBUTES"
	raw := strings.TrimSpace(getenv(variable))
	if raw == "" {
		return nil, nil
	}
	var attributes []attribute.KeyValue
	for _, item := range strings.Split(raw, ",") {
		if strings.TrimSpace(item) == "" {
			continue
		}
		key, value, found := strings.Cut(item, "=")
		key = strings.TrimSpace(key)
		decoded, err := neturl.PathUnescape(strings.TrimSpace(value))
		if !found || key == "" || err != nil {
			return nil, &exportSettingsError{variable, "every attribute is key=value, separated by commas, the value URL-encoded"}
		}
		attributes = append(attributes, attribute.String(key, decoded))
	}
	return attributes, nil
}

// samplerFromEnv is the sampler OTEL_TRACES_SAMPLER and _ARG name, as OpenTelemetry reads
// them (parentbased_always_on when unset), and a warning when either could not be used.
func samplerFromEnv(getenv func(string) string) (sdktrace.Sampler, string) {
	const variable, argVariable = "OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG"
	name := strings.ToLower(strings.TrimSpace(getenv(variable)))
	arg := strings.TrimSpace(getenv(argVariable))
	ratio := func() (sdktrace.Sampler, string) {
		if arg == "" {
			return sdktrace.TraceIDRatioBased(1), ""
		}
		value, err := strconv.ParseFloat(arg, 64)
		if err != nil || !(value >= 0 && value <= 1) {
			return sdktrace.TraceIDRatioBased(1), argVariable + ": not a ratio from 0 to 1; sampling 1"
		}
		return sdktrace.TraceIDRatioBased(value), ""
	}
	switch name {
	case "", "parentbased_always_on":
		return sdktrace.ParentBased(sdktrace.AlwaysSample()), ""
	case "always_on":
		return sdktrace.AlwaysSample(), ""
	case "always_off":
		return sdktrace.NeverSample(), ""
	case "parentbased_always_off":
		return sdktrace.ParentBased(sdktrace.NeverSample()), ""
	case "traceidratio":
		return ratio()
	case "parentbased_traceidratio":
		sampler, warning := ratio()
		return sdktrace.ParentBased(sampler), warning
	}
	return sdktrace.ParentBased(sdktrace.AlwaysSample()),
		variable + ": not a sampler this SDK has (always_on, always_off, traceidratio and their parentbased_ forms); " +
			"using parentbased_always_on"
}
