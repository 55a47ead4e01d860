package plugin

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
	"time"
)

// The registration loop's waits, as it asks for them (run's after), against a fake etcd
// gateway on a loopback port that answers each try as the test scripts it: 'R' refuses
// (HTTP 403, permission denied), 'U' answers nothing etcd would (an etcd that does not
// answer, for the loop), 'A' admits. refusedRetryWait's own test holds the waits' values;
// this one holds the loop to them: the refusal counted, doubled, capped, started again
// after a success and kept across an outage.
func TestTheRegistrationLoopWaitsAsTheBackoffSays(t *testing.T) {
	const tries = "RRRRRRARURUURAU"
	var mu sync.Mutex
	try := 0
	etcd := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		outcome := byte('A') // leaving, once every try is made
		if try < len(tries) {
			outcome = tries[try]
		}
		mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		switch {
		case outcome == 'R':
			w.WriteHeader(http.StatusForbidden)
			fmt.Fprint(w, `{"error":"etcdserver: permission denied","code":7,"message":"etcdserver: permission denied"}`)
		case outcome == 'U':
			fmt.Fprint(w, `{}`) // no lease granted, none renewed: not etcd's answer
		case r.URL.Path == "/v3/lease/grant":
			fmt.Fprint(w, `{"header":{},"ID":"7587","TTL":"10"}`)
		case r.URL.Path == "/v3/lease/keepalive":
			fmt.Fprint(w, `{"result":{"ID":"7587","TTL":"10"}}`)
		default:
			fmt.Fprint(w, `{"header":{}}`)
		}
	}))
	defer etcd.Close()
	env := map[string]string{EnvRegisterEtcd: etcd.URL, EnvRegisterPrefix: "/linchkit/plugins/echo", EnvRegisterTTL: "10"}
	r, err := registrationFrom(registryConfigFromEnv(func(k string) string { return env[k] }),
		&net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 50051}, newLogger(io.Discard))
	if err != nil {
		t.Fatal(err)
	}
	var waits []time.Duration
	ran := make(chan struct{})
	go func() {
		defer close(ran)
		r.run(func(wait time.Duration) <-chan time.Time {
			waits = append(waits, wait)
			mu.Lock()
			defer mu.Unlock()
			if try++; try == len(tries) {
				close(r.stop)
				return nil // never: the loop leaves on stop
			}
			now := make(chan time.Time, 1)
			now <- time.Now()
			return now
		})
	}()
	select {
	case <-ran:
	case <-time.After(30 * time.Second):
		t.Fatal("the loop did not end")
	}
	// Each refusal's wait lies in its span: (pace 1 s) 1-2 s after the first, twice as long
	// after each in a row, up to 15-30 s; a success waits a renewal period, TTL/3, and
	// starts them again; an outage waits the pace, and keeps the count.
	second := time.Second
	period := 10 * time.Second / 3
	type span struct{ low, high time.Duration }
	want := []span{
		{second, 2 * second},       // R
		{2 * second, 4 * second},   // R
		{4 * second, 8 * second},   // R
		{8 * second, 16 * second},  // R
		{15 * second, 30 * second}, // R: the cap
		{15 * second, 30 * second}, // R
		{period, period},           // A
		{second, 2 * second},       // R: from the first again
		{second, second},           // U: the pace
		{2 * second, 4 * second},   // R: the second in a row still
		{second, second},           // U
		{second, second},           // U
		{4 * second, 8 * second},   // R
		{period, period},           // A
		{second, second},           // U
	}
	if len(waits) != len(want) {
		t.Fatalf("%d waits, want %d: %v", len(waits), len(want), waits)
	}
	for i, wait := range waits {
		if wait < want[i].low || wait > want[i].high {
			t.Errorf("try %d (%c): waited %v, want %v to %v; every wait: %v", i+1, tries[i], wait, want[i].low, want[i].high, waits)
		}
	}
}
