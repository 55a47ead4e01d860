package plugin

// The send cap of a WebSocket session (docs/protocol.md, "WebSocket binding"): the host
// closes a connection with 1009 on a message over its read cap, and every call and stream
// on it fails with that one. So the session sends nothing over the smaller of its own read
// cap (maxMessageBytes) and the cap the host announced: the `LinchKit-Max-Message-Bytes`
// header of a dispatcher's upgrade request (serve --websocket); in connect mode the same
// header on the gateway's 101 response, read before the hello so that the first frame
// already keeps under it, then the welcome frame's `max_message_bytes`, which replaces it
// when valid. What it would have sent is replaced instead:
//
//   - a response: by a provider_error response to the same id (reason too_large);
//   - a stream chunk: by that error as the stream's final response, the producer stopped;
//   - an event: by nothing, the first one of the connection logged at WARN.
//
// A message is measured as sent: the bytes of its JSON text after encoding/json's
// escaping (U+2028 and <, >, & become six bytes each), before permessage-deflate.

import (
	"fmt"
	"strconv"
	"strings"
)

// maxMessageCapHeader: the header a host announces its read cap with: on the upgrade
// request a dispatcher sends, or on the 101 response of a gateway.
const maxMessageCapHeader = "LinchKit-Max-Message-Bytes"

const (
	// smallestAnnouncedCap: a cap announced below it is taken for a mistake, not obeyed:
	// every control frame and error response must still fit.
	smallestAnnouncedCap = 1024
	// largestAnnouncedCap: 2**53, the largest integer every host's JSON reads exactly.
	largestAnnouncedCap = 1 << 53
	// mostCapDigits: 2**53 has 16 digits.
	mostCapDigits = 16
)

// announcedCap reads a host's announced cap: decimal digits only (no sign, no exponent,
// no fraction, no spaces), at most 16 of them, between 1024 and 2**53. ok is false for
// anything else, which the session ignores: its own cap stays.
func announcedCap(text string) (limit int64, ok bool) {
	if text == "" || len(text) > mostCapDigits {
		return 0, false
	}
	for _, c := range []byte(text) {
		if c < '0' || c > '9' {
			return 0, false
		}
	}
	value, err := strconv.ParseInt(text, 10, 64)
	if err != nil || value < smallestAnnouncedCap || value > largestAnnouncedCap {
		return 0, false
	}
	return value, true
}

// shownBareName: a method's or an event's name as the too-large messages show it, as the
// other SDKs do: unquoted, a rune that does not print escaped as shownName escapes it (a
// quote too), cut to 64 bytes.
func shownBareName(name string) string {
	quoted := shownName(name)
	cut := strings.HasSuffix(quoted, "…")
	quoted = strings.TrimSuffix(quoted, "…")
	bare := quoted[1 : len(quoted)-1]
	if cut {
		bare += "…"
	}
	return bare
}

// tooLarge is the error sent in place of a response or a chunk over the cap: what is the
// message's subject ("the result of", "the error of", "a chunk of") and its method.
func tooLarge(what, method string, size int, limit int64) *Error {
	return &Error{
		Type: TypeProviderError,
		Message: fmt.Sprintf("%s %s is %d bytes, over the WebSocket message cap of %d bytes",
			what, shownBareName(method), size, limit),
		Details: map[string]any{"reason": "too_large", "bytes": size, "limit": limit},
	}
}
