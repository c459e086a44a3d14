//! The writer: the one task that writes history, so that commits are grouped and each
//! room's messages are stored in `seq` order.
//!
//! It takes everything that queued up while the previous commit ran as one transaction.
//! Around each commit it also does what only the owner of the write order can do safely:
//! it numbers messages published to a room whose numbering was not yet read back from the
//! database, it raises a busy room's reservation (with `batched` durability, the numbers
//! the room may deliver before they are stored, see `Stream`), it delivers the messages
//! that waited for their commit, and it lowers the reservations of rooms that went quiet,
//! so that a crash makes only busy rooms skip numbers, and only a few.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use super::StoreBox;
use super::store::Record;
use super::stream::{Stream, with_seq};
use super::{Deliver, Health, History};
use crate::config::Durability;
use crate::protocol::{Frame, RoomName};

/// A room's reservation is lowered back to its last number once the room has had no
/// message for this long (and everything it delivered is committed).
pub(super) const RELEASE_AFTER: Duration = Duration::from_secs(1);
/// Fewest numbers reserved ahead at once: a quiet room's next burst rides on one commit.
const MIN_AHEAD: u64 = 64;

/// A message on its way to the writer.
pub(crate) struct Pending {
    pub room: RoomName,
    pub stream: Arc<Stream>,
    /// 0 until numbered: the writer numbers messages of a room that was not loaded yet.
    pub seq: u64,
    pub created_ms: i64,
    /// The message as delivered: with its `seq` spliced in once it has one.
    pub frame: Frame,
    /// `Some(exclude)`: delivered by the writer once committed, leaving `exclude` out.
    pub deliver: Option<Option<Arc<str>>>,
}

pub(super) enum ToWriter {
    Write(Pending),
    /// Commit what was queued before it, then answer.
    Sync(oneshot::Sender<()>),
    /// As `Sync`, release every reservation, give the database connection back and stop.
    Stop(oneshot::Sender<()>),
}

pub(super) struct Writer {
    pub history: Arc<History>,
    pub deliver: Deliver,
    /// Rooms whose reservation runs ahead of their numbering.
    pub reserved: HashMap<RoomName, Arc<Stream>>,
}

impl Writer {
    pub(super) async fn run(mut self, mut rx: mpsc::Receiver<ToWriter>) {
        let settings = self.history.settings.clone();
        let mut batch: Vec<Pending> = Vec::with_capacity(settings.batch_max);
        // Quiet rooms are looked for every quarter of RELEASE_AFTER, busy writer or not.
        let mut next_release = tokio::time::Instant::now();
        loop {
            if !self.reserved.is_empty() && tokio::time::Instant::now() >= next_release {
                self.release(false).await;
                next_release = tokio::time::Instant::now() + RELEASE_AFTER / 4;
            }
            let first = if self.reserved.is_empty() {
                rx.recv().await
            } else {
                match tokio::time::timeout_at(next_release, rx.recv()).await {
                    Ok(msg) => msg,
                    Err(_) => continue,
                }
            };
            let Some(first) = first else { return };
            // A Sync or Stop ends the batch: it is answered once what came before it is in.
            let mut reply = None;
            // Whether somebody waits for this batch's commit: then it takes what is queued,
            // no more.
            let mut waiting = false;
            let mut take = |msg: ToWriter, batch: &mut Vec<Pending>, waiting: &mut bool| match msg {
                ToWriter::Write(p) => {
                    *waiting |= p.deliver.is_some();
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
            let mut more = take(first, &mut batch, &mut waiting);
            let deadline = (settings.durability == Durability::Batched && !settings.batch_delay.is_zero())
                .then(|| tokio::time::Instant::now() + settings.batch_delay);
            while more && batch.len() < settings.batch_max {
                more = match rx.try_recv() {
                    Ok(msg) => take(msg, &mut batch, &mut waiting),
                    Err(_) => match deadline.filter(|_| !waiting) {
                        Some(at) => match tokio::time::timeout_at(at, rx.recv()).await {
                            Ok(Some(msg)) => take(msg, &mut batch, &mut waiting),
                            _ => false,
                        },
                        None => false,
                    },
                };
            }
            if !batch.is_empty() {
                self.write(&mut batch).await;
            }
            match reply {
                Some((done, true)) => {
                    self.release(true).await;
                    let _ = done.send(());
                    return;
                }
                Some((done, false)) => _ = done.send(()),
                None => {}
            }
        }
    }

    /// Numbers, commits and delivers one batch, and empties it.
    async fn write(&mut self, batch: &mut Vec<Pending>) {
        let history = self.history.clone();
        let Some(store) = history.store.load_full() else {
            // Cannot happen (nothing is queued before the database is open), but delivering
            // is never wrong.
            self.finish(batch);
            return;
        };
        self.number(&store, batch).await;
        let reserve = match history.settings.durability {
            Durability::Batched => reservations(batch, history.settings.batch_max as u64),
            Durability::PerMessage => Vec::new(),
        };
        let records: Vec<Record> = batch
            .iter()
            .filter(|p| p.seq != 0)
            .map(|p| Record {
                room: p.room.as_arc(),
                seq: p.seq,
                created_ms: p.created_ms,
                body: p.frame.clone().into_data(),
            })
            .collect();
        let rows: Vec<(Arc<str>, u64)> = reserve.iter().map(|(room, _, upto)| (room.as_arc(), *upto)).collect();
        let started = Instant::now();
        let result = async { store.commit(&records, &rows).await }.await;
        let m = &history.metrics;
        m.history_batches.fetch_add(1, Ordering::Relaxed);
        m.history_rows.fetch_add(records.len() as u64, Ordering::Relaxed);
        m.history_commit_micros.fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        m.history_batch_rows.record(records.len() as u64);
        m.history_commit_us.record_duration(started.elapsed());
        match result {
            Ok(()) => {
                history.set_health(Health::Ok);
                for (room, stream, upto) in reserve {
                    let mut st = stream.lock();
                    st.reserved = st.reserved.max(upto);
                    drop(st);
                    self.reserved.insert(room, stream);
                }
                m.history_reserved_rooms.store(self.reserved.len() as i64, Ordering::Relaxed);
            }
            Err(e) => {
                m.history_write_errors.fetch_add(1, Ordering::Relaxed);
                history.set_health(Health::Degraded(e.to_string()));
            }
        }
        self.finish(batch);
    }

    /// Gives numbers to messages published while their room was not loaded, reading the
    /// room's numbering from the database first. A room that cannot be read has its
    /// messages delivered unnumbered and unstored.
    async fn number(&mut self, store: &StoreBox, batch: &mut [Pending]) {
        for p in batch.iter_mut().filter(|p| p.seq == 0) {
            let loaded = p.stream.lock().loaded;
            let base = if loaded { Ok(0) } else { store.room_base(p.room.as_str()).await };
            let mut st = p.stream.lock();
            st.unassigned -= 1;
            match base {
                Ok(base) => {
                    st.load(base);
                    p.seq = st.next_seq();
                    p.frame = Frame::text(with_seq(p.frame.to_text().unwrap_or("{}"), p.seq));
                }
                Err(e) => tracing::debug!(room = %p.room, "cannot read a room's numbering: {e}"),
            }
        }
    }

    /// After the commit (or its failure, which does not hold live chat back): delivers what
    /// waited for it, in order, and hands every message back to its stream.
    fn finish(&mut self, batch: &mut Vec<Pending>) {
        let keep = self.history.keep();
        for p in batch.drain(..) {
            let mut st = p.stream.lock();
            if let Some(exclude) = &p.deliver {
                (self.deliver)(&p.room, &p.frame, exclude.as_deref());
                if p.seq != 0 {
                    st.mark_delivered(p.seq, &p.frame, keep);
                }
            }
            st.mark_committed(p.seq, keep);
        }
    }

    /// Lowers the reservation of every room that has been quiet for [`RELEASE_AFTER`] (all
    /// of them at shutdown) to its last number, once all it delivered is committed. Memory
    /// first: from then on the room's messages wait for their commit, so the database
    /// never holds less than what was delivered.
    async fn release(&mut self, all: bool) {
        let mut rooms = Vec::new();
        self.reserved.retain(|room, stream| {
            let mut st = stream.lock();
            if st.reserved <= st.last_seq && st.committed == st.last_seq {
                return false;
            }
            let quiet = all || st.last_used.elapsed() >= RELEASE_AFTER;
            if quiet && st.committed == st.last_seq && st.unassigned == 0 {
                st.reserved = st.last_seq;
                rooms.push((room.as_arc(), st.last_seq));
                return false;
            }
            true
        });
        let history = self.history.clone();
        history.metrics.history_reserved_rooms.store(self.reserved.len() as i64, Ordering::Relaxed);
        let Some(store) = history.store.load_full() else { return };
        if rooms.is_empty() {
            return;
        }
        if let Err(e) = store.release(&rooms).await {
            // Harmless: the database keeps the higher reservation, which only means a few
            // more skipped numbers if the gateway crashes before the next release.
            tracing::debug!("releasing reservations: {e}");
        }
    }
}

/// The reservations one commit should raise. A room of the batch whose reservation would
/// not cover two more batches like this one gets four, counted from its newest message in
/// the batch: at least [`MIN_AHEAD`], at most `max` (`history.batch_max`). Counting from
/// what is being committed, not from what is numbered, is what bounds a crash: a room's
/// numbering can jump by at most `max` past its last commit, and a room whose queue runs
/// further ahead has its newest messages wait for their commit instead.
fn reservations(batch: &[Pending], max: u64) -> Vec<(RoomName, Arc<Stream>, u64)> {
    let mut rooms: HashMap<&RoomName, (&Arc<Stream>, u64, u64)> = HashMap::new();
    for p in batch.iter().filter(|p| p.seq != 0) {
        let entry = rooms.entry(&p.room).or_insert((&p.stream, 0, 0));
        entry.1 += 1;
        entry.2 = entry.2.max(p.seq);
    }
    let mut out = Vec::new();
    for (room, (stream, n, newest)) in rooms {
        let reserved = stream.lock().reserved;
        if reserved < newest + 2 * n {
            let ahead = (4 * n).max(MIN_AHEAD).min(max.max(1));
            out.push((room.clone(), stream.clone(), newest + ahead));
        }
    }
    out
}
