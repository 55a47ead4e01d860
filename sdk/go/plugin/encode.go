package plugin

import (
	"encoding/json"
	"errors"
	"strings"
	"sync/atomic"
)

// What a plugin hands the SDK to send (a result, a chunk, an event's data) is encoded here,
// and what JSON cannot carry never reaches a host: not a NaN or an infinity (encoding/json
// refuses them), not a json.RawMessage that is not JSON (until 2026-12-07 one went out as
// it was, a bare NaN token no host could read). A result or a chunk is the call's
// provider_error, an event is not sent (docs/protocol.md, the JSON envelope).

// resultNotJSON begins the message of a result or a chunk JSON cannot carry, in every SDK.
const resultNotJSON = "the plugin's result is not JSON: "

// encodeJSON is v as JSON, or encoding/json's error when JSON cannot carry it. A
// json.RawMessage is sent as it is once json.Valid passes it: the one scan it costs is no
// more than the params it often echoes cost on the way in, and nothing else is scanned.
func encodeJSON(v any) (json.RawMessage, error) {
	raw, isRaw := v.(json.RawMessage)
	if !isRaw {
		return json.Marshal(v)
	}
	if len(raw) == 0 {
		return json.RawMessage("null"), nil
	}
	if !json.Valid(raw) {
		// json.Marshal refuses it in the words it has for one nested in a value.
		if _, err := json.Marshal(raw); err != nil {
			return nil, err
		}
	}
	return raw, nil
}

// encodeResult is encodeJSON for a method's result or a chunk: what JSON cannot carry is
// the call's provider_error (not retryable: the same call gives the same result).
func encodeResult(v any) (json.RawMessage, *Error) {
	raw, err := encodeJSON(v)
	if err != nil {
		return nil, &Error{Type: TypeProviderError, Message: resultNotJSON + notJSONReason(err)}
	}
	return raw, nil
}

// notJSONReason is why encoding/json could not write a value, in a few words that never
// hold the value: "NaN is not a JSON number", "+Inf is not a JSON number", "error calling
// MarshalJSON for type json.RawMessage: invalid character 'N' looking for beginning of
// value".
func notJSONReason(err error) string {
	var unsupported *json.UnsupportedValueError
	if errors.As(err, &unsupported) && unsupported.Value.IsValid() && unsupported.Value.CanFloat() {
		return unsupported.Str + " is not a JSON number"
	}
	return strings.TrimPrefix(err.Error(), "json: ")
}

// streamFailure is the first failure that ends a stream whatever its method does next: a
// chunk JSON cannot carry, a chunk over the WebSocket send cap. Every send after it
// returns it, and the stream ends with it even when the method ignored the error its send
// returned (until 2026-12-07 such a stream lost the chunk and ended ok).
type streamFailure struct{ first atomic.Pointer[Error] }

// end keeps failure unless the stream already has one, and returns the one it has.
func (s *streamFailure) end(failure *Error) *Error {
	s.first.CompareAndSwap(nil, failure)
	return s.first.Load()
}

// err is the failure that ended the stream, or nil.
func (s *streamFailure) err() *Error { return s.first.Load() }

// or is the stream's outcome: its failure if it has one, else what its method returned.
func (s *streamFailure) or(methodErr error) error {
	if failure := s.err(); failure != nil {
		return failure
	}
	return methodErr
}
