//! The seed's raw-WebSocket protocol, spoken by the real gateway to real clients.

mod common;

use common::*;
use serde_json::{Value, json};

#[tokio::test]
async fn welcome_has_the_seeds_fields_and_unguessable_ids() {
    let gw = Gw::default().await;
    let a = gw.client().await;
    let b = gw.client().await;
    assert_eq!(a.welcome["message"], "Connected to WebSocket server");
    assert_ne!(a.id, b.id);
    for id in [&a.id, &b.id] {
        assert!(id.starts_with("client_") && id.len() == 23, "{id}");
        assert!(id["client_".len()..].bytes().all(|c| c.is_ascii_digit() || c.is_ascii_lowercase()), "{id}");
    }
}

#[tokio::test]
async fn upgrade_works_at_root_path_too() {
    let gw = Gw::default().await;
    let mut c = Client::connect(&format!("ws://{}", gw.addr)).await;
    c.join("lobby").await;
}

#[tokio::test]
async fn join_tells_the_joiner_the_members_and_the_others_who_joined() {
    let gw = Gw::default().await;
    let mut a = gw.client().await;
    let mut b = gw.client().await;

    let joined = a.join("lobby").await;
    assert_eq!(joined, json!({"type": "room_joined", "room": "lobby", "members": [a.id]}));

    let joined = b.join("lobby").await;
    assert_eq!(joined["room"], "lobby");
    let mut members: Vec<&str> = joined["members"].as_array().unwrap().iter().map(|m| m.as_str().unwrap()).collect();
    members.sort();
    let mut expected = vec![a.id.as_str(), b.id.as_str()];
    expected.sort();
    assert_eq!(members, expected);

    let notice = a.expect("user_joined").await;
    assert_eq!(notice["clientId"], b.id.as_str());
    assert_eq!(notice["room"], "lobby");
    assert_eq!(notice["message"], format!("User {} joined the room", b.id));
}

#[tokio::test]
async fn joining_twice_repeats_room_joined_without_a_second_notice() {
    let gw = Gw::default().await;
    let mut a = gw.client().await;
    let mut b = gw.client().await;
    a.join("r").await;
    b.join("r").await;
    a.expect("user_joined").await;
    let again = b.join("r").await;
    assert_eq!(again["members"].as_array().unwrap().len(), 2);
    // a's next message is b's chat, not a second user_joined.
    b.send(json!({"type": "chat", "room": "r", "message": "hi"})).await;
    assert_eq!(a.expect("chat_message").await["message"], "hi");
}

#[tokio::test]
async fn leave_notifies_the_rest_and_the_last_one_out_drops_the_room() {
    let gw = Gw::default().await;
    let mut a = gw.client().await;
    let mut b = gw.client().await;
    a.join("lobby").await;
    b.join("lobby").await;
    a.expect("user_joined").await;

    b.send(json!({"type": "leave_room", "room": "lobby"})).await;
    let left = a.expect("user_left").await;
    assert_eq!(
        left.as_object()
            .unwrap()
            .iter()
            .filter(|(k, _)| ["type", "clientId", "room", "message"].contains(&k.as_str()))
            .count(),
        4
    );
    assert_eq!(left["clientId"], b.id.as_str());
    assert_eq!(left["room"], "lobby");
    assert_eq!(left["message"], format!("User {} left the room", b.id));

    // Leaving again is an error, and the room is unchanged.
    b.expect_error(json!({"type": "leave_room", "room": "lobby"}), "not_in_room").await;

    a.send(json!({"type": "leave_room", "room": "lobby"})).await;
    a.sync().await;
    let (_, _, body) = http_get(gw.addr, "/healthz", &[]).await;
    let health: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(health["rooms"], 0, "{health}");
}

#[tokio::test]
async fn chat_in_a_room_reaches_every_member_including_the_sender_and_nobody_else() {
    let gw = Gw::default().await;
    let mut a = gw.client().await;
    let mut b = gw.client().await;
    let mut outsider = gw.client().await;
    a.join("lobby").await;
    b.join("lobby").await;
    a.expect("user_joined").await;

    let before = now_ms();
    a.send(json!({"type": "chat", "room": "lobby", "message": "hello"})).await;
    for c in [&mut a, &mut b] {
        let m = c.expect("chat_message").await;
        assert_eq!(m["clientId"], a_id(&m));
        assert_eq!(m["message"], "hello");
        assert_eq!(m["room"], "lobby");
        let ts = m["timestamp"].as_i64().expect("timestamp is a number");
        assert!(ts >= before - 1000 && ts <= now_ms() + 1000, "{ts}");
    }
    // The outsider's first message is its own sync reply, not the chat.
    outsider.sync().await;
}

fn a_id(m: &Value) -> Value {
    m["clientId"].clone()
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

#[tokio::test]
async fn chat_without_a_room_reaches_everyone_but_the_sender() {
    let gw = Gw::default().await;
    let mut a = gw.client().await;
    let mut b = gw.client().await;
    let mut c = gw.client().await;
    a.send(json!({"type": "chat", "message": "to all"})).await;
    for other in [&mut b, &mut c] {
        let m = other.expect("chat_message").await;
        assert_eq!(m["clientId"], a.id.as_str());
        assert_eq!(m["message"], "to all");
        assert!(m["timestamp"].is_i64());
    }
    // The sender's next message is the reply to its own later request, not the chat.
    a.sync().await;
}

#[tokio::test]
async fn clean_and_unclean_disconnects_both_leave_every_room() {
    let gw = Gw::default().await;
    let mut a = gw.client().await;
    let mut b = gw.client().await;
    let c = gw.client().await;
    for room in ["one", "two"] {
        a.join(room).await;
    }
    b.join("one").await;
    a.expect("user_joined").await;
    let mut c = c;
    c.join("two").await;
    a.expect("user_joined").await;

    // b closes cleanly.
    let b_id = b.id.clone();
    b.close().await;
    let left = a.expect("user_left").await;
    assert_eq!((left["clientId"].as_str(), left["room"].as_str()), (Some(b_id.as_str()), Some("one")));

    // c's TCP connection just vanishes.
    let c_id = c.id.clone();
    drop(c);
    let left = a.expect("user_left").await;
    assert_eq!((left["clientId"].as_str(), left["room"].as_str()), (Some(c_id.as_str()), Some("two")));

    a.sync().await;
    let (_, _, body) = http_get(gw.addr, "/healthz", &[]).await;
    let health: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(health["connections"], 1, "{health}");
    assert_eq!(health["rooms"], 2, "{health}");
}

#[tokio::test]
async fn bad_input_gets_a_coded_error_and_the_connection_stays_open() {
    let gw = Gw::default().await;
    let mut a = gw.client().await;
    let cases: &[(&str, &str)] = &[
        ("{not json", "invalid_json"),
        ("[1,2,3]", "not_an_object"),
        ("\"text\"", "not_an_object"),
        ("{}", "missing_type"),
        ("{\"type\":42}", "missing_type"),
        ("{\"type\":\"no_such_event\"}", "unknown_type"),
        ("{\"type\":\"join_room\",\"room\":\"has space\"}", "invalid_room"),
        ("{\"type\":\"join_room\",\"room\":\"\"}", "invalid_room"),
        ("{\"type\":\"join_room\",\"room\":7}", "invalid_room"),
        ("{\"type\":\"join_room\"}", "invalid_room"),
        (
            r#"{"type":"join_room","room":"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"}"#,
            "invalid_room",
        ),
        ("{\"type\":\"chat\",\"room\":\"bad room\",\"message\":\"x\"}", "invalid_room"),
        ("{\"type\":\"chat\",\"room\":\"ok\",\"message\":5}", "invalid_message"),
    ];
    for (text, code) in cases {
        a.send_text(text).await;
        let reply = a.expect("error").await;
        assert_eq!(reply["code"], *code, "for {text}: {reply}");
        assert!(reply["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    a.ws.send(tokio_tungstenite::tungstenite::Message::binary(vec![1u8, 2, 3])).await.unwrap();
    assert_eq!(a.expect("error").await["code"], "binary_not_supported");
    // Still open and working.
    a.join("after-errors").await;
}

use futures_util::SinkExt;

#[tokio::test]
async fn a_frame_over_the_limit_closes_with_1009() {
    let mut s = settings();
    s.limits.max_frame_bytes = 1024;
    let gw = Gw::start(s).await;
    let mut a = gw.client().await;
    let mut b = gw.client().await;
    a.join("r").await;
    b.join("r").await;
    a.expect("user_joined").await;
    let big = format!("{{\"type\":\"chat\",\"room\":\"r\",\"message\":\"{}\"}}", "x".repeat(2000));
    b.send_text(&big).await;
    let close = b.expect_close().await.expect("a close frame");
    assert_eq!(u16::from(close.code), 1009);
    assert_eq!(a.expect("user_left").await["clientId"], b.id.as_str());
}

#[tokio::test]
async fn security_headers_on_every_response() {
    let mut s = settings();
    s.server.allowed_origins = vec!["https://good.example".into()];
    let gw = Gw::start(s).await;
    let upgrade_headers = [
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Version", "13"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ("Origin", "https://evil.example"),
    ];
    let checks: Vec<(u16, Vec<(String, String)>)> = vec![
        {
            let (s, h, _) = http_get(gw.addr, "/healthz", &[]).await;
            (s, h)
        },
        {
            let (s, h, _) = http_get(gw.addr, "/nope", &[]).await;
            (s, h)
        },
        {
            let (s, h, _) = http_get(gw.addr, "/ws", &upgrade_headers).await;
            (s, h)
        },
    ];
    assert_eq!(checks.iter().map(|c| c.0).collect::<Vec<_>>(), vec![200, 404, 403]);
    for (_, headers) in &checks {
        assert_eq!(header(headers, "x-content-type-options"), Some("nosniff"));
        assert_eq!(header(headers, "x-frame-options"), Some("DENY"));
        assert!(header(headers, "x-xss-protection").is_some());
        assert!(header(headers, "referrer-policy").is_some());
        let csp = header(headers, "content-security-policy").expect("csp");
        assert!(csp.contains("default-src 'self'") && !csp.contains("unsafe-inline"), "{csp}");
    }
}

#[tokio::test]
async fn healthz_reports_status_and_plugins() {
    let gw = Gw::default().await;
    let (status, headers, body) = http_get(gw.addr, "/healthz", &[]).await;
    assert_eq!(status, 200);
    assert!(header(&headers, "content-type").is_some_and(|c| c.starts_with("application/json")));
    let health: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(health["status"], "ok");
    let chat = health["plugins"].as_array().unwrap().iter().find(|p| p["name"] == "chat").expect("chat plugin");
    assert_eq!(chat["events"], json!(["chat"]));
}

#[tokio::test]
async fn shutdown_closes_connections_with_1001() {
    let mut gw = Gw::default().await;
    let mut a = gw.client().await;
    let mut b = gw.client().await;
    let stop = gw.running.take().unwrap();
    let stopping = tokio::spawn(stop.shutdown());
    for c in [&mut a, &mut b] {
        let close = c.expect_close().await.expect("a close frame");
        assert_eq!(u16::from(close.code), 1001);
    }
    tokio::time::timeout(TIMEOUT, stopping).await.expect("shutdown finishes").unwrap();
}

#[tokio::test]
async fn metrics_are_exposed_in_prometheus_text() {
    let gw = Gw::default().await;
    let mut a = gw.client().await;
    let mut b = gw.client().await;
    a.join("m").await;
    b.join("m").await;
    a.expect("user_joined").await;
    a.send(json!({"type": "chat", "room": "m", "message": "counted"})).await;
    a.expect("chat_message").await;
    b.expect("chat_message").await;
    a.expect_error(json!({"type": "nope"}), "unknown_type").await;
    gw.gateway().history.sync().await;
    let (status, headers, body) = http_get(gw.addr, "/metrics", &[]).await;
    assert_eq!(status, 200);
    assert!(header(&headers, "content-type").is_some_and(|c| c.starts_with("text/plain")));
    for (name, expected) in [
        ("rtgate_connections", 2.0),
        ("rtgate_rooms", 1.0),
        ("rtgate_events_total{type=\"join_room\"}", 2.0),
        ("rtgate_events_total{type=\"chat\"}", 1.0),
        ("rtgate_events_total{type=\"invalid\"}", 1.0),
        ("rtgate_plugin_calls_total", 1.0),
        ("rtgate_plugin_call_seconds_count", 1.0),
        ("rtgate_history_rows_total", 1.0),
        ("rtgate_history_batch_rows_count", 1.0),
        ("rtgate_slow_consumers_total", 0.0),
        ("rtgate_deliveries_dropped_total", 0.0),
        ("rtgate_rate_limited_total", 0.0),
    ] {
        assert_eq!(gw.metric(name).await, expected, "{name}");
    }
    assert!(gw.metric("rtgate_messages_out_total").await >= 5.0);
    assert!(body.contains("# TYPE rtgate_plugin_call_seconds histogram"));
    assert!(body.contains("rtgate_history_commit_seconds_bucket{le=\"+Inf\"} 1"));
}
