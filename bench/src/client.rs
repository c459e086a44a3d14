//! One client connection: open it, wait for the welcome, join and leave rooms, close it
//! politely, each step bounded in time.
//!
//! Every scenario builds on these few steps, so they are written once and each returns an
//! error that names the step and the URL. Connections are plain TCP streams (no TLS enum)
//! with Nagle off, because the messages are small and latency is being measured; the read
//! buffer size is chosen per scenario since tungstenite allocates it eagerly: large for
//! fan-out, where one read should bring many frames, small for ten thousand idle sockets.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message, Utf8Bytes};

use crate::cli::LocalUrl;
use crate::error::{BenchError, Context, Result, bail};
use crate::wire;

pub type Ws = WebSocketStream<TcpStream>;

/// Read buffer for connections that mostly sit idle.
pub const IDLE_READ_BUFFER: usize = 4 * 1024;

/// Opens a WebSocket and waits for the server's `welcome`, all within `limit`.
pub async fn open(url: &LocalUrl, read_buffer: usize, limit: Duration) -> Result<Ws> {
    timeout(limit, async {
        let tcp = TcpStream::connect(url.addr()).await.with_context(|| format!("connecting to {url}"))?;
        tcp.set_nodelay(true).context("setting TCP_NODELAY")?;
        let config = WebSocketConfig::default().read_buffer_size(read_buffer);
        let (mut ws, _) = tokio_tungstenite::client_async_with_config(url.as_str(), tcp, Some(config))
            .await
            .with_context(|| format!("WebSocket handshake with {url}"))?;
        wait_for(&mut ws, "welcome", None).await?;
        Ok(ws)
    })
    .await
    .map_err(|_| BenchError::msg(format!("{url}: no welcome within {limit:?}")))?
}

/// Joins `room` and waits for its `room_joined` (skipping presence notices), within `limit`.
pub async fn join(ws: &mut Ws, room: &str, limit: Duration) -> Result<()> {
    timeout(limit, async {
        ws.send(Message::text(wire::join_frame(room))).await.with_context(|| format!("sending join_room {room}"))?;
        wait_for(ws, "room_joined", Some(room)).await
    })
    .await
    .map_err(|_| BenchError::msg(format!("no room_joined for {room} within {limit:?}")))?
}

/// Sends `leave_room`; the seed protocol has no reply to wait for.
pub async fn leave(ws: &mut Ws, room: &str) -> Result<()> {
    ws.send(Message::text(wire::leave_frame(room))).await.with_context(|| format!("sending leave_room {room}"))
}

/// Sends a close frame and waits (at most `limit`) for the server to finish the closing
/// handshake, so that the server, not the tool, is the side left in TIME_WAIT.
pub async fn close(ws: &mut Ws, limit: Duration) -> Result<()> {
    timeout(limit, async {
        match ws.close(None).await {
            Ok(()) | Err(tungstenite::Error::ConnectionClosed) => {}
            Err(e) => return Err(BenchError::msg(format!("sending close: {e}"))),
        }
        // Bounded by the timeout around it: whatever the server still had queued is read
        // and dropped until it closes its side.
        while let Some(msg) = ws.next().await {
            match msg {
                Ok(_) => {}
                Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => break,
                Err(e) => return Err(BenchError::msg(format!("closing: {e}"))),
            }
        }
        Ok(())
    })
    .await
    .map_err(|_| BenchError::msg(format!("close not acknowledged within {limit:?}")))?
}

/// The next text frame; `None` when the connection ended. Pings are answered by
/// tungstenite while it reads; binary frames are not part of the protocol and skipped.
pub async fn next_text(ws: &mut Ws) -> Result<Option<Utf8Bytes>> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(text))) => return Ok(Some(text)),
            Some(Ok(Message::Close(_))) | None => return Ok(None),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(BenchError::msg(format!("receiving: {e}"))),
        }
    }
}

/// Reads until a frame of type `kind` (and, if given, for `room`) arrives; an `error`
/// frame on the way fails with its code.
async fn wait_for(ws: &mut Ws, kind: &str, room: Option<&str>) -> Result<()> {
    // Bounded by the callers' timeouts; a server flooding notices would hit those.
    loop {
        let Some(text) = next_text(ws).await? else {
            bail!("connection closed while waiting for {kind}");
        };
        match wire::string_field(&text, "type") {
            Some(t) if t == kind && room.is_none_or(|r| wire::string_field(&text, "room") == Some(r)) => {
                return Ok(());
            }
            Some("error") => {
                let code = wire::string_field(&text, "code").unwrap_or("?");
                let why = wire::string_field(&text, "message").unwrap_or("");
                bail!("server error `{code}` while waiting for {kind}: {why}");
            }
            _ => {}
        }
    }
}

/// A short, stable name for a transport error, for the error counts of a report.
pub fn error_kind(e: &tungstenite::Error) -> &'static str {
    use tungstenite::Error as E;
    match e {
        E::ConnectionClosed | E::AlreadyClosed => "transport: closed",
        E::Io(io) if io.kind() == std::io::ErrorKind::ConnectionReset => "transport: connection reset",
        E::Io(_) => "transport: io error",
        E::Protocol(_) => "transport: protocol error",
        E::Capacity(_) => "transport: message too large",
        E::Utf8(_) => "transport: invalid utf-8",
        _ => "transport: other error",
    }
}
