//! The hub: every connection and every room on this node, and the local fan-out.
//!
//! It owns membership (who is in which room) and presence notices, and it is the only
//! code that walks a member list. A room exists while it has members; the last one out
//! drops it. Fan-out takes a frame that was serialized once and pushes a clone (a
//! reference-count increment) into each member's bounded outbox while holding that room's
//! lock, so a publication is seen by exactly the members present at that instant and no
//! lock is ever held across an await. Plugins do not call the hub directly: they publish
//! through the [`Broker`] seam, so a multi-node broker can sit between them later.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use parking_lot::Mutex;

use crate::conn::{CloseReason, Conn, Push};
use crate::error::ClientError;
use crate::history::History;
use crate::metrics::Metrics;
use crate::protocol::{self, Frame, RoomName};

struct Room {
    state: Mutex<RoomState>,
}

#[derive(Default)]
struct RoomState {
    members: Vec<Arc<Conn>>,
    /// Set under the lock when the last member leaves and the room is unlinked from the map;
    /// a joiner that raced with that retries on a fresh room.
    dead: bool,
}

pub struct Hub {
    conns: DashMap<Arc<str>, Arc<Conn>>,
    rooms: DashMap<RoomName, Arc<Room>>,
    metrics: Arc<Metrics>,
    history: Arc<History>,
    max_members: usize,
    /// Set by shutdown: a connection registering after `close_all` is closed at once.
    closing: AtomicBool,
}

impl Hub {
    pub fn new(metrics: Arc<Metrics>, history: Arc<History>, max_members: usize) -> Hub {
        Hub {
            conns: DashMap::new(),
            rooms: DashMap::new(),
            metrics,
            history,
            max_members,
            closing: AtomicBool::new(false),
        }
    }

    pub fn register(&self, conn: Arc<Conn>) {
        self.conns.insert(conn.id.clone(), conn.clone());
        self.metrics.connections_opened();
        if self.closing.load(Ordering::SeqCst) {
            conn.outbox.close(CloseReason::Shutdown);
        }
    }

    /// Leaves every room (with the usual notices) and forgets the connection. Returns the
    /// rooms it was in, for the plugins' leave hooks.
    pub fn unregister(&self, conn: &Arc<Conn>) -> Vec<RoomName> {
        let rooms = conn.rooms();
        for room in &rooms {
            // Cannot fail: the room list came from the connection itself.
            let _ = self.leave(conn, room);
        }
        if self.conns.remove(&conn.id).is_some() {
            self.metrics.connections_closed();
        }
        rooms
    }

    pub fn conn(&self, id: &str) -> Option<Arc<Conn>> {
        self.conns.get(id).map(|c| c.clone())
    }

    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    pub fn room_count(&self) -> usize {
        self.rooms.len()
    }

    /// Adds `conn` to `room`: the joiner gets `room_joined` with the member list (and the
    /// room's current `seq` when it has history), everyone else `user_joined`. With `since`,
    /// the joiner then gets every persisted message after `since` it missed, before any
    /// live one. Joining a room one is already in repeats `room_joined` only.
    pub async fn join(&self, conn: &Arc<Conn>, room: &RoomName, since: Option<u64>) -> Result<(), ClientError> {
        // Boxed: reading a room's numbering back is a large future, and most joins find
        // it in memory.
        let stream = Box::pin(self.history.load(room)).await;
        let Some(since) = since else {
            match stream {
                Some(stream) => {
                    let st = stream.lock();
                    let seq = Some(st.delivered()).filter(|s| *s > 0);
                    self.join_locked(conn, room, seq, None, false)?;
                }
                None => self.join_locked(conn, room, None, None, false)?,
            }
            return Ok(());
        };
        let Some(stream) = stream else {
            // No history to catch up from: join, and say so.
            return self.join_locked(conn, room, None, Some((since, None)), false);
        };
        let plan = {
            let st = stream.lock();
            let plan = st.plan_catch_up(since);
            // From here until the release below, live frames for this connection wait in
            // its outbox behind the catch-up: nothing can fall between the two.
            self.join_locked(conn, room, Some(plan.seq), None, true)?;
            plan
        };
        let frames = self.history.finish_catch_up(room, since, plan).await;
        conn.outbox.release(frames);
        Ok(())
    }

    /// The join itself, under the room's lock (and, when catching up, the stream's), so that
    /// nothing published can fall between the catch-up and live delivery.
    fn join_locked(
        &self,
        conn: &Arc<Conn>,
        room: &RoomName,
        seq: Option<u64>,
        gap: Option<(u64, Option<u64>)>,
        hold: bool,
    ) -> Result<(), ClientError> {
        loop {
            let entry = self.rooms.entry(room.clone()).or_insert_with(|| {
                self.metrics.rooms_created();
                Arc::new(Room { state: Mutex::new(RoomState::default()) })
            });
            let handle = entry.value().clone();
            drop(entry);
            let mut state = handle.state.lock();
            if state.dead {
                continue;
            }
            let joining = !conn.in_room(room);
            if joining && state.members.len() >= self.max_members {
                return Err(ClientError::RoomFull(room.to_string()));
            }
            let ids: Vec<&str> =
                state.members.iter().map(|m| &*m.id).chain((!conn.in_room(room)).then_some(&*conn.id)).collect();
            conn.send(protocol::room_joined(room, &ids, seq));
            if let Some((after, before)) = gap {
                conn.send(protocol::history_gap(room, after, before));
            }
            if hold {
                conn.outbox.hold();
            }
            if conn.add_room(room) {
                let notice =
                    protocol::presence(true, &conn.id, &conn.identity.user_id, &conn.identity.username(), room);
                deliver_locked(&state.members, &notice, None, &self.metrics);
                state.members.push(conn.clone());
            }
            return Ok(());
        }
    }

    /// Publishes a serialized message to `room`. With `persist` (and history available), it
    /// gets the room's next sequence number and is stored; returns that number when known.
    pub fn publish(&self, room: &RoomName, body: String, exclude: Option<&str>, persist: bool) -> Option<u64> {
        if !persist {
            self.deliver(room, &Frame::text(body), exclude);
            return None;
        }
        self.history.publish(room, body, exclude, &|frame| {
            self.deliver(room, frame, exclude);
        })
    }

    /// Removes `conn` from `room`; the remaining members get `user_left`.
    pub fn leave(&self, conn: &Arc<Conn>, room: &RoomName) -> Result<(), ClientError> {
        if !conn.remove_room(room) {
            return Err(ClientError::NotInRoom(room.to_string()));
        }
        let Some(handle) = self.rooms.get(room).map(|r| r.clone()) else {
            return Ok(());
        };
        let mut state = handle.state.lock();
        if let Some(i) = state.members.iter().position(|m| Arc::ptr_eq(m, conn)) {
            state.members.swap_remove(i);
        }
        if state.members.is_empty() {
            state.dead = true;
            drop(state);
            if self.rooms.remove_if(room, |_, r| Arc::ptr_eq(r, &handle)).is_some() {
                self.metrics.rooms_dropped();
            }
        } else {
            let notice = protocol::presence(false, &conn.id, &conn.identity.user_id, &conn.identity.username(), room);
            deliver_locked(&state.members, &notice, None, &self.metrics);
        }
        Ok(())
    }

    /// Pushes `frame` to every member of `room` except `exclude`. Returns the number of
    /// members it was queued for.
    pub fn deliver(&self, room: &RoomName, frame: &Frame, exclude: Option<&str>) -> usize {
        let Some(handle) = self.rooms.get(room).map(|r| r.clone()) else {
            return 0;
        };
        let state = handle.state.lock();
        deliver_locked(&state.members, frame, exclude, &self.metrics)
    }

    /// Pushes `frame` to every connection on this node except `exclude`.
    pub fn deliver_all(&self, frame: &Frame, exclude: Option<&str>) -> usize {
        let mut n = 0;
        for conn in self.conns.iter() {
            if Some(&*conn.id) != exclude && self.push(conn.value(), frame.clone()) {
                n += 1;
            }
        }
        n
    }

    /// Sends to one connection; false if it is gone or closing.
    pub fn send_to(&self, id: &str, frame: Frame) -> bool {
        match self.conn(id) {
            Some(conn) => self.push(&conn, frame),
            None => false,
        }
    }

    fn push(&self, conn: &Conn, frame: Frame) -> bool {
        push_counted(conn, frame, &self.metrics)
    }

    pub fn members(&self, room: &RoomName) -> Vec<Arc<str>> {
        match self.rooms.get(room).map(|r| r.clone()) {
            Some(handle) => handle.state.lock().members.iter().map(|m| m.id.clone()).collect(),
            None => Vec::new(),
        }
    }

    /// One heartbeat round: terminates connections silent for `timeout`, closes those whose
    /// token expired (past the same clock-skew `leeway_secs` it was accepted with), pings the
    /// rest. A single sweep for all connections replaces a timer per connection.
    pub fn heartbeat(&self, timeout: Duration, leeway_secs: u64) {
        let ping = Frame::Ping(Default::default());
        let now = crate::clock::now_secs();
        for conn in self.conns.iter() {
            if conn.idle_for() > timeout {
                conn.outbox.close(CloseReason::HeartbeatTimeout);
            } else if conn.identity.expired(now, leeway_secs) {
                conn.outbox.close(CloseReason::Policy("token expired"));
            } else {
                self.push(conn.value(), ping.clone());
            }
        }
    }

    pub fn close_all(&self, reason: CloseReason) {
        if reason == CloseReason::Shutdown {
            self.closing.store(true, Ordering::SeqCst);
        }
        for conn in self.conns.iter() {
            conn.outbox.close(reason);
        }
    }
}

fn push_counted(conn: &Conn, frame: Frame, metrics: &Metrics) -> bool {
    match conn.send(frame) {
        Push::Queued => true,
        Push::Closed => {
            metrics.deliveries_dropped.fetch_add(1, Ordering::Relaxed);
            false
        }
        Push::Overflowed => {
            metrics.slow_consumers.fetch_add(1, Ordering::Relaxed);
            metrics.deliveries_dropped.fetch_add(1, Ordering::Relaxed);
            false
        }
    }
}

fn deliver_locked(members: &[Arc<Conn>], frame: &Frame, exclude: Option<&str>, metrics: &Metrics) -> usize {
    let mut n = 0;
    for member in members {
        if Some(&*member.id) != exclude && push_counted(member, frame.clone(), metrics) {
            n += 1;
        }
    }
    n
}

/// The fan-out seam. Plugins publish through this trait only, never through the hub, so
/// that a broker spanning several gateway nodes (Redis pub/sub, say) can replace
/// [`LocalBroker`] without touching plugins or sessions.
pub trait Broker: Send + Sync + 'static {
    /// Delivers a serialized message to every member of `room` except `exclude`; with
    /// `persist`, numbers and stores it first and returns its sequence number.
    fn publish(&self, room: &RoomName, body: String, exclude: Option<&str>, persist: bool) -> Option<u64>;
    /// Delivers `frame` to every connected client, except `exclude`.
    fn broadcast(&self, frame: &Frame, exclude: Option<&str>) -> usize;
}

/// The default broker: this process is the whole cluster.
pub struct LocalBroker(pub Arc<Hub>);

impl Broker for LocalBroker {
    fn publish(&self, room: &RoomName, body: String, exclude: Option<&str>, persist: bool) -> Option<u64> {
        self.0.publish(room, body, exclude, persist)
    }

    fn broadcast(&self, frame: &Frame, exclude: Option<&str>) -> usize {
        self.0.deliver_all(frame, exclude)
    }
}
