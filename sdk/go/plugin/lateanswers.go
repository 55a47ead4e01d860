package plugin

// A method runs in the handler that called it, so its call's deadline ends it only if it
// watches its ctx. One that does not (a time.Sleep, a loop that never looks at ctx.Done(),
// a client given context.Background()) answers whenever it is done: the host answered its
// caller deadline_exceeded at the deadline, the work went on for nothing, and nothing said
// why (the host sees timeouts, the plugin a call that succeeded). The SDK now says so,
// once a minute per method, as the Python SDK does (_late_answers.py); the answer itself
// is left as it is.

import (
	"context"
	"fmt"
	"sync"
	"time"
)

const (
	// lateAnswerAfter: how far past its deadline an answer must come to be told of. A
	// method that returns at ctx.Done() is some milliseconds late on a loaded machine;
	// half a second late, it did not watch its ctx.
	lateAnswerAfter = 500 * time.Millisecond
	// lateAnswerEvery: the least time between two warnings about one method, so a method
	// that always overruns does not fill the log.
	lateAnswerEvery = time.Minute
)

// lateAnswers: when each method was last said to have answered late (a Plugin holds one).
// Only a late answer touches it.
type lateAnswers struct {
	mu   sync.Mutex
	said map[string]time.Time
}

// check tells of method's answer, ready now, when it comes more than lateAnswerAfter after
// ctx's deadline: one clock read a call with a deadline, none without.
func (l *lateAnswers) check(ctx context.Context, method string) {
	deadline, ok := ctx.Deadline()
	if !ok {
		return
	}
	now := time.Now()
	if late := now.Sub(deadline); late > lateAnswerAfter {
		l.tell(method, late, now)
	}
}

// tell warns that method answered late past its deadline, unless it was said of method
// less than lateAnswerEvery before now.
func (l *lateAnswers) tell(method string, late time.Duration, now time.Time) {
	l.mu.Lock()
	said, ok := l.said[method]
	if ok && now.Sub(said) < lateAnswerEvery {
		l.mu.Unlock()
		return
	}
	if l.said == nil {
		l.said = map[string]time.Time{}
	}
	l.said[method] = now
	l.mu.Unlock()
	sdkLog.Warn(fmt.Sprintf("linchkit plugin: method '%s' answered %.1f s after its deadline: it went on after its "+
		"context was done (watch ctx.Done() or pass ctx to what it waits on), and its caller had stopped waiting "+
		"(said at most once a minute)", shownBareName(method), late.Seconds()))
}
