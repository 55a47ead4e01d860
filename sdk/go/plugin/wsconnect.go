package plugin

// Reverse mode over WebSocket (docs/protocol.md, "WebSocket binding"): the plugin dials
// the dispatcher's gateway (`connect --url ws://gateway/v1/plugins/connect`) and takes
// calls over that one connection (a wsSession, wssession.go), reconnecting after a drop
// with exponential backoff and full jitter. A 400, 401, 403 or 404 at the upgrade is
// final: the gateway refuses this plugin; so is a close 4403 after it (the hello names
// another id or version than the one admitted, or speaks a protocol the gateway does
// not), as the next connection would send the same hello. Every other close, 4400 (no
// hello within 10 s: maybe a slow link) included, is redialled.
//
// On SIGTERM the session says goaway and the plugin stops redialling; it exits once the
// gateway has closed the connection, or the stop's grace has passed.

import (
	"context"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	neturl "net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/coder/websocket"
)

const (
	initialConnectBackoff = 100 * time.Millisecond
	maxConnectBackoff     = 10 * time.Second
	// closeWrongPlugin: the gateway upgraded the connection but not the hello, which names
	// another id or version than the one it admitted (CLOSE_WRONG_PLUGIN in the Python SDK).
	closeWrongPlugin websocket.StatusCode = 4403
)

// errDiallingRegisters refuses LINCHKIT_REGISTER_ETCD to connect before anything runs, in
// the words of every SDK: no dispatcher dials a plugin that dials the gateway, so no
// registry could lead one to it; ignored, the operator who set it would believe it
// registered.
var errDiallingRegisters = fmt.Errorf("connect: %s: a plugin that dials the gateway (connect) is not registered in etcd, "+
	"as no dispatcher dials it: the gateway knows it by its connection. Serve over gRPC (serve) to be found there, "+
	"or leave it unset", EnvRegisterEtcd)

// ErrRefused is returned when the gateway refuses the plugin: a 400, 401, 403 or 404 at the
// upgrade, or a close 4403 after it (the error then carries the gateway's reason).
var ErrRefused = errors.New("the gateway refused the connection")

// isGatewayURL: a URL that can name a gateway (ws, wss, or http(s), which the WebSocket
// client dials the same way) with a host and a port that is one. Anything else would be
// retried for ever.
func isGatewayURL(raw string) bool {
	parsed, err := neturl.Parse(raw)
	if err != nil || parsed.Hostname() == "" {
		return false
	}
	if port := parsed.Port(); port != "" {
		if n, err := strconv.Atoi(port); err != nil || n > 65535 {
			return false
		}
	}
	switch strings.ToLower(parsed.Scheme) {
	case "ws", "wss", "http", "https":
		return true
	}
	return false
}

func (p *Plugin) runConnect(ctx context.Context, env Environment) error {
	flags := flag.NewFlagSet("connect", flag.ContinueOnError)
	url := flags.String("url", "", "the gateway's ws[s]://HOST/v1/plugins/connect")
	config := flags.String("config", "{}", "JSON object for the init hook")
	flags.String("ca-file", "", "wss://: `PEM` roots that verify the gateway (default: the system's) ["+EnvGatewayCA+"]")
	flags.String("cert-file", "", "wss://: the client certificate (chain, `PEM`) to log in with, for a gateway that "+
		"requires one or whose auth.mtls names it as the target's principal ["+EnvClientCert+"]")
	flags.String("key-file", "", "the unencrypted private key (`PEM`) of -cert-file ["+EnvClientKey+"]")
	flags.SetOutput(io.Discard) // a mistake is returned (and printed once); help goes to stdout
	if err := flags.Parse(env.Args[1:]); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			flags.SetOutput(env.Stdout)
			fmt.Fprintf(env.Stdout, "usage: %s connect -url ws://HOST/v1/plugins/connect [-config JSON] "+
				"[-ca-file PEM] [-cert-file PEM -key-file PEM]\n\n"+
				"Dial the dispatcher's gateway and take calls over that connection until SIGTERM.\n\n",
				filepath.Base(os.Args[0]))
			flags.PrintDefaults()
			fmt.Fprintf(env.Stdout, "\nenvironment:\n  %s, %s\n      the bearer token presented to the gateway\n"+
				"  %s, %s, %s\n      -ca-file, -cert-file and -key-file, where the flag is not given\n"+
				"  %s, %s\n      on SIGTERM, the milliseconds the gateway gets to finish its calls after goaway,\n"+
				"      then the stop and destroy hooks together, 0-%d (default %d each; 0 does not wait)\n",
				EnvTokenFile, EnvToken, EnvGatewayCA, EnvClientCert, EnvClientKey,
				EnvStopGraceMs, EnvStopHooksMs, maxStopMs, defaultStopCaps.hooks.Milliseconds())
			return nil
		}
		return fmt.Errorf("connect: %w (connect -help lists the flags)", withoutText(err, flags, env.Args))
	}
	if err := leftOver(flags, env.Args); err != nil {
		return fmt.Errorf("connect: %w (connect -help lists the flags)", err)
	}
	if *url == "" {
		return errors.New("connect: --url is required")
	}
	if !isGatewayURL(*url) {
		return fmt.Errorf("connect: --url must be a ws:// or wss:// URL "+
			"(e.g. ws://127.0.0.1:8080/v1/plugins/connect), not '%s'", maskedURL(*url))
	}
	if env.Getenv(EnvRegisterEtcd) != "" {
		return errDiallingRegisters
	}
	given := map[string]string{}
	flags.Visit(func(f *flag.Flag) { given[f.Name] = f.Value.String() })
	caFile, certFile, keyFile := connectTLSFiles(given, env.Getenv)
	tlsConfig, err := connectTLSConfig(*url, caFile, certFile, keyFile)
	if err != nil { // before the hooks run, as the URL is checked
		return fmt.Errorf("connect: %w", err)
	}
	token, err := configuredToken(env.Getenv)
	if err != nil {
		return fmt.Errorf("connect: %w", err)
	}
	caps, err := stopCapsFromEnv(env.Getenv)
	if err != nil {
		return fmt.Errorf("connect: %w", err)
	}
	// Events emitted while no host is connected wait for the next, as many as the Python
	// SDK keeps (its hooks' events included).
	p.events.keepAtMost(websocketEventBuffer)
	if err := p.startOwnLifecycle(ctx, "connect", *config); err != nil {
		return err
	}
	defer p.stopHooks(caps.hooks)
	header := http.Header{}
	header.Set("X-Plugin-Id", p.id)
	header.Set("X-Plugin-Version", p.version)
	if token != nil {
		header.Set("Authorization", "Bearer "+strings.TrimPrefix(string(token.expected), "bearer "))
	}
	backoff := initialConnectBackoff
	for {
		dialled := &dialledConn{}
		conn, response, err := websocket.Dial(ctx, *url, gatewayDialOptions(header, dialled, tlsConfig))
		dialled.idle() // a refused upgrade's connection is not kept for another request
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			if response != nil && refusedAtUpgrade(response.StatusCode) {
				return fmt.Errorf("connect: %w (%d)", ErrRefused, response.StatusCode)
			}
			// One line naming the gateway once, masked: a token in the URL's query or
			// userinfo is not for the log (dialFailure's words quote no URL).
			sdkLog.Warn(fmt.Sprintf("linchkit plugin: cannot reach the gateway at %s: %s; retrying",
				maskedURL(*url), dialFailure(err, *url)))
		} else {
			conn.SetReadLimit(maxMessageBytes)
			session := &wsSession{plugin: p, conn: conn, grace: caps.grace, abort: dialled.abort}
			// The gateway's read cap, on its 101: taken before the hello, so the kept events
			// flushed after it and the answers sent before the welcome keep under it
			// (wssendcap.go). Two values are no announcement.
			if announced := response.Header.Values(maxMessageCapHeader); len(announced) == 1 {
				session.announce(announced[0])
			}
			session.run(ctx)
			// Reset only once the gateway welcomed this plugin: one that closes every
			// connection at once was otherwise redialled 20 times a second.
			if session.welcomed {
				backoff = initialConnectBackoff
			}
			if ctx.Err() != nil {
				return nil
			}
			if session.closeCode == closeWrongPlugin {
				// The hello names another plugin than the upgrade admitted: the next
				// connection would send the same hello and get the same close.
				return fmt.Errorf("connect: %w (%d): %s", ErrRefused, closeWrongPlugin, session.closeReason)
			}
		}
		// Full jitter: a gateway coming back is not hit by every plugin at once.
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(time.Duration(rand.Int64N(int64(backoff) + 1))):
		}
		backoff = min(backoff*2, maxConnectBackoff)
	}
}

// gatewayDialOptions: how connect dials the gateway. permessage-deflate is offered on every
// dial, the gateway deciding: it accepts only where the plugin's inbound target says
// `compress: true`, so the manifest is the one place that says, as it is for a plugin the
// dispatcher dials; declined, the offer costs a header. Context takeover, as the gateway's
// own side keeps it: repetitive JSON calls deflate best against the ones before. A deflated
// message is inflated up to the read limit only (coder/websocket counts the inflated bytes,
// and closes 1009 past it, as for a plain one): no bomb. The dial's TCP connection is kept
// in dialled, so a stop can cut it. tlsConfig (connecttls.go) verifies a wss:// gateway
// and presents the client certificate; nil: the system's roots, no certificate.
func gatewayDialOptions(header http.Header, dialled *dialledConn, tlsConfig *tls.Config) *websocket.DialOptions {
	transport := dialled.newTransport()
	if tlsConfig != nil {
		transport.TLSClientConfig = tlsConfig.Clone()
	}
	return &websocket.DialOptions{
		HTTPHeader:      header,
		CompressionMode: websocket.CompressionContextTakeover,
		HTTPClient:      &http.Client{Transport: transport},
	}
}

// dialledConn keeps the TCP connection one dial opened (to the gateway, or to the proxy
// that tunnels to it), which coder/websocket does not show: closing it cuts the WebSocket
// at once, where a close handshake would wait for a gateway that neither reads nor closes.
type dialledConn struct {
	mu        sync.Mutex
	conn      net.Conn
	transport *http.Transport
}

// newTransport dials as http.DefaultTransport does (its proxy from the environment, its
// timeouts), keeping the connection.
func (d *dialledConn) newTransport() *http.Transport {
	transport := http.DefaultTransport.(*http.Transport).Clone()
	d.transport = transport
	dialer := &net.Dialer{Timeout: 30 * time.Second, KeepAlive: 30 * time.Second}
	transport.DialContext = func(ctx context.Context, network, address string) (net.Conn, error) {
		conn, err := dialer.DialContext(ctx, network, address)
		if err == nil {
			d.mu.Lock()
			d.conn = conn
			d.mu.Unlock()
		}
		return conn, err
	}
	return transport
}

// idle closes what the dial's transport keeps for another request: an upgraded
// connection is the WebSocket's, a refused one nobody's.
func (d *dialledConn) idle() {
	if d.transport != nil {
		d.transport.CloseIdleConnections()
	}
}

func (d *dialledConn) abort() {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.conn != nil {
		_ = d.conn.Close()
	}
}

// refusedAtUpgrade: the gateway's answers that the same dial would get again (a malformed
// id or version, a wrong credential, another principal, no such inbound plugin).
func refusedAtUpgrade(status int) bool {
	return status == 400 || status == 401 || status == 403 || status == 404
}
