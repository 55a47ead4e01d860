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
