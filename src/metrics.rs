//! Counters for `/healthz` and `/metrics`: plain atomics, so that counting on the hot path
//! costs one relaxed add and never a lock.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

#[derive(Default)]
pub struct Metrics {
    pub connections: AtomicI64,
    pub connections_total: AtomicU64,
    pub rooms: AtomicI64,
    pub events_in: AtomicU64,
    pub messages_out: AtomicU64,
    pub bytes_out: AtomicU64,
    pub slow_consumers: AtomicU64,
    pub heartbeat_timeouts: AtomicU64,
    pub client_errors: AtomicU64,
    pub plugin_calls: AtomicU64,
    pub plugin_errors: AtomicU64,
    pub plugin_timeouts: AtomicU64,
    pub plugin_busy: AtomicU64,
    pub rate_limited: AtomicU64,
    pub upgrades_refused: AtomicU64,
    pub history_batches: AtomicU64,
    pub history_rows: AtomicU64,
    pub history_commit_micros: AtomicU64,
    pub history_write_errors: AtomicU64,
    /// Messages delivered but not stored because the writer's queue was full.
    pub history_dropped: AtomicU64,
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

    pub fn delivered(&self, messages: usize, bytes_each: usize) {
        if messages > 0 {
            self.messages_out.fetch_add(messages as u64, Relaxed);
            self.bytes_out.fetch_add((messages * bytes_each) as u64, Relaxed);
        }
    }

    pub fn slow_consumer(&self) {
        self.slow_consumers.fetch_add(1, Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Relaxed)
    }
}
