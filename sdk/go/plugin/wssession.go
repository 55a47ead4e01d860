package plugin

// One WebSocket connection to a host, served the same way in both WebSocket modes
// (docs/protocol.md, "WebSocket binding"): `connect` (wsconnect.go: the plugin dials the
// gateway) and `serve --websocket` (wsserve.go: the dispatcher dials the plugin). A mode
// only opens the connection and hands it to a wsSession; the frames are this file's.
//
// A session says hello (the plugin's id, version and methods, and the largest message it
// reads), runs each call and stream frame on a goroutine of its own (at most maxInFlight
// at once: past them it stops reading, so TCP pushes back on the host), cancels one on
// cancel, answers health, hands host events to the plugin's handlers and sends the
// plugin's events. Calls run through the same invoke/prepare as the gRPC service, so
// errors, deadlines, params and spans read the same; streams wait for the host's credit
// (a window of 256 chunks).
//
// Both sides ping every heartbeat (10 s) and a pong that has not come within half of it
// ends the connection: a half-open one, and a host that stops reading (its pong never
// comes, and the writes waiting for it are cut off with the connection). While
// maxInFlight calls run the session reads nothing, pongs included: a host is then taken
// for gone only once answers wait and none has gone out for 1.5 heartbeats.
//
// Stopping loses no call: on SIGTERM the session says goaway and goes on answering what
// arrives; the host sends nothing new and closes the connection (1000) once its calls are
// answered. After the stop's grace (5 s, unless LINCHKIT_PLUGIN_STOP_GRACE_MS sets it) the
// plugin closes it itself (1001), and a host that does not answer that close within
// closeHandshakeWait is cut off: the stop stays within its caps.
//
// An error frame from the host (it could not use a frame of ours) is never answered, or two
// peers could trade them for ever. It is logged at INFO, the host's message escaped and cut
// as a close reason is: the first loggedHostErrors of a connection, then one line saying
// the rest are not logged, so that a host sending a flood of them does not flood stderr.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"github.com/coder/websocket"

	"github.com/linchkit/dispatcher/sdk/go/internal/pluginpb"
)

const (
	streamWindow       = 256
	maxMessageBytes    = 8 << 20
	websocketHeartbeat = 10 * time.Second
	// maxInFlight calls run at once on one connection; beyond it the session stops reading,
	// so TCP pushes back on the host instead of a goroutine starting per call frame.
	maxInFlight = 1024
	// maxFrameDepth: a call's params may nest MaxParamsDepth levels under the frame's
	// object and its request's.
	maxFrameDepth = MaxParamsDepth + 2
	// closeHandshakeWait is how long a close the plugin sends waits for the host's close
	// frame before the connection is cut: coder/websocket alone waits up to 5 s to write
	// the close and 5 s more for the answer, which a host that neither reads nor closes
	// would have added to every stop, past the operator's caps. The same margin the spans
	// get (spanFlushMargin).
	closeHandshakeWait = time.Second
	// loggedHostErrors: the host's error frames logged on one connection; one line says
	// the rest are not.
	loggedHostErrors = 10
)

type wireContext struct {
	RequestID      string `json:"request_id"`
	DeadlineMs     int64  `json:"deadline_ms"`
	Caller         string `json:"caller"`
	Traceparent    string `json:"traceparent"`
	IdempotencyKey string `json:"idempotency_key"`
}

type wireRequest struct {
	V       uint32          `json:"v"`
	Plugin  string          `json:"plugin"`
	Method  string          `json:"method"`
	Params  json.RawMessage `json:"params"`
	Context wireContext     `json:"context"`
}

type frame struct {
	Type    string          `json:"type"`
	ID      *int64          `json:"id,omitempty"`
	Request json.RawMessage `json:"request,omitempty"`
	N       int             `json:"n,omitempty"`
	Event   string          `json:"event,omitempty"`
	Data    json.RawMessage `json:"data,omitempty"`
	// MaxMessageBytes: the gateway's read cap, in its welcome (wssendcap.go).
	MaxMessageBytes json.RawMessage `json:"max_message_bytes,omitempty"`
	// Error: what an error frame says went wrong.
	Error json.RawMessage `json:"error,omitempty"`
}

// window counts the chunks a stream may still send before the host grants more.
type window struct {
	mu      sync.Mutex
	credit  int
	granted chan struct{}
}

func (w *window) take(ctx context.Context) error {
	for {
		w.mu.Lock()
		if w.credit > 0 {
			w.credit--
			w.mu.Unlock()
			return nil
		}
		granted := w.granted
		w.mu.Unlock()
		select {
		case <-granted:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

func (w *window) grant(n int) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.credit += n
	close(w.granted)
	w.granted = make(chan struct{})
}

// wsSession serves one connection until it closes.
type wsSession struct {
	plugin  *Plugin
	conn    *websocket.Conn
	mu      sync.Mutex
	calls   map[int64]context.CancelFunc
	windows map[int64]*window
	slots   chan struct{} // one per call running: at most maxInFlight
	// welcomed: the gateway accepted the hello; only then the redial backoff resets.
	welcomed bool
	// grace: how long the host has, after goaway, to close the connection (the stop's grace).
	grace time.Duration
	// heartbeat: how often the session pings the host (websocketHeartbeat when 0); a pong
	// not back within half of it ends the connection.
	heartbeat time.Duration
	// abort cuts the connection's transport at once, without a close handshake (the mode
	// knows it: the hijacked or dialled net.Conn); nil when it does not.
	abort func()
	// parked: the reader waits for a call to end (maxInFlight run), so it reads no pong;
	// parks counts the times it began to.
	parked atomic.Bool
	parks  atomic.Int64
	// writing: the sends under way; wrote: when the last one ended, or one began with none
	// under way (Unix nanoseconds).
	writing atomic.Int64
	wrote   atomic.Int64
	// closeCode and closeReason: the host's close frame, once run has returned (-1 and ""
	// when the connection ended without one).
	closeCode   websocket.StatusCode
	closeReason string
	// sendCap: the most bytes a response, chunk or event may have (wssendcap.go); 0 until
	// the host announces a cap. eventOverCap: an event over it
	// was logged on this connection (later ones are not).
	sendCap      atomic.Int64
	eventOverCap atomic.Bool
	// hostErrors: the error frames the host sent (the first loggedHostErrors are logged);
	// the reader's alone.
	hostErrors int
}

// shownReasonBytes is the most of a peer's close reason shown, once escaped: a reason is
// at most 123 bytes, which escaping may make four times longer.
const shownReasonBytes = 200

// shownCloseReason is a close reason the peer sent as an error or a log line may show it:
// every rune that does not print (ESC, a newline, a bidi override, a byte that is not
// UTF-8) escaped as Go writes it (\x1b, \n, \u202e), cut to shownReasonBytes. The peer
// chose those bytes; the operator's terminal must not run them.
func shownCloseReason(reason string) string {
	var shown strings.Builder
	for i, r := range reason {
		switch {
		case r == utf8.RuneError && !strings.HasPrefix(reason[i:], string(utf8.RuneError)):
			fmt.Fprintf(&shown, `\x%02x`, reason[i])
		case strconv.IsPrint(r):
			shown.WriteRune(r)
		default:
			quoted := strconv.QuoteRune(r)
			shown.WriteString(quoted[1 : len(quoted)-1])
		}
		if shown.Len() > shownReasonBytes {
			break
		}
	}
	text := shown.String()
	if len(text) <= shownReasonBytes {
		return text
	}
	cut := shownReasonBytes
	for cut > 0 && !utf8.RuneStart(text[cut]) {
		cut--
	}
	return text[:cut] + "…"
}

// limit: the session's send cap (wssendcap.go).
func (s *wsSession) limit() int64 {
	if limit := s.sendCap.Load(); limit > 0 {
		return limit
	}
	return maxMessageBytes
}

// announce takes a cap the host announced (an upgrade's header, the welcome's field): a
// valid one replaces what an earlier one set (the gateway's welcome, the cap its 101
// announced), the SDK's own cap still the largest; one that is not valid leaves the cap
// as it was.
func (s *wsSession) announce(text string) {
	if limit, ok := announcedCap(text); ok {
		s.sendCap.Store(min(limit, maxMessageBytes))
	}
}

func (s *wsSession) send(ctx context.Context, v any) {
	raw, err := json.Marshal(v)
	if err != nil {
		return
	}
	s.write(ctx, raw)
}

// write sends one message, raw, the frame's JSON text.
func (s *wsSession) write(ctx context.Context, raw []byte) {
	// The host is waited for from the first write after a quiet spell, not from the last
	// one before it: a session whose calls all ran over 1.5 heartbeats took the first of
	// their answers, waiting a moment for a host slow to read, for a stall.
	if s.writing.Load() == 0 {
		s.wrote.Store(time.Now().UnixNano())
	}
	s.writing.Add(1)
	_ = s.conn.Write(ctx, websocket.MessageText, raw)
	s.wrote.Store(time.Now().UnixNano())
	s.writing.Add(-1)
}

// stalled: writes wait, and none has gone out for stallAfter: the host reads nothing.
func (s *wsSession) stalled(stallAfter time.Duration) bool {
	return s.writing.Load() > 0 && time.Since(time.Unix(0, s.wrote.Load())) > stallAfter
}

// run serves the connection until it closes. The end of stopping (SIGTERM) is not the
// connection's: cancelling the calls in flight with it lost them (the host saw 1006 and
// could not tell whether they ran), so goAway hands the connection's end to the host.
func (s *wsSession) run(stopping context.Context) {
	ctx, cancel := context.WithCancel(context.WithoutCancel(stopping))
	defer cancel()
	defer s.conn.CloseNow()
	s.calls = map[int64]context.CancelFunc{}
	s.windows = map[int64]*window{}
	s.slots = make(chan struct{}, maxInFlight)
	s.wrote.Store(time.Now().UnixNano())
	p := s.plugin
	methods, streaming := []string{}, []string{}
	for _, name := range p.order {
		methods = append(methods, name)
		if p.methods[name].stream != nil {
			streaming = append(streaming, name)
		}
	}
	// max_message_bytes: the largest message the session reads, so the host sends no
	// larger call or event (one would close the connection, 1009, under every call on it).
	s.send(ctx, map[string]any{
		"type": "hello", "protocol": ProtocolVersion, "id": p.id, "version": p.version,
		"runtime": p.runtime, "methods": methods, "streaming": streaming,
		"max_message_bytes": maxMessageBytes,
	})
	events := p.events.subscribe()
	defer p.events.unsubscribe(events.queue)
	go s.sendEvents(ctx, events)
	go s.goAway(ctx, stopping)
	heartbeat := s.heartbeat
	if heartbeat <= 0 {
		heartbeat = websocketHeartbeat
	}
	go func() {
		// Keepalive: a half-open connection, or a host that stops reading (its pong never
		// comes), ends within 1.5 heartbeats; cancelling ctx cuts off the writes waiting
		// for it too (coder/websocket closes a connection whose write's context ends).
		// Not by its pong while the reader is parked, or was during the ping: a pong is
		// read only by a Read, and a session full of calls would take a host answering
		// every ping for gone. Then the host is gone when answers wait to go out and none
		// has for 1.5 heartbeats (as in the Python SDK); otherwise the calls end (at their
		// deadlines at the latest), and reading resumes.
		stallAfter := heartbeat * 3 / 2
		ticker := time.NewTicker(heartbeat)
		defer ticker.Stop()
		for {
			select {
			case <-ticker.C:
				if s.parked.Load() {
					if s.stalled(stallAfter) {
						cancel()
						return
					}
					continue
				}
				parks := s.parks.Load()
				pingCtx, done := context.WithTimeout(ctx, heartbeat/2)
				err := s.conn.Ping(pingCtx)
				done()
				if err != nil && ctx.Err() == nil && (s.parked.Load() || s.parks.Load() != parks) &&
					!s.stalled(stallAfter) {
					continue
				}
				if err != nil {
					cancel()
					return
				}
			case <-ctx.Done():
				return
			}
		}
	}()
	for {
		_, data, err := s.conn.Read(ctx)
		if err != nil {
			s.closeCode = websocket.CloseStatus(err)
			var closed websocket.CloseError
			if errors.As(err, &closed) {
				s.closeReason = shownCloseReason(closed.Reason)
			}
			s.mu.Lock()
			for _, stop := range s.calls {
				stop()
			}
			s.mu.Unlock()
			return
		}
		// The params rules of every transport, over the whole frame before encoding/json
		// sees it: it passes 1e400 and "\ud800" through unchanged, which the host could not
		// read back, and would recurse into 100,000 nested brackets.
		if why := checkJSON(data, maxFrameDepth); why != "" {
			s.send(ctx, map[string]any{"type": "error", "error": map[string]any{"type": TypeProviderError, "message": "a frame that " + why}})
			continue
		}
		var f frame
		if err := json.Unmarshal(data, &f); err != nil || f.Type == "" {
			s.send(ctx, map[string]any{"type": "error", "error": map[string]any{"type": TypeProviderError, "message": "a frame that is not a JSON object with a type"}})
			continue
		}
		s.handle(ctx, f)
	}
}

// sendEvents sends the plugin's events until the connection ends: first those that waited
// for a host (the outbox of the Python SDK's EventOutbox) and a dropped frame with the count
// lost from them, if any, then each as it is emitted.
func (s *wsSession) sendEvents(ctx context.Context, events subscription) {
	sendEvent := func(event *pluginpb.PluginEvent) {
		data := json.RawMessage(event.GetDataJson())
		if len(data) == 0 {
			data = json.RawMessage("null")
		}
		raw, err := json.Marshal(map[string]any{"type": "event", "event": event.GetName(), "data": data})
		if err != nil {
			return
		}
		// Over the cap the host would close the connection: the event is not sent, and the
		// method that emitted it is not failed (emit is fire-and-forget).
		if limit := s.limit(); int64(len(raw)) > limit {
			if !s.eventOverCap.Swap(true) {
				sdkLog.Warn(fmt.Sprintf("linchkit plugin: event %s is %d bytes, over the WebSocket message cap of %d bytes: not sent",
					shownBareName(event.GetName()), len(raw), limit))
			}
			return
		}
		s.write(ctx, raw)
	}
	for _, event := range events.events {
		if ctx.Err() != nil {
			return
		}
		sendEvent(event)
	}
	if events.lost > 0 {
		s.send(ctx, map[string]any{"type": "dropped", "count": events.lost})
	}
	for {
		select {
		case event := <-events.queue:
			sendEvent(event)
		case <-ctx.Done():
			return
		}
	}
}

// goAway waits for the plugin to stop, then says goaway and lets the host close the
// connection once its calls are answered: calls it sent before reading the goaway still
// arrive, and are answered. A host that has not closed within the grace (an older one
// does not know goaway) is cut off, as a stop did before.
func (s *wsSession) goAway(ctx, stopping context.Context) {
	select {
	case <-stopping.Done():
	case <-ctx.Done(): // the connection ended first
		return
	}
	s.send(ctx, map[string]any{"type": "goaway"})
	grace := time.NewTimer(s.grace)
	defer grace.Stop()
	select {
	case <-grace.C:
		s.closeWithin(websocket.StatusGoingAway, "the plugin is stopping", closeHandshakeWait)
	case <-ctx.Done():
	}
}

// closeWithin closes the connection with code and reason, and cuts it (abort) when the
// host has not answered the close within wait: one that neither reads nor closes would
// otherwise hold the close, and the stop behind it, for up to 10 s more.
func (s *wsSession) closeWithin(code websocket.StatusCode, reason string, wait time.Duration) {
	closed := make(chan struct{})
	go func() {
		defer close(closed)
		_ = s.conn.Close(code, reason)
	}()
	timer := time.NewTimer(wait)
	defer timer.Stop()
	select {
	case <-closed:
	case <-timer.C:
		if s.abort != nil {
			s.abort()
		} else {
			_ = s.conn.CloseNow()
		}
	}
}

func (s *wsSession) handle(ctx context.Context, f frame) {
	switch f.Type {
	case "call", "stream":
		if f.ID == nil {
			s.send(ctx, map[string]any{"type": "error", "error": map[string]any{"type": TypeProviderError, "message": f.Type + " needs an integer id"}})
			return
		}
		id := *f.ID
		s.mu.Lock()
		_, running := s.calls[id]
		s.mu.Unlock()
		if running { // a second call under one id would take over the first one's answer
			s.send(ctx, map[string]any{"type": "error", "id": id, "error": map[string]any{"type": TypeProviderError, "message": f.Type + " needs a new integer id"}})
			return
		}
		select {
		case s.slots <- struct{}{}:
		default: // full: stop reading until a call ends (parked: no pong is read meanwhile)
			s.parks.Add(1)
			s.parked.Store(true)
			select {
			case s.slots <- struct{}{}:
				s.parked.Store(false)
			case <-ctx.Done():
				return
			}
		}
		callCtx, stop := context.WithCancel(ctx)
		s.mu.Lock()
		s.calls[id] = stop
		var w *window
		if f.Type == "stream" {
			w = &window{credit: streamWindow, granted: make(chan struct{})}
			s.windows[id] = w
		}
		s.mu.Unlock()
		go func() {
			defer func() {
				s.mu.Lock()
				delete(s.calls, id)
				delete(s.windows, id)
				s.mu.Unlock()
				stop()
				<-s.slots
			}()
			s.call(callCtx, ctx, id, f.Request, w)
		}()
	case "cancel":
		if f.ID != nil {
			s.mu.Lock()
			stop := s.calls[*f.ID]
			s.mu.Unlock()
			if stop != nil {
				stop()
			}
		}
	case "credit":
		if f.ID != nil && f.N > 0 {
			s.mu.Lock()
			w := s.windows[*f.ID]
			s.mu.Unlock()
			if w != nil {
				w.grant(f.N)
			}
		}
	case "health":
		s.send(ctx, map[string]any{"type": "health", "id": f.ID, "status": "serving", "detail": ""})
	case "event":
		if handler := s.plugin.handlers[f.Event]; handler != nil {
			data := f.Data
			if len(data) == 0 {
				data = json.RawMessage("null")
			}
			go func() { _ = runMethod(func() error { handler(ctx, data); return nil }) }()
		}
	case "welcome":
		s.welcomed = true
		if len(f.MaxMessageBytes) > 0 {
			s.announce(string(f.MaxMessageBytes))
		}
	case "dropped":
	case "error":
		s.hostError(f.Error)
	default:
		s.send(ctx, map[string]any{"type": "error", "id": f.ID, "error": map[string]any{"type": TypeProviderError, "message": "unknown frame type"}})
	}
}

// hostError logs an error frame: the host could not use a frame of ours (an older one says
// so of goaway). Never answered, or two peers could trade error frames for ever; only the
// first loggedHostErrors of a connection are logged, as the host chooses how many it sends.
func (s *wsSession) hostError(raw json.RawMessage) {
	s.hostErrors++
	switch {
	case s.hostErrors <= loggedHostErrors:
		sdkLog.Info("linchkit plugin: the host could not use a frame: " + shownCloseReason(errorText(raw)))
	case s.hostErrors == loggedHostErrors+1:
		sdkLog.Info(fmt.Sprintf("linchkit plugin: the host sent more than %d error frames on this connection; further ones are not logged",
			loggedHostErrors))
	}
}

// errorText is what an error frame's error says, for the log: its message, an error given
// as a bare string, or else its JSON text (for shownCloseReason to make safe to show).
func errorText(raw json.RawMessage) string {
	switch trimmed := strings.TrimLeft(string(raw), " \t\r\n"); {
	case trimmed == "":
		return "null"
	case trimmed[0] == '"':
		var text string
		if json.Unmarshal(raw, &text) == nil {
			return text
		}
	case trimmed[0] == '{':
		var object struct {
			Message *string `json:"message"`
		}
		if json.Unmarshal(raw, &object) == nil && object.Message != nil {
			return *object.Message
		}
	}
	return string(raw)
}

// call runs one call or stream; callCtx ends with a cancel frame, connCtx with the connection.
func (s *wsSession) call(callCtx, connCtx context.Context, id int64, rawRequest json.RawMessage, w *window) {
	var request wireRequest
	if err := json.Unmarshal(rawRequest, &request); err != nil {
		s.respond(connCtx, id, request.Method, errorReply(&Error{Type: TypeProviderError, Message: "the request is not an envelope: " + err.Error()}))
		return
	}
	req := &pluginpb.CallRequest{
		V: request.V, Plugin: request.Plugin, Method: request.Method, ParamsJson: request.Params,
		Context: &pluginpb.CallContext{
			RequestId: request.Context.RequestID, DeadlineMs: request.Context.DeadlineMs, Caller: request.Context.Caller,
			Traceparent: request.Context.Traceparent, IdempotencyKey: request.Context.IdempotencyKey,
		},
	}
	if w == nil {
		reply := s.plugin.invoke(callCtx, req)
		if errors.Is(callCtx.Err(), context.Canceled) {
			return // the host cancelled it (or the connection ended): nobody waits for an answer
		}
		s.respond(connCtx, id, request.Method, reply)
		return
	}
	ctx, cancel, call, m, callErr := s.plugin.prepare(callCtx, req)
	defer cancel()
	if callErr != nil {
		s.respond(connCtx, id, request.Method, errorReply(callErr))
		return
	}
	// One span for the whole stream, as over gRPC (service.go's CallStream): it ends with
	// the stream's outcome, before the last frame goes out, so a host that read it sees
	// the span ended.
	ctx, span := s.plugin.tracing.start(ctx, s.plugin.id, call)
	// A chunk over the send cap, or one JSON cannot carry, ends the stream with its error,
	// its producer stopped as a cancel stops it (stopProducer), the chunks before it sent.
	ctx, stopProducer := context.WithCancel(ctx)
	defer stopProducer()
	var ended streamFailure
	send := func(chunk any) error {
		if earlier := ended.err(); earlier != nil {
			return earlier
		}
		message, failure := s.chunkFrame(id, request.Method, chunk)
		if failure != nil {
			stopProducer()
			return ended.end(failure)
		}
		if err := w.take(ctx); err != nil {
			return err
		}
		s.write(connCtx, message)
		return nil
	}
	// The stream's failure, whatever the stopped producer returned.
	err := ended.or(m.runStreamed(ctx, call, send))
	if err != nil {
		failure := toError(err)
		endSpan(span, failure)
		if errors.Is(callCtx.Err(), context.Canceled) {
			return // the host cancelled it: nobody waits for an answer
		}
		s.respond(connCtx, id, request.Method, errorReply(failure))
		return
	}
	endSpan(span, nil)
	s.respond(connCtx, id, request.Method, &pluginpb.CallReply{Ok: true, ResultJson: json.RawMessage("null")})
}

// chunkFrame is the frame carrying chunk of stream id (of method), or the error that ends
// the stream in its place: a chunk JSON cannot carry, or a frame over the send cap.
func (s *wsSession) chunkFrame(id int64, method string, chunk any) ([]byte, *Error) {
	raw, notJSON := encodeResult(chunk)
	if notJSON != nil {
		return nil, notJSON
	}
	message, err := json.Marshal(map[string]any{"type": "chunk", "id": id, "data": raw})
	if err != nil { // cannot happen (raw is JSON, id a number); were it to, the stream ends said
		return nil, &Error{Type: TypeProviderError, Message: resultNotJSON + notJSONReason(err)}
	}
	if limit := s.limit(); int64(len(message)) > limit {
		return nil, tooLarge("a chunk of", method, len(message), limit)
	}
	return message, nil
}

// respond answers call id of method with reply; a response over the send cap is replaced
// by a provider_error one (wssendcap.go), so the host keeps the connection.
func (s *wsSession) respond(ctx context.Context, id int64, method string, reply *pluginpb.CallReply) {
	raw, err := json.Marshal(responseFrame(id, reply))
	if err != nil {
		return
	}
	if limit := s.limit(); int64(len(raw)) > limit {
		what := "the result of"
		if !reply.GetOk() {
			what = "the error of"
		}
		raw, err = json.Marshal(responseFrame(id, errorReply(tooLarge(what, method, len(raw), limit))))
		if err != nil {
			return
		}
	}
	s.write(ctx, raw)
}

// responseFrame: the response frame that answers call id with reply.
func responseFrame(id int64, reply *pluginpb.CallReply) map[string]any {
	var response map[string]any
	if reply.GetOk() {
		result := json.RawMessage(reply.GetResultJson())
		if len(result) == 0 {
			result = json.RawMessage("null")
		}
		response = map[string]any{"ok": true, "result": result}
	} else {
		e := reply.GetError()
		wire := map[string]any{"type": e.GetType(), "message": e.GetMessage(), "retryable": e.GetRetryable()}
		if len(e.GetDetailsJson()) > 0 {
			wire["details"] = json.RawMessage(e.GetDetailsJson())
		}
		// +Inf has no JSON form: it would leave the call unanswered (json.Marshal fails).
		if after := e.GetRetryAfter(); after > 0 && !math.IsInf(after, 1) {
			wire["retry_after"] = after
		}
		response = map[string]any{"ok": false, "error": wire}
	}
	return map[string]any{"type": "response", "id": id, "response": response}
}
