package plugin

import (
	"bytes"
	"regexp"
	"strings"
	"testing"

	"github.com/linchkit/dispatcher/sdk/go/internal/pluginpb"
)

// The host reads a subprocess plugin's stderr a line at a time and logs each at the level
// it carries (providers/subprocess/levels.py reads slog's `level=`).
var slogLine = regexp.MustCompile(`^time=\S+ level=(DEBUG|INFO|WARN|ERROR) msg=`)

// capture points sdkLog at a buffer for one test.
func capture(t *testing.T) *bytes.Buffer {
	t.Helper()
	var out bytes.Buffer
	saved := sdkLog
	sdkLog = newLogger(&out)
	t.Cleanup(func() { sdkLog = saved })
	return &out
}

func lines(out *bytes.Buffer) []string {
	return strings.Split(strings.TrimSuffix(out.String(), "\n"), "\n")
}

func TestAPanickingMethodIsOneErrorLineWithItsStack(t *testing.T) {
	out := capture(t)
	err := runMethod(func() error { panic("the ledger is gone") })
	if err == nil {
		t.Fatal("a panic must turn into an error")
	}
	got := lines(out)
	if len(got) != 1 {
		t.Fatalf("want one line, got %d: %q", len(got), out.String())
	}
	match := slogLine.FindStringSubmatch(got[0])
	if match == nil || match[1] != "ERROR" {
		t.Fatalf("want a level=ERROR line, got %q", got[0])
	}
	if !strings.Contains(got[0], "method panicked: the ledger is gone") || !strings.Contains(got[0], `stack="goroutine`) {
		t.Fatalf("want the panic and its stack on the line, got %q", got[0])
	}
}

func TestDroppedEventsAreOneWarning(t *testing.T) {
	out := capture(t)
	hub := newEventHub()
	queue := make(chan *pluginpb.PluginEvent, 1)
	hub.subscribers[queue] = 0
	for range 3 {
		hub.publish("tick", []byte("1"))
	}
	got := lines(out)
	if len(got) != 1 {
		t.Fatalf("want one line for a run of drops, got %q", out.String())
	}
	if match := slogLine.FindStringSubmatch(got[0]); match == nil || match[1] != "WARN" {
		t.Fatalf("want a level=WARN line, got %q", got[0])
	}
}
