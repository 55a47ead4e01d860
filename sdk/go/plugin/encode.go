package plugin

import (
	"encoding/json"
	"errors"
	"strings"
	"sync/atomic"

	"github.com/linchkit/dispatcher/sdk/go/internal/jsonunicode"
)

// What a plugin hands the SDK to send (a result, a chunk, an event's data, an error's
// details) is encoded here, and what JSON cannot carry never reaches a host: not a NaN or
// an infinity (encoding/json refuses them), not a json.RawMessage that is not JSON (until
// 2026-12-07 one went out as it was, a bare NaN token no host could read), not a string
// that is not valid Unicode (until 2026-12-08 encoding/json sent U+FFFD in place of bytes
// that are not UTF-8 without a word, and a json.RawMessage sent them, or a lone `\ud83d`,
// as they were: "not a response envelope"). A result or a chunk is the call's
// provider_error, an event is not sent, an error's details are left out (docs/protocol.md,
// the JSON envelope).

// resultNotJSON begins the message of a result or a chunk JSON cannot carry, in every SDK.
const resultNotJSON = "the plugin's result is not JSON: "

// encodeJSON is v as JSON, or encoding/json's error when JSON cannot carry it, or
// notUnicode when it holds a string that is not valid Unicode. A json.RawMessage is sent
// as it is once json.Valid passes it: the one scan it costs is no more than the params it
// often echoes cost on the way in. The Unicode check scans what was written, under 2% of
// what writing it cost (jsonunicode.Problem), and walks v only when encoding/json wrote a
// \ufffd escape, its mark of bytes that are not UTF-8.
func encodeJSON(v any) (json.RawMessage, error) {
	raw, isRaw := v.(json.RawMessage)
	if !isRaw {
		encoded, err := json.Marshal(v)
		if err != nil {
			return nil, err
		}
		return unicodeChecked(v, encoded)
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
	// Nothing of raw to walk: a \ufffd escape in it is a character (nil: no allocation).
	return unicodeChecked(nil, raw)
}

// notUnicode is why a value holding a string that is not valid Unicode is not sent: "a
// string is not valid Unicode (bytes that are not UTF-8)", or "(a lone surrogate)" for a
// json.RawMessage holding an escape of half a surrogate pair.
type notUnicode string

func (why notUnicode) Error() string { return jsonunicode.Reason(string(why)) }

// unicodeChecked is encoded, what encoding/json wrote for v, unless a string in it is not
// valid Unicode.
func unicodeChecked(v any, encoded json.RawMessage) (json.RawMessage, error) {
	if why := jsonunicode.Problem(v, encoded); why != "" {
		return nil, notUnicode(why)
	}
	return encoded, nil
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
// value", "a string is not valid Unicode (bytes that are not UTF-8)".
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
