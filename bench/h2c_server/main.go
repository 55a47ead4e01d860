// An HTTP function for bench/bench_http_inflight.py that speaks HTTP/2 without TLS (h2c,
// by prior knowledge) as well as HTTP/1.1: every call is answered after --delay-ms.
//
// Go's net/http, as a Go plugin would serve: the benchmark's Python servers speak
// HTTP/1.1 only, and hypercorn's HTTP/2 (pure Python) did not keep up with 10,000 streams
// at once (every call of a burst timed out). Prints the port it listens on, then serves
// until killed.
package main

import (
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"time"
)

func main() {
	address := flag.String("listen", "127.0.0.1:0", "address to listen on")
	delay := flag.Duration("delay", time.Second, "how long every call takes")
	flag.Parse()
	body := []byte(`{"ok":true,"result":{"text":"hi"}}`)
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		time.Sleep(*delay)
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Content-Length", fmt.Sprint(len(body)))
		_, _ = w.Write(body)
	})
	var protocols http.Protocols
	protocols.SetHTTP1(true)
	protocols.SetUnencryptedHTTP2(true)
	server := &http.Server{
		Handler:   handler,
		Protocols: &protocols,
		// Every call of a burst in flight on one connection at once.
		HTTP2: &http.HTTP2Config{MaxConcurrentStreams: 1_000_000},
	}
	listener, err := net.Listen("tcp", *address)
	if err != nil {
		panic(err)
	}
	fmt.Println(listener.Addr().(*net.TCPAddr).Port)
	panic(server.Serve(listener))
}
