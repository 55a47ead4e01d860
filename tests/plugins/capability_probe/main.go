// The capability probe for the docker provider (tests/test_capabilities.py): the HTTP
// binding of docs/protocol.md on LINCHKIT_PLUGIN_UDS, with the methods the wasm and
// subprocess test plugins also have, so one capabilities block is asked the same
// questions on all three: read, write, env, connect.
package main

import (
	"encoding/json"
	"net"
	"net/http"
	"os"
	"time"
)

type request struct {
	V      int    `json:"v"`
	Method string `json:"method"`
	Params struct {
		Path    string `json:"path"`
		Name    string `json:"name"`
		Address string `json:"address"`
	} `json:"params"`
}

func answer(w http.ResponseWriter, result any, errorType string, err error) {
	w.Header().Set("Content-Type", "application/json")
	if err != nil {
		_ = json.NewEncoder(w).Encode(map[string]any{"ok": false, "error": map[string]any{
			"type": errorType, "message": err.Error(), "retryable": false}})
		return
	}
	_ = json.NewEncoder(w).Encode(map[string]any{"ok": true, "result": result})
}

func invoke(w http.ResponseWriter, r *http.Request) {
	var call request
	if err := json.NewDecoder(r.Body).Decode(&call); err != nil {
		answer(w, nil, "invalid_params", err)
		return
	}
	p := call.Params
	switch call.Method {
	case "read":
		content, err := os.ReadFile(p.Path)
		answer(w, string(content), "FileError", err)
	case "write":
		err := os.WriteFile(p.Path, []byte("written by the plugin"), 0o644)
		answer(w, true, "FileError", err)
	case "env":
		value, ok := os.LookupEnv(p.Name)
		if !ok {
			answer(w, nil, "", nil)
			return
		}
		answer(w, value, "", nil)
	case "connect":
		conn, err := net.DialTimeout("tcp", p.Address, 2*time.Second)
		if err == nil {
			_ = conn.Close()
		}
		answer(w, "connected", "NetworkError", err)
	default:
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(map[string]any{"ok": false, "error": map[string]any{
			"type": "method_not_found", "message": "no method " + call.Method, "retryable": false}})
	}
}

func main() {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /invoke", invoke)
	mux.HandleFunc("GET /health", func(w http.ResponseWriter, r *http.Request) {
		answer(w, map[string]string{"status": "serving"}, "", nil)
	})
	listener, err := net.Listen("unix", os.Getenv("LINCHKIT_PLUGIN_UDS"))
	if err != nil {
		os.Stderr.WriteString(err.Error() + "\n")
		os.Exit(1)
	}
	_ = http.Serve(listener, mux)
}
