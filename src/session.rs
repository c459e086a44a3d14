//! A session: the one task that serves one WebSocket connection, from `welcome` to close.
//!
//! It reads frames, parses each into a [`ClientEvent`] and dispatches it (membership to the
//! hub, everything else to a plugin), and it writes whatever lands in the connection's
//! outbox, a batch at a time with one flush per batch. Reading and writing share one task
//! so an idle connection costs one small future, not two. Whatever ends the session (the
//! client, a dead socket, a slow-consumer overflow, a heartbeat timeout, shutdown), the
//! connection leaves its rooms with the usual notices before the socket is closed, so no
//! state about it outlives it.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::conn::{CloseReason, Conn};
use crate::error::ClientError;
use crate::gateway::Gateway;
use crate::plugins::HookMask;
use crate::protocol::{self, ClientEvent, Frame};

/// How long the closing handshake may take once the gateway decided to close.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// How a session ended, and so how its socket is closed.
enum End {
    /// The gateway closed it (see [`CloseReason`]).
    Closed(CloseReason),
    /// The client sent a close frame; tungstenite answers it.
    ClientClosed,
    /// A frame over `limits.max_frame_bytes`: 1009.
    TooBig,
    /// A protocol violation or I/O error: nothing more can be said on this socket.
    Broken,
}

pub async fn run<S>(mut ws: WebSocketStream<S>, gw: Arc<Gateway>, conn: Arc<Conn>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    gw.hub.register(conn.clone());
    conn.send(protocol::welcome(&conn.id, &conn.identity.user_id, &conn.identity.username()));
    gw.plugins.hook(HookMask::CONNECT, &conn, None);
    tracing::debug!(client = %conn.id, "connected");

    let end = serve(&mut ws, &gw, &conn).await;

    // Leave rooms first: the others learn at once, whatever the closing handshake costs.
    let rooms = gw.hub.unregister(&conn);
    for room in &rooms {
        gw.plugins.hook(HookMask::LEAVE, &conn, Some(room));
    }
    gw.plugins.hook(HookMask::DISCONNECT, &conn, None);
    let close = match end {
        End::Closed(reason) => {
            if reason == CloseReason::HeartbeatTimeout {
                gw.metrics.heartbeat_timeouts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            tracing::debug!(client = %conn.id, reason = reason.text(), "closing");
            reason.code().map(|code| (code, reason.text()))
        }
        End::TooBig => Some((1009, "message too big")),
        End::ClientClosed | End::Broken => None,
    };
    if let Some((code, reason)) = close {
        let frame = CloseFrame { code: CloseCode::from(code), reason: reason.into() };
        if let Ok(Ok(())) = tokio::time::timeout(CLOSE_TIMEOUT, ws.close(Some(frame))).await {
            // Read until the client hangs up: closing a socket with unread input makes the
            // kernel send a reset, which can destroy the close frame before it is read.
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, linger(&mut ws, matches!(end, End::TooBig))).await;
        }
    } else if matches!(end, End::ClientClosed) {
        // Completes the handshake: tungstenite has queued the reply to the client's close.
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, ws.flush()).await;
    }
}

/// Waits for the client's side of the closing handshake. After an oversized frame the
/// stream is mid-frame and cannot be parsed, so its bytes are discarded raw (at most 1 MiB).
async fn linger<S>(ws: &mut WebSocketStream<S>, raw: bool)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if !raw {
        while let Some(Ok(_)) = ws.next().await {}
        return;
    }
    let io = ws.get_mut();
    let _ = io.shutdown().await;
    let mut buf = [0u8; 4096];
    let mut left = 1usize << 20;
    while left > 0 {
        match io.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => left = left.saturating_sub(n),
        }
    }
}

async fn serve<S>(ws: &mut WebSocketStream<S>, gw: &Gateway, conn: &Arc<Conn>) -> End
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut batch: VecDeque<Frame> = VecDeque::new();
    loop {
        tokio::select! {
            biased;
            _ = conn.outbox.ready() => {
                if let Some(reason) = conn.outbox.drain(&mut batch) {
                    return End::Closed(reason);
                }
                tokio::select! {
                    written = write_batch(ws, &mut batch) => if written.is_err() {
                        return End::Broken;
                    },
                    // The socket may be stuck behind a client that does not read; a close
                    // decided meanwhile (overflow, heartbeat, shutdown) must not wait for it.
                    reason = conn.outbox.closed() => return End::Closed(reason),
                }
            }
            frame = ws.next() => match frame {
                Some(Ok(message)) => {
                    conn.touch();
                    match message {
                        Message::Text(text) => handle_text(gw, conn, text.as_str()).await,
                        Message::Binary(_) => {
                            conn.send(ClientError::BinaryFrame.to_frame());
                        }
                        Message::Close(_) => return End::ClientClosed,
                        // tungstenite answers pings itself; pongs only prove liveness.
                        Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
                    }
                }
                Some(Err(WsError::Capacity(CapacityError::MessageTooLong { .. }))) => return End::TooBig,
                Some(Err(_)) | None => return End::Broken,
            },
        }
    }
}

async fn write_batch<S>(ws: &mut WebSocketStream<S>, batch: &mut VecDeque<Frame>) -> Result<(), WsError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    while let Some(frame) = batch.pop_front() {
        ws.feed(frame).await?;
    }
    ws.flush().await
}

/// Parses and dispatches one text frame: the single place a client event is routed.
async fn handle_text(gw: &Gateway, conn: &Arc<Conn>, text: &str) {
    gw.metrics.events_in.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let result = match ClientEvent::parse(text) {
        Ok(ClientEvent::JoinRoom { room, since }) => gw.hub.join(conn, &room, since).await.map(|()| {
            gw.plugins.hook(HookMask::JOIN, conn, Some(&room));
        }),
        Ok(ClientEvent::LeaveRoom { room }) => gw.hub.leave(conn, &room).map(|()| {
            gw.plugins.hook(HookMask::LEAVE, conn, Some(&room));
        }),
        Ok(ClientEvent::Plugin { kind, body }) => gw.plugins.dispatch(conn, &kind, body),
        Err(e) => Err(e),
    };
    if let Err(e) = result {
        gw.metrics.client_errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        conn.send(e.to_frame());
    }
}
