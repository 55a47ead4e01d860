package plugin

import (
	"context"
	"io"
	"net"
	"strings"
	"testing"
	"time"
)

func TestMaskedURLHidesThePasswordAndTheQuerysValues(t *testing.T) {
	for raw, want := range map[string]string{
		"ws://127.0.0.1:8080/v1/plugins/connect":                  "ws://127.0.0.1:8080/v1/plugins/connect",
		"wss://gw.example/v1/plugins/connect?token=t0k&region=eu": "wss://gw.example/v1/plugins/connect?token=***&region=***",
		"wss://me:t0k@gw.example/v1/plugins/connect":              "wss://me:***@gw.example/v1/plugins/connect",
		"wss://t0k@gw.example/v1/plugins/connect?debug":           "wss://***@gw.example/v1/plugins/connect?***",
		"ws://gw.example/connect?t0k&region=eu":                   "ws://gw.example/connect?***&region=***",
		"ws://gw.example/connect#t0k":                             "ws://gw.example/connect",
		"ws://gw.example:port/%zz?token=t0k":                      "(a URL that does not parse)",
	} {
		if got := maskedURL(raw); got != want {
			t.Errorf("maskedURL(%q) = %q, want %q", raw, got, want)
		}
	}
}

// A dial's error quotes the URL as Go's HTTP client does (http://, its query and fragment
// as written): a token in a bare query item or the fragment is masked or left out there
// too. Before, maskedText passed both on.
func TestMaskedTextHidesABareQueryItemAndTheFragment(t *testing.T) {
	for raw, quoted := range map[string]string{
		"ws://127.0.0.1:1/c?" + collectorSecret:             `Get "http://127.0.0.1:1/c?` + collectorSecret + `": refused`,
		"ws://127.0.0.1:1/c#" + collectorSecret:             `Get "http://127.0.0.1:1/c#` + collectorSecret + `": refused`,
		"ws://127.0.0.1:1/c?a=1&" + collectorSecret + "#x1": `Get "http://127.0.0.1:1/c?a=1&` + collectorSecret + `#x1": refused`,
	} {
		got := maskedText("dial: "+quoted, raw)
		if strings.Contains(got, collectorSecret) || !strings.Contains(got, "http://127.0.0.1:1/c") {
			t.Errorf("maskedText(%q) = %q", quoted, got)
		}
	}
	got := maskedText(`Get "http://127.0.0.1:1/c?a=1&`+collectorSecret+`": refused`, "ws://127.0.0.1:1/c?a=1&"+collectorSecret)
	if want := `Get "http://127.0.0.1:1/c?a=***&***": refused`; got != want {
		t.Errorf("got %q, want %q", got, want)
	}
}

// connect says it cannot reach the gateway with the URL masked: a token in its query or
// userinfo stays out of the log (before, the line showed the URL whole, and the dial's
// error quoted it again).
func TestConnectNeverLogsTheGatewaysToken(t *testing.T) {
	out := capture(t)
	closed, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	address := closed.Addr().String()
	closed.Close() // nothing listens there now
	url := "ws://me:" + collectorSecret + "@" + address + "/v1/plugins/connect?token=" + collectorSecret
	ctx, cancel := context.WithTimeout(context.Background(), 1500*time.Millisecond)
	defer cancel()
	env := Environment{Args: []string{"connect", "-url", url}, Getenv: func(string) string { return "" },
		Stdin: strings.NewReader(""), Stdout: io.Discard}
	if err := testPlugin().Run(ctx, env); err != nil {
		t.Fatal(err)
	}
	said := out.String()
	if !strings.Contains(said, "cannot reach the gateway") ||
		!strings.Contains(said, "ws://me:***@"+address+"/v1/plugins/connect?token=***") {
		t.Fatalf("want the unreachable gateway named, masked: %q", said)
	}
	if strings.Contains(said, collectorSecret) {
		t.Errorf("the token shows: %q", said)
	}
	// A URL refused before dialling is masked too.
	err = testPlugin().Run(context.Background(), Environment{Args: []string{"connect", "-url",
		"ftp://gw.example/?token=" + collectorSecret}, Getenv: func(string) string { return "" },
		Stdin: strings.NewReader(""), Stdout: io.Discard})
	if err == nil || strings.Contains(err.Error(), collectorSecret) || !strings.Contains(err.Error(), "?token=***") {
		t.Errorf("refused: %v", err)
	}
}
