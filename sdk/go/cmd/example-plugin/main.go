// The example plugin of docs/protocol.md ("The example plugin, in every language"),
// written on the Go SDK. Every SDK ships the same one, so one conformance suite runs
// against all of them.
package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"math"
	"os"
	"strings"
	"sync/atomic"
	"time"

	"github.com/linchkit/dispatcher/sdk/go/plugin"
)

// The bounds of count's and emit's params: a caller's pad of 2**40 must be refused before
// it is allocated (strings.Repeat of a terabyte ends the process), and a unary count
// collects every chunk before it answers. The suite's largest chunk is 9 MB.
const (
	maxPad   = 64 << 20 // letters x: 64 MiB
	maxCount = 1_000_000
)

// checkPad refuses a pad that is negative or past maxPad, before anything is allocated.
func checkPad(pad int64) error {
	if pad < 0 {
		return plugin.InvalidParams("pad must not be negative, got %d", pad)
	}
	if pad > maxPad {
		return plugin.InvalidParams("pad must be at most %d (64 MiB), got %d", maxPad, pad)
	}
	return nil
}

// nonFinite: the doubles JSON has no form for, by the name non_finite's value gives them.
var nonFinite = map[string]float64{"nan": math.NaN(), "inf": math.Inf(1), "-inf": math.Inf(-1)}

// hookCounts is how many times each lifecycle hook ran (the method hooks): it lives as
// long as the process, so a host sees whether another host's Stop ran the stop hook.
type hookCounts struct {
	init, start, stop, destroy atomic.Int64
}

// failIfNamed fails the hook a config's "fail_hook" names: how the conformance suite sees
// what the SDK answers a failing hook.
func failIfNamed(config json.RawMessage, hook string) error {
	var asked struct {
		FailHook string `json:"fail_hook"`
	}
	if json.Unmarshal(config, &asked) == nil && asked.FailHook == hook {
		return &plugin.Error{Type: "BadConfig", Message: "fail_hook names " + hook}
	}
	return nil
}

// sayIfAsked: a config's "say_hooks" has the stop and destroy hooks each write a line to
// stderr, how the conformance suite sees that they ran once the process is gone.
func sayIfAsked(config json.RawMessage, hook string) {
	var asked struct {
		SayHooks bool `json:"say_hooks"`
	}
	if json.Unmarshal(config, &asked) == nil && asked.SayHooks {
		fmt.Fprintf(os.Stderr, "example: %s hook ran\n", hook)
	}
}

// stallIfNamed: a config's "stall_hook" has that hook never return, its context ignored (a
// close stuck on a peer that does not answer), how the conformance suite sees that a stop
// does not wait for it.
func stallIfNamed(config json.RawMessage, hook string) {
	var asked struct {
		StallHook string `json:"stall_hook"`
	}
	if json.Unmarshal(config, &asked) == nil && asked.StallHook == hook {
		select {}
	}
}

func main() {
	p := plugin.New("example", "1.0.0")
	var hooks hookCounts
	p.OnInit(func(_ context.Context, config json.RawMessage) error {
		hooks.init.Add(1) // the SDK keeps the config for p.Config
		return failIfNamed(config, "init")
	})
	p.OnStart(func(context.Context) error { hooks.start.Add(1); return failIfNamed(p.Config(), "start") })
	p.OnStop(func(context.Context) error {
		hooks.stop.Add(1)
		sayIfAsked(p.Config(), "stop")
		stallIfNamed(p.Config(), "stop")
		return nil
	})
	p.OnDestroy(func(context.Context) error {
		hooks.destroy.Add(1)
		sayIfAsked(p.Config(), "destroy")
		stallIfNamed(p.Config(), "destroy")
		return nil
	})

	p.Method("echo", "returns the params unchanged", func(_ context.Context, call *plugin.Call) (any, error) {
		return call.Params, nil
	})

	p.Method("digest", "hex SHA-256 of data applied rounds times (CPU-bound)", func(ctx context.Context, call *plugin.Call) (any, error) {
		var params struct {
			Data   string `json:"data" plugin:"required"`
			Rounds int    `json:"rounds" plugin:"required"`
		}
		if err := call.Bind(&params); err != nil {
			return nil, err
		}
		if params.Rounds < 0 {
			return nil, plugin.InvalidParams("rounds must not be negative, got %d", params.Rounds)
		}
		value := []byte(params.Data)
		for round := range params.Rounds {
			if round%65536 == 65535 && ctx.Err() != nil {
				return nil, ctx.Err()
			}
			sum := sha256.Sum256(value)
			value = sum[:]
		}
		return hex.EncodeToString(value), nil
	})

	p.Method("fail", "fails with the business error ExampleFailure", func(_ context.Context, call *plugin.Call) (any, error) {
		var params struct {
			Message string `json:"message" plugin:"required"`
		}
		if err := call.Bind(&params); err != nil {
			return nil, err
		}
		return nil, plugin.NewError("ExampleFailure", params.Message)
	})

	p.Method("sleep", "sleeps ms milliseconds, giving up at the call's deadline", func(ctx context.Context, call *plugin.Call) (any, error) {
		var params struct {
			Ms int64 `json:"ms" plugin:"required"`
		}
		if err := call.Bind(&params); err != nil {
			return nil, err
		}
		if params.Ms < 0 {
			return nil, plugin.InvalidParams("ms must not be negative, got %d", params.Ms)
		}
		timer := time.NewTimer(time.Duration(params.Ms) * time.Millisecond)
		defer timer.Stop()
		select {
		case <-timer.C:
			return map[string]int64{"slept_ms": params.Ms}, nil
		case <-ctx.Done():
			return nil, plugin.DeadlineExceeded("sleep: the call's deadline passed before the sleep ended")
		}
	})

	p.StreamingMethod("count", "streams {\"i\": 0} … {\"i\": n-1} (n at most 1000000), each with \"pad\": pad letters x when pad > 0 (at most 64 MiB)", func(ctx context.Context, call *plugin.Call, send func(any) error) error {
		// int64, not int: 2**40 reaches the bounds as itself where int is 32 bits too.
		var params struct {
			N   int64 `json:"n" plugin:"required"`
			Pad int64 `json:"pad"`
		}
		if err := call.Bind(&params); err != nil {
			return err
		}
		if params.N < 0 {
			return plugin.InvalidParams("n must not be negative, got %d", params.N)
		}
		if params.N > maxCount {
			return plugin.InvalidParams("n must be at most %d, got %d", maxCount, params.N)
		}
		if err := checkPad(params.Pad); err != nil {
			return err
		}
		pad := strings.Repeat("x", int(params.Pad))
		for i := range params.N {
			if err := ctx.Err(); err != nil {
				return err
			}
			var chunk any = map[string]int64{"i": i}
			if params.Pad > 0 {
				chunk = map[string]any{"i": i, "pad": pad}
			}
			if err := send(chunk); err != nil {
				return err
			}
		}
		return nil
	})

	p.Method("emit", "emits plugin event name with data (pad > 0: a string of pad letters x, at most 64 MiB)", func(_ context.Context, call *plugin.Call) (any, error) {
		var params struct {
			Name string          `json:"name" plugin:"required"`
			Data json.RawMessage `json:"data"`
			Pad  int64           `json:"pad"`
		}
		if err := call.Bind(&params); err != nil {
			return nil, err
		}
		if err := checkPad(params.Pad); err != nil {
			return nil, err
		}
		var data any = params.Data
		if params.Pad > 0 {
			data = strings.Repeat("x", int(params.Pad))
		}
		if err := call.Emit(params.Name, data); err != nil {
			return nil, err
		}
		return true, nil
	})

	p.Method("config", "the config object passed to Init", func(_ context.Context, call *plugin.Call) (any, error) {
		return p.Config(), nil
	})

	// What JSON cannot carry, built as a plugin author builds a result: the SDK answers it
	// provider_error, "the plugin's result is not JSON: …", as every SDK does.
	p.Method("non_finite", `returns {"x": NaN, +Inf or -Inf} as value says ("nan", "inf", "-inf")`, func(_ context.Context, call *plugin.Call) (any, error) {
		var params struct {
			Value string `json:"value" plugin:"required"`
		}
		if err := call.Bind(&params); err != nil {
			return nil, err
		}
		x, named := nonFinite[params.Value]
		if !named {
			return nil, plugin.InvalidParams(`value must be "nan", "inf" or "-inf", got %.40q`, params.Value)
		}
		return map[string]float64{"x": x}, nil
	})

	// A string that is not valid Unicode, built as a Go author builds one (bytes read from a
	// Latin-1 file): the SDK answers it provider_error, "the plugin's result is not JSON: a
	// string is not valid Unicode (bytes that are not UTF-8)", where encoding/json would
	// have sent U+FFFD in its place.
	p.Method("not_unicode", `returns {"text": S}, S a string that is not valid Unicode ("caf" and the Latin-1 byte of é); params are ignored`, func(context.Context, *plugin.Call) (any, error) {
		return map[string]string{"text": string([]byte{'c', 'a', 'f', 0xe9})}, nil
	})

	p.Method("hooks", "how many times each lifecycle hook ran, counted after_ms from now", func(ctx context.Context, call *plugin.Call) (any, error) {
		var params struct {
			AfterMs int64 `json:"after_ms"`
		}
		if err := call.Bind(&params); err != nil {
			return nil, err
		}
		if params.AfterMs < 0 {
			return nil, plugin.InvalidParams("after_ms must not be negative, got %d", params.AfterMs)
		}
		// Counted later: whether a stop ran the hooks under a call still in flight.
		timer := time.NewTimer(time.Duration(params.AfterMs) * time.Millisecond)
		defer timer.Stop()
		select {
		case <-timer.C:
		case <-ctx.Done():
			return nil, plugin.DeadlineExceeded("hooks: the call's deadline passed before after_ms")
		}
		return map[string]int64{
			"init": hooks.init.Load(), "start": hooks.start.Load(),
			"stop": hooks.stop.Load(), "destroy": hooks.destroy.Load(),
		}, nil
	})

	p.OnEvent("ping", func(_ context.Context, data json.RawMessage) {
		_ = p.Emit("pong", data)
	})

	// A handler that fails: the SDK logs it at ERROR and goes on.
	p.OnEvent("fail", func(_ context.Context, data json.RawMessage) {
		var event struct {
			Message string `json:"message"`
		}
		_ = json.Unmarshal(data, &event)
		panic(event.Message)
	})

	p.Serve()
}
