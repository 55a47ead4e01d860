package plugin

import (
	"context"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

func TestStopCapsComeFromTheEnvironmentInWholeMilliseconds(t *testing.T) {
	cases := []struct {
		grace, hooks string
		want         stopCaps
	}{
		{"", "", defaultStopCaps}, // unset or empty: 5 s each
		{"1000", "", stopCaps{grace: time.Second, hooks: 5 * time.Second}},
		{"", "250", stopCaps{grace: 5 * time.Second, hooks: 250 * time.Millisecond}},
		{"0", "0", stopCaps{}}, // 0: do not wait
		{"600000", "0001500", stopCaps{grace: 10 * time.Minute, hooks: 1500 * time.Millisecond}},
	}
	for _, c := range cases {
		vars := map[string]string{EnvStopGraceMs: c.grace, EnvStopHooksMs: c.hooks}
		got, err := stopCapsFromEnv(func(name string) string { return vars[name] })
		if err != nil || got != c.want {
			t.Errorf("grace %q, hooks %q: %+v, %v; want %+v", c.grace, c.hooks, got, err, c.want)
		}
	}
}

func TestAMalformedStopCapIsRefusedNamingItsVariable(t *testing.T) {
	for _, name := range []string{EnvStopGraceMs, EnvStopHooksMs} {
		for _, value := range []string{"5s", "-1", "1.5", "+5", " 5", "1e3", "600001", "99999999999999999999", "five"} {
			_, err := stopCapsFromEnv(func(asked string) string {
				if asked == name {
					return value
				}
				return ""
			})
			if err == nil {
				t.Errorf("%s=%q: no error", name, value)
				continue
			}
			message := err.Error()
			if !strings.HasPrefix(message, name+" must be a whole number of milliseconds from 0 to 600000") ||
				!strings.Contains(message, value) || strings.Contains(message, "\n") {
				t.Errorf("%s=%q: %q, want one line naming the variable, the rule and the value", name, value, message)
			}
		}
	}
}

// Every mode reads the caps before it serves: a malformed one ends it at start, before the
// handshake line (which a host would take for a plugin that serves).
func TestEveryModeRefusesAMalformedStopCapAtStart(t *testing.T) {
	subprocess := map[string]string{EnvMagicCookie: MagicCookieValue, EnvNetwork: "unix", EnvSocketDir: t.TempDir()}
	for _, mode := range []struct {
		args   []string
		vars   map[string]string
		prefix string
	}{
		{[]string{"serve", "--address", "127.0.0.1:0"}, map[string]string{}, "serve: "},
		{nil, subprocess, ""},
		{[]string{"connect", "--url", "ws://127.0.0.1:9/v1/plugins/connect"}, map[string]string{}, "connect: "},
	} {
		vars := map[string]string{EnvStopHooksMs: "5s"}
		for k, v := range mode.vars {
			vars[k] = v
		}
		var out strings.Builder
		env := Environment{Args: mode.args, Getenv: func(k string) string { return vars[k] }, Stdin: strings.NewReader(""), Stdout: &out}
		err := testPlugin().Run(context.Background(), env)
		if err == nil || !strings.HasPrefix(err.Error(), mode.prefix+EnvStopHooksMs+" must be") {
			t.Errorf("%q: %v, want the refusal of %s", mode.args, err, EnvStopHooksMs)
		}
		if out.Len() != 0 {
			t.Errorf("%q wrote %q before refusing", mode.args, out.String())
		}
	}
}

// A stop hook that ignores its context is abandoned at the configured cap, and the warning
// names that cap: an operator reads what the stop waited for.
func TestAStuckStopHookIsAbandonedAtTheConfiguredCap(t *testing.T) {
	out := capture(t)
	p := New("stuck", "0.1.0")
	release := make(chan struct{})
	defer close(release)
	var destroyed atomic.Bool
	p.OnStop(func(context.Context) error { <-release; return nil })
	p.OnDestroy(func(context.Context) error { destroyed.Store(true); return nil })
	svc := newService(p, true)
	svc.inited, svc.started = true, true
	began := time.Now()
	if left := svc.runRemainingHooks(200 * time.Millisecond); left != 0 {
		t.Errorf("%v of the cap left after an abandoned hook, want none", left)
	}
	if took := time.Since(began); took < 150*time.Millisecond || took > 3*time.Second {
		t.Errorf("the stop waited %v for a stuck hook, want about the 200ms cap", took)
	}
	if destroyed.Load() {
		t.Error("the destroy hook ran after an abandoned stop hook")
	}
	if !strings.Contains(out.String(), "the stop hook did not finish within 200ms of the stop; exiting without it") {
		t.Errorf("warning %q, want one naming the hook and the 200ms cap", out.String())
	}
}

// Hooks that end early leave the rest of their cap to the spans still buffered.
func TestHooksThatEndEarlyLeaveTheRestOfTheirCap(t *testing.T) {
	svc := newService(New("quick", "0.1.0"), true)
	svc.inited, svc.started = true, true
	if left := svc.runRemainingHooks(10 * time.Second); left < 5*time.Second || left > 10*time.Second {
		t.Errorf("%v of a 10s cap left after hooks that do nothing, want most of it", left)
	}
}
