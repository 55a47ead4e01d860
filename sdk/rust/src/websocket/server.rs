//! `serve --websocket`: the plugin listens and the dispatcher dials it (`provider:
//! websocket`, `url: ws://…`), at any path. With a token, the upgrade must carry
//! `Authorization: Bearer <token>` (compared in constant time) and is otherwise answered
//! `401` with an `unauthorized` envelope before it upgrades; the answer never quotes what
//! was sent. permessage-deflate is accepted whenever the dispatcher offers it (a target
//! with `compress: true`): the manifest decides.
//!
//! A stop takes no new connection (the listener closes, and a handshake still under way
//! is answered `503`), says `goaway` on each open one and lets the dispatcher finish its
//! calls there within the grace.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::frames::Role;
use super::handshake::{self, Refusal, Request};
use super::session::{self, Opened, Stopping};
use super::Core;
use crate::auth::BearerToken;
use crate::types;

/// How long a new connection has to send its whole upgrade request.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a refused connection is read from (and dropped) so the answer reaches it.
const LINGER: Duration = Duration::from_secs(1);

/// Why a head could not be read.
pub(crate) enum HeadError {
    TooLarge,
    Closed,
}

/// Reads an HTTP head (through its blank line, at most `MAX_HEAD_BYTES`): the head, and
/// what came after it.
pub(crate) async fn read_head(
    socket: &mut (impl AsyncRead + Unpin),
) -> Result<(Vec<u8>, Vec<u8>), HeadError> {
    let mut read = Vec::with_capacity(4096);
    let mut buffer = [0u8; 4096];
    loop {
        let n = socket
            .read(&mut buffer)
            .await
            .map_err(|_| HeadError::Closed)?;
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
    let (stop, stopping) = watch::channel(None);
    let token = token.map(Arc::new);
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((socket, _)) => {
                    connections.spawn(connection(core.clone(), socket, token.clone(), stopping.clone()));
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

/// One connection: its upgrade, then its session.
async fn connection(
    core: Arc<Core>,
    mut socket: TcpStream,
    token: Option<Arc<BearerToken>>,
    stopping: Stopping,
) {
    let _ = socket.set_nodelay(true);
    let mut watching = stopping.clone();
    let head = tokio::select! {
        head = tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut socket)) => head,
        // Not upgraded yet: nothing of it to drain, and a stop does not wait for it.
        _ = watching.wait_for(Option::is_some) => return,
    };
    let (head, leftover) = match head {
        Ok(Ok(read)) => read,
        Ok(Err(HeadError::TooLarge)) => {
            let too_large = Refusal {
                status: 431,
                message: "the request head is too large",
            };
            return refuse(socket, too_large, types::INVALID_PARAMS).await;
        }
        Ok(Err(HeadError::Closed)) | Err(_) => return,
    };
    // Accepted just before the stop: the listener is closed already.
    if stopping.borrow().is_some() {
        let stopping = Refusal {
            status: 503,
            message: "the plugin is stopping",
        };
        return refuse(socket, stopping, types::TARGET_UNAVAILABLE).await;
    }
    let (authorization, upgrade) = match handshake::read_request(&head) {
        Request::Refused(refusal) => return refuse(socket, refusal, types::INVALID_PARAMS).await,
        Request::Get {
            authorization,
            upgrade,
        } => (authorization, upgrade),
    };
    if let Some(token) = &token {
        if !token.admits(authorization.as_deref()) {
            let unauthorized = Refusal {
                status: 401,
                message: "missing or wrong bearer token",
            };
            return refuse(socket, unauthorized, types::UNAUTHORIZED).await;
        }
    }
    let upgrade = match upgrade {
        Ok(upgrade) => upgrade,
        Err(refusal) => return refuse(socket, refusal, types::INVALID_PARAMS).await,
    };
    let answer = handshake::switching_protocols(&upgrade.key, upgrade.deflate);
    if socket.write_all(&answer).await.is_err() {
        return;
    }
    let opened = Opened {
        socket: Box::new(socket),
        role: Role::Server,
        deflate: upgrade.deflate,
        leftover,
    };
    session::serve(core, opened, stopping).await;
}

/// Answers `refusal` with the protocol's error envelope and closes the connection, reading
/// what the client still sends for a moment so that the answer is not lost to a reset.
async fn refuse(mut socket: TcpStream, refusal: Refusal, error_type: &str) {
    let answer = handshake::refusal(refusal.status, error_type, refusal.message);
    if socket.write_all(&answer).await.is_err() {
        return;
    }
    let _ = socket.shutdown().await;
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(LINGER, async {
        while matches!(socket.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
}
