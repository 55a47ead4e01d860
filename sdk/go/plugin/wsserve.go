package plugin

// `serve --websocket`: the plugin serves the WebSocket binding and the dispatcher dials
// it (docs/protocol.md, "WebSocket binding", dial mode: `provider: websocket`, `url:
// ws://host:port/`), as `dispatcher-plugin serve --websocket` (Python) and the TypeScript
// SDK's `serve --websocket` do. Every path upgrades, and each connection is a wsSession
// (wssession.go): the frames, limits, heartbeat and goaway are those of `connect`.
//
// An upgrade is refused before it happens, in a JSON error envelope that quotes nothing
// sent: 401 (WWW-Authenticate: Bearer) without the token of LINCHKIT_PLUGIN_TOKEN_FILE or
// LINCHKIT_PLUGIN_TOKEN, compared in constant time; 426 to a request that is no upgrade;
// 503 once the plugin is stopping, and 503 (overloaded, Retry-After: 1) past
// maxWebSocketConnections connections. Connections that have not sent a whole head count
// too: at most maxWaitingConnections at once, the oldest closed to make room, and each
// head must be complete within upgradeHeaderTimeout. permessage-deflate is accepted when the dispatcher
// offers it (a target with `compress: true`) and declined when it does not, so the
// manifest decides; a deflated message is inflated up to the 8 MiB read limit only
// (coder/websocket counts the inflated bytes and closes 1009 past it): no bomb. No TLS, as
// in the Python and TypeScript SDKs' WebSocket servers: a `wss://` url reaches the plugin
// through a proxy that terminates it.
//
// The plugin runs its own lifecycle (wslifecycle.go): the init hook with --config and the
// start hook before it serves. On SIGTERM the listener closes (a host dialling again is
// refused), each connection says goaway and is the host's to close once its calls are
// answered, within the stop's grace, and then the stop and destroy hooks run, within the
// hooks' cap.

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/coder/websocket"
)

const (
	// upgradeHeaderTimeout: an upgrade request's head must have come within it
	// (slowloris), as `dispatcher-plugin serve`'s --header-timeout.
	upgradeHeaderTimeout = 10 * time.Second
	// maxUpgradeHeaderBytes: the most of an upgrade request's head the server reads.
	maxUpgradeHeaderBytes = 64 << 10
	// notUpgradedIdleTimeout: how long a connection that asked for no upgrade may sit idle.
	notUpgradedIdleTimeout = 75 * time.Second
	// maxWebSocketConnections: the connections served at once, as `dispatcher-plugin
	// serve` holds its HTTP ones (--max-connections, 1000). Past it an upgrade is refused
	// 503 before it happens: each connection holds a goroutine, its buffers and a
	// descriptor, and a dispatcher needs one per plugin id, so a thousand more are a flood.
	maxWebSocketConnections = 1000
	// maxWaitingConnections: connections that have not sent a whole head yet, at once;
	// past it the oldest of them closes to make room (waitingConns). Uncounted, 1,200 idle
	// sockets held 1,200 descriptors and goroutines, each for upgradeHeaderTimeout.
	maxWaitingConnections = 100
)

// runWebSocketServer is `serve --websocket`: address and config are the flags, checked
// by runService; it returns once a stop (ctx) has ended every connection and run the hooks.
func (p *Plugin) runWebSocketServer(ctx context.Context, env Environment, address, config string) error {
	token, err := configuredToken(env.Getenv)
	if err != nil {
		return fmt.Errorf("serve: %w", err)
	}
	caps, err := stopCapsFromEnv(env.Getenv)
	if err != nil {
		return fmt.Errorf("serve: %w", err)
	}
	if mistake := configMistake(json.RawMessage(config)); mistake != "" {
		return fmt.Errorf("serve: %s", mistake)
	}
	listener, err := net.Listen("tcp", address)
	if err != nil {
		return fmt.Errorf("serve: cannot listen on %s: %w", address, err)
	}
	// Events emitted while no host is connected wait for the next, as many as the Python
	// SDK keeps (its hooks' events included).
	p.events.keepAtMost(websocketEventBuffer)
	if err := p.startOwnLifecycle(ctx, "serve", config); err != nil {
		listener.Close()
		return err
	}
	defer p.stopHooks(caps.hooks)
	if token == nil {
		sdkLog.Warn(fmt.Sprintf("linchkit plugin: no bearer token configured (%s or %s): "+
			"anybody who can reach %s can call this plugin", EnvTokenFile, EnvToken, listener.Addr()))
	}
	server := newWebSocketServer(ctx, p, token, caps.grace)
	listener = server.waiting.listener(listener)
	httpServer := &http.Server{
		Handler:           server,
		ConnContext:       withConn,
		ReadHeaderTimeout: upgradeHeaderTimeout,
		MaxHeaderBytes:    maxUpgradeHeaderBytes,
		IdleTimeout:       notUpgradedIdleTimeout,
		ErrorLog:          slog.NewLogLogger(sdkLog.Handler(), slog.LevelWarn),
	}
	served := make(chan error, 1)
	go func() { served <- httpServer.Serve(listener) }()
	line := fmt.Sprintf("%d|%d|tcp|%s|websocket|", CoreVersion, ProtocolVersion, listener.Addr())
	if _, err := io.WriteString(env.Stdout, line+"\n"); err != nil {
		server.stop(httpServer)
		return fmt.Errorf("cannot write the handshake line: %w", err)
	}
	select {
	case err := <-served:
		server.stop(httpServer)
		return fmt.Errorf("serve: %w", err)
	case <-ctx.Done():
	}
	server.stop(httpServer)
	return nil
}

// webSocketServer upgrades the dispatcher's dials and serves each connection until a stop.
type webSocketServer struct {
	plugin *Plugin
	token  *bearerToken
	grace  time.Duration
	// stopping ends at the stop: each session says goaway then.
	stopping context.Context
	stopAll  context.CancelFunc

	// maxConnections: the sessions served at once; past them an upgrade is refused.
	maxConnections int
	// waiting: the connections not past their head yet (a listener that counts them).
	waiting *waitingConns

	mu       sync.Mutex
	closing  bool
	sessions sync.WaitGroup
	open     int // sessions running now
	refused  int // upgrades refused past maxConnections
}

func newWebSocketServer(ctx context.Context, p *Plugin, token *bearerToken, grace time.Duration) *webSocketServer {
	stopping, stopAll := context.WithCancel(ctx)
	return &webSocketServer{plugin: p, token: token, grace: grace, stopping: stopping, stopAll: stopAll,
		maxConnections: maxWebSocketConnections, waiting: newWaitingConns(maxWaitingConnections)}
}

func (s *webSocketServer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return fmt.Sprintf("<webSocketServer %s sessions=%d/%d refused=%d %s closing=%t token=%t>",
		s.plugin.id, s.open, s.maxConnections, s.refused, s.waiting, s.closing, s.token != nil)
}

// stop takes no new connection (the listener closes, and so do connections not yet
// upgraded), has each session say goaway and waits for them all to end: each within the
// grace and closeHandshakeWait.
func (s *webSocketServer) stop(httpServer *http.Server) {
	s.mu.Lock()
	s.closing = true
	s.mu.Unlock()
	_ = httpServer.Close() // hijacked connections are not its: the sessions end them
	s.stopAll()
	s.sessions.Wait()
}

func (s *webSocketServer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	s.waiting.taken(connOf(r))
	// The token first: a caller without it learns nothing else, not even whether the
	// plugin is stopping.
	if s.token != nil && !s.token.admitsAuthorization(r.Header.Values("Authorization")) {
		w.Header().Set("WWW-Authenticate", "Bearer")
		refuseUpgrade(w, http.StatusUnauthorized, &Error{Type: TypeUnauthorized, Message: unauthenticatedMessage})
		return
	}
	if !headerHasToken(r.Header, "Connection", "upgrade") || !headerHasToken(r.Header, "Upgrade", "websocket") {
		w.Header().Set("Upgrade", "websocket")
		refuseUpgrade(w, http.StatusUpgradeRequired, InvalidParams("this plugin speaks WebSocket: send an upgrade"))
		return
	}
	s.mu.Lock()
	if s.closing {
		s.mu.Unlock()
		refuseUpgrade(w, http.StatusServiceUnavailable, &Error{Type: TypeTargetUnavailable, Message: "the plugin is stopping", Retryable: true})
		return
	}
	if s.open >= s.maxConnections {
		s.refused++
		first := s.refused == 1
		s.mu.Unlock()
		if first { // once: a flood would otherwise write a line per upgrade
			sdkLog.Warn(fmt.Sprintf("linchkit plugin: serve --websocket holds %d connections, its most; "+
				"refusing more with 503 until one closes", s.maxConnections))
		}
		w.Header().Set("Retry-After", "1")
		refuseUpgrade(w, http.StatusServiceUnavailable, &Error{Type: TypeOverloaded, Retryable: true, RetryAfter: 1,
			Message: fmt.Sprintf("this plugin holds as many WebSocket connections as it takes (%d): dial again shortly", s.maxConnections)})
		return
	}
	s.sessions.Add(1)
	s.open++
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		s.open--
		s.mu.Unlock()
		s.sessions.Done()
	}()
	// An upgrade Accept refuses (a bad version or key) ends its connection with the answer,
	// as every other refusal here: kept alive, it waited uncounted for another head.
	// Accept sets `Connection: Upgrade` on the upgrades it takes.
	w.Header().Set("Connection", "close")
	hijacked := &hijackRecorder{ResponseWriter: w}
	conn, err := websocket.Accept(hijacked, r, &websocket.AcceptOptions{
		// Accepted when offered, declined when not: the dispatcher offers it only for a
		// target with `compress: true`. Context takeover: repetitive JSON deflates best
		// against the messages before it.
		CompressionMode: websocket.CompressionContextTakeover,
	})
	if err != nil {
		return // Accept answered the request (a malformed upgrade, another origin)
	}
	conn.SetReadLimit(maxMessageBytes)
	session := &wsSession{plugin: s.plugin, conn: conn, grace: s.grace, abort: hijacked.abort}
	// The dispatcher's read cap: nothing over it is sent (wssendcap.go). Two values are
	// no announcement.
	if announced := r.Header.Values(maxMessageCapHeader); len(announced) == 1 {
		session.announce(announced[0])
	}
	session.run(s.stopping)
}

// refuseUpgrade answers a request that is not upgraded with the protocol's error envelope.
func refuseUpgrade(w http.ResponseWriter, status int, e *Error) {
	wire := map[string]any{"type": e.Type, "message": e.Message, "retryable": e.Retryable}
	if e.RetryAfter > 0 {
		wire["retry_after"] = e.RetryAfter
	}
	body, _ := json.Marshal(map[string]any{"ok": false, "error": wire})
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Connection", "close")
	w.WriteHeader(status)
	_, _ = w.Write(body)
}

// headerHasToken: whether one of the comma-separated values of header name is token, in
// any case (RFC 9110 §7.8: `Connection: keep-alive, Upgrade`).
func headerHasToken(header http.Header, name, token string) bool {
	for _, value := range header.Values(name) {
		for _, each := range strings.Split(value, ",") {
			if strings.EqualFold(strings.TrimSpace(each), token) {
				return true
			}
		}
	}
	return false
}

// hijackRecorder keeps the connection coder/websocket hijacks for the upgrade, which it
// does not show: closing it cuts the WebSocket at once, where a close handshake would wait
// for a host that neither reads nor closes.
type hijackRecorder struct {
	http.ResponseWriter
	mu   sync.Mutex
	conn net.Conn
}

func (h *hijackRecorder) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	conn, rw, err := http.NewResponseController(h.ResponseWriter).Hijack()
	if err == nil {
		h.mu.Lock()
		h.conn = conn
		h.mu.Unlock()
	}
	return conn, rw, err
}

func (h *hijackRecorder) abort() {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.conn != nil {
		_ = h.conn.Close()
	}
}

// waitingConns counts the connections accepted and not yet past their head: at most
// `most` at once, the oldest closed to make room for a new one. Closing the oldest, not
// the newest, keeps the server reachable during a flood: a dispatcher's head follows its
// connection within a round trip, long before `most` newer connections push it out,
// while idle sockets are pushed out by the flood itself.
type waitingConns struct {
	mu        sync.Mutex
	most      int
	opened    uint64                  // connections accepted so far: each one's order
	waiting   map[*waitingConn]uint64 // connection -> the order it opened in
	pushedOut int
}

func newWaitingConns(most int) *waitingConns {
	return &waitingConns{most: most, waiting: make(map[*waitingConn]uint64)}
}

func (w *waitingConns) String() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return fmt.Sprintf("waiting=%d/%d pushed_out=%d", len(w.waiting), w.most, w.pushedOut)
}

// listener: inner, each connection it accepts counted until its head is complete
// (taken) or it closes.
func (w *waitingConns) listener(inner net.Listener) net.Listener {
	return &countingListener{Listener: inner, waiting: w}
}

func (w *waitingConns) add(c *waitingConn) {
	w.mu.Lock()
	w.opened++
	w.waiting[c] = w.opened
	var oldest *waitingConn
	if len(w.waiting) > w.most {
		for each, order := range w.waiting { // at most most+1 of them
			if oldest == nil || order < w.waiting[oldest] {
				oldest = each
			}
		}
		delete(w.waiting, oldest)
		w.pushedOut++
	}
	w.mu.Unlock()
	if oldest != nil {
		_ = oldest.Conn.Close() // its server goroutine sees the read fail and ends
	}
}

// taken: c's head is complete, or c is closing: it waits no more.
func (w *waitingConns) taken(c *waitingConn) {
	if c == nil {
		return
	}
	w.mu.Lock()
	delete(w.waiting, c)
	w.mu.Unlock()
}

type countingListener struct {
	net.Listener
	waiting *waitingConns
}

func (l *countingListener) Accept() (net.Conn, error) {
	conn, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	counted := &waitingConn{Conn: conn, waiting: l.waiting}
	l.waiting.add(counted)
	return counted, nil
}

type waitingConn struct {
	net.Conn
	waiting *waitingConns
}

func (c *waitingConn) Close() error {
	c.waiting.taken(c)
	return c.Conn.Close()
}

type connKey struct{}

// withConn is the http.Server's ConnContext: the handler finds its connection (connOf).
func withConn(ctx context.Context, c net.Conn) context.Context {
	return context.WithValue(ctx, connKey{}, c)
}

func connOf(r *http.Request) *waitingConn {
	c, _ := r.Context().Value(connKey{}).(*waitingConn)
	return c
}
