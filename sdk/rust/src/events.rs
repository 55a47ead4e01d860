//! Plugin events fanned out to the host's open `Events` streams.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use tokio::sync::broadcast;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::{Stream, StreamExt};
use tonic::Status;

use crate::{pb, Json};

/// Events emitted while no stream is open are kept, up to this many, for the host may open
/// its stream a moment after the first call that emits; and each open stream holds at
/// most this many while its host does not read, the oldest dropped first (a method never
/// waits on a slow host; docs/protocol.md).
const EVENT_LIMIT: usize = 1024;

/// One open stream's queue: a broadcast channel of one receiver, because a full one
/// overwrites its oldest event where an mpsc channel refuses the newest.
type Subscriber = broadcast::Sender<pb::PluginEvent>;

/// What one `Events` stream sends the host.
pub(crate) type EventStream =
    Pin<Box<dyn Stream<Item = Result<pb::PluginEvent, Status>> + Send + 'static>>;

#[derive(Default)]
struct Hub {
    subscribers: Vec<Subscriber>,
    pending: VecDeque<pb::PluginEvent>,
    /// Events dropped from `pending` since a WebSocket session last said how many
    /// (`dropped` frame); the gRPC binding has no frame for it.
    dropped: u64,
    closed: bool,
}

/// Sends plugin events to the host. Cheap to clone.
#[derive(Clone, Default)]
pub struct Emitter(Arc<Mutex<Hub>>);

impl Emitter {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Sends plugin event `name` with `data` to the host over the `Events` stream.
    pub fn emit(&self, name: &str, data: Json) {
        let event = pb::PluginEvent {
            name: name.to_string(),
            data_json: data.into_bytes(),
        };
        let mut hub = self.0.lock().unwrap();
        hub.subscribers.retain(|queue| queue.receiver_count() > 0);
        if hub.subscribers.is_empty() {
            if hub.pending.len() == EVENT_LIMIT {
                hub.pending.pop_front();
                hub.dropped += 1;
            }
            hub.pending.push_back(event);
            return;
        }
        for queue in &hub.subscribers {
            let _ = queue.send(event.clone());
        }
    }

    /// Opens the queue of one `Events` stream, holding the events that waited for it.
    pub(crate) fn subscribe(&self) -> EventStream {
        let (sender, receiver) = broadcast::channel(EVENT_LIMIT);
        let mut hub = self.0.lock().unwrap();
        for event in hub.pending.drain(..) {
            let _ = sender.send(event);
        }
        if !hub.closed {
            hub.subscribers.push(sender);
        }
        // A lagging host lost the oldest events: said once per stream, not once per event
        // (a line per event flooded stderr with as many lines as a host sent pings).
        let mut told = false;
        Box::pin(
            BroadcastStream::new(receiver).filter_map(move |item| match item {
                Ok(event) => Some(Ok(event)),
                Err(BroadcastStreamRecvError::Lagged(_)) => {
                    if !std::mem::replace(&mut told, true) {
                        crate::log::warn(
                            "the host is not reading its Events stream; dropping the oldest events",
                        );
                    }
                    None
                }
            }),
        )
    }

    /// A WebSocket session's queue ([`subscribe`](Emitter::subscribe)), with how many
    /// events wait for it and how many were dropped while no host listened: it sends the
    /// waiting ones, then a `dropped` frame with the count.
    pub(crate) fn join(&self) -> (usize, u64, EventStream) {
        let (waiting, dropped) = {
            let mut hub = self.0.lock().unwrap();
            (hub.pending.len(), std::mem::take(&mut hub.dropped))
        };
        (waiting, dropped, self.subscribe())
    }

    /// Ends every open stream, at shutdown: the host's `Events` calls return.
    pub(crate) fn close(&self) {
        let mut hub = self.0.lock().unwrap();
        hub.closed = true;
        hub.subscribers.clear();
    }
}
