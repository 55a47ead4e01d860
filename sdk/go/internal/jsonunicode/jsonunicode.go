// Package jsonunicode finds, in what encoding/json wrote, a string that is not valid
// Unicode, which no host can read or which encoding/json changed without a word
// (docs/protocol.md, "Response"): JSON text is UTF-8 (RFC 8259 §8.1), and an escape of
// half a surrogate pair stands for no character (§8.2).
//
// A Go string may hold any bytes. encoding/json writes each byte of one that is not UTF-8
// as the escape \ufffd (a real U+FFFD it writes as its three bytes, never escaped), and
// copies a json.RawMessage, or what a MarshalJSON method returns, as it is: bytes that
// are not UTF-8 and a lone `\ud83d` included. The plugin package and the wasm package
// both ask Problem after encoding, so a result, a chunk, an event's data and an error's
// details answer the same on every transport.
package jsonunicode

import (
	"bytes"
	"encoding"
	"encoding/json"
	"reflect"
	"unicode/utf8"
)

// Why a string is not valid Unicode, in every SDK's words: Problem returns one of them.
const (
	NotUTF8       = "bytes that are not UTF-8"
	LoneSurrogate = "a lone surrogate"
)

// Reason is the words of every SDK for why: "a string is not valid Unicode (…)".
func Reason(why string) string { return "a string is not valid Unicode (" + why + ")" }

// Problem is why encoded, the JSON encoding/json wrote for v (or v itself, a
// json.RawMessage), holds a string that is not valid Unicode (NotUTF8, LoneSurrogate), or
// "" when it holds none.
//
// It costs two scans of encoded that need no decoding (utf8.Valid, bytes.Index for `\u`),
// under 2% of what encoding it cost; v is walked only when encoded holds a \ufffd escape,
// which encoding/json writes only for bytes that are not UTF-8 (or a pre-built JSON text
// holds).
func Problem(v any, encoded []byte) string {
	// Bytes that are not UTF-8 reach encoded only from a pre-built JSON text (a
	// json.RawMessage, a MarshalJSON method), anywhere in v: encoding/json copies them.
	if !utf8.Valid(encoded) {
		return NotUTF8
	}
	walked := false
	for at := 0; ; {
		found := bytes.Index(encoded[at:], []byte(`\u`))
		if found < 0 {
			return ""
		}
		at += found
		// `\\ufffd` is a backslash and the letters ufffd: an escape begins after an even
		// run of backslashes (encoded is JSON, so every backslash is in a string).
		if !escapeAt(encoded, at) || at+6 > len(encoded) {
			at += 2
			continue
		}
		code, ok := hex4(encoded[at+2 : at+6])
		switch {
		case !ok:
			// Not JSON: encoded is always JSON here.
		case code == utf8.RuneError:
			// encoding/json's mark of a byte that is not UTF-8, or a pre-built JSON text's
			// real U+FFFD written as an escape: the Go strings of v say which.
			if !walked {
				walked = true
				if invalidString(reflect.ValueOf(v)) {
					return NotUTF8
				}
			}
		case code >= 0xD800 && code <= 0xDBFF:
			// A high surrogate stands for a character only with a low one right after it.
			if low, ok := escapedCode(encoded, at+6); ok && low >= 0xDC00 && low <= 0xDFFF {
				at += 12
				continue
			}
			return LoneSurrogate
		case code >= 0xDC00 && code <= 0xDFFF:
			return LoneSurrogate
		}
		at += 6
	}
}

// escapeAt: the backslash at encoded[at] begins an escape (an even run of backslashes
// before it).
func escapeAt(encoded []byte, at int) bool {
	run := 0
	for i := at - 1; i >= 0 && encoded[i] == '\\'; i-- {
		run++
	}
	return run%2 == 0
}

// escapedCode is the code unit of the `\uXXXX` escape at encoded[at], if one is there.
func escapedCode(encoded []byte, at int) (rune, bool) {
	if at+6 > len(encoded) || encoded[at] != '\\' || encoded[at+1] != 'u' {
		return 0, false
	}
	return hex4(encoded[at+2 : at+6])
}

func hex4(digits []byte) (rune, bool) {
	var code rune
	for _, d := range digits {
		switch {
		case '0' <= d && d <= '9':
			code = code<<4 | rune(d-'0')
		case 'a' <= d && d <= 'f':
			code = code<<4 | rune(d-'a'+10)
		case 'A' <= d && d <= 'F':
			code = code<<4 | rune(d-'A'+10)
		default:
			return 0, false
		}
	}
	return code, true
}

var (
	marshalerType     = reflect.TypeFor[json.Marshaler]()
	textMarshalerType = reflect.TypeFor[encoding.TextMarshaler]()
)

// invalidString: v holds, where encoding/json writes it as a JSON string (a string, a map
// key, the text of an encoding.TextMarshaler), one that is not UTF-8. What a MarshalJSON
// method returns is its own JSON, checked as bytes: a \ufffd escape in it is its own.
// Called only on a v encoding/json encoded, so v has no cycle.
func invalidString(v reflect.Value) bool {
	if !v.IsValid() {
		return false
	}
	t := v.Type()
	if t.Kind() != reflect.Pointer && t.Kind() != reflect.Interface {
		if implements(v, marshalerType) {
			return false
		}
		if implements(v, textMarshalerType) {
			return invalidText(v)
		}
	}
	switch t.Kind() {
	case reflect.String:
		return !utf8.ValidString(v.String())
	case reflect.Pointer, reflect.Interface:
		if v.IsNil() {
			return false
		}
		if t.Kind() == reflect.Pointer && implements(v, marshalerType) {
			return false
		}
		if t.Kind() == reflect.Pointer && implements(v, textMarshalerType) {
			return invalidText(v)
		}
		return invalidString(v.Elem())
	case reflect.Struct:
		for i := range t.NumField() {
			// The fields encoding/json writes: exported ones, and those of an embedded struct.
			field := t.Field(i)
			if !field.IsExported() && (!field.Anonymous || derefed(field.Type).Kind() != reflect.Struct) ||
				field.Tag.Get("json") == "-" {
				continue
			}
			if invalidString(v.Field(i)) {
				return true
			}
		}
	case reflect.Slice:
		if t.Elem().Kind() == reflect.Uint8 && !reflect.PointerTo(t.Elem()).Implements(marshalerType) &&
			!reflect.PointerTo(t.Elem()).Implements(textMarshalerType) {
			return false // []byte: base64
		}
		fallthrough
	case reflect.Array:
		for i := range v.Len() {
			if invalidString(v.Index(i)) {
				return true
			}
		}
	case reflect.Map:
		iter := v.MapRange()
		for iter.Next() {
			key := iter.Key()
			// encoding/json writes a key of kind string as it is, another through MarshalText.
			if key.Kind() == reflect.String && !utf8.ValidString(key.String()) {
				return true
			}
			if key.Kind() != reflect.String && implements(key, textMarshalerType) && invalidText(key) {
				return true
			}
			if invalidString(iter.Value()) {
				return true
			}
		}
	}
	return false
}

func derefed(t reflect.Type) reflect.Type {
	if t.Kind() == reflect.Pointer {
		return t.Elem()
	}
	return t
}

// implements: v, or its address as encoding/json takes it, has the method set of iface.
func implements(v reflect.Value, iface reflect.Type) bool {
	if !v.CanInterface() {
		return false
	}
	if v.Type().Implements(iface) {
		return true
	}
	return v.CanAddr() && reflect.PointerTo(v.Type()).Implements(iface)
}

// invalidText: the text v marshals to is not UTF-8.
func invalidText(v reflect.Value) bool {
	if v.Kind() == reflect.Pointer && v.IsNil() {
		return false
	}
	if !v.Type().Implements(textMarshalerType) {
		v = v.Addr()
	}
	text, err := v.Interface().(encoding.TextMarshaler).MarshalText()
	return err == nil && !utf8.Valid(text)
}

// Replaced is s with each byte that is not UTF-8 replaced by U+FFFD, as encoding/json
// writes it: for an error's message and type, which are sent all the same (refusing them
// would hide the error), where protobuf refuses a string that is not UTF-8.
func Replaced(s string) string {
	if utf8.ValidString(s) {
		return s
	}
	out := make([]byte, 0, len(s)+8)
	for i := 0; i < len(s); {
		r, size := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && size == 1 {
			out = utf8.AppendRune(out, utf8.RuneError)
		} else {
			out = append(out, s[i:i+size]...)
		}
		i += size
	}
	return string(out)
}
