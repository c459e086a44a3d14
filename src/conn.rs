//! A connected client as the rest of the gateway sees it: who it is, which rooms it is in,
//! and its outbox.
//!
//! The outbox is the only way anything reaches a client. It is a queue of shared frames,
//! bounded in frames and in bytes, drained by the client's own session task, so producers
//! (the hub's fan-out, the plugin threads) never wait on a socket and never hold a lock
//! across an await. When a client stops reading and either bound is reached, the outbox
//! closes itself with "slow consumer": that client is disconnected instead of pinning
//! memory or slowing anyone else. The bytes the session has taken but not yet handed to
//! the socket count too, so a client that does not read pins at most the byte bound.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use parking_lot::{Mutex, RwLock};
use rand::Rng;
use tokio::sync::Notify;

use crate::protocol::{Frame, RoomName};

/// Why the gateway is closing a connection; each maps to one WebSocket close code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The outbox overflowed: 1013 "try again later".
    SlowConsumer,
    /// Nothing received within `heartbeat.timeout`: the socket is dropped without a close
    /// frame, as the seed's `terminate()` does.
    HeartbeatTimeout,
    /// The gateway is shutting down: 1001 "going away".
    Shutdown,
    /// A policy violation decided elsewhere (rate limit, expired token): 1008.
    Policy(&'static str),
}

impl CloseReason {
    pub fn code(self) -> Option<u16> {
        match self {
            CloseReason::SlowConsumer => Some(1013),
            CloseReason::HeartbeatTimeout => None,
            CloseReason::Shutdown => Some(1001),
            CloseReason::Policy(_) => Some(1008),
        }
    }

    pub fn text(self) -> &'static str {
        match self {
            CloseReason::SlowConsumer => "slow consumer: outgoing queue full",
            CloseReason::HeartbeatTimeout => "heartbeat timeout",
            CloseReason::Shutdown => "server shutting down",
            CloseReason::Policy(why) => why,
        }
    }
}

/// Result of queueing a frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Push {
    Queued,
    /// The client is already closing; the frame was dropped.
    Closed,
    /// This push overflowed the queue: the outbox is now closed as a slow consumer.
    Overflowed,
}

#[derive(Default)]
struct Queue {
    frames: VecDeque<Frame>,
    /// While a catch-up is read from the database, live frames wait here, to follow it.
    held: Option<VecDeque<Frame>>,
    /// Payload bytes of `frames` and `held`, plus those the session has taken and not yet
    /// written (`Outbox::written` takes them off).
    bytes: usize,
    closed: Option<CloseReason>,
}

/// An outbox's bounds: frames queued, and their bytes (`limits.outbox_messages`,
/// `limits.outbox_bytes`).
#[derive(Clone, Copy, Debug)]
pub struct Bounds {
    pub frames: usize,
    pub bytes: usize,
}

pub struct Outbox {
    queue: Mutex<Queue>,
    /// Wakes the session when the queue becomes non-empty or the outbox closes.
    ready: Notify,
    /// Wakes a session blocked writing to a socket, when the outbox closes.
    closing: Notify,
    bounds: Bounds,
}

impl Outbox {
    fn new(bounds: Bounds) -> Outbox {
        Outbox { queue: Mutex::new(Queue::default()), ready: Notify::new(), closing: Notify::new(), bounds }
    }

    /// Queues a frame unless that would exceed either bound; then the outbox closes as a
    /// slow consumer.
    pub fn push(&self, frame: Frame) -> Push {
        let mut q = self.queue.lock();
        if q.closed.is_some() {
            return Push::Closed;
        }
        let held = q.held.as_ref().map_or(0, VecDeque::len);
        if q.frames.len() + held >= self.bounds.frames || q.bytes + frame.len() > self.bounds.bytes {
            q.closed = Some(CloseReason::SlowConsumer);
            q.frames.clear();
            q.held = None;
            q.bytes = 0;
            drop(q);
            self.wake_closed();
            return Push::Overflowed;
        }
        q.bytes += frame.len();
        if let Some(held) = &mut q.held {
            held.push_back(frame);
            return Push::Queued;
        }
        q.frames.push_back(frame);
        let first = q.frames.len() == 1;
        drop(q);
        // The session drains everything it is woken for, so only the empty → non-empty
        // transition needs a wake-up; Notify keeps the permit if nobody waits yet.
        if first {
            self.ready.notify_one();
        }
        Push::Queued
    }

    /// Starts holding back new frames (they still count against the capacity).
    pub fn hold(&self) {
        let mut q = self.queue.lock();
        if q.closed.is_none() && q.held.is_none() {
            q.held = Some(VecDeque::new());
        }
    }

    /// Queues `first`, then everything held back since `hold`, and stops holding. `first`
    /// (a catch-up the gateway decided to send, bounded by `history.max_catchup`) is not
    /// refused, but its bytes count against what may follow it.
    pub fn release(&self, first: impl IntoIterator<Item = Frame>) {
        let mut q = self.queue.lock();
        let held = q.held.take().unwrap_or_default();
        if q.closed.is_some() {
            return;
        }
        for frame in first {
            q.bytes += frame.len();
            q.frames.push_back(frame);
        }
        q.frames.extend(held);
        let any = !q.frames.is_empty();
        drop(q);
        if any {
            self.ready.notify_one();
        }
    }

    /// Marks the connection for closing; the session sends the close frame and ends.
    /// The first reason wins.
    pub fn close(&self, reason: CloseReason) {
        let mut q = self.queue.lock();
        if q.closed.is_none() {
            q.closed = Some(reason);
            q.frames.clear();
            q.held = None;
            q.bytes = 0;
        }
        drop(q);
        self.wake_closed();
    }

    fn wake_closed(&self) {
        self.ready.notify_one();
        self.closing.notify_one();
    }

    /// Resolves once the outbox is closed, with the reason.
    pub async fn closed(&self) -> CloseReason {
        loop {
            if let Some(reason) = self.queue.lock().closed {
                return reason;
            }
            // A close between the check and this wait leaves a permit: no lost wake-up.
            self.closing.notified().await;
        }
    }

    /// Waits until there is something to send or the outbox was closed.
    pub async fn ready(&self) {
        self.ready.notified().await
    }

    /// Moves every queued frame into `into` (which must be empty). Swapping buffers keeps
    /// the allocation with whichever side is busy and costs one lock per batch. Their bytes
    /// still count until [`Outbox::written`].
    pub fn drain(&self, into: &mut VecDeque<Frame>) -> Option<CloseReason> {
        let mut q = self.queue.lock();
        if let Some(reason) = q.closed {
            return Some(reason);
        }
        std::mem::swap(&mut q.frames, into);
        None
    }

    /// The session handed `bytes` of drained frames to the socket.
    pub fn written(&self, bytes: usize) {
        let mut q = self.queue.lock();
        q.bytes = q.bytes.saturating_sub(bytes);
    }
}

/// An unguessable connection id, `client_` + 16 base-36 characters (≈82 bits from the
/// thread-local CSPRNG): the seed's format, without its guessability.
pub fn new_client_id() -> Arc<str> {
    const ALPHABET: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut rng = rand::rng();
    let mut id = String::with_capacity(23);
    id.push_str("client_");
    for _ in 0..16 {
        id.push(ALPHABET[rng.random_range(0..36)] as char);
    }
    Arc::from(id)
}

/// What a connection's identity says about it, replaced as a whole on `refresh`.
#[derive(Clone, Debug)]
pub struct Profile {
    pub username: Arc<str>,
    /// May use `broadcast`.
    pub admin: bool,
    /// Room patterns from the token; `None`: any room that is not private.
    pub rooms: Option<Arc<[String]>>,
    /// Unix seconds after which the connection is closed (1008) unless refreshed.
    pub expires_at: Option<u64>,
}

impl Profile {
    pub fn guest(username: Arc<str>) -> Profile {
        Profile { username, admin: false, rooms: None, expires_at: None }
    }
}

/// Who is on the other end. In anonymous mode the user id is the connection id.
pub struct Identity {
    pub user_id: Arc<str>,
    profile: RwLock<Profile>,
}

impl Identity {
    pub fn new(user_id: Arc<str>, profile: Profile) -> Identity {
        Identity { user_id, profile: RwLock::new(profile) }
    }

    pub fn username(&self) -> Arc<str> {
        self.profile.read().username.clone()
    }

    pub fn profile(&self) -> Profile {
        self.profile.read().clone()
    }

    pub fn set_profile(&self, profile: Profile) {
        *self.profile.write() = profile;
    }

    pub fn set_username(&self, username: Arc<str>) {
        self.profile.write().username = username;
    }

    /// Whether the token has expired, by the rule it was accepted with ([`crate::auth::expired`]).
    pub fn expired(&self, now_secs: u64, leeway_secs: u64) -> bool {
        self.profile.read().expires_at.is_some_and(|exp| crate::auth::expired(exp, now_secs, leeway_secs))
    }
}

pub struct Conn {
    pub id: Arc<str>,
    pub identity: Identity,
    /// Whose event budget this connection spends: the user's (a token's subject) or, for
    /// a guest, its own.
    pub budget: crate::ratelimit::Budget,
    pub outbox: Outbox,
    /// Rooms this connection is in, so that a disconnect can leave them all.
    rooms: Mutex<Vec<RoomName>>,
    /// Milliseconds since `epoch` when a frame was last received (heartbeat bookkeeping).
    last_seen: AtomicU64,
    epoch: Instant,
}

impl Conn {
    pub fn new(
        identity: Identity,
        id: Arc<str>,
        budget: crate::ratelimit::Budget,
        outbox: Bounds,
        epoch: Instant,
    ) -> Conn {
        let conn = Conn {
            id,
            identity,
            budget,
            outbox: Outbox::new(outbox),
            rooms: Mutex::new(Vec::new()),
            last_seen: AtomicU64::new(0),
            epoch,
        };
        conn.touch();
        conn
    }

    pub fn send(&self, frame: Frame) -> Push {
        self.outbox.push(frame)
    }

    pub fn touch(&self) {
        self.last_seen.store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    pub fn idle_for(&self) -> std::time::Duration {
        let now = self.epoch.elapsed().as_millis() as u64;
        std::time::Duration::from_millis(now.saturating_sub(self.last_seen.load(Ordering::Relaxed)))
    }

    pub fn rooms(&self) -> Vec<RoomName> {
        self.rooms.lock().clone()
    }

    pub fn in_room(&self, room: &RoomName) -> bool {
        self.rooms.lock().contains(room)
    }

    pub fn room_count(&self) -> usize {
        self.rooms.lock().len()
    }

    /// Records membership; false if it was already recorded.
    pub(crate) fn add_room(&self, room: &RoomName) -> bool {
        let mut rooms = self.rooms.lock();
        if rooms.contains(room) {
            return false;
        }
        rooms.push(room.clone());
        true
    }

    pub(crate) fn remove_room(&self, room: &RoomName) -> bool {
        let mut rooms = self.rooms.lock();
        match rooms.iter().position(|r| r == room) {
            Some(i) => {
                rooms.swap_remove(i);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overflow_closes_as_slow_consumer() {
        let outbox = Outbox::new(Bounds { frames: 2, bytes: 100 });
        assert_eq!(outbox.push(Frame::text("a")), Push::Queued);
        assert_eq!(outbox.push(Frame::text("b")), Push::Queued);
        assert_eq!(outbox.push(Frame::text("c")), Push::Overflowed);
        assert_eq!(outbox.push(Frame::text("d")), Push::Closed);
        let mut batch = VecDeque::new();
        assert_eq!(outbox.drain(&mut batch), Some(CloseReason::SlowConsumer));
    }

    #[test]
    fn bytes_taken_but_not_written_still_count() {
        let outbox = Outbox::new(Bounds { frames: 100, bytes: 10 });
        assert_eq!(outbox.push(Frame::text("12345")), Push::Queued);
        let mut batch = VecDeque::new();
        assert_eq!(outbox.drain(&mut batch), None);
        assert_eq!(outbox.push(Frame::text("12345")), Push::Queued);
        outbox.written(5);
        assert_eq!(outbox.push(Frame::text("12345")), Push::Queued);
        assert_eq!(outbox.push(Frame::text("1")), Push::Overflowed);
    }

    #[test]
    fn held_frames_follow_the_released_ones() {
        let outbox = Outbox::new(Bounds { frames: 16, bytes: 1 << 20 });
        outbox.push(Frame::text("joined"));
        outbox.hold();
        outbox.push(Frame::text("live"));
        outbox.release([Frame::text("old1"), Frame::text("old2")]);
        outbox.push(Frame::text("later"));
        let mut batch = VecDeque::new();
        assert_eq!(outbox.drain(&mut batch), None);
        let texts: Vec<_> = batch.iter().map(|f| f.to_text().unwrap()).collect();
        assert_eq!(texts, ["joined", "old1", "old2", "live", "later"]);
    }

    #[test]
    fn ids_are_distinct() {
        let a = new_client_id();
        let b = new_client_id();
        assert_ne!(a, b);
        assert_eq!(a.len(), 23);
        assert!(a.starts_with("client_"));
    }
}
