package jsonunicode

import (
	"encoding/json"
	"testing"
	"unicode/utf8"
)

var latin1 = string([]byte{'c', 'a', 'f', 0xe9})

// latin1Text marshals to its bytes as they are: encoding/json writes U+FFFD for the one
// that is not UTF-8.
type latin1Text []byte

func (t latin1Text) MarshalText() ([]byte, error) { return t, nil }

// prebuilt is its own JSON, a \ufffd escape in it a character: its fields are not what
// encoding/json writes.
type prebuilt struct{ Hidden string }

func (prebuilt) MarshalJSON() ([]byte, error) { return []byte(`"\ufffd"`), nil }

type inner struct{ Text string }

type outer struct {
	inner          // an embedded unexported struct: encoding/json writes its fields
	Skipped string `json:"-"`
	private string
	Plain   string
}

func TestProblemFindsWhatEncodingJSONWrote(t *testing.T) {
	for name, c := range map[string]struct {
		value any
		want  string
	}{
		"a string":                     {map[string]any{"a": []any{latin1}}, NotUTF8},
		"a map key":                    {map[string]int{latin1: 1}, NotUTF8},
		"a text key":                   {map[latin1TextKey]int{{latin1}: 1}, NotUTF8},
		"a text marshaler":             {[]any{latin1Text(latin1)}, NotUTF8},
		"an embedded unexported field": {outer{inner: inner{latin1}}, NotUTF8},
		"a pointer's value":            {&inner{latin1}, NotUTF8},
		"a raw message":                {json.RawMessage(`["` + latin1 + `"]`), NotUTF8},
		"a nested raw message":         {[]any{json.RawMessage(`"` + latin1 + `"`)}, NotUTF8},
		"a lone high surrogate":        {json.RawMessage(`"\ud83d"`), LoneSurrogate},
		"a high one then a letter":     {json.RawMessage(`"\uD83D\u0041"`), LoneSurrogate},
		"two high ones":                {json.RawMessage(`"\ud83d\ud83d\ude00"`), LoneSurrogate},
		"a lone low surrogate":         {json.RawMessage(`"\uDE00"`), LoneSurrogate},
		"an escape after backslashes":  {json.RawMessage(`"\\\\\ud83d"`), LoneSurrogate},
		"a real U+FFFD":                {map[string]string{"\ufffd": "\ufffd"}, ""},
		"backslash ufffd":              {[]string{`\ufffd`, `\\ufffd`, `\ud83d`}, ""},
		"a pair":                       {json.RawMessage(`"\ud83d\ude00 \uD83D\uDE00"`), ""},
		"an escaped U+FFFD in raw":     {json.RawMessage(`"\ufffd \uFFFD"`), ""},
		"a marshaler's U+FFFD":         {[]any{prebuilt{latin1}}, ""},
		"a skipped field":              {[]any{outer{Skipped: latin1, private: latin1}, prebuilt{}}, ""},
		"bytes":                        {[]any{[]byte(latin1), prebuilt{}}, ""},
		"html escapes":                 {"<a & b>\u2028", ""},
	} {
		encoded, err := json.Marshal(c.value)
		if raw, isRaw := c.value.(json.RawMessage); isRaw {
			encoded, err = raw, nil
		}
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if got := Problem(c.value, encoded); got != c.want {
			t.Errorf("%s: Problem(%s) = %q, want %q", name, encoded, got, c.want)
		}
	}
}

type latin1TextKey struct{ text string }

func (k latin1TextKey) MarshalText() ([]byte, error) { return []byte(k.text), nil }

func TestReplacedWritesOneUFFFDPerByteNotUTF8(t *testing.T) {
	for in, want := range map[string]string{
		"plain":                          "plain",
		latin1 + " \ufffd":               "caf\ufffd \ufffd",
		string([]byte{0xed, 0xa0, 0x80}): "\ufffd\ufffd\ufffd", // a surrogate as UTF-8 bytes
		string([]byte{0xf0, 0x9f}) + "!": "\ufffd\ufffd!",      // half an emoji
	} {
		got := Replaced(in)
		if got != want || !utf8.ValidString(got) {
			t.Errorf("Replaced(%q) = %q, want %q", in, got, want)
		}
		// As encoding/json writes it.
		encoded, _ := json.Marshal(in)
		var back string
		if json.Unmarshal(encoded, &back); back != want {
			t.Errorf("encoding/json writes %q as %q, Replaced as %q", in, back, want)
		}
	}
}
