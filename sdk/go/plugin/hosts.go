package plugin

import (
	"context"
	"sync"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// The hosts attached to a plugin service at once (docs/protocol.md, "Several hosts on one
// service"): the replicas of a dispatcher, or one dispatcher and the next in a rolling
// restart. Each names itself with the linchkit-host metadata on lifecycle RPCs; the
// plugin's stop and destroy hooks run only when the last of them leaves, so no host's
// Stop runs under another's calls. RPCs without it count as one host whose id is empty.

// HostMetadata is the lifecycle RPC metadata naming the host that sends it.
const HostMetadata = "linchkit-host"

// MaxHosts is the most hosts a service tracks: an Init from one more is refused with
// RESOURCE_EXHAUSTED, and the hosts it has stay served.
const MaxHosts = 1024

const maxHostIDLength = 64

// hostOf is the calling host's id, "" when it sent none. An id off the contract is
// INVALID_ARGUMENT; the message does not quote it.
func hostOf(ctx context.Context) (string, error) {
	md, _ := metadata.FromIncomingContext(ctx)
	values := md.Get(HostMetadata)
	if len(values) == 0 {
		return "", nil
	}
	if !validHostID(values[0]) {
		return "", status.Error(codes.InvalidArgument, HostMetadata+" must be 1-64 of A-Z a-z 0-9 . _ -")
	}
	return values[0], nil
}

func validHostID(id string) bool {
	if len(id) == 0 || len(id) > maxHostIDLength {
		return false
	}
	for _, c := range []byte(id) {
		ok := 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '.' || c == '_' || c == '-'
		if !ok {
			return false
		}
	}
	return true
}

// attachedHosts holds the hosts whose Init succeeded and that have not sent Stop or
// Destroy since. gRPC runs handlers concurrently, so a host whose Init is running already
// holds a place: concurrent Inits cannot push the set past MaxHosts.
type attachedHosts struct {
	mu       sync.Mutex
	places   map[string]*hostPlace
	attached int
}

type hostPlace struct {
	attached bool
	joining  int // Inits of this host running now
}

func newAttachedHosts() *attachedHosts {
	return &attachedHosts{places: map[string]*hostPlace{}}
}

// join holds a place for host while its Init runs; false when MaxHosts others hold
// theirs. Every true is followed by one joined.
func (a *attachedHosts) join(host string) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	place := a.places[host]
	if place == nil {
		if len(a.places) >= MaxHosts {
			return false
		}
		place = &hostPlace{}
		a.places[host] = place
	}
	place.joining++
	return true
}

// joined ends an Init of host: attached when it succeeded, its place given back otherwise.
func (a *attachedHosts) joined(host string, succeeded bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	place := a.places[host]
	place.joining--
	if succeeded && !place.attached {
		place.attached = true
		a.attached++
	}
	a.forgetIfIdle(host, place)
}

// leave takes host out (its Stop or Destroy) and says whether another host is still
// attached: then the plugin goes on serving it and the RPC runs nothing.
func (a *attachedHosts) leave(host string) (othersStay bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if place := a.places[host]; place != nil {
		if place.attached {
			place.attached = false
			a.attached--
		}
		a.forgetIfIdle(host, place)
	}
	return a.attached > 0
}

func (a *attachedHosts) forgetIfIdle(host string, place *hostPlace) {
	if !place.attached && place.joining == 0 {
		delete(a.places, host)
	}
}
