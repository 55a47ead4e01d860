package plugin

import (
	"fmt"
	"strconv"
	"strings"
	"time"
)

// How long a plugin's graceful stop waits (docs/protocol.md, "Stopping while called"):
// the calls in flight get the grace to finish (over WebSocket, the gateway gets it after
// goaway), then the stop and destroy hooks get the hooks' cap together; a hook still
// running then is abandoned and the process exits without it. Both are 5 s unless the
// environment sets them: every mode (serve, the subprocess handshake, connect) reads
// these once at start, in whole milliseconds from 0 to maxStopMs. 0 does not wait: a
// grace of 0 cuts the calls in flight off at once, hooks of 0 abandon the hooks at once.
// A malformed value ends the plugin at start with one line naming the variable.
const (
	EnvStopGraceMs = "LINCHKIT_PLUGIN_STOP_GRACE_MS"
	EnvStopHooksMs = "LINCHKIT_PLUGIN_STOP_HOOKS_MS"

	// maxStopMs is the most either may be set to: 10 minutes, past any platform's wait
	// between SIGTERM and SIGKILL (more is a mistake in the unit, seconds for milliseconds).
	maxStopMs = 600_000
)

// stopCaps is how long a stop waits: grace for the calls in flight, hooks for the stop
// and destroy hooks together.
type stopCaps struct {
	grace time.Duration
	hooks time.Duration
}

// defaultStopCaps: 5 s each, as in every SDK.
var defaultStopCaps = stopCaps{grace: 5 * time.Second, hooks: 5 * time.Second}

// stopCapsFromEnv reads LINCHKIT_PLUGIN_STOP_GRACE_MS and LINCHKIT_PLUGIN_STOP_HOOKS_MS,
// the default for each one unset or empty.
func stopCapsFromEnv(getenv func(string) string) (stopCaps, error) {
	caps := defaultStopCaps
	for _, each := range []struct {
		name string
		into *time.Duration
	}{{EnvStopGraceMs, &caps.grace}, {EnvStopHooksMs, &caps.hooks}} {
		text := getenv(each.name)
		if text == "" {
			continue
		}
		ms, err := stopMs(each.name, text)
		if err != nil {
			return stopCaps{}, err
		}
		*each.into = time.Duration(ms) * time.Millisecond
	}
	return caps, nil
}

// stopMs reads text, the value of the variable name, as whole milliseconds in
// [0, maxStopMs]. Digits only: strconv.Atoi would also take "+5" and "-0".
func stopMs(name, text string) (int, error) {
	if strings.Trim(text, "0123456789") == "" {
		significant := strings.TrimLeft(text, "0")
		if len(significant) <= len(strconv.Itoa(maxStopMs)) {
			if ms, err := strconv.Atoi("0" + significant); err == nil && ms <= maxStopMs {
				return ms, nil
			}
		}
	}
	shown := text
	if len(shown) > 40 {
		shown = shown[:40] + "…"
	}
	return 0, fmt.Errorf("%s must be a whole number of milliseconds from 0 to %d (10 minutes), not %q",
		name, maxStopMs, shown)
}
