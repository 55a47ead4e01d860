package plugin

import (
	"bytes"
	"context"
	"io"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/coder/websocket"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/linchkit/dispatcher/sdk/go/internal/pluginpb"
)

// A method that ignores its ctx answers whenever it is done, long after its caller stopped
// waiting at the deadline; the SDK says so, once a minute per method, and leaves the answer
// as it was. Before, nothing said it (every transport answered late, silently).

// overrun: how long the methods that ignore their ctx take, against a 100 ms deadline.
const overrun = 800 * time.Millisecond

// latePlugin is testPlugin with unary methods that ignore their ctx (one per name, as a
// method is told of once a minute) and a streaming one that does.
func latePlugin(unary ...string) *Plugin {
	p := testPlugin()
	for _, name := range unary {
		p.Method(name, "", func(context.Context, *Call) (any, error) { time.Sleep(overrun); return "done", nil })
	}
	p.StreamingMethod("overstreams", "", func(_ context.Context, _ *Call, send func(any) error) error {
		time.Sleep(overrun)
		return send("done")
	})
	return p
}

// lockedLog is sdkLog's buffer for a test that reads it while a plugin may still write:
// a call whose caller stopped waiting goes on in the plugin.
type lockedLog struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (l *lockedLog) Write(b []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.Write(b)
}

func (l *lockedLog) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.String()
}

// captureLocked points sdkLog at a lockedLog for one test.
func captureLocked(t *testing.T) *lockedLog {
	t.Helper()
	out := &lockedLog{}
	saved := sdkLog
	sdkLog = newLogger(out)
	t.Cleanup(func() { sdkLog = saved })
	return out
}

var lateAnswerWords = regexp.MustCompile(`^time=\S+ level=WARN msg="linchkit plugin: method '([^']*)' answered ([0-9]+\.[0-9]) s ` +
	`after its deadline: it went on after its context was done \(watch ctx\.Done\(\) or pass ctx to what it waits on\), ` +
	`and its caller had stopped waiting \(said at most once a minute\)"$`)

// lateAnswersSaid: the methods the log says answered late, in its order; a line in other
// words, or a lateness that is not the overrun's, fails the test.
func lateAnswersSaid(t *testing.T, out interface{ String() string }) []string {
	t.Helper()
	var methods []string
	for _, line := range strings.Split(out.String(), "\n") {
		if !strings.Contains(line, "after its deadline") {
			continue
		}
		match := lateAnswerWords.FindStringSubmatch(line)
		if match == nil {
			t.Fatalf("log line %q, not in the words of a late answer", line)
		}
		if late, _ := strconv.ParseFloat(match[2], 64); late < 0.5 || late > 5 {
			t.Fatalf("log line %q: want about 0.7 s late", line)
		}
		methods = append(methods, match[1])
	}
	return methods
}

// waitSaid waits until the log has told of want (the methods, in order), or fails.
func waitSaid(t *testing.T, out interface{ String() string }, want ...string) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		got := lateAnswersSaid(t, out)
		if strings.Join(got, ",") == strings.Join(want, ",") {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("late answers told of: %q, want %q", got, want)
		}
	}
}

// within: a call's context with deadline_ms ms (0: none).
func within(ms int64) *pluginpb.CallContext {
	return &pluginpb.CallContext{RequestId: "r1", DeadlineMs: ms}
}

// Over gRPC, deadline_ms 100 and a method sleeping 800 ms: answered as before, and told of
// once, naming the method; again within the minute, answered and not told of again.
func TestALateAnswerIsToldOfOnceAMinuteOverGRPC(t *testing.T) {
	out := captureLocked(t)
	s := startPlugin(t, latePlugin("overruns"), []string{"serve", "--address", "127.0.0.1:0"}, nil)
	client := pluginpb.NewPluginServiceClient(dial(t, s, insecure.NewCredentials()))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for i := range 2 {
		reply, err := client.Call(ctx, &pluginpb.CallRequest{V: 1, Method: "overruns", Context: within(100)})
		if err != nil || !reply.Ok || string(reply.ResultJson) != `"done"` {
			t.Fatalf("call %d: %v, %v; want its answer as before", i+1, reply, err)
		}
		if got := lateAnswersSaid(t, out); len(got) != 1 || got[0] != "overruns" {
			t.Fatalf("after call %d: told of %q, want overruns once", i+1, got)
		}
	}
}

// Every other gRPC way a method answers late is told of too: under the gRPC deadline alone
// (its caller got DEADLINE_EXCEEDED on time, the method went on), an item of a batch (the
// batch answered as before), a unary method over CallStream, a streaming method's end.
func TestEveryGRPCWayOfAnsweringLateIsToldOf(t *testing.T) {
	out := captureLocked(t)
	s := startPlugin(t, latePlugin("grpcbound", "batched", "streamed"), []string{"serve", "--address", "127.0.0.1:0"}, nil)
	client := pluginpb.NewPluginServiceClient(dial(t, s, insecure.NewCredentials()))

	bound, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	_, err := client.Call(bound, &pluginpb.CallRequest{V: 1, Method: "grpcbound"})
	cancel()
	if status.Code(err) != codes.DeadlineExceeded {
		t.Fatalf("under a gRPC deadline: %v, want DEADLINE_EXCEEDED at it", err)
	}
	waitSaid(t, out, "grpcbound")

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	batch, err := client.CallBatch(ctx, &pluginpb.BatchRequest{Calls: []*pluginpb.CallRequest{
		{V: 1, Method: "batched", Context: within(100)},
		{V: 1, Method: "batched", Context: within(100)},
		{V: 1, Method: "echo", ParamsJson: []byte(`1`), Context: within(5000)},
	}})
	if err != nil || len(batch.Results) != 3 || !batch.Results[0].Ok || !batch.Results[1].Ok || !batch.Results[2].Ok {
		t.Fatalf("the batch: %v, %v; want every item answered as before", batch, err)
	}
	waitSaid(t, out, "grpcbound", "batched")

	for _, method := range []string{"streamed", "overstreams"} {
		stream, err := client.CallStream(ctx, &pluginpb.CallRequest{V: 1, Method: method, Context: within(100)})
		if err != nil {
			t.Fatal(err)
		}
		var chunks []string
		for {
			item, err := stream.Recv()
			if err == io.EOF {
				break
			}
			if err != nil {
				t.Fatalf("CallStream %s: %v", method, err)
			}
			chunks = append(chunks, string(item.GetChunkJson()))
		}
		if len(chunks) != 1 || chunks[0] != `"done"` {
			t.Fatalf("CallStream %s: chunks %q, want the one as before", method, chunks)
		}
	}
	waitSaid(t, out, "grpcbound", "batched", "streamed", "overstreams")
}

// Over `serve --websocket`: a call and a stream answered late are answered as before and
// told of; a call the host cancelled at its deadline is not answered, and told of as well
// (the method went on for nothing).
func TestALateAnswerIsToldOfOverWebSocket(t *testing.T) {
	out := captureLocked(t)
	url, stop, ended := servedPlugin(t, latePlugin("overruns", "cancelled"), nil)
	host := dialServed(t, url, nil)
	if f := readFrame(t, host); f["type"] != "hello" {
		t.Fatalf("the first frame: %v, want hello", f)
	}
	writeFrame(t, host, `{"type":"call","id":1,"request":{"v":1,"plugin":"test","method":"overruns","params":null,"context":{"deadline_ms":100}}}`)
	if f := readFrame(t, host); f["type"] != "response" || f["id"] != 1.0 || f["response"].(map[string]any)["result"] != "done" {
		t.Fatalf("the late call: %v, want its answer as before", f)
	}
	writeFrame(t, host, `{"type":"stream","id":2,"request":{"v":1,"plugin":"test","method":"overstreams","params":null,"context":{"deadline_ms":100}}}`)
	if f := readFrame(t, host); f["type"] != "chunk" || f["data"] != "done" {
		t.Fatalf("the late stream's chunk: %v, want it as before", f)
	}
	if f := readFrame(t, host); f["type"] != "response" || f["id"] != 2.0 || f["response"].(map[string]any)["ok"] != true {
		t.Fatalf("the late stream's end: %v, want it as before", f)
	}
	waitSaid(t, out, "overruns", "overstreams")

	writeFrame(t, host, `{"type":"call","id":3,"request":{"v":1,"plugin":"test","method":"cancelled","params":null,"context":{"deadline_ms":100}}}`)
	time.Sleep(100 * time.Millisecond)
	writeFrame(t, host, `{"type":"cancel","id":3}`)
	waitSaid(t, out, "overruns", "overstreams", "cancelled")

	stop()
	if f := readFrame(t, host); f["type"] != "goaway" {
		t.Fatalf("after the stop: %v, want goaway (the cancelled call unanswered)", f)
	}
	_ = host.Close(websocket.StatusNormalClosure, "")
	waitRunEnded(t, ended, 10*time.Second)
}

// Only the late answer is told of: not a method in time, not one that returns at its
// ctx.Done() (unary or streaming, over Call and CallStream), not one a little late, not
// one without a deadline however long it takes.
func TestOnlyAnAnswerLongAfterItsDeadlineIsToldOf(t *testing.T) {
	out := captureLocked(t)
	p := latePlugin("overruns", "undeadlined", "nearly")
	p.StreamingMethod("streamwaits", "", func(ctx context.Context, _ *Call, _ func(any) error) error {
		<-ctx.Done()
		return ctx.Err()
	})
	s := startPlugin(t, p, []string{"serve", "--address", "127.0.0.1:0"}, nil)
	client := pluginpb.NewPluginServiceClient(dial(t, s, insecure.NewCredentials()))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	calls := []struct {
		ctx     context.Context
		request *pluginpb.CallRequest
		ok      bool
	}{
		{ctx, &pluginpb.CallRequest{V: 1, Method: "echo", ParamsJson: []byte(`1`), Context: within(5000)}, true},
		{ctx, &pluginpb.CallRequest{V: 1, Method: "count", Context: within(5000)}, true},
		{ctx, &pluginpb.CallRequest{V: 1, Method: "waits", Context: within(100)}, false},
		{ctx, &pluginpb.CallRequest{V: 1, Method: "streamwaits", Context: within(100)}, false},
		{ctx, &pluginpb.CallRequest{V: 1, Method: "nearly", Context: within(overrun.Milliseconds() - 200)}, true},
		// Neither deadline_ms nor a gRPC deadline.
		{context.Background(), &pluginpb.CallRequest{V: 1, Method: "undeadlined", Context: within(0)}, true},
		{ctx, &pluginpb.CallRequest{V: 1, Method: "overruns", Context: within(100)}, true},
	}
	for _, c := range calls {
		reply, err := client.Call(c.ctx, c.request)
		if err != nil || reply.Ok != c.ok {
			t.Fatalf("%s: %v, %v; want ok %t", c.request.Method, reply, err, c.ok)
		}
	}
	stream, err := client.CallStream(ctx, &pluginpb.CallRequest{V: 1, Method: "waits", Context: within(100)})
	if err != nil {
		t.Fatal(err)
	}
	if item, err := stream.Recv(); err != nil || item.GetError().GetType() != TypeDeadlineExceeded {
		t.Fatalf("CallStream waits: %v, %v; want deadline_exceeded", item, err)
	}
	if got := lateAnswersSaid(t, out); len(got) != 1 || got[0] != "overruns" {
		t.Fatalf("told of %q, want overruns alone", got)
	}
}

// In process too: a streaming method called once, its chunks collected, that ends late.
func TestACollectedStreamEndingLateIsToldOf(t *testing.T) {
	out := capture(t)
	if reply := call(t, latePlugin(), "overstreams", `{}`, 100); !reply.Ok || string(reply.ResultJson) != `["done"]` {
		t.Fatalf("overstreams: %v, want its chunks as before", reply)
	}
	if got := lateAnswersSaid(t, out); len(got) != 1 || got[0] != "overstreams" {
		t.Fatalf("told of %q, want overstreams", got)
	}
}

// A method is told of again once a minute has passed, and each method on its own clock.
func TestALateMethodIsToldOfAgainAfterAMinute(t *testing.T) {
	out := capture(t)
	var late lateAnswers
	start := time.Now()
	for _, at := range []struct {
		method string
		after  time.Duration
	}{
		{"slow", 0},
		{"slow", 59 * time.Second},
		{"other", 59 * time.Second},
		{"slow", 61 * time.Second},
	} {
		late.tell(at.method, 700*time.Millisecond, start.Add(at.after))
	}
	if got := strings.Join(lateAnswersSaid(t, out), ","); got != "slow,other,slow" {
		t.Fatalf("told of %q, want slow, other, slow again after the minute", got)
	}
}
