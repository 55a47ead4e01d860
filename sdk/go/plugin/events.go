package plugin

import (
	"encoding/json"
	"sync"

	"github.com/linchkit/dispatcher/sdk/go/internal/pluginpb"
)

// Bounds on events waiting for the host: kept while no Events stream is open (the host
// may open it a moment after the first call that emits), and queued per open stream.
const (
	pendingEventLimit = 1024
	streamQueueLimit  = 1024
)

// eventHub fans plugin events out to the open Events streams.
type eventHub struct {
	mu          sync.Mutex
	subscribers map[chan *pluginpb.PluginEvent]int // each open stream's queue: events it dropped
	pending     []*pluginpb.PluginEvent
}

func newEventHub() *eventHub {
	return &eventHub{subscribers: map[chan *pluginpb.PluginEvent]int{}}
}

func (h *eventHub) publish(name string, data json.RawMessage) {
	event := &pluginpb.PluginEvent{Name: name, DataJson: data}
	h.mu.Lock()
	defer h.mu.Unlock()
	if len(h.subscribers) == 0 {
		if len(h.pending) == pendingEventLimit {
			h.pending = h.pending[1:]
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

// subscribe opens a queue for one Events stream, holding the events that waited for it.
func (h *eventHub) subscribe() chan *pluginpb.PluginEvent {
	h.mu.Lock()
	defer h.mu.Unlock()
	queue := make(chan *pluginpb.PluginEvent, streamQueueLimit+pendingEventLimit)
	for _, event := range h.pending {
		queue <- event
	}
	h.pending = nil
	h.subscribers[queue] = 0
	return queue
}

func (h *eventHub) unsubscribe(queue chan *pluginpb.PluginEvent) {
	h.mu.Lock()
	defer h.mu.Unlock()
	delete(h.subscribers, queue)
}
