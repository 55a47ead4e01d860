package plugin

import (
	"context"
	"errors"
	"fmt"

	"github.com/linchkit/dispatcher/sdk/go/internal/jsonunicode"
	"github.com/linchkit/dispatcher/sdk/go/internal/pluginpb"
)

// The dispatcher's stable error types (docs/protocol.md). A plugin may also use its own
// type names; the host then raises PluginError carrying that name.
const (
	TypeMethodNotFound    = "method_not_found"
	TypeInvalidParams     = "invalid_params"
	TypeUnauthorized      = "unauthorized"
	TypeForbidden         = "forbidden"
	TypeRateLimited       = "rate_limited"
	TypeOverloaded        = "overloaded"
	TypeDeadlineExceeded  = "deadline_exceeded"
	TypeTargetUnavailable = "target_unavailable"
	TypeProviderError     = "provider_error"
)

// Error is a failure a method answers with: it travels to the host inside
// CallReply.error, never as a gRPC status. Return one (or wrap one) from a method.
type Error struct {
	Type       string
	Message    string
	Retryable  bool
	Details    map[string]any
	RetryAfter float64 // seconds; 0 when unknown
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

// MethodNotFound says the plugin has no method of that name (a call the SDK cannot route
// is answered with more: the plugin's id and the methods it has).
func MethodNotFound(method string) *Error {
	return &Error{Type: TypeMethodNotFound, Message: fmt.Sprintf("plugin has no method %s", shownName(method))}
}

// DeadlineExceeded says the call's deadline passed before the method finished.
func DeadlineExceeded(message string) *Error {
	return &Error{Type: TypeDeadlineExceeded, Message: message, Retryable: true}
}

// toError maps anything a method returned onto the protocol's error: an *Error anywhere
// in the chain keeps its fields, a context deadline becomes deadline_exceeded, and any
// other error becomes a non-retryable "PluginError" with the error's text.
func toError(err error) *Error {
	var typed *Error
	if errors.As(err, &typed) {
		return typed
	}
	if errors.Is(err, context.DeadlineExceeded) {
		return DeadlineExceeded("the call's deadline passed before the method finished")
	}
	if errors.Is(err, context.Canceled) {
		return &Error{Type: TypeDeadlineExceeded, Message: "the host cancelled the call", Retryable: true}
	}
	return &Error{Type: "PluginError", Message: err.Error()}
}

// toProto encodes the error for the wire; Details becomes a JSON object or nothing: left
// out when JSON cannot carry them (a NaN, a string that is not valid Unicode), as for a
// result. The type and the message are sent all the same, each byte that is not UTF-8
// replaced by U+FFFD (refusing them would hide the error; until 2026-12-08 gRPC failed the
// call with "grpc: error while marshaling: string field contains invalid UTF-8").
func (e *Error) toProto() *pluginpb.Error {
	out := &pluginpb.Error{
		Type: jsonunicode.Replaced(e.Type), Message: jsonunicode.Replaced(e.Message),
		Retryable: e.Retryable, RetryAfter: e.RetryAfter,
	}
	if len(e.Details) > 0 {
		if raw, err := encodeJSON(e.Details); err == nil {
			out.DetailsJson = raw
		}
	}
	return out
}
