package plugin

// etcd's v3 JSON gateway as a registering plugin reaches it (registry.go): over http:// or
// https://, with a client certificate, as one of etcd's users, the same contract as the
// Python SDK's (docs/registry.md, "A plugin registers itself").
//
// Every setting is checked before the plugin serves: TLS files only with an https://
// etcd, a client certificate with its key, a user with a password, and a password over
// plain http:// only to a loopback etcd, where it crosses no network. A user
// authenticates (/v3/auth/authenticate) and sends its token with every request; etcd
// forgets a simple token left unused for its --auth-token-ttl, and every token when it
// restarts, so a request it refuses for that (HTTP 401, gRPC code 16) is sent once more
// with a new token. An etcd whose authentication is off is used without a token, as
// etcd's own clients do (said once); should it turn authentication on, the first request
// it refuses is sent once more with a token. An etcdRefused error says etcd answered and
// turned the plugin away (the TLS handshake, the user's password or permission);
// messages never hold the password.

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"net/url"
	"os"
	"strings"
	"time"
)

// The variables that say how etcd is reached, the same in every SDK. The password has
// no flag anywhere: a command line shows in the process list.
const (
	EnvRegisterEtcdCAFile   = "LINCHKIT_REGISTER_ETCD_CA_FILE"
	EnvRegisterEtcdCertFile = "LINCHKIT_REGISTER_ETCD_CERT_FILE"
	EnvRegisterEtcdKeyFile  = "LINCHKIT_REGISTER_ETCD_KEY_FILE"
	EnvRegisterEtcdUser     = "LINCHKIT_REGISTER_ETCD_USER"
	EnvRegisterEtcdPassword = "LINCHKIT_REGISTER_ETCD_PASSWORD"
)

// gRPC status codes etcd's gateway reports: "code" in a unary answer, "error.grpc_code"
// in a stream's (the lease keepalive's).
const (
	codeInvalidArgument    = 3  // authentication failed: a wrong user name or password
	codePermissionDenied   = 7  // the user may not do this
	codeFailedPrecondition = 9  // authentication is not enabled
	codeUnauthenticated    = 16 // invalid auth token: expired unused, or etcd restarted
)

// etcdRefused: etcd answered and turned the plugin away. Retried as an outage is: an
// operator may mend etcd's side while the plugin serves.
type etcdRefused struct{ message string }

func (e *etcdRefused) Error() string { return e.message }

// accessNames: how messages name the settings of etcd's access, as they were given.
type accessNames struct{ caFile, certFile, keyFile, user string }

// etcdGateway posts to etcd's JSON gateway as the configured user. Not safe for
// concurrent use: the registration's goroutine alone uses it.
type etcdGateway struct {
	base     string
	client   *http.Client
	user     string
	password string
	token    string
	certFile string // whether a client certificate is presented, for messages
	caFile   string
	names    accessNames
	// authenticationOff: etcd answered that its authentication is off, so requests go
	// without a token.
	authenticationOff bool
	say               func(format string, args ...any)
}

// etcdGatewayFrom checks how etcd at base (parsed: an http(s) URL) is reached, as config
// says, and returns a gateway whose requests are bounded by timeout; say tells what is
// worth knowing but not a failure. Messages name each setting as it was given.
func etcdGatewayFrom(base *url.URL, config registryConfig, timeout time.Duration,
	say func(format string, args ...any)) (*etcdGateway, error) {
	caFile, certFile, keyFile := config.value(settingCAFile), config.value(settingCertFile), config.value(settingKeyFile)
	user, password := config.value(settingUser), config.getenv(EnvRegisterEtcdPassword)
	names := accessNames{
		caFile:   config.name(settingCAFile),
		certFile: config.name(settingCertFile),
		keyFile:  config.name(settingKeyFile),
		user:     config.name(settingUser),
	}
	if (user == "") != (password == "") {
		given, missing := names.user, EnvRegisterEtcdPassword
		if user == "" {
			given, missing = missing, given
		}
		return nil, fmt.Errorf("%s needs %s too: etcd takes both or neither", given, missing)
	}
	if (certFile == "") != (keyFile == "") {
		given, missing := names.certFile, names.keyFile
		if certFile == "" {
			given, missing = missing, given
		}
		return nil, fmt.Errorf("%s needs %s too: a client certificate and its key", given, missing)
	}
	// No proxy: a registry is reached directly, as the dispatcher reaches it.
	transport := &http.Transport{Proxy: nil}
	if base.Scheme != "https" {
		for _, file := range [][2]string{{names.caFile, caFile}, {names.certFile, certFile}, {names.keyFile, keyFile}} {
			if file[1] != "" {
				return nil, fmt.Errorf("%s is for an https:// etcd, and %s is not: use https:// or leave it unset", file[0], base)
			}
		}
		if password != "" && !isLoopback(base.Hostname()) {
			return nil, fmt.Errorf("%s would cross the network in clear to %s: "+
				"reach etcd over https://, or on a loopback address", EnvRegisterEtcdPassword, base)
		}
	} else {
		tlsConfig := &tls.Config{MinVersion: tls.VersionTLS12}
		if caFile != "" {
			pem, err := os.ReadFile(caFile)
			if err != nil {
				return nil, fmt.Errorf("%s: cannot read %s (%v)", names.caFile, caFile, pathErrorReason(err))
			}
			roots := x509.NewCertPool()
			if !roots.AppendCertsFromPEM(pem) {
				return nil, fmt.Errorf("%s: %s holds no PEM certificate", names.caFile, caFile)
			}
			tlsConfig.RootCAs = roots
		}
		if certFile != "" {
			pair, err := tls.LoadX509KeyPair(certFile, keyFile)
			if err != nil {
				return nil, fmt.Errorf("%s and %s: cannot read %s and %s as a PEM certificate and its unencrypted key (%v)",
					names.certFile, names.keyFile, certFile, keyFile, pathErrorReason(err))
			}
			tlsConfig.Certificates = []tls.Certificate{pair}
		}
		transport.TLSClientConfig = tlsConfig
	}
	return &etcdGateway{
		base:     strings.TrimRight(base.String(), "/"),
		client:   &http.Client{Timeout: timeout, Transport: transport},
		user:     user,
		password: password,
		certFile: certFile,
		caFile:   caFile,
		names:    names,
		say:      say,
	}, nil
}

// isLoopback: 127.0.0.0/8, ::1, localhost, hosts this machine's own traffic never leaves.
func isLoopback(host string) bool {
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

func pathErrorReason(err error) error {
	var pathErr *fs.PathError
	if errors.As(err, &pathErr) {
		return pathErr.Err
	}
	return err
}

// post sends body to path as the configured user and returns etcd's answer (its error
// answers are JSON too), or an etcdRefused error when etcd turns the user away.
func (g *etcdGateway) post(path string, body map[string]any) (map[string]any, error) {
	if g.user != "" && g.token == "" && !g.authenticationOff {
		if err := g.authenticate(); err != nil {
			return nil, err
		}
	}
	status, answer, err := g.exchange(path, body, g.token)
	if err != nil {
		return nil, err
	}
	code := grpcCode(answer)
	// A token that expired unused or that a restarted etcd forgot; or none, and etcd has
	// turned its authentication on since: a new token, and one more try.
	stale := status == http.StatusUnauthorized && code == codeUnauthenticated
	tokenless := status == http.StatusForbidden && code == codePermissionDenied && g.token == ""
	if g.user != "" && (stale || tokenless) {
		g.token, g.authenticationOff = "", false
		if err := g.authenticate(); err != nil {
			return nil, err
		}
		if status, answer, err = g.exchange(path, body, g.token); err != nil {
			return nil, err
		}
		code = grpcCode(answer)
	}
	if (status == http.StatusUnauthorized || status == http.StatusForbidden) &&
		(code == codeUnauthenticated || code == codePermissionDenied) {
		return nil, g.refusal(path, code, answer)
	}
	return answer, nil
}

// authenticate sets the user's token, or notes that etcd's authentication is off.
func (g *etcdGateway) authenticate() error {
	status, answer, err := g.exchange("/v3/auth/authenticate", map[string]any{"name": g.user, "password": g.password}, "")
	if err != nil {
		return err
	}
	if token, ok := answer["token"].(string); status == http.StatusOK && ok && token != "" {
		g.token = token
		return nil
	}
	switch grpcCode(answer) {
	case codeInvalidArgument:
		return &etcdRefused{fmt.Sprintf("etcd at %s refused user '%s': authentication failed (a wrong user name or %s)",
			g.base, g.user, EnvRegisterEtcdPassword)}
	case codeFailedPrecondition: // "authentication is not enabled"
		g.authenticationOff = true
		g.say("etcd at %s has authentication off: registering without user '%s' (%s can be unset)",
			g.base, g.user, g.names.user)
		return nil
	}
	return fmt.Errorf("etcd at %s did not authenticate user '%s'%s", g.base, g.user, why(answer))
}

func (g *etcdGateway) refusal(path string, code int64, answer map[string]any) error {
	switch {
	case g.user == "":
		return &etcdRefused{fmt.Sprintf("etcd at %s requires a user (%s): set %s and %s",
			g.base, message(answer), g.names.user, EnvRegisterEtcdPassword)}
	case code == codePermissionDenied:
		return &etcdRefused{fmt.Sprintf("etcd at %s denies user '%s' %s (permission denied): "+
			"grant the user's role READWRITE on the registry prefix", g.base, g.user, path)}
	}
	return &etcdRefused{fmt.Sprintf("etcd at %s refused the token it just gave user '%s' (%s)", g.base, g.user, message(answer))}
}

// exchange is one POST, with token unless it is empty; the status and the JSON answer.
func (g *etcdGateway) exchange(path string, body map[string]any, token string) (int, map[string]any, error) {
	payload, _ := json.Marshal(body)
	request, err := http.NewRequest(http.MethodPost, g.base+path, bytes.NewReader(payload))
	if err != nil {
		return 0, nil, fmt.Errorf("%s: %v", g.base, err)
	}
	request.Header.Set("Content-Type", "application/json")
	if token != "" {
		request.Header.Set("Authorization", token)
	}
	response, err := g.client.Do(request)
	if err != nil {
		return 0, nil, g.failure(err)
	}
	defer response.Body.Close()
	raw, err := io.ReadAll(io.LimitReader(response.Body, maxEtcdAnswer))
	if err != nil {
		return 0, nil, fmt.Errorf("%s: the answer broke off (%v)", g.base, err)
	}
	var answer map[string]any
	if err := json.Unmarshal(raw, &answer); err != nil || answer == nil {
		return 0, nil, fmt.Errorf("%s answered something that is not a JSON object", g.base)
	}
	return response.StatusCode, answer, nil
}

// failure says why a request got no answer: etcd turned the plugin away (an etcdRefused,
// after which it waits longer to try again), or it does not answer.
func (g *etcdGateway) failure(err error) error {
	var netErr net.Error
	if errors.As(err, &netErr) && netErr.Timeout() {
		return fmt.Errorf("%s does not answer within %s", g.base, g.client.Timeout)
	}
	var unverified *tls.CertificateVerificationError
	if errors.As(err, &unverified) {
		hint := "name the CA that issued it with " + g.names.caFile
		if g.caFile != "" {
			hint = "is " + g.names.caFile + " the CA that issued it?"
		}
		return &etcdRefused{fmt.Sprintf("cannot verify etcd's certificate at %s (%v): %s", g.base, unverified.Err, hint)}
	}
	// etcd's word, a TLS alert (a "remote error"): it does not trust the client's
	// certificate, or got none. net/http reads it even when it comes after the client's
	// side of a TLS 1.3 handshake is over, as the request is written.
	var opErr *net.OpError
	if errors.As(err, &opErr) && opErr.Op == "remote error" {
		hint := "etcd may require a client certificate (" + g.names.certFile + ")"
		if g.certFile != "" {
			hint = "does etcd trust the certificate of " + g.names.certFile + "?"
		}
		return &etcdRefused{fmt.Sprintf("the TLS handshake with etcd at %s failed (%v): %s", g.base, opErr.Err, hint)}
	}
	// What answered does not speak TLS (an http:// etcd, another service).
	var header tls.RecordHeaderError
	if errors.Is(err, http.ErrSchemeMismatch) || errors.As(err, &header) {
		return &etcdRefused{fmt.Sprintf("the TLS handshake with etcd at %s failed (%v): "+
			"is it etcd's TLS port, speaking TLS 1.2 or later?", g.base, errors.Unwrap(err))}
	}
	// Anything else is an etcd that does not answer: a connection refused or reset, or
	// closed mid-handshake (an EOF) by a flaky etcd or load balancer, tried again soon.
	return fmt.Errorf("%s does not answer (%v)", g.base, errors.Unwrap(err))
}

// grpcCode is the gRPC status code of an error answer, 0 in any other.
func grpcCode(answer map[string]any) int64 {
	if code, ok := answer["code"]; ok {
		return number(code)
	}
	if stream, ok := answer["error"].(map[string]any); ok {
		return number(stream["grpc_code"])
	}
	return 0
}

// message is etcd's message in an error answer (a stream's is inside "error"), on one
// line and at most 200 bytes.
func message(answer map[string]any) string {
	text, _ := answer["message"].(string)
	if stream, ok := answer["error"].(map[string]any); ok && text == "" {
		text, _ = stream["message"].(string)
	}
	if len(text) > 200 {
		text = text[:200]
	}
	return strings.Join(strings.Fields(text), " ")
}
