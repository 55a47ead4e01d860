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

/// One plugin event, its data as [`Emitter::emit`] vouched for it: what is known of the
/// data's bytes goes with them, so that a WebSocket session does not check them again.
#[derive(Clone, Debug)]
pub(crate) struct Event {
    pub(crate) name: String,
    pub(crate) data: Json,
}

/// One open stream's queue: a broadcast channel of one receiver, because a full one
/// overwrites its oldest event where an mpsc channel refuses the newest.
type Subscriber = broadcast::Sender<Event>;

/// What one `Events` stream sends the host.
pub(crate) type EventStream =
    Pin<Box<dyn Stream<Item = Result<pb::PluginEvent, Status>> + Send + 'static>>;

/// The events a WebSocket session sends ([`Emitter::join`]).
pub(crate) type Events = Pin<Box<dyn Stream<Item = Event> + Send + 'static>>;

#[derive(Default)]
struct Hub {
    subscribers: Vec<Subscriber>,
    pending: VecDeque<Event>,
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

    /// Sends plugin event `name` with `data` to the host over the `Events` stream. Data
    /// JSON cannot carry (a [`Json::raw`] that is no JSON) is not sent, to any host; the SDK
    /// says so on stderr at WARN, once for each such event.
    pub fn emit(&self, name: &str, data: Json) {
        let data = match data.vouched() {
            Ok(data) => data,
            Err(why) => {
                let name = crate::error::quoted_name(name);
                crate::log::warn(&format!(
                    "event {name} not sent: the data of event {name} is not JSON: {why}"
                ));
                return;
            }
        };
        let event = Event {
            name: name.to_string(),
            data,
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
        Box::pin(self.queue().map(|event| {
            Ok(pb::PluginEvent {
                name: event.name,
                data_json: event.data.into_bytes(),
            })
        }))
    }

    /// The queue of one host's events, holding the events that waited for it.
    fn queue(&self) -> impl Stream<Item = Event> + Send + 'static {
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
        BroadcastStream::new(receiver).filter_map(move |item| match item {
            Ok(event) => Some(event),
            Err(BroadcastStreamRecvError::Lagged(_)) => {
                if !std::mem::replace(&mut told, true) {
                    crate::log::warn(
                        "the host is not reading its Events stream; dropping the oldest events",
                    );
                }
                None
            }
        })
    }

    /// A WebSocket session's queue (as [`subscribe`](Emitter::subscribe)'s, of events as
    /// emitted), with how many events wait for it and how many were dropped while no host
    /// listened: it sends the waiting ones, then a `dropped` frame with the count.
    pub(crate) fn join(&self) -> (usize, u64, Events) {
        let (waiting, dropped) = {
            let mut hub = self.0.lock().unwrap();
            (hub.pending.len(), std::mem::take(&mut hub.dropped))
        };
        (waiting, dropped, Box::pin(self.queue()))
    }

    /// Ends every open stream, at shutdown: the host's `Events` calls return.
    pub(crate) fn close(&self) {
        let mut hub = self.0.lock().unwrap();
        hub.closed = true;
        hub.subscribers.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn data_json_cannot_carry_is_not_sent_and_said_once_per_event() {
        crate::log::captured::start();
        let emitter = Emitter::new();
        let mut events = emitter.subscribe();
        emitter.emit("bad", Json::raw(r#"{"x": NaN}"#));
        emitter.emit("bad", Json::raw("[1e400]"));
        emitter.emit("good", Json::raw("[1]"));
        let sent = events.next().await.unwrap().unwrap();
        assert_eq!(
            (sent.name.as_str(), sent.data_json.as_slice()),
            ("good", b"[1]".as_slice())
        );
        let lines = crate::log::captured::lines();
        assert_eq!(lines.len(), 2, "{lines:?}");
        for (line, why) in lines
            .iter()
            .zip(["are not valid JSON", "hold a number beyond"])
        {
            assert!(line.contains(" WARN "), "{line}");
            let said = "event 'bad' not sent: the data of event 'bad' is not JSON: its contents ";
            assert!(line.contains(&format!("{said}{why}")), "{line}");
        }
    }

    #[tokio::test]
    async fn data_with_a_string_that_is_not_valid_unicode_is_not_sent_and_said_once() {
        crate::log::captured::start();
        let emitter = Emitter::new();
        let mut events = emitter.subscribe();
        emitter.emit("lone", Json::raw(r#"{"text": ["smile \ud83d"]}"#));
        emitter.emit("bytes", Json::raw(b"{\"caf\xe9\": 1}".to_vec()));
        emitter.emit("good", Json::raw(r#"["\ud83d\ude00", "\\ud83d"]"#));
        let sent = events.next().await.unwrap().unwrap();
        assert_eq!(
            (sent.name.as_str(), sent.data_json.as_slice()),
            ("good", br#"["\ud83d\ude00", "\\ud83d"]"#.as_slice())
        );
        let lines = crate::log::captured::lines();
        assert_eq!(lines.len(), 2, "{lines:?}");
        for (line, said) in lines.iter().zip([
            "event 'lone' not sent: the data of event 'lone' is not JSON: a string is not valid Unicode (a lone surrogate)",
            "event 'bytes' not sent: the data of event 'bytes' is not JSON: a string is not valid Unicode (bytes that are not UTF-8)",
        ]) {
            assert!(line.contains(" WARN "), "{line}");
            assert!(line.ends_with(said), "{line}");
        }
    }
}
