//! The gateway under abuse: hostile input, clients that stop reading or go silent, and
//! plugins that fail. Each ends by checking that ordinary clients are still served.

mod common;

use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

/// Two fresh clients can still meet in a room and chat.
async fn still_chats(gw: &Gw) {
    let mut a = gw.client().await;
    let mut b = gw.client().await;
    a.join("after").await;
    b.join("after").await;
    a.expect("user_joined").await;
    b.send(json!({"type": "chat", "room": "after", "message": "still here"})).await;
    assert_eq!(a.expect("chat_message").await["message"], "still here");
    assert_eq!(b.expect("chat_message").await["message"], "still here");
}

/// The most messages of `size` bytes a client that reads nothing can have been sent before
/// the gateway must have closed it, when its outbox holds at most `outbox` bytes: the
/// outbox, as much again taken for the socket, tungstenite's write buffer (1 MiB), and the
/// two kernel socket buffers between the gateway and the client at their largest on this
/// machine. Derived, so that no machine's buffer sizes make a test flaky.
fn backlog_bound(outbox: usize, size: usize) -> usize {
    let max = |path: &str| -> usize {
        std::fs::read_to_string(path)
            .ok()
            .and_then(|v| v.split_whitespace().last().and_then(|n| n.parse().ok()))
            .unwrap_or(64 << 20)
    };
    let kernel = max("/proc/sys/net/ipv4/tcp_wmem") + max("/proc/sys/net/ipv4/tcp_rmem");
    (2 * outbox + (1 << 20) + kernel) / size + 8
}

fn hostile_frame(rng: &mut impl Rng) -> Message {
    let types = [
        "chat",
        "join_room",
        "leave_room",
        "typing_start",
        "game_move",
        "find_game",
        "file_share",
        "",
        "__proto__",
        "constructor",
    ];
    let kind = types[rng.random_range(0..types.len())];
    let junk: String =
        (0..rng.random_range(0..40)).map(|_| char::from_u32(rng.random_range(1..0x2FFF)).unwrap_or('x')).collect();
    match rng.random_range(0..12) {
        0 => Message::text(junk),
        1 => Message::binary((0..rng.random_range(0..300)).map(|_| rng.random::<u8>()).collect::<Vec<u8>>()),
        2 => Message::text(format!("{}{}", "[".repeat(rng.random_range(100..5000)), "]".repeat(10))),
        3 => Message::text(format!("{{\"type\":\"{kind}\",\"room\":{}}}", json!(junk))),
        4 => Message::text(format!(
            "{{\"type\":\"{kind}\",\"room\":\"r{}\",\"message\":{}}}",
            rng.random_range(0..5),
            json!(junk)
        )),
        5 => Message::text(format!("{{\"type\":\"{kind}\",\"message\":1e999999,\"room\":null}}")),
        6 => Message::text(format!("{{\"type\":\"{kind}\",\"room\":[1,{{\"a\":[]}}],\"message\":{{}}}}")),
        7 => Message::text(
            json!({"type": kind, "room": "r1", "message": "x".repeat(rng.random_range(0..3000))}).to_string(),
        ),
        8 => Message::text(format!("{{\"type\":\"{kind}\",\"type\":\"chat\",\"message\":\"dup\"}}")),
        9 => Message::text(
            json!({"type": kind, "position": rng.random_range(-5..20), "size": -1, "filename": "../../etc/passwd"})
                .to_string(),
        ),
        10 => Message::text("\u{0}\u{1}{\"type\":\"chat\"}"),
        _ => Message::Ping(vec![1, 2, 3].into()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_hostile_frames_break_nothing() {
    let gw = Gw::default().await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    let mut watcher = gw.client().await;
    watcher.join("r1").await;
    let mut sent = 0;
    while sent < 5000 {
        let mut c = gw.client().await;
        for _ in 0..500 {
            if c.ws.send(hostile_frame(&mut rng)).await.is_err() {
                break;
            }
            sent += 1;
        }
        // A frame over the size limit ends this connection with 1009; every other
        // frame leaves it open.
        let big = Message::text(format!("{{\"type\":\"chat\",\"message\":\"{}\"}}", "y".repeat(70_000)));
        if c.ws.send(big).await.is_ok() {
            let mut saw_close = None;
            while let Ok(Some(frame)) = tokio::time::timeout(TIMEOUT, c.ws.next()).await {
                match frame {
                    Ok(Message::Close(frame)) => {
                        saw_close = frame.map(|f| u16::from(f.code));
                        break;
                    }
                    Ok(_) => continue,
                    Err(e) => panic!("hostile client: {e}"),
                }
            }
            assert_eq!(saw_close, Some(1009));
        }
    }
    // The watcher saw only well-formed messages from the hostile traffic (broadcasts and
    // notices), and is still served.
    watcher.send(json!({"type": "join_room", "room": "watch-sync"})).await;
    loop {
        let m = watcher.recv().await;
        let kind = m["type"].as_str().expect("a string type");
        let server_types = [
            "chat_message",
            "new_message",
            "user_joined",
            "user_left",
            "room_joined",
            "user_typing",
            "user_stop_typing",
            "file_received",
            "opponent_move",
        ];
        assert!(server_types.contains(&kind), "{m}");
        if kind == "room_joined" && m["room"] == "watch-sync" {
            break;
        }
    }
    still_chats(&gw).await;
    let (status, _, body) = http_get(gw.addr, "/healthz", &[]).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_disconnected_without_slowing_the_others() {
    let mut s = settings();
    s.limits.outbox_messages = 16;
    s.limits.max_message_chars = 64 * 1024;
    let gw = Gw::start(s).await;
    let mut reader = gw.client().await;
    let mut slow = gw.client().await;
    let mut publisher = gw.client().await;
    reader.join("flood").await;
    slow.join("flood").await;
    reader.expect("user_joined").await;
    // From here on `slow` reads nothing. The publisher is not a member: only the
    // reader and `slow` receive the flood.
    let slow_id = slow.id.clone();
    let payload = "z".repeat(32 * 1024);
    // The publisher stays at most 8 messages ahead of the reader, so the reader's own queue
    // stays short while `slow`'s grows until it overflows.
    let (progress, mut read) = tokio::sync::watch::channel(0usize);
    let flood = tokio::spawn(async move {
        // Bounded: 4,000 × 32 KiB is far more than the loopback socket buffers hold.
        for i in 0..4000 {
            if read.wait_for(|n| *n + 8 >= i).await.is_err() {
                break;
            }
            let msg = json!({"type": "chat", "room": "flood", "message": format!("{i}:{payload}")});
            if publisher.ws.send(Message::text(msg.to_string())).await.is_err() {
                break;
            }
        }
        publisher
    });
    let mut next = 0;
    loop {
        let m = reader.recv().await;
        match m["type"].as_str() {
            Some("chat_message") => {
                // In order, none missing: the slow member did not hold the reader back.
                let text = m["message"].as_str().unwrap();
                assert!(text.starts_with(&format!("{next}:")), "expected message {next}");
                next += 1;
                let _ = progress.send(next);
            }
            Some("user_left") => {
                assert_eq!(m["clientId"], slow_id.as_str());
                break;
            }
            other => panic!("unexpected {other:?}: {m}"),
        }
        assert!(next < backlog_bound(16 * 32 * 1024, 32 * 1024), "the slow client was never disconnected");
    }
    drop(progress);
    let _ = flood.await;
    // Once it reads again, the slow client finds the close frame after what it was sent.
    let close = slow.expect_close().await.expect("a close frame");
    assert_eq!(u16::from(close.code), 1013);
    still_chats(&gw).await;
}

/// A client that never reads pins a bounded number of bytes, however large the messages
/// sent to it: the outbox is bounded in bytes as well as in messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_pins_at_most_the_outbox_bytes() {
    let mut s = settings();
    // Only the byte bound can stop it.
    s.limits.outbox_messages = 1_000_000;
    let outbox = s.limits.outbox_bytes;
    let gw = Gw::start(s).await;
    let mut reader = gw.client().await;
    let mut deaf = gw.client().await;
    let mut sender = gw.client().await;
    for c in [&mut reader, &mut deaf, &mut sender] {
        c.join("big").await;
    }
    reader.expect("user_joined").await;
    reader.expect("user_joined").await;
    deaf.expect("user_joined").await;
    // From here on `deaf` reads nothing. Relayed moves of 63 KiB reach it and the reader.
    let payload = "z".repeat(63 * 1024);
    let size = payload.len();
    let bound = backlog_bound(outbox, size);
    let deaf_id = deaf.id.clone();
    let mut sent = 0;
    loop {
        assert!(sent < bound, "a client that reads nothing was sent {sent} x {size} bytes and is still connected");
        sender.send(json!({"type": "game_move", "room": "big", "x": payload})).await;
        sent += 1;
        let m = reader.recv().await;
        match m["type"].as_str() {
            Some("opponent_move") => {}
            Some("user_left") => {
                assert_eq!(m["clientId"], deaf_id.as_str());
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    eprintln!("closed after {sent} messages of {size} bytes (bound {bound})");
    assert_eq!(gw.metric("rtgate_slow_consumers_total").await, 1.0);
    let close = deaf.expect_close().await.expect("a close frame");
    assert_eq!(u16::from(close.code), 1013);
    still_chats(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_pings_and_terminates_silent_connections() {
    let mut s = settings();
    s.heartbeat.interval = Duration::from_millis(100);
    s.heartbeat.timeout = Duration::from_millis(600);
    let gw = Gw::start(s).await;

    // A live client is pinged, and its library's pongs keep it connected.
    let mut live = gw.client().await;
    live.join("hb").await;
    let mut pings = 0;
    while pings < 10 {
        match tokio::time::timeout(TIMEOUT, live.ws.next()).await.expect("ping in time") {
            Some(Ok(Message::Ping(_))) => pings += 1,
            Some(Ok(other)) => panic!("unexpected {other:?}"),
            _ => panic!("live client was disconnected"),
        }
    }

    // A client that stops polling its socket sends no pongs and is terminated.
    let mut silent = gw.client().await;
    silent.join("hb").await;
    let silent_id = silent.id.clone();
    let notice = live.expect("user_joined").await;
    assert_eq!(notice["clientId"], silent_id.as_str());
    let left = live.expect("user_left").await;
    assert_eq!(left["clientId"], silent_id.as_str());
    assert_eq!(left["room"], "hb");
    drop(silent);
    // The live client, which kept answering, is still connected and served.
    live.sync().await;
}

#[tokio::test]
async fn a_failing_plugin_costs_only_its_own_event() {
    let dir = plugin_dir(&[(
        "boom.lua",
        r#"
        rtgate.on("boom", function(client, event)
          error("kaboom")
        end)
        rtgate.on("bad_output", function(client, event)
          rtgate.send(client.id, { no_type = true })
        end)
        "#,
    )]);
    let mut s = settings();
    s.plugins.dir = dir.path().to_path_buf();
    let gw = Gw::start(s).await;
    let mut a = gw.client().await;
    let mut b = gw.client().await;
    a.join("r").await;
    b.join("r").await;
    a.expect("user_joined").await;
    for _ in 0..3 {
        let err = a.expect_error(json!({"type": "boom"}), "plugin_error").await;
        assert!(err["message"].as_str().unwrap().contains("boom"), "{err}");
    }
    a.expect_error(json!({"type": "bad_output"}), "plugin_error").await;
    a.send(json!({"type": "chat", "room": "r", "message": "fine"})).await;
    for c in [&mut a, &mut b] {
        let m: Value = c.expect("chat_message").await;
        assert_eq!(m["message"], "fine");
    }
}

/// CPU time of the calling thread. A single-threaded test runtime runs the gateway's
/// sessions on the test's own thread, so this measures what the gateway spent on a
/// client's frames (and the client's own, equal, share), unaffected by other tests or by
/// how often the machine preempted the thread.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid, writable timespec and a clock Linux supports.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Sends `frames` copies of an event carrying `payload` (cleaned like any client text,
/// then refused as an unknown type) and returns the CPU time until every refusal is back.
async fn cleaning_cost(c: &mut Client, payload: &str, frames: usize) -> Duration {
    let text = json!({"type": "no_such_event", "x": payload}).to_string();
    assert!(text.len() < 65_536, "within the frame limit");
    let started = thread_cpu();
    for _ in 0..frames {
        c.send_text(&text).await;
    }
    for _ in 0..frames {
        assert_eq!(c.expect("error").await["code"], "unknown_type");
    }
    thread_cpu() - started
}

/// Sanitizing is linear in its input, whatever the input: a hostile string costs about
/// what ordinary markup of the same size does. (Cutting "<b<b<b…" once took 100 ms a frame,
/// and ten clients inside their rate limits stalled everyone's chat for seconds.)
#[tokio::test]
async fn hostile_markup_costs_what_ordinary_markup_of_its_size_does() {
    let gw = Gw::default().await;
    let mut c = gw.client().await;
    const SIZE: usize = 60_000;
    let fill = |unit: &str| unit.repeat(SIZE / unit.len());
    let ordinary = fill("<b>ok</b> a < b ");
    // Warm up (allocator, first-use costs), then the baseline: the cheaper of two runs.
    cleaning_cost(&mut c, &ordinary, 3).await;
    let baseline = cleaning_cost(&mut c, &ordinary, 10).await.min(cleaning_cost(&mut c, &ordinary, 10).await);
    for (name, hostile) in [
        ("<b<b<b…", fill("<b")),
        ("&&&…", fill("&")),
        ("<b>&&&…", format!("<b>{}", "&".repeat(SIZE - 3))),
        ("<b><b><b>…", fill("<b>")),
        ("<b x=1><b x=2>…", (0..SIZE / 12).map(|i| format!("<b x={i}>")).collect()),
        ("<b><i></b></i>…", fill("<b><i></b></i>")),
        ("<a href=<a href=…", fill("<a href=")),
    ] {
        let cost = cleaning_cost(&mut c, &hostile, 10).await.min(cleaning_cost(&mut c, &hostile, 10).await);
        eprintln!("{name}: {cost:?} for 10 frames, ordinary markup {baseline:?}");
        assert!(cost < baseline * 3, "{name}: {cost:?} for 10 frames, ordinary markup of the same size {baseline:?}");
    }
    still_chats(&gw).await;
}
