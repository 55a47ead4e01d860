package plugin

import (
	"flag"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// registryConfigFromEnv is the settings of a process given no registry flag.
func registryConfigFromEnv(getenv func(string) string) registryConfig {
	return registryConfig{getenv: getenv}
}

func TestAdvertisedAddress(t *testing.T) {
	listening := &net.TCPAddr{IP: net.ParseIP("127.0.0.2"), Port: 50051}
	everywhere := &net.TCPAddr{IP: net.IPv4zero, Port: 50051}
	cases := []struct {
		advertise string
		listening net.Addr
		want      string
		wrong     string
	}{
		{"", listening, "127.0.0.2:50051", ""},
		{"", &net.TCPAddr{IP: net.ParseIP("::1"), Port: 7}, "[::1]:7", ""},
		{"10.0.0.5:9000", everywhere, "10.0.0.5:9000", ""},
		{"[fd00::5]:9000", everywhere, "[fd00::5]:9000", ""},
		{"", everywhere, "", EnvAdvertise},
		{"", &net.TCPAddr{IP: net.IPv6unspecified, Port: 1}, "", EnvAdvertise},
		{"http://10.0.0.5:9000", listening, "", "not a URL"},
		{"10.0.0.5", listening, "", "host:port"},
		{"10.0.0.5:0", listening, "", "host:port"},
		{"0.0.0.0:9000", listening, "", "others can call"},
	}
	for _, c := range cases {
		got, err := advertisedAddress(c.advertise, EnvAdvertise, c.listening)
		if c.wrong == "" && (err != nil || got != c.want) {
			t.Errorf("advertisedAddress(%q, %v) = %q, %v; want %q", c.advertise, c.listening, got, err, c.want)
		}
		if c.wrong != "" && (err == nil || !strings.Contains(err.Error(), c.wrong)) {
			t.Errorf("advertisedAddress(%q, %v): error %v, want one saying %q", c.advertise, c.listening, err, c.wrong)
		}
	}
}

func TestRegistrationSettingsAreCheckedBeforeServing(t *testing.T) {
	listening := &net.TCPAddr{IP: net.ParseIP("127.0.0.2"), Port: 50051}
	good := map[string]string{EnvRegisterEtcd: "http://127.0.0.1:2379", EnvRegisterPrefix: "/linchkit/plugins/echo"}
	cases := []struct {
		name, value, wrong string
	}{
		{EnvRegisterEtcd, "unix:///x", "http(s)://"},
		{EnvRegisterEtcd, "http://user:SECRET@127.0.0.1:2379", "credentials"},
		{EnvRegisterEtcd, "http://127.0.0.1:65536", "a valid host name and a port in 1-65535"},
		{EnvRegisterEtcd, "http://127.0.0.1:99999999999999999999", "a port in 1-65535"},
		{EnvRegisterEtcd, "https://127.0.0.1:0", "a port in 1-65535"},
		{EnvRegisterEtcd, "http://:2379", "a valid host name"},
		{EnvRegisterPrefix, "", "needs --register-prefix (or " + EnvRegisterPrefix + ")"},
		{EnvRegisterPrefix, "/ends/", "must start with /"},
		{EnvRegisterTTL, "1", "at least 2"},
		{EnvRegisterTTL, "ten", "whole number"},
		{EnvLeaveDelay, "-1", "[0, 600]"},
		{EnvLeaveDelay, "601", "[0, 600]"},
		{EnvLeaveDelay, "NaN", "[0, 600]"},
		{EnvLeaveDelay, "soon", "[0, 600]"},
	}
	for _, c := range cases {
		env := map[string]string{}
		for k, v := range good {
			env[k] = v
		}
		env[c.name] = c.value
		_, err := registrationFrom(registryConfigFromEnv(func(k string) string { return env[k] }), listening, newLogger(io.Discard))
		if err == nil || !strings.Contains(err.Error(), c.wrong) || strings.Contains(err.Error(), "SECRET") {
			t.Errorf("%s=%q: error %v, want one saying %q", c.name, c.value, err, c.wrong)
		}
	}
	r, err := registrationFrom(registryConfigFromEnv(func(k string) string { return good[k] }), listening, newLogger(io.Discard))
	if err != nil || !strings.HasPrefix(r.key, "/linchkit/plugins/echo/") || string(r.value) != `{"address":"127.0.0.2:50051"}` {
		t.Errorf("good settings: %v, %v", r, err)
	}
	if r.leaveDelay != time.Second {
		t.Errorf("leave delay %v by default, want 1s", r.leaveDelay)
	}
	good[EnvLeaveDelay] = "0.25"
	if r, err := registrationFrom(registryConfigFromEnv(func(k string) string { return good[k] }), listening, newLogger(io.Discard)); err != nil || r.leaveDelay != 250*time.Millisecond {
		t.Errorf("%s=0.25: %v, %v", EnvLeaveDelay, r, err)
	}
	if r, err := registrationFrom(registryConfigFromEnv(func(string) string { return "" }), listening, newLogger(io.Discard)); r != nil || err != nil {
		t.Errorf("no settings: %v, %v; want no registration", r, err)
	}
}

// How etcd is reached is checked before serving too; each mistake names its variable and
// never quotes the password. The loopback cases are those where a password may go over
// plain http://: it crosses no network.
func TestEtcdAccessSettingsAreCheckedBeforeServing(t *testing.T) {
	listening := &net.TCPAddr{IP: net.ParseIP("127.0.0.2"), Port: 50051}
	notPEM := filepath.Join(t.TempDir(), "not.pem")
	if err := os.WriteFile(notPEM, []byte("not a certificate\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	const secret = "SECRET-pw"
	cases := []struct {
		settings map[string]string
		wrong    string // the variable the refusal names; "" when the settings are fine
	}{
		{map[string]string{EnvRegisterEtcd: "http://127.0.0.1:2379", EnvRegisterEtcdCAFile: notPEM}, EnvRegisterEtcdCAFile},
		{map[string]string{EnvRegisterEtcd: "http://127.0.0.1:2379", EnvRegisterEtcdCertFile: notPEM, EnvRegisterEtcdKeyFile: notPEM}, EnvRegisterEtcdCertFile},
		{map[string]string{EnvRegisterEtcd: "http://10.0.0.5:2379", EnvRegisterEtcdUser: "registrar", EnvRegisterEtcdPassword: secret}, EnvRegisterEtcdPassword},
		{map[string]string{EnvRegisterEtcd: "http://etcd.internal:2379", EnvRegisterEtcdUser: "registrar", EnvRegisterEtcdPassword: secret}, EnvRegisterEtcdPassword},
		{map[string]string{EnvRegisterEtcd: "http://localhost.example:2379", EnvRegisterEtcdUser: "registrar", EnvRegisterEtcdPassword: secret}, EnvRegisterEtcdPassword},
		{map[string]string{EnvRegisterEtcd: "https://10.0.0.5:2379", EnvRegisterEtcdUser: "registrar"}, EnvRegisterEtcdPassword},
		{map[string]string{EnvRegisterEtcd: "https://10.0.0.5:2379", EnvRegisterEtcdPassword: secret}, EnvRegisterEtcdUser},
		{map[string]string{EnvRegisterEtcd: "https://10.0.0.5:2379", EnvRegisterEtcdCertFile: notPEM}, EnvRegisterEtcdKeyFile},
		{map[string]string{EnvRegisterEtcd: "https://10.0.0.5:2379", EnvRegisterEtcdKeyFile: notPEM}, EnvRegisterEtcdCertFile},
		{map[string]string{EnvRegisterEtcd: "https://10.0.0.5:2379", EnvRegisterEtcdCAFile: notPEM + ".missing"}, EnvRegisterEtcdCAFile},
		{map[string]string{EnvRegisterEtcd: "https://10.0.0.5:2379", EnvRegisterEtcdCAFile: notPEM}, EnvRegisterEtcdCAFile},
		{map[string]string{EnvRegisterEtcd: "https://10.0.0.5:2379", EnvRegisterEtcdCertFile: notPEM, EnvRegisterEtcdKeyFile: notPEM}, EnvRegisterEtcdCertFile},
		{map[string]string{EnvRegisterEtcd: "http://127.0.0.1:2379", EnvRegisterEtcdUser: "registrar", EnvRegisterEtcdPassword: secret}, ""},
		{map[string]string{EnvRegisterEtcd: "http://127.8.9.10:2379", EnvRegisterEtcdUser: "registrar", EnvRegisterEtcdPassword: secret}, ""},
		{map[string]string{EnvRegisterEtcd: "http://localhost:2379", EnvRegisterEtcdUser: "registrar", EnvRegisterEtcdPassword: secret}, ""},
		{map[string]string{EnvRegisterEtcd: "http://[::1]:2379", EnvRegisterEtcdUser: "registrar", EnvRegisterEtcdPassword: secret}, ""},
		{map[string]string{EnvRegisterEtcd: "https://10.0.0.5:2379", EnvRegisterEtcdUser: "registrar", EnvRegisterEtcdPassword: secret}, ""},
	}
	for _, c := range cases {
		env := map[string]string{EnvRegisterPrefix: "/linchkit/plugins/echo"}
		for k, v := range c.settings {
			env[k] = v
		}
		r, err := registrationFrom(registryConfigFromEnv(func(k string) string { return env[k] }), listening, newLogger(io.Discard))
		switch {
		case c.wrong == "" && err != nil:
			t.Errorf("%v: %v, want it accepted", c.settings, err)
		case c.wrong == "" && (r.etcd.user != "registrar" || r.etcd.password != secret):
			t.Errorf("%v: the gateway has user %q, want registrar and the password", c.settings, r.etcd.user)
		case c.wrong != "" && (err == nil || !strings.Contains(err.Error(), c.wrong)):
			t.Errorf("%v: error %v, want one naming %s", c.settings, err, c.wrong)
		case err != nil && strings.Contains(err.Error(), secret):
			t.Errorf("%v: the error quotes the password: %v", c.settings, err)
		}
	}
}

// The waits after refusals in a row double from the pace of an etcd that does not answer
// up to refusedRetryCap, never below that pace, and the random part spreads them over
// the upper half of each, so a fleet turned away at once does not try again in step.
func TestWaitsAfterRefusalsDoubleToTheCapAndAreSpread(t *testing.T) {
	longest := func() float64 { return 0 }
	shortest := func() float64 { return 0.999999 }
	want := []time.Duration{2, 4, 8, 16, 30, 30}
	for i, seconds := range want {
		refusals := i + 1
		if got := refusedRetryWait(refusals, time.Second, longest); got != seconds*time.Second {
			t.Errorf("after %d refusals: at most %v, want %v", refusals, got, seconds*time.Second)
		}
		if got := refusedRetryWait(refusals, time.Second, shortest); got < seconds*time.Second/2-time.Millisecond {
			t.Errorf("after %d refusals: at least %v, want %v", refusals, got, seconds*time.Second/2)
		}
	}
	if got := refusedRetryWait(1, time.Second, shortest); got < time.Second-time.Millisecond {
		t.Errorf("the first wait after a refusal is %v, shorter than an outage's pace", got)
	}
	if pace := 2 * time.Second / 3; refusedRetryWait(1, pace, longest) != 2*pace {
		t.Errorf("with a TTL of 2 s (pace 2/3 s), the first wait is at most %v, want twice the pace",
			refusedRetryWait(1, pace, longest))
	}
	for _, refusals := range []int{31, 32, 64, 1 << 20} {
		if got := refusedRetryWait(refusals, time.Second, longest); got != refusedRetryCap {
			t.Errorf("after %d refusals: %v, want the cap", refusals, got)
		}
	}
	if half := refusedRetryWait(5, time.Second, func() float64 { return 0.5 }); half != 22500*time.Millisecond {
		t.Errorf("a draw of 0.5 at the cap waits %v, want 22.5s", half)
	}
}

// serve's registry flags win over the variables (an empty flag too: it says "none"), and
// messages name each setting as it was given: the flag, the variable, or both when
// neither was.
func TestRegistryFlagsWinOverTheEnvironmentAndAreNamedAsGiven(t *testing.T) {
	flags := flag.NewFlagSet("serve", flag.ContinueOnError)
	flags.SetOutput(io.Discard)
	read := addRegistryFlags(flags)
	args := []string{"--register-etcd", "http://127.0.0.1:2379", "-register-ttl=4", "--register-etcd-user", ""}
	if err := flags.Parse(args); err != nil {
		t.Fatal(err)
	}
	env := map[string]string{EnvRegisterEtcd: "http://10.9.9.9:2379", EnvRegisterPrefix: "/from/env",
		EnvRegisterTTL: "9", EnvRegisterEtcdUser: "reader"}
	config, err := read(func(k string) string { return env[k] })
	if err != nil {
		t.Fatal(err)
	}
	values := map[registrySetting]string{settingEtcd: "http://127.0.0.1:2379", settingPrefix: "/from/env",
		settingTTL: "4", settingUser: "", settingCAFile: ""}
	for setting, want := range values {
		if got := config.value(setting); got != want {
			t.Errorf("%s: %q, want %q", setting.flag, got, want)
		}
	}
	names := map[registrySetting]string{settingEtcd: "--register-etcd", settingPrefix: EnvRegisterPrefix,
		settingUser: "--register-etcd-user", settingCAFile: "--register-etcd-ca-file (or " + EnvRegisterEtcdCAFile + ")"}
	for setting, want := range names {
		if got := config.name(setting); got != want {
			t.Errorf("%s is named %q, want %q", setting.flag, got, want)
		}
	}
	listening := &net.TCPAddr{IP: net.ParseIP("127.0.0.2"), Port: 50051}
	env[EnvRegisterPrefix] = "/ends/"
	if _, err := registrationFrom(config, listening, newLogger(io.Discard)); err == nil ||
		!strings.HasPrefix(err.Error(), EnvRegisterPrefix+" must start with /") {
		t.Errorf("a bad prefix from the environment: %v, want an error naming %s", err, EnvRegisterPrefix)
	}
	if err := flags.Parse([]string{"--register-prefix", "/ends/"}); err != nil {
		t.Fatal(err)
	}
	config, _ = read(func(k string) string { return env[k] })
	if _, err := registrationFrom(config, listening, newLogger(io.Discard)); err == nil ||
		!strings.HasPrefix(err.Error(), "--register-prefix must start with /") {
		t.Errorf("a bad -register-prefix: %v, want an error naming the flag", err)
	}
}
