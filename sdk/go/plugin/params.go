package plugin

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math"
	"strconv"
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
func checkParams(raw []byte) string {
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
			if depth++; depth > MaxParamsDepth {
				return fmt.Sprintf("are nested deeper than %d levels", MaxParamsDepth)
			}
		case c == ']' || c == '}':
			depth--
		case c == '-' || ('0' <= c && c <= '9'):
			j := i + 1
			for j < len(raw) && bytes.IndexByte([]byte("0123456789+-.eE"), raw[j]) >= 0 {
				j++
			}
			// Only an exponent or over 300 digits can pass a double's range.
			if number := raw[i:j]; len(number) > 300 || bytes.ContainsAny(number, "eE") {
				if f, err := strconv.ParseFloat(string(number), 64); err != nil && math.IsInf(f, 0) {
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

// hex4 is the value of the four hex digits at raw[i:], or -1.
func hex4(raw []byte, i int) int {
	if i+4 > len(raw) {
		return -1
	}
	v, err := strconv.ParseUint(string(raw[i:i+4]), 16, 32)
	if err != nil {
		return -1
	}
	return int(v)
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
