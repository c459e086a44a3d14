//! Counters and histograms for `/healthz` and `/metrics` (Prometheus text format).
//!
//! Everything on the hot path is a relaxed atomic add: no lock, no allocation. Histograms
//! have fixed buckets, chosen once, so recording is a comparison loop and two adds.
//! Per-event-type counts for plugin events live with the routing table (see
//! `plugins::PluginHost::event_counts`), which is immutable between reloads.

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// A histogram with fixed upper bounds; values are recorded in whole units (µs, rows).
pub struct Histogram {
    bounds: &'static [u64],
    /// One counter per bound, plus the overflow (+Inf) bucket.
    buckets: Box<[AtomicU64]>,
    sum: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [u64]) -> Histogram {
        Histogram {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub fn record(&self, value: u64) {
        let i = self.bounds.iter().position(|b| value <= *b).unwrap_or(self.bounds.len());
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum.fetch_add(value, Relaxed);
        self.count.fetch_add(1, Relaxed);
    }

    pub fn record_duration(&self, d: Duration) {
        self.record(d.as_micros() as u64);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Relaxed)
    }

    /// Renders as a Prometheus histogram; `scale` converts the recorded unit to the metric's
    /// (1e-6 for µs → seconds).
    fn render(&self, out: &mut String, name: &str, help: &str, scale: f64) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, bound) in self.bounds.iter().enumerate() {
            cumulative += self.buckets[i].load(Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{}\"}} {cumulative}", *bound as f64 * scale);
        }
        cumulative += self.buckets[self.bounds.len()].load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
        let _ = writeln!(out, "{name}_sum {}", self.sum.load(Relaxed) as f64 * scale);
        let _ = writeln!(out, "{name}_count {}", self.count.load(Relaxed));
    }
}

const LATENCY_US: &[u64] = &[10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 50_000, 100_000, 1_000_000];
const BATCH_ROWS: &[u64] = &[1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096];

pub struct Metrics {
    pub connections: AtomicI64,
    pub connections_total: AtomicU64,
    pub rooms: AtomicI64,
    /// Core event types, by index in [`CORE_EVENTS`].
    pub core_events: [AtomicU64; CORE_EVENTS.len()],
    pub messages_out: AtomicU64,
    pub bytes_out: AtomicU64,
    /// Frames not delivered because the recipient was closing or had just overflowed.
    pub deliveries_dropped: AtomicU64,
    pub slow_consumers: AtomicU64,
    pub heartbeat_timeouts: AtomicU64,
    pub client_errors: AtomicU64,
    pub rate_limited: AtomicU64,
    pub upgrades_refused: AtomicU64,
    pub plugin_calls: AtomicU64,
    pub plugin_errors: AtomicU64,
    pub plugin_timeouts: AtomicU64,
    pub plugin_busy: AtomicU64,
    pub plugin_events_on_thread: AtomicU64,
    pub plugin_call_us: Histogram,
    pub history_batches: AtomicU64,
    pub history_rows: AtomicU64,
    pub history_commit_micros: AtomicU64,
    pub history_write_errors: AtomicU64,
    /// Messages delivered but not stored because the writer's queue was full.
    pub history_dropped: AtomicU64,
    /// Rooms whose history state is in memory.
    pub history_streams: AtomicI64,
    /// Rooms holding a sequence reservation ahead of their numbering.
    pub history_reserved_rooms: AtomicI64,
    pub history_batch_rows: Histogram,
    pub history_commit_us: Histogram,
}

/// Event types the core handles itself; "invalid" counts frames that did not parse.
pub const CORE_EVENTS: [&str; 5] = ["join_room", "leave_room", "refresh", "set_name", "invalid"];

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics {
            connections: AtomicI64::new(0),
            connections_total: AtomicU64::new(0),
            rooms: AtomicI64::new(0),
            core_events: Default::default(),
            messages_out: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            deliveries_dropped: AtomicU64::new(0),
            slow_consumers: AtomicU64::new(0),
            heartbeat_timeouts: AtomicU64::new(0),
            client_errors: AtomicU64::new(0),
            rate_limited: AtomicU64::new(0),
            upgrades_refused: AtomicU64::new(0),
            plugin_calls: AtomicU64::new(0),
            plugin_errors: AtomicU64::new(0),
            plugin_timeouts: AtomicU64::new(0),
            plugin_busy: AtomicU64::new(0),
            plugin_events_on_thread: AtomicU64::new(0),
            plugin_call_us: Histogram::new(LATENCY_US),
            history_batches: AtomicU64::new(0),
            history_rows: AtomicU64::new(0),
            history_commit_micros: AtomicU64::new(0),
            history_write_errors: AtomicU64::new(0),
            history_dropped: AtomicU64::new(0),
            history_streams: AtomicI64::new(0),
            history_reserved_rooms: AtomicI64::new(0),
            history_batch_rows: Histogram::new(BATCH_ROWS),
            history_commit_us: Histogram::new(LATENCY_US),
        }
    }
}

impl Metrics {
    pub fn connections_opened(&self) {
        self.connections.fetch_add(1, Relaxed);
        self.connections_total.fetch_add(1, Relaxed);
    }

    pub fn connections_closed(&self) {
        self.connections.fetch_sub(1, Relaxed);
    }

    pub fn rooms_created(&self) {
        self.rooms.fetch_add(1, Relaxed);
    }

    pub fn rooms_dropped(&self) {
        self.rooms.fetch_sub(1, Relaxed);
    }

    /// A batch handed to one socket: counted once per batch, not per frame.
    pub fn written(&self, frames: usize, bytes: usize) {
        self.messages_out.fetch_add(frames as u64, Relaxed);
        self.bytes_out.fetch_add(bytes as u64, Relaxed);
    }

    pub fn core_event(&self, kind: &str) {
        let i = CORE_EVENTS.iter().position(|k| *k == kind).unwrap_or(CORE_EVENTS.len() - 1);
        self.core_events[i].fetch_add(1, Relaxed);
    }

    /// The Prometheus exposition; `plugin_events` are `(type, count)` of plugin events.
    pub fn render(&self, plugin_events: &[(String, u64)]) -> String {
        let mut out = String::with_capacity(4096);
        let count = |c: &AtomicU64| ("counter", c.load(Relaxed).to_string());
        let gauge = |g: &AtomicI64| ("gauge", g.load(Relaxed).to_string());
        let lines = [
            ("rtgate_connections", "Open WebSocket connections.", gauge(&self.connections)),
            ("rtgate_connections_total", "WebSocket connections accepted.", count(&self.connections_total)),
            ("rtgate_rooms", "Rooms with at least one member.", gauge(&self.rooms)),
            ("rtgate_messages_out_total", "Frames written to client sockets.", count(&self.messages_out)),
            ("rtgate_bytes_out_total", "Payload bytes written to client sockets.", count(&self.bytes_out)),
            (
                "rtgate_deliveries_dropped_total",
                "Frames not delivered: the recipient was closing or overflowed.",
                count(&self.deliveries_dropped),
            ),
            (
                "rtgate_slow_consumers_total",
                "Connections closed for letting their queue overflow.",
                count(&self.slow_consumers),
            ),
            ("rtgate_heartbeat_timeouts_total", "Connections dropped as silent.", count(&self.heartbeat_timeouts)),
            ("rtgate_client_errors_total", "Error replies sent to clients.", count(&self.client_errors)),
            ("rtgate_rate_limited_total", "Events refused by rate limits.", count(&self.rate_limited)),
            ("rtgate_upgrades_refused_total", "Upgrades refused (auth, origin, caps).", count(&self.upgrades_refused)),
            ("rtgate_plugin_calls_total", "Plugin handler calls.", count(&self.plugin_calls)),
            ("rtgate_plugin_errors_total", "Plugin calls that raised an error.", count(&self.plugin_errors)),
            ("rtgate_plugin_timeouts_total", "Plugin calls stopped by the time budget.", count(&self.plugin_timeouts)),
            ("rtgate_plugin_busy_total", "Events refused because a plugin queue was full.", count(&self.plugin_busy)),
            (
                "rtgate_plugin_events_on_thread_total",
                "Client events run on their plugin's own thread: the plugin was busy, or sent there after a slow call. The rest ran on the runtime worker that received them.",
                count(&self.plugin_events_on_thread),
            ),
            ("rtgate_history_rows_total", "Messages committed to history.", count(&self.history_rows)),
            ("rtgate_history_write_errors_total", "History commits that failed.", count(&self.history_write_errors)),
            (
                "rtgate_history_dropped_total",
                "Messages delivered unstored because the writer queue was full.",
                count(&self.history_dropped),
            ),
            (
                "rtgate_history_rooms_in_memory",
                "Rooms whose history state (numbering, newest messages) is in memory.",
                gauge(&self.history_streams),
            ),
            (
                "rtgate_history_rooms_reserved",
                "Rooms that may deliver numbers ahead of their commit (batched durability); after a crash only these skip numbers.",
                gauge(&self.history_reserved_rooms),
            ),
        ];
        for (name, help, (kind, value)) in lines {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
        }
        let _ = writeln!(
            out,
            "# HELP rtgate_events_total Client events received, by type.\n# TYPE rtgate_events_total counter"
        );
        for (kind, counter) in CORE_EVENTS.iter().zip(&self.core_events) {
            let _ = writeln!(out, "rtgate_events_total{{type=\"{kind}\"}} {}", counter.load(Relaxed));
        }
        for (kind, count) in plugin_events {
            let _ = writeln!(out, "rtgate_events_total{{type=\"{kind}\"}} {count}");
        }
        self.plugin_call_us.render(&mut out, "rtgate_plugin_call_seconds", "Time spent in one plugin call.", 1e-6);
        self.history_batch_rows.render(&mut out, "rtgate_history_batch_rows", "Messages per history commit.", 1.0);
        self.history_commit_us.render(&mut out, "rtgate_history_commit_seconds", "Time of one history commit.", 1e-6);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::new(&[10, 100]);
        for v in [1, 10, 11, 1000] {
            h.record(v);
        }
        let mut out = String::new();
        h.render(&mut out, "x", "help", 1.0);
        assert!(out.contains("x_bucket{le=\"10\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"100\"} 3\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 4\n"), "{out}");
        assert!(out.contains("x_sum 1022\n") && out.contains("x_count 4\n"), "{out}");
    }
}
