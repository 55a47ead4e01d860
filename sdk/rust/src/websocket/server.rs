//! `serve --websocket`: the plugin listens and the dispatcher dials it (`provider:
//! websocket`, `url: ws://…`), at any path. With a token, the upgrade must carry
//! `Authorization: Bearer <token>` (compared in constant time) and is otherwise answered
//! `401` with an `unauthorized` envelope before it upgrades; the answer never quotes what
//! was sent. permessage-deflate is accepted whenever the dispatcher offers it (a target
//! with `compress: true`): the manifest decides.
//!
//! The token is checked before anything else a request could learn (the method, whether
//! the plugin is stopping, the upgrade's headers). At most `MAX_SESSIONS` (1,000)
//! connections are served at once, as `dispatcher-plugin serve` holds its HTTP ones: past
//! them an upgrade is refused `503` (`overloaded`, `Retry-After: 1`) before it upgrades.
//! Connections that have not sent a whole head count too: at most `MAX_WAITING` (100) at
//! once, the oldest closed to make room for a new one (so a flood of idle sockets neither
//! holds a descriptor each nor keeps a dispatcher out: its head follows its connection
//! within a round trip), and each head must be complete within `HEAD_TIMEOUT`.
//!
//! A stop takes no new connection (the listener closes, and a handshake still under way
//! is answered `503`), says `goaway` on each open one and lets the dispatcher finish its
//! calls there within the grace.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::frames::Role;
use super::handshake::{self, Refusal, Request};
use super::served::Core;
use super::session::{self, Opened, Stopping};
use crate::auth::BearerToken;
use crate::types;

/// How long a new connection has to send its whole upgrade request.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a refused connection is read from (and dropped) so the answer reaches it.
const LINGER: Duration = Duration::from_secs(1);
/// Connections served at once (upgraded or upgrading), as `dispatcher-plugin serve` holds
/// its HTTP ones (`--max-connections`, 1000).
const MAX_SESSIONS: usize = 1000;
/// Connections not past their head yet, at once: the oldest closes to make room.
const MAX_WAITING: usize = 100;

/// What one server holds at once.
#[derive(Clone, Copy)]
pub(crate) struct Caps {
    pub(crate) sessions: usize,
    pub(crate) waiting: usize,
}

impl Default for Caps {
    fn default() -> Self {
        Caps {
            sessions: MAX_SESSIONS,
            waiting: MAX_WAITING,
        }
    }
}

/// The connections waiting for their head, by the order they opened in (oldest first),
/// each with what tells its task it was pushed out.
#[derive(Default)]
struct Waiting {
    opened: u64,
    waiting: BTreeMap<u64, Arc<Notify>>,
    pushed_out: u64,
}

/// One connection's place among the waiting: given up when dropped (its head is complete,
/// or it ended).
struct WaitingPlace {
    waiting: Arc<Mutex<Waiting>>,
    order: u64,
    pushed_out: Arc<Notify>,
}

impl Drop for WaitingPlace {
    fn drop(&mut self) {
        if let Ok(mut waiting) = self.waiting.lock() {
            waiting.waiting.remove(&self.order);
        }
    }
}

/// A new connection's place; the oldest waiting is told to close past `most`.
fn wait_for_head(waiting: &Arc<Mutex<Waiting>>, most: usize) -> WaitingPlace {
    let pushed_out = Arc::new(Notify::new());
    let mut all = waiting
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    all.opened += 1;
    let order = all.opened;
    all.waiting.insert(order, pushed_out.clone());
    if all.waiting.len() > most {
        if let Some((_, oldest)) = all.waiting.pop_first() {
            all.pushed_out += 1;
            oldest.notify_one(); // kept if its task is not waiting yet
        }
    }
    WaitingPlace {
        waiting: waiting.clone(),
        order,
        pushed_out,
    }
}

/// A session's place among those served; given up when dropped.
struct SessionPlace(Arc<AtomicUsize>);

impl Drop for SessionPlace {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Why a head could not be read.
pub(crate) enum HeadError {
    TooLarge,
    Closed,
    /// The read failed: for a dialled gateway over TLS, the alert it refused the
    /// handshake with (read after the client's side of a TLS 1.3 handshake is over).
    Failed(std::io::Error),
}

/// Reads an HTTP head (through its blank line, at most `MAX_HEAD_BYTES`): the head, and
/// what came after it.
pub(crate) async fn read_head(
    socket: &mut (impl AsyncRead + Unpin),
) -> Result<(Vec<u8>, Vec<u8>), HeadError> {
    let mut read = Vec::with_capacity(4096);
    let mut buffer = [0u8; 4096];
    loop {
        let n = socket.read(&mut buffer).await.map_err(HeadError::Failed)?;
        if n == 0 {
            return Err(HeadError::Closed);
        }
        let searched_from = read.len().saturating_sub(3);
        read.extend_from_slice(&buffer[..n]);
        if let Some(end) = handshake::head_end(&read[searched_from..]) {
            let end = searched_from + end;
            let rest = read.split_off(end);
            return Ok((read, rest));
        }
        if read.len() > handshake::MAX_HEAD_BYTES {
            return Err(HeadError::TooLarge);
        }
    }
}

/// Serves connections on `listener` until `shutdown`, then stops them within `grace`
/// (each says `goaway` and closes by the grace's end) and returns once all have ended.
pub(crate) async fn serve_until(
    core: Arc<Core>,
    listener: TcpListener,
    token: Option<BearerToken>,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) {
    serve_within(core, listener, token, shutdown, grace, Caps::default()).await;
}

/// `serve_until`, holding at most `caps`.
pub(crate) async fn serve_within(
    core: Arc<Core>,
    listener: TcpListener,
    token: Option<BearerToken>,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
    caps: Caps,
) {
    let (stop, stopping) = watch::channel(None);
    let token = token.map(Arc::new);
    let mut connections = JoinSet::new();
    let waiting = Arc::new(Mutex::new(Waiting::default()));
    let sessions = Arc::new(AtomicUsize::new(0));
    let refused = Arc::new(AtomicUsize::new(0));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((socket, _)) => {
                    let place = wait_for_head(&waiting, caps.waiting);
                    let served = Served {
                        sessions: sessions.clone(),
                        refused: refused.clone(),
                        most: caps.sessions,
                    };
                    connections.spawn(connection(core.clone(), socket, token.clone(), stopping.clone(), place, served));
                }
                Err(err) => {
                    crate::log::warn(&format!("accept failed: {err}"));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener); // a dispatcher dialling again is refused: it sends elsewhere, or waits
    let deadline = Instant::now() + grace;
    let _ = stop.send(Some(deadline));
    // Each session closes by the grace, then waits a moment for the host's close.
    let bound = deadline + Duration::from_secs(3);
    while let Ok(Some(_)) = tokio::time::timeout_at(bound, connections.join_next()).await {}
    connections.shutdown().await;
}

/// The sessions served now, shared by every connection.
struct Served {
    sessions: Arc<AtomicUsize>,
    refused: Arc<AtomicUsize>,
    most: usize,
}

/// One connection: its upgrade, then its session.
async fn connection(
    core: Arc<Core>,
    mut socket: TcpStream,
    token: Option<Arc<BearerToken>>,
    stopping: Stopping,
    place: WaitingPlace,
    served: Served,
) {
    let _ = socket.set_nodelay(true);
    let mut watching = stopping.clone();
    let head = tokio::select! {
        head = tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut socket)) => head,
        // Not upgraded yet: nothing of it to drain, and a stop does not wait for it.
        _ = watching.wait_for(Option::is_some) => return,
        // The oldest of too many waiting: closed for a newer one.
        () = place.pushed_out.notified() => return,
    };
    drop(place);
    let (head, leftover) = match head {
        Ok(Ok(read)) => read,
        Ok(Err(HeadError::TooLarge)) => {
            let too_large = Refusal {
                status: 431,
                message: "the request head is too large",
            };
            return refuse(socket, too_large, types::INVALID_PARAMS).await;
        }
        Ok(Err(HeadError::Closed | HeadError::Failed(_))) | Err(_) => return,
    };
    let (authorization, upgrade) = match handshake::read_request(&head) {
        Request::Refused(refusal) => return refuse(socket, refusal, types::INVALID_PARAMS).await,
        Request::Get {
            authorization,
            upgrade,
        } => (authorization, upgrade),
    };
    // The token first: a peer without it learns nothing else, not even that the plugin
    // stops.
    if let Some(token) = &token {
        if !token.admits(authorization.as_deref()) {
            let unauthorized = Refusal {
                status: 401,
                message: "missing or wrong bearer token",
            };
            return refuse(socket, unauthorized, types::UNAUTHORIZED).await;
        }
    }
    // Accepted just before the stop: the listener is closed already.
    if stopping.borrow().is_some() {
        let stopping = Refusal {
            status: 503,
            message: "the plugin is stopping",
        };
        return refuse(socket, stopping, types::TARGET_UNAVAILABLE).await;
    }
    let upgrade = match upgrade {
        Ok(upgrade) => upgrade,
        Err(refusal) => return refuse(socket, refusal, types::INVALID_PARAMS).await,
    };
    // Counted before the upgrade's first await: upgrades arriving together cannot pass
    // the cap between its check and the count.
    let place = SessionPlace(served.sessions.clone());
    if served.sessions.fetch_add(1, Ordering::SeqCst) >= served.most {
        drop(place);
        if served.refused.fetch_add(1, Ordering::SeqCst) == 0 {
            // Once: a flood would otherwise write a line per upgrade.
            crate::log::warn(&format!(
                "serving {} WebSocket connections, the most it takes; refusing more with 503 \
                 until one closes",
                served.most
            ));
        }
        let answer = handshake::overloaded(&format!(
            "this plugin holds as many WebSocket connections as it takes ({}): dial again \
             shortly",
            served.most
        ));
        return answer_and_close(socket, &answer).await;
    }
    let answer = handshake::switching_protocols(&upgrade.key, upgrade.deflate);
    if socket.write_all(&answer).await.is_err() {
        return;
    }
    let opened = Opened {
        socket: Box::new(socket),
        role: Role::Server,
        deflate: upgrade.deflate,
        leftover,
        announced_cap: upgrade.max_message_bytes,
    };
    session::serve(core, opened, stopping).await;
    drop(place);
}

/// Answers `refusal` with the protocol's error envelope and closes the connection, reading
/// what the client still sends for a moment so that the answer is not lost to a reset.
async fn refuse(socket: TcpStream, refusal: Refusal, error_type: &str) {
    let answer = handshake::refusal(refusal.status, error_type, refusal.message);
    answer_and_close(socket, &answer).await;
}

/// Writes `answer` and closes the connection, reading what the client still sends for a
/// moment so that the answer is not lost to a reset.
async fn answer_and_close(mut socket: TcpStream, answer: &[u8]) {
    if socket.write_all(answer).await.is_err() {
        return;
    }
    let _ = socket.shutdown().await;
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(LINGER, async {
        while matches!(socket.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
}

#[cfg(test)]
mod tests {
    //! The server on loopback with small caps, raw sockets as the hosts.

    use super::*;
    use crate::websocket::session::tests::plugin;

    const TOKEN: &str = "s3cret-for-the-server-tests";
    const UPGRADE: &str = "GET / HTTP/1.1\r\nHost: p\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                           Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n";

    /// A server holding at most `caps`, its address and what stops it.
    async fn served(caps: Caps) -> (String, tokio::sync::oneshot::Sender<()>) {
        let core = Core::ready(plugin()).await;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let token = Some(BearerToken::new(TOKEN).unwrap());
        let shutdown = async move {
            let _ = stopped.await;
        };
        tokio::spawn(serve_within(
            core,
            listener,
            token,
            shutdown,
            Duration::from_millis(100),
            caps,
        ));
        (address, stop)
    }

    /// Sends `request` on a new connection: the connection and the answer's status line.
    async fn ask(address: &str, request: &str) -> (TcpStream, String) {
        let mut socket = TcpStream::connect(address).await.unwrap();
        socket.write_all(request.as_bytes()).await.unwrap();
        let mut answer = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(10), socket.read(&mut answer))
            .await
            .expect("an answer within 10 s")
            .unwrap();
        let line = String::from_utf8_lossy(&answer[..n])
            .lines()
            .next()
            .unwrap_or("")
            .to_string();
        (socket, line)
    }

    fn upgrade_with_token() -> String {
        format!("{UPGRADE}Authorization: Bearer {TOKEN}\r\n\r\n")
    }

    /// Past the sessions' cap an upgrade is refused 503; before, every upgrade was taken.
    #[tokio::test]
    async fn an_upgrade_past_the_cap_is_refused_503() {
        let (address, _stop) = served(Caps {
            sessions: 2,
            waiting: 10,
        })
        .await;
        let (_first, status) = ask(&address, &upgrade_with_token()).await;
        assert!(status.starts_with("HTTP/1.1 101"), "{status}");
        let (_second, status) = ask(&address, &upgrade_with_token()).await;
        assert!(status.starts_with("HTTP/1.1 101"), "{status}");
        let (_third, status) = ask(&address, &upgrade_with_token()).await;
        assert!(status.starts_with("HTTP/1.1 503"), "{status}");
    }

    /// Past the waiting cap the oldest connection without a whole head is closed, and a
    /// host dialling then is served; before, every one waited out its head timeout.
    #[tokio::test]
    async fn the_oldest_connection_waiting_for_its_head_makes_room() {
        let (address, _stop) = served(Caps {
            sessions: 10,
            waiting: 2,
        })
        .await;
        let mut oldest = TcpStream::connect(&address).await.unwrap();
        let _idle = TcpStream::connect(&address).await.unwrap();
        let _slow = {
            let mut slow = TcpStream::connect(&address).await.unwrap();
            slow.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
            slow
        };
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(5), oldest.read(&mut byte)).await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "the oldest is still open: {read:?}"
        );
        let (_host, status) = ask(&address, &upgrade_with_token()).await;
        assert!(status.starts_with("HTTP/1.1 101"), "{status}");
    }

    /// Without the token a request learns nothing else: not its method's refusal (405).
    #[tokio::test]
    async fn without_the_token_every_request_is_answered_401() {
        let (address, _stop) = served(Caps::default()).await;
        for request in [
            "POST / HTTP/1.1\r\nHost: p\r\nContent-Length: 0\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: p\r\n\r\n",
        ] {
            let (_socket, status) = ask(&address, request).await;
            assert!(status.starts_with("HTTP/1.1 401"), "{request:?}: {status}");
        }
        let (_socket, status) = ask(&address, &format!("{UPGRADE}\r\n")).await;
        assert!(status.starts_with("HTTP/1.1 401"), "{status}");
    }
}
