//go:build wasip1

// Package wasm serves a Go plugin to the dispatcher's wasm provider (docs/protocol.md,
// "WebAssembly"). The module speaks the Extism plugin ABI, so the dispatcher runs it like
// any Extism plugin and an Extism host runs it like ours:
//
//   - each method is an export of the same name, `//go:wasmexport name`, returning int32;
//   - the call's input is the JSON of its params, the output the JSON of its result;
//   - a failure is Extism's error string holding the JSON error of the protocol
//     ({"type", "message", "retryable", "details"}), so the host raises the same typed
//     error it would for a gRPC or HTTP plugin.
//
// Build with the standard toolchain: GOOS=wasip1 GOARCH=wasm go build -buildmode=c-shared.
// A method body is one line:
//
//	//go:wasmexport echo
//	func echo() int32 { return wasm.Call(func(params json.RawMessage) (any, error) { return params, nil }) }
package wasm

import (
	"encoding/json"
	"errors"
	"fmt"
	"strings"

	"github.com/extism/go-pdk"

	"github.com/linchkit/dispatcher/sdk/go/internal/jsonunicode"
)

// ConfigKey is the Extism config key under which the host passes the plugin's whole
// `config` object as JSON; each top-level key is also passed on its own, the Extism way.
const ConfigKey = "linchkit.config"

// The dispatcher's stable error types (docs/protocol.md); a plugin may use its own too.
const (
	TypeInvalidParams    = "invalid_params"
	TypeDeadlineExceeded = "deadline_exceeded"
	TypeProviderError    = "provider_error"
	TypePluginError      = "PluginError"
)

// Error is a failure a method answers with; the host raises it typed.
type Error struct {
	Type      string         `json:"type"`
	Message   string         `json:"message"`
	Retryable bool           `json:"retryable"`
	Details   map[string]any `json:"details,omitempty"`
}

func (e *Error) Error() string { return e.Type + ": " + e.Message }

// NewError builds a non-retryable error of the plugin's own type.
func NewError(errorType, message string) *Error {
	return &Error{Type: errorType, Message: message}
}

// InvalidParams says the params do not have the shape the method needs.
func InvalidParams(format string, args ...any) *Error {
	return &Error{Type: TypeInvalidParams, Message: fmt.Sprintf(format, args...)}
}

// Bind decodes the params into a struct; a mismatch is InvalidParams, as on every transport.
func Bind(params json.RawMessage, into any) error {
	if err := json.Unmarshal(params, into); err != nil {
		return InvalidParams("params: %v", err)
	}
	return nil
}

// Config is the plugin's `config` from the manifest (nil when it has none).
func Config() map[string]any {
	text, ok := pdk.GetConfig(ConfigKey)
	if !ok {
		return nil
	}
	var config map[string]any
	if json.Unmarshal([]byte(text), &config) != nil {
		return nil
	}
	return config
}

// Call runs one method: it hands handler the params, writes its result as the call's
// output and returns the status the export must return (0 ok, 1 failed).
func Call(handler func(params json.RawMessage) (any, error)) int32 {
	result, err := handler(json.RawMessage(pdk.Input()))
	if err != nil {
		return fail(err)
	}
	out, err := encodeJSON(result)
	if err != nil {
		// A NaN, an infinity, a json.RawMessage that is not JSON, a string that is not valid
		// Unicode: the call's provider_error, in the words of every SDK.
		return fail(&Error{Type: TypeProviderError, Message: "the plugin's result is not JSON: " + notJSONReason(err)})
	}
	pdk.Output(out)
	return 0
}

// encodeJSON is v as JSON, or why JSON cannot carry it: encoding/json's error, or a string
// that is not valid Unicode (encoding/json would send U+FFFD in place of bytes that are not
// UTF-8, and a json.RawMessage's as they are), as the plugin package checks it.
func encodeJSON(v any) ([]byte, error) {
	out, err := json.Marshal(v)
	if err != nil {
		return nil, err
	}
	if why := jsonunicode.Problem(v, out); why != "" {
		return nil, errors.New(jsonunicode.Reason(why))
	}
	return out, nil
}

// notJSONReason is why encoding/json could not write a value, without the value: "NaN is
// not a JSON number", as the plugin package says it.
func notJSONReason(err error) string {
	var unsupported *json.UnsupportedValueError
	if errors.As(err, &unsupported) && unsupported.Value.IsValid() && unsupported.Value.CanFloat() {
		return unsupported.Str + " is not a JSON number"
	}
	return strings.TrimPrefix(err.Error(), "json: ")
}

func fail(err error) int32 {
	var typed *Error
	if !errors.As(err, &typed) {
		typed = &Error{Type: TypePluginError, Message: err.Error()}
	}
	// Details JSON cannot carry (a NaN, a string that is not valid Unicode) are dropped, the
	// error still goes; encoding/json writes U+FFFD for each byte of the type or the
	// message that is not UTF-8.
	sent := *typed
	if _, err := encodeJSON(sent.Details); err != nil {
		sent.Details = nil
	}
	text, _ := json.Marshal(&sent)
	pdk.SetErrorString(string(text))
	return 1
}
