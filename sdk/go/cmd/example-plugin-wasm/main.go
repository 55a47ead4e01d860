//go:build wasip1

// The example plugin of docs/protocol.md built for the wasm provider (the Extism ABI,
// sdk/go/wasm). It answers the unary methods of the other SDKs' example; streams and
// events have no form in a single wasm call, so count answers as its list and emit is absent.
package main

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"time"

	"github.com/linchkit/dispatcher/sdk/go/wasm"
)

func main() {}

// maxCount bounds count's n as the native example does: count collects every chunk before
// it answers, so an n of 2**40 would only end in a trap of the sandbox's memory limit.
const maxCount = 1_000_000

//go:wasmexport echo
func echo() int32 {
	return wasm.Call(func(params json.RawMessage) (any, error) { return params, nil })
}

//go:wasmexport digest
func digest() int32 {
	return wasm.Call(func(raw json.RawMessage) (any, error) {
		var params struct {
			Data   *string `json:"data"`
			Rounds *int    `json:"rounds"`
		}
		if err := wasm.Bind(raw, &params); err != nil {
			return nil, err
		}
		if params.Data == nil || params.Rounds == nil {
			return nil, wasm.InvalidParams("digest needs data (string) and rounds (int)")
		}
		if *params.Rounds < 0 {
			return nil, wasm.InvalidParams("rounds must not be negative, got %d", *params.Rounds)
		}
		value := []byte(*params.Data)
		for range *params.Rounds {
			sum := sha256.Sum256(value)
			value = sum[:]
		}
		return hex.EncodeToString(value), nil
	})
}

//go:wasmexport fail
func fail() int32 {
	return wasm.Call(func(raw json.RawMessage) (any, error) {
		var params struct {
			Message string `json:"message"`
		}
		if err := wasm.Bind(raw, &params); err != nil {
			return nil, err
		}
		return nil, wasm.NewError("ExampleFailure", params.Message)
	})
}

// sleep sleeps in short slices: a blocking host call cannot be interrupted, the plugin's
// own code can, so the host's deadline ends the call within one slice.
//
//go:wasmexport sleep
func sleep() int32 {
	return wasm.Call(func(raw json.RawMessage) (any, error) {
		var params struct {
			Ms *int64 `json:"ms"`
		}
		if err := wasm.Bind(raw, &params); err != nil {
			return nil, err
		}
		if params.Ms == nil || *params.Ms < 0 {
			return nil, wasm.InvalidParams("sleep needs ms, a non-negative int")
		}
		until := time.Now().Add(time.Duration(*params.Ms) * time.Millisecond)
		for left := time.Until(until); left > 0; left = time.Until(until) {
			time.Sleep(min(left, 5*time.Millisecond))
		}
		return map[string]int64{"slept_ms": *params.Ms}, nil
	})
}

//go:wasmexport count
func count() int32 {
	return wasm.Call(func(raw json.RawMessage) (any, error) {
		var params struct {
			N *int `json:"n"`
		}
		if err := wasm.Bind(raw, &params); err != nil {
			return nil, err
		}
		if params.N == nil || *params.N < 0 {
			return nil, wasm.InvalidParams("count needs n, a non-negative int")
		}
		if *params.N > maxCount {
			return nil, wasm.InvalidParams("n must be at most %d, got %d", maxCount, *params.N)
		}
		chunks := make([]map[string]int, *params.N)
		for i := range chunks {
			chunks[i] = map[string]int{"i": i}
		}
		return chunks, nil
	})
}

//go:wasmexport config
func config() int32 {
	return wasm.Call(func(json.RawMessage) (any, error) { return wasm.Config(), nil })
}
