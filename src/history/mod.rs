//! Room history: sequence numbers, the group-commit writer, replay, catch-up, retention,
//! and staying up when the disk does not.
//!
//! Every room that has persisted messages has a [`Stream`]: its last sequence number and
//! the newest few delivered frames. Numbers are assigned under the stream's lock, before
//! fan-out, so they increase by one per message with no gap. The frames go to one writer
//! task that commits them in batches; with `per_message` durability the writer also
//! delivers them, after their batch is committed, so nothing a client has seen can be lost
//! to a crash. A reconnecting client's catch-up is read from the database and completed
//! from the in-memory tail under the same lock fan-out takes, which is what makes it exact:
//! every message is either in the catch-up or delivered live after it, never both.
//!
//! The database is never on the path that keeps chat alive: if it cannot be opened, or
//! writes fail, messages are still delivered, the failure is logged and shown in
//! `/healthz`, and history resumes when the disk recovers.

mod store;

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use dashmap::DashMap;
use parking_lot::{Mutex, MutexGuard};
use tokio::sync::{mpsc, oneshot, watch};

pub use store::Page;
use store::{Record, Store, StoreError};

use crate::config::{Durability, HistorySettings};
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::protocol::{Frame, RoomName};

/// The state of persistence, for `/healthz` and for tests to await.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    Disabled,
    Ok,
    /// The database is open but the last write failed (messages are delivered, not stored).
    Degraded(String),
    /// The database cannot be opened; retried every `history.retry_interval`.
    Unavailable(String),
}

impl Health {
    pub fn label(&self) -> &'static str {
        match self {
            Health::Disabled => "disabled",
            Health::Ok => "ok",
            Health::Degraded(_) => "degraded",
            Health::Unavailable(_) => "unavailable",
        }
    }

    pub fn error(&self) -> Option<&str> {
        match self {
            Health::Degraded(e) | Health::Unavailable(e) => Some(e),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("history is disabled")]
    Disabled,
    #[error("history is unavailable: {0}")]
    Unavailable(String),
}

/// One room's numbering and its newest delivered frames.
pub struct Stream {
    state: Mutex<StreamState>,
}

pub struct StreamState {
    /// Highest sequence number assigned.
    last_seq: u64,
    /// Highest sequence number delivered live (with `per_message` durability it trails
    /// `last_seq` by the messages awaiting their commit).
    delivered: u64,
    /// Highest sequence number the writer is done with (committed, or failed for good).
    committed: u64,
    /// Delivered frames, contiguous and ascending by seq: every one not yet committed
    /// (a catch-up cannot read those from the database), plus the newest
    /// `history.recent`, so that a quick reconnect needs no database read at all.
    recent: VecDeque<(u64, Frame)>,
}

impl Stream {
    fn new(last_seq: u64) -> Stream {
        Stream {
            state: Mutex::new(StreamState {
                last_seq,
                delivered: last_seq,
                committed: last_seq,
                recent: VecDeque::new(),
            }),
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, StreamState> {
        self.state.lock()
    }
}

impl StreamState {
    pub fn next_seq(&mut self) -> u64 {
        self.last_seq += 1;
        self.last_seq
    }

    pub fn delivered(&self) -> u64 {
        self.delivered
    }

    /// Records that `seq` was delivered as `frame`.
    pub fn mark_delivered(&mut self, seq: u64, frame: &Frame, keep: usize) {
        self.delivered = seq;
        if self.recent.back().is_some_and(|(last, _)| *last + 1 != seq) {
            // A hole (the writer was overwhelmed): the tail restarts here.
            self.recent.clear();
        }
        self.recent.push_back((seq, frame.clone()));
        self.trim(keep);
    }

    pub fn mark_committed(&mut self, seq: u64, keep: usize) {
        self.committed = self.committed.max(seq);
        self.trim(keep);
    }

    fn trim(&mut self, keep: usize) {
        while self.recent.len() > keep && self.recent.front().is_some_and(|(s, _)| *s <= self.committed) {
            self.recent.pop_front();
        }
    }

    /// How a joiner that saw everything up to `since` catches up, decided under the lock
    /// that fan-out takes: what memory supplies now, and what range (if any) must come from
    /// the database first.
    pub fn plan_catch_up(&self, since: u64) -> CatchUpPlan {
        let seq = self.delivered;
        let from_memory = |after: u64| self.recent.iter().filter(|(s, _)| *s > after).cloned().collect();
        if since >= seq || self.recent.front().is_some_and(|(first, _)| *first <= since + 1) {
            return CatchUpPlan { seq, read: None, frames: from_memory(since) };
        }
        // Everything not in memory is committed: the database has (since, read_to].
        let read_to = self.recent.front().map_or(seq, |(first, _)| first - 1).min(seq);
        CatchUpPlan { seq, read: Some(read_to), frames: from_memory(read_to) }
    }
}

/// See [`StreamState::plan_catch_up`].
pub struct CatchUpPlan {
    /// The room's delivered sequence number at the join.
    pub seq: u64,
    /// Read `(since, read_to]` from the database, to go before `frames`.
    pub read: Option<u64>,
    /// `(seq, frame)` from memory, ascending.
    pub frames: Vec<(u64, Frame)>,
}

/// A message on its way to the writer.
pub(crate) struct Pending {
    pub room: RoomName,
    pub stream: Arc<Stream>,
    pub seq: u64,
    pub created_ms: i64,
    pub frame: Frame,
    /// `per_message` durability: deliver after the commit, leaving this client out.
    pub deliver: Option<Option<Arc<str>>>,
}

enum ToWriter {
    Write(Pending),
    /// Commit what was queued before it, then answer.
    Sync(oneshot::Sender<()>),
    /// As `Sync`, then give the database connection back and stop (shutdown).
    Stop(oneshot::Sender<()>),
}

pub struct History {
    settings: HistorySettings,
    streams: DashMap<RoomName, Arc<Stream>>,
    store: ArcSwapOption<Store>,
    writes: mpsc::Sender<ToWriter>,
    /// Taken by `start_tasks`.
    writer_rx: Mutex<Option<mpsc::Receiver<ToWriter>>>,
    health: watch::Sender<Health>,
    metrics: Arc<Metrics>,
}

impl History {
    /// Opens the database (or notes why it cannot) and loads every room's numbering.
    pub async fn open(settings: HistorySettings, metrics: Arc<Metrics>) -> Arc<History> {
        let (writes, writer_rx) = mpsc::channel(settings.queue);
        let initial = if settings.enabled { Health::Unavailable("not opened yet".into()) } else { Health::Disabled };
        let history = Arc::new(History {
            settings,
            streams: DashMap::new(),
            store: ArcSwapOption::empty(),
            writes,
            writer_rx: Mutex::new(Some(writer_rx)),
            health: watch::channel(initial).0,
            metrics,
        });
        if history.settings.enabled {
            history.try_open().await;
        }
        history
    }

    /// History switched off, for tools that need a hub but serve nothing (`--check`).
    pub fn disabled(metrics: Arc<Metrics>) -> Arc<History> {
        let mut settings = crate::config::Settings::defaults().history;
        settings.enabled = false;
        let (writes, _) = mpsc::channel(1);
        Arc::new(History {
            settings,
            streams: DashMap::new(),
            store: ArcSwapOption::empty(),
            writes,
            writer_rx: Mutex::new(None),
            health: watch::channel(Health::Disabled).0,
            metrics,
        })
    }

    async fn try_open(&self) -> bool {
        let result = async {
            let store = Store::open(&self.settings).await?;
            store.begin_run(self.unclean_margin()).await?;
            let seqs = store.last_seqs().await?;
            Ok::<_, StoreError>((store, seqs))
        }
        .await;
        match result {
            Ok((store, seqs)) => {
                for (name, last) in seqs {
                    let Ok(room) = RoomName::parse(&name) else { continue };
                    let stream = self.streams.entry(room).or_insert_with(|| Arc::new(Stream::new(last))).clone();
                    let mut st = stream.lock();
                    // Numbering already moved on in memory (the database came back later):
                    // keep the higher, never reuse a number.
                    if last > st.last_seq {
                        st.last_seq = last;
                        st.delivered = last;
                    }
                }
                self.store.store(Some(Arc::new(store)));
                tracing::info!(path = %self.settings.path.display(), rooms = self.streams.len(), "history open");
                self.set_health(Health::Ok);
                true
            }
            Err(e) => {
                self.set_health(Health::Unavailable(e.to_string()));
                false
            }
        }
    }

    /// The most messages this run can deliver before committing them: with `batched`
    /// durability, a full queue and the batch being committed.
    fn unclean_margin(&self) -> u64 {
        match self.settings.durability {
            Durability::PerMessage => 0,
            Durability::Batched => (self.settings.queue + self.settings.batch_max) as u64,
        }
    }

    fn set_health(&self, health: Health) {
        self.health.send_if_modified(|current| {
            if *current == health {
                return false;
            }
            match &health {
                Health::Ok if *current != Health::Disabled => tracing::info!("history: writing again"),
                Health::Degraded(e) => tracing::error!("history degraded, messages are delivered but not stored: {e}"),
                Health::Unavailable(e) => {
                    tracing::error!(path = %self.settings.path.display(), "history unavailable, will retry: {e}")
                }
                _ => {}
            }
            *current = health;
            true
        });
    }

    pub fn health(&self) -> watch::Receiver<Health> {
        self.health.subscribe()
    }

    pub fn settings(&self) -> &HistorySettings {
        &self.settings
    }

    /// The stream of `room`, created at zero if the room never had a persisted message.
    /// `None` while the database is not open: numbering cannot continue safely without it,
    /// so such messages are delivered without a `seq`.
    pub fn stream(&self, room: &RoomName) -> Option<Arc<Stream>> {
        if let Some(stream) = self.streams.get(room) {
            return Some(stream.clone());
        }
        self.store.load().as_ref()?;
        Some(self.streams.entry(room.clone()).or_insert_with(|| Arc::new(Stream::new(0))).clone())
    }

    /// An existing stream only (a join does not create one).
    pub fn existing(&self, room: &RoomName) -> Option<Arc<Stream>> {
        self.streams.get(room).map(|s| s.clone())
    }

    pub fn durability(&self) -> Durability {
        self.settings.durability
    }

    /// Queues a message for the writer. Fails when the queue is full; the caller then
    /// delivers it anyway, unstored.
    pub(crate) fn enqueue(&self, pending: Pending) -> Result<(), Pending> {
        match self.writes.try_send(ToWriter::Write(pending)) {
            Ok(()) => Ok(()),
            Err(
                mpsc::error::TrySendError::Full(ToWriter::Write(p))
                | mpsc::error::TrySendError::Closed(ToWriter::Write(p)),
            ) => {
                self.metrics.history_dropped.fetch_add(1, Ordering::Relaxed);
                self.set_health(Health::Degraded("the write queue is full".into()));
                Err(p)
            }
            Err(_) => unreachable!("only writes are sent with try_send"),
        }
    }

    /// Completes a catch-up plan: reads `(since, read_to]` from the database when the plan
    /// says so, puts it before what memory supplied, keeps the newest
    /// `history.max_catchup`, and reports a gap `(since, first)` when older messages are
    /// missing (expired, beyond the limit, or unreadable).
    pub async fn finish_catch_up(
        &self,
        room: &RoomName,
        since: u64,
        plan: CatchUpPlan,
    ) -> (Vec<Frame>, Option<(u64, Option<u64>)>) {
        let max = self.settings.max_catchup as usize;
        let mut items = Vec::new();
        if let Some(read_to) = plan.read {
            let rows = match self.store.load_full() {
                Some(store) => store.range(room.as_str(), since, read_to, max as u32).await.map_err(|e| e.to_string()),
                None => Err("history is not open".to_string()),
            };
            match rows {
                Ok(rows) => items.extend(rows.into_iter().map(|(s, body)| (s, Frame::text(body)))),
                Err(e) => tracing::debug!("catch-up read failed: {e}"),
            }
        }
        items.extend(plan.frames);
        if items.len() > max {
            items.drain(..items.len() - max);
        }
        let first = items.first().map_or(plan.seq + 1, |(s, _)| *s);
        let gap = (first > since + 1).then_some((since, Some(first)));
        (items.into_iter().map(|(_, f)| f).collect(), gap)
    }

    /// Delivered frames kept in memory per room beyond the uncommitted ones: no more than
    /// retention keeps, so memory never replays what the database has dropped.
    pub fn keep(&self) -> usize {
        match self.settings.max_per_room {
            0 => self.settings.recent,
            cap => self.settings.recent.min(cap as usize),
        }
    }

    fn unavailable(&self) -> HistoryError {
        match &*self.health.borrow() {
            Health::Disabled => HistoryError::Disabled,
            other => HistoryError::Unavailable(other.error().unwrap_or("not open").to_string()),
        }
    }

    /// A page of a room's history (see `GET /rooms/{room}/history`).
    pub async fn page(&self, room: &RoomName, page: Page, limit: u32) -> Result<HistoryPage, HistoryError> {
        let store = self.store.load_full().ok_or_else(|| self.unavailable())?;
        let (messages, newer, older) =
            store.page(room.as_str(), page, limit).await.map_err(|e| HistoryError::Unavailable(e.to_string()))?;
        Ok(HistoryPage {
            next: if newer { messages.last().map(|(s, _)| *s) } else { None },
            prev: if older { messages.first().map(|(s, _)| *s) } else { None },
            messages,
        })
    }

    /// Starts the writer, the retention sweep and (while the database is unavailable) the
    /// reopening loop.
    pub fn start_tasks(self: &Arc<Self>, hub: Arc<Hub>) -> Vec<tokio::task::JoinHandle<()>> {
        if !self.settings.enabled {
            return Vec::new();
        }
        let Some(rx) = self.writer_rx.lock().take() else { return Vec::new() };
        let writer = tokio::spawn(self.clone().writer(rx, hub));
        let maintenance = tokio::spawn(self.clone().maintenance());
        vec![writer, maintenance]
    }

    /// Returns once every message published before the call is committed (or its commit
    /// failed): with `batched` durability, the point from which HTTP history has them.
    pub async fn sync(&self) {
        self.ask_writer(ToWriter::Sync).await;
    }

    /// Sends the writer a request behind everything queued and waits for its answer;
    /// false when history is disabled.
    async fn ask_writer(&self, request: fn(oneshot::Sender<()>) -> ToWriter) -> bool {
        if !self.settings.enabled {
            return false;
        }
        let (done, answered) = oneshot::channel();
        if self.writes.send(request(done)).await.is_ok() {
            let _ = answered.await;
        }
        true
    }

    /// Commits everything queued so far and closes the database (shutdown).
    pub async fn flush(&self) {
        if !self.ask_writer(ToWriter::Stop).await {
            return;
        }
        if let Some(store) = self.store.load_full() {
            // Everything delivered is committed, unless the last commit failed.
            if *self.health.borrow() == Health::Ok {
                let _ = store.end_run().await;
            }
            let _ = store.checkpoint().await;
            store.close().await;
        }
    }

    async fn writer(self: Arc<Self>, mut rx: mpsc::Receiver<ToWriter>, hub: Arc<Hub>) {
        let mut batch: Vec<Pending> = Vec::with_capacity(self.settings.batch_max);
        let mut conn = None;
        loop {
            let first = match rx.recv().await {
                Some(msg) => msg,
                None => return,
            };
            // A Sync or Stop ends the batch: it is answered once what came before it is in.
            let mut reply = None;
            let mut take = |msg: ToWriter, batch: &mut Vec<Pending>| match msg {
                ToWriter::Write(p) => {
                    batch.push(p);
                    true
                }
                ToWriter::Sync(done) => {
                    reply = Some((done, false));
                    false
                }
                ToWriter::Stop(done) => {
                    reply = Some((done, true));
                    false
                }
            };
            let mut more = take(first, &mut batch);
            let deadline = (self.settings.durability == Durability::Batched && !self.settings.batch_delay.is_zero())
                .then(|| tokio::time::Instant::now() + self.settings.batch_delay);
            while more && batch.len() < self.settings.batch_max {
                more = match rx.try_recv() {
                    Ok(msg) => take(msg, &mut batch),
                    Err(_) => match deadline {
                        Some(at) => match tokio::time::timeout_at(at, rx.recv()).await {
                            Ok(Some(msg)) => take(msg, &mut batch),
                            _ => false,
                        },
                        None => false,
                    },
                };
            }
            if !batch.is_empty() {
                self.commit(&mut conn, &batch).await;
                let keep = self.keep();
                for p in &batch {
                    let mut st = p.stream.lock();
                    if let Some(exclude) = &p.deliver {
                        hub.deliver(&p.room, &p.frame, exclude.as_deref());
                        st.mark_delivered(p.seq, &p.frame, keep);
                    }
                    // Committed, or failed for good: either way no longer the writer's.
                    st.mark_committed(p.seq, keep);
                }
                batch.clear();
            }
            match reply {
                Some((done, true)) => {
                    // Returning drops the connection, which the pool needs back to close.
                    drop(conn);
                    let _ = done.send(());
                    return;
                }
                Some((done, false)) => _ = done.send(()),
                None => {}
            }
        }
    }

    /// One group commit. A failure is reported, not retried: the batch was (or will be)
    /// delivered, and the next batch tries a fresh connection.
    async fn commit(&self, conn: &mut Option<sqlx::pool::PoolConnection<sqlx::Sqlite>>, batch: &[Pending]) {
        let Some(store) = self.store.load_full() else { return };
        let records: Vec<Record> = batch
            .iter()
            .map(|p| Record {
                room: p.room.as_arc(),
                seq: p.seq,
                created_ms: p.created_ms,
                body: p.frame.clone().into_data(),
            })
            .collect();
        let started = Instant::now();
        let result = async {
            if conn.is_none() {
                *conn = Some(store.writer().await?);
            }
            let c = conn.as_mut().ok_or_else(|| StoreError::Sql(sqlx::Error::PoolClosed))?;
            store.insert(c, &records).await
        }
        .await;
        let m = &self.metrics;
        m.history_batches.fetch_add(1, Ordering::Relaxed);
        m.history_rows.fetch_add(batch.len() as u64, Ordering::Relaxed);
        m.history_commit_micros.fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        m.history_batch_rows.record(batch.len() as u64);
        m.history_commit_us.record_duration(started.elapsed());
        match result {
            Ok(()) => self.set_health(Health::Ok),
            Err(e) => {
                m.history_write_errors.fetch_add(1, Ordering::Relaxed);
                *conn = None;
                self.set_health(Health::Degraded(e.to_string()));
            }
        }
    }

    async fn maintenance(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_retention = Instant::now();
        let mut last_retry = Instant::now();
        loop {
            tick.tick().await;
            let Some(store) = self.store.load_full() else {
                if last_retry.elapsed() >= self.settings.retry_interval {
                    last_retry = Instant::now();
                    self.try_open().await;
                }
                continue;
            };
            if let Err(e) = store.checkpoint().await {
                tracing::debug!("history checkpoint: {e}");
            }
            if last_retention.elapsed() >= self.settings.retention_interval {
                last_retention = Instant::now();
                self.enforce_retention(&store).await;
            }
        }
    }

    /// Deletes what retention allows of everything published so far, in small chunks so
    /// the writer never waits long.
    pub async fn enforce_retention_now(&self) {
        self.sync().await;
        if let Some(store) = self.store.load_full() {
            self.enforce_retention(&store).await;
        }
    }

    async fn enforce_retention(&self, store: &Store) {
        const CHUNK: i64 = 1000;
        let mut deleted = 0;
        if self.settings.max_per_room > 0 {
            match store.trim_rooms(self.settings.max_per_room, CHUNK).await {
                Ok(n) => deleted += n,
                Err(e) => tracing::warn!("history retention (per room): {e}"),
            }
        }
        if !self.settings.max_age.is_zero() {
            let cutoff = crate::clock::now_ms() - self.settings.max_age.as_millis() as i64;
            match store.expire(cutoff, CHUNK).await {
                Ok(n) => deleted += n,
                Err(e) => tracing::warn!("history retention (age): {e}"),
            }
        }
        if deleted > 0 {
            tracing::debug!(deleted, "history retention");
        }
    }
}

pub struct HistoryPage {
    pub messages: Vec<(u64, String)>,
    /// The `after` value for the next newer page; `None` at the newest message.
    pub next: Option<u64>,
    /// The `before` value for the next older page; `None` at the oldest stored message.
    pub prev: Option<u64>,
}

/// `{"type":..,…}` + `seq` → `{"type":..,…,"seq":N}`: the sequence number is spliced into
/// the serialized text instead of re-serializing the message.
pub fn with_seq(body: &str, seq: u64) -> String {
    let trimmed = body.trim_end();
    let inner = trimmed.strip_suffix('}').unwrap_or(trimmed);
    let mut out = String::with_capacity(inner.len() + 24);
    out.push_str(inner);
    if !inner.trim_end().ends_with('{') {
        out.push(',');
    }
    out.push_str("\"seq\":");
    out.push_str(&seq.to_string());
    out.push('}');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seq_is_spliced_into_the_object() {
        assert_eq!(with_seq(r#"{"type":"a"}"#, 7), r#"{"type":"a","seq":7}"#);
        assert_eq!(with_seq("{}", 1), r#"{"seq":1}"#);
    }

    #[test]
    fn catch_up_comes_from_memory_when_it_can_and_the_database_when_it_must() {
        let mut st = StreamState { last_seq: 0, delivered: 0, committed: 0, recent: VecDeque::new() };
        for seq in 1..=10 {
            st.last_seq = seq;
            st.mark_delivered(seq, &Frame::text(seq.to_string()), 3);
        }
        // Nothing committed yet: memory holds all ten.
        let plan = st.plan_catch_up(4);
        assert_eq!((plan.seq, plan.read, plan.frames.len()), (10, None, 6));
        st.mark_committed(8, 3);
        // 1..=7 are committed and trimmed; memory keeps 8..=10 (the newest three).
        let plan = st.plan_catch_up(4);
        assert_eq!((plan.read, plan.frames.len()), (Some(7), 3));
        let plan = st.plan_catch_up(10);
        assert_eq!((plan.read, plan.frames.len()), (None, 0));
    }
}
