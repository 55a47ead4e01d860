package plugin

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/linchkit/dispatcher/sdk/go/internal/pluginpb"
)

// countingPlugin counts its stop and destroy hooks. Its init hook fails for a config of
// {"fail": true}, and for {"slow": true} only once slowInit is closed (saying first on
// slowStarted that it runs).
type countingPlugin struct {
	*Plugin
	stops, destroys       atomic.Int64
	slowStarted, slowInit chan struct{}
}

func newCountingPlugin() *countingPlugin {
	c := &countingPlugin{Plugin: New("hosts", "0.1.0"), slowStarted: make(chan struct{}, 1), slowInit: make(chan struct{})}
	c.OnInit(func(_ context.Context, config json.RawMessage) error {
		switch string(config) {
		case `{"slow": true}`:
			c.slowStarted <- struct{}{}
			<-c.slowInit
			return NewError("Refused", "this config is refused, slowly")
		case `{"fail": true}`:
			return NewError("Refused", "this config is refused")
		}
		return nil
	})
	c.OnStop(func(context.Context) error { c.stops.Add(1); return nil })
	c.OnDestroy(func(context.Context) error { c.destroys.Add(1); return nil })
	return c
}

func (c *countingPlugin) hooks() string {
	return fmt.Sprintf("stop %d, destroy %d", c.stops.Load(), c.destroys.Load())
}

// as is a context whose RPC names host in linchkit-host ("" sends none).
func as(ctx context.Context, host string) context.Context {
	if host == "" {
		return ctx
	}
	return metadata.AppendToOutgoingContext(ctx, HostMetadata, host)
}

func codeOf(err error) codes.Code { return status.Code(err) }

// In subprocess mode (the host's own process, so one host but maybe several connections)
// the servicer is the same one: a Stop while another host is attached runs nothing.
func TestTheLastHostToLeaveStopsThePlugin(t *testing.T) {
	c := newCountingPlugin()
	s := startPlugin(t, c.Plugin, nil, map[string]string{
		EnvMagicCookie: MagicCookieValue, EnvNetwork: "unix", EnvSocketDir: t.TempDir(),
	})
	conn := dial(t, s, insecure.NewCredentials())
	client := pluginpb.NewPluginServiceClient(conn)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for _, host := range []string{"first", "second", ""} {
		if _, err := client.Init(as(ctx, host), &pluginpb.InitRequest{ConfigJson: []byte(`{}`)}); err != nil {
			t.Fatalf("Init from %q: %v", host, err)
		}
	}
	if _, err := client.Start(as(ctx, "first"), &pluginpb.LifecycleRequest{}); err != nil {
		t.Fatal(err)
	}
	for _, host := range []string{"second", ""} {
		if _, err := client.Stop(as(ctx, host), &pluginpb.LifecycleRequest{}); err != nil {
			t.Fatalf("Stop from %q: %v", host, err)
		}
		if _, err := client.Destroy(as(ctx, host), &pluginpb.LifecycleRequest{}); err != nil {
			t.Fatalf("Destroy from %q: %v", host, err)
		}
	}
	if got := c.hooks(); got != "stop 0, destroy 0" {
		t.Errorf("after two of three hosts left: %s, want no hook run", got)
	}
	if got := healthOf(t, conn, ServiceName); got != healthpb.HealthCheckResponse_SERVING {
		t.Errorf("health while a host stays = %v, want SERVING", got)
	}
	if _, err := client.Stop(as(ctx, "first"), &pluginpb.LifecycleRequest{}); err != nil {
		t.Fatal(err)
	}
	if got := healthOf(t, conn, ServiceName); got != healthpb.HealthCheckResponse_NOT_SERVING {
		t.Errorf("health after the last host's Stop = %v, want NOT_SERVING", got)
	}
	if _, err := client.Destroy(as(ctx, "first"), &pluginpb.LifecycleRequest{}); err != nil {
		t.Fatal(err)
	}
	if got := c.hooks(); got != "stop 1, destroy 1" {
		t.Errorf("after the last host left: %s, want each hook once", got)
	}
}

func TestHostIDsOffTheContractAreRefusedUnquoted(t *testing.T) {
	c := newCountingPlugin()
	s := startPlugin(t, c.Plugin, []string{"serve", "--address", "127.0.0.1:0"}, nil)
	client := pluginpb.NewPluginServiceClient(dial(t, s, insecure.NewCredentials()))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := client.Init(ctx, &pluginpb.InitRequest{}); err != nil {
		t.Fatal(err)
	}
	steps := map[string]func(context.Context) error{
		"Init": func(ctx context.Context) error {
			_, err := client.Init(ctx, &pluginpb.InitRequest{ConfigJson: []byte(`{"fail": true}`)})
			return err
		},
		"Start": func(ctx context.Context) error { _, err := client.Start(ctx, &pluginpb.LifecycleRequest{}); return err },
		"Stop":  func(ctx context.Context) error { _, err := client.Stop(ctx, &pluginpb.LifecycleRequest{}); return err },
		"Destroy": func(ctx context.Context) error {
			_, err := client.Destroy(ctx, &pluginpb.LifecycleRequest{})
			return err
		},
	}
	for _, host := range []string{strings.Repeat("x", 65), "bad id", "", "a/b", "key:value"} {
		for name, step := range steps {
			err := step(metadata.AppendToOutgoingContext(ctx, HostMetadata, host))
			if codeOf(err) != codes.InvalidArgument {
				t.Errorf("%s from %q: %v, want INVALID_ARGUMENT", name, host, err)
			} else if msg := status.Convert(err).Message(); msg != "linchkit-host must be 1-64 of A-Z a-z 0-9 . _ -" {
				t.Errorf("%s from %q: message %q", name, host, msg)
			}
		}
	}
	if got := c.hooks(); got != "stop 0, destroy 0" {
		t.Errorf("after refused ids: %s, want no hook run", got)
	}
	for _, host := range []string{strings.Repeat("x", 64), "A.b_c-9"} {
		if !validHostID(host) {
			t.Errorf("%q refused, want accepted", host)
		}
	}
}

// An Init running holds its host's place: with 1,023 hosts attached and one more
// initialising, a third is refused, and gets in once the slow one fails.
func TestAServiceTracksAtMost1024Hosts(t *testing.T) {
	c := newCountingPlugin()
	s := startPlugin(t, c.Plugin, []string{"serve", "--address", "127.0.0.1:0"}, nil)
	client := pluginpb.NewPluginServiceClient(dial(t, s, insecure.NewCredentials()))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	init := func(host, config string) error {
		_, err := client.Init(as(ctx, host), &pluginpb.InitRequest{ConfigJson: []byte(config)})
		return err
	}
	for i := range MaxHosts - 1 {
		if err := init(fmt.Sprintf("h%d", i), `{}`); err != nil {
			t.Fatalf("Init of host %d: %v", i, err)
		}
	}
	slow := make(chan error, 1)
	go func() { slow <- init("slow", `{"slow": true}`) }()
	<-c.slowStarted
	if code := codeOf(init("one-more", `{}`)); code != codes.ResourceExhausted {
		t.Fatalf("Init past 1,024 hosts, one of them initialising: %v, want RESOURCE_EXHAUSTED", code)
	}
	if err := init("h0", `{}`); err != nil {
		t.Errorf("Init again from an attached host: %v, want OK", err)
	}
	close(c.slowInit)
	if err := <-slow; codeOf(err) != codes.FailedPrecondition {
		t.Fatalf("the slow Init: %v, want its hook's failure", err)
	}
	if err := init("one-more", `{}`); err != nil {
		t.Errorf("Init once the failed host gave its place back: %v", err)
	}
	if code := codeOf(init("two-more", `{}`)); code != codes.ResourceExhausted {
		t.Errorf("Init of host 1,025: %v, want RESOURCE_EXHAUSTED", code)
	}
}

// gRPC runs lifecycle RPCs concurrently: hosts joining and leaving at once keep the count.
func TestHostsJoiningAndLeavingAtOnce(t *testing.T) {
	hosts := newAttachedHosts()
	var wg sync.WaitGroup
	for i := range 2 * MaxHosts {
		wg.Add(1)
		go func() {
			defer wg.Done()
			host := fmt.Sprintf("h%d", i)
			if hosts.join(host) {
				hosts.joined(host, true)
				if i%2 == 0 {
					hosts.leave(host)
				}
			}
		}()
	}
	wg.Wait()
	if hosts.attached > MaxHosts || len(hosts.places) != hosts.attached {
		t.Fatalf("%d attached, %d places: want at most %d, one place each", hosts.attached, len(hosts.places), MaxHosts)
	}
	if hosts.leave("nobody") != (hosts.attached > 0) {
		t.Error("leave of an unknown host changed the count")
	}
}
