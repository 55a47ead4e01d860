package plugin

import (
	"encoding/json"
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
