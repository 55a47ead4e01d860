package plugin

import (
	"bytes"
	"encoding"
	"encoding/json"
	"fmt"
	"math"
	"reflect"
	"strconv"
	"strings"
	"unicode/utf8"
)

// MaxParamsDepth is how deeply params may nest arrays and objects; deeper params are
// invalid_params in every SDK (docs/protocol.md). The dispatcher's own encoder writes at
// most 254 levels, and a method that decodes params recursively must not meet 100,000.
const MaxParamsDepth = 250

// checkParams says why params are unusable ("are not valid JSON", …), or "".
// A host may send bytes encoding/json would pass through unchanged yet another language
// (or the dispatcher reading the echo back) could not: not UTF-8 inside a string, a
// number beyond a double (1e400, an integer of 5,000 digits), a lone surrogate escape
// ("\ud800"). One pass without recursion, before json.Valid; the message never quotes
// the params.
func checkParams(raw []byte) string { return checkJSON(raw, MaxParamsDepth) }

// checkJSON is checkParams with another depth limit (a WebSocket frame holds params two
// levels down).
func checkJSON(raw []byte, maxDepth int) string {
	if !utf8.Valid(raw) {
		return "are not UTF-8"
	}
	depth := 0
	for i := 0; i < len(raw); i++ {
		switch c := raw[i]; {
		case c == '"':
			end, why := scanString(raw, i+1)
			if why != "" {
				return why
			}
			i = end
		case c == '[' || c == '{':
			if depth++; depth > maxDepth {
				return fmt.Sprintf("are nested deeper than %d levels", maxDepth)
			}
		case c == ']' || c == '}':
			depth--
		case c == '-' || ('0' <= c && c <= '9'):
			j := numberEnd(raw, i+1)
			if mayOverflow(raw[i:j]) {
				if f, err := strconv.ParseFloat(string(raw[i:j]), 64); err != nil && math.IsInf(f, 0) {
					return "hold a number beyond the range of a double"
				}
			}
			i = j - 1
		}
	}
	if !json.Valid(raw) {
		return "are not valid JSON"
	}
	return ""
}

// scanString reads a JSON string from raw[i] (after its opening quote) to its closing
// quote: its index, or why its escapes are unusable.
func scanString(raw []byte, i int) (int, string) {
	const lone = "hold a lone surrogate escape (\\ud800-\\udfff), which names no character"
	for i < len(raw) {
		switch raw[i] {
		case '"':
			return i, ""
		case '\\':
			if i+1 < len(raw) && raw[i+1] == 'u' {
				r := hex4(raw, i+2)
				if r >= 0xDC00 && r <= 0xDFFF {
					return i, lone
				}
				if r >= 0xD800 && r <= 0xDBFF {
					if i+7 < len(raw) && raw[i+6] == '\\' && raw[i+7] == 'u' {
						if low := hex4(raw, i+8); low >= 0xDC00 && low <= 0xDFFF {
							i += 12
							continue
						}
					}
					return i, lone
				}
				i += 6
				continue
			}
			i += 2
			continue
		}
		i++
	}
	return i, "" // not closed: json.Valid says so
}

// hex4 is the value of the four hex digits at raw[i:], or -1. Written out: it runs for
// every \u escape, and strconv's parser wanted a string (an allocation) each time.
func hex4(raw []byte, i int) int {
	if i+4 > len(raw) {
		return -1
	}
	v := 0
	for _, c := range raw[i : i+4] {
		switch {
		case '0' <= c && c <= '9':
			c -= '0'
		case 'a' <= c && c <= 'f':
			c -= 'a' - 10
		case 'A' <= c && c <= 'F':
			c -= 'A' - 10
		default:
			return -1
		}
		v = v<<4 | int(c)
	}
	return v
}

// numberEnd is the index just past the JSON number whose first byte is at raw[i-1].
func numberEnd(raw []byte, i int) int {
	for i < len(raw) {
		switch c := raw[i]; {
		case '0' <= c && c <= '9', c == '.', c == 'e', c == 'E', c == '+', c == '-':
			i++
		default:
			return i
		}
	}
	return i
}

// mayOverflow says whether the JSON number could be past a double's ±1.8e308, so that
// only such numbers are parsed (parsing every one with an exponent cost a 1 MB params
// of 20,000 of them 5 ms): more than 300 digits before the point, or that many with the
// exponent added.
func mayOverflow(number []byte) bool {
	digits, exponent := 0, 0
	mantissa := number
	if e := bytes.IndexAny(number, "eE"); e >= 0 {
		mantissa = number[:e]
		for _, c := range number[e+1:] {
			if '0' <= c && c <= '9' {
				if exponent = exponent*10 + int(c-'0'); exponent > 1000 {
					return true
				}
			}
		}
		if e+1 < len(number) && number[e+1] == '-' {
			exponent = -exponent
		}
	}
	for _, c := range mantissa {
		if c == '.' {
			break
		}
		if '0' <= c && c <= '9' {
			digits++
		}
	}
	return digits+exponent > 300
}

// shownName is a caller's method name as an error message shows it: quoted (a NUL or a
// newline escaped) and cut to 64 bytes, so a 10,000-character name is not sent back whole.
func shownName(name string) string {
	if len(name) <= 64 {
		return strconv.Quote(name)
	}
	cut := 64
	for cut > 0 && !utf8.RuneStart(name[cut]) {
		cut--
	}
	return strconv.Quote(name[:cut]) + "…"
}

// jsonKind is what a JSON value is, as a message says it: "an object", "an array",
// "a string", "a number", "a boolean" or "null" (Java's words, and TypeScript's).
func jsonKind(value []byte) string {
	value = bytes.TrimLeft(value, " \t\r\n")
	if len(value) == 0 {
		return "null"
	}
	switch value[0] {
	case '{':
		return "an object"
	case '[':
		return "an array"
	case '"':
		return "a string"
	case 't', 'f':
		return "a boolean"
	case 'n':
		return "null"
	}
	return "a number"
}

// shownValue is a value as a message says it got it: a number as it was written (cut to
// 40 bytes), anything else by its kind, so a message never quotes what a caller sent.
func shownValue(value []byte) string {
	value = bytes.TrimLeft(value, " \t\r\n")
	if kind := jsonKind(value); kind != "a number" {
		return kind
	}
	end := numberEnd(value, 1)
	if end > 40 {
		return string(value[:40]) + "…"
	}
	return string(value[:end])
}

// valueAt finds the value an error at byte offset of params is about (params are valid
// JSON): its path from the top ("items[0].name", "" for params themselves) and where it
// begins. One pass over params up to offset, without recursion.
//
// The offset is where the decoder stopped: just past a scalar, at or just past the '{'
// or '[' of a container of the wrong kind, just past the '}' of an object that misses a
// field. The value is the last one begun in the innermost container still open there.
func valueAt(params []byte, offset int) (path string, value []byte) {
	type frame struct {
		object  bool
		key     []byte // the current member's key, as written (escapes kept: one line)
		colon   bool   // past the current member's ':'
		index   int
		started bool // the current member's value has begun, at start
		start   int
	}
	var stack []frame
	offset = min(offset, len(params))
	begin := func(i int) {
		if n := len(stack); n > 0 && !stack[n-1].started && (!stack[n-1].object || stack[n-1].colon) {
			stack[n-1].started, stack[n-1].start = true, i
		}
	}
	for i := 0; i < offset; i++ {
		switch c := params[i]; c {
		case ' ', '\t', '\r', '\n':
		case '"':
			end, _ := scanString(params, i+1)
			if n := len(stack); n > 0 && stack[n-1].object && !stack[n-1].colon {
				stack[n-1].key = params[i+1 : min(end, len(params))]
			} else {
				begin(i)
			}
			i = end
		case '{', '[':
			begin(i)
			stack = append(stack, frame{object: c == '{'})
		case '}', ']':
			if len(stack) > 0 {
				stack = stack[:len(stack)-1]
			}
		case ':':
			if n := len(stack); n > 0 {
				stack[n-1].colon = true
			}
		case ',':
			if n := len(stack); n > 0 {
				top := &stack[n-1]
				top.index++
				top.key, top.colon, top.started = nil, false, false
			}
		default: // a number, true, false, null
			begin(i)
			for i+1 < offset && !endsToken(params[i+1]) {
				i++
			}
		}
	}
	var b strings.Builder
	value = bytes.TrimLeft(params, " \t\r\n")
	for _, f := range stack {
		if !f.started {
			break
		}
		if f.object {
			if b.Len() > 0 {
				b.WriteByte('.')
			}
			b.Write(f.key)
		} else {
			fmt.Fprintf(&b, "[%d]", f.index)
		}
		value = params[f.start:]
	}
	path = b.String()
	if len(path) > 100 {
		cut := 100
		for cut > 0 && !utf8.RuneStart(path[cut]) {
			cut--
		}
		path = path[:cut] + "…"
	}
	return path, value
}

// endsToken says whether c ends a number or a literal (true, false, null).
func endsToken(c byte) bool {
	switch c {
	case ' ', '\t', '\r', '\n', ',', ':', ']', '}':
		return true
	}
	return false
}

var (
	jsonUnmarshaler = reflect.TypeFor[json.Unmarshaler]()
	textUnmarshaler = reflect.TypeFor[encoding.TextUnmarshaler]()
)

// decodesItself says whether t (or *t) reads its JSON with its own method.
func decodesItself(t reflect.Type) bool {
	pointer := reflect.PointerTo(t)
	return t.Implements(jsonUnmarshaler) || pointer.Implements(jsonUnmarshaler) ||
		t.Implements(textUnmarshaler) || pointer.Implements(textUnmarshaler)
}

// takesNamedParams says whether v points to a struct or a map: a value of named params,
// which only a JSON object fills. A type with its own UnmarshalJSON decides for itself.
func takesNamedParams(v any) bool {
	t := reflect.TypeOf(v)
	for t != nil && t.Kind() == reflect.Pointer {
		if t = t.Elem(); decodesItself(t) {
			return false
		}
	}
	return t != nil && (t.Kind() == reflect.Struct || t.Kind() == reflect.Map)
}

// expectedJSON is what a Go type takes, in JSON's words: a message must not name Go types
// (the caller may not know Go, and "struct { Name string ... }" tells nothing).
func expectedJSON(t reflect.Type) string {
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	if reflect.PointerTo(t).Implements(textUnmarshaler) || t.Implements(textUnmarshaler) {
		return "a string"
	}
	switch t.Kind() {
	case reflect.Bool:
		return "a boolean"
	case reflect.Int8, reflect.Int16, reflect.Int32:
		bits := t.Bits()
		return fmt.Sprintf("an integer from %d to %d", -1<<(bits-1), 1<<(bits-1)-1)
	case reflect.Int, reflect.Int64:
		return "an integer"
	case reflect.Uint8, reflect.Uint16, reflect.Uint32:
		return fmt.Sprintf("an integer from 0 to %d", uint64(1)<<t.Bits()-1)
	case reflect.Uint, reflect.Uint64, reflect.Uintptr:
		return "a non-negative integer"
	case reflect.Float32, reflect.Float64:
		return "a number"
	case reflect.String:
		return "a string"
	case reflect.Slice:
		if t.Elem().Kind() == reflect.Uint8 {
			return "a string of base64"
		}
		return "an array"
	case reflect.Array:
		return "an array"
	case reflect.Map, reflect.Struct:
		return "an object"
	}
	return "a value of another kind"
}

// typeMismatch says, without Go's type names, which param of method had the wrong kind of
// value, what it takes and what it got.
func typeMismatch(method string, params []byte, err *json.UnmarshalTypeError) *Error {
	path, value := valueAt(params, int(err.Offset))
	want, got := expectedJSON(err.Type), shownValue(value)
	switch {
	case path != "":
		return InvalidParams("%s: '%s' must be %s, got %s", method, path, want, got)
	case want == "an object":
		return InvalidParams("%s takes an object of named params, got %s", method, jsonKind(value))
	}
	return InvalidParams("%s takes %s, got %s", method, want, got)
}
