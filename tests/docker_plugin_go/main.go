// A static plugin binary for the docker provider's FROM-scratch path: it serves the HTTP
// binding of docs/protocol.md (POST /invoke, GET /health) on LINCHKIT_PLUGIN_UDS, or on
// LINCHKIT_PLUGIN_HOST:LINCHKIT_PLUGIN_PORT. One method, "echo", answers its params.
package main

import (
	"encoding/json"
	"net"
	"net/http"
	"os"
)

type request struct {
	V      int             `json:"v"`
	Method string          `json:"method"`
	Params json.RawMessage `json:"params"`
}

type failure struct {
	Type      string `json:"type"`
	Message   string `json:"message"`
	Retryable bool   `json:"retryable"`
}

func answer(w http.ResponseWriter, status int, body any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(body)
}

func invoke(w http.ResponseWriter, r *http.Request) {
	var call request
	if err := json.NewDecoder(r.Body).Decode(&call); err != nil || call.V != 1 {
		answer(w, 400, map[string]any{"ok": false, "error": failure{"provider_error", "malformed envelope", false}})
		return
	}
	if call.Method != "echo" {
		answer(w, 200, map[string]any{"ok": false, "error": failure{"method_not_found", "no method " + call.Method, false}})
		return
	}
	answer(w, 200, map[string]any{"ok": true, "result": call.Params})
}

func main() {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /invoke", invoke)
	mux.HandleFunc("GET /health", func(w http.ResponseWriter, r *http.Request) {
		answer(w, 200, map[string]string{"status": "serving"})
	})
	var listener net.Listener
	var err error
	if path := os.Getenv("LINCHKIT_PLUGIN_UDS"); path != "" {
		listener, err = net.Listen("unix", path)
	} else {
		listener, err = net.Listen("tcp", net.JoinHostPort(os.Getenv("LINCHKIT_PLUGIN_HOST"), os.Getenv("LINCHKIT_PLUGIN_PORT")))
	}
	if err != nil {
		os.Stderr.WriteString(err.Error() + "\n")
		os.Exit(1)
	}
	_ = http.Serve(listener, mux)
}
