package plugin

import (
	"encoding/json"
	"sync"

	"github.com/linchkit/dispatcher/sdk/go/internal/pluginpb"
)

// Bounds on events waiting for the host: kept while no host takes them (the host may open
// its Events stream a moment after the first call that emits; a WebSocket host may be
// between two connections), and queued per host that does.
const (
	pendingEventLimit = 1024
	streamQueueLimit  = 1024
	// websocketEventBuffer: the events the WebSocket modes keep while no host is connected,
	// as the Python SDK's max_buffered_events (docs/protocol.md, "Events while
	// disconnected"): the next host gets them and a dropped frame with the count lost.
	websocketEventBuffer = 1000
)

// eventHub fans plugin events out to the hosts that take them: gRPC Events streams or
// WebSocket sessions.
type eventHub struct {
	mu          sync.Mutex
	subscribers map[chan *pluginpb.PluginEvent]int // each host's queue: events it dropped
	pending     []*pluginpb.PluginEvent
	// pendingLimit bounds pending, the oldest dropped past it; lost counts those dropped
	// since a host last took what waited.
	pendingLimit int
	lost         int
}

// subscription is one host's share of the events: those that waited for a host (oldest
// first) and the count lost from them, which it takes before what its queue brings.
type subscription struct {
	queue  chan *pluginpb.PluginEvent
	events []*pluginpb.PluginEvent
	lost   int
}

func newEventHub() *eventHub {
	return &eventHub{subscribers: map[chan *pluginpb.PluginEvent]int{}, pendingLimit: pendingEventLimit}
}

// keepAtMost bounds the events kept while no host takes them to limit, dropping (and
// counting) the oldest of those waiting beyond it.
func (h *eventHub) keepAtMost(limit int) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.pendingLimit = limit
	if over := len(h.pending) - limit; over > 0 {
		h.pending = h.pending[over:]
		h.lost += over
	}
}

func (h *eventHub) publish(name string, data json.RawMessage) {
	event := &pluginpb.PluginEvent{Name: name, DataJson: data}
	h.mu.Lock()
	defer h.mu.Unlock()
	if len(h.subscribers) == 0 {
		if len(h.pending) >= h.pendingLimit {
			h.pending = h.pending[1:]
			h.lost++
		}
		h.pending = append(h.pending, event)
		return
	}
	for queue, dropped := range h.subscribers {
		// Never block a method on a host that does not read its events: past the bound the
		// oldest go, as the WebSocket binding's buffers do, and the first drop of a stream is
		// logged (one line per event flooded stderr with as many lines as a host sent pings).
		for sent := false; !sent; {
			select {
			case queue <- event:
				sent = true
			default:
				select {
				case <-queue:
					if dropped == 0 {
						sdkLog.Warn("linchkit plugin: the host is not reading its Events stream; dropping the oldest events")
					}
					dropped++
					h.subscribers[queue] = dropped
				default:
				}
			}
		}
	}
}

// subscribe opens a queue for one host, which takes the events that waited for a host and
// the count lost from them: the next host to subscribe gets neither.
func (h *eventHub) subscribe() subscription {
	h.mu.Lock()
	defer h.mu.Unlock()
	taken := subscription{queue: make(chan *pluginpb.PluginEvent, streamQueueLimit), events: h.pending, lost: h.lost}
	h.pending, h.lost = nil, 0
	h.subscribers[taken.queue] = 0
	return taken
}

func (h *eventHub) unsubscribe(queue chan *pluginpb.PluginEvent) {
	h.mu.Lock()
	defer h.mu.Unlock()
	delete(h.subscribers, queue)
}
