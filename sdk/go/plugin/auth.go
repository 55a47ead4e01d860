package plugin

import (
	"context"
	"crypto/subtle"
	"errors"
	"fmt"
	"os"
	"strings"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// The bearer token of service mode (docs/protocol.md, "gRPC binding") and of `serve
// --websocket` (checked on the upgrade, wsserve.go): from a file (a mounted secret) or the
// variable, never from a command-line argument, which `ps` shows.
const (
	EnvToken     = "LINCHKIT_PLUGIN_TOKEN"
	EnvTokenFile = "LINCHKIT_PLUGIN_TOKEN_FILE"
)

// unauthenticatedMessage is all a refused caller learns: never what it sent.
const unauthenticatedMessage = "missing or wrong bearer token"

// bearerToken is what `authorization: Bearer <token>` metadata must carry.
type bearerToken struct{ expected []byte }

func (t *bearerToken) String() string { return "<bearer token (hidden)>" }

// configuredToken reads the token from EnvTokenFile or EnvToken; nil when neither is set.
// Both set is an error, as are an unreadable or empty file and a token that is not
// printable ASCII without spaces. Error messages never quote the token.
func configuredToken(getenv func(string) string) (*bearerToken, error) {
	file, value := getenv(EnvTokenFile), getenv(EnvToken)
	switch {
	case file != "" && value != "":
		return nil, fmt.Errorf("set either %s or %s, not both", EnvTokenFile, EnvToken)
	case file != "":
		text, err := os.ReadFile(file)
		if err != nil {
			var pathErr *os.PathError
			if errors.As(err, &pathErr) {
				err = pathErr.Err
			}
			return nil, fmt.Errorf("cannot read the token file %q: %v", file, err)
		}
		token, err := newBearerToken(string(text))
		if err != nil {
			return nil, fmt.Errorf("the token file %q: %w", file, err)
		}
		return token, nil
	case value != "":
		return newBearerToken(value)
	}
	return nil, nil
}

func newBearerToken(token string) (*bearerToken, error) {
	token = strings.TrimSpace(token)
	if token == "" {
		return nil, errors.New("the bearer token is empty")
	}
	for i := 0; i < len(token); i++ {
		if token[i] < 0x21 || token[i] > 0x7e {
			return nil, errors.New("the bearer token must be printable ASCII without spaces")
		}
	}
	return &bearerToken{expected: []byte("bearer " + token)}, nil
}

// admits tells, in constant time for a given length, whether ctx's metadata carries the token.
func (t *bearerToken) admits(ctx context.Context) bool {
	md, _ := metadata.FromIncomingContext(ctx)
	return t.admitsAuthorization(md.Get("authorization"))
}

// admitsAuthorization tells, in constant time for a given length, whether the values of
// an Authorization header (gRPC metadata or HTTP: the WebSocket upgrade) are exactly one,
// `Bearer <token>`, the scheme in any case.
func (t *bearerToken) admitsAuthorization(values []string) bool {
	if len(values) != 1 {
		return false
	}
	scheme, credentials, _ := strings.Cut(strings.TrimSpace(values[0]), " ")
	presented := []byte(strings.ToLower(scheme) + " " + strings.TrimSpace(credentials))
	return subtle.ConstantTimeCompare(presented, t.expected) == 1
}

// open reports whether a method stays reachable without the token: the health service,
// which orchestrators probe without credentials, and server reflection, which tells only
// the schema that proto/plugin.proto publishes anyway.
func open(fullMethod string) bool {
	for _, prefix := range openPrefixes {
		if strings.HasPrefix(fullMethod, prefix) {
			return true
		}
	}
	return false
}

var openPrefixes = []string{
	"/grpc.health.v1.Health/",
	"/grpc.reflection.v1.ServerReflection/",
	"/grpc.reflection.v1alpha.ServerReflection/",
}

// interceptors refuse every RPC but health's and reflection's with UNAUTHENTICATED unless
// it carries the token.
func (t *bearerToken) interceptors() []grpc.ServerOption {
	unary := func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		if !open(info.FullMethod) && !t.admits(ctx) {
			return nil, status.Error(codes.Unauthenticated, unauthenticatedMessage)
		}
		return handler(ctx, req)
	}
	stream := func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
		if !open(info.FullMethod) && !t.admits(ss.Context()) {
			return status.Error(codes.Unauthenticated, unauthenticatedMessage)
		}
		return handler(srv, ss)
	}
	return []grpc.ServerOption{grpc.ChainUnaryInterceptor(unary), grpc.ChainStreamInterceptor(stream)}
}
