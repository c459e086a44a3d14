//! The fan-out scenario: K rooms of N member connections, P of them also publishing,
//! at a fixed total rate or as fast as a bounded number of messages in flight allows.
//!
//! Shape of a run: the connections are split over `--threads` shards, each an OS thread
//! running a single-threaded tokio runtime, so the hot path needs no atomics or locks
//! (the shard's latency histogram is a `RefCell`). Every connection is its own task:
//! connect, welcome, join, then wait for the orchestrator's timeline; publishers start at
//! the same absolute instant in every shard, the first `--warmup` seconds are not
//! measured, and after the window each publisher sends a stop sign. Because a server
//! delivers one connection's messages in order, a member that has the stop sign of every
//! publisher of its room has everything it will ever get, and leaves; the drain deadline
//! bounds the wait when something was lost. The orchestrator samples the tool's and the
//! server's CPU time at the window's edges, so CPU per delivery covers exactly the
//! deliveries counted in the window.

use std::cell::RefCell;
use std::pin::pin;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{FutureExt, SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::time::sleep_until;
use tokio_tungstenite::tungstenite::Message;

use crate::cli::{FanoutArgs, LocalUrl};
use crate::client::{self, Ws};
use crate::error::{BenchError, Context, Result, bail};
use crate::pacing::{Alarm, Schedule, instant_at, now_ns, secs_to_ns};
use crate::procs;
use crate::report::{Table, int, num};
use crate::stats::{Accounting, Counts, LatencySummary, Ledger, Seen, Sent, new_histogram};
use crate::wire::{self, Inbound, Marker};

/// Which connection is where. Connection `c` is in room `c % rooms`; connections
/// `0..publishers` publish, so publisher `p` is connection `p`, in room `p % rooms`, and
/// is the `p / rooms`-th publisher of that room.
#[derive(Debug, Clone, Copy)]
struct Layout {
    rooms: u32,
    members: u32,
    publishers: u32,
}

impl Layout {
    fn new(args: &FanoutArgs) -> Result<Layout> {
        let l = Layout { rooms: args.rooms, members: args.members, publishers: args.publishers };
        if l.publishers < l.rooms {
            bail!(
                "--publishers ({}) must be at least --rooms ({}): every room needs a publisher",
                l.publishers,
                l.rooms
            );
        }
        if u64::from(l.publishers) > l.connections() {
            bail!("--publishers ({}) cannot exceed rooms × members ({})", l.publishers, l.connections());
        }
        if l.connections() > 100_000 {
            bail!("rooms × members = {} is more than the 100,000 connections this tool drives", l.connections());
        }
        let fds = procs::nofile_limit();
        if l.connections() + 64 > fds {
            bail!(
                "rooms × members = {} connections need more file descriptors than the {fds} allowed",
                l.connections()
            );
        }
        Ok(l)
    }

    fn connections(&self) -> u64 {
        u64::from(self.rooms) * u64::from(self.members)
    }

    fn room_of(&self, conn: u32) -> u32 {
        conn % self.rooms
    }

    fn publishers_in(&self, room: u32) -> u32 {
        self.publishers / self.rooms + u32::from(room < self.publishers % self.rooms)
    }
}

/// Room names carry the run's marker without its prefix: a notice naming the room (such
/// as `user_joined`) must not look like a delivery to the scanner.
fn room_name(marker: &Marker, room: u32) -> String {
    format!("room-{}-{room}", marker.unique_part())
}

/// When things happen, in the tool's time base; the same for every shard.
#[derive(Debug, Clone, Copy)]
struct Timeline {
    start_ns: u64,
    window_start_ns: u64,
    window_end_ns: u64,
    deadline_ns: u64,
}

impl Timeline {
    #[inline]
    fn in_window(&self, ns: u64) -> bool {
        (self.window_start_ns..self.window_end_ns).contains(&ns)
    }
}

/// What the orchestrator has told the shards. Plain members join first, publishers last:
/// the servers fan out in join order, so a publisher's echo comes after (most of) its room
/// has been written to, and "in flight" then bounds the backlog of every member, not just
/// the publisher's. Joined the other way round, a publisher refills on its early echo
/// while the rest of the room falls ever further behind (and a server may close them as
/// slow consumers). The order is also the same in every run and for every server.
#[derive(Debug, Clone, Copy)]
enum Phase {
    Members,
    Publishers,
    Run(Timeline),
    Abort,
}

#[derive(Debug, Clone, Copy)]
enum Pace {
    MaxRate { in_flight: u64 },
    Fixed { rate: u64 },
}

/// What a shard needs, shared by its tasks.
struct Shard {
    url: LocalUrl,
    marker: Arc<Marker>,
    layout: Layout,
    rooms: Vec<String>,
    pace: Pace,
    size: usize,
    read_buffer: usize,
    latency: RefCell<Histogram<u64>>,
}

/// One connection's outcome.
#[derive(Default)]
struct ConnResult {
    counts: Counts,
    sent: Sent,
}

/// One shard's outcome.
struct ShardResult {
    counts: Counts,
    sent: Sent,
    latency: Histogram<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct FanoutResult {
    pub options: FanoutArgs,
    pub marker: String,
    pub connections: u64,
    pub setup_s: f64,
    pub window_s: f64,
    pub sent: Sent,
    pub sent_per_s: f64,
    pub deliveries_per_s: f64,
    pub accounting: Accounting,
    pub counts: Counts,
    pub latency: LatencySummary,
    /// The tool's own user+system CPU during the window, per delivery counted in it.
    pub tool_cpu_us_per_delivery: f64,
    pub tool_cpu_percent: f64,
    /// Times the tool's threads were preempted during the window.
    pub tool_preemptions: u64,
    pub server_cpu_us_per_delivery: Option<f64>,
    pub server_cpu_percent: Option<f64>,
    pub server_rss_kb_after: Option<u64>,
    /// CPU used during the window by everything except the tool and the server, in % of
    /// one core: anything well above zero means the figures were disturbed.
    pub other_cpu_percent: Option<f64>,
}

const SETUP_STEP_LIMIT: Duration = Duration::from_secs(10);
const CLOSE_LIMIT: Duration = Duration::from_secs(2);

pub async fn run(args: &FanoutArgs) -> Result<FanoutResult> {
    let layout = Layout::new(args)?;
    let marker = Arc::new(Marker::random());
    let pace = if args.rate == 0 {
        Pace::MaxRate { in_flight: u64::from(args.in_flight) }
    } else {
        Pace::Fixed { rate: args.rate }
    };
    let (phase_tx, phase_rx) = watch::channel(Phase::Members);
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel::<Result<()>>();
    let threads = args.threads.min(u32::try_from(layout.connections()).unwrap_or(u32::MAX)).max(1);
    let per_shard_concurrency = (args.connect_concurrency / threads).max(1) as usize;
    let setup_started = now_ns();

    let mut shards = Vec::new();
    for index in 0..threads {
        let (url, marker, phase_rx, ready_tx) = (args.url.clone(), marker.clone(), phase_rx.clone(), ready_tx.clone());
        let size = args.size as usize;
        let read_buffer = args.read_buffer as usize;
        let handle = std::thread::Builder::new()
            .name(format!("load-{index}"))
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .context("building a shard runtime")?;
                let shard = Rc::new(Shard {
                    url,
                    rooms: (0..layout.rooms).map(|r| room_name(&marker, r)).collect(),
                    marker,
                    layout,
                    pace,
                    size,
                    read_buffer,
                    latency: RefCell::new(new_histogram()),
                });
                let conns: Vec<u32> = (0..layout.connections() as u32).filter(|c| c % threads == index).collect();
                let local = tokio::task::LocalSet::new();
                local.block_on(&rt, run_shard(shard, conns, per_shard_concurrency, phase_rx, ready_tx))
            })
            .context("starting a load thread")?;
        shards.push(handle);
    }
    drop(ready_tx);

    // Every shard reports twice (its plain members joined, then its publishers), or a failure.
    let setup_limit = Duration::from_secs(60) + Duration::from_millis(2) * layout.connections() as u32;
    let setup = tokio::time::timeout(setup_limit, async {
        for members_only in [true, false] {
            for _ in 0..threads {
                match ready_rx.recv().await {
                    Some(Ok(())) => {}
                    Some(Err(e)) => return Err(e),
                    None => bail!("a load thread ended during setup"),
                }
            }
            if members_only {
                let _ = phase_tx.send(Phase::Publishers);
            }
        }
        Ok(())
    })
    .await
    .unwrap_or_else(|_| Err(BenchError::msg(format!("setup took longer than {setup_limit:?}"))));
    if let Err(e) = setup {
        let _ = phase_tx.send(Phase::Abort);
        let _ = join_shards(shards).await;
        return Err(e).context("setting up the fan-out connections");
    }
    let setup_s = (now_ns() - setup_started) as f64 / 1e9;

    // A short lead so that every shard sees the timeline before its start.
    let start_ns = now_ns() + 20_000_000;
    let window_start_ns = start_ns + secs_to_ns(args.warmup);
    let window_end_ns = window_start_ns + secs_to_ns(args.duration);
    let timeline =
        Timeline { start_ns, window_start_ns, window_end_ns, deadline_ns: window_end_ns + secs_to_ns(args.drain) };
    let _ = phase_tx.send(Phase::Run(timeline));

    sleep_until(instant_at(window_start_ns)).await;
    let ((tool0, preempted0), server0, busy0) =
        (procs::self_usage(), server_cpu(args.server_pid), procs::machine_busy_ns());
    sleep_until(instant_at(window_end_ns)).await;
    let ((tool1, preempted1), server1, busy1) =
        (procs::self_usage(), server_cpu(args.server_pid), procs::machine_busy_ns());

    let results = join_shards(shards).await?;
    let mut counts = Counts::default();
    let mut sent = Sent::default();
    let mut latency = new_histogram();
    for r in &results {
        counts.merge(&r.counts);
        sent.merge(&r.sent);
        latency.add(&r.latency).context("merging latency histograms")?;
    }
    let window_s = (window_end_ns - window_start_ns) as f64 / 1e9;
    let deliveries = counts.in_window;
    let per_delivery = |cpu_ns: u64| if deliveries == 0 { f64::NAN } else { cpu_ns as f64 / 1e3 / deliveries as f64 };
    let tool_cpu = tool1.saturating_sub(tool0);
    let server_cpu = match (server0, server1) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a)),
        _ => None,
    };
    Ok(FanoutResult {
        options: args.clone(),
        marker: marker.as_str().to_string(),
        connections: layout.connections(),
        setup_s,
        window_s,
        sent_per_s: sent.in_window as f64 / window_s,
        deliveries_per_s: deliveries as f64 / window_s,
        accounting: Accounting::new(sent.messages, u64::from(layout.members), &counts),
        latency: LatencySummary::of(&latency),
        tool_cpu_us_per_delivery: per_delivery(tool_cpu),
        tool_cpu_percent: tool_cpu as f64 / 1e7 / window_s,
        tool_preemptions: preempted1.saturating_sub(preempted0),
        server_cpu_us_per_delivery: server_cpu.map(per_delivery),
        server_cpu_percent: server_cpu.map(|ns| ns as f64 / 1e7 / window_s),
        server_rss_kb_after: args.server_pid.and_then(|pid| procs::rss_kb(pid).ok()),
        other_cpu_percent: match (busy0, busy1, server_cpu) {
            (Some(a), Some(b), Some(server)) => {
                Some((b.saturating_sub(a) as f64 - tool_cpu as f64 - server as f64).max(0.0) / 1e7 / window_s)
            }
            _ => None,
        },
        sent,
        counts,
    })
}

fn server_cpu(pid: Option<u32>) -> Option<u64> {
    pid.and_then(|pid| procs::cpu_ns(pid).ok())
}

async fn join_shards(shards: Vec<std::thread::JoinHandle<Result<ShardResult>>>) -> Result<Vec<ShardResult>> {
    tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        for handle in shards {
            match handle.join() {
                Ok(result) => out.push(result?),
                Err(_) => bail!("a load thread panicked"),
            }
        }
        Ok(out)
    })
    .await
    .context("waiting for the load threads")?
}

async fn run_shard(
    shard: Rc<Shard>,
    conns: Vec<u32>,
    concurrency: usize,
    phase: watch::Receiver<Phase>,
    ready: mpsc::UnboundedSender<Result<()>>,
) -> Result<ShardResult> {
    let gate = Rc::new(Semaphore::new(concurrency));
    let (joined_tx, mut joined_rx) = mpsc::unbounded_channel::<Result<()>>();
    let conn_ids = conns.clone();
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|conn| {
            tokio::task::spawn_local(connection(shard.clone(), conn, gate.clone(), phase.clone(), joined_tx.clone()))
        })
        .collect();
    drop(joined_tx);
    let publishers = shard.layout.publishers;
    let stages =
        [conn_ids.iter().filter(|&&c| c >= publishers).count(), conn_ids.iter().filter(|&&c| c < publishers).count()];
    let mut failed = false;
    for expected in stages {
        for _ in 0..expected {
            match joined_rx.recv().await {
                Some(Ok(())) => {}
                Some(Err(e)) => {
                    if !failed {
                        failed = true;
                        let _ = ready.send(Err(e));
                    }
                }
                // Every task has ended (after an abort).
                None => break,
            }
        }
        if !failed {
            let _ = ready.send(Ok(()));
        }
    }
    let mut counts = Counts::default();
    let mut sent = Sent::default();
    for task in tasks {
        match task.await {
            Ok(r) => {
                counts.merge(&r.counts);
                sent.merge(&r.sent);
            }
            Err(e) => counts.error(format!("task failed: {e}")),
        }
    }
    let latency = shard.latency.replace(new_histogram());
    Ok(ShardResult { counts, sent, latency })
}

/// One connection from open to close.
async fn connection(
    shard: Rc<Shard>,
    conn: u32,
    gate: Rc<Semaphore>,
    mut phase: watch::Receiver<Phase>,
    joined: mpsc::UnboundedSender<Result<()>>,
) -> ConnResult {
    let room = shard.layout.room_of(conn);
    if conn < shard.layout.publishers && !publishers_may_join(&mut phase).await {
        return ConnResult::default();
    }
    let opened = async {
        // The semaphore is never closed, so acquiring only fails if it were.
        let _permit = gate.acquire().await.context("connect gate closed")?;
        let mut ws = client::open(&shard.url, shard.read_buffer, SETUP_STEP_LIMIT).await?;
        client::join(&mut ws, &shard.rooms[room as usize], SETUP_STEP_LIMIT).await?;
        Ok::<_, BenchError>(ws)
    }
    .await
    .with_context(|| format!("connection {conn}"));
    let mut ws = match opened {
        Ok(ws) => {
            let _ = joined.send(Ok(()));
            ws
        }
        Err(e) => {
            let mut result = ConnResult::default();
            result.counts.error("setup failed");
            let _ = joined.send(Err(e));
            return result;
        }
    };
    let mut inbox = Inbox::new(&shard, room, (conn < shard.layout.publishers).then_some(conn));
    let Some(timeline) = wait_for_start(&shard, &mut ws, &mut phase, &mut inbox).await else {
        if inbox.open {
            let _ = client::close(&mut ws, CLOSE_LIMIT).await;
        }
        return ConnResult { counts: inbox.counts, sent: Sent::default() };
    };
    inbox.timeline = timeline;
    let sent = match inbox.publisher {
        Some(p) => publish(&shard, &mut ws, &mut inbox, p).await,
        None => {
            receive(&shard, &mut ws, &mut inbox).await;
            Sent::default()
        }
    };
    if inbox.open {
        // Best effort: the figures are complete whatever happens to the goodbye.
        let _ = client::close(&mut ws, CLOSE_LIMIT).await;
    }
    ConnResult { counts: inbox.counts, sent }
}

/// Waits until the plain members have joined; false if the run was called off.
async fn publishers_may_join(phase: &mut watch::Receiver<Phase>) -> bool {
    // Ends when the orchestrator moves on or goes away (the sender dropped).
    loop {
        match *phase.borrow_and_update() {
            Phase::Members => {}
            Phase::Abort => return false,
            Phase::Publishers | Phase::Run(_) => return true,
        }
        if phase.changed().await.is_err() {
            return false;
        }
    }
}

/// Waits for the timeline while reading the join notices that arrive in the meantime, so
/// that no socket buffer fills up before the run starts. A delivery can only come once the
/// run has started, so one seen here is handed to the inbox with the timeline it implies.
async fn wait_for_start(
    shard: &Shard,
    ws: &mut Ws,
    phase: &mut watch::Receiver<Phase>,
    inbox: &mut Inbox,
) -> Option<Timeline> {
    // Ends when the orchestrator sends a phase or goes away (the sender dropped).
    loop {
        match *phase.borrow_and_update() {
            Phase::Run(t) => return Some(t),
            Phase::Abort => return None,
            Phase::Members | Phase::Publishers => {}
        }
        tokio::select! {
            biased;
            changed = phase.changed() => {
                if changed.is_err() {
                    return None;
                }
            }
            msg = client::next_text(ws) => match msg {
                Ok(Some(text)) => match (*phase.borrow_and_update(), shard.marker.scan(text.as_bytes())) {
                    (_, Inbound::Other) | (Phase::Members | Phase::Publishers | Phase::Abort, _) => {
                        inbox.on_notice(text.as_bytes());
                    }
                    (Phase::Run(t), _) => {
                        inbox.timeline = t;
                        // Cannot be the end: every publisher sends messages before it stops.
                        let _ = inbox.on_text(shard, text.as_bytes());
                        return Some(t);
                    }
                },
                Ok(None) => {
                    inbox.counts.closed_early += 1;
                    inbox.open = false;
                    return None;
                }
                Err(e) => {
                    inbox.counts.error(e.to_string());
                    inbox.open = false;
                    return None;
                }
            },
        }
    }
}

/// The receive-side state of one connection.
struct Inbox {
    room: u32,
    publisher: Option<u32>,
    ledger: Ledger,
    stops_needed: u64,
    timeline: Timeline,
    counts: Counts,
    open: bool,
}

enum Got {
    Nothing,
    OwnEcho,
    AllStopped,
}

impl Inbox {
    fn new(shard: &Shard, room: u32, publisher: Option<u32>) -> Inbox {
        let publishers = shard.layout.publishers_in(room);
        Inbox {
            room,
            publisher,
            ledger: Ledger::new(publishers as usize),
            stops_needed: u64::from(publishers),
            timeline: Timeline { start_ns: 0, window_start_ns: 0, window_end_ns: 0, deadline_ns: 0 },
            counts: Counts::default(),
            open: true,
        }
    }

    /// The per-delivery hot path: no allocation, no JSON parsing, no lock.
    #[inline]
    fn on_text(&mut self, shard: &Shard, text: &[u8]) -> Got {
        match shard.marker.scan(text) {
            Inbound::Delivery { publisher, seq, sent_ns } => {
                let recv_ns = now_ns();
                let layout = &shard.layout;
                if publisher >= layout.publishers || layout.room_of(publisher) != self.room {
                    self.counts.unexpected += 1;
                    return Got::Nothing;
                }
                match self.ledger.record((publisher / layout.rooms) as usize, seq) {
                    Some(Seen::New { skipped }) => {
                        self.counts.received += 1;
                        self.counts.gaps += skipped;
                    }
                    Some(Seen::Again) => {
                        self.counts.duplicates += 1;
                        return Got::Nothing;
                    }
                    None => {
                        self.counts.unexpected += 1;
                        return Got::Nothing;
                    }
                }
                if self.timeline.in_window(recv_ns) {
                    self.counts.in_window += 1;
                }
                if self.timeline.in_window(sent_ns) {
                    shard.latency.borrow_mut().saturating_record(recv_ns.saturating_sub(sent_ns).max(1));
                }
                if self.publisher == Some(publisher) { Got::OwnEcho } else { Got::Nothing }
            }
            Inbound::Stop { publisher } => {
                if publisher >= shard.layout.publishers || shard.layout.room_of(publisher) != self.room {
                    self.counts.unexpected += 1;
                    return Got::Nothing;
                }
                self.counts.stops += 1;
                if self.counts.stops >= self.stops_needed { Got::AllStopped } else { Got::Nothing }
            }
            Inbound::Malformed => {
                self.counts.malformed += 1;
                self.counts.sample(&String::from_utf8_lossy(text));
                Got::Nothing
            }
            Inbound::Other => {
                self.on_notice(text);
                Got::Nothing
            }
        }
    }

    /// Anything without the marker: rare, so it may allocate.
    #[cold]
    fn on_notice(&mut self, text: &[u8]) {
        let text = String::from_utf8_lossy(text);
        match wire::string_field(&text, "type") {
            Some("error") => {
                let code = wire::string_field(&text, "code").unwrap_or("?");
                self.counts.error(format!("server error: {code}"));
                self.counts.sample(&text);
            }
            kind => {
                let kind = kind.unwrap_or("?");
                *self.counts.notices.entry(kind.to_string()).or_default() += 1;
                // Presence notices are expected; a chat message without the marker is not.
                if !matches!(kind, "user_joined" | "user_left" | "room_joined" | "welcome") {
                    self.counts.sample(&text);
                }
            }
        }
    }

    /// A frame other than text, or the end of the stream. Returns true to stop reading.
    #[cold]
    fn on_other(&mut self, msg: Option<std::result::Result<Message, tokio_tungstenite::tungstenite::Error>>) -> bool {
        match msg {
            Some(Ok(Message::Close(_))) | None => {
                self.counts.closed_early += 1;
                self.open = false;
                true
            }
            Some(Ok(_)) => false,
            Some(Err(e)) => {
                self.counts.error(client::error_kind(&e));
                self.counts.closed_early += 1;
                self.open = false;
                true
            }
        }
    }
}

/// A member that does not publish: read until every publisher of the room said stop.
async fn receive(shard: &Shard, ws: &mut Ws, inbox: &mut Inbox) {
    let mut deadline = pin!(sleep_until(instant_at(inbox.timeline.deadline_ns)));
    loop {
        // Biased: the deadline is polled only when the socket has nothing, once per
        // wake-up rather than once per message.
        let msg = tokio::select! {
            biased;
            msg = ws.next() => msg,
            () = &mut deadline => {
                inbox.counts.timed_out += 1;
                return;
            }
        };
        match msg {
            Some(Ok(Message::Text(text))) => {
                if let Got::AllStopped = inbox.on_text(shard, text.as_bytes()) {
                    return;
                }
            }
            other => {
                if inbox.on_other(other) {
                    return;
                }
            }
        }
    }
}

/// Publisher state for one connection.
struct Publisher<'a> {
    shard: &'a Shard,
    room: &'a str,
    index: u32,
    seq: u64,
    in_flight: u64,
    sent: Sent,
    stopped: bool,
}

impl Publisher<'_> {
    /// The next chat frame, stamped with its send time.
    fn frame(&mut self, t: &Timeline) -> Message {
        let sent_ns = now_ns();
        if t.in_window(sent_ns) {
            self.sent.in_window += 1;
        }
        let text = wire::chat_frame(self.room, &self.shard.marker, self.index, self.seq, sent_ns, self.shard.size);
        self.seq += 1;
        self.in_flight += 1;
        self.sent.messages += 1;
        self.sent.max_in_flight = self.sent.max_in_flight.max(self.in_flight);
        Message::text(text)
    }

    async fn send_stop(&mut self, ws: &mut Ws) -> Result<()> {
        self.stopped = true;
        self.sent.stop_signs += 1;
        ws.send(Message::text(wire::stop_frame(self.room, &self.shard.marker, self.index)))
            .await
            .context("sending stop")
    }
}

/// A publisher (also a member of its room): sends on its schedule or keeps `in_flight`
/// messages outstanding, counts its own echoes, then stops and reads until every
/// publisher of its room has stopped.
async fn publish(shard: &Shard, ws: &mut Ws, inbox: &mut Inbox, index: u32) -> Sent {
    let t = inbox.timeline;
    let mut p = Publisher {
        shard,
        room: &shard.rooms[inbox.room as usize],
        index,
        seq: 0,
        in_flight: 0,
        sent: Sent::default(),
        stopped: false,
    };
    let schedule = match shard.pace {
        Pace::Fixed { rate } => Some(Schedule::new(t.start_ns, shard.layout.publishers, rate)),
        Pace::MaxRate { .. } => None,
    };
    // Armed at the next due send (fixed rate) or at the end of publishing (max rate).
    let first = schedule.map_or(t.window_end_ns, |s| s.due_ns(index, 0).min(t.window_end_ns));
    let alarm = match Alarm::new().and_then(|a| a.set(first).map(|()| a)) {
        Ok(alarm) => alarm,
        Err(e) => {
            inbox.counts.error(format!("timerfd: {e}"));
            return p.sent;
        }
    };
    let mut deadline = pin!(sleep_until(instant_at(t.deadline_ns)));
    sleep_until(instant_at(t.start_ns)).await;
    if let Err(e) = refill(&mut p, ws, &t).await {
        inbox.counts.error(e.to_string());
        return p.sent;
    }
    loop {
        let msg = tokio::select! {
            msg = ws.next() => Some(msg),
            fired = alarm.wait(), if !p.stopped => {
                if let Err(e) = fired {
                    inbox.counts.error(format!("timerfd: {e}"));
                    return p.sent;
                }
                None
            }
            () = &mut deadline => {
                inbox.counts.timed_out += 1;
                return p.sent;
            }
        };
        let step = match msg {
            Some(msg) => {
                let mut got = handle(inbox, shard, &mut p, msg);
                // Take whatever else is already buffered before writing, so that one
                // flush carries as many new messages as there were echoes.
                for _ in 0..256 {
                    if !matches!(got, Ok(false)) {
                        break;
                    }
                    match ws.next().now_or_never() {
                        Some(msg) => got = handle(inbox, shard, &mut p, msg),
                        None => break,
                    }
                }
                match got {
                    Ok(true) => return p.sent,
                    Ok(false) if schedule.is_none() => refill(&mut p, ws, &t).await,
                    Ok(false) => Ok(()),
                    Err(()) => return p.sent,
                }
            }
            None => match schedule {
                Some(s) => send_due(&mut p, ws, &t, &s, &alarm).await,
                None => p.send_stop(ws).await,
            },
        };
        if let Err(e) = step {
            inbox.counts.error(e.to_string());
            return p.sent;
        }
    }
}

/// Handles one received frame for a publisher. `Ok(true)`: every publisher of the room
/// has stopped; `Err(())`: the connection is gone.
fn handle(
    inbox: &mut Inbox,
    shard: &Shard,
    p: &mut Publisher<'_>,
    msg: Option<std::result::Result<Message, tokio_tungstenite::tungstenite::Error>>,
) -> std::result::Result<bool, ()> {
    match msg {
        Some(Ok(Message::Text(text))) => match inbox.on_text(shard, text.as_bytes()) {
            Got::OwnEcho => {
                p.in_flight = p.in_flight.saturating_sub(1);
                p.sent.echoes += 1;
                Ok(false)
            }
            Got::AllStopped => Ok(true),
            Got::Nothing => Ok(false),
        },
        other => {
            if inbox.on_other(other) {
                Err(())
            } else {
                Ok(false)
            }
        }
    }
}

/// Max rate: tops the window up to `in_flight` outstanding messages, one flush for all.
async fn refill(p: &mut Publisher<'_>, ws: &mut Ws, t: &Timeline) -> Result<()> {
    let Pace::MaxRate { in_flight } = p.shard.pace else {
        return Ok(());
    };
    if p.stopped {
        return Ok(());
    }
    let mut fed = false;
    while p.in_flight < in_flight {
        let now = now_ns();
        if now >= t.window_end_ns {
            break;
        }
        let msg = p.frame(t);
        ws.feed(msg).await.context("sending chat")?;
        fed = true;
    }
    if fed {
        ws.flush().await.context("sending chat")?;
    }
    Ok(())
}

/// Fixed rate: sends every message that is due (a late wake-up sends the backlog at once
/// rather than shifting the schedule), then re-arms the timer for the next one or, past
/// the end of publishing, sends the stop sign.
async fn send_due(p: &mut Publisher<'_>, ws: &mut Ws, t: &Timeline, s: &Schedule, alarm: &Alarm) -> Result<()> {
    let now = now_ns();
    let mut fed = false;
    // Bounded per wake-up so that a tool far behind still reads in between.
    for _ in 0..1024 {
        let due = s.due_ns(p.index, p.seq);
        if due > now || due >= t.window_end_ns {
            break;
        }
        let lag = now - due;
        if lag > 1_000_000 {
            p.sent.late_sends += 1;
        }
        p.sent.max_lag_us = p.sent.max_lag_us.max(lag as f64 / 1e3);
        let msg = p.frame(t);
        ws.feed(msg).await.context("sending chat")?;
        fed = true;
    }
    if fed {
        ws.flush().await.context("sending chat")?;
    }
    let next = s.due_ns(p.index, p.seq);
    if next >= t.window_end_ns {
        p.send_stop(ws).await?;
    } else {
        alarm.set(next).context("arming the send timer")?;
    }
    Ok(())
}

pub fn table(r: &FanoutResult) -> String {
    let o = &r.options;
    let pace =
        if o.rate == 0 { format!("max rate, {} in flight", o.in_flight) } else { format!("{} msg/s", int(o.rate)) };
    let mut t = Table::new(&["fanout", "value"]);
    let mut row = |k: &str, v: String| t.row(vec![k.to_string(), v]);
    row("target", o.url.to_string());
    row("layout", format!("{} rooms × {} members, {} publishers, {pace}", o.rooms, o.members, o.publishers));
    row(
        "message",
        format!("{} bytes, {} s warmup + {} s measured, {} thread(s)", o.size, o.warmup, o.duration, o.threads),
    );
    row("sent/s", int(r.sent_per_s.round() as u64));
    row("deliveries/s", int(r.deliveries_per_s.round() as u64));
    let a = &r.accounting;
    row("expected", int(a.expected));
    row("received", int(a.received));
    row("missing", int(a.missing));
    row("duplicates", int(a.duplicates));
    row("unexpected", int(a.unexpected));
    row("accounting", if a.complete() { "complete" } else { "INCOMPLETE" }.to_string());
    row("errors", format!("{} {:?}", int(r.counts.error_total()), r.counts.errors));
    if r.counts.closed_early + r.counts.timed_out > 0 {
        row("closed early / timed out", format!("{} / {}", r.counts.closed_early, r.counts.timed_out));
    }
    let l = &r.latency;
    row(
        "latency p50 / p90 / p99 / max",
        format!("{:.3} / {:.3} / {:.3} / {:.3} ms", l.p50_us / 1e3, l.p90_us / 1e3, l.p99_us / 1e3, l.max_us / 1e3),
    );
    row("latency samples", int(l.samples));
    row("within 0.3 / 0.5 ms", format!("{:.1}% / {:.1}%", l.within_300us_percent, l.within_500us_percent));
    if o.rate > 0 {
        row("late sends (>1 ms) / max lag", format!("{} / {:.3} ms", r.sent.late_sends, r.sent.max_lag_us / 1e3));
    }
    row(
        "tool CPU per delivery",
        format!(
            "{} µs ({}% of a core, preempted {} times)",
            num(Some(r.tool_cpu_us_per_delivery), 3),
            num(Some(r.tool_cpu_percent), 0),
            r.tool_preemptions
        ),
    );
    if let (Some(us), Some(pct)) = (r.server_cpu_us_per_delivery, r.server_cpu_percent) {
        row("server CPU per delivery", format!("{} µs ({}% of a core)", num(Some(us), 3), num(Some(pct), 0)));
    }
    if let Some(pct) = r.other_cpu_percent {
        row("other processes' CPU", format!("{}% of a core", num(Some(pct), 0)));
    }
    if let Some(kb) = r.server_rss_kb_after {
        row("server RSS after", format!("{} KB", int(kb)));
    }
    t.render()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(rooms: u32, members: u32, publishers: u32) -> FanoutArgs {
        FanoutArgs {
            url: crate::cli::parse_local_url("ws://127.0.0.1:1/ws").unwrap(),
            rooms,
            members,
            publishers,
            rate: 0,
            in_flight: 16,
            duration: 1.0,
            warmup: 0.0,
            size: 100,
            server_pid: None,
            threads: 1,
            connect_concurrency: 1,
            drain: 1.0,
            read_buffer: 16384,
        }
    }

    #[test]
    fn layout_puts_publishers_round_robin() {
        let l = Layout::new(&args(3, 4, 5)).unwrap();
        assert_eq!(l.connections(), 12);
        assert_eq!((0..3).map(|r| l.publishers_in(r)).collect::<Vec<_>>(), vec![2, 2, 1]);
        assert_eq!((0..5).map(|p| l.room_of(p)).collect::<Vec<_>>(), vec![0, 1, 2, 0, 1]);
        let members_per_room = (0..12).filter(|&c| l.room_of(c) == 1).count();
        assert_eq!(members_per_room, 4);
    }

    #[test]
    fn layout_bounds() {
        assert!(Layout::new(&args(2, 10, 1)).is_err());
        assert!(Layout::new(&args(2, 2, 5)).is_err());
        assert!(Layout::new(&args(1000, 1000, 1000)).is_err());
        assert!(Layout::new(&args(10, 10, 10)).is_ok());
    }
}
