package plugin

// The registry's settings as `serve` takes them: a flag each, the same as the Python
// SDK's (docs/registry.md, "A plugin registers itself"), and the variable each reads when
// its flag is not given, which orchestrators set. Messages name a setting as it was
// given: the flag when it came on the command line, the variable when it came from the
// environment, both when it was not given at all.
//
// etcd's password has a variable and no flag: a command line shows in the process list.
// -register-etcd-password is there only to be refused by name, its value never repeated
// (the flag package quotes the value of a flag it refuses), rather than met as an unknown
// flag; it is left out of the help.

import (
	"flag"
	"fmt"
)

// registrySetting is one registry setting: its flag, the variable read when the flag is
// not given, and what -help says of it.
type registrySetting struct {
	flag, env, usage string
}

var (
	settingEtcd      = registrySetting{"register-etcd", EnvRegisterEtcd, "register in the etcd at `URL` while serving"}
	settingPrefix    = registrySetting{"register-prefix", EnvRegisterPrefix, "under this key `PREFIX`, e.g. /linchkit/plugins/echo"}
	settingAdvertise = registrySetting{"advertise", EnvAdvertise, "where dispatchers reach this server, as `HOST:PORT` " +
		"(default: where it listens; required when it listens on 0.0.0.0 or ::)"}
	settingTTL = registrySetting{"register-ttl", EnvRegisterTTL, fmt.Sprintf(
		"a killed server leaves the registry this long after its last renewal, in `SECONDS`, at least 2 (default: %d)",
		defaultRegisterTTL)}
	settingLeaveDelay = registrySetting{"leave-delay", EnvLeaveDelay, fmt.Sprintf(
		"on SIGTERM, keep answering this many `SECONDS` after leaving the registry, while dispatchers learn it left, "+
			"0-600 (default: %g)", defaultLeaveDelay.Seconds())}
	settingCAFile   = registrySetting{"register-etcd-ca-file", EnvRegisterEtcdCAFile, "https://: `PEM` roots that verify etcd (default: the system's)"}
	settingCertFile = registrySetting{"register-etcd-cert-file", EnvRegisterEtcdCertFile, "https://: the client certificate (`PEM`) to present to etcd"}
	settingKeyFile  = registrySetting{"register-etcd-key-file", EnvRegisterEtcdKeyFile, "the unencrypted key (`PEM`) of -register-etcd-cert-file"}
	settingUser     = registrySetting{"register-etcd-user", EnvRegisterEtcdUser, "register as this etcd user (`NAME`), whose password is read from " +
		EnvRegisterEtcdPassword + " only (over http:// only to a loopback etcd)"}
	registrySettingsInOrder = []registrySetting{settingEtcd, settingPrefix, settingAdvertise, settingTTL, settingLeaveDelay,
		settingCAFile, settingCertFile, settingKeyFile, settingUser}
)

// passwordFlag is the flag no password may come by.
const passwordFlag = "register-etcd-password"

// errPasswordFlag refuses it.
var errPasswordFlag = fmt.Errorf("-%s: no flag takes etcd's password, a command line shows in the process list: set %s instead",
	passwordFlag, EnvRegisterEtcdPassword)

// registryConfig is the registry's settings: the flags given, over the environment.
type registryConfig struct {
	given  map[string]string // by flag name: the registry flags on the command line
	getenv func(string) string
}

// value is the setting's flag when given (an empty one too: a flag says "none" over a
// variable), else its variable.
func (c registryConfig) value(s registrySetting) string {
	if value, ok := c.given[s.flag]; ok {
		return value
	}
	return c.getenv(s.env)
}

// firstFlagGiven is the first registry setting (in -help's order) whose flag was given a
// value on the command line; an empty one says "none", over a variable, and is not counted.
func (c registryConfig) firstFlagGiven() (registrySetting, bool) {
	for _, s := range registrySettingsInOrder {
		if c.given[s.flag] != "" {
			return s, true
		}
	}
	return registrySetting{}, false
}

// name is how a message names the setting: as it was given.
func (c registryConfig) name(s registrySetting) string {
	if _, ok := c.given[s.flag]; ok {
		return "--" + s.flag
	}
	if c.getenv(s.env) != "" {
		return s.env
	}
	return fmt.Sprintf("--%s (or %s)", s.flag, s.env)
}

// refusedFlag records that -register-etcd-password was given, whatever its value: a bool
// flag, so that its value (a password) is neither taken as the next argument's meaning
// nor quoted by the flag package in an error.
type refusedFlag struct{ given bool }

func (f *refusedFlag) String() string   { return "" }
func (f *refusedFlag) IsBoolFlag() bool { return true }
func (f *refusedFlag) Set(string) error {
	f.given = true
	return nil
}

// addRegistryFlags defines the registry's flags on flags; once flags are parsed, the
// function it returns reads them over getenv, or refuses a password flag.
func addRegistryFlags(flags *flag.FlagSet) func(getenv func(string) string) (registryConfig, error) {
	for _, s := range registrySettingsInOrder {
		flags.String(s.flag, "", s.usage+" ["+s.env+"]")
	}
	password := &refusedFlag{}
	flags.Var(password, passwordFlag, "refused: "+errPasswordFlag.Error())
	return func(getenv func(string) string) (registryConfig, error) {
		if password.given {
			return registryConfig{}, errPasswordFlag
		}
		given := map[string]string{}
		flags.Visit(func(f *flag.Flag) { // the flags set on the command line only
			given[f.Name] = f.Value.String()
		})
		return registryConfig{given: given, getenv: getenv}, nil
	}
}

// printFlags is flags.PrintDefaults without the password flag, which is there only to be
// refused.
func printFlags(flags *flag.FlagSet) {
	shown := flag.NewFlagSet(flags.Name(), flag.ContinueOnError)
	shown.SetOutput(flags.Output())
	flags.VisitAll(func(f *flag.Flag) {
		if f.Name != passwordFlag {
			shown.Var(f.Value, f.Name, f.Usage)
		}
	})
	shown.PrintDefaults()
}
