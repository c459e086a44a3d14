//! What history does in the background, once a second: reopen a database that could not
//! be opened, checkpoint the WAL, enforce retention, and drop the in-memory state of rooms
//! nobody has used for `history.unload_after`.
//!
//! Unloading is what bounds memory by the rooms in use: anyone may publish to any room
//! name, and a stream kept for every room ever named would grow without end. An unloaded
//! room's numbering is in the database and is read back when the room is next used.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::History;
use super::StoreBox;

impl History {
    pub(super) async fn maintenance(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_retention = Instant::now();
        let mut last_retry = Instant::now();
        loop {
            tick.tick().await;
            self.unload_idle();
            let Some(store) = self.store.load_full() else {
                if last_retry.elapsed() >= self.settings.retry_interval {
                    last_retry = Instant::now();
                    self.try_open().await;
                }
                continue;
            };
            if let Err(e) = store.maintain().await {
                tracing::debug!("history maintenance: {e}");
            }
            if last_retention.elapsed() >= self.settings.retention_interval {
                last_retention = Instant::now();
                self.enforce_retention(&store, crate::clock::now_ms()).await;
            }
        }
    }

    /// Drops streams idle for `history.unload_after` whose state is all in the database:
    /// nothing in flight, no reservation, and nobody holding the stream.
    fn unload_idle(&self) {
        let ttl = self.settings.unload_after;
        // The map's shard lock is held while a stream is inspected: nobody can pick the
        // stream up between the check and the removal.
        self.streams.retain(|_, stream| {
            Arc::strong_count(stream) > 1 || {
                let st = stream.lock();
                !(st.settled() && st.last_used.elapsed() >= ttl)
            }
        });
        self.metrics.history_streams.store(self.streams.len() as i64, Ordering::Relaxed);
    }

    /// Deletes what retention allows of everything published so far, in small chunks so
    /// the writer never waits long.
    pub async fn enforce_retention_now(&self) {
        self.enforce_retention_at(crate::clock::now_ms()).await;
    }

    /// As [`History::enforce_retention_now`], with messages aged as if it were `now_ms`
    /// (milliseconds since the Unix epoch): retention by age without waiting for it.
    pub async fn enforce_retention_at(&self, now_ms: i64) {
        self.sync().await;
        if let Some(store) = self.store.load_full() {
            self.enforce_retention(&store, now_ms).await;
        }
    }

    async fn enforce_retention(&self, store: &StoreBox, now_ms: i64) {
        let mut deleted = 0;
        if self.settings.max_per_room > 0 {
            match store.trim_rooms(self.settings.max_per_room).await {
                Ok(n) => deleted += n,
                Err(e) => tracing::warn!("history retention (per room): {e}"),
            }
        }
        if !self.settings.max_age.is_zero() {
            let cutoff = now_ms - self.settings.max_age.as_millis() as i64;
            match store.expire(cutoff).await {
                Ok(n) => deleted += n,
                Err(e) => tracing::warn!("history retention (age): {e}"),
            }
        }
        if deleted > 0 {
            tracing::debug!(deleted, "history retention");
        }
    }
}
