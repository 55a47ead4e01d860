//! Plugin events fanned out to the host's open `Events` streams.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;
use tonic::Status;

use crate::{pb, Json};

/// Events emitted while no stream is open are kept, up to this many, for the host may open
/// its stream a moment after the first call that emits; and each open stream queues at
/// most this many before new events are dropped (a method never waits on a slow host).
const EVENT_LIMIT: usize = 1024;

type Subscriber = mpsc::Sender<Result<pb::PluginEvent, Status>>;

#[derive(Default)]
struct Hub {
    subscribers: Vec<Subscriber>,
    pending: VecDeque<pb::PluginEvent>,
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
        hub.subscribers.retain(|queue| !queue.is_closed());
        if hub.subscribers.is_empty() {
            if hub.pending.len() == EVENT_LIMIT {
                hub.pending.pop_front();
            }
            hub.pending.push_back(event);
            return;
        }
        for queue in &hub.subscribers {
            if queue.try_send(Ok(event.clone())).is_err() {
                eprintln!("linchkit plugin: host is not reading events, dropped {name:?}");
            }
        }
    }

    /// Opens the queue of one `Events` stream, holding the events that waited for it.
    pub(crate) fn subscribe(&self) -> mpsc::Receiver<Result<pb::PluginEvent, Status>> {
        let (sender, receiver) = mpsc::channel(2 * EVENT_LIMIT);
        let mut hub = self.0.lock().unwrap();
        for event in hub.pending.drain(..) {
            let _ = sender.try_send(Ok(event));
        }
        if !hub.closed {
            hub.subscribers.push(sender);
        }
        receiver
    }

    /// Ends every open stream, at shutdown: the host's `Events` calls return.
    pub(crate) fn close(&self) {
        let mut hub = self.0.lock().unwrap();
        hub.closed = true;
        hub.subscribers.clear();
    }
}
