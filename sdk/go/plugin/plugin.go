// Package plugin lets a LinchKit dispatcher plugin be written in Go: register methods,
// lifecycle hooks and event handlers on a Plugin, then call Serve. The SDK speaks the
// plugin protocol (docs/protocol.md) over gRPC, either as a subprocess plugin started by
// the host with the handshake environment, or as a network service
// (`example-plugin serve --address 127.0.0.1:0`), and over WebSocket, served
// (`serve --websocket`, wsserve.go) or dialling the dispatcher's gateway (`connect`,
// wsconnect.go).
//
//	p := plugin.New("example", "1.0.0")
//	p.Method("echo", "returns its params", func(ctx context.Context, call *plugin.Call) (any, error) {
//		return call.Params, nil
//	})
//	p.Serve()
//
// A method's failure is an *Error (type, message, retryable, details), answered inside
// CallReply.error; any other Go error becomes a non-retryable "PluginError".
package plugin

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"reflect"
	"slices"
	"strings"
	"sync"
	"time"
	"unicode/utf8"
)

// ProtocolVersion is the version of the plugin protocol this SDK speaks.
const ProtocolVersion = 1

// Call is one invocation of a method: its params and the context the host sent.
type Call struct {
	Method string
	// Params is the JSON the host sent ("null" when it sent none).
	Params         json.RawMessage
	RequestID      string
	Caller         string
	Traceparent    string
	IdempotencyKey string

	plugin *Plugin
}

// Bind decodes the params into v (a pointer). Into a struct, an array of params is
// positional: its items fill the fields in order (docs/protocol.md). Into a struct or a
// map, anything else must be a JSON object of named params (null, or none, leaves v as it
// is): a string, a number or a boolean is invalid_params, "<method> takes an object of
// named params, got a string", as the TypeScript and Java SDKs say it. A field of the
// wrong kind is invalid_params naming the param and what it takes in JSON's words
// ("greet: 'name' must be a string, got 5"), never a Go type; so is a missing field
// tagged `plugin:"required"`.
func (c *Call) Bind(v any) error {
	params := c.Params
	if named, ok, err := positionalToNamed(params, v, c.Method); err != nil {
		return err
	} else if ok {
		params = named
	}
	if takesNamedParams(v) {
		if got := jsonKind(params); got != "an object" && got != "null" {
			return InvalidParams("%s takes an object of named params, got %s", c.Method, got)
		}
	}
	if err := json.Unmarshal(params, v); err != nil {
		var typeErr *json.UnmarshalTypeError
		if errors.As(err, &typeErr) && typeErr.Type != nil {
			return typeMismatch(c.Method, params, typeErr)
		}
		return InvalidParams("params of %s: %v", c.Method, err)
	}
	if missing := missingRequired(params, v); missing != "" {
		return InvalidParams("params of %s: missing required field %q", c.Method, missing)
	}
	return nil
}

// Emit sends a plugin event to the host (see Plugin.Emit).
func (c *Call) Emit(name string, data any) error { return c.plugin.Emit(name, data) }

// UnaryMethod answers a call with one result, which is encoded as JSON (a
// json.RawMessage is sent as it is). A result JSON cannot carry (a NaN or an infinity
// anywhere in it, a json.RawMessage that is not JSON, a string that is not valid Unicode)
// is the call's provider_error, "the plugin's result is not JSON: …".
type UnaryMethod func(ctx context.Context, call *Call) (any, error)

// StreamMethod answers a call with chunks passed to send, in order. As a unary Call the
// host gets the list of the chunks. A chunk JSON cannot carry is not sent: send returns
// the provider_error that ends the stream, and so does every send after it, so the stream
// ends with it even if the method carries on.
type StreamMethod func(ctx context.Context, call *Call, send func(chunk any) error) error

// Hook is a lifecycle hook: start, stop or destroy.
type Hook func(ctx context.Context) error

// InitHook receives the config JSON the host passed to Init.
type InitHook func(ctx context.Context, config json.RawMessage) error

// EventHandler receives the data of a host event.
type EventHandler func(ctx context.Context, data json.RawMessage)

type method struct {
	name        string
	description string
	unary       UnaryMethod
	stream      StreamMethod
}

// Plugin holds what a plugin offers. Register everything before Serve.
type Plugin struct {
	id      string
	version string
	runtime string

	methods   map[string]*method
	order     []string
	onInit    InitHook
	onStart   Hook
	onStop    Hook
	onDestroy Hook
	handlers  map[string]EventHandler

	events *eventHub
	// tracing exports each call's span; nil (off) unless Run found an OTLP endpoint.
	tracing *tracing
	// hooksLeft is what remained of the stop's hooks cap when its hooks ended: the spans
	// still buffered may take that long to send (spanFlushMargin at least).
	hooksLeft time.Duration
	// late says which methods answered long after their deadline (lateanswers.go).
	late lateAnswers

	mu     sync.Mutex
	config json.RawMessage
}

// New starts the description of a plugin with its id and version.
func New(id, version string) *Plugin {
	return &Plugin{
		id:       id,
		version:  version,
		runtime:  "go",
		methods:  map[string]*method{},
		handlers: map[string]EventHandler{},
		events:   newEventHub(),
		config:   json.RawMessage("{}"),
	}
}

// Method registers a unary method.
func (p *Plugin) Method(name, description string, fn UnaryMethod) {
	p.register(&method{name: name, description: description, unary: fn})
}

// StreamingMethod registers a streaming method (CallStream).
func (p *Plugin) StreamingMethod(name, description string, fn StreamMethod) {
	p.register(&method{name: name, description: description, stream: fn})
}

// methodNotFound is the answer to a call of a method the plugin lacks: the plugin's id
// and the methods it has, sorted, as the TypeScript and Java SDKs say it.
func (p *Plugin) methodNotFound(name string) *Error {
	known := strings.Join(slices.Sorted(maps.Keys(p.methods)), ", ")
	if known == "" {
		known = "none"
	}
	return &Error{Type: TypeMethodNotFound, Message: fmt.Sprintf("plugin %s has no method %s; it has: %s", p.id, shownName(name), known)}
}

func (p *Plugin) register(m *method) {
	if _, exists := p.methods[m.name]; exists {
		panic(fmt.Sprintf("plugin %s: method %q registered twice", p.id, m.name))
	}
	p.methods[m.name] = m
	p.order = append(p.order, m.name)
}

// OnInit sets the hook run by Init with the host's config JSON.
func (p *Plugin) OnInit(fn InitHook) { p.onInit = fn }

// OnStart sets the hook run by Start.
func (p *Plugin) OnStart(fn Hook) { p.onStart = fn }

// OnStop sets the hook run by Stop (and at shutdown if the host never called Stop).
func (p *Plugin) OnStop(fn Hook) { p.onStop = fn }

// OnDestroy sets the hook run by Destroy (and at shutdown if the host never called it).
func (p *Plugin) OnDestroy(fn Hook) { p.onDestroy = fn }

// OnEvent sets the handler of host events with this name; other names are ignored.
func (p *Plugin) OnEvent(name string, fn EventHandler) { p.handlers[name] = fn }

// Emit sends a plugin event to every host connected (each open Events stream, each
// WebSocket connection). Events emitted while none is are kept (up to a bound: 1,000 in the
// WebSocket modes, which then send a dropped frame with the count lost) and delivered to
// the next host to connect.
//
// Data JSON cannot carry (a NaN, an infinity, a json.RawMessage that is not JSON, a string
// that is not valid Unicode) is sent to no host: the SDK logs a warning, "event 'NAME' not
// sent: …", and returns that error.
func (p *Plugin) Emit(name string, data any) error {
	if !utf8.ValidString(name) {
		// A gRPC string field must be UTF-8: sent, the name ended the host's whole Events
		// stream (INTERNAL), every later event with it.
		notSent := &Error{Type: TypeProviderError, Message: fmt.Sprintf(
			"event '%s' not sent: its name is not valid Unicode (bytes that are not UTF-8)", shownBareName(name))}
		sdkLog.Warn("linchkit plugin: " + notSent.Message)
		return notSent
	}
	raw, err := encodeJSON(data)
	if err != nil {
		shown := "'" + shownBareName(name) + "'"
		notSent := &Error{Type: TypeProviderError, Message: fmt.Sprintf(
			"event %s not sent: the data of event %s is not JSON: %s", shown, shown, notJSONReason(err))}
		sdkLog.Warn("linchkit plugin: " + notSent.Message)
		return notSent
	}
	p.events.publish(name, raw)
	return nil
}

// Config is the config JSON the host passed to Init ("{}" before Init).
func (p *Plugin) Config() json.RawMessage {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.config
}

func (p *Plugin) setConfig(config json.RawMessage) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.config = config
}

func structType(v any) reflect.Type {
	t := reflect.TypeOf(v)
	for t != nil && t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	if t == nil || t.Kind() != reflect.Struct {
		return nil
	}
	return t
}

// jsonKey is the key of a struct field in JSON, or "" for a field JSON skips.
func jsonKey(field reflect.StructField) string {
	if !field.IsExported() {
		return ""
	}
	key, _, _ := strings.Cut(field.Tag.Get("json"), ",")
	switch key {
	case "-":
		return ""
	case "":
		return field.Name
	}
	return key
}

// positionalToNamed turns an array of params into an object keyed by the fields of the
// struct v points to, in order; ok is false when params are not an array or v is not a
// struct, and an array longer than the struct has fields is invalid_params.
func positionalToNamed(params json.RawMessage, v any, method string) (json.RawMessage, bool, error) {
	t := structType(v)
	trimmed := bytes.TrimSpace(params)
	if t == nil || len(trimmed) == 0 || trimmed[0] != '[' {
		return nil, false, nil
	}
	var items []json.RawMessage
	if err := json.Unmarshal(trimmed, &items); err != nil {
		return nil, false, nil // not valid JSON: the decoding that follows says so
	}
	var keys []string
	for i := range t.NumField() {
		if key := jsonKey(t.Field(i)); key != "" {
			keys = append(keys, key)
		}
	}
	if len(items) > len(keys) {
		return nil, false, InvalidParams("%s takes at most %d positional params, got %d", method, len(keys), len(items))
	}
	named := make(map[string]json.RawMessage, len(items))
	for i, item := range items {
		named[keys[i]] = item
	}
	raw, err := json.Marshal(named)
	return raw, err == nil, nil
}

// missingRequired names the first struct field tagged `plugin:"required"` whose JSON
// key is absent from params, or returns "".
func missingRequired(params json.RawMessage, v any) string {
	t := structType(v)
	if t == nil {
		return ""
	}
	var present map[string]json.RawMessage
	_ = json.Unmarshal(params, &present)
	for i := range t.NumField() {
		field := t.Field(i)
		if key := jsonKey(field); key != "" && field.Tag.Get("plugin") == "required" {
			if _, ok := present[key]; !ok {
				return key
			}
		}
	}
	return ""
}
