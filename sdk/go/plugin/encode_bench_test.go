package plugin

import (
	"encoding/json"
	"fmt"
	"strings"
	"testing"
)

// A typical result: an object of names, numbers, flags, a list and a nested object, some
// of it beyond ASCII. benchResult(1) is about 1 KB of JSON, benchResult(1000) about 1 MB.
func benchResult(items int) any {
	list := make([]any, items)
	for i := range list {
		list[i] = map[string]any{
			"id": i, "name": fmt.Sprintf("customer %d", i), "email": fmt.Sprintf("user%d@example.com", i),
			"active": i%2 == 0, "score": float64(i) * 1.5, "tags": []any{"alpha", "beta", "gamma"},
			"address": map[string]any{"street": "12 Rue de la Paix", "city": "Zürich", "zip": "8001"},
			"note":    strings.Repeat("lorem ipsum dolor sit amet, ", 30) + "ünïcødé",
		}
	}
	if items == 1 {
		return list[0]
	}
	return map[string]any{"items": list, "total": items}
}

func benchmarkEncodeResult(b *testing.B, result any) {
	raw, failure := encodeResult(result)
	if failure != nil {
		b.Fatal(failure)
	}
	b.SetBytes(int64(len(raw)))
	b.ReportAllocs()
	for b.Loop() {
		_, _ = encodeResult(result)
	}
	b.ReportMetric(float64(len(raw)), "json-bytes")
}

func BenchmarkEncodeResult1KB(b *testing.B) { benchmarkEncodeResult(b, benchResult(1)) }
func BenchmarkEncodeResult1MB(b *testing.B) { benchmarkEncodeResult(b, benchResult(1000)) }

// The same results pre-built (json.RawMessage), as a method that echoes its params sends.
func BenchmarkEncodeRawResult1KB(b *testing.B) { benchmarkEncodeResult(b, prebuilt(benchResult(1))) }
func BenchmarkEncodeRawResult1MB(b *testing.B) { benchmarkEncodeResult(b, prebuilt(benchResult(1000))) }

func prebuilt(v any) json.RawMessage {
	raw, err := json.Marshal(v)
	if err != nil {
		panic(err)
	}
	return raw
}

// The Unicode check alone (jsonunicode.Problem on what encoding/json wrote): what
// encodeResult costs beyond json.Marshal (and, for a json.RawMessage, json.Valid).
func benchmarkUnicodeCheck(b *testing.B, result any) {
	encoded := prebuilt(result)
	b.SetBytes(int64(len(encoded)))
	b.ReportAllocs()
	for b.Loop() {
		_, _ = unicodeChecked(result, encoded)
	}
}

func BenchmarkUnicodeCheck1KB(b *testing.B) { benchmarkUnicodeCheck(b, benchResult(1)) }
func BenchmarkUnicodeCheck1MB(b *testing.B) { benchmarkUnicodeCheck(b, benchResult(1000)) }
