package plugin

// connect's TLS files, for a wss:// gateway: the roots that verify it and the client
// certificate the plugin logs in with (mutual TLS). The same options, variables and words
// as every SDK's connect (the Python SDK's linchkit_plugin/_connect_tls.py):
//
//	-ca-file    LINCHKIT_PLUGIN_GATEWAY_CA    PEM roots that verify the gateway (default: the system's)
//	-cert-file  LINCHKIT_PLUGIN_CLIENT_CERT   the client certificate (chain), PEM
//	-key-file   LINCHKIT_PLUGIN_CLIENT_KEY    its unencrypted private key, PEM
//
// A flag wins over its variable; an empty variable counts as unset. Every file is read and
// checked before the plugin dials, a refusal naming the flag (or the variable it came from)
// and the file, never what it holds: a key's bytes are not for a log.
//
// A gateway that requires a client certificate refuses the handshake with a TLS alert
// that says why (certificate required, unknown certificate authority, expired
// certificate); dialFailure puts it, and the other reasons a dial failed, in one line's
// words.

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	neturl "net/url"
	"os"
	"strings"
	"unicode"
)

const (
	// EnvGatewayCA names the PEM roots connect verifies a wss:// gateway with.
	EnvGatewayCA = "LINCHKIT_PLUGIN_GATEWAY_CA"
	// EnvClientKey names the private key of connect's client certificate; the certificate's
	// file is EnvClientCert's (a path there: a subprocess plugin's AutoMTLS reads the same
	// name as the host's certificate itself, and connect never runs as one).
	EnvClientKey = "LINCHKIT_PLUGIN_CLIENT_KEY"
)

// connectTLSSetting is one of the three: its flag, its variable, and the value given.
type connectTLSSetting struct {
	flag, variable string
	value          string
	fromVariable   bool
}

// name is how a message names the setting: the way it was given.
func (s connectTLSSetting) name() string {
	if s.fromVariable {
		return s.variable
	}
	return "--" + s.flag
}

// connectTLSFiles reads the three settings: a flag given (set, even empty) wins over its
// variable.
func connectTLSFiles(given map[string]string, getenv func(string) string) (ca, cert, key connectTLSSetting) {
	read := func(flag, variable string) connectTLSSetting {
		setting := connectTLSSetting{flag: flag, variable: variable}
		if value, ok := given[flag]; ok && value != "" {
			setting.value = value
		} else if value := getenv(variable); value != "" {
			setting.value, setting.fromVariable = value, true
		}
		return setting
	}
	return read("ca-file", EnvGatewayCA), read("cert-file", EnvClientCert), read("key-file", EnvClientKey)
}

// connectTLSConfig is what connect verifies the gateway at rawURL with and presents to
// it: nil (the system's roots, no certificate) when no file is given. Its errors are one
// line each, quoting no file's bytes.
func connectTLSConfig(rawURL string, ca, cert, key connectTLSSetting) (*tls.Config, error) {
	if (cert.value == "") != (key.value == "") {
		return nil, errors.New("--cert-file and --key-file go together")
	}
	if ca.value == "" && cert.value == "" {
		return nil, nil
	}
	if parsed, err := neturl.Parse(rawURL); err != nil || !strings.EqualFold(parsed.Scheme, "wss") {
		return nil, errors.New("--ca-file, --cert-file and --key-file need a wss:// --url")
	}
	for _, setting := range []connectTLSSetting{ca, cert, key} {
		if err := checkedPath(setting); err != nil {
			return nil, err
		}
	}
	config := &tls.Config{MinVersion: tls.VersionTLS12}
	if ca.value != "" {
		text, err := readSetting(ca)
		if err != nil {
			return nil, err
		}
		roots := x509.NewCertPool()
		if !roots.AppendCertsFromPEM(text) {
			return nil, fmt.Errorf("%s: %s holds no PEM certificate", ca.name(), ca.value)
		}
		config.RootCAs = roots
	}
	if cert.value != "" {
		pair, err := clientPair(cert, key)
		if err != nil {
			return nil, err
		}
		config.Certificates = []tls.Certificate{pair}
	}
	return config, nil
}

// clientPair reads the certificate and its key, each checked on its own first, so that
// a refusal names the file at fault.
func clientPair(cert, key connectTLSSetting) (tls.Certificate, error) {
	certPEM, err := readSetting(cert)
	if err != nil {
		return tls.Certificate{}, err
	}
	if !holdsCertificate(certPEM) {
		return tls.Certificate{}, fmt.Errorf("%s: %s holds no PEM certificate", cert.name(), cert.value)
	}
	keyPEM, err := readSetting(key)
	if err != nil {
		return tls.Certificate{}, err
	}
	noKey := fmt.Errorf("%s: %s holds no unencrypted PEM private key", key.name(), key.value)
	if !holdsPlainKey(keyPEM) {
		return tls.Certificate{}, noKey
	}
	pair, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		// X509KeyPair's words (not shown: one line per refusal, in every SDK's words).
		if strings.Contains(err.Error(), "does not match") {
			return tls.Certificate{}, fmt.Errorf("%s: %s is not the private key of the certificate in %s",
				key.name(), key.value, cert.name())
		}
		return tls.Certificate{}, noKey
	}
	return pair, nil
}

// checkedPath refuses a value that cannot be a path without quoting it: the PEM text of a
// key pasted into LINCHKIT_PLUGIN_CLIENT_KEY would otherwise be printed in full.
func checkedPath(setting connectTLSSetting) error {
	if setting.value == "" {
		return nil
	}
	if strings.Contains(setting.value, "-----BEGIN") {
		return fmt.Errorf("%s: the value is PEM text, not a file's path: write it to a file and give that file's path",
			setting.name())
	}
	if strings.IndexFunc(setting.value, func(r rune) bool { return !unicode.IsPrint(r) }) >= 0 {
		return fmt.Errorf("%s: the value holds a line break or a control character", setting.name())
	}
	return nil
}

func readSetting(setting connectTLSSetting) ([]byte, error) {
	text, err := os.ReadFile(setting.value)
	if err != nil {
		var pathErr *fs.PathError
		reason := err
		if errors.As(err, &pathErr) {
			reason = pathErr.Err
		}
		return nil, fmt.Errorf("%s: cannot read %s: %v", setting.name(), setting.value, reason)
	}
	return text, nil
}

// holdsCertificate: at least one PEM CERTIFICATE block x509 parses.
func holdsCertificate(text []byte) bool {
	for block, rest := pem.Decode(text); block != nil; block, rest = pem.Decode(rest) {
		if block.Type == "CERTIFICATE" {
			if _, err := x509.ParseCertificate(block.Bytes); err == nil {
				return true
			}
		}
	}
	return false
}

// holdsPlainKey: the first PEM private key block is not encrypted (tls.X509KeyPair reads
// it: PKCS #8, PKCS #1 or SEC 1).
func holdsPlainKey(text []byte) bool {
	for block, rest := pem.Decode(text); block != nil; block, rest = pem.Decode(rest) {
		if strings.HasSuffix(block.Type, "PRIVATE KEY") {
			return !strings.Contains(block.Type, "ENCRYPTED") && !strings.Contains(block.Headers["Proc-Type"], "ENCRYPTED")
		}
	}
	return false
}

// alertWords: the gateway's TLS alerts about this plugin's client certificate (Go's
// names for them), in the words every SDK says them.
var alertWords = map[string]string{
	"certificate required":           "the gateway requires a client certificate and got none (--cert-file and --key-file)",
	"unknown certificate authority":  "the gateway does not trust this plugin's client certificate: no CA it trusts signed it",
	"expired certificate":            "this plugin's client certificate has expired: the gateway refused it",
	"bad certificate":                "the gateway refused the handshake (bad certificate)",
	"unsupported certificate":        "the gateway refused the handshake (unsupported certificate)",
	"revoked certificate":            "the gateway refused the handshake (certificate revoked)",
	"unknown certificate":            "the gateway refused the handshake (certificate unknown)",
	"access denied":                  "the gateway refused the handshake (access denied)",
	"handshake failure":              "the gateway refused the handshake (handshake failure)",
	"protocol version not supported": "the gateway refused the handshake (protocol version)",
}

// dialFailure says why a dial of the gateway at rawURL failed, in one line's words that
// quote no URL (the line names it once, masked): the gateway's alert about this plugin's
// certificate, why the gateway's own did not verify, or the cause under the dial's and
// net/http's wrapping (which repeat the URL).
func dialFailure(err error, rawURL string) string {
	var opErr *net.OpError
	if errors.As(err, &opErr) && opErr.Op == "remote error" && opErr.Err != nil {
		alert := strings.TrimPrefix(opErr.Err.Error(), "tls: ")
		if words, ok := alertWords[alert]; ok {
			return "TLS: " + words
		}
		return "TLS: the gateway refused the handshake (" + alert + ")"
	}
	var unverified *tls.CertificateVerificationError
	if errors.As(err, &unverified) {
		return "TLS: the gateway's certificate does not verify: " + maskedText(unverified.Err.Error(), rawURL)
	}
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return "the connection closed before an answer"
	}
	var urlErr *neturl.Error
	if errors.As(err, &urlErr) {
		err = urlErr.Err
	}
	return maskedText(strings.TrimPrefix(err.Error(), "failed to WebSocket dial: "), rawURL)
}
