//! One room's numbering: its sequence numbers, its reservation, and the newest delivered
//! frames kept in memory.
//!
//! Numbers are assigned under the stream's lock, before fan-out, so they increase by one per
//! message with no gap. Delivery is decided under the same lock, which is what keeps a
//! room's messages in `seq` order however they reach the members: at once (a `batched`
//! room within its reservation) or from the writer after their commit. A joiner's catch-up
//! is planned under it too, which is what makes catch-up exact.

use std::collections::VecDeque;
use std::time::Instant;

use parking_lot::{Mutex, MutexGuard};

use crate::protocol::Frame;

/// One room's numbering and its newest delivered frames.
pub(crate) struct Stream {
    state: Mutex<StreamState>,
}

pub(crate) struct StreamState {
    /// Highest sequence number assigned.
    pub(super) last_seq: u64,
    /// Highest sequence number delivered live (trails `last_seq` by the messages waiting
    /// for their commit).
    pub(super) delivered: u64,
    /// Highest sequence number the writer is done with (committed, or failed for good).
    pub(super) committed: u64,
    /// Numbers up to this one may be delivered before they are committed: the database
    /// holds this reservation, so a crash cannot make them be given again.
    pub(super) reserved: u64,
    /// False until the room's numbering was read from the database: messages published
    /// meanwhile are numbered by the writer, in order, once it has.
    pub(super) loaded: bool,
    /// Messages queued for the writer to number (published while not `loaded`).
    pub(super) unassigned: usize,
    /// Last publish or join, for reservation release and unloading.
    pub(super) last_used: Instant,
    /// Delivered frames, contiguous and ascending by seq: every one not yet committed
    /// (a catch-up cannot read those from the database), plus the newest
    /// `history.recent`, so that a quick reconnect needs no database read at all.
    recent: VecDeque<(u64, Frame)>,
}

impl Stream {
    /// A stream whose numbering is still to be read from the database.
    pub(super) fn unloaded() -> Stream {
        Stream {
            state: Mutex::new(StreamState {
                last_seq: 0,
                delivered: 0,
                committed: 0,
                reserved: 0,
                loaded: false,
                unassigned: 0,
                last_used: Instant::now(),
                recent: VecDeque::new(),
            }),
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, StreamState> {
        self.state.lock()
    }
}

impl StreamState {
    /// Continues the numbering from `base` (read from the database).
    pub(super) fn load(&mut self, base: u64) {
        if !self.loaded {
            self.last_seq = base;
            self.delivered = base;
            self.committed = base;
            self.reserved = base;
            self.loaded = true;
        }
    }

    pub(super) fn next_seq(&mut self) -> u64 {
        self.last_seq += 1;
        self.last_seq
    }

    pub(crate) fn delivered(&self) -> u64 {
        self.delivered
    }

    /// Whether message `seq`, just numbered, may be delivered before its commit: it is
    /// within the reservation and nothing before it is still waiting.
    pub(super) fn may_deliver_now(&self, seq: u64) -> bool {
        seq <= self.reserved && self.delivered + 1 == seq
    }

    /// Nothing in flight and nothing reserved ahead: the database holds all of it.
    pub(super) fn settled(&self) -> bool {
        self.loaded && self.unassigned == 0 && self.committed == self.last_seq && self.reserved <= self.last_seq
    }

    /// Records that `seq` was delivered as `frame`.
    pub(super) fn mark_delivered(&mut self, seq: u64, frame: &Frame, keep: usize) {
        if seq <= self.delivered && self.delivered != 0 {
            // Out of order (only when the writer's queue overflowed): not kept, so the tail
            // stays ascending; a catch-up finds it in the database or reports a gap.
            return;
        }
        self.delivered = seq;
        if self.recent.back().is_some_and(|(last, _)| *last + 1 != seq) {
            // A hole: the tail restarts here.
            self.recent.clear();
        }
        self.recent.push_back((seq, frame.clone()));
        self.trim(keep);
    }

    pub(super) fn mark_committed(&mut self, seq: u64, keep: usize) {
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
    pub(crate) fn plan_catch_up(&self, since: u64) -> CatchUpPlan {
        let seq = self.delivered;
        let from_memory = |after: u64| self.recent.iter().filter(|(s, _)| *s > after).cloned().collect();
        if since >= seq || self.recent.front().is_some_and(|(first, _)| *first <= since.saturating_add(1)) {
            return CatchUpPlan { seq, read: None, frames: from_memory(since) };
        }
        // Everything not in memory is committed: the database has (since, read_to].
        let read_to = self.recent.front().map_or(seq, |(first, _)| first - 1).min(seq);
        CatchUpPlan { seq, read: Some(read_to), frames: from_memory(read_to) }
    }
}

/// See [`StreamState::plan_catch_up`].
pub(crate) struct CatchUpPlan {
    /// The room's delivered sequence number at the join.
    pub seq: u64,
    /// Read `(since, read_to]` from the database, to go before `frames`.
    pub read: Option<u64>,
    /// `(seq, frame)` from memory, ascending.
    pub frames: Vec<(u64, Frame)>,
}

/// What a catch-up sends: the replayed messages, with a gap announced wherever numbers
/// are missing (expired, beyond `max_catchup`, never stored, or skipped after a crash).
pub(crate) enum Replay {
    Message(Frame),
    /// Messages with `after < seq < before` are not coming.
    Gap {
        after: u64,
        before: u64,
    },
}

/// Turns the messages found for a catch-up after `since` (ascending) into what the joiner
/// gets, up to the room's delivered number `upto`.
pub(crate) fn replay(since: u64, items: Vec<(u64, Frame)>, upto: u64) -> Vec<Replay> {
    let mut out = Vec::with_capacity(items.len() + 1);
    let mut prev = since;
    for (seq, frame) in items {
        if seq <= prev {
            continue;
        }
        if seq > prev + 1 {
            out.push(Replay::Gap { after: prev, before: seq });
        }
        out.push(Replay::Message(frame));
        prev = seq;
    }
    if upto > prev {
        out.push(Replay::Gap { after: prev, before: upto + 1 });
    }
    out
}

/// `{"type":..,…}` + `seq` → `{"type":..,…,"seq":N}`: the sequence number is spliced into
/// the serialized text instead of re-serializing the message.
pub(crate) fn with_seq(body: &str, seq: u64) -> String {
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

    fn loaded() -> StreamState {
        let stream = Stream::unloaded();
        let mut st = stream.state.into_inner();
        st.load(0);
        st
    }

    #[test]
    fn catch_up_comes_from_memory_when_it_can_and_the_database_when_it_must() {
        let mut st = loaded();
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
        assert_eq!(st.plan_catch_up(u64::MAX).frames.len(), 0);
    }

    #[test]
    fn replay_announces_every_hole() {
        let f = |s: u64| (s, Frame::text(s.to_string()));
        let shape = |r: Vec<Replay>| -> Vec<String> {
            r.into_iter()
                .map(|r| match r {
                    Replay::Message(f) => f.to_text().unwrap().to_string(),
                    Replay::Gap { after, before } => format!("gap {after}..{before}"),
                })
                .collect()
        };
        assert_eq!(shape(replay(3, vec![f(4), f(5)], 5)), ["4", "5"]);
        assert_eq!(shape(replay(3, vec![f(6), f(7)], 7)), ["gap 3..6", "6", "7"]);
        // A crash skipped 6..=9: the tail of what was stored, the hole, what came after.
        assert_eq!(shape(replay(3, vec![f(4), f(5), f(10)], 10)), ["4", "5", "gap 5..10", "10"]);
        // Nothing stored after the joiner's number, yet the room moved on.
        assert_eq!(shape(replay(5, vec![], 9)), ["gap 5..10"]);
    }
}
