package plugin

// How spans reach the collector: OpenTelemetry's OTLP/HTTP exporter sends through an
// http.Client of the SDK's (collectorClient), as the Python SDK's exporter sends through
// its CollectorSession (linchkit_plugin._collector_session). Every request:
//
//   - ends at the export's timeout (OTEL_EXPORTER_OTLP_[TRACES_]TIMEOUT), its answer read
//     within it, however slowly the collector sends it;
//   - reads at most maxAnswerBytes of the answer, never decompressed (the exporter needs
//     its status and at most a partial-success message): a longer one is dropped with its
//     connection (the exporter alone read 4 MB, then failed the batch);
//   - follows no redirect: Go's client followed a 307, re-sending the exporter's headers,
//     tokens included, wherever the collector pointed. A redirect is said once; like the
//     Python SDK's, the spans sent there are lost;
//   - carries the endpoint's query and, as basic authentication, the user and password of
//     its URL (unless the headers' variable sets an authorization), as the Python and Rust
//     SDKs send them: OpenTelemetry's exporter keeps only the URL's host and path, and
//     dropped them without a word;
//   - fails with an error that names the collector by scheme, host and port only.
//
// An outage is said once (saidExporter): OpenTelemetry's error handler printed a plain
// line, without a level, for each batch that failed (30 in 15 s with the collector down),
// the collector's path with it. The SDK says when the collector stops taking spans and
// when it takes them again, and the batch processor hears of no failure.

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	neturl "net/url"
	"strings"
	"sync"
	"syscall"
	"time"

	sdktrace "go.opentelemetry.io/otel/sdk/trace"
)

// maxAnswerBytes is the most of a collector's answer that is read (an OTLP answer is a
// few bytes: at most a partial-success message).
const maxAnswerBytes = 64 * 1024

// collectorTransport sends the exporter's requests to the collector and says, once each,
// when it stops taking them, when it takes them again, and that it redirected.
type collectorTransport struct {
	base      http.RoundTripper
	collector string // scheme://host:port, as lines name it
	query     string // the endpoint's raw query
	user      *neturl.Userinfo

	mu           sync.Mutex
	failing      bool // the collector has not taken the last request (said once)
	redirectSaid bool
	// accounted: the last request's outcome was said already (it failed, or redirected),
	// so the exporter's error for it needs no line of its own.
	accounted bool
	// silent: the stop is over (tracing.shutdown); an export still running says nothing
	// more: the stop said what it dropped.
	silent bool
}

// silence ends what the transport says; a nil transport is ignored.
func (c *collectorTransport) silence() {
	if c == nil {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.silent = true
}

// collectorClient is the exporter's client for endpoint, with settings' timeout and TLS.
func collectorClient(endpoint string, settings exportSettings) (*http.Client, *collectorTransport) {
	parsed, _ := neturl.Parse(strings.TrimSpace(endpoint)) // the exporter parsed it already
	base := &http.Transport{
		Proxy:                  http.ProxyFromEnvironment,
		DialContext:            (&net.Dialer{Timeout: 30 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
		ForceAttemptHTTP2:      true,
		MaxIdleConns:           10,
		IdleConnTimeout:        90 * time.Second,
		TLSHandshakeTimeout:    10 * time.Second,
		TLSClientConfig:        settings.tls,
		DisableCompression:     true, // the answer is not decoded: no Accept-Encoding: gzip
		MaxResponseHeaderBytes: maxAnswerBytes,
	}
	transport := &collectorTransport{base: base, collector: collectorShown(endpoint)}
	if parsed != nil {
		transport.query, transport.user = parsed.RawQuery, parsed.User
	}
	client := &http.Client{
		Transport:     transport,
		Timeout:       settings.timeout,
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
	return client, transport
}

func (c *collectorTransport) RoundTrip(request *http.Request) (*http.Response, error) {
	if c.query != "" || c.user != nil {
		request = request.Clone(request.Context()) // a RoundTripper leaves its request as it was
		if c.query != "" {
			request.URL.RawQuery = c.query
		}
		// The URL's user and password, unless the headers' variable set an authorization
		// of its own (it wins, as in the other SDKs).
		if c.user != nil && request.Header.Get("Authorization") == "" {
			password, _ := c.user.Password()
			request.SetBasicAuth(c.user.Username(), password)
		}
	}
	response, err := c.base.RoundTrip(request)
	if err == nil {
		err = readAnswer(response)
	}
	if err != nil {
		failure := whatFailed(err)
		c.outcome(failure, false)
		return nil, &collectorError{text: "the trace collector at " + c.collector + ": " + failure,
			timeout: isTimeout(err), temporary: isTemporary(err)}
	}
	status := response.StatusCode
	if status >= 400 {
		c.outcome(fmt.Sprintf("it answered %d", status), false)
	} else {
		c.outcome("", status >= 300)
	}
	if status >= 300 && status < 400 {
		c.mu.Lock()
		if !c.redirectSaid && !c.silent {
			sdkLog.Warn(fmt.Sprintf("linchkit plugin: the trace collector at %s answered %d, a redirect, which is not "+
				"followed: the spans sent there are lost (said once). Point the exporter's endpoint at the collector "+
				"itself", c.collector, status))
		}
		c.redirectSaid = true
		c.mu.Unlock()
	}
	return response, nil
}

// readAnswer reads response's body into memory, at most maxAnswerBytes and within the
// request's time (the client's timeout cancels the read); a longer answer is dropped with
// its connection and the exporter gets an empty one.
func readAnswer(response *http.Response) error {
	body, err := io.ReadAll(io.LimitReader(response.Body, maxAnswerBytes+1))
	response.Body.Close() // a longer answer's connection is not reused: the rest is on it
	if err != nil && isTimeout(err) {
		return err
	}
	if err != nil || len(body) > maxAnswerBytes {
		body = nil // broken mid-answer, or too long: its status stands, as in the Python SDK
	}
	response.Body = io.NopCloser(bytes.NewReader(body))
	response.ContentLength = int64(len(body))
	response.Header.Del("Content-Length")
	return nil
}

// outcome says when the collector stops taking spans (failure: what happened) and when it
// takes them again; redirected: the request's outcome was said as a redirect.
func (c *collectorTransport) outcome(failure string, redirected bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.accounted = failure != "" || redirected
	if c.silent {
		return
	}
	switch {
	case failure != "" && !c.failing:
		c.failing = true
		sdkLog.Warn(fmt.Sprintf("linchkit plugin: spans are not reaching the trace collector at %s: %s. Those sent "+
			"until it takes them again are dropped (said once)", c.collector, failure))
	case failure == "" && c.failing:
		c.failing = false
		sdkLog.Warn(fmt.Sprintf("linchkit plugin: the trace collector at %s takes spans again", c.collector))
	}
}

// exportFailed: the exporter failed a batch with err; said as an outage unless the request
// it made said so already.
func (c *collectorTransport) exportFailed(err error, endpoint string) {
	c.mu.Lock()
	accounted := c.accounted
	c.mu.Unlock()
	if !accounted {
		c.outcome(scrubbed(err, endpoint), false)
	}
}

// collectorError is a request's failure, naming the collector by scheme, host and port
// only; Timeout and Temporary are the cause's, which the exporter's retries go by.
type collectorError struct {
	text               string
	timeout, temporary bool
}

func (e *collectorError) Error() string   { return e.text }
func (e *collectorError) Timeout() bool   { return e.timeout }
func (e *collectorError) Temporary() bool { return e.temporary }

func isTimeout(err error) bool {
	var timeout interface{ Timeout() bool }
	return errors.Is(err, context.DeadlineExceeded) || (errors.As(err, &timeout) && timeout.Timeout())
}

func isTemporary(err error) bool {
	var temporary interface{ Temporary() bool }
	return errors.As(err, &temporary) && temporary.Temporary()
}

// whatFailed says what went wrong with a request, in the Python SDK's words, without the
// URL that Go's errors quote.
func whatFailed(err error) string {
	var certificate *tls.CertificateVerificationError
	var unknownAuthority x509.UnknownAuthorityError
	var hostname x509.HostnameError
	var errno syscall.Errno
	var dial *net.OpError
	switch {
	case isTimeout(err):
		return "did not answer in time"
	case errors.As(err, &certificate), errors.As(err, &unknownAuthority), errors.As(err, &hostname):
		return "TLS failed (its certificate, or the CA the exporter trusts)"
	case errors.As(err, &errno):
		return "could not be reached (" + errno.Error() + ")"
	case errors.As(err, &dial) && dial.Op == "dial":
		return "could not be reached"
	case errors.Is(err, context.Canceled):
		return "the request was cancelled"
	}
	return "the connection failed"
}

// saidExporter is the exporter whose failures the collector's transport says, once an
// outage: the batch processor hears of none (it would hand each to OpenTelemetry's error
// handler, a line a batch).
type saidExporter struct {
	sdktrace.SpanExporter
	transport *collectorTransport
	endpoint  string
}

func (e saidExporter) ExportSpans(ctx context.Context, spans []sdktrace.ReadOnlySpan) error {
	if err := e.SpanExporter.ExportSpans(ctx, spans); err != nil {
		e.transport.exportFailed(err, e.endpoint)
	}
	return nil
}
