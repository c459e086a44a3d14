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

use std::sync::atomic::Ordering;

use serde_json::Value;

use crate::auth::{self, AuthError};
use crate::config::AuthMode;
use crate::conn::{CloseReason, Conn, Profile};
use crate::error::ClientError;
use crate::gateway::Gateway;
use crate::plugins::HookMask;
use crate::protocol::{self, ClientEvent, Frame, RoomName};
use crate::sanitize::Sanitizer;

/// Batch buffers this small are released after use rather than kept.
const SMALL_BATCH: usize = 8;

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
                gw.metrics.heartbeat_timeouts.fetch_add(1, Ordering::Relaxed);
            }
            tracing::debug!(client = %conn.id, reason = reason.text(), "closing");
            reason.code().map(|code| (code, reason.text()))
        }
        End::TooBig => Some((1009, "message too big")),
        End::ClientClosed | End::Broken => None,
    };
    // Boxed: the closing handshake's futures (timers included) would otherwise enlarge the
    // state every idle session carries for its whole life.
    Box::pin(close_socket(&mut ws, close, &end)).await;
}

async fn close_socket<S>(ws: &mut WebSocketStream<S>, close: Option<(u16, &'static str)>, end: &End)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if let Some((code, reason)) = close {
        let frame = CloseFrame { code: CloseCode::from(code), reason: reason.into() };
        if let Ok(Ok(())) = tokio::time::timeout(CLOSE_TIMEOUT, ws.close(Some(frame))).await {
            // Read until the client hangs up: closing a socket with unread input makes the
            // kernel send a reset, which can destroy the close frame before it is read.
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, linger(ws, matches!(end, End::TooBig))).await;
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
    // On the heap: a buffer in this future would enlarge every idle session's state.
    let mut buf = vec![0u8; 4096];
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
    let mut strikes = Strikes::default();
    loop {
        tokio::select! {
            biased;
            _ = conn.outbox.ready() => {
                if let Some(reason) = conn.outbox.drain(&mut batch) {
                    return End::Closed(reason);
                }
                let bytes: usize = batch.iter().map(Frame::len).sum();
                gw.metrics.written(batch.len(), bytes);
                tokio::select! {
                    written = write_batch(ws, &mut batch) => {
                        if written.is_err() {
                            return End::Broken;
                        }
                        conn.outbox.written(bytes);
                        // A connection that only ever gets a message now and then should not
                        // keep two queue buffers for life; a busy one keeps its larger one.
                        if batch.capacity() <= SMALL_BATCH {
                            batch = VecDeque::new();
                        }
                    }
                    // The socket may be stuck behind a client that does not read; a close
                    // decided meanwhile (overflow, heartbeat, shutdown) must not wait for it.
                    reason = conn.outbox.closed() => return End::Closed(reason),
                }
            }
            frame = ws.next() => match frame {
                Some(Ok(message)) => {
                    conn.touch();
                    match message {
                        Message::Text(text) => handle_frame(gw, conn, Some(text.as_str()), &mut strikes).await,
                        Message::Binary(_) => handle_frame(gw, conn, None, &mut strikes).await,
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

/// Per-session abuse bookkeeping.
#[derive(Default)]
struct Strikes {
    /// Rate-limited events in a row.
    refused: u32,
}

/// Rate-limits, parses and dispatches one frame (`None`: a binary frame): the single place
/// a client event enters the gateway.
async fn handle_frame(gw: &Gateway, conn: &Arc<Conn>, text: Option<&str>, strikes: &mut Strikes) {
    let parsed = match text {
        Some(text) => ClientEvent::parse(text, gw.settings.limits.max_json_depth),
        None => Err(ClientError::BinaryFrame),
    };
    let kind = match &parsed {
        Ok(ClientEvent::Plugin { kind, .. }) => kind.as_str(),
        Ok(ClientEvent::JoinRoom { .. }) => "join_room",
        Ok(ClientEvent::LeaveRoom { .. }) => "leave_room",
        Ok(ClientEvent::Refresh { .. }) => "refresh",
        Ok(ClientEvent::SetName { .. }) => "set_name",
        Err(_) => "",
    };
    if !matches!(parsed, Ok(ClientEvent::Plugin { .. })) {
        // Plugin events are counted per type by the plugin host.
        gw.metrics.core_event(if kind.is_empty() { "invalid" } else { kind });
    }
    // Garbage counts too: a client cannot flood with malformed frames either.
    if let Err(wait) = gw.limits.check(&conn.budget, kind) {
        gw.metrics.rate_limited.fetch_add(1, Ordering::Relaxed);
        conn.send(ClientError::RateLimited { retry_after_ms: wait.as_millis().max(1) as u64 }.to_frame());
        strikes.refused += 1;
        if strikes.refused >= gw.limits.disconnect_after {
            conn.outbox.close(CloseReason::Policy("rate limit exceeded"));
        }
        return;
    }
    strikes.refused = 0;
    let result = match parsed {
        Ok(event) => dispatch(gw, conn, event).await,
        Err(e) => Err(e),
    };
    if let Err(e) = result {
        gw.metrics.client_errors.fetch_add(1, Ordering::Relaxed);
        conn.send(e.to_frame());
    }
}

async fn dispatch(gw: &Gateway, conn: &Arc<Conn>, event: ClientEvent) -> Result<(), ClientError> {
    let limits = &gw.settings.limits;
    match event {
        ClientEvent::JoinRoom { room, since } => {
            if !gw.auth.may_enter(&conn.identity.profile(), &room) {
                return Err(ClientError::Forbidden(room.to_string()));
            }
            if !conn.in_room(&room) && conn.room_count() >= limits.max_rooms_per_connection {
                return Err(ClientError::TooManyRooms(limits.max_rooms_per_connection));
            }
            // Boxed: the catch-up read is a large future, and only joins should pay for it.
            Box::pin(gw.hub.join(conn, &room, since)).await?;
            gw.plugins.hook(HookMask::JOIN, conn, Some(&room));
        }
        ClientEvent::LeaveRoom { room } => {
            gw.hub.leave(conn, &room)?;
            gw.plugins.hook(HookMask::LEAVE, conn, Some(&room));
        }
        ClientEvent::Refresh { token } => {
            if gw.auth.mode() != AuthMode::Jwt {
                return Err(ClientError::NotAllowed("there is no token to refresh in anonymous mode"));
            }
            let (user, profile) =
                gw.auth.verify(&token, limits.max_name_chars).map_err(|e| ClientError::InvalidToken(e.to_string()))?;
            if user != conn.identity.user_id {
                return Err(ClientError::InvalidToken(AuthError::OtherUser.to_string()));
            }
            let expires = profile.expires_at;
            conn.identity.set_profile(Profile { username: gw.sanitizer.clean(&profile.username).into(), ..profile });
            leave_rooms_no_longer_allowed(gw, conn);
            conn.send(protocol::token_refreshed(expires));
        }
        ClientEvent::SetName { name } => {
            if gw.auth.mode() != AuthMode::Anonymous {
                return Err(ClientError::NotAllowed("your name comes from your token"));
            }
            let name = auth::clean_name(&name, limits.max_name_chars)
                .ok_or(ClientError::InvalidName(limits.max_name_chars))?;
            let name: Arc<str> = gw.sanitizer.clean(&name).into();
            conn.identity.set_username(name.clone());
            conn.send(protocol::name_set(&name));
        }
        ClientEvent::Plugin { kind, mut body } => {
            if let Some(Value::String(room)) = body.get("room")
                && let Ok(room) = RoomName::parse(room)
                && !gw.auth.may_enter(&conn.identity.profile(), &room)
            {
                return Err(ClientError::Forbidden(room.to_string()));
            }
            // Counted as sent, before cleaning: what the user typed is what is limited.
            if let Some(Value::String(message)) = body.get("message")
                && message.chars().count() > limits.max_message_chars
            {
                return Err(ClientError::MessageTooLong);
            }
            gw.sanitizer.clean_event(&mut body);
            if let Some(Value::String(message)) = body.get("message")
                && Sanitizer::is_blank(message)
            {
                return Err(ClientError::EmptyMessage);
            }
            gw.plugins.dispatch(conn, &kind, body)?;
        }
    }
    Ok(())
}

/// A refreshed token's rooms apply to the rooms already joined: each one it no longer allows
/// is left as by `leave_room` (`user_left` to the others, the plugins' leave hooks), and the
/// client is told with `room_left`.
fn leave_rooms_no_longer_allowed(gw: &Gateway, conn: &Arc<Conn>) {
    let profile = conn.identity.profile();
    for room in conn.rooms() {
        if !gw.auth.may_enter(&profile, &room) && gw.hub.leave(conn, &room).is_ok() {
            gw.plugins.hook(HookMask::LEAVE, conn, Some(&room));
            let why = format!("Your new token does not allow room \"{room}\"");
            conn.send(protocol::room_left(&room, "forbidden", &why));
        }
    }
}
