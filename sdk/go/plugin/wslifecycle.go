package plugin

// The plugin's own lifecycle in the WebSocket modes (`connect`, `serve --websocket`): no
// host sends Init or Start there, so the plugin runs its init hook with --config and its
// start hook before it serves, and its stop and destroy hooks once it has stopped serving
// (docs/protocol.md, "The example plugin, in every language"), as the Python and
// TypeScript SDKs do in these modes.

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"time"
)

// startOwnLifecycle runs the init hook with config (the --config JSON) and then the start
// hook; mode names the command in the error of a hook that fails.
func (p *Plugin) startOwnLifecycle(ctx context.Context, mode, config string) error {
	raw := json.RawMessage(config)
	if mistake := configMistake(raw); mistake != "" {
		return fmt.Errorf("%s: %s", mode, mistake)
	}
	p.setConfig(raw)
	if hook := p.onInit; hook != nil {
		if err := runMethod(func() error { return hook(ctx, raw) }); err != nil {
			return fmt.Errorf("%s: init hook: %w", mode, err)
		}
	}
	if hook := p.onStart; hook != nil {
		if err := runMethod(func() error { return hook(ctx) }); err != nil {
			return fmt.Errorf("%s: start hook: %w", mode, err)
		}
	}
	return nil
}

// stopHooks runs the stop and destroy hooks at a stop, both within hooksCap, and keeps what
// remains of it for the spans still buffered (hooksLeft).
func (p *Plugin) stopHooks(hooksCap time.Duration) {
	ctx, cancel := context.WithTimeout(context.Background(), hooksCap)
	defer cancel()
	for _, each := range []struct {
		name string
		hook Hook
	}{{"stop", p.onStop}, {"destroy", p.onDestroy}} {
		if each.hook == nil {
			continue
		}
		if finished, _ := withinCap(ctx, each.name, hooksCap, func() error { return runMethod(func() error { return each.hook(ctx) }) }); !finished {
			p.hooksLeft = 0
			return
		}
	}
	p.hooksLeft = timeLeft(ctx)
}

// configMistake says why --config cannot be the init hook's config ("--config is not valid
// JSON", "--config must be a JSON object", as every SDK says it), or "". Its text is never
// quoted: a config may hold a secret. An array or null was passed on until 2026-12-06.
func configMistake(config json.RawMessage) string {
	if !json.Valid(config) {
		return "--config is not valid JSON"
	}
	if trimmed := bytes.TrimLeft(config, " \t\r\n"); len(trimmed) == 0 || trimmed[0] != '{' {
		return "--config must be a JSON object"
	}
	return ""
}
