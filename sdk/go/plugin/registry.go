package plugin

// Registration in an etcd registry, where a dispatcher's fleet finds the plugin
// (docs/registry.md). The contract is the dispatcher's: one key <prefix>/<instance id>
// per instance, on a lease the instance keeps alive, whose value is JSON
// {"address": "host:port"} for a gRPC server. etcd is reached through its v3 JSON
// gateway with net/http (etcdgateway.go: TLS, a client certificate, one of etcd's users
// and its token), so the SDK needs no etcd client module.
//
// An etcd that does not answer, or turns the plugin away (its certificate, its user's
// password or permission), is not fatal: the plugin serves, says so once on stderr and
// keeps trying, about every second while etcd does not answer, after waits that double
// up to refusedRetryCap while it turns the plugin away (refusedRetryWait); it registers
// again if etcd lost its lease. On SIGTERM or SIGINT the key is deleted and the lease
// revoked, the server keeps serving -leave-delay (LINCHKIT_LEAVE_DELAY) seconds (1) while
// dispatchers learn it left, and then the calls in flight are drained. Every setting has
// a flag of serve's and a variable (registryflags.go).

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	mathrand "math/rand/v2"
	"net"
	"net/url"
	"os"
	"strconv"
	"strings"
	"time"
)

// The registry's environment variables, the same in every SDK.
const (
	EnvRegisterEtcd   = "LINCHKIT_REGISTER_ETCD"
	EnvRegisterPrefix = "LINCHKIT_REGISTER_PREFIX"
	EnvRegisterTTL    = "LINCHKIT_REGISTER_TTL"
	EnvAdvertise      = "LINCHKIT_ADVERTISE"
	EnvLeaveDelay     = "LINCHKIT_LEAVE_DELAY"

	defaultRegisterTTL = 10
	// How long a server keeps serving once it has left the registry: the delete reaches
	// each dispatcher through etcd's watch within milliseconds on a LAN, not at once, and
	// a call one of them picks meanwhile must find the server serving, not stopping (a
	// call that may not be retried would fail).
	defaultLeaveDelay = time.Second
	maxLeaveDelay     = 600 * time.Second
	// The largest answer read from etcd: its answers here are a few hundred bytes.
	maxEtcdAnswer = 1 << 20
	// The longest wait between two tries while etcd turns the plugin away. etcd checks a
	// password with bcrypt, tens of milliseconds of a core each time, and a wrong one
	// stays wrong until an operator mends it: a hundred plugins deployed with it and
	// retrying every second would keep several of etcd's cores busy refusing them; at
	// this cap (waits drawn between 15 and 30 s) they cost it about four checks a second.
	// Longer would save little more and keep a mended fleet out of the registry longer:
	// at 30 s every plugin is back within half a minute of the fix.
	refusedRetryCap = 30 * time.Second
)

type registration struct {
	etcd    *etcdGateway
	key     string
	value   []byte
	ttl     int64
	log     *slog.Logger
	lease   int64
	written bool
	// leaveDelay: how long deregister waits after leaving, still serving.
	leaveDelay time.Duration
	stop       chan struct{}
	done       chan struct{}
}

// validEtcdHostPort: the URL names a host, and its port, when it has one, is in 1-65535
// (url.Parse takes any run of digits).
func validEtcdHostPort(parsed *url.URL) bool {
	if parsed.Hostname() == "" {
		return false
	}
	port := parsed.Port()
	if port == "" {
		return true // the scheme's own
	}
	n, err := strconv.Atoi(port)
	return err == nil && n >= 1 && n <= 65535
}

// registrationFrom is nil without an etcd (-register-etcd, LINCHKIT_REGISTER_ETCD);
// otherwise every setting is checked, so a mistake stops the plugin before it serves.
func registrationFrom(config registryConfig, listening net.Addr, log *slog.Logger) (*registration, error) {
	base := config.value(settingEtcd)
	if base == "" {
		return nil, nil
	}
	parsed, err := url.Parse(base)
	if err != nil || (parsed.Scheme != "http" && parsed.Scheme != "https") || parsed.Host == "" {
		return nil, fmt.Errorf("%s must be an http(s):// URL", config.name(settingEtcd))
	}
	if parsed.User != nil {
		return nil, fmt.Errorf("%s: etcd authentication by URL credentials is not supported", config.name(settingEtcd))
	}
	if !validEtcdHostPort(parsed) {
		// Dialled, a port over 65535 fails as an outage would, retried every second for ever.
		return nil, fmt.Errorf("%s: the etcd to register in must have a valid host name and a port in 1-65535",
			config.name(settingEtcd))
	}
	prefix := config.value(settingPrefix)
	if prefix == "" {
		return nil, fmt.Errorf("%s needs %s", config.name(settingEtcd), config.name(settingPrefix))
	}
	if len(prefix) < 2 || !strings.HasPrefix(prefix, "/") || strings.HasSuffix(prefix, "/") ||
		strings.ContainsAny(prefix, " \t\r\n") {
		return nil, fmt.Errorf("%s must start with / and not end with one, e.g. /linchkit/plugins/echo; got %q",
			config.name(settingPrefix), prefix)
	}
	ttl := int64(defaultRegisterTTL)
	if text := config.value(settingTTL); text != "" {
		ttl, err = strconv.ParseInt(text, 10, 64)
		if err != nil || ttl < 2 {
			return nil, fmt.Errorf("%s must be a whole number of seconds, at least 2; got %q", config.name(settingTTL), text)
		}
	}
	leaveDelay, err := leaveDelayFrom(config.value(settingLeaveDelay), config.name(settingLeaveDelay))
	if err != nil {
		return nil, err
	}
	address, err := advertisedAddress(config.value(settingAdvertise), config.name(settingAdvertise), listening)
	if err != nil {
		return nil, err
	}
	value, _ := json.Marshal(map[string]string{"address": address})
	// Each request is bounded well inside a renewal period.
	timeout := time.Duration(min(max(ttl/3, 1), 5)) * time.Second
	r := &registration{
		key:        prefix + "/" + instanceID(),
		value:      value,
		ttl:        ttl,
		log:        log,
		leaveDelay: leaveDelay,
		stop:       make(chan struct{}),
		done:       make(chan struct{}),
	}
	r.etcd, err = etcdGatewayFrom(parsed, config, timeout, func(format string, args ...any) {
		r.say(slog.LevelWarn, format, args...)
	})
	if err != nil {
		return nil, err
	}
	return r, nil
}

// leaveDelayFrom reads the leave delay (named name in a message): seconds in [0, 600],
// 1 when unset.
func leaveDelayFrom(text, name string) (time.Duration, error) {
	if text == "" {
		return defaultLeaveDelay, nil
	}
	seconds, err := strconv.ParseFloat(text, 64)
	delay := time.Duration(seconds * float64(time.Second))
	if err != nil || !(seconds >= 0 && delay <= maxLeaveDelay) { // NaN fails too
		return 0, fmt.Errorf("%s must be a number of seconds in [0, 600]; got %q", name, text)
	}
	return delay, nil
}

// advertisedAddress is the address to advertise (host:port, named name in a message) or
// where the server listens, unless that is every interface, which no dispatcher can call.
func advertisedAddress(advertise, name string, listening net.Addr) (string, error) {
	if advertise != "" {
		if strings.Contains(advertise, "://") {
			return "", fmt.Errorf("%s: advertise a gRPC server as host:port, not a URL", name)
		}
		host, port, err := net.SplitHostPort(advertise)
		if n, perr := strconv.Atoi(port); err != nil || perr != nil || host == "" || n < 1 || n > 65535 {
			return "", fmt.Errorf("%s must be host:port, got %q", name, advertise)
		}
		if ip := net.ParseIP(host); ip != nil && ip.IsUnspecified() {
			return "", fmt.Errorf("%s must name an address others can call, not %s", name, host)
		}
		return advertise, nil
	}
	tcp, ok := listening.(*net.TCPAddr)
	if !ok || tcp.IP == nil || tcp.IP.IsUnspecified() {
		return "", fmt.Errorf("this server listens on %s, which no dispatcher can call: "+
			"say where it is reached with %s, e.g. 10.0.0.5:50051", listening, name)
	}
	return tcp.String(), nil
}

// instanceID is unique and readable: <hostname>-<pid>-<6 hex>, the random part for
// restarts that reuse a pid (containers are often pid 1).
func instanceID() string {
	host, _ := os.Hostname()
	clean := strings.Map(func(r rune) rune {
		if r == '-' || r == '_' || r == '.' || ('a' <= r && r <= 'z') || ('A' <= r && r <= 'Z') || ('0' <= r && r <= '9') {
			return r
		}
		return '-'
	}, host)
	if clean == "" {
		clean = "plugin"
	}
	suffix := make([]byte, 3)
	_, _ = rand.Read(suffix)
	return fmt.Sprintf("%s-%d-%s", clean, os.Getpid(), hex.EncodeToString(suffix))
}

func (r *registration) start() { go r.run(time.After) }

// deregister deletes the key and revokes the lease, and returns once that is done or
// bounded time has passed, and then leaveDelay later: the server serves meanwhile.
func (r *registration) deregister() {
	close(r.stop)
	select {
	case <-r.done:
	// A new token costs two quick requests more; an etcd that hangs is not waited for
	// past this bound.
	case <-time.After(4*r.etcd.client.Timeout + time.Second):
	}
	time.Sleep(r.leaveDelay)
}

func (r *registration) say(level slog.Level, format string, args ...any) {
	r.log.Log(context.Background(), level, fmt.Sprintf("linchkit plugin: "+format, args...))
}

// refusedRetryWait is the wait after the refusals-th refusal in a row (1, 2, ...): pace,
// the wait after an etcd that does not answer, doubled at each refusal up to
// refusedRetryCap, less a random part of up to half of it, so that a fleet turned away
// at once does not try again in step. Never less than pace. draw gives a number in
// [0, 1), the random part.
func refusedRetryWait(refusals int, pace time.Duration, draw func() float64) time.Duration {
	ceiling := refusedRetryCap
	if refusals < 32 && pace<<refusals < refusedRetryCap {
		ceiling = pace << refusals
	}
	return time.Duration(float64(ceiling) * (1 - draw()/2))
}

// run registers and keeps the key until stop, waiting between tries on after (time.After;
// a test passes its own to see the waits asked for, without taking them).
func (r *registration) run(after func(time.Duration) <-chan time.Time) {
	defer close(r.done)
	// Said once, not per retry; said again when the trouble changes (etcd answers again,
	// and now turns the plugin away), so what the operator sees is current.
	const fine, unavailable, refused = 0, 1, 2
	failing := fine
	// Refusals since etcd last admitted the plugin: an outage between two of them does
	// not start the waits again from a second, the credentials are as wrong.
	refusals := 0
	pace := min(time.Duration(r.ttl)*time.Second/3, time.Second)
	for {
		wait := time.Duration(r.ttl) * time.Second / 3
		if err := r.renew(); err != nil {
			kind := unavailable
			var refusal *etcdRefused
			if errors.As(err, &refusal) {
				kind = refused
			}
			if kind != failing {
				r.say(slog.LevelWarn, "cannot register %s in etcd: %v; serving anyway and trying again", r.key, err)
			}
			failing = kind
			wait = pace
			if kind == refused {
				refusals++
				wait = refusedRetryWait(refusals, pace, mathrand.Float64)
			}
		} else {
			if failing != fine {
				r.say(slog.LevelInfo, "etcd answers again: %s is registered", r.key)
			}
			failing, refusals = fine, 0
		}
		select {
		case <-r.stop:
			r.leave()
			return
		case <-after(wait):
		}
	}
}

func (r *registration) renew() error {
	if r.lease != 0 {
		answer, err := r.etcd.post("/v3/lease/keepalive", map[string]any{"ID": strconv.FormatInt(r.lease, 10)})
		if err != nil {
			return err
		}
		result, ok := answer["result"].(map[string]any)
		if !ok {
			return fmt.Errorf("etcd did not renew the lease%s", why(answer))
		}
		if number(result["TTL"]) <= 0 {
			// A lease no key was put on (etcd refused the key) ends unrenewed while the
			// plugin waits to try again, as expected: only a registered key is news.
			if r.written {
				r.say(slog.LevelWarn, "etcd lost the lease of %s (restarted?): registering again", r.key)
			}
			r.lease, r.written = 0, false
		}
	}
	if r.lease == 0 {
		answer, err := r.etcd.post("/v3/lease/grant", map[string]any{"TTL": r.ttl})
		if err != nil {
			return err
		}
		if r.lease = number(answer["ID"]); r.lease == 0 {
			return fmt.Errorf("etcd granted no lease%s", why(answer))
		}
	}
	if !r.written {
		answer, err := r.etcd.post("/v3/kv/put", map[string]any{
			"key":   base64.StdEncoding.EncodeToString([]byte(r.key)),
			"value": base64.StdEncoding.EncodeToString(r.value),
			"lease": strconv.FormatInt(r.lease, 10),
		})
		if err != nil {
			return err
		}
		if _, ok := answer["header"]; !ok { // e.g. the lease ended between grant and put
			r.lease = 0
			return fmt.Errorf("etcd refused the registration%s", why(answer))
		}
		r.written = true
		r.say(slog.LevelInfo, "registered %s in etcd at %s", r.key, r.etcd.base)
	}
	return nil
}

func (r *registration) leave() {
	if r.lease == 0 {
		return
	}
	lease := map[string]any{"ID": strconv.FormatInt(r.lease, 10)}
	if !r.written { // a lease for a key etcd refused (permission): let it go quietly
		_, _ = r.etcd.post("/v3/lease/revoke", lease)
		return
	}
	// The key first: a dispatcher stops calling this instance from that moment.
	_, _ = r.etcd.post("/v3/kv/deleterange", map[string]any{"key": base64.StdEncoding.EncodeToString([]byte(r.key))})
	if _, err := r.etcd.post("/v3/lease/revoke", lease); err != nil {
		r.say(slog.LevelWarn, "cannot deregister %s: %v; it leaves the registry when its lease ends, within %d s",
			r.key, err, r.ttl)
		return
	}
	r.say(slog.LevelInfo, "deregistered %s", r.key)
}

// number reads the gateway's int64s, which it writes as strings.
func number(value any) int64 {
	switch v := value.(type) {
	case string:
		n, _ := strconv.ParseInt(v, 10, 64)
		return n
	case float64:
		return int64(v)
	}
	return 0
}

// why is etcd's message in an error answer as ": <message>" to append, or "".
func why(answer map[string]any) string {
	if text := message(answer); text != "" {
		return ": " + text
	}
	return ""
}
