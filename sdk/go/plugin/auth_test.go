package plugin

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/linchkit/dispatcher/sdk/go/internal/pluginpb"
)

func TestConfiguredToken(t *testing.T) {
	file := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(file, []byte("  s3cret-from-file\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		vars map[string]string
		want string // "" none, "ok", or a fragment of the error
	}{
		{nil, ""},
		{map[string]string{EnvToken: "s3cret"}, "ok"},
		{map[string]string{EnvTokenFile: file}, "ok"},
		{map[string]string{EnvTokenFile: file, EnvToken: "s3cret"}, "not both"},
		{map[string]string{EnvTokenFile: file + ".missing"}, "cannot read the token file"},
		{map[string]string{EnvToken: "two words"}, "printable ASCII"},
		{map[string]string{EnvToken: "   "}, "empty"},
	}
	for _, c := range cases {
		token, err := configuredToken(func(k string) string { return c.vars[k] })
		switch {
		case c.want == "" && (token != nil || err != nil):
			t.Errorf("%v: token %v, error %v; want none", c.vars, token, err)
		case c.want == "ok" && (token == nil || err != nil):
			t.Errorf("%v: token %v, error %v; want a token", c.vars, token, err)
		case c.want != "" && c.want != "ok" && (err == nil || !strings.Contains(err.Error(), c.want)):
			t.Errorf("%v: error %v; want %q", c.vars, err, c.want)
		}
		if err != nil && strings.Contains(err.Error(), "s3cret") {
			t.Errorf("the error quotes the token: %v", err)
		}
	}
}

func TestServiceModeWithToken(t *testing.T) {
	s := start(t, []string{"serve", "--address", "127.0.0.1:0"}, map[string]string{EnvToken: "s3cret"})
	conn := dial(t, s, insecure.NewCredentials())
	if got := healthOf(t, conn, ""); got != healthpb.HealthCheckResponse_SERVING {
		t.Errorf("health without the token = %v, want SERVING", got)
	}
	client := pluginpb.NewPluginServiceClient(conn)
	withAuth := func(value string) context.Context {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		t.Cleanup(cancel)
		if value == "" {
			return ctx
		}
		return metadata.AppendToOutgoingContext(ctx, "authorization", value)
	}
	for _, value := range []string{"", "Bearer wrong", "Bearer s3cret2", "Basic s3cret", "s3cret"} {
		_, err := client.Describe(withAuth(value), &pluginpb.DescribeRequest{})
		if status.Code(err) != codes.Unauthenticated {
			t.Errorf("Describe with %q: %v, want UNAUTHENTICATED", value, err)
		}
		if value != "" && strings.Contains(status.Convert(err).Message(), value) {
			t.Errorf("the refusal echoes what was sent: %v", err)
		}
		stream, err := client.CallStream(withAuth(value), &pluginpb.CallRequest{V: 1, Method: "echo", ParamsJson: []byte(`1`)})
		if err == nil {
			_, err = stream.Recv()
		}
		if status.Code(err) != codes.Unauthenticated {
			t.Errorf("CallStream with %q: %v, want UNAUTHENTICATED", value, err)
		}
	}
	for _, value := range []string{"Bearer s3cret", "bearer  s3cret "} {
		reply, err := client.Call(withAuth(value), &pluginpb.CallRequest{V: 1, Method: "echo", ParamsJson: []byte(`5`)})
		if err != nil || !reply.Ok || string(reply.ResultJson) != "5" {
			t.Errorf("Call with %q: %v, %v", value, reply, err)
		}
	}
}
