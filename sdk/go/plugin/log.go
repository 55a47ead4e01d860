package plugin

import (
	"io"
	"log/slog"
	"os"
)

// sdkLog writes the SDK's own lines (start-up, a failed handler, dropped events,
// shutdown) to stderr in log/slog's text form, one line a record, the level first after
// the time:
//
//	time=2026-12-04T00:10:00.000Z level=WARN msg="linchkit plugin: the host is not reading its Events stream; dropping the oldest events"
//
// A host reading a subprocess plugin's stderr logs each line at the level it carries
// (level=WARN stays a warning there, not INFO); a newline inside a message or an
// attribute (a panic's stack) is quoted, so a record never spills onto lines without one.
var sdkLog = newLogger(os.Stderr)

// newLogger is sdkLog's form on any writer (tests read it from a buffer).
func newLogger(w io.Writer) *slog.Logger {
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: slog.LevelInfo}))
}
