//! Benchmarks that run the gateway inside this process, for what a black-box client cannot
//! isolate: the cost of the Lua hop (the same fan-out with the plugin call replaced by the
//! same work in Rust), and the rate at which history persists messages.
//!
//! The gateway is the real one (`rtgate::start`, the repository's plugins, the shipped
//! settings but for rate limits and, for the history run, the database path); only the
//! handler of `chat` differs between the two halves of the Lua-hop run. Subscribers are real
//! WebSocket clients on 127.0.0.1 in the same process, so both halves pay for them alike
//! and the ratio is what counts.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use tokio_tungstenite::tungstenite::Message;

use crate::cli::{HistoryArgs, LuaHopArgs};
use crate::error::{BenchError, Context, Result};

fn settings(history: bool, db: &Path) -> rtgate::Settings {
    let mut s = rtgate::Settings::defaults();
    s.server.bind = "127.0.0.1:0".parse().expect("a literal address");
    s.plugins.dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins");
    s.history.enabled = history;
    s.history.path = db.to_path_buf();
    // Limits stay on the hot path with budgets no benchmark reaches.
    for bucket in s.rate_limits.buckets.values_mut() {
        bucket.per_minute = 1_000_000_000;
        bucket.burst = 1_000_000_000;
    }
    s.limits.max_connections_per_ip = 1_000_000;
    s.limits.new_connections_per_ip_per_second = 1_000_000;
    s.log.filter = "warn".into();
    s
}

/// Runs `f` on a fresh two-thread runtime (the gateway's own shape) on its own OS thread,
/// since the caller already runs inside a single-threaded one.
fn on_runtime<T: Send + 'static>(f: impl std::future::Future<Output = Result<T>> + Send + 'static) -> Result<T> {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| BenchError::msg(format!("runtime: {e}")))?;
        rt.block_on(f)
    })
    .join()
    .map_err(|_| BenchError::msg("benchmark thread panicked"))?
}

#[derive(Serialize, Debug)]
pub struct LuaHopResult {
    pub members: u32,
    pub in_flight: u32,
    pub seconds: f64,
    pub rounds: u32,
    /// Medians over the rounds.
    pub with_plugin_deliveries_per_s: f64,
    pub plugin_skipped_deliveries_per_s: f64,
    /// Median over the rounds of 1 − with/skipped: the share of throughput the Lua hop
    /// costs.
    pub lua_hop_cost: f64,
    /// `(with, skipped)` deliveries/s of each round.
    pub per_round: Vec<(f64, f64)>,
}

pub fn lua_hop(args: &LuaHopArgs) -> Result<LuaHopResult> {
    let args = args.clone();
    on_runtime(async move {
        // On a worker, like every other task here: the publisher must not get a thread of
        // its own that the gateway does not.
        tokio::spawn(lua_hop_run(args)).await.map_err(|e| BenchError::msg(e.to_string()))?
    })
}

async fn lua_hop_run(args: LuaHopArgs) -> Result<LuaHopResult> {
    {
        let dir = tempfile_dir()?;
        let running =
            rtgate::start(settings(false, &dir.join("unused.db"))).await.map_err(|e| BenchError::msg(e.to_string()))?;
        let url = format!("ws://{}/ws", running.addr);
        let received = Arc::new(AtomicU64::new(0));
        let mut readers = Vec::new();
        for _ in 0..args.members.saturating_sub(1) {
            let mut ws = join(&url, "hop").await?;
            let received = received.clone();
            readers.push(tokio::spawn(async move {
                while let Some(Ok(msg)) = ws.next().await {
                    if matches!(msg, Message::Text(_)) {
                        received.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
        let publisher = join(&url, "hop").await?;
        let (mut sink, mut echoes) = publisher.split();
        let seen = Arc::new(AtomicU64::new(0));
        let echoed = Arc::new(tokio::sync::Notify::new());
        let (seen_by_reader, echo) = (seen.clone(), echoed.clone());
        readers.push(tokio::spawn(async move {
            while let Some(Ok(msg)) = echoes.next().await {
                if let Message::Text(t) = msg
                    && t.as_str().contains("\"chat_message\"")
                {
                    seen_by_reader.fetch_add(1, Ordering::Relaxed);
                    echo.notify_one();
                }
            }
        }));
        // The plugin half sends `chat`: socket → session → chat.lua → fan-out. The skipped
        // half sends the same frame typed `chat_rust`, which goes down the same path to a
        // Rust handler doing what chat.lua does: the difference is the Lua hop as a whole
        // (the conversions to and from Lua, the script, any thread hand-off). One gateway
        // serves both, alternating, so that a noisy moment hurts one round, not one side.
        let mut native = std::collections::HashMap::new();
        native.insert("chat_rust".to_string(), native_chat());
        if running.gateway.plugins.set_native(native).is_err() {
            return Err(BenchError::msg("native handlers were already installed"));
        }
        let text = "x".repeat(100);
        let frame = |kind: &str| serde_json::json!({"type": kind, "room": "hop", "message": text}).to_string();
        let (through_lua, through_rust) = (frame("chat"), frame("chat_rust"));
        let mut publisher = Publisher {
            sink: &mut sink,
            window: u64::from(args.in_flight),
            sent: 0,
            seen: &seen,
            echoed: &echoed,
            received: &received,
        };
        let duration = Duration::from_secs_f64(args.duration);
        let mut per_round = Vec::new();
        for round in 0..args.rounds {
            // Lua first in odd rounds, Rust first in even ones.
            let (with, skipped) = if round % 2 == 0 {
                let with = publisher.measure(duration, &through_lua).await?;
                (with, publisher.measure(duration, &through_rust).await?)
            } else {
                let skipped = publisher.measure(duration, &through_rust).await?;
                (publisher.measure(duration, &through_lua).await?, skipped)
            };
            per_round.push((with, skipped));
        }
        for r in readers {
            r.abort();
        }
        running.shutdown().await;
        let _ = std::fs::remove_dir_all(&dir);
        Ok(LuaHopResult {
            members: args.members,
            in_flight: args.in_flight,
            seconds: args.duration,
            rounds: args.rounds,
            with_plugin_deliveries_per_s: median(per_round.iter().map(|r| r.0)),
            plugin_skipped_deliveries_per_s: median(per_round.iter().map(|r| r.1)),
            lua_hop_cost: median(per_round.iter().map(|(with, skipped)| 1.0 - with / skipped)),
            per_round,
        })
    }
}

/// chat.lua in Rust: a room's chat message, built the same way, cleaned and serialized
/// once, published (persisted, as chat.lua does by default) to the room.
fn native_chat() -> rtgate::plugins::NativeHandler {
    Box::new(|host, conn, body| {
        let refuse = |code: &str, message: &str| rtgate::error::ClientError::Rejected {
            code: code.to_string(),
            message: message.to_string(),
        };
        let Some(serde_json::Value::String(message)) = body.get("message") else {
            return Err(refuse("invalid_message", "\"message\" must be a string"));
        };
        let Some(serde_json::Value::String(room)) = body.get("room") else {
            return Err(refuse("invalid_room", "\"room\" must be a string"));
        };
        let room = rtgate::protocol::RoomName::parse(room).map_err(|e| refuse(e.code(), &e.to_string()))?;
        let timestamp = rtgate::clock::now_ms();
        let out = serde_json::json!({
            "type": "chat_message",
            "clientId": &*conn.id,
            "message": message,
            "timestamp": timestamp,
            "room": room.as_str(),
            "username": &*conn.identity.username(),
        });
        host.broker.publish(&room, host.sanitizer.clean_output(out.to_string()), None, true);
        Ok(())
    })
}

fn median(values: impl Iterator<Item = f64>) -> f64 {
    crate::stats::median(&values.collect::<Vec<_>>()).unwrap_or(f64::NAN)
}

/// The publishing client of the Lua-hop run, and the counts it paces itself by.
struct Publisher<'a> {
    sink: &'a mut futures_util::stream::SplitSink<Ws, Message>,
    /// Messages that may be sent and not yet echoed back.
    window: u64,
    sent: u64,
    /// Echoes of its own messages the publisher has read.
    seen: &'a AtomicU64,
    echoed: &'a tokio::sync::Notify,
    /// Messages the other members have read.
    received: &'a AtomicU64,
}

impl Publisher<'_> {
    /// Keeps `window` messages in flight for a warm-up second and then `duration`, and
    /// returns deliveries/s over the measured part.
    async fn measure(&mut self, duration: Duration, frame: &str) -> Result<f64> {
        let delivered = || self.received.load(Ordering::Relaxed) + self.seen.load(Ordering::Relaxed);
        let warm_until = Instant::now() + Duration::from_secs(1);
        let mut start: Option<(Instant, u64)> = None;
        loop {
            let now = Instant::now();
            if start.is_none() && now >= warm_until {
                start = Some((now, delivered()));
            }
            if let Some((t0, r0)) = start
                && now.duration_since(t0) >= duration
            {
                let total = delivered() - r0;
                // Let what is in flight land before the next phase starts counting.
                // The reader's `notify_one` leaves a permit when nobody waits, so an echo
                // landing between the check and the await is not missed.
                let drain_until = tokio::time::Instant::now() + Duration::from_secs(10);
                while self.seen.load(Ordering::Relaxed) < self.sent {
                    if tokio::time::timeout_at(drain_until, self.echoed.notified()).await.is_err() {
                        break;
                    }
                }
                return Ok(total as f64 / now.duration_since(t0).as_secs_f64());
            }
            if self.sent - self.seen.load(Ordering::Relaxed) < self.window {
                self.sink.send(Message::text(frame.to_string())).await.context("publishing")?;
                self.sent += 1;
            } else {
                // Sleep until an echo frees a slot (bounded, so the clock checks above still run).
                let _ = tokio::time::timeout(Duration::from_millis(50), self.echoed.notified()).await;
            }
        }
    }
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Connects, joins `room`, and reads until `room_joined`.
async fn join(url: &str, room: &str) -> Result<Ws> {
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.context("connecting")?;
    ws.send(Message::text(format!("{{\"type\":\"join_room\",\"room\":\"{room}\"}}"))).await.context("joining")?;
    while let Some(msg) = ws.next().await {
        if let Message::Text(t) = msg.context("reading")?
            && t.as_str().contains("\"room_joined\"")
        {
            return Ok(ws);
        }
    }
    Err(BenchError::msg("connection closed while joining"))
}

#[derive(Serialize, Debug)]
pub struct HistoryResult {
    pub durability: String,
    pub rooms: u32,
    pub seconds: f64,
    pub persisted_per_s: f64,
    pub mean_batch_rows: f64,
    pub mean_commit_ms: f64,
    pub database: String,
}

/// Publishes as fast as the writer keeps up into `rooms` rooms (no subscribers: this is
/// the persistence path alone) and counts committed rows.
pub fn history(args: &HistoryArgs) -> Result<HistoryResult> {
    let args = args.clone();
    on_runtime(async move {
        let dir = tempfile_dir()?;
        let db = dir.join("history.db");
        let mut s = settings(true, &db);
        s.history.durability = match args.durability.as_str() {
            "batched" => rtgate::config::Durability::Batched,
            _ => rtgate::config::Durability::PerMessage,
        };
        let running = rtgate::start(s).await.map_err(|e| BenchError::msg(e.to_string()))?;
        let gw = running.gateway.clone();
        let metrics = gw.metrics.clone();
        let rooms: Vec<rtgate::protocol::RoomName> = (0..args.rooms)
            .map(|i| rtgate::protocol::RoomName::parse(&format!("h{i}")).map_err(|e| BenchError::msg(e.to_string())))
            .collect::<Result<_>>()?;
        let body = serde_json::json!({"type": "chat_message", "clientId": "client_bench", "message": "x".repeat(100),
            "timestamp": 0, "username": "guest-bench"})
        .to_string();
        // Never more than this many published and not yet committed: the writer's queue
        // (65,536) must not overflow, or messages would be delivered unstored.
        let window = 16_384u64;
        let rows = || metrics.history_rows.load(Ordering::Relaxed);
        let run = |seconds: f64| {
            let (gw, rooms, body) = (gw.clone(), rooms.clone(), body.clone());
            let metrics = metrics.clone();
            async move {
                let until = Instant::now() + Duration::from_secs_f64(seconds);
                let mut published = 0u64;
                let base = metrics.history_rows.load(Ordering::Relaxed);
                while Instant::now() < until {
                    if published - (metrics.history_rows.load(Ordering::Relaxed) - base) >= window {
                        tokio::task::yield_now().await;
                        continue;
                    }
                    for room in &rooms {
                        gw.hub.publish(room, body.clone(), None, true);
                    }
                    published += rooms.len() as u64;
                }
            }
        };
        run(1.0).await;
        let (r0, b0, c0) = (
            rows(),
            metrics.history_batches.load(Ordering::Relaxed),
            metrics.history_commit_micros.load(Ordering::Relaxed),
        );
        let t0 = Instant::now();
        run(args.duration).await;
        let elapsed = t0.elapsed().as_secs_f64();
        let (r1, b1, c1) = (
            rows(),
            metrics.history_batches.load(Ordering::Relaxed),
            metrics.history_commit_micros.load(Ordering::Relaxed),
        );
        running.shutdown().await;
        let _ = std::fs::remove_dir_all(&dir);
        let batches = (b1 - b0).max(1) as f64;
        Ok(HistoryResult {
            durability: args.durability.clone(),
            rooms: args.rooms,
            seconds: elapsed,
            persisted_per_s: (r1 - r0) as f64 / elapsed,
            mean_batch_rows: (r1 - r0) as f64 / batches,
            mean_commit_ms: (c1 - c0) as f64 / batches / 1000.0,
            database: db.display().to_string(),
        })
    })
}

/// A scratch directory under `target/` (on disk, unlike a tmpfs /tmp on some machines).
fn tempfile_dir() -> Result<std::path::PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target").join(format!(
        "rtgate-bench-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir).context("creating a scratch directory")?;
    Ok(dir)
}

pub fn lua_hop_table(r: &LuaHopResult) -> String {
    format!(
        "lua-hop ({} members, {} in flight, {:.0} s each, medians of {} rounds)\n  through chat.lua      {:>12.0} deliveries/s\n  plugin call skipped   {:>12.0} deliveries/s (chat done in Rust)\n  Lua hop costs         {:>11.1} % of throughput (target < 15 %; rounds: {})",
        r.members,
        r.in_flight,
        r.seconds,
        r.rounds,
        r.with_plugin_deliveries_per_s,
        r.plugin_skipped_deliveries_per_s,
        r.lua_hop_cost * 100.0,
        r.per_round.iter().map(|(w, s)| format!("{:.1} %", (1.0 - w / s) * 100.0)).collect::<Vec<_>>().join(", ")
    )
}

pub fn history_table(r: &HistoryResult) -> String {
    format!(
        "history ({} durability, {} rooms, {:.1} s, database on disk: {})\n  persisted             {:>12.0} messages/s (target >= 50,000)\n  mean batch            {:>12.1} rows\n  mean commit           {:>12.3} ms",
        r.durability, r.rooms, r.seconds, r.database, r.persisted_per_s, r.mean_batch_rows, r.mean_commit_ms
    )
}
