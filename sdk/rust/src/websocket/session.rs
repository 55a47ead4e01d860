//! One open WebSocket serving the plugin, whichever side dialled (docs/protocol.md,
//! "WebSocket binding"): the plugin's `hello` first, then each `call` and `stream` as a
//! task of its own (at most [`MAX_IN_FLIGHT`] at once: past that the session stops
//! reading, so TCP pushes back on the host), `cancel` aborting its task, `credit` feeding
//! a stream's window, `health` answered, host events handed to the plugin's handlers and
//! the plugin's events sent.
//!
//! One writer task writes every frame, in order, control frames (pong, ping, close) ahead
//! of the queued messages; the tasks queue theirs in a bounded queue and wait while it is
//! full, so a host that reads slowly slows the plugin's answers instead of growing a
//! buffer. A host that takes nothing of a write for [`STALL_HEARTBEATS`] heartbeats is
//! dropped, as the dispatcher drops a plugin that does so; the heartbeat (a ping every
//! [`HEARTBEAT`], nothing read within half of one after it) finds a host that is gone.
//!
//! Nothing the session sends is over its send cap, the smaller of [`MAX_MESSAGE_BYTES`] and
//! the cap the host announced (the upgrade's header, [`Opened::announced_cap`], taken before
//! the `hello`; then the `welcome`'s field, which replaces it when valid): the host would
//! close the connection (1009) under every call on it.
//! A response over it is replaced by that call's `too_large` error, a chunk ends its stream
//! with that error (the producer dropped, as a `cancel` drops it), and an event is not sent
//! (the first of a connection said at WARN).
//!
//! An `error` frame from the host (it could not use a frame of ours) is never answered, or
//! two peers could trade them for ever. It is said at INFO, the host's message escaped and
//! cut as a close reason is: the first [`LOGGED_HOST_ERRORS`] of a connection, then one line
//! saying the rest are not, so that a host sending a flood of them does not flood stderr.
//!
//! Stopping loses no call: told to stop, the session says `goaway` and goes on serving
//! what arrives, and the host closes the connection once its calls are answered; at the
//! stop's grace it closes the connection itself (1001), cutting off what still runs.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, WriteHalf};
use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::{AbortHandle, JoinHandle};
use tokio::time::Instant;
use tokio_stream::StreamExt;

use super::frames::{Decoder, Deflate, Encoder, Incoming, Role, CLOSE_GOING_AWAY, CLOSE_NORMAL};
use super::protocol::{self, Frame, FrameError, MAX_MESSAGE_BYTES};
use super::served::Core;
use crate::service::{run_streamed, sent_then_ended};
use crate::{pb, types, Error, Json};

/// Calls one connection runs at once; past it the session stops reading.
pub(crate) const MAX_IN_FLIGHT: usize = 1024;
/// Chunks a stream may send before the host grants more (`credit`).
pub(crate) const STREAM_WINDOW: usize = 256;
/// How often the session pings; a host that sends nothing within half of it after a ping
/// is gone (a half-open connection is found within 1.5 heartbeats).
pub(crate) const HEARTBEAT: Duration = Duration::from_secs(10);
/// Heartbeats a write may wait for the host to take it before the connection is dropped.
pub(crate) const STALL_HEARTBEATS: f64 = 1.5;
/// After this side's close frame, how long it waits for the host's before letting go.
const CLOSE_WAIT: Duration = Duration::from_secs(1);
/// Messages waiting for the writer; a sender waits while it is full.
const MESSAGE_QUEUE: usize = 64;
/// Pongs and pings waiting for the writer; past it a pong is dropped (the next answers).
const CONTROL_QUEUE: usize = 16;
const READ_BYTES: usize = 64 * 1024;
/// The host's `error` frames logged on one connection; one line says the rest are not.
const LOGGED_HOST_ERRORS: usize = 10;

/// Anything a WebSocket runs over: TCP, or TLS over it.
pub(crate) trait Socket: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Socket for T {}

/// A connection whose upgrade is done.
pub(crate) struct Opened {
    pub(crate) socket: Box<dyn Socket>,
    pub(crate) role: Role,
    pub(crate) deflate: Option<Deflate>,
    /// Bytes read past the upgrade's head: the start of the host's first frames.
    pub(crate) leftover: Vec<u8>,
    /// The upgrade's `LinchKit-Max-Message-Bytes`, as it came (on the dispatcher's request
    /// in `serve --websocket`, on the gateway's 101 in `connect`); judged here.
    pub(crate) announced_cap: Option<String>,
}

/// How a session ended.
#[derive(Debug, Default)]
pub(crate) struct Ended {
    /// The host's close frame: its code, and its reason made safe to show.
    pub(crate) close: Option<(u16, String)>,
    /// The gateway welcomed the plugin's hello (reverse mode).
    pub(crate) welcomed: bool,
}

/// When the plugin was told to stop: `None` until then, then the end of its grace.
pub(crate) type Stopping = watch::Receiver<Option<Instant>>;

enum Control {
    Pong(Vec<u8>),
    Ping,
}

/// Why the writer stopped.
#[derive(Debug, PartialEq, Eq)]
enum WriterEnd {
    /// It wrote this side's close frame.
    Closed,
    /// The host took nothing of a write for the stall bound.
    Stalled,
    /// The socket failed, or every sender is gone.
    Gone,
}

/// When the last ping went out (milliseconds since the session began; 0: none waiting).
struct Liveness {
    began: Instant,
    ping_written: AtomicU64,
}

impl Liveness {
    fn millis(&self, at: Instant) -> u64 {
        (at.saturating_duration_since(self.began).as_millis() as u64).max(1)
    }
}

/// A call or stream running on the connection.
struct Running {
    task: AbortHandle,
    window: Option<Arc<Semaphore>>,
}

type Calls = Arc<Mutex<HashMap<i64, Running>>>;

/// Takes the call out of the connection's map when its task ends, however it ends.
struct Leaving {
    calls: Calls,
    id: i64,
}

impl Drop for Leaving {
    fn drop(&mut self) {
        self.calls.lock().unwrap().remove(&self.id);
    }
}

/// A call read while every slot was taken: it starts once one frees.
struct Pending {
    stream: bool,
    id: i64,
    request: Result<pb::CallRequest, Error>,
}

/// Serves the plugin over `opened` until the connection ends; `stopping` says when the
/// plugin stops (then the session says `goaway`, and closes at the grace's end).
pub(crate) async fn serve(core: Arc<Core>, opened: Opened, stopping: Stopping) -> Ended {
    Session::new(core).run(opened, stopping).await
}

/// The session's send cap in bytes, read by every task that sends.
type SendCap = Arc<AtomicUsize>;

struct Session {
    core: Arc<Core>,
    send_cap: SendCap,
    calls: Calls,
    slots: Arc<Semaphore>,
    messages: mpsc::Sender<Vec<u8>>,
    message_queue: Option<mpsc::Receiver<Vec<u8>>>,
    ended: Ended,
    /// `error` frames the host sent (the first [`LOGGED_HOST_ERRORS`] are logged).
    host_errors: usize,
}

impl Session {
    fn new(core: Arc<Core>) -> Self {
        let (messages, message_queue) = mpsc::channel(MESSAGE_QUEUE);
        Session {
            core,
            send_cap: Arc::new(AtomicUsize::new(MAX_MESSAGE_BYTES)),
            calls: Calls::default(),
            slots: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            messages,
            message_queue: Some(message_queue),
            ended: Ended::default(),
            host_errors: 0,
        }
    }

    async fn run(mut self, opened: Opened, mut stopping: Stopping) -> Ended {
        let Opened {
            socket,
            role,
            deflate,
            leftover,
            announced_cap,
        } = opened;
        if let Some(text) = announced_cap {
            self.announce(protocol::announced_cap(&text));
        }
        let (mut reader, write_half) = tokio::io::split(socket);
        let mut decoder = Decoder::new(role, MAX_MESSAGE_BYTES, deflate);
        decoder.feed(&leftover);
        let (close, close_queue) = oneshot::channel::<(u16, String)>();
        let mut close = Some(close);
        let (control, control_queue) = mpsc::channel(CONTROL_QUEUE);
        let liveness = Arc::new(Liveness {
            began: Instant::now(),
            ping_written: AtomicU64::new(0),
        });
        let mut writer = tokio::spawn(write(
            write_half,
            Encoder::new(role, deflate),
            close_queue,
            control_queue,
            self.message_queue.take().expect("one run per session"),
            liveness.clone(),
        ));
        let mut writer_done = None;

        let _ = self.messages.send(self.core.hello.clone()).await;
        let events = tokio::spawn(send_events(
            self.core.clone(),
            self.messages.clone(),
            self.send_cap.clone(),
        ));
        let mut goaway: Option<JoinHandle<()>> = None;
        let mut grace: Option<Instant> = *stopping.borrow();
        let mut stop_watch_open = true;
        if grace.is_some() {
            goaway = Some(self.say_goaway());
        }
        // Set once this side's close frame is queued: from then on what comes is read only
        // for the host's close, until `CLOSE_WAIT` has passed.
        let mut closing: Option<Instant> = None;
        // Broken framing: the rest is not read as frames any more.
        let mut broken = false;
        let mut pending: Option<Pending> = None;
        let mut last_read = Instant::now();
        let mut pings = tokio::time::interval_at(Instant::now() + HEARTBEAT / 2, HEARTBEAT / 2);
        pings.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ping_next = true; // the first tick only checks: a ping every heartbeat
        let mut buffer = vec![0u8; READ_BYTES];

        'serving: loop {
            while pending.is_none() && !broken {
                match decoder.next() {
                    Ok(None) => break,
                    // Once this side's close is queued, nothing new is started or answered.
                    Ok(Some(Incoming::Message(_) | Incoming::Ping(_))) if close.is_none() => {}
                    Ok(Some(Incoming::Message(message))) => {
                        pending = self.on_message(&message).await;
                        if let Some(waiting) = pending.take() {
                            match self.slots.clone().try_acquire_owned() {
                                Ok(slot) => self.start(waiting, slot),
                                Err(_) => pending = Some(waiting), // full: stop reading
                            }
                        }
                    }
                    Ok(Some(Incoming::Ping(payload))) => {
                        let _ = control.try_send(Control::Pong(payload));
                    }
                    Ok(Some(Incoming::Pong)) => {}
                    Ok(Some(Incoming::Close(code, reason))) => {
                        self.ended.close =
                            code.map(|code| (code, protocol::shown_close_reason(&reason)));
                        if let Some(close) = close.take() {
                            let _ = close.send((code.unwrap_or(CLOSE_NORMAL), String::new()));
                        }
                        break 'serving;
                    }
                    Err(violation) => {
                        crate::log::warn(&format!(
                            "closing the connection ({}): the host sent {}",
                            violation.close_code(),
                            violation.reason()
                        ));
                        if let Some(close) = close.take() {
                            let _ = close.send((violation.close_code(), violation.reason().into()));
                        }
                        broken = true;
                        closing.get_or_insert(Instant::now() + CLOSE_WAIT);
                    }
                }
            }
            let paused = pending.is_some();
            tokio::select! {
                biased;
                slot = self.slots.clone().acquire_owned(), if pending.is_some() => {
                    if let (Ok(slot), Some(waiting)) = (slot, pending.take()) {
                        self.start(waiting, slot);
                    }
                }
                read = reader.read(&mut buffer), if pending.is_none() => match read {
                    Ok(0) | Err(_) => break 'serving, // the host is gone
                    Ok(read) => {
                        last_read = Instant::now();
                        if !broken {
                            decoder.feed(&buffer[..read]);
                        }
                    }
                },
                done = &mut writer, if writer_done.is_none() => {
                    let done = done.unwrap_or(WriterEnd::Gone);
                    let closed = done == WriterEnd::Closed;
                    writer_done = Some(done);
                    // Our close is out: what the host still sends is read (not run) until
                    // its close, its end or `CLOSE_WAIT`, so that no reset overtakes ours.
                    if !closed {
                        break 'serving;
                    }
                }
                changed = stopping.changed(), if stop_watch_open && grace.is_none() => {
                    match changed {
                        Ok(()) => {
                            grace = *stopping.borrow();
                            if grace.is_some() {
                                goaway = Some(self.say_goaway());
                            }
                        }
                        Err(_) => stop_watch_open = false,
                    }
                }
                () = sleep_until(grace), if grace.is_some() && closing.is_none() => {
                    // The host has not closed within the grace: cut off what still runs.
                    if let Some(close) = close.take() {
                        let _ = close.send((CLOSE_GOING_AWAY, "the plugin is stopping".into()));
                    }
                    closing = Some(Instant::now() + CLOSE_WAIT);
                }
                () = sleep_until(closing), if closing.is_some() => break 'serving,
                _ = pings.tick(), if closing.is_none() => {
                    let written = liveness.ping_written.load(Ordering::Relaxed);
                    let answered = written == 0 || liveness.millis(last_read) >= written;
                    let due = liveness.millis(Instant::now()).saturating_sub(written) >= (HEARTBEAT / 2).as_millis() as u64;
                    if !answered && due && !paused {
                        crate::log::warn(&format!(
                            "the host answered no ping within {} s; dropping the connection",
                            (HEARTBEAT / 2).as_secs_f64()
                        ));
                        break 'serving;
                    }
                    if answered {
                        liveness.ping_written.store(0, Ordering::Relaxed);
                    }
                    ping_next = !ping_next;
                    if ping_next && answered {
                        let _ = control.try_send(Control::Ping);
                    }
                }
            }
        }

        // The connection is over: nobody waits for the answers of what still runs.
        let running: Vec<AbortHandle> = self
            .calls
            .lock()
            .unwrap()
            .drain()
            .map(|(_, r)| r.task)
            .collect();
        for task in running {
            task.abort();
        }
        events.abort();
        if let Some(goaway) = goaway {
            goaway.abort();
        }
        if writer_done.is_none() {
            if close.is_none() {
                // Our close frame is queued: let it out, briefly.
                let _ = tokio::time::timeout(CLOSE_WAIT, &mut writer).await;
            }
            writer.abort();
        }
        self.ended
    }

    /// Says `goaway` without holding up the reader: the queue may be full.
    fn say_goaway(&self) -> JoinHandle<()> {
        self.core.stop_serving();
        let messages = self.messages.clone();
        tokio::spawn(async move {
            let _ = messages.send(protocol::goaway()).await;
        })
    }

    /// Takes the cap the host announced, a valid one (`None` leaves the cap as it was).
    fn announce(&self, announced: Option<u64>) {
        if announced.is_some() {
            let cap = protocol::send_cap(MAX_MESSAGE_BYTES, announced);
            self.send_cap.store(cap, Ordering::Relaxed);
        }
    }

    async fn send(&self, frame: Vec<u8>) {
        let _ = self.messages.send(frame).await;
    }

    /// Handles one message from the host; a call to start, when it is one.
    async fn on_message(&mut self, message: &[u8]) -> Option<Pending> {
        let frame = match protocol::read_frame(message) {
            Ok(frame) => frame,
            Err(FrameError(why)) => {
                self.send(protocol::error(None, &why)).await;
                return None;
            }
        };
        match frame {
            Frame::Call {
                stream,
                id,
                request,
            } => {
                if self.calls.lock().unwrap().contains_key(&id) {
                    // A second call under one id would take over the first one's answer;
                    // no id in the error, which would end the call in flight.
                    let kind = if stream { "stream" } else { "call" };
                    self.send(protocol::error(
                        None,
                        &format!("{kind} needs a new integer id"),
                    ))
                    .await;
                    return None;
                }
                let request = protocol::call_request(request);
                return Some(Pending {
                    stream,
                    id,
                    request,
                });
            }
            Frame::Cancel(Some(id)) => {
                let running = self.calls.lock().unwrap().remove(&id);
                if let Some(running) = running {
                    running.task.abort(); // its span ends as cancelled; nothing is answered
                }
            }
            Frame::Credit { id: Some(id), n } => {
                let window = self
                    .calls
                    .lock()
                    .unwrap()
                    .get(&id)
                    .and_then(|r| r.window.clone());
                if let Some(window) = window {
                    window.add_permits(n as usize);
                }
            }
            Frame::Health(id) => self.send(protocol::health(id, self.core.serving())).await,
            Frame::Event {
                name: Some(name),
                data,
            } => {
                let data = data.map_or_else(|| Json::raw("null"), |d| Json::raw(d.get()));
                self.core.shared.deliver(&name, data);
            }
            Frame::Welcome(announced) => {
                self.ended.welcomed = true;
                self.announce(announced);
            }
            Frame::Unknown { kind, id } => {
                let message = format!("unknown frame type {}", crate::error::shown_name(&kind));
                self.send(protocol::error(id, &message)).await;
            }
            Frame::Error(error) => self.host_error(error),
            Frame::Dropped | Frame::Cancel(None) | Frame::Credit { .. } | Frame::Event { .. } => {}
        }
        None
    }

    /// The host could not use a frame of ours (one that predates `goaway` says so of it):
    /// logged, never answered, or two peers could trade errors for ever. Only the first
    /// [`LOGGED_HOST_ERRORS`] of a connection: the host chooses how many it sends.
    fn host_error(&mut self, error: Option<&serde_json::value::RawValue>) {
        self.host_errors += 1;
        if self.host_errors <= LOGGED_HOST_ERRORS {
            let text = protocol::error_text(error);
            crate::log::info(&format!(
                "the host could not use a frame: {}",
                protocol::shown_close_reason(text.as_bytes())
            ));
        } else if self.host_errors == LOGGED_HOST_ERRORS + 1 {
            crate::log::info(&format!(
                "the host sent more than {LOGGED_HOST_ERRORS} error frames on this connection; \
                 further ones are not logged"
            ));
        }
    }

    /// Starts a call in a task of its own, holding one of the connection's slots.
    fn start(&self, pending: Pending, slot: OwnedSemaphorePermit) {
        let Pending {
            stream,
            id,
            request,
        } = pending;
        let window = stream.then(|| Arc::new(Semaphore::new(STREAM_WINDOW)));
        let mut calls = self.calls.lock().unwrap();
        let leaving = Leaving {
            calls: self.calls.clone(),
            id,
        };
        let (core, messages) = (self.core.clone(), self.messages.clone());
        let send_cap = self.send_cap.clone();
        // Inserted before the lock is let go: the task takes itself out under it.
        let task = match window.clone() {
            None => tokio::spawn(async move {
                let _held = (slot, leaving);
                run_call(core, id, request, messages, send_cap).await
            }),
            Some(window) => tokio::spawn(async move {
                let _held = (slot, leaving);
                run_stream(core, id, request, window, messages, send_cap).await
            }),
        };
        calls.insert(
            id,
            Running {
                task: task.abort_handle(),
                window,
            },
        );
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The one task that writes: this side's close first, then pongs and pings, then the
/// queued messages, each written whole within the stall bound.
async fn write(
    mut socket: WriteHalf<Box<dyn Socket>>,
    mut encoder: Encoder,
    close: oneshot::Receiver<(u16, String)>,
    mut control: mpsc::Receiver<Control>,
    mut messages: mpsc::Receiver<Vec<u8>>,
    liveness: Arc<Liveness>,
) -> WriterEnd {
    let stall = HEARTBEAT.mul_f64(STALL_HEARTBEATS);
    let mut close = Some(close);
    loop {
        let (bytes, closing, ping) = tokio::select! {
            biased;
            asked = async { close.as_mut().expect("guarded").await }, if close.is_some() => {
                close = None;
                match asked {
                    Ok((code, reason)) => (encoder.close(code, &reason), true, false),
                    Err(_) => continue, // no close asked for
                }
            }
            Some(control) = control.recv() => match control {
                Control::Pong(payload) => (encoder.pong(&payload), false, false),
                Control::Ping => (encoder.ping(b""), false, true),
            },
            message = messages.recv() => match message {
                Some(message) => (encoder.message(&message), false, false),
                None => return WriterEnd::Gone,
            },
        };
        let written = tokio::time::timeout(stall, async {
            socket.write_all(&bytes).await?;
            socket.flush().await
        })
        .await;
        match written {
            Err(_) => {
                crate::log::warn(&format!(
                    "the host took nothing written to it for {} s; dropping the connection",
                    stall.as_secs_f64()
                ));
                return WriterEnd::Stalled;
            }
            Ok(Err(_)) => return WriterEnd::Gone,
            Ok(Ok(())) => {}
        }
        if ping {
            liveness
                .ping_written
                .store(liveness.millis(Instant::now()), Ordering::Relaxed);
        }
        if closing {
            let _ = tokio::time::timeout(CLOSE_WAIT, socket.shutdown()).await;
            return WriterEnd::Closed;
        }
    }
}

/// The plugin's events to the host: those that waited for a host first, then a `dropped`
/// frame with how many were lost meanwhile (if any), then each as it is emitted. Data JSON cannot carry is not
/// sent (said once), nor an event over the send cap (said once).
async fn send_events(core: Arc<Core>, messages: mpsc::Sender<Vec<u8>>, send_cap: SendCap) {
    let (mut waiting, mut dropped, mut events) = core.shared.emitter().join();
    let mut told = false;
    let mut told_over_cap = false;
    loop {
        if waiting == 0 && dropped > 0 {
            let count = std::mem::take(&mut dropped);
            if messages.send(protocol::dropped(count)).await.is_err() {
                return;
            }
        }
        let Some(event) = events.next().await else {
            return;
        };
        waiting = waiting.saturating_sub(1);
        // Vouched for when emitted: read again only when it may not fit a frame.
        if let Some(why) = event.data.not_framable_because() {
            if !std::mem::replace(&mut told, true) {
                crate::log::warn(&format!(
                    "event {} not sent: its data {why}",
                    crate::error::shown_name(&event.name)
                ));
            }
            continue;
        }
        let frame = protocol::event(&event.name, event.data.as_bytes());
        let limit = send_cap.load(Ordering::Relaxed);
        if frame.len() > limit {
            // Fire-and-forget: the method that emitted it is not failed.
            if !std::mem::replace(&mut told_over_cap, true) {
                crate::log::warn(&protocol::event_over_cap(&event.name, frame.len(), limit));
            }
            continue;
        }
        if messages.send(frame).await.is_err() {
            return;
        }
    }
}

/// Runs one unary call and answers it, as the gRPC binding's `Call` does (deadline, span,
/// a panic answered as `PluginError`).
async fn run_call(
    core: Arc<Core>,
    id: i64,
    request: Result<pb::CallRequest, Error>,
    messages: mpsc::Sender<Vec<u8>>,
    send_cap: SendCap,
) {
    let method = method_of(&request);
    let answer = match request {
        Ok(request) => core.shared.answer(request).await,
        Err(err) => Err(err),
    };
    let frame = protocol::response_within(id, &answer, &method, send_cap.load(Ordering::Relaxed));
    drop(answer); // held while the frame waits: once, not twice
    let _ = messages.send(frame).await;
}

/// The method a call names, as its too-large error says it.
fn method_of(request: &Result<pb::CallRequest, Error>) -> String {
    request
        .as_ref()
        .map(|request| request.method.clone())
        .unwrap_or_default()
}

/// Runs one stream: each chunk sent as the host's credit allows, then its end (`result:
/// null`) or its error, in one span, as the gRPC binding's `CallStream`. A unary method
/// streamed sends its result as the one chunk.
async fn run_stream(
    core: Arc<Core>,
    id: i64,
    request: Result<pb::CallRequest, Error>,
    window: Arc<Semaphore>,
    messages: mpsc::Sender<Vec<u8>>,
    send_cap: SendCap,
) {
    let method = method_of(&request);
    let streamed = async {
        let (mut call, handler) = core.shared.prepared(request?)?;
        let deadline = call.deadline;
        // Dropped unended when the task is aborted (a cancel, the connection gone): the
        // span then ends as cancelled.
        let span = core.shared.span_of(&mut call);
        let (chunks, mut receiver) = mpsc::channel::<Json>(16);
        let run = run_streamed(handler, call, chunks);
        let forward = async {
            while let Some(chunk) = receiver.recv().await {
                // Vouched for when sent (`ChunkSender::send`): read again only when it may
                // not fit a frame.
                if let Some(why) = chunk.not_framable_because() {
                    return Err(Error::new(
                        types::PROVIDER_ERROR,
                        format!("a chunk of the stream cannot be sent: its contents {why}"),
                    ));
                }
                let frame = protocol::chunk(id, chunk.as_bytes());
                drop(chunk);
                // Over the cap: the stream ends with the error, and `run` (the producer)
                // is dropped, as a cancel drops it.
                let limit = send_cap.load(Ordering::Relaxed);
                if frame.len() > limit {
                    return Err(protocol::too_large(
                        "a chunk of",
                        &method,
                        frame.len(),
                        limit,
                    ));
                }
                window
                    .acquire()
                    .await
                    .map_err(|_| Error::deadline_exceeded("the connection closed"))?
                    .forget();
                messages
                    .send(frame)
                    .await
                    .map_err(|_| Error::deadline_exceeded("the connection closed"))?;
            }
            Ok(())
        };
        let outcome = core
            .shared
            .within(&method, deadline, sent_then_ended(run, forward))
            .await;
        if let Some(span) = span {
            span.end(outcome.as_ref().err());
        }
        outcome
    };
    let end = streamed.await.map(|()| Json::from(serde_json::Value::Null));
    let limit = send_cap.load(Ordering::Relaxed);
    let _ = messages
        .send(protocol::response_within(id, &end, &method, limit))
        .await;
}

#[cfg(test)]
pub(crate) mod tests {
    //! A session over an in-memory pipe, a test host on the other end writing and reading
    //! raw frames: what the plugin answers, and that it goes on.

    use super::*;
    use crate::websocket::frames::{Decoder, Encoder};
    use crate::{Call, ChunkSender, Plugin};
    use serde_json::{json, Value};
    use tokio::io::ReadHalf;

    pub(crate) struct Host {
        read: ReadHalf<tokio::io::DuplexStream>,
        write: WriteHalf<tokio::io::DuplexStream>,
        decoder: Decoder,
        encoder: Encoder,
        pub(crate) stop: watch::Sender<Option<Instant>>,
        pub(crate) session: JoinHandle<Ended>,
    }

    pub(crate) fn plugin() -> Plugin {
        Plugin::new("test", "0.1.0")
            .method("echo", "", |call: Call| async move {
                Ok(call.raw_params().clone())
            })
            .method("waits", "", |_: Call| async move {
                tokio::time::sleep(Duration::from_secs(30)).await;
                Ok(Json::raw("null"))
            })
            .method("bad", "", |_: Call| async move { Ok(Json::raw("[1e400]")) })
            .streaming_method("count", "", |call: Call, chunks: ChunkSender| async move {
                let n = call.params::<Value>()?["n"].as_u64().unwrap_or(3);
                for i in 0..n {
                    chunks.send(json!({ "i": i })).await?;
                }
                Ok(())
            })
            .on_event("ping", |data, events| events.emit("pong", data))
    }

    pub(crate) async fn host(deflate: Option<Deflate>) -> Host {
        host_of(plugin(), deflate).await
    }

    pub(crate) async fn host_of(plugin: Plugin, deflate: Option<Deflate>) -> Host {
        host_announcing(plugin, deflate, None).await
    }

    /// A host whose upgrade announced `announced_cap` (dial mode's header, as it came).
    pub(crate) async fn host_announcing(
        plugin: Plugin,
        deflate: Option<Deflate>,
        announced_cap: Option<&str>,
    ) -> Host {
        let core = Core::ready(plugin).await;
        let (ours, theirs) = tokio::io::duplex(1 << 20);
        let (stop, stopping) = watch::channel(None);
        let opened = Opened {
            socket: Box::new(theirs),
            role: Role::Server,
            deflate,
            leftover: Vec::new(),
            announced_cap: announced_cap.map(str::to_string),
        };
        let session = tokio::spawn(serve(core, opened, stopping));
        let (read, write) = tokio::io::split(ours);
        Host {
            read,
            write,
            decoder: Decoder::new(Role::Client, 64 << 20, deflate),
            encoder: Encoder::new(Role::Client, deflate),
            stop,
            session,
        }
    }

    impl Host {
        pub(crate) async fn send(&mut self, frame: &Value) {
            self.send_raw(frame.to_string().as_bytes()).await;
        }

        pub(crate) async fn send_raw(&mut self, message: &[u8]) {
            let bytes = self.encoder.message(message);
            self.write.write_all(&bytes).await.unwrap();
        }

        pub(crate) async fn write_bytes(&mut self, bytes: &[u8]) {
            self.write.write_all(bytes).await.unwrap();
        }

        /// The next frame or close, skipping pings and events unless asked.
        pub(crate) async fn next(&mut self) -> Incoming {
            let mut buffer = vec![0u8; 64 * 1024];
            loop {
                if let Some(incoming) = self.decoder.next().unwrap() {
                    return incoming;
                }
                let read =
                    tokio::time::timeout(Duration::from_secs(10), self.read.read(&mut buffer))
                        .await
                        .expect("the plugin answers within 10 s")
                        .unwrap();
                if read == 0 {
                    return Incoming::Close(None, b"(the connection ended)".to_vec());
                }
                self.decoder.feed(&buffer[..read]);
            }
        }

        pub(crate) async fn frame(&mut self) -> Value {
            loop {
                match self.next().await {
                    Incoming::Message(message) => {
                        let frame: Value = serde_json::from_slice(&message).unwrap();
                        if frame["type"] != "event" {
                            return frame;
                        }
                    }
                    Incoming::Close(code, reason) => {
                        panic!("closed: {code:?} {}", String::from_utf8_lossy(&reason))
                    }
                    _ => {}
                }
            }
        }

        pub(crate) async fn closed(&mut self) -> Option<u16> {
            loop {
                if let Incoming::Close(code, _) = self.next().await {
                    return code;
                }
            }
        }
    }

    fn call(id: i64, method: &str, params: Value) -> Value {
        json!({"type": "call", "id": id, "request": {"v": 1, "method": method, "params": params, "context": {}}})
    }

    #[tokio::test]
    async fn hello_then_calls_streams_health_and_events() {
        let mut host = host(None).await;
        let hello = host.frame().await;
        assert_eq!(hello["type"], "hello");
        assert_eq!(hello["methods"], json!(["bad", "count", "echo", "waits"]));
        assert_eq!(hello["streaming"], json!(["count"]));
        host.send(&call(1, "echo", json!({"x": 1}))).await;
        assert_eq!(
            host.frame().await,
            json!({"type": "response", "id": 1, "response": {"ok": true, "result": {"x": 1}}})
        );
        host.send(
            &json!({"type": "stream", "id": 2, "request": {"method": "count", "params": {"n": 2}}}),
        )
        .await;
        assert_eq!(
            host.frame().await,
            json!({"type": "chunk", "id": 2, "data": {"i": 0}})
        );
        assert_eq!(
            host.frame().await,
            json!({"type": "chunk", "id": 2, "data": {"i": 1}})
        );
        assert_eq!(
            host.frame().await["response"],
            json!({"ok": true, "result": null})
        );
        host.send(&json!({"type": "health", "id": 3})).await;
        assert_eq!(
            host.frame().await,
            json!({"type": "health", "id": 3, "status": "serving", "detail": ""})
        );
        host.send(&json!({"type": "event", "event": "ping", "data": {"seq": 1}}))
            .await;
        loop {
            if let Incoming::Message(message) = host.next().await {
                let frame: Value = serde_json::from_slice(&message).unwrap();
                if frame["type"] == "event" {
                    assert_eq!(
                        frame,
                        json!({"type": "event", "event": "pong", "data": {"seq": 1}})
                    );
                    break;
                }
            }
        }
        host.send(&call(4, "no_such", json!(null))).await;
        assert_eq!(
            host.frame().await["response"]["error"]["type"],
            "method_not_found"
        );
        host.send(&call(5, "bad", json!(null))).await;
        assert_eq!(
            host.frame().await["response"]["error"]["type"],
            "provider_error"
        );
    }

    #[tokio::test]
    async fn events_that_waited_for_a_host_come_first_then_how_many_were_dropped() {
        let plugin = plugin();
        let emitter = plugin.emitter();
        for i in 0..1030 {
            emitter.emit("tick", Json::from(json!(i)));
        }
        let mut host = host_of(plugin, None).await;
        assert_eq!(host.frame().await["type"], "hello");
        let mut seen = Vec::new();
        while seen.len() < 1024 {
            if let Incoming::Message(message) = host.next().await {
                let frame: Value = serde_json::from_slice(&message).unwrap();
                assert_eq!(frame["type"], "event", "{frame}");
                seen.push(frame["data"].as_i64().unwrap());
            }
        }
        assert_eq!(
            seen,
            (6..1030).collect::<Vec<i64>>(),
            "the oldest dropped, in order"
        );
        assert_eq!(host.frame().await, json!({"type": "dropped", "count": 6}));
    }

    #[tokio::test]
    async fn a_stream_waits_for_credit() {
        let mut host = host(None).await;
        host.frame().await;
        host.send(&json!({"type": "stream", "id": 1, "request": {"method": "count", "params": {"n": 300}}})).await;
        for i in 0..STREAM_WINDOW {
            assert_eq!(host.frame().await["data"]["i"], i);
        }
        host.send(&call(2, "echo", json!(2))).await;
        // The window is spent: the echo answers, the stream waits.
        assert_eq!(host.frame().await["id"], 2);
        host.send(&json!({"type": "credit", "id": 1, "n": 128}))
            .await;
        for i in STREAM_WINDOW..300 {
            assert_eq!(host.frame().await["data"]["i"], i);
        }
        assert_eq!(host.frame().await["response"]["ok"], true);
    }

    #[tokio::test]
    async fn a_cancel_ends_the_call_unanswered_and_a_duplicate_id_is_refused() {
        let mut host = host(None).await;
        host.frame().await;
        host.send(&call(1, "waits", json!(null))).await;
        host.send(&call(1, "echo", json!("again"))).await;
        let refused = host.frame().await;
        assert_eq!(refused["type"], "error");
        assert!(refused.get("id").is_none(), "{refused}");
        host.send(&json!({"type": "cancel", "id": 1})).await;
        host.send(&json!({"type": "cancel", "id": 99})).await;
        host.send(&call(2, "echo", json!(2))).await;
        assert_eq!(
            host.frame().await,
            json!({"type": "response", "id": 2, "response": {"ok": true, "result": 2}})
        );
        // The cancelled id is free again, and no answer of it ever came.
        host.send(&call(1, "echo", json!(1))).await;
        assert_eq!(host.frame().await["id"], 1);
    }

    #[tokio::test]
    async fn the_hosts_error_frames_are_logged_escaped_and_only_the_first_few() {
        // Before, none was logged: the host's word that it could not use a frame was lost.
        crate::log::captured::start();
        let mut host = host(None).await;
        host.frame().await;
        let forged = "\u{1b}[2J\nINFO forged: the plugin stopped";
        host.send(
            &json!({"type": "error", "error": {"type": "provider_error", "message": forged}}),
        )
        .await;
        for _ in 1..1000 {
            host.send(&json!({"type": "error", "id": 3, "error": {"message": "again"}}))
                .await;
        }
        // None is answered, and the session serves on: the call's answer is the next frame.
        host.send(&call(1, "echo", json!("still here"))).await;
        assert_eq!(
            host.frame().await,
            json!({"type": "response", "id": 1, "response": {"ok": true, "result": "still here"}})
        );
        let said: Vec<String> = crate::log::captured::lines()
            .iter()
            .map(|line| {
                line.split_once(' ')
                    .expect("a time first")
                    .1
                    .trim_start()
                    .to_string()
            })
            .collect();
        let mut want = vec![
            "INFO linchkit_plugin: the host could not use a frame: \\x1b[2J\\nINFO forged: the plugin stopped".to_string(),
        ];
        want.extend(vec![
            "INFO linchkit_plugin: the host could not use a frame: again".to_string();
            LOGGED_HOST_ERRORS - 1
        ]);
        want.push(format!(
            "INFO linchkit_plugin: the host sent more than {LOGGED_HOST_ERRORS} error frames \
             on this connection; further ones are not logged"
        ));
        assert_eq!(said, want);
    }

    #[tokio::test]
    async fn garbage_gets_error_frames_and_the_session_goes_on() {
        let mut host = host(None).await;
        host.frame().await;
        for message in [
            &b"{not json"[..],
            b"\xff\xfe",
            b"",
            b"[1]",
            br#"{"type":"call","id":"7"}"#,
        ] {
            host.send_raw(message).await;
            let frame = host.frame().await;
            assert_eq!(
                (frame["type"].as_str(), frame["error"]["type"].as_str()),
                (Some("error"), Some("provider_error"))
            );
        }
        host.send(&json!({"type": "no-such-frame", "id": 5})).await;
        assert_eq!(host.frame().await["id"], 5);
        host.send(&json!({"type": "call", "id": 6, "request": ["x"]}))
            .await;
        assert_eq!(
            host.frame().await["response"]["error"]["type"],
            "provider_error"
        );
        host.send(&call(7, "echo", json!(7))).await;
        assert_eq!(host.frame().await["response"]["result"], 7);
    }

    #[tokio::test]
    async fn a_message_over_the_bound_closes_1009_before_it_is_read() {
        let mut host = host(None).await;
        host.frame().await;
        let mut header = vec![0x81, 0x80 | 127];
        header.extend_from_slice(&((MAX_MESSAGE_BYTES + 1024) as u64).to_be_bytes());
        header.extend_from_slice(&[0, 0, 0, 0]);
        header.extend_from_slice(&[b'x'; 1024]);
        host.write_bytes(&header).await;
        assert_eq!(host.closed().await, Some(1009));
        let ended = tokio::time::timeout(Duration::from_secs(5), host.session)
            .await
            .unwrap()
            .unwrap();
        assert!(ended.close.is_none());
    }

    #[tokio::test]
    async fn the_hosts_close_is_answered_and_ends_the_session() {
        let mut host = host(None).await;
        host.frame().await;
        host.send(&call(1, "waits", json!(null))).await;
        let close = host.encoder.close(4403, "admitted as 2.0.0 \x1b[2J");
        host.write_bytes(&close).await;
        assert_eq!(host.closed().await, Some(4403));
        let ended = host.session.await.unwrap();
        assert_eq!(
            ended.close,
            Some((4403, "admitted as 2.0.0 \\x1b[2J".to_string()))
        );
    }

    #[tokio::test]
    async fn a_stop_says_goaway_serves_on_and_closes_1001_at_the_grace() {
        let mut host = host(None).await;
        host.frame().await;
        host.send(&call(1, "waits", json!(null))).await;
        host.stop
            .send(Some(Instant::now() + Duration::from_millis(300)))
            .unwrap();
        assert_eq!(host.frame().await, json!({"type": "goaway"}));
        host.send(&call(2, "echo", json!("after"))).await;
        assert_eq!(host.frame().await["response"]["result"], "after");
        host.send(&json!({"type": "health", "id": 3})).await;
        assert_eq!(host.frame().await["status"], "not_serving");
        assert_eq!(host.closed().await, Some(1001));
    }

    #[tokio::test]
    async fn deflated_both_ways_when_agreed() {
        let mut host = host(Some(Deflate::default())).await;
        assert_eq!(host.frame().await["type"], "hello");
        let rows: Vec<Value> = (0..10_000)
            .map(|n| json!({"name": "row", "value": n % 10}))
            .collect();
        host.send(&call(1, "echo", json!(rows))).await;
        assert_eq!(host.frame().await["response"]["result"], json!(rows));
    }

    /// The test plugin, and: `big` answers `n` letters x (U+2028 with `sep`), `refuse` an
    /// error of `n` letters, `stream` a small chunk then one of `n` letters (`stopped` set
    /// once its producer is dropped), `shout` emits an event of `n` letters.
    fn sized_plugin(stopped: Arc<std::sync::atomic::AtomicBool>) -> Plugin {
        struct Dropped(Arc<std::sync::atomic::AtomicBool>);
        impl Drop for Dropped {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        fn letters(call: &Call) -> String {
            let params = call.params::<Value>().unwrap_or_default();
            let n = params["n"].as_u64().unwrap_or(0) as usize;
            if params["sep"] == true {
                "\u{2028}".repeat(n)
            } else {
                "x".repeat(n)
            }
        }
        plugin()
            .method("big", "", |call: Call| async move {
                Ok(Json::from(json!(letters(&call))))
            })
            .method("refuse", "", |call: Call| async move {
                Err(Error::new("Overdrawn", letters(&call)))
            })
            .streaming_method("stream", "", move |call: Call, chunks: ChunkSender| {
                let stopped = stopped.clone();
                async move {
                    let _dropped = Dropped(stopped);
                    chunks.send(json!("small")).await?;
                    chunks.send(json!(letters(&call))).await?;
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    chunks.send(json!("small again")).await
                }
            })
            .method("shout", "", |call: Call| async move {
                call.emit("loud", Json::from(json!(letters(&call))));
                Ok(Json::from(json!("shouted")))
            })
    }

    /// A session of `sized_plugin` welcomed with `welcome`, its hello read.
    async fn welcomed(welcome: Value) -> Host {
        let mut host = host_of(sized_plugin(Default::default()), None).await;
        assert_eq!(host.frame().await["type"], "hello");
        host.send(&welcome).await;
        host
    }

    fn assert_too_large(frame: &Value, id: i64, message: &str, limit: usize) {
        assert_eq!(frame["id"], id, "{frame}");
        let error = &frame["response"]["error"];
        assert_eq!(frame["response"]["ok"], false, "{frame}");
        assert_eq!(
            (error["type"].as_str(), error["retryable"].as_bool()),
            (Some("provider_error"), Some(false))
        );
        let bytes = error["details"]["bytes"].as_u64().unwrap() as usize;
        assert!(bytes > limit, "{error}");
        assert_eq!(
            error["details"],
            json!({"reason": "too_large", "bytes": bytes, "limit": limit})
        );
        assert_eq!(
            error["message"],
            format!("{message} is {bytes} bytes, over the WebSocket message cap of {limit} bytes")
        );
    }

    /// The connection still serves calls.
    async fn assert_open(host: &mut Host, id: i64) {
        host.send(&call(id, "echo", json!("still open"))).await;
        assert_eq!(
            host.frame().await,
            json!({"type": "response", "id": id, "response": {"ok": true, "result": "still open"}})
        );
    }

    #[tokio::test]
    async fn an_answer_over_the_welcomed_cap_is_that_call_s_typed_error() {
        let mut host =
            welcomed(json!({"type": "welcome", "instance": "x", "max_message_bytes": 2048})).await;
        host.send(&call(1, "big", json!({"n": 1900}))).await;
        assert_eq!(host.frame().await["response"]["result"], "x".repeat(1900));
        host.send(&call(2, "big", json!({"n": 2048}))).await;
        assert_too_large(&host.frame().await, 2, "the result of big", 2048);
        host.send(&call(3, "refuse", json!({"n": 2048}))).await;
        assert_too_large(&host.frame().await, 3, "the error of refuse", 2048);
        // Measured as sent: serde_json writes U+2028 as its 3 UTF-8 bytes.
        host.send(&call(4, "big", json!({"n": 600, "sep": true})))
            .await;
        assert_eq!(
            host.frame().await["response"]["ok"],
            true,
            "1,800 bytes fit"
        );
        host.send(&call(5, "big", json!({"n": 700, "sep": true})))
            .await;
        assert_too_large(&host.frame().await, 5, "the result of big", 2048);
        assert_open(&mut host, 6).await;
    }

    #[tokio::test]
    async fn a_chunk_over_the_cap_ends_its_stream_typed_and_drops_the_producer() {
        let stopped = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut host = host_of(sized_plugin(stopped.clone()), None).await;
        host.frame().await;
        host.send(&json!({"type": "welcome", "max_message_bytes": 2048}))
            .await;
        host.send(&json!({"type": "stream", "id": 1, "request": {"method": "stream", "params": {"n": 3000}}}))
            .await;
        assert_eq!(
            host.frame().await,
            json!({"type": "chunk", "id": 1, "data": "small"})
        );
        assert_too_large(&host.frame().await, 1, "a chunk of stream", 2048);
        for _ in 0..100 {
            if stopped.load(Ordering::SeqCst) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(stopped.load(Ordering::SeqCst), "the producer still runs");
        assert_open(&mut host, 2).await;
    }

    #[tokio::test]
    async fn an_event_over_the_cap_is_not_sent_and_the_method_answers() {
        let mut host =
            welcomed(json!({"type": "welcome", "instance": "x", "max_message_bytes": 2048})).await;
        for id in 1..=2 {
            host.send(&call(id, "shout", json!({"n": 3000}))).await;
        }
        host.send(&call(3, "shout", json!({"n": 10}))).await;
        // Every message until the three answers and an event are in, events included.
        let (mut answers, mut events) = (Vec::new(), Vec::new());
        while answers.len() < 3 || events.is_empty() {
            if let Incoming::Message(message) = host.next().await {
                let frame: Value = serde_json::from_slice(&message).unwrap();
                if frame["type"] == "event" {
                    events.push(frame);
                } else {
                    answers.push(frame["response"]["result"].clone());
                }
            }
        }
        assert_eq!(answers, vec![json!("shouted"); 3], "emit is not failed");
        assert_eq!(
            events,
            vec![json!({"type": "event", "event": "loud", "data": "x".repeat(10)})],
            "only the small event"
        );
        assert_open(&mut host, 4).await;
    }

    #[tokio::test]
    async fn a_welcome_without_a_valid_cap_leaves_the_sdk_s_own() {
        for cap in [
            json!(null),
            json!("2048"),
            json!(12.5),
            json!(-5),
            json!(100),
            json!(true),
            json!([2048]),
            json!(1u64 << 60),
        ] {
            let mut host =
                welcomed(json!({"type": "welcome", "instance": "x", "max_message_bytes": cap}))
                    .await;
            host.send(&call(1, "big", json!({"n": 3000}))).await;
            assert_eq!(
                host.frame().await["response"]["result"],
                "x".repeat(3000),
                "welcomed with {cap}"
            );
        }
    }

    #[tokio::test]
    async fn the_upgrade_s_announced_cap_bounds_the_answers() {
        for (announced, refused) in [
            (Some("2048"), true),
            (None, false),
            (Some("abc"), false),
            (Some("-5"), false),
            (Some("1e6"), false),
            (Some("1023"), false),
        ] {
            let plugin = sized_plugin(Default::default());
            let mut host = host_announcing(plugin, None, announced).await;
            host.frame().await;
            host.send(&call(1, "big", json!({"n": 3000}))).await;
            let frame = host.frame().await;
            if refused {
                assert_too_large(&frame, 1, "the result of big", 2048);
                assert_open(&mut host, 2).await;
            } else {
                assert_eq!(frame["response"]["ok"], true, "announced {announced:?}");
            }
        }
    }

    #[tokio::test]
    async fn without_an_announcement_the_cap_is_the_sdk_s_own_8_mib() {
        let mut host = host_of(sized_plugin(Default::default()), None).await;
        host.frame().await;
        let empty = protocol::response(
            1,
            &pb::CallReply {
                ok: true,
                result_json: b"\"\"".to_vec(),
                error: None,
            },
        );
        let fits = MAX_MESSAGE_BYTES - empty.len();
        host.send(&call(1, "big", json!({ "n": fits }))).await;
        assert_eq!(host.frame().await["response"]["ok"], true, "exactly 8 MiB");
        host.send(&call(2, "big", json!({ "n": fits + 1 }))).await;
        assert_too_large(
            &host.frame().await,
            2,
            "the result of big",
            MAX_MESSAGE_BYTES,
        );
        assert_open(&mut host, 3).await;
    }

    #[tokio::test]
    async fn a_deflate_bomb_closes_1009() {
        let mut host = host(Some(Deflate::default())).await;
        host.frame().await;
        let mut compressor = flate2::Compress::new(flate2::Compression::best(), false);
        let body = crate::websocket::frames::deflate(&mut compressor, &vec![b'x'; 64 << 20]);
        let mut frame = vec![0xC1, 0x80 | 127];
        frame.extend_from_slice(&(body.len() as u64).to_be_bytes());
        frame.extend_from_slice(&[0, 0, 0, 0]);
        frame.extend_from_slice(&body);
        host.write_bytes(&frame).await;
        assert_eq!(host.closed().await, Some(1009));
    }

    /// A NaN encoded as a plugin author encodes a result, and pre-built JSON that is none.
    fn non_finite_plugin() -> Plugin {
        #[derive(serde::Serialize)]
        struct Reading {
            score: f64,
        }
        Plugin::new("test", "0.1.0")
            .method("nan", "", |_: Call| async move {
                Json::encode(&Reading { score: f64::NAN })
            })
            .method("raw", "", |_: Call| async move {
                Ok(Json::raw(r#"{"score": NaN}"#))
            })
            .streaming_method("chunks", "", |_: Call, chunks: ChunkSender| async move {
                chunks.send(json!({"i": 0})).await?;
                // Its refusal ignored: the stream ends with it all the same.
                let _ = chunks.send(Json::raw("[-Infinity]")).await;
                let _ = chunks.send(json!({"i": 2})).await;
                Ok(())
            })
            .streaming_method(
                "nan_chunks",
                "",
                |_: Call, chunks: ChunkSender| async move {
                    chunks.send(json!({"i": 0})).await?;
                    let score = f64::NEG_INFINITY;
                    chunks.send(Json::encode(&Reading { score })?).await
                },
            )
            .method("emits", "", |call: Call| async move {
                call.emit("bad", Json::raw("NaN"));
                call.emit("good", json!([1]).into());
                Ok(json!(true).into())
            })
    }

    fn assert_not_json(frame: &Value) {
        let error = &frame["response"]["error"];
        assert_eq!(
            (&error["type"], &error["retryable"]),
            (&json!("provider_error"), &json!(false)),
            "{frame}"
        );
        let message = error["message"].as_str().unwrap();
        assert!(
            message.starts_with("the plugin's result is not JSON: "),
            "{frame}"
        );
    }

    #[tokio::test]
    async fn what_json_cannot_carry_is_the_calls_provider_error_and_no_event() {
        crate::log::captured::start();
        let mut host = host_of(non_finite_plugin(), None).await;
        host.frame().await;
        host.send(&call(1, "nan", json!(null))).await;
        let refused = host.frame().await;
        assert_not_json(&refused);
        assert_eq!(
            refused["response"]["error"]["message"],
            "the plugin's result is not JSON: NaN is not a JSON number"
        );
        host.send(&call(2, "raw", json!(null))).await;
        assert_not_json(&host.frame().await);
        for (id, method) in [(3, "chunks"), (4, "nan_chunks")] {
            host.send(&json!({"type": "stream", "id": id, "request": {"method": method}}))
                .await;
            assert_eq!(
                host.frame().await,
                json!({"type": "chunk", "id": id, "data": {"i": 0}})
            );
            assert_not_json(&host.frame().await);
        }
        host.send(&call(5, "emits", json!(null))).await;
        let (mut answered, mut events) = (false, Vec::new());
        while !answered || events.is_empty() {
            if let Incoming::Message(message) = host.next().await {
                let frame: Value = serde_json::from_slice(&message).unwrap();
                match frame["type"].as_str() {
                    Some("event") => events.push(frame),
                    Some("response") => answered = true,
                    _ => {}
                }
            }
        }
        assert_eq!(
            events,
            [json!({"type": "event", "event": "good", "data": [1]})]
        );
        let said = "event 'bad' not sent: the data of event 'bad' is not JSON: ";
        let lines = crate::log::captured::lines();
        assert_eq!(
            lines.iter().filter(|l| l.contains(said)).count(),
            1,
            "{lines:?}"
        );
        host.send(&call(6, "nan", json!(null))).await;
        assert_not_json(&host.frame().await);
    }

    /// Pre-built JSON holding a string that is not valid Unicode, which the host's decoder
    /// refuses: a lone surrogate escape (a UTF-16 string cut inside an emoji), bytes that
    /// are not UTF-8.
    fn not_unicode_plugin() -> Plugin {
        Plugin::new("test", "0.1.0")
            .method("lone", "", |_: Call| async move {
                Ok(Json::raw(r#"{"text":"smile \ud83d"}"#))
            })
            .method("latin1", "", |_: Call| async move {
                Ok(Json::raw(b"{\"caf\xe9\":1}".to_vec()))
            })
            .method("pair", "", |_: Call| async move {
                Ok(Json::raw(r#"{"text":"\ud83d\ude00","not":"\\ud83d"}"#))
            })
            .streaming_method("chunks", "", |_: Call, chunks: ChunkSender| async move {
                chunks.send(json!({"i": 0})).await?;
                let _ = chunks.send(Json::raw(r#"["\udc00\ud800"]"#)).await;
                let _ = chunks.send(json!({"i": 2})).await;
                Ok(())
            })
            .method("emits", "", |call: Call| async move {
                call.emit("bad", Json::raw(r#"{"\ud83d":1}"#));
                call.emit("good", json!([1]).into());
                Ok(json!(true).into())
            })
    }

    #[tokio::test]
    async fn a_string_that_is_not_valid_unicode_is_the_calls_provider_error_and_no_event() {
        const LONE: &str =
            "the plugin's result is not JSON: a string is not valid Unicode (a lone surrogate)";
        crate::log::captured::start();
        let mut host = host_of(not_unicode_plugin(), None).await;
        host.frame().await;
        for (id, method, message) in [
            (1, "lone", LONE),
            (2, "latin1", "the plugin's result is not JSON: a string is not valid Unicode (bytes that are not UTF-8)"),
        ] {
            host.send(&call(id, method, json!(null))).await;
            let refused = host.frame().await;
            assert_not_json(&refused);
            assert_eq!(refused["response"]["error"]["message"], message, "{refused}");
        }
        // A valid pair escape and a backslash before "ud83d" are sent as they were.
        host.send(&call(3, "pair", json!(null))).await;
        loop {
            if let Incoming::Message(message) = host.next().await {
                if message.starts_with(br#"{"type":"response""#) {
                    assert_eq!(
                        String::from_utf8(message).unwrap(),
                        r#"{"type":"response","id":3,"response":{"ok":true,"result":{"text":"\ud83d\ude00","not":"\\ud83d"}}}"#
                    );
                    break;
                }
            }
        }
        host.send(&json!({"type": "stream", "id": 4, "request": {"method": "chunks"}}))
            .await;
        assert_eq!(
            host.frame().await,
            json!({"type": "chunk", "id": 4, "data": {"i": 0}})
        );
        let refused = host.frame().await;
        assert_not_json(&refused);
        assert_eq!(refused["response"]["error"]["message"], LONE, "{refused}");
        host.send(&json!({"type": "stream", "id": 5, "request": {"method": "lone"}}))
            .await;
        assert_eq!(host.frame().await["response"]["error"]["message"], LONE);
        host.send(&call(6, "emits", json!(null))).await;
        let (mut answered, mut events) = (false, Vec::new());
        while !answered || events.is_empty() {
            if let Incoming::Message(message) = host.next().await {
                let frame: Value = serde_json::from_slice(&message).unwrap();
                match frame["type"].as_str() {
                    Some("event") => events.push(frame),
                    Some("response") => answered = true,
                    _ => {}
                }
            }
        }
        assert_eq!(
            events,
            [json!({"type": "event", "event": "good", "data": [1]})]
        );
        let said = "event 'bad' not sent: the data of event 'bad' is not JSON: a string is not valid Unicode (a lone surrogate)";
        let lines = crate::log::captured::lines();
        assert_eq!(
            lines.iter().filter(|l| l.ends_with(said)).count(),
            1,
            "{lines:?}"
        );
    }

    /// The next response, chunk or event, as its bytes came.
    async fn next_message(host: &mut Host) -> Vec<u8> {
        loop {
            match host.next().await {
                Incoming::Message(message) => return message,
                Incoming::Close(code, _) => panic!("closed: {code:?}"),
                _ => {}
            }
        }
    }

    /// Every message until `responses` responses and `events` events are in, as their
    /// bytes came (in order, events apart: they come as their task sends them).
    async fn messages_until(
        host: &mut Host,
        responses: usize,
        events: usize,
    ) -> (Vec<String>, Vec<String>) {
        let (mut answers, mut emitted) = (Vec::new(), Vec::new());
        while answers
            .iter()
            .filter(|m: &&String| m.starts_with(r#"{"type":"response""#))
            .count()
            < responses
            || emitted.len() < events
        {
            let message = String::from_utf8(next_message(host).await).unwrap();
            if message.starts_with(r#"{"type":"event""#) {
                emitted.push(message);
            } else {
                answers.push(message);
            }
        }
        (answers, emitted)
    }

    /// Each value a plugin sends is checked once on its way out when raw (a result, a
    /// chunk, an event's data), and never when encoded: the frame does not read it again.
    /// Until 2026-12-08 every response, chunk and event was read again in full here
    /// (milliseconds a MB, a raw one twice); a second look would count. The frames are as
    /// they were, byte for byte.
    #[tokio::test]
    async fn a_value_sent_is_checked_once_when_raw_and_never_when_encoded() {
        const RAW: &str = r#"{"raw":["result",1]}"#;
        const RAW_CHUNK: &str = r#"{"raw":["chunk",2]}"#;
        const RAW_EVENT: &str = r#"{"raw":["event",3]}"#;
        let encoded = |what: &str| json!({"encoded": [what, 4.5, null, {"deeper": []}]});
        let plugin = Plugin::new("test", "0.1.0")
            .method("raw", "", |_: Call| async move { Ok(Json::raw(RAW)) })
            .method("encoded", "", move |_: Call| async move {
                Json::encode(&encoded("result"))
            })
            .streaming_method(
                "chunks",
                "",
                move |_: Call, chunks: ChunkSender| async move {
                    chunks.send(Json::raw(RAW_CHUNK)).await?;
                    chunks.send(Json::encode(&encoded("chunk"))?).await
                },
            )
            .method("emits", "", move |call: Call| async move {
                call.emit("raw", Json::raw(RAW_EVENT));
                call.emit("encoded", Json::encode(&encoded("event"))?);
                Ok(json!(true).into())
            });
        crate::params::looked_at::start();
        let mut host = host_of(plugin, None).await;
        host.frame().await;
        for (id, method) in [(1, "raw"), (2, "encoded"), (4, "chunks"), (5, "emits")] {
            host.send(&call(id, method, json!(null))).await;
        }
        host.send(&json!({"type": "stream", "id": 3, "request": {"method": "chunks"}}))
            .await;
        let (mut answers, mut events) = messages_until(&mut host, 5, 2).await;
        let text = |what: &str| encoded(what).to_string();
        let response = |id: i64, result: &str| {
            format!(r#"{{"type":"response","id":{id},"response":{{"ok":true,"result":{result}}}}}"#)
        };
        let mut expected = vec![
            response(1, RAW),
            response(2, &text("result")),
            format!(r#"{{"type":"chunk","id":3,"data":{RAW_CHUNK}}}"#),
            format!(r#"{{"type":"chunk","id":3,"data":{}}}"#, text("chunk")),
            response(3, "null"),
            response(4, &format!("[{RAW_CHUNK},{}]", text("chunk"))),
            response(5, "true"),
        ];
        let mut expected_events = vec![
            format!(r#"{{"type":"event","event":"raw","data":{RAW_EVENT}}}"#),
            format!(
                r#"{{"type":"event","event":"encoded","data":{}}}"#,
                text("event")
            ),
        ];
        // The calls run at once: their answers come in any order, a stream's in its own.
        for list in [
            &mut answers,
            &mut expected,
            &mut events,
            &mut expected_events,
        ] {
            list.sort();
        }
        assert_eq!((answers, events), (expected, expected_events));
        let times = |bytes: &str| crate::params::looked_at::times(bytes.as_bytes());
        assert_eq!(times(RAW), 1, "the raw result");
        assert_eq!(
            times(RAW_CHUNK),
            2,
            "the raw chunk, sent in a stream and in a list"
        );
        assert_eq!(times(RAW_EVENT), 1, "the raw event data");
        for what in ["result", "chunk", "event"] {
            assert_eq!(times(&text(what)), 0, "the encoded {what}");
        }
        assert_eq!(
            times(&format!("[{RAW_CHUNK},{}]", text("chunk"))),
            0,
            "the list"
        );
    }

    /// What a frame cannot carry is refused as it always was, in the same words, though
    /// known JSON is not read again: encoded JSON nested past the params' bound (a
    /// result, a chunk, an event, a streamed method's list of chunks at the bound), and
    /// encoded JSON holding a `RawValue`'s text serde_json took as given.
    #[tokio::test]
    async fn what_a_frame_cannot_carry_is_refused_in_the_same_words() {
        fn nested(n: usize) -> Value {
            (0..n).fold(json!(1), |inner, _| json!([inner]))
        }
        #[derive(serde::Serialize)]
        struct Holding {
            n: Box<serde_json::value::RawValue>,
        }
        crate::log::captured::start();
        let plugin = Plugin::new("test", "0.1.0")
            .method("deep", "", |_: Call| async move { Ok(nested(251).into()) })
            .method("at_the_bound", "", |_: Call| async move {
                Ok(nested(250).into())
            })
            .method("beyond_a_double", "", |_: Call| async move {
                let n = serde_json::value::RawValue::from_string("1e400".into()).unwrap();
                Json::encode(&Holding { n })
            })
            .streaming_method("chunks", "", |_: Call, chunks: ChunkSender| async move {
                chunks.send(nested(250)).await?;
                chunks.send(nested(251)).await
            })
            .streaming_method("chunk", "", |_: Call, chunks: ChunkSender| async move {
                chunks.send(nested(250)).await
            })
            .method("emits", "", |call: Call| async move {
                call.emit("deep", nested(251).into());
                call.emit("good", json!([1]).into());
                Ok(json!(true).into())
            });
        let mut host = host_of(plugin, None).await;
        host.frame().await;
        let refused = "the plugin's result cannot be sent: its contents";
        for (id, method, said) in [
            (
                1,
                "deep",
                format!("{refused} are nested deeper than 250 levels"),
            ),
            // Its list of chunks, one of them at the bound: one level past it.
            (
                2,
                "chunk",
                format!("{refused} are nested deeper than 250 levels"),
            ),
            (
                3,
                "beyond_a_double",
                format!("{refused} hold a number beyond the range of a double"),
            ),
        ] {
            host.send(&call(id, method, json!(null))).await;
            let frame = host.frame().await;
            assert_eq!(frame["response"]["error"]["type"], "provider_error");
            assert_eq!(
                frame["response"]["error"]["message"],
                said.as_str(),
                "{method}"
            );
        }
        host.send(&call(4, "at_the_bound", json!(null))).await;
        assert_eq!(
            String::from_utf8(next_message(&mut host).await).unwrap(),
            format!(
                r#"{{"type":"response","id":4,"response":{{"ok":true,"result":{}}}}}"#,
                nested(250)
            )
        );
        host.send(&json!({"type": "stream", "id": 5, "request": {"method": "chunks"}}))
            .await;
        assert_eq!(
            String::from_utf8(next_message(&mut host).await).unwrap(),
            format!(r#"{{"type":"chunk","id":5,"data":{}}}"#, nested(250))
        );
        assert_eq!(
            host.frame().await["response"]["error"]["message"],
            "a chunk of the stream cannot be sent: its contents are nested deeper than 250 levels"
        );
        host.send(&call(6, "emits", json!(null))).await;
        let (_, events) = messages_until(&mut host, 1, 1).await;
        assert_eq!(events, [r#"{"type":"event","event":"good","data":[1]}"#]);
        let said = r#"event "deep" not sent: its data are nested deeper than 250 levels"#;
        let lines = crate::log::captured::lines();
        assert_eq!(
            lines.iter().filter(|l| l.ends_with(said)).count(),
            1,
            "{lines:?}"
        );
    }

    #[tokio::test]
    async fn calls_and_streams_answered_long_after_their_deadlines_are_said() {
        // The answers stand, as over gRPC; before, nothing said why the host had timed out.
        crate::log::captured::start();
        let blocked = || std::thread::sleep(Duration::from_millis(800));
        let plugin = Plugin::new("test", "0.1.0")
            .method("blocks", "", move |_: Call| async move {
                blocked();
                Ok(Json::raw("1"))
            })
            .streaming_method(
                "blocks_streaming",
                "",
                move |_: Call, chunks: ChunkSender| async move {
                    blocked();
                    chunks.send(Json::raw("2")).await
                },
            );
        let mut host = host_of(plugin, None).await;
        host.frame().await;
        let context = json!({"deadline_ms": 100});
        host.send(
            &json!({"type": "call", "id": 1, "request": {"method": "blocks", "context": context}}),
        )
        .await;
        assert_eq!(
            host.frame().await,
            json!({"type": "response", "id": 1, "response": {"ok": true, "result": 1}})
        );
        host.send(&json!({"type": "stream", "id": 2, "request": {"method": "blocks_streaming", "context": context}}))
            .await;
        assert_eq!(
            host.frame().await,
            json!({"type": "chunk", "id": 2, "data": 2})
        );
        assert_eq!(
            host.frame().await["response"],
            json!({"ok": true, "result": null})
        );
        let said: Vec<String> = crate::log::captured::lines()
            .into_iter()
            .filter(|line| line.contains(" s after its deadline: a runtime worker was held"))
            .collect();
        assert_eq!(said.len(), 2, "{said:?}");
        assert!(
            said[0].contains(" WARN linchkit_plugin: method 'blocks' answered "),
            "{said:?}"
        );
        assert!(
            said[1].contains(" WARN linchkit_plugin: method 'blocks_streaming' answered "),
            "{said:?}"
        );
    }
}
