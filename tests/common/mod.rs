//! Test harness: the real gateway on 127.0.0.1 port 0, and a real WebSocket client.
//!
//! Every wait has a generous timeout (a loaded 2-core CI machine is slow, not broken) and
//! absence is never asserted with a sleep: a test proves a client did *not* get something
//! by sending a later message on the same path and seeing that arrive first.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rtgate::{Running, Settings};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Long enough for a loaded CI machine; an event that takes this long is a bug.
pub const TIMEOUT: Duration = Duration::from_secs(20);

pub fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// Defaults as shipped, bound to a free loopback port, with the repository's plugins, and
/// with rate limits and per-IP caps out of the way: every test client shares 127.0.0.1 and
/// most tests publish far faster than a person types. The limits have their own tests
/// (`strict_settings`).
pub fn settings() -> Settings {
    let mut s = strict_settings();
    for bucket in s.rate_limits.buckets.values_mut() {
        bucket.per_minute = 10_000_000;
        bucket.burst = 1_000_000;
    }
    s.limits.max_connections_per_ip = 100_000;
    s.limits.new_connections_per_ip_per_second = 100_000;
    s
}

/// Defaults exactly as shipped, bound to a free loopback port, with the repository's plugins.
pub fn strict_settings() -> Settings {
    let mut s = Settings::defaults();
    s.server.bind = "127.0.0.1:0".parse().unwrap();
    s.plugins.dir = repo_path("plugins");
    s
}

pub struct Gw {
    pub running: Option<Running>,
    pub addr: SocketAddr,
    /// Holds the history database unless the test chose its own path.
    pub data: Option<tempfile::TempDir>,
}

impl Gw {
    /// Starts the gateway; a history path left at its default goes to a fresh temp dir.
    pub async fn start(mut settings: Settings) -> Gw {
        init_logs();
        let mut data = None;
        if settings.history.path == Settings::defaults().history.path {
            let dir = tempfile::tempdir().expect("tempdir");
            settings.history.path = dir.path().join("history.db");
            data = Some(dir);
        }
        let running = rtgate::start(settings).await.expect("gateway starts");
        let addr = running.addr;
        Gw { running: Some(running), addr, data }
    }

    pub fn gateway(&self) -> &std::sync::Arc<rtgate::gateway::Gateway> {
        &self.running.as_ref().expect("running").gateway
    }

    pub async fn default() -> Gw {
        Gw::start(settings()).await
    }

    pub fn url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// The value of one line of `/metrics`, e.g. `rtgate_events_total{type="chat"}`.
    pub async fn metric(&self, name: &str) -> f64 {
        metric(self.addr, name).await
    }

    pub fn http(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub async fn client(&self) -> Client {
        Client::connect(&self.url()).await
    }

    pub async fn shutdown(&mut self) {
        if let Some(running) = self.running.take() {
            running.shutdown().await;
        }
    }
}

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

pub struct Client {
    pub ws: Ws,
    pub id: String,
    pub welcome: Value,
}

impl Client {
    /// Connects and consumes the `welcome` message.
    pub async fn connect(url: &str) -> Client {
        let (ws, _) = tokio::time::timeout(TIMEOUT, tokio_tungstenite::connect_async(url))
            .await
            .expect("connect in time")
            .expect("connect");
        let mut client = Client { ws, id: String::new(), welcome: Value::Null };
        let welcome = client.recv().await;
        assert_eq!(welcome["type"], "welcome", "{welcome}");
        client.id = welcome["clientId"].as_str().expect("clientId").to_string();
        client.welcome = welcome;
        client
    }

    pub async fn send(&mut self, v: Value) {
        self.send_text(&v.to_string()).await;
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws.send(Message::text(text)).await.expect("send");
    }

    /// The next JSON message, skipping control frames; panics on close, or if none comes
    /// within [`TIMEOUT`] (pings do not extend the wait).
    pub async fn recv(&mut self) -> Value {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .unwrap_or_else(|_| panic!("client {} got nothing within {TIMEOUT:?}", self.id))
                .unwrap_or_else(|| panic!("client {}: stream ended", self.id))
                .unwrap_or_else(|e| panic!("client {}: {e}", self.id));
            match msg {
                Message::Text(t) => return serde_json::from_str(t.as_str()).expect("server sent JSON"),
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("client {}: unexpected frame {other:?}", self.id),
            }
        }
    }

    /// The next message, which must be of type `kind`.
    pub async fn expect(&mut self, kind: &str) -> Value {
        let msg = self.recv().await;
        assert_eq!(msg["type"], kind, "client {} expected {kind}, got {msg}", self.id);
        msg
    }

    pub async fn join(&mut self, room: &str) -> Value {
        self.send(json!({"type": "join_room", "room": room})).await;
        self.expect("room_joined").await
    }

    /// Sends `msg` and returns the error reply, which must have `code`.
    pub async fn expect_error(&mut self, msg: Value, code: &str) -> Value {
        self.send(msg).await;
        let reply = self.expect("error").await;
        assert_eq!(reply["code"], code, "{reply}");
        assert!(reply["message"].as_str().is_some_and(|m| !m.is_empty()), "{reply}");
        reply
    }

    /// Round-trips a message through the server, proving every earlier reply was read.
    /// Uses a join of a private scratch room, which only this client sees.
    pub async fn sync(&mut self) {
        let room = format!("sync-{}", &self.id[self.id.len() - 8..]);
        self.send(json!({"type": "join_room", "room": room})).await;
        let reply = self.expect("room_joined").await;
        assert_eq!(reply["room"], room.as_str());
        self.send(json!({"type": "leave_room", "room": room})).await;
    }

    /// Reads until the server closes; returns the close frame (None: closed without one).
    pub async fn expect_close(&mut self) -> Option<CloseFrame> {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await.expect("close within timeout") {
                Some(Ok(Message::Close(frame))) => return frame,
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return None,
            }
        }
    }

    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
        // Drain until the server's close reply, so the disconnect is complete.
        while let Ok(Some(Ok(_))) = tokio::time::timeout(TIMEOUT, self.ws.next()).await {}
    }
}

/// A minimal HTTP/1.1 GET over a raw socket: returns (status, headers lowercased, body).
pub async fn http_get(
    addr: SocketAddr,
    path: &str,
    extra_headers: &[(&str, &str)],
) -> (u16, Vec<(String, String)>, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in extra_headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    let read = async {
        // Read the head; a 101 leaves the socket open (a WebSocket), anything else is
        // read to the end (Connection: close).
        let mut chunk = [0u8; 4096];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut chunk).await.expect("read");
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        if !buf.starts_with(b"HTTP/1.1 101") {
            s.read_to_end(&mut buf).await.expect("read");
        }
    };
    tokio::time::timeout(TIMEOUT, read).await.expect("response in time");
    let text = String::from_utf8_lossy(&buf).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status: u16 = lines.next().and_then(|l| l.split(' ').nth(1)).and_then(|c| c.parse().ok()).expect("status");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (status, headers, body.to_string())
}

/// The value of one line of `/metrics` of the gateway at `addr`.
pub async fn metric(addr: SocketAddr, name: &str) -> f64 {
    let (status, _, body) = http_get(addr, "/metrics", &[]).await;
    assert_eq!(status, 200, "{body}");
    body.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("{name} missing from:\n{body}"))
        .parse()
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// Waits until a metric satisfies `want`, for state the gateway reaches in the background
/// with no event to await (a reservation released, a room unloaded). Polls every 20 ms,
/// for at most [`TIMEOUT`].
pub async fn await_metric(addr: SocketAddr, name: &str, want: impl Fn(f64) -> bool) -> f64 {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let value = metric(addr, name).await;
        if want(value) {
            return value;
        }
        assert!(tokio::time::Instant::now() < deadline, "{name} is still {value} after {TIMEOUT:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// Copies the repository's plugins, plus `extra` (name, source) scripts, into a temp dir.
pub fn plugin_dir(extra: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for entry in std::fs::read_dir(repo_path("plugins")).expect("plugins dir") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "lua") {
            std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).expect("copy");
        }
    }
    for (name, source) in extra {
        std::fs::write(dir.path().join(name), source).expect("write plugin");
    }
    dir
}
