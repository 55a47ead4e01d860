//go:build wasip1

// A hostile plugin for the wasm provider's tests (tests/test_wasm_provider.py): it loops
// forever, grows its memory without end, reads and writes files it may not have been
// granted, reads variables, keeps state between calls, panics, and sends HTTP requests
// through the Go PDK (tests/test_wasm_hostile_network.py).
package main

import (
	"encoding/json"
	"os"
	"strings"

	"github.com/extism/go-pdk"
	"github.com/linchkit/dispatcher/sdk/go/wasm"
)

func main() {}

var calls int

func text(raw json.RawMessage) (string, error) {
	var value string
	err := wasm.Bind(raw, &value)
	return value, err
}

//go:wasmexport echo
func echo() int32 {
	return wasm.Call(func(params json.RawMessage) (any, error) { return params, nil })
}

// spin never returns by itself.
//
//go:wasmexport spin
func spin() int32 {
	return wasm.Call(func(json.RawMessage) (any, error) {
		n := 0
		for {
			n++
		}
	})
}

// hog allocates (and touches) 1 MiB after another until the host says no.
//
//go:wasmexport hog
func hog() int32 {
	return wasm.Call(func(json.RawMessage) (any, error) {
		var kept [][]byte
		for {
			chunk := make([]byte, 1<<20)
			for i := range chunk {
				chunk[i] = 1
			}
			kept = append(kept, chunk)
		}
	})
}

//go:wasmexport read_file
func readFile() int32 {
	return wasm.Call(func(raw json.RawMessage) (any, error) {
		path, err := text(raw)
		if err != nil {
			return nil, err
		}
		content, err := os.ReadFile(path)
		if err != nil {
			return nil, wasm.NewError("FileError", err.Error())
		}
		return string(content), nil
	})
}

//go:wasmexport write_file
func writeFile() int32 {
	return wasm.Call(func(raw json.RawMessage) (any, error) {
		path, err := text(raw)
		if err != nil {
			return nil, err
		}
		if err := os.WriteFile(path, []byte("written by the plugin"), 0o644); err != nil {
			return nil, wasm.NewError("FileError", err.Error())
		}
		return true, nil
	})
}

// env answers what the plugin can see of a variable: from WASI's environment, then
// from the config keys the host passes granted variables as.
//
//go:wasmexport env
func env() int32 {
	return wasm.Call(func(raw json.RawMessage) (any, error) {
		name, err := text(raw)
		if err != nil {
			return nil, err
		}
		if value, ok := os.LookupEnv(name); ok {
			return value, nil
		}
		if value, ok := pdk.GetConfig(name); ok {
			return value, nil
		}
		return nil, nil
	})
}

//go:wasmexport environ
func environ() int32 {
	return wasm.Call(func(json.RawMessage) (any, error) { return strings.Join(os.Environ(), "\n"), nil })
}

// remember counts the calls this instance has answered.
//
//go:wasmexport remember
func remember() int32 {
	return wasm.Call(func(json.RawMessage) (any, error) {
		calls++
		return calls, nil
	})
}

//go:wasmexport crash
func crash() int32 {
	return wasm.Call(func(json.RawMessage) (any, error) { panic("the plugin crashed on purpose") })
}

// fetch sends {url, body} through the PDK's HTTP (a POST when there is a body) and answers
// the status, headers and body that came back.
//
//go:wasmexport fetch
func fetch() int32 {
	return wasm.Call(func(raw json.RawMessage) (any, error) {
		var ask struct {
			URL  string `json:"url"`
			Body string `json:"body"`
		}
		if err := wasm.Bind(raw, &ask); err != nil {
			return nil, err
		}
		request := pdk.NewHTTPRequest(pdk.MethodGet, ask.URL)
		if ask.Body != "" {
			request = pdk.NewHTTPRequest(pdk.MethodPost, ask.URL).SetBody([]byte(ask.Body))
			request.SetHeader("Content-Type", "application/json")
		}
		response := request.Send()
		return map[string]any{
			"status":  response.Status(),
			"headers": response.Headers(),
			"body":    string(response.Body()),
		}, nil
	})
}
