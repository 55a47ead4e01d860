package plugin

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	// gRPC's gzip, registered here on purpose: the dispatcher sends large calls in it
	// (docs/protocol.md, "Compression"), and a server without it answers UNIMPLEMENTED.
	_ "google.golang.org/grpc/encoding/gzip"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/reflection"

	"github.com/linchkit/dispatcher/sdk/go/internal/pluginpb"
)

// The subprocess handshake (docs/protocol.md, "Subprocess plugins: the handshake").
const (
	EnvMagicCookie      = "LINCHKIT_PLUGIN_MAGIC_COOKIE"
	MagicCookieValue    = "d1spatch3r-pl4g1n"
	EnvProtocolVersions = "LINCHKIT_PLUGIN_PROTOCOL_VERSIONS"
	EnvNetwork          = "LINCHKIT_PLUGIN_NETWORK"
	EnvSocketDir        = "LINCHKIT_PLUGIN_SOCKET_DIR"
	EnvClientCert       = "LINCHKIT_PLUGIN_CLIENT_CERT"

	// CoreVersion is the version of the handshake line's format.
	CoreVersion = 1
)

// spanFlushMargin is the least a stop gives the spans still buffered, after the hooks: they
// get what remains of the hooks' cap, or this when less remains, so a whole stop stays
// within grace + hooks + this margin (a dead collector must not outlast the operator's caps).
const spanFlushMargin = time.Second

// ErrNotLaunchedByHost is returned when the plugin runs without the handshake
// environment and without `serve`.
var ErrNotLaunchedByHost = errors.New("this is a LinchKit dispatcher plugin: the dispatcher starts it as a subprocess; " +
	"to run it by hand as a gRPC service use `serve --address 127.0.0.1:0`")

// Serve runs the plugin until it is told to stop, then exits the process. With the
// arguments `serve [--address HOST:PORT]` it is a gRPC service on that address, with
// `serve --websocket [--address HOST:PORT] [--config JSON]` a WebSocket server the
// dispatcher dials (wsserve.go), with `connect --url URL [--config JSON]` it dials the
// dispatcher's gateway (wsconnect.go); otherwise it expects the handshake environment of
// a subprocess plugin and exits with status 1 without it. It stops gracefully on SIGTERM or SIGINT, and as a subprocess also when its
// stdin reaches end-of-file (the host died).
func (p *Plugin) Serve() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	env := Environment{Args: os.Args[1:], Getenv: os.Getenv, Stdin: os.Stdin, Stdout: os.Stdout}
	if err := p.Run(ctx, env); err != nil {
		// A refusal for the person who ran it (a mistyped flag, no host): one plain line,
		// as in every SDK, not a log record; a host logs the plugin's exit itself.
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	os.Exit(0)
}

// Environment is what Run reads from the process; tests pass their own.
type Environment struct {
	Args   []string
	Getenv func(string) string
	Stdin  io.Reader
	Stdout io.Writer
}

// Run serves the plugin until ctx is done (or, as a subprocess, stdin closes). Serve is
// Run on the real process; it is exported for tests and for embedding.
func (p *Plugin) Run(ctx context.Context, env Environment) error {
	traces, err := tracingFromEnv(ctx, env.Getenv, p)
	if err != nil {
		// Tracing is an aid, not the plugin's job: serve untraced rather than not at all.
		sdkLog.Warn("linchkit plugin: serving without tracing", "err", err)
	}
	p.tracing = traces
	defer func() {
		// After the server drained: the last calls' spans are buffered by then. Its own
		// deadline, as ctx is already done at a graceful stop.
		traces.shutdown(max(p.hooksLeft, spanFlushMargin))
	}()
	if len(env.Args) > 0 && env.Args[0] == "serve" {
		return p.runService(ctx, env)
	}
	if len(env.Args) > 0 && env.Args[0] == "connect" {
		return p.runConnect(ctx, env) // reverse mode over WebSocket (wsconnect.go)
	}
	return p.runSubprocess(ctx, env)
}

// switchFlag is a bool flag (-websocket) that takes a value it cannot read without
// quoting it: the flag package's own refusal does (invalid boolean value "…"), and what
// follows the = may be anything an operator slipped in, a token too. leftOver refuses it.
type switchFlag struct{ on, unreadable bool }

func (f *switchFlag) String() string   { return strconv.FormatBool(f.on) }
func (f *switchFlag) IsBoolFlag() bool { return true }
func (f *switchFlag) Set(value string) error {
	on, err := strconv.ParseBool(value)
	f.on, f.unreadable = on, err != nil
	return nil
}

// leftOver refuses what flags did not take from args (a command, then its flags), naming
// it without its text: an argument that is no flag (the flag package stops at it and
// ignores the rest, so -address after it went unread) by its place, as the shell counts
// $1, $2; a switch given a value it cannot read, by its name. A command line can carry a
// secret where an operator slipped, and the message goes to stderr and on to the logs.
// (The flag package names an unknown flag without its value.)
func leftOver(flags *flag.FlagSet, args []string) error {
	if flags.NArg() > 0 {
		return fmt.Errorf("unexpected argument #%d (its text is not shown)", len(args)-flags.NArg()+1)
	}
	var err error
	flags.Visit(func(f *flag.Flag) {
		if s, ok := f.Value.(*switchFlag); ok && s.unreadable && err == nil {
			err = fmt.Errorf("-%s takes true or false (its value is not shown)", f.Name)
		}
	})
	return err
}

// withoutText is the flag package's refusal err of args (a command, then the flags flags
// parsed), without the argument it quotes: whole when its syntax is bad (`---token=…`,
// `-=…`), and the name of an unknown flag given with a single dash, named by its place
// instead, as the shell counts $1, $2: what follows one dash may be anything pasted after
// it, a token too. An unknown flag given with two dashes is named, never its value.
func withoutText(err error, flags *flag.FlagSet, args []string) error {
	if strings.HasPrefix(err.Error(), "bad flag syntax: ") {
		return errors.New("bad flag syntax (its text is not shown)")
	}
	// The flag package stops at the flag it refuses: the argument before what it left.
	at := len(args) - flags.NArg() - 1
	if strings.HasPrefix(err.Error(), "flag provided but not defined: ") &&
		at > 0 && at < len(args) && !strings.HasPrefix(args[at], "--") {
		return fmt.Errorf("flag provided but not defined (argument #%d, its text is not shown)", at+1)
	}
	return err
}

// isHostPort: a host (a name, an IPv4 address or a bracketed IPv6 one) and a port in
// 0-65535. net.Listen takes "" and ":50051" as every interface, and a port by name.
func isHostPort(address string) bool {
	host, port, err := net.SplitHostPort(address)
	if err != nil || host == "" || port == "" || strings.Trim(port, "0123456789") != "" {
		return false
	}
	n, err := strconv.Atoi(port)
	return err == nil && n <= 65535
}

// serveEnvironment is what serve -help says of the environment a service reads.
var serveEnvironment = fmt.Sprintf(`
environment (docs/registry.md, docs/security.md, docs/observability.md):
  %s, %s
      the bearer token every call (with -websocket: every upgrade) must carry, from a file
      (a mounted secret) or the variable, not both (without either anyone may call)
  %s
      the password of -register-etcd-user: no flag takes it, a command line shows in ps
  [LINCHKIT_...] after a flag above
      the variable that flag reads when it is not given
  %s, %s
      on SIGTERM, the milliseconds the calls in flight get to finish, then the stop and
      destroy hooks together, 0-%d (default %d each; 0 does not wait)
  OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_EXPORTER_OTLP_TRACES_ENDPOINT
      export a span per call over OTLP/HTTP
`, EnvTokenFile, EnvToken, EnvRegisterEtcdPassword,
	EnvStopGraceMs, EnvStopHooksMs, maxStopMs, defaultStopCaps.hooks.Milliseconds())

func (p *Plugin) runService(ctx context.Context, env Environment) error {
	flags := flag.NewFlagSet("serve", flag.ContinueOnError)
	address := flags.String("address", "127.0.0.1:0", "host:port to serve on")
	websocket := &switchFlag{}
	flags.Var(websocket, "websocket", "serve the WebSocket binding instead of gRPC: the dispatcher dials it "+
		"(provider: websocket, url: ws://HOST:PORT/)")
	config := flags.String("config", "{}", "with -websocket: the `JSON` object the init hook gets; "+
		"a gRPC service gets it from the dispatcher's Init call")
	registryFlags := addRegistryFlags(flags)
	flags.Usage = func() {
		fmt.Fprintf(flags.Output(), "usage: %s serve [-address host:port] [-websocket [-config JSON]] [-register-etcd URL ...]\n\n"+
			"Serve the plugin until SIGTERM or Ctrl+C: a gRPC service, or with -websocket a WebSocket server\n"+
			"the dispatcher dials. Once listening it prints one line: 1|1|tcp|HOST:PORT|grpc| (or |websocket|).\n\n",
			filepath.Base(os.Args[0]))
		printFlags(flags)
		fmt.Fprint(flags.Output(), serveEnvironment)
	}
	flags.SetOutput(io.Discard) // a mistake is returned (and printed once); help goes to stdout
	if err := flags.Parse(env.Args[1:]); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			flags.SetOutput(env.Stdout)
			flags.Usage()
			return nil
		}
		return fmt.Errorf("serve: %w (serve -help lists the flags)", withoutText(err, flags, env.Args))
	}
	registry, err := registryFlags(env.Getenv) // a password flag first, with what followed it
	if err != nil {
		return fmt.Errorf("serve: %w", err)
	}
	if err := leftOver(flags, env.Args); err != nil {
		return fmt.Errorf("serve: %w (serve -help lists the flags)", err)
	}
	if !isHostPort(*address) {
		return fmt.Errorf("serve: --address must be host:port with a port in 0-65535 "+
			"(e.g. 127.0.0.1:50051), not '%s'", *address)
	}
	if websocket.on {
		if registry.value(settingEtcd) != "" {
			// Refused, not ignored: an operator who set it expects the plugin to be found there.
			return fmt.Errorf("serve: %s: a WebSocket server is not registered in etcd, as a dispatcher dials "+
				"a websocket target at its one url and finds none in a registry: serve over gRPC to be found "+
				"there, or leave it unset", registry.name(settingEtcd))
		}
		if s, given := registry.firstFlagGiven(); given {
			// Refused, not dropped: the operator would believe it in force.
			return fmt.Errorf("serve: %s: a WebSocket server is not registered, as a dispatcher dials a "+
				"websocket target at its one url and finds none in a registry: serve over gRPC to be "+
				"registered, or leave the flag out", registry.name(s))
		}
		return p.runWebSocketServer(ctx, env, *address, *config)
	}
	configGiven := false
	flags.Visit(func(f *flag.Flag) { configGiven = configGiven || f.Name == "config" })
	if configGiven {
		return errors.New("serve: --config needs --websocket (a gRPC service gets its config from the Init call)")
	}
	token, err := configuredToken(env.Getenv)
	if err != nil {
		return fmt.Errorf("serve: %w", err)
	}
	caps, err := stopCapsFromEnv(env.Getenv)
	if err != nil {
		return fmt.Errorf("serve: %w", err)
	}
	listener, err := net.Listen("tcp", *address)
	if err != nil {
		return fmt.Errorf("serve: cannot listen on %s: %w", *address, err)
	}
	registration, err := registrationFrom(registry, listener.Addr(), sdkLog)
	if err != nil {
		listener.Close()
		return fmt.Errorf("serve: %w", err)
	}
	if token == nil {
		sdkLog.Warn(fmt.Sprintf("linchkit plugin: no bearer token configured (%s or %s): "+
			"anybody who can reach %s can call this plugin", EnvTokenFile, EnvToken, listener.Addr()))
	}
	line := handshakeLine(ProtocolVersion, "tcp", listener.Addr().String(), "")
	var onStopping func()
	if registration != nil {
		registration.start()
		onStopping = registration.deregister
	}
	return p.serveOn(ctx, listener, nil, token, true, line, env.Stdout, nil, onStopping, caps)
}

func (p *Plugin) runSubprocess(ctx context.Context, env Environment) error {
	if env.Getenv(EnvMagicCookie) != MagicCookieValue {
		return ErrNotLaunchedByHost
	}
	version, err := negotiateVersion(env.Getenv(EnvProtocolVersions))
	if err != nil {
		return err
	}
	caps, err := stopCapsFromEnv(env.Getenv)
	if err != nil {
		return err
	}
	network := env.Getenv(EnvNetwork)
	if network == "" {
		network = "unix"
	}
	var listener net.Listener
	switch network {
	case "unix":
		listener, err = listenUnix(env.Getenv(EnvSocketDir))
	case "tcp":
		listener, err = net.Listen("tcp", "127.0.0.1:0")
	default:
		return fmt.Errorf("%s=%q: expected unix or tcp", EnvNetwork, network)
	}
	if err != nil {
		return fmt.Errorf("cannot listen for the host: %w", err)
	}
	var creds credentials.TransportCredentials
	serverCert := ""
	if clientPEM := env.Getenv(EnvClientCert); clientPEM != "" {
		tlsConfig, certDER, err := autoMTLS([]byte(clientPEM))
		if err != nil {
			listener.Close()
			return err
		}
		creds = credentials.NewTLS(tlsConfig)
		serverCert = encodeCert(certDER)
	}
	// The host holds our stdin's write end: end-of-file means it is gone, however it died.
	stdinClosed := make(chan struct{})
	go func() {
		_, _ = io.Copy(io.Discard, env.Stdin)
		close(stdinClosed)
	}()
	line := handshakeLine(version, network, listener.Addr().String(), serverCert)
	// No token here: AutoMTLS already admits only the host that launched us.
	return p.serveOn(ctx, listener, creds, nil, false, line, env.Stdout, stdinClosed, nil, caps)
}

// MaxMessageBytes is the largest gRPC message the plugin takes or sends (Call, CallBatch,
// CallStream items, Events): 64 MiB, the dispatcher's own limit (its channel's
// grpc.max_receive_message_length and grpc.max_send_message_length), not grpc-go's
// default 4 MiB receive. A larger message is refused with RESOURCE_EXHAUSTED.
const MaxMessageBytes = 64 << 20

// serveOn serves on listener, prints the handshake line once serving, and stops
// gracefully when ctx is done or stdinClosed closes: onStopping (leave a registry), then
// the calls in flight are drained (caps.grace at most), then the hooks the host did not
// call run (caps.hooks at most). With a token, every RPC but health's and reflection's
// must carry it.
func (p *Plugin) serveOn(ctx context.Context, listener net.Listener, creds credentials.TransportCredentials,
	token *bearerToken, servingFromStart bool, line string, stdout io.Writer, stdinClosed <-chan struct{},
	onStopping func(), caps stopCaps) error {
	options := []grpc.ServerOption{
		grpc.MaxRecvMsgSize(MaxMessageBytes),
		grpc.MaxSendMsgSize(MaxMessageBytes),
	}
	if creds != nil {
		options = append(options, grpc.Creds(creds))
	}
	if token != nil {
		options = append(options, token.interceptors()...)
	}
	server := grpc.NewServer(options...)
	svc := newService(p, servingFromStart)
	pluginpb.RegisterPluginServiceServer(server, svc)
	healthpb.RegisterHealthServer(server, svc.health)
	// Server reflection, v1 and v1alpha (grpcurl list/describe); open like health.
	reflection.Register(server)

	served := make(chan error, 1)
	go func() { served <- server.Serve(listener) }()
	if _, err := io.WriteString(stdout, line+"\n"); err != nil {
		server.Stop()
		return fmt.Errorf("cannot write the handshake line: %w", err)
	}

	select {
	case err := <-served:
		return err
	case <-ctx.Done():
	case <-stdinClosed:
		sdkLog.Info("linchkit plugin: stdin closed, the host is gone; stopping")
	}
	if onStopping != nil {
		onStopping()
	}
	svc.stopServing()
	stopped := make(chan struct{})
	go func() { server.GracefulStop(); close(stopped) }()
	select {
	case <-stopped:
	case <-time.After(caps.grace):
		server.Stop()
	}
	p.hooksLeft = svc.runRemainingHooks(caps.hooks)
	return nil
}

func handshakeLine(version int, network, address, serverCert string) string {
	return fmt.Sprintf("%d|%d|%s|%s|grpc|%s", CoreVersion, version, network, address, serverCert)
}

// negotiateVersion picks the highest protocol version both sides speak. A host that
// names none speaks version 1.
func negotiateVersion(offered string) (int, error) {
	if strings.TrimSpace(offered) == "" {
		return ProtocolVersion, nil
	}
	best := 0
	for _, field := range strings.Split(offered, ",") {
		v, err := strconv.Atoi(strings.TrimSpace(field))
		if err != nil {
			return 0, fmt.Errorf("%s=%q: expected comma-separated integers", EnvProtocolVersions, offered)
		}
		if v == ProtocolVersion && v > best {
			best = v
		}
	}
	if best == 0 {
		return 0, fmt.Errorf("the host speaks protocol versions %s; this plugin speaks %d", offered, ProtocolVersion)
	}
	return best, nil
}

func listenUnix(dir string) (net.Listener, error) {
	if dir == "" {
		dir = os.TempDir()
	}
	suffix := make([]byte, 6)
	_, _ = rand.Read(suffix)
	path := filepath.Join(dir, fmt.Sprintf("plugin-%d-%s.sock", os.Getpid(), hex.EncodeToString(suffix)))
	return net.Listen("unix", path)
}
