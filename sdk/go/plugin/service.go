package plugin

import (
	"context"
	"encoding/json"
	"fmt"
	"math"
	"runtime/debug"
	"sync"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/linchkit/dispatcher/sdk/go/internal/pluginpb"
)

// ServiceName is the health service name of the plugin service.
const ServiceName = "linchkit.plugin.v1.PluginService"

// service answers the PluginService RPCs for one Plugin.
type service struct {
	pluginpb.UnimplementedPluginServiceServer

	plugin  *Plugin
	health  *health.Server
	closing chan struct{} // closed at shutdown: ends the long-lived Events streams
	// hosts attached now: the last to leave runs the stop and destroy hooks.
	hosts *attachedHosts

	mu        sync.Mutex
	inited    bool
	started   bool
	stopped   bool
	destroyed bool
}

func newService(p *Plugin, servingFromStart bool) *service {
	s := &service{plugin: p, health: health.NewServer(), closing: make(chan struct{}), hosts: newAttachedHosts()}
	s.setServing(servingFromStart)
	return s
}

func (s *service) setServing(serving bool) {
	state := healthpb.HealthCheckResponse_NOT_SERVING
	if serving {
		state = healthpb.HealthCheckResponse_SERVING
	}
	s.health.SetServingStatus("", state)
	s.health.SetServingStatus(ServiceName, state)
}

func (s *service) Describe(context.Context, *pluginpb.DescribeRequest) (*pluginpb.PluginInfo, error) {
	p := s.plugin
	info := &pluginpb.PluginInfo{Id: p.id, Version: p.version, ProtocolVersion: ProtocolVersion, Runtime: p.runtime}
	for _, name := range p.order {
		m := p.methods[name]
		info.Methods = append(info.Methods, &pluginpb.MethodInfo{Name: name, Streaming: m.stream != nil, Description: m.description})
	}
	return info, nil
}

func (s *service) Init(ctx context.Context, req *pluginpb.InitRequest) (_ *pluginpb.LifecycleReply, err error) {
	host, err := hostOf(ctx)
	if err != nil {
		return nil, err
	}
	if !s.hosts.join(host) {
		return nil, status.Errorf(codes.ResourceExhausted, "%d hosts are attached to this service; one more is refused", MaxHosts)
	}
	defer func() { s.hosts.joined(host, err == nil) }()
	config := json.RawMessage(req.GetConfigJson())
	if len(config) == 0 {
		config = json.RawMessage("{}")
	}
	if !json.Valid(config) {
		return nil, status.Error(codes.InvalidArgument, "Init: config_json is not valid JSON")
	}
	s.plugin.setConfig(config)
	if hook := s.plugin.onInit; hook != nil {
		if err := runMethod(func() error { return hook(ctx, config) }); err != nil {
			return nil, hookStatus("init", err)
		}
	}
	s.mark(&s.inited)
	return &pluginpb.LifecycleReply{}, nil
}

func (s *service) Start(ctx context.Context, _ *pluginpb.LifecycleRequest) (*pluginpb.LifecycleReply, error) {
	if _, err := hostOf(ctx); err != nil {
		return nil, err
	}
	if err := s.runLifecycle(ctx, "start", s.plugin.onStart, &s.started); err != nil {
		return nil, err
	}
	s.setServing(true)
	return &pluginpb.LifecycleReply{}, nil
}

func (s *service) Stop(ctx context.Context, _ *pluginpb.LifecycleRequest) (*pluginpb.LifecycleReply, error) {
	if othersStay, err := s.leave(ctx); err != nil {
		return nil, err
	} else if othersStay {
		return &pluginpb.LifecycleReply{}, nil // the plugin goes on serving them
	}
	s.setServing(false)
	if err := s.runLifecycle(ctx, "stop", s.plugin.onStop, &s.stopped); err != nil {
		return nil, err
	}
	return &pluginpb.LifecycleReply{}, nil
}

func (s *service) Destroy(ctx context.Context, _ *pluginpb.LifecycleRequest) (*pluginpb.LifecycleReply, error) {
	if othersStay, err := s.leave(ctx); err != nil {
		return nil, err
	} else if othersStay {
		return &pluginpb.LifecycleReply{}, nil
	}
	if err := s.runLifecycle(ctx, "destroy", s.plugin.onDestroy, &s.destroyed); err != nil {
		return nil, err
	}
	return &pluginpb.LifecycleReply{}, nil
}

// leave takes the calling host out of the attached ones; whether another one stays.
func (s *service) leave(ctx context.Context) (othersStay bool, err error) {
	host, err := hostOf(ctx)
	if err != nil {
		return false, err
	}
	return s.hosts.leave(host), nil
}

func (s *service) runLifecycle(ctx context.Context, name string, hook Hook, done *bool) error {
	if hook != nil {
		if err := runMethod(func() error { return hook(ctx) }); err != nil {
			return hookStatus(name, err)
		}
	}
	s.mark(done)
	return nil
}

func (s *service) mark(flag *bool) {
	s.mu.Lock()
	*flag = true
	s.mu.Unlock()
}

// stopServing reports NOT_SERVING and ends the Events streams, which never end by
// themselves: the first step of a stop, before the calls in flight are drained.
func (s *service) stopServing() {
	s.health.Shutdown()
	close(s.closing)
}

// runRemainingHooks runs the stop and destroy hooks the host did not call, so a plugin
// ended by SIGTERM or by its host's death still cleans up. It comes after the drain: a stop
// hook that closes what the calls use must not pull it from under calls still running.
// Both together get hooksCap (the stop's hooks cap, 5 s unless LINCHKIT_PLUGIN_STOP_HOOKS_MS
// sets it); a hook still running then is abandoned with a warning. It returns what remains
// of hooksCap.
func (s *service) runRemainingHooks(hooksCap time.Duration) time.Duration {
	s.mu.Lock()
	needStop := s.started && !s.stopped
	needDestroy := s.inited && !s.destroyed
	s.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), hooksCap)
	defer cancel()
	hooks := []struct {
		needed bool
		name   string
		hook   Hook
		done   *bool
	}{{needStop, "stop", s.plugin.onStop, &s.stopped}, {needDestroy, "destroy", s.plugin.onDestroy, &s.destroyed}}
	for _, each := range hooks {
		if !each.needed {
			continue
		}
		finished, err := withinCap(ctx, each.name, hooksCap, func() error {
			return s.runLifecycle(ctx, each.name, each.hook, each.done)
		})
		if !finished {
			return 0
		}
		if err != nil {
			sdkLog.Error("linchkit plugin: " + err.Error())
		}
	}
	return timeLeft(ctx)
}

// timeLeft is how long remains until ctx's deadline, 0 when it has passed.
func timeLeft(ctx context.Context) time.Duration {
	deadline, _ := ctx.Deadline()
	return max(time.Until(deadline), 0)
}

// withinCap runs a stop-time hook until ctx is done (hooksCap after the hooks began). A hook that
// ignores its context (stuck on a peer that does not answer) must not keep the process from
// exiting: it is left to its goroutine, which ends with the process, and the hooks after it
// do not run.
func withinCap(ctx context.Context, name string, hooksCap time.Duration, run func() error) (finished bool, err error) {
	done := make(chan error, 1)
	go func() { done <- run() }()
	select {
	case err := <-done:
		return true, err
	case <-ctx.Done():
		sdkLog.Warn(fmt.Sprintf("linchkit plugin: the %s hook did not finish within %s of the stop; exiting without it",
			name, hooksCap))
		return false, nil
	}
}

func (s *service) Call(ctx context.Context, req *pluginpb.CallRequest) (*pluginpb.CallReply, error) {
	return s.plugin.invoke(ctx, req), nil
}

// MaxBatchCalls is the most calls one CallBatch may carry: the dispatcher's batcher sends
// at most this many. Every item runs at once, on a goroutine of its own; a larger batch is
// refused whole before any runs (docs/protocol.md).
const MaxBatchCalls = 10_000

func (s *service) CallBatch(ctx context.Context, req *pluginpb.BatchRequest) (*pluginpb.BatchReply, error) {
	if n := len(req.GetCalls()); n > MaxBatchCalls {
		return nil, status.Errorf(codes.InvalidArgument, "a batch of %d calls is over the limit of %d", n, MaxBatchCalls)
	}
	results := make([]*pluginpb.CallReply, len(req.GetCalls()))
	var wg sync.WaitGroup
	for i, call := range req.GetCalls() {
		wg.Add(1)
		go func() {
			defer wg.Done()
			results[i] = s.plugin.invoke(ctx, call)
		}()
	}
	wg.Wait()
	return &pluginpb.BatchReply{Results: results}, nil
}

func (s *service) CallStream(req *pluginpb.CallRequest, stream pluginpb.PluginService_CallStreamServer) error {
	sendError := func(e *Error) error {
		return stream.Send(&pluginpb.StreamItem{Item: &pluginpb.StreamItem_Error{Error: e.toProto()}})
	}
	ctx, cancel, call, m, callErr := s.plugin.prepare(stream.Context(), req)
	defer cancel()
	if callErr != nil {
		return sendError(callErr)
	}
	ctx, span := s.plugin.tracing.start(ctx, s.plugin.id, call)
	var failure *Error
	defer func() { endSpan(span, failure) }()
	// A chunk JSON cannot carry ends the stream with its error, its producer stopped as a
	// cancel stops it, the chunks before it sent.
	ctx, stopProducer := context.WithCancel(ctx)
	defer stopProducer()
	var ended streamFailure
	send := func(chunk any) error {
		if earlier := ended.err(); earlier != nil {
			return earlier
		}
		raw, notJSON := encodeResult(chunk)
		if notJSON != nil {
			stopProducer()
			return ended.end(notJSON)
		}
		return stream.Send(&pluginpb.StreamItem{Item: &pluginpb.StreamItem_ChunkJson{ChunkJson: raw}})
	}
	err := ended.or(m.runStreamed(ctx, call, send))
	if err != nil {
		failure = toError(err)
		if stream.Context().Err() != nil {
			return status.FromContextError(stream.Context().Err()).Err()
		}
		return sendError(failure)
	}
	return nil
}

func (s *service) Events(stream pluginpb.PluginService_EventsServer) error {
	events := s.plugin.events.subscribe()
	defer s.plugin.events.unsubscribe(events.queue)
	// Headers now: the host knows the stream is registered, so no later emit is lost
	// (docs/protocol.md); grpc-go would otherwise hold them until the first event.
	if err := stream.SendHeader(metadata.MD{}); err != nil {
		return err
	}
	go func() {
		for {
			event, err := stream.Recv()
			if err != nil {
				return
			}
			if handler := s.plugin.handlers[event.GetName()]; handler != nil {
				data := json.RawMessage(event.GetDataJson())
				if len(data) == 0 {
					data = json.RawMessage("null")
				}
				if err := runMethod(func() error { handler(stream.Context(), data); return nil }); err != nil {
					sdkLog.Error("linchkit plugin: the handler of a host event failed", "event", event.GetName(), "err", err)
				}
			}
		}
	}()
	// The events that waited for a host first (gRPC has no frame for the count lost).
	for _, event := range events.events {
		if err := stream.Send(event); err != nil {
			return err
		}
	}
	for {
		select {
		case event := <-events.queue:
			if err := stream.Send(event); err != nil {
				return err
			}
		case <-stream.Context().Done():
			return nil
		case <-s.closing:
			return nil
		}
	}
}

// invoke runs one unary call and never fails: every failure is a CallReply error.
func (p *Plugin) invoke(parent context.Context, req *pluginpb.CallRequest) *pluginpb.CallReply {
	ctx, cancel, call, m, callErr := p.prepare(parent, req)
	defer cancel()
	if callErr != nil {
		return errorReply(callErr)
	}
	ctx, span := p.tracing.start(ctx, p.id, call)
	reply := p.run(ctx, call, m)
	if span != nil {
		var failure *Error
		if e := reply.GetError(); e != nil {
			failure = &Error{Type: e.GetType(), Message: e.GetMessage()}
		}
		endSpan(span, failure)
	}
	return reply
}

// run runs the method of one unary call: its reply, whatever happens. A reply ready long
// after the deadline is told of (lateanswers.go).
func (p *Plugin) run(ctx context.Context, call *Call, m *method) *pluginpb.CallReply {
	var result any
	var err error
	if m.unary != nil {
		err = runMethod(func() (e error) { result, e = m.unary(ctx, call); return e })
	} else {
		result, err = collectChunks(ctx, call, m)
	}
	p.late.check(ctx, call.Method)
	if err != nil {
		return errorReply(toError(err))
	}
	raw, notJSON := encodeResult(result)
	if notJSON != nil {
		return errorReply(notJSON)
	}
	return &pluginpb.CallReply{Ok: true, ResultJson: raw}
}

// collectChunks runs a streaming method called once: the list of its chunks, or the error
// of the first JSON cannot carry (even when the method ignored it and carried on).
func collectChunks(ctx context.Context, call *Call, m *method) ([]json.RawMessage, error) {
	chunks := []json.RawMessage{}
	var ended streamFailure
	err := runMethod(func() error {
		return m.stream(ctx, call, func(chunk any) error {
			if earlier := ended.err(); earlier != nil {
				return earlier
			}
			raw, notJSON := encodeResult(chunk)
			if notJSON != nil {
				return ended.end(notJSON)
			}
			chunks = append(chunks, raw)
			return nil
		})
	})
	return chunks, ended.or(err)
}

// prepare checks the envelope, finds the method, and bounds the context by the call's
// deadline_ms (the gRPC deadline, when the host set one, already bounds it).
func (p *Plugin) prepare(parent context.Context, req *pluginpb.CallRequest) (context.Context, context.CancelFunc, *Call, *method, *Error) {
	ctx, cancel := parent, context.CancelFunc(func() {})
	// Only a positive deadline_ms bounds the call (0 is none). One past ~292 years
	// overflowed time.Duration into a negative timeout and ended the call at once: no
	// clock can hold it, so it is no bound either (docs/protocol.md).
	if ms := req.GetContext().GetDeadlineMs(); ms > 0 && ms <= math.MaxInt64/int64(time.Millisecond) {
		ctx, cancel = context.WithTimeout(parent, time.Duration(ms)*time.Millisecond)
	}
	if v := req.GetV(); v != 0 && v != ProtocolVersion {
		return ctx, cancel, nil, nil, &Error{Type: TypeProviderError, Message: fmt.Sprintf("envelope version %d is not supported; this plugin speaks %d", v, ProtocolVersion)}
	}
	m := p.methods[req.GetMethod()]
	if m == nil {
		return ctx, cancel, nil, nil, p.methodNotFound(req.GetMethod())
	}
	params := json.RawMessage(req.GetParamsJson())
	if len(params) == 0 {
		params = json.RawMessage("null")
	} else if why := checkParams(params); why != "" {
		return ctx, cancel, nil, nil, InvalidParams("params of %s %s", m.name, why)
	}
	c := req.GetContext()
	call := &Call{
		Method: m.name, Params: params, RequestID: c.GetRequestId(), Caller: c.GetCaller(),
		Traceparent: c.GetTraceparent(), IdempotencyKey: c.GetIdempotencyKey(), plugin: p,
	}
	return ctx, cancel, call, m, nil
}

func errorReply(e *Error) *pluginpb.CallReply {
	return &pluginpb.CallReply{Ok: false, Error: e.toProto()}
}

// runStreamed runs m for a stream, over gRPC or WebSocket: a streaming method sends its
// chunks itself, a unary method's result is the one chunk. Its end, or a unary method's
// result, coming long after the deadline is told of (lateanswers.go).
func (m *method) runStreamed(ctx context.Context, call *Call, send func(any) error) error {
	if m.stream != nil {
		err := runMethod(func() error { return m.stream(ctx, call, send) })
		call.plugin.late.check(ctx, call.Method)
		return err
	}
	var result any
	err := runMethod(func() (e error) { result, e = m.unary(ctx, call); return e })
	call.plugin.late.check(ctx, call.Method)
	if err == nil {
		err = send(result)
	}
	return err
}

// runMethod turns a panic in plugin code into an error, so one bad call cannot end the
// plugin.
func runMethod(fn func() error) (err error) {
	defer func() {
		if r := recover(); r != nil {
			sdkLog.Error(fmt.Sprintf("linchkit plugin: method panicked: %v", r), "stack", string(debug.Stack()))
			err = &Error{Type: "PluginError", Message: fmt.Sprintf("method panicked: %v", r)}
		}
	}()
	return fn()
}

func hookStatus(name string, err error) error {
	e := toError(err)
	return status.Errorf(codes.FailedPrecondition, "%s hook failed: %s: %s", name, e.Type, e.Message)
}
