//! Room history: sequence numbers, the group-commit writer, replay, catch-up, retention,
//! and staying up when the disk does not.
//!
//! Every room that has persisted messages has a [`Stream`] ([`stream`]): its numbering and
//! the newest delivered frames. Numbers are assigned under the stream's lock, before
//! fan-out, so they increase by one per message with no gap. The frames go to one writer
//! task ([`writer`]) that commits them in batches; messages that may not be delivered
//! before they are stored (`per_message` durability, or a `batched` room beyond its
//! reservation) are delivered by the writer after their commit. A reconnecting client's
//! catch-up is read from the database and completed from the in-memory tail under the
//! same lock fan-out takes, which is what makes it exact: every message is either in the
//! catch-up or delivered live after it, never both.
//!
//! Streams are loaded on demand (a room's numbering is read back from the database the
//! first time it is used) and dropped again when the room has been idle for
//! `history.unload_after`, so memory follows the rooms in use, not every room that ever
//! had a message.
//!
//! The database is never on the path that keeps chat alive: if it cannot be opened, or
//! writes fail, messages are still delivered, the failure is logged and shown in
//! `/healthz`, and history resumes when the disk recovers.

mod maintenance;
mod store;
mod stream;
mod writer;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use arc_swap::ArcSwapOption;
use dashmap::DashMap;
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot, watch};

pub use store::Page;
use store::Store;

/// The open store, as history holds it (see `store::open`).
type StoreBox = Box<dyn Store>;
pub(crate) use stream::{CatchUpPlan, Stream};
use stream::{Replay, replay, with_seq};
use writer::{Pending, ToWriter, Writer};

use crate::config::{Durability, HistorySettings};
use crate::metrics::Metrics;
use crate::protocol::{self, Frame, RoomName};

/// How the writer hands a committed message to the room's members: `(room, frame,
/// exclude)`. A function rather than the hub itself, so that history does not depend on
/// the hub; it is called under the room's stream lock, which keeps a room in `seq` order.
pub type Deliver = Arc<dyn Fn(&RoomName, &Frame, Option<&str>) + Send + Sync>;

/// The health before the first attempt to open the database.
const NOT_OPENED: &str = "not opened yet";

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

pub struct History {
    settings: HistorySettings,
    streams: DashMap<RoomName, Arc<Stream>>,
    store: ArcSwapOption<StoreBox>,
    writes: mpsc::Sender<ToWriter>,
    /// Taken by `start_tasks`.
    writer_rx: Mutex<Option<mpsc::Receiver<ToWriter>>>,
    health: watch::Sender<Health>,
    metrics: Arc<Metrics>,
}

impl History {
    /// Opens the database, or notes why it cannot (and keeps trying, once the tasks run).
    pub async fn open(settings: HistorySettings, metrics: Arc<Metrics>) -> Arc<History> {
        let enabled = settings.enabled;
        let history = History::new(settings, metrics, enabled);
        if enabled {
            history.try_open().await;
        }
        history
    }

    /// History switched off, for tools that need a hub but serve nothing (`--check`).
    pub fn disabled(metrics: Arc<Metrics>) -> Arc<History> {
        History::new(crate::config::Settings::defaults().history, metrics, false)
    }

    fn new(mut settings: HistorySettings, metrics: Arc<Metrics>, enabled: bool) -> Arc<History> {
        settings.enabled = enabled;
        let (writes, writer_rx) = mpsc::channel(if enabled { settings.queue } else { 1 });
        let initial = if enabled { Health::Unavailable(NOT_OPENED.into()) } else { Health::Disabled };
        Arc::new(History {
            settings,
            streams: DashMap::new(),
            store: ArcSwapOption::empty(),
            writes,
            writer_rx: Mutex::new(enabled.then_some(writer_rx)),
            health: watch::channel(initial).0,
            metrics,
        })
    }

    async fn try_open(&self) -> bool {
        match store::open(&self.settings).await {
            Ok(store) => {
                self.store.store(Some(Arc::new(store)));
                tracing::info!(path = %self.settings.path.display(), "history open");
                self.set_health(Health::Ok);
                true
            }
            Err(e) => {
                self.set_health(Health::Unavailable(e.to_string()));
                false
            }
        }
    }

    fn set_health(&self, health: Health) {
        self.health.send_if_modified(|current| {
            if *current == health {
                return false;
            }
            match (&*current, &health) {
                (Health::Degraded(_), Health::Ok) => tracing::info!("history: writing again"),
                (Health::Unavailable(e), Health::Ok) if e != NOT_OPENED => tracing::info!("history: available again"),
                (_, Health::Degraded(e)) => {
                    tracing::error!("history degraded, messages are delivered but not stored: {e}")
                }
                (_, Health::Unavailable(e)) => {
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

    /// Rooms whose history state is in memory (for `/healthz` and `/metrics`).
    pub fn streams_in_memory(&self) -> usize {
        self.streams.len()
    }

    /// The stream of `room`, created unloaded if it is not in memory. `None` while the
    /// database is not open: numbering cannot continue safely without it, so such messages
    /// are delivered without a `seq`.
    fn stream(&self, room: &RoomName) -> Option<Arc<Stream>> {
        if let Some(stream) = self.streams.get(room) {
            return Some(stream.clone());
        }
        self.store.load().as_ref()?;
        let stream = self.streams.entry(room.clone()).or_insert_with(|| {
            self.metrics.history_streams.fetch_add(1, Ordering::Relaxed);
            Arc::new(Stream::unloaded())
        });
        Some(stream.clone())
    }

    /// The stream of `room` with its numbering read from the database (a join needs the
    /// room's current `seq`). `None` while the database is not open or cannot be read.
    pub(crate) async fn load(&self, room: &RoomName) -> Option<Arc<Stream>> {
        let stream = self.stream(room)?;
        let loaded = {
            let mut st = stream.lock();
            st.last_used = Instant::now();
            st.loaded
        };
        if loaded {
            return Some(stream);
        }
        let store = self.store.load_full()?;
        match store.room_base(room.as_str()).await {
            Ok(base) => {
                stream.lock().load(base);
                Some(stream)
            }
            Err(e) => {
                tracing::debug!(%room, "cannot read a room's numbering: {e}");
                None
            }
        }
    }

    /// Numbers a message for `room`, queues it for the writer, and delivers it through
    /// `deliver` now if it may go out before its commit (otherwise the writer delivers it
    /// once committed). Returns its `seq`, if known yet. Without a database, or with the
    /// writer's queue full, the message is delivered at once, unnumbered and unstored.
    pub fn publish(
        &self,
        room: &RoomName,
        body: String,
        exclude: Option<&str>,
        deliver: &dyn Fn(&Frame),
    ) -> Option<u64> {
        let Some(stream) = self.stream(room) else {
            deliver(&Frame::text(body));
            return None;
        };
        let Ok(permit) = self.writes.try_reserve() else {
            self.metrics.history_dropped.fetch_add(1, Ordering::Relaxed);
            self.set_health(Health::Degraded("the write queue is full".into()));
            deliver(&Frame::text(body));
            return None;
        };
        let exclude_owned = || exclude.map(Arc::from);
        let mut st = stream.lock();
        st.last_used = Instant::now();
        let created_ms = crate::clock::now_ms();
        if !st.loaded || st.unassigned > 0 {
            // The room's numbering is not known yet: the writer numbers it, in order.
            st.unassigned += 1;
            permit.send(ToWriter::Write(Pending {
                room: room.clone(),
                stream: stream.clone(),
                seq: 0,
                created_ms,
                frame: Frame::text(body),
                deliver: Some(exclude_owned()),
            }));
            return None;
        }
        let seq = st.next_seq();
        let frame = Frame::text(with_seq(&body, seq));
        let now = self.settings.durability == Durability::Batched && st.may_deliver_now(seq);
        // Queued before delivering: the writer sees a room's messages in seq order.
        permit.send(ToWriter::Write(Pending {
            room: room.clone(),
            stream: stream.clone(),
            seq,
            created_ms,
            frame: frame.clone(),
            deliver: (!now).then(exclude_owned),
        }));
        if now {
            deliver(&frame);
            st.mark_delivered(seq, &frame, self.keep());
        }
        Some(seq)
    }

    /// Completes a catch-up plan: reads `(since, read_to]` from the database when the plan
    /// says so, puts it before what memory supplied, keeps the newest
    /// `history.max_catchup`, and announces a `history_gap` wherever numbers are missing
    /// (expired, beyond the limit, unreadable, or skipped after a crash).
    pub(crate) async fn finish_catch_up(&self, room: &RoomName, since: u64, plan: CatchUpPlan) -> Vec<Frame> {
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
        replay(since, items, plan.seq)
            .into_iter()
            .map(|r| match r {
                Replay::Message(frame) => frame,
                Replay::Gap { after, before } => protocol::history_gap(room, after, Some(before)),
            })
            .collect()
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

    /// Starts the writer, which hands messages that waited for their commit to `deliver`,
    /// and the maintenance task (retention, checkpoints, reopening, unloading).
    pub fn start_tasks(self: &Arc<Self>, deliver: Deliver) -> Vec<tokio::task::JoinHandle<()>> {
        let Some(rx) = self.writer_rx.lock().take() else { return Vec::new() };
        let writer = Writer { history: self.clone(), deliver, reserved: HashMap::new() };
        vec![tokio::spawn(writer.run(rx)), tokio::spawn(self.clone().maintenance())]
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

    /// Commits everything queued so far, releases every reservation, and closes the
    /// database (shutdown).
    pub async fn flush(&self) {
        if !self.ask_writer(ToWriter::Stop).await {
            return;
        }
        if let Some(store) = self.store.load_full() {
            store.close().await;
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
