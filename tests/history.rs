//! Room history: sequence numbers, HTTP replay, reconnect catch-up under concurrent
//! publishing, restarts, retention, and a database that fails.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use rtgate::config::Durability;
use rtgate::history::Health;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

/// GET `path` once everything published so far is committed: with `batched` durability
/// (the default) a message reaches clients before the database.
async fn get_json(gw: &Gw, path: &str) -> (u16, Value) {
    gw.gateway().history.sync().await;
    let (status, _, body) = http_get(gw.addr, path, &[]).await;
    (status, serde_json::from_str(&body).unwrap_or_else(|_| panic!("JSON from {path}: {body}")))
}

fn seqs(page: &Value) -> Vec<u64> {
    page["messages"].as_array().unwrap().iter().map(|m| m["seq"].as_u64().unwrap()).collect()
}

/// Publishes `n` chat messages to `room` from `c` (not necessarily a member) as fast as
/// the socket takes them.
async fn publish(c: &mut Client, room: &str, tag: &str, n: usize) {
    for i in 0..n {
        c.ws.feed(Message::text(json!({"type": "chat", "room": room, "message": format!("{tag}-{i}")}).to_string()))
            .await
            .unwrap();
    }
    c.ws.flush().await.unwrap();
}

/// Reads chat messages until `until` seq, returning the seqs seen in order.
async fn read_seqs(c: &mut Client, until: u64) -> Vec<u64> {
    let mut seen = Vec::new();
    while seen.last().is_none_or(|s| *s < until) {
        let m = c.recv().await;
        if m["type"] == "chat_message" {
            seen.push(m["seq"].as_u64().expect("a seq"));
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishers_get_gapless_sequence_numbers_and_replay_matches_live() {
    let gw = Gw::default().await;
    let mut sub = gw.client().await;
    sub.join("seq").await;
    let mut tasks = Vec::new();
    for p in 0..4 {
        let url = gw.url();
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect(&url).await;
            publish(&mut c, "seq", &format!("p{p}"), 200).await;
            c
        }));
    }
    let mut live = Vec::new();
    while live.len() < 800 {
        let m = sub.recv().await;
        if m["type"] == "chat_message" {
            live.push(m);
        }
    }
    let seqs_live: Vec<u64> = live.iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs_live, (1..=800).collect::<Vec<_>>(), "strictly increasing by one, from 1");
    // Each publisher's messages keep their order.
    for p in 0..4 {
        let mine: Vec<usize> = live
            .iter()
            .filter_map(|m| m["message"].as_str().unwrap().strip_prefix(&format!("p{p}-")).map(|i| i.parse().unwrap()))
            .collect();
        assert_eq!(mine, (0..200).collect::<Vec<_>>());
    }
    // Replay returns the very objects live members got.
    let mut replay = Vec::new();
    let mut after = 0;
    loop {
        let (status, page) = get_json(&gw, &format!("/rooms/seq/history?after={after}&limit=300")).await;
        assert_eq!(status, 200, "{page}");
        assert_eq!(page["room"], "seq");
        replay.extend(page["messages"].as_array().unwrap().iter().cloned());
        match page["next"].as_u64() {
            Some(next) => after = next,
            None => break,
        }
    }
    assert_eq!(replay, live);
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test]
async fn http_paging_forwards_and_backwards() {
    let mut s = settings();
    s.history.page_limit_max = 100;
    let gw = Gw::start(s).await;
    let mut c = gw.client().await;
    c.join("pages").await;
    publish(&mut c, "pages", "m", 120).await;
    read_seqs(&mut c, 120).await;

    let (_, latest) = get_json(&gw, "/rooms/pages/history").await;
    assert_eq!(seqs(&latest), (71..=120).collect::<Vec<_>>(), "the latest 50 by default, ascending");
    assert_eq!((latest["next"].clone(), latest["prev"].clone()), (Value::Null, json!(71)));
    let (_, older) = get_json(&gw, "/rooms/pages/history?before=71").await;
    assert_eq!(seqs(&older), (21..=70).collect::<Vec<_>>());
    assert_eq!((older["next"].clone(), older["prev"].clone()), (json!(70), json!(21)));
    let (_, oldest) = get_json(&gw, "/rooms/pages/history?before=21&limit=50").await;
    assert_eq!(seqs(&oldest), (1..=20).collect::<Vec<_>>());
    assert_eq!(oldest["prev"], Value::Null);

    let (_, first) = get_json(&gw, "/rooms/pages/history?after=0&limit=50").await;
    assert_eq!(seqs(&first), (1..=50).collect::<Vec<_>>());
    assert_eq!((first["next"].clone(), first["prev"].clone()), (json!(50), Value::Null));
    let (_, second) = get_json(&gw, "/rooms/pages/history?after=50&limit=50").await;
    assert_eq!(seqs(&second), (51..=100).collect::<Vec<_>>());
    let (_, last) = get_json(&gw, "/rooms/pages/history?after=100&limit=50").await;
    assert_eq!(seqs(&last), (101..=120).collect::<Vec<_>>());
    assert_eq!(last["next"], Value::Null);
    let (_, past_end) = get_json(&gw, "/rooms/pages/history?after=120").await;
    assert_eq!(past_end["messages"], json!([]));
    assert_eq!(past_end["next"], Value::Null);

    // Cursors beyond every number a room can reach (up to 2^64 - 1) do not wrap around.
    for huge in ["9223372036854775807", "9223372036854775808", "18446744073709551615"] {
        let (status, page) = get_json(&gw, &format!("/rooms/pages/history?after={huge}")).await;
        assert_eq!(status, 200, "{page}");
        assert_eq!((page["messages"].clone(), page["next"].clone()), (json!([]), Value::Null), "after={huge}");
        let (_, page) = get_json(&gw, &format!("/rooms/pages/history?before={huge}")).await;
        assert_eq!(seqs(&page), (71..=120).collect::<Vec<_>>(), "before={huge} is the newest page");
    }

    let (_, capped) = get_json(&gw, "/rooms/pages/history?after=0&limit=1000").await;
    assert_eq!(seqs(&capped).len(), 100, "limit is capped by history.page_limit_max");

    let (status, unknown) = get_json(&gw, "/rooms/never-used/history").await;
    assert_eq!(status, 200);
    assert_eq!(unknown, json!({"room": "never-used", "messages": [], "next": null, "prev": null}));

    for bad in [
        "/rooms/pages/history?after=-1",
        "/rooms/pages/history?after=18446744073709551616",
        "/rooms/pages/history?after=abc",
        "/rooms/pages/history?limit=0",
        "/rooms/pages/history?limit=x",
        "/rooms/pages/history?after=1&before=5",
        "/rooms/bad%20room/history",
        "/rooms/pages/history?surprise=1",
    ] {
        let (status, body) = get_json(&gw, bad).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(body["error"].is_string() && body["message"].is_string(), "{bad}: {body}");
    }
}

/// A client joins with `since` while publishers are mid-flood: it must get exactly the
/// messages after `since`, once each, in order.
async fn catch_up_under_concurrent_publishing(durability: Durability) {
    let mut s = settings();
    s.history.durability = durability;
    s.history.recent = 64;
    let gw = Gw::start(s).await;
    const PER_PUBLISHER: usize = 400;
    const PUBLISHERS: usize = 3;
    let total = (PER_PUBLISHER * PUBLISHERS) as u64;
    let mut first = gw.client().await;
    first.join("race").await;
    let mut publishers = Vec::new();
    for p in 0..PUBLISHERS {
        let url = gw.url();
        publishers.push(tokio::spawn(async move {
            let mut c = Client::connect(&url).await;
            for chunk in 0..8 {
                publish(&mut c, "race", &format!("p{p}c{chunk}"), PER_PUBLISHER / 8).await;
                tokio::task::yield_now().await;
            }
            c
        }));
    }
    // Joiners arrive at several points of the flood, each claiming to have seen what the
    // observer had seen by then.
    let mut joiners = Vec::new();
    let mut seen = 0u64;
    for target in [1u64, 150, 400, 700, 1000] {
        while seen < target {
            let m = first.recv().await;
            if m["type"] == "chat_message" {
                seen = m["seq"].as_u64().unwrap();
            }
        }
        let since = seen / 2;
        let mut j = gw.client().await;
        j.send(json!({"type": "join_room", "room": "race", "since": since})).await;
        let joined = j.expect("room_joined").await;
        assert!(joined["seq"].as_u64().unwrap() >= seen, "{joined}");
        joiners.push((since, j));
    }
    for (since, mut j) in joiners {
        let got = read_seqs(&mut j, total).await;
        assert_eq!(got, (since + 1..=total).collect::<Vec<_>>(), "joined with since={since}");
    }
    for p in publishers {
        p.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catch_up_is_exact_under_concurrent_publishing_per_message() {
    catch_up_under_concurrent_publishing(Durability::PerMessage).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catch_up_is_exact_under_concurrent_publishing_batched() {
    catch_up_under_concurrent_publishing(Durability::Batched).await;
}

#[tokio::test]
async fn catch_up_beyond_the_limit_announces_the_gap() {
    let mut s = settings();
    s.history.max_catchup = 10;
    let gw = Gw::start(s).await;
    let mut c = gw.client().await;
    c.join("many").await;
    publish(&mut c, "many", "m", 30).await;
    read_seqs(&mut c, 30).await;
    let mut j = gw.client().await;
    j.send(json!({"type": "join_room", "room": "many", "since": 5})).await;
    assert_eq!(j.expect("room_joined").await["seq"], 30);
    let gap = j.expect("history_gap").await;
    assert_eq!(gap, json!({"type": "history_gap", "room": "many", "after": 5, "before": 21}));
    assert_eq!(read_seqs(&mut j, 30).await, (21..=30).collect::<Vec<_>>());
    j.expect_error(json!({"type": "join_room", "room": "many", "since": -1}), "invalid_field").await;
    j.expect_error(json!({"type": "join_room", "room": "many", "since": "3"}), "invalid_field").await;
}

#[tokio::test]
async fn history_survives_a_restart_and_numbering_continues() {
    let data = tempfile::tempdir().unwrap();
    let mut s = settings();
    s.history.path = data.path().join("h.db");
    let mut gw = Gw::start(s.clone()).await;
    let mut c = gw.client().await;
    c.join("keep").await;
    publish(&mut c, "keep", "before", 10).await;
    let before: Vec<Value> = {
        let mut v = Vec::new();
        while v.len() < 10 {
            let m = c.recv().await;
            if m["type"] == "chat_message" {
                v.push(m);
            }
        }
        v
    };
    gw.shutdown().await;

    let gw = Gw::start(s).await;
    let (_, page) = get_json(&gw, "/rooms/keep/history").await;
    assert_eq!(page["messages"], Value::Array(before));
    let mut c = gw.client().await;
    let joined = c.join("keep").await;
    assert_eq!(joined["seq"], 10);
    c.send(json!({"type": "chat", "room": "keep", "message": "after"})).await;
    assert_eq!(c.expect("chat_message").await["seq"], 11);
}

#[tokio::test]
async fn typing_notices_are_never_persisted() {
    let gw = Gw::default().await;
    let mut a = gw.client().await;
    let mut b = gw.client().await;
    a.join("quiet").await;
    b.join("quiet").await;
    a.expect("user_joined").await;
    a.send(json!({"type": "typing_start", "room": "quiet"})).await;
    let typing = b.expect("user_typing").await;
    assert!(typing.get("seq").is_none());
    a.send(json!({"type": "chat", "room": "quiet", "message": "x"})).await;
    assert_eq!(b.expect("chat_message").await["seq"], 1);
    let (_, page) = get_json(&gw, "/rooms/quiet/history").await;
    assert_eq!(seqs(&page), vec![1]);
}

#[tokio::test]
async fn retention_keeps_the_newest_per_room_and_drops_the_old() {
    let mut s = settings();
    s.history.max_per_room = 10;
    let gw = Gw::start(s).await;
    let mut c = gw.client().await;
    c.join("ret").await;
    publish(&mut c, "ret", "m", 25).await;
    read_seqs(&mut c, 25).await;
    gw.gateway().history.enforce_retention_now().await;
    let (_, page) = get_json(&gw, "/rooms/ret/history?after=0&limit=100").await;
    assert_eq!(seqs(&page), (16..=25).collect::<Vec<_>>());
    c.send(json!({"type": "chat", "room": "ret", "message": "next"})).await;
    assert_eq!(c.expect("chat_message").await["seq"], 26, "numbering survives retention");
    // A reconnect from before the kept range learns of the gap.
    let mut j = gw.client().await;
    j.send(json!({"type": "join_room", "room": "ret", "since": 3})).await;
    j.expect("room_joined").await;
    assert_eq!(j.expect("history_gap").await["before"], 16);
    assert_eq!(read_seqs(&mut j, 26).await, (16..=26).collect::<Vec<_>>());
}

#[tokio::test]
async fn retention_by_age() {
    let mut s = settings();
    s.history.max_age = Duration::from_secs(60);
    let gw = Gw::start(s).await;
    let mut c = gw.client().await;
    c.join("old").await;
    publish(&mut c, "old", "m", 5).await;
    read_seqs(&mut c, 5).await;
    // Everything stored so far is at least a millisecond older than what follows.
    let split = past_now().await;
    c.send(json!({"type": "chat", "room": "old", "message": "fresh"})).await;
    read_seqs(&mut c, 6).await;
    // Retention as it runs one minute after `split`: the five are older than max_age.
    gw.gateway().history.enforce_retention_at(split + 60_000).await;
    let (_, page) = get_json(&gw, "/rooms/old/history").await;
    assert_eq!(seqs(&page), vec![6]);
}

/// The wall clock in milliseconds, once it has moved past the moment of the call: every
/// message created before the call is stamped earlier than the time returned.
async fn past_now() -> i64 {
    let before = rtgate::clock::now_ms();
    loop {
        let now = rtgate::clock::now_ms();
        if now > before {
            return now;
        }
        tokio::task::yield_now().await;
    }
}

/// Retention may delete every message of a room: numbering still continues after it, and
/// after a restart.
#[tokio::test]
async fn numbering_survives_a_room_emptied_by_retention_and_a_restart() {
    let data = tempfile::tempdir().unwrap();
    let mut s = settings();
    s.history.path = data.path().join("h.db");
    s.history.max_age = Duration::from_secs(60);
    let mut gw = Gw::start(s.clone()).await;
    let mut c = gw.client().await;
    c.join("gone").await;
    publish(&mut c, "gone", "m", 4).await;
    read_seqs(&mut c, 4).await;
    let later = past_now().await + 60_000;
    gw.gateway().history.enforce_retention_at(later).await;
    let (_, page) = get_json(&gw, "/rooms/gone/history").await;
    assert_eq!(seqs(&page), Vec::<u64>::new());
    c.send(json!({"type": "chat", "room": "gone", "message": "next"})).await;
    assert_eq!(c.expect("chat_message").await["seq"], 5);
    let later = past_now().await + 60_000;
    gw.gateway().history.enforce_retention_at(later).await;
    gw.shutdown().await;

    let gw = Gw::start(s).await;
    assert_eq!(seqs(&get_json(&gw, "/rooms/gone/history").await.1), Vec::<u64>::new());
    let mut c = gw.client().await;
    c.join("gone").await;
    c.send(json!({"type": "chat", "room": "gone", "message": "after"})).await;
    assert_eq!(c.expect("chat_message").await["seq"], 6);
}

/// Anyone may publish to any room name: rooms nobody uses any more must not stay in
/// memory. Their state is dropped, counted in `/healthz` and `/metrics`, and read back from
/// the database when the room is used again.
#[tokio::test]
async fn idle_rooms_are_unloaded_and_read_back_when_used_again() {
    let mut s = settings();
    s.history.unload_after = Duration::from_millis(100);
    let gw = Gw::start(s).await;
    let mut c = gw.client().await;
    for i in 0..50 {
        c.send(json!({"type": "chat", "room": format!("spam-{i}"), "message": "x"})).await;
    }
    c.sync().await;
    gw.gateway().history.sync().await;
    assert!(healthz(&gw).await["history"]["rooms"].as_u64().unwrap() >= 50);
    assert!(gw.metric("rtgate_history_rooms_in_memory").await >= 50.0);
    await_metric(gw.addr, "rtgate_history_rooms_in_memory", |n| n == 0.0).await;
    assert_eq!(healthz(&gw).await["history"]["rooms"], 0);

    // Used again: numbering continues, and catch-up reads what memory no longer has.
    c.send(json!({"type": "join_room", "room": "spam-7", "since": 0})).await;
    assert_eq!(c.recv().await, json!({"type": "room_joined", "room": "spam-7", "members": [c.id], "seq": 1}));
    let m = c.expect("chat_message").await;
    assert_eq!((m["message"].as_str(), m["seq"].as_u64()), (Some("x"), Some(1)));
    c.send(json!({"type": "chat", "room": "spam-7", "message": "again"})).await;
    assert_eq!(c.expect("chat_message").await["seq"], 2);
    // A room unloaded while a message to it is on its way is numbered by the writer.
    await_metric(gw.addr, "rtgate_history_rooms_in_memory", |n| n == 0.0).await;
    c.send(json!({"type": "chat", "room": "spam-7", "message": "third"})).await;
    c.send(json!({"type": "chat", "room": "spam-7", "message": "fourth"})).await;
    assert_eq!(c.expect("chat_message").await["seq"], 3);
    assert_eq!(c.expect("chat_message").await["seq"], 4);
}

async fn await_health(gw: &Gw, want: impl Fn(&Health) -> bool) -> Health {
    let mut rx = gw.gateway().history.health();
    let health = tokio::time::timeout(TIMEOUT, rx.wait_for(|h| want(h))).await.expect("health in time").unwrap();
    health.clone()
}

async fn healthz(gw: &Gw) -> Value {
    get_json(gw, "/healthz").await.1
}

#[tokio::test]
async fn a_database_that_cannot_be_opened_does_not_stop_chat_and_is_retried() {
    let data = tempfile::tempdir().unwrap();
    // The database's directory is a file: it cannot be created.
    let blocker = data.path().join("db");
    std::fs::write(&blocker, "not a directory").unwrap();
    let mut s = settings();
    s.history.path = blocker.join("h.db");
    s.history.retry_interval = Duration::from_millis(100);
    let gw = Gw::start(s).await;
    let health = healthz(&gw).await;
    assert_eq!(health["history"]["status"], "unavailable", "{health}");
    assert!(health["history"]["error"].as_str().is_some_and(|e| !e.is_empty()));

    let mut a = gw.client().await;
    let mut b = gw.client().await;
    a.join("live").await;
    b.join("live").await;
    a.expect("user_joined").await;
    a.send(json!({"type": "chat", "room": "live", "message": "still live"})).await;
    let m = b.expect("chat_message").await;
    assert_eq!(m["message"], "still live");
    assert!(m.get("seq").is_none(), "not stored, so not numbered: {m}");
    let (status, body) = get_json(&gw, "/rooms/live/history").await;
    assert_eq!(status, 503, "{body}");

    // The disk recovers.
    std::fs::remove_file(&blocker).unwrap();
    std::fs::create_dir(&blocker).unwrap();
    await_health(&gw, |h| *h == Health::Ok).await;
    a.send(json!({"type": "chat", "room": "live", "message": "stored"})).await;
    assert_eq!(b.expect("chat_message").await["seq"], 1);
    let (_, page) = get_json(&gw, "/rooms/live/history").await;
    assert_eq!(seqs(&page), vec![1]);
    assert_eq!(healthz(&gw).await["history"]["status"], "ok");
}

#[tokio::test]
async fn a_read_only_database_file_is_read_and_written_again_when_writable() {
    let data = tempfile::tempdir_in(repo_path("target")).unwrap();
    let mut s = settings();
    s.history.path = data.path().join("h.db");
    let mut gw = Gw::start(s.clone()).await;
    let mut a = gw.client().await;
    a.join("ro").await;
    a.send(json!({"type": "chat", "room": "ro", "message": "before"})).await;
    assert_eq!(a.expect("chat_message").await["seq"], 1);
    gw.shutdown().await;

    let read_only = Immutable::new(vec![data.path().join("h.db")]);
    // Opening writes nothing, with either durability: the old history can be read.
    for durability in [Durability::PerMessage, Durability::Batched] {
        let mut s = s.clone();
        s.history.durability = durability;
        let mut gw = Gw::start(s).await;
        assert_eq!(healthz(&gw).await["history"]["status"], "ok");
        let (_, page) = get_json(&gw, "/rooms/ro/history").await;
        assert_eq!(seqs(&page), vec![1]);
        gw.shutdown().await;
    }

    // Writing fails: live chat goes on, numbered, and the failure is reported.
    let gw = Gw::start(s).await;
    let mut a = gw.client().await;
    a.join("ro").await;
    a.send(json!({"type": "chat", "room": "ro", "message": "live anyway"})).await;
    let m = a.expect("chat_message").await;
    assert_eq!((m["message"].as_str(), m["seq"].as_u64()), (Some("live anyway"), Some(2)));
    let health = await_health(&gw, |h| matches!(h, Health::Degraded(_))).await;
    assert!(health.error().unwrap().contains("readonly"), "{health:?}");

    drop(read_only);
    a.send(json!({"type": "chat", "room": "ro", "message": "stored"})).await;
    assert_eq!(a.expect("chat_message").await["seq"], 3);
    await_health(&gw, |h| *h == Health::Ok).await;
    let (_, page) = get_json(&gw, "/rooms/ro/history").await;
    assert_eq!(seqs(&page), vec![1, 3]);
}

fn chattr(flag: &str, paths: &[std::path::PathBuf]) -> bool {
    std::process::Command::new("chattr").arg(flag).args(paths).status().is_ok_and(|s| s.success())
}

/// Files made immutable (`chattr +i`) until dropped, so that even a failing test leaves
/// nothing `cargo clean` cannot delete. Panics when the file system refuses.
struct Immutable(Vec<std::path::PathBuf>);

impl Immutable {
    fn new(paths: Vec<std::path::PathBuf>) -> Immutable {
        assert!(
            chattr("+i", &paths),
            "this test needs `chattr +i` (root on ext4/xfs/btrfs); the target directory's file system refused it"
        );
        Immutable(paths)
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        chattr("-i", &self.0);
    }
}

#[tokio::test]
async fn a_database_that_turns_read_only_mid_run_degrades_and_recovers() {
    // A read-only file system is simulated with the immutable attribute, which stops
    // writes even through open file descriptors (and even for root, unlike chmod).
    let data = tempfile::tempdir_in(repo_path("target")).unwrap();
    let mut s = settings();
    s.history.path = data.path().join("h.db");
    let gw = Gw::start(s).await;
    let mut a = gw.client().await;
    let mut b = gw.client().await;
    a.join("ro").await;
    b.join("ro").await;
    a.expect("user_joined").await;
    a.send(json!({"type": "chat", "room": "ro", "message": "one"})).await;
    assert_eq!(b.expect("chat_message").await["seq"], 1);
    // "one" is committed before the disk turns read-only.
    gw.gateway().history.sync().await;

    let files: Vec<_> = ["h.db", "h.db-wal"].iter().map(|f| data.path().join(f)).collect();
    let read_only = Immutable::new(files);
    a.send(json!({"type": "chat", "room": "ro", "message": "two"})).await;
    // Delivered all the same, without waiting for the disk.
    let m = b.expect("chat_message").await;
    assert_eq!((m["message"].as_str(), m["seq"].as_u64()), (Some("two"), Some(2)));
    let health = await_health(&gw, |h| matches!(h, Health::Degraded(_))).await;
    assert!(health.error().is_some());
    assert_eq!(healthz(&gw).await["history"]["status"], "degraded");

    drop(read_only);
    a.send(json!({"type": "chat", "room": "ro", "message": "three"})).await;
    assert_eq!(b.expect("chat_message").await["seq"], 3);
    await_health(&gw, |h| *h == Health::Ok).await;
    let (_, page) = get_json(&gw, "/rooms/ro/history").await;
    assert_eq!(seqs(&page), vec![1, 3], "what could not be written is missing, the rest is there");
}

#[tokio::test]
async fn a_full_database_degrades_and_recovers_when_retention_frees_space() {
    let mut s = settings();
    s.history.max_db_bytes = 1 << 20;
    s.history.max_per_room = 20;
    s.limits.max_message_chars = 20_000;
    let gw = Gw::start(s).await;
    let mut a = gw.client().await;
    a.join("big").await;
    // ~16 KiB messages: the 1 MiB database fills after a few dozen.
    let text = "x".repeat(16 * 1024);
    let mut n = 0u64;
    let mut rx = gw.gateway().history.health();
    while !matches!(*rx.borrow_and_update(), Health::Degraded(_)) {
        n += 1;
        assert!(n < 500, "the database never filled up");
        a.send(json!({"type": "chat", "room": "big", "message": text})).await;
        // Live delivery never stops.
        assert_eq!(a.expect("chat_message").await["seq"], n);
        // One commit per message, so the health read next is this message's.
        gw.gateway().history.sync().await;
    }
    assert!(healthz(&gw).await["history"]["error"].as_str().unwrap().to_lowercase().contains("full"));
    gw.gateway().history.enforce_retention_now().await;
    a.send(json!({"type": "chat", "room": "big", "message": "small"})).await;
    assert_eq!(a.expect("chat_message").await["seq"], n + 1);
    await_health(&gw, |h| *h == Health::Ok).await;
    let (_, page) = get_json(&gw, "/rooms/big/history").await;
    assert_eq!(seqs(&page).last(), Some(&(n + 1)));
}

#[tokio::test]
async fn every_message_delivered_with_a_seq_survives_kill_9() {
    kill_9(Durability::PerMessage).await;
}

#[tokio::test]
async fn batched_durability_loses_at_most_its_documented_window_on_kill_9() {
    kill_9(Durability::Batched).await;
}

/// A spawned gateway that does not outlive a failing test.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs the real binary under load, kills it with SIGKILL, restarts it on the same
/// database and compares what clients were given with what was kept.
async fn kill_9(durability: Durability) {
    let data = tempfile::tempdir().unwrap();
    let mode = match durability {
        Durability::PerMessage => "per_message",
        Durability::Batched => "batched",
    };
    let start = || {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_rtgate"))
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env("RTGATE__SERVER__BIND", "127.0.0.1:0")
            .env("RTGATE__HISTORY__PATH", data.path().join("h.db"))
            .env("RTGATE__HISTORY__DURABILITY", mode)
            .env("RTGATE__RATE_LIMITS__ENABLED", "false")
            // The observer reads as fast as a loaded CI machine lets it while two publishers
            // flood: room for all they can send, so it is never closed as a slow consumer.
            .env("RTGATE__LIMITS__OUTBOX_MESSAGES", "250000")
            .env("RTGATE__LOG__FILTER", "info")
            .env_remove("RUST_LOG")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("spawn rtgate");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("listening on ws://").nth(1) {
                    let _ = tx.send(rest.split('/').next().unwrap().to_string());
                }
            }
        });
        let addr = rx.recv_timeout(TIMEOUT).expect("rtgate starts");
        (child, addr)
    };

    let (child, addr) = start();
    let mut child = KillOnDrop(child);
    let addr: std::net::SocketAddr = addr.parse().unwrap();
    let url = format!("ws://{addr}/ws");
    // A calm room: three messages, all committed and its numbering settled before the
    // crash (no reservation left ahead of it).
    let mut calm = Client::connect(&url).await;
    calm.join("calm").await;
    publish(&mut calm, "calm", "c", 3).await;
    read_seqs(&mut calm, 3).await;
    await_metric(addr, "rtgate_history_rooms_reserved", |n| n == 0.0).await;

    // A busy room, flooded until the kill.
    let mut observer = Client::connect(&url).await;
    observer.join("crash").await;
    let mut publishers = Vec::new();
    for p in 0..2 {
        let url = url.clone();
        publishers.push(tokio::spawn(async move {
            let mut c = Client::connect(&url).await;
            // Bounded: far more than is published before the kill.
            for i in 0..100_000 {
                let msg = json!({"type": "chat", "room": "crash", "message": format!("p{p}-{i}")});
                if c.ws.send(Message::text(msg.to_string())).await.is_err() {
                    break;
                }
            }
        }));
    }
    let mut delivered = HashSet::new();
    let mut last_at = std::collections::HashMap::new();
    while delivered.len() < 3000 {
        let m = observer.recv().await;
        if m["type"] == "chat_message" {
            let seq = m["seq"].as_u64().unwrap();
            delivered.insert(seq);
            last_at.insert(seq, std::time::Instant::now());
        }
    }
    child.0.kill().expect("SIGKILL");
    let killed_at = std::time::Instant::now();
    let _ = child.0.wait();
    // Whatever reached the observer's socket before the kill counts as delivered.
    while let Ok(Some(Ok(msg))) = tokio::time::timeout(Duration::from_secs(5), observer.ws.next()).await {
        if let Message::Text(t) = msg {
            let m: Value = serde_json::from_str(t.as_str()).unwrap();
            if let Some(seq) = m["seq"].as_u64() {
                delivered.insert(seq);
            }
        }
    }
    for p in publishers {
        let _ = p.await;
    }

    let (child, addr) = start();
    let _child = KillOnDrop(child);
    let addr: std::net::SocketAddr = addr.parse().unwrap();
    let url = format!("ws://{addr}/ws");
    let mut stored = HashSet::new();
    let mut after = 0;
    loop {
        let (_, _, body) = http_get(addr, &format!("/rooms/crash/history?after={after}&limit=500"), &[]).await;
        let page: Value = serde_json::from_str(&body).unwrap();
        for m in page["messages"].as_array().unwrap() {
            stored.insert(m["seq"].as_u64().unwrap());
        }
        match page["next"].as_u64() {
            Some(n) => after = n,
            None => break,
        }
    }
    let max_stored = stored.iter().max().copied().unwrap_or(0);
    assert_eq!(stored.len() as u64, max_stored, "what is stored has no holes");
    let mut lost: Vec<u64> = delivered.difference(&stored).copied().collect();
    lost.sort();
    let max_delivered = delivered.iter().max().copied().unwrap();
    match durability {
        Durability::PerMessage => assert!(lost.is_empty(), "delivered but lost: {lost:?}"),
        Durability::Batched => {
            // Only the tail can be lost. How long before the kill it was delivered is the
            // batched window, reported (a benchmark's business, not a test's).
            assert!(lost.iter().all(|s| *s > max_stored), "lost {lost:?} below the stored maximum {max_stored}");
            let window = lost.iter().filter_map(|s| last_at.get(s)).map(|t| killed_at.duration_since(*t)).max();
            eprintln!("batched: {} delivered messages lost, delivered up to {window:?} before the kill", lost.len());
        }
    }

    // The calm room keeps its numbering: a client that saw all three has nothing to catch
    // up and is told of no gap; the next message is 4.
    let mut c = Client::connect(&url).await;
    c.send(json!({"type": "join_room", "room": "calm", "since": 3})).await;
    assert_eq!(c.recv().await, json!({"type": "room_joined", "room": "calm", "members": [c.id], "seq": 3}));
    c.send(json!({"type": "chat", "room": "calm", "message": "after the crash"})).await;
    let m = c.recv().await;
    assert_eq!((m["type"].as_str(), m["seq"].as_u64()), (Some("chat_message"), Some(4)), "{m}");

    // The busy room continues past every number a client was given, and past what was
    // stored by at most its reservation (`history.batch_max`, 1024): a client that has
    // everything stored may have missed what lies between, and is told so.
    c.send(json!({"type": "join_room", "room": "crash", "since": max_stored})).await;
    let joined = c.expect("room_joined").await;
    let base = joined["seq"].as_u64().unwrap();
    match durability {
        Durability::PerMessage => assert_eq!(base, max_stored),
        Durability::Batched => {
            assert!(base >= max_delivered, "numbering at {base} after the restart, {max_delivered} delivered before");
            assert!(base <= max_stored + 1024, "numbering jumped from {max_stored} to {base}");
        }
    }
    if base > max_stored {
        assert_eq!(
            c.recv().await,
            json!({"type": "history_gap", "room": "crash", "after": max_stored, "before": base + 1})
        );
    }
    // One that saw the room's last number has missed nothing.
    let mut d = Client::connect(&url).await;
    d.send(json!({"type": "join_room", "room": "crash", "since": base})).await;
    assert_eq!(d.recv().await, json!({"type": "room_joined", "room": "crash", "members": [c.id, d.id], "seq": base}));
    d.send(json!({"type": "chat", "room": "crash", "message": "after the crash"})).await;
    let m = d.recv().await;
    assert_eq!((m["type"].as_str(), m["seq"].as_u64()), (Some("chat_message"), Some(base + 1)), "{m}");
}
