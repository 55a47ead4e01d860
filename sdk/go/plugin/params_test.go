package plugin

import (
	"encoding/json"
	"errors"
	"strings"
	"testing"
)

func TestCheckParams(t *testing.T) {
	deep := func(n int) string { return strings.Repeat("[", n) + strings.Repeat("]", n) }
	for _, tc := range []struct{ params, why string }{
		{`{"a": [1, 2.5e3, -0.0, "\ud83d\ude00", "\"[{"]}`, ""},
		{deep(MaxParamsDepth), ""},
		{"1.7976931348623157e308", ""},
		{strings.Repeat("9", 300), ""},
		{deep(MaxParamsDepth + 1), "are nested deeper than 250 levels"},
		{deep(100_000), "are nested deeper than 250 levels"},
		{`"[[[[" `, ""},
		{"1e400", "hold a number beyond the range of a double"},
		{"[-1E+400]", "hold a number beyond the range of a double"},
		{strings.Repeat("9", 5000), "hold a number beyond the range of a double"},
		// Digits and exponent together: each alone stays under what a double holds.
		{"1" + strings.Repeat("0", 250) + "e100", "hold a number beyond the range of a double"},
		{"0.5e309", "hold a number beyond the range of a double"},
		{"1e308", ""},
		{"1" + strings.Repeat("0", 300) + "e-100", ""},
		{"1e-400", ""},
		{"-2.5E+0300", ""},
		{`"\ud800"`, "hold a lone surrogate"},
		{`"\udc00"`, "hold a lone surrogate"},
		{`"\ud800\u0041"`, "hold a lone surrogate"},
		{"\"caf\xe9\"", "are not UTF-8"},
		{`{"a": `, "are not valid JSON"},
	} {
		why := checkParams([]byte(tc.params))
		if (tc.why == "") != (why == "") || !strings.HasPrefix(why, tc.why) {
			t.Errorf("checkParams(%.40q) = %q, want %q", tc.params, why, tc.why)
		}
	}
}

func TestShownName(t *testing.T) {
	if got := shownName(strings.Repeat("é", 10_000)); len(got) > 80 || !strings.HasSuffix(got, "…") {
		t.Errorf("shownName of a long name = %q", got)
	}
	if got := shownName("a\x00\nb"); got != `"a\x00\nb"` {
		t.Errorf("shownName = %s", got)
	}
}

// go test -run - -bench CheckParams ./plugin: the check against encoding/json's own
// validation (which it includes), on small params and on 1 MB of numbers and of strings.
var (
	smallParams   = []byte(`{"text":"hi"}`)
	numbersParams = []byte(`{"items":[` + strings.Repeat(`{"name":"a plugin param","n":12345,"f":1.5e3,"ok":true},`, 20000) + `{}]}`)
	stringsParams = []byte(`{"items":[` + strings.Repeat(`"a longer text value with an escape \u00e9 and some words in it",`, 20000) + `""]}`)
)

func benchmarkCheck(b *testing.B, raw []byte, check func([]byte)) {
	b.SetBytes(int64(len(raw)))
	for i := 0; i < b.N; i++ {
		check(raw)
	}
}

func checkOnly(raw []byte) { checkParams(raw) }
func validOnly(raw []byte) { json.Valid(raw) }

func BenchmarkCheckParamsSmall(b *testing.B)   { benchmarkCheck(b, smallParams, checkOnly) }
func BenchmarkCheckParamsNumbers(b *testing.B) { benchmarkCheck(b, numbersParams, checkOnly) }
func BenchmarkCheckParamsStrings(b *testing.B) { benchmarkCheck(b, stringsParams, checkOnly) }
func BenchmarkJSONValidSmall(b *testing.B)     { benchmarkCheck(b, smallParams, validOnly) }
func BenchmarkJSONValidNumbers(b *testing.B)   { benchmarkCheck(b, numbersParams, validOnly) }
func BenchmarkJSONValidStrings(b *testing.B)   { benchmarkCheck(b, stringsParams, validOnly) }

// stamp reads its JSON itself (an array of two numbers); Bind leaves that to it.
type stamp [2]int

func (s *stamp) UnmarshalJSON(raw []byte) error { return json.Unmarshal(raw, (*[2]int)(s)) }

func TestBindSaysWhatWasWrongInJSONsWords(t *testing.T) {
	type item struct {
		Name string `json:"name"`
	}
	type params struct {
		Name  string         `json:"name"`
		Small int8           `json:"small"`
		Count uint           `json:"count"`
		Ratio float64        `json:"ratio"`
		On    bool           `json:"on"`
		Items []item         `json:"items"`
		Tags  map[string]int `json:"tags"`
		Inner struct {
			Deep []string `json:"deep"`
		} `json:"inner"`
	}
	for _, tc := range []struct{ params, want string }{
		{`{"name": 5}`, "greet: 'name' must be a string, got 5"},
		{`{"name": {"first": "Ada"}}`, "greet: 'name' must be a string, got an object"},
		{`{"name": ["Ada"]}`, "greet: 'name' must be a string, got an array"},
		{`{"small": 300}`, "greet: 'small' must be an integer from -128 to 127, got 300"},
		{`{"count": -1}`, "greet: 'count' must be a non-negative integer, got -1"},
		{`{"ratio": "half"}`, "greet: 'ratio' must be a number, got a string"},
		{`{"on": "yes"}`, "greet: 'on' must be a boolean, got a string"},
		{`{"name": "Ada", "items": [{"name": "a"}, {"name": true}]}`, "greet: 'items[1].name' must be a string, got a boolean"},
		{`{"items": {"name": "a"}}`, "greet: 'items' must be an array, got an object"},
		{`{"tags": {"a": 1, "b": "two"}}`, "greet: 'tags.b' must be an integer, got a string"},
		{"{\n  \"inner\": {\"deep\": [\"x\", 7]}\n}", "greet: 'inner.deep[1]' must be a string, got 7"},
		{`{"inner": [1]}`, "greet: 'inner' must be an object, got an array"},
		{`[{"name": "Ada"}]`, "greet: 'name' must be a string, got an object"}, // positional
		{`["Ada", 1, 2, 0.5, true, [], {}, {}, "one too many"]`, "greet takes at most 8 positional params, got 9"},
		{`"Ada"`, "greet takes an object of named params, got a string"},
		{`-1.5e3`, "greet takes an object of named params, got a number"},
		{`false`, "greet takes an object of named params, got a boolean"},
	} {
		var into params
		err := (&Call{Method: "greet", Params: json.RawMessage(tc.params)}).Bind(&into)
		var got *Error
		if !errors.As(err, &got) || got.Type != TypeInvalidParams || got.Message != tc.want {
			t.Errorf("Bind(%s):\n got %v\nwant invalid_params: %s", tc.params, err, tc.want)
		}
	}
	// A map takes named params too; null leaves the value as it is.
	var named map[string]int
	if err := (&Call{Method: "m", Params: json.RawMessage(`[1]`)}).Bind(&named); err == nil ||
		err.(*Error).Message != "m takes an object of named params, got an array" {
		t.Errorf("Bind of an array into a map: %v", err)
	}
	if err := (&Call{Method: "m", Params: json.RawMessage(`null`)}).Bind(&named); err != nil || named != nil {
		t.Errorf("Bind of null into a map: %v, %v", err, named)
	}
	// What is not named params takes what it takes.
	var list []int
	if err := (&Call{Method: "m", Params: json.RawMessage(`[1, 2]`)}).Bind(&list); err != nil || len(list) != 2 {
		t.Errorf("Bind of an array into a slice: %v, %v", err, list)
	}
	if err := (&Call{Method: "m", Params: json.RawMessage(`[1, "x"]`)}).Bind(&list); err == nil ||
		err.(*Error).Message != "m: '[1]' must be an integer, got a string" {
		t.Errorf("Bind of a wrong item into a slice: %v", err)
	}
	var one int
	if err := (&Call{Method: "m", Params: json.RawMessage(`"x"`)}).Bind(&one); err == nil ||
		err.(*Error).Message != "m takes an integer, got a string" {
		t.Errorf("Bind of a string into an int: %v", err)
	}
	var s stamp
	if err := (&Call{Method: "m", Params: json.RawMessage(`[1, 2]`)}).Bind(&s); err != nil || s != (stamp{1, 2}) {
		t.Errorf("Bind into a type with its own UnmarshalJSON: %v, %v", err, s)
	}
}

func TestValueAtNeverQuotesMuchOfTheParams(t *testing.T) {
	long := `{"` + strings.Repeat("k", 500) + `": "x"}`
	path, value := valueAt([]byte(long), len(long)-1)
	if len(path) > 110 || !strings.HasSuffix(path, "…") || shownValue(value) != "a string" {
		t.Errorf("valueAt of a long key: %q, %q", path, shownValue(value))
	}
	if got := shownValue([]byte(strings.Repeat("9", 300))); len(got) > 50 {
		t.Errorf("shownValue of a long number: %q", got)
	}
}
