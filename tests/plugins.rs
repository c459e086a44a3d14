//! The bundled plugins (plugins/*.lua) through the real gateway: Socket.IO-style chat,
//! typing indicators, file-share notices, the game relay and tic-tac-toe.

mod common;

use common::*;
use serde_json::{Value, json};

async fn pair_in(gw: &Gw, room: &str) -> (Client, Client) {
    let mut a = gw.client().await;
    let mut b = gw.client().await;
    a.join(room).await;
    b.join(room).await;
    a.expect("user_joined").await;
    (a, b)
}

fn is_iso8601(s: &str) -> bool {
    let b = s.as_bytes();
    s.len() == 24
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
        && b[13] == b':'
        && b[16] == b':'
        && b[19] == b'.'
        && b[23] == b'Z'
        && s.bytes().enumerate().all(|(i, c)| [4, 7, 10, 13, 16, 19, 23].contains(&i) || c.is_ascii_digit())
}

// ---- chat_message (the seed's Socket.IO chat) ----

#[tokio::test]
async fn chat_message_in_a_room_is_a_new_message_for_every_member() {
    let gw = Gw::default().await;
    let (mut a, mut b) = pair_in(&gw, "sio").await;
    let mut outsider = gw.client().await;
    a.send(json!({"type": "chat_message", "room": "sio", "message": "hello", "username": "spoofed"})).await;
    let mut ids = Vec::new();
    let sender = a.welcome.clone();
    for c in [&mut a, &mut b] {
        let m = c.expect("new_message").await;
        assert_eq!(m["userId"], sender["userId"]);
        assert_eq!(m["username"], sender["username"], "the identity, not the client's field");
        assert_eq!(m["message"], "hello");
        assert_eq!(m["room"], "sio");
        assert!(is_iso8601(m["timestamp"].as_str().unwrap()), "{m}");
        ids.push(m["id"].as_str().expect("id").to_string());
    }
    assert_eq!(ids[0], ids[1]);
    outsider.sync().await;
}

#[tokio::test]
async fn chat_message_without_a_room_reaches_everyone_including_the_sender() {
    let gw = Gw::default().await;
    let mut a = gw.client().await;
    let mut b = gw.client().await;
    a.send(json!({"type": "chat_message", "message": "all"})).await;
    for c in [&mut a, &mut b] {
        let m = c.expect("new_message").await;
        assert_eq!(m["message"], "all");
        assert!(m.get("room").is_none() || m["room"].is_null());
    }
    a.expect_error(json!({"type": "chat_message", "message": 1}), "invalid_message").await;
}

// ---- typing ----

fn typing_settings(timeout_ms: u64) -> rtgate::Settings {
    let mut s = settings();
    s.plugins.settings.insert("typing".into(), json!({"timeout_ms": timeout_ms}));
    s
}

#[tokio::test]
async fn typing_start_and_stop_reach_the_other_members_only() {
    let gw = Gw::start(typing_settings(60_000)).await;
    let (mut a, mut b) = pair_in(&gw, "t").await;
    a.send(json!({"type": "typing_start", "room": "t"})).await;
    let m = b.expect("user_typing").await;
    assert_eq!(m["userId"], a.welcome["userId"]);
    assert_eq!(m["username"], a.welcome["username"]);
    assert_eq!(m["room"], "t");
    // Repeated starts (every keystroke) are not re-announced.
    a.send(json!({"type": "typing_start", "room": "t"})).await;
    a.send(json!({"type": "typing_start", "room": "t"})).await;
    a.send(json!({"type": "typing_stop", "room": "t"})).await;
    let m = b.expect("user_stop_typing").await;
    assert_eq!(m["userId"], a.welcome["userId"]);
    assert_eq!(m["room"], "t");
    // The typer itself heard nothing of it.
    a.sync().await;
    let mut c = gw.client().await;
    c.expect_error(json!({"type": "typing_start", "room": "t"}), "not_in_room").await;
    c.expect_error(json!({"type": "typing_start"}), "invalid_room").await;
}

#[tokio::test]
async fn a_silent_typer_is_stopped_by_the_server() {
    let gw = Gw::start(typing_settings(300)).await;
    let (mut a, mut b) = pair_in(&gw, "t").await;
    a.send(json!({"type": "typing_start", "room": "t"})).await;
    b.expect("user_typing").await;
    // No typing_stop is ever sent: the timeout ends it.
    let m = b.expect("user_stop_typing").await;
    assert_eq!(m["userId"], a.welcome["userId"]);
    // Typing again announces again.
    a.send(json!({"type": "typing_start", "room": "t"})).await;
    b.expect("user_typing").await;
}

#[tokio::test]
async fn leaving_or_disconnecting_ends_typing() {
    let gw = Gw::start(typing_settings(60_000)).await;
    let (mut a, mut b) = pair_in(&gw, "t").await;
    a.send(json!({"type": "typing_start", "room": "t"})).await;
    b.expect("user_typing").await;
    a.send(json!({"type": "leave_room", "room": "t"})).await;
    // user_left comes from the core, then the plugin's stop.
    let mut kinds = vec![b.recv().await["type"].clone(), b.recv().await["type"].clone()];
    kinds.sort_by_key(|k| k.to_string());
    assert_eq!(kinds, vec![json!("user_left"), json!("user_stop_typing")]);

    a.join("t").await;
    b.expect("user_joined").await;
    a.send(json!({"type": "typing_start", "room": "t"})).await;
    b.expect("user_typing").await;
    drop(a);
    let mut kinds = vec![b.recv().await["type"].clone(), b.recv().await["type"].clone()];
    kinds.sort_by_key(|k| k.to_string());
    assert_eq!(kinds, vec![json!("user_left"), json!("user_stop_typing")]);
}

// ---- file_share ----

#[tokio::test]
async fn file_share_notices_are_validated_and_relayed() {
    let gw = Gw::default().await;
    let (mut a, mut b) = pair_in(&gw, "files").await;
    a.send(json!({"type": "file_share", "room": "files", "filename": "../../etc/passwd", "size": 1234, "mimeType": "Text/Plain"}))
        .await;
    let m = b.expect("file_received").await;
    assert_eq!(m["filename"], "passwd");
    assert_eq!(m["size"], 1234);
    assert_eq!(m["mimeType"], "text/plain");
    assert_eq!(m["userId"], a.welcome["userId"]);
    assert_eq!(m["room"], "files");
    a.send(json!({"type": "file_share", "room": "files", "filename": "C:\\Users\\me\\report.pdf", "size": 0, "mimeType": "application/pdf"}))
        .await;
    assert_eq!(b.expect("file_received").await["filename"], "report.pdf");

    let bad = [
        (json!({"filename": "", "size": 1, "mimeType": "a/b"}), "invalid_filename"),
        (json!({"filename": "dir/", "size": 1, "mimeType": "a/b"}), "invalid_filename"),
        (json!({"filename": "..", "size": 1, "mimeType": "a/b"}), "invalid_filename"),
        (json!({"filename": 5, "size": 1, "mimeType": "a/b"}), "invalid_filename"),
        (json!({"filename": "x".repeat(300), "size": 1, "mimeType": "a/b"}), "invalid_filename"),
        (json!({"filename": "a.txt", "size": -1, "mimeType": "a/b"}), "invalid_size"),
        (json!({"filename": "a.txt", "size": 1.5, "mimeType": "a/b"}), "invalid_size"),
        (json!({"filename": "a.txt", "size": "12", "mimeType": "a/b"}), "invalid_size"),
        (json!({"filename": "a.txt", "size": 200_000_000_000u64, "mimeType": "a/b"}), "invalid_size"),
        (json!({"filename": "a.txt", "size": 1, "mimeType": "text"}), "invalid_mime_type"),
        (json!({"filename": "a.txt", "size": 1, "mimeType": "text/plain; x=<script>"}), "invalid_mime_type"),
        (json!({"filename": "a.txt", "size": 1}), "invalid_mime_type"),
    ];
    for (fields, code) in bad {
        let mut msg = fields.clone();
        msg["type"] = json!("file_share");
        msg["room"] = json!("files");
        a.expect_error(msg, code).await;
    }
    let mut c = gw.client().await;
    c.expect_error(
        json!({"type": "file_share", "room": "files", "filename": "a", "size": 1, "mimeType": "a/b"}),
        "not_in_room",
    )
    .await;
    // None of the refused notices reached b.
    b.sync().await;
}

#[tokio::test]
async fn file_share_size_limit_is_configurable() {
    let mut s = settings();
    s.plugins.settings.insert("file_share".into(), json!({"max_size": 1000}));
    let gw = Gw::start(s).await;
    let (mut a, mut b) = pair_in(&gw, "f").await;
    a.expect_error(
        json!({"type": "file_share", "room": "f", "filename": "a", "size": 1001, "mimeType": "a/b"}),
        "invalid_size",
    )
    .await;
    a.send(json!({"type": "file_share", "room": "f", "filename": "a", "size": 1000, "mimeType": "a/b"})).await;
    assert_eq!(b.expect("file_received").await["size"], 1000);
}

// ---- the game relay ----

#[tokio::test]
async fn game_move_outside_a_game_is_relayed_as_opponent_move() {
    let gw = Gw::default().await;
    let (mut a, mut b) = pair_in(&gw, "arena").await;
    a.send(json!({"type": "game_move", "room": "arena", "x": 3, "y": 4, "note": "e4"})).await;
    let m = b.expect("opponent_move").await;
    assert_eq!(m["x"], 3);
    assert_eq!(m["y"], 4);
    assert_eq!(m["note"], "e4");
    assert_eq!(m["room"], "arena");
    assert_eq!(m["userId"], a.welcome["userId"]);
    a.sync().await;
    a.expect_error(json!({"type": "game_move", "position": 1}), "not_in_game").await;
    a.expect_error(json!({"type": "game_move", "room": "elsewhere"}), "not_in_room").await;
}

// ---- tic-tac-toe ----

/// Queues `a` then `b`; returns (x, o, start message). As in the seed, the newcomer is X.
async fn start_game(a: &mut Client, b: &mut Client) -> Value {
    a.send(json!({"type": "find_game", "playerData": {"name": "alice"}})).await;
    a.expect("waiting_for_opponent").await;
    b.send(json!({"type": "find_game", "playerData": {"name": "bob"}})).await;
    let start = a.expect("game_start").await;
    assert_eq!(b.expect("game_start").await, start);
    start
}

async fn play(x: &mut Client, o: &mut Client, moves: &[u64]) -> Value {
    let mut last = Value::Null;
    for (i, pos) in moves.iter().enumerate() {
        let (mover, _) = if i % 2 == 0 { (&mut *x, &mut *o) } else { (&mut *o, &mut *x) };
        mover.send(json!({"type": "game_move", "position": pos})).await;
        let a = x.recv().await;
        let b = o.recv().await;
        assert_eq!(a, b);
        last = a;
    }
    last
}

fn board(cells: &str) -> Value {
    Value::Array(cells.chars().map(|c| if c == '.' { Value::Null } else { json!(c.to_string()) }).collect())
}

#[tokio::test]
async fn a_full_game_to_a_win() {
    let gw = Gw::default().await;
    let mut a = gw.client().await;
    let mut b = gw.client().await;
    let start = start_game(&mut a, &mut b).await;
    let game_id = start["gameId"].as_str().unwrap();
    assert!(game_id.starts_with("game_") && game_id.len() >= 20, "{game_id}");
    assert_eq!(
        start["players"],
        json!([
            {"id": b.id, "data": {"name": "bob"}, "symbol": "X"},
            {"id": a.id, "data": {"name": "alice"}, "symbol": "O"},
        ])
    );
    assert_eq!(start["currentPlayer"], b.id.as_str());
    let (x, o) = (&mut b, &mut a);
    x.send(json!({"type": "game_move", "position": 0})).await;
    let m = x.expect("game_move").await;
    assert_eq!(o.expect("game_move").await, m);
    assert_eq!(m["position"], 0);
    assert_eq!(m["symbol"], "X");
    assert_eq!(m["board"], board("X........"));
    assert_eq!(m["nextPlayer"], o.id.as_str());
    let end = play(o, x, &[3, 1, 4]).await;
    assert_eq!(end["type"], "game_move");
    x.send(json!({"type": "game_move", "position": 2})).await;
    let end = x.expect("game_end").await;
    assert_eq!(o.expect("game_end").await, end);
    assert_eq!(end["winner"], "X");
    assert_eq!(end["winnerPlayer"], x.id.as_str());
    assert_eq!(end["board"], board("XXXOO...."));
    x.expect_error(json!({"type": "game_move", "position": 5}), "game_over").await;
}

#[tokio::test]
async fn a_full_game_to_a_draw() {
    let gw = Gw::default().await;
    let mut a = gw.client().await;
    let mut b = gw.client().await;
    start_game(&mut a, &mut b).await;
    let last = play(&mut b, &mut a, &[0, 1, 2, 4, 3, 5, 7, 6, 8]).await;
    assert_eq!(last["type"], "game_end");
    assert_eq!(last["winner"], "draw");
    assert!(last.get("winnerPlayer").is_none());
    assert_eq!(last["board"], board("XOXXOOOXX"));
}

#[tokio::test]
async fn every_invalid_move_is_refused_and_changes_nothing() {
    let gw = Gw::default().await;
    let mut a = gw.client().await;
    let mut b = gw.client().await;
    start_game(&mut a, &mut b).await;
    let (x, o) = (&mut b, &mut a);
    o.expect_error(json!({"type": "game_move", "position": 4}), "not_your_turn").await;
    for bad in [json!(-1), json!(9), json!(1.5), json!("3"), Value::Null] {
        x.expect_error(json!({"type": "game_move", "position": bad}), "invalid_position").await;
    }
    x.expect_error(json!({"type": "game_move"}), "invalid_position").await;
    x.send(json!({"type": "game_move", "position": 4})).await;
    x.expect("game_move").await;
    o.expect("game_move").await;
    o.expect_error(json!({"type": "game_move", "position": 4}), "cell_taken").await;
    x.expect_error(json!({"type": "game_move", "position": 0}), "not_your_turn").await;
    // Nothing above changed the board: O's real move shows only X's centre.
    o.send(json!({"type": "game_move", "position": 0})).await;
    let m = x.expect("game_move").await;
    assert_eq!(m["board"], board("O...X...."));
    assert_eq!(o.expect("game_move").await, m);
    x.expect_error(json!({"type": "find_game"}), "already_in_game").await;
}

#[tokio::test]
async fn a_player_who_disconnects_ends_the_game_and_a_waiting_one_leaves_the_queue() {
    let gw = Gw::default().await;
    let mut a = gw.client().await;
    let mut b = gw.client().await;
    start_game(&mut a, &mut b).await;
    let b_id = b.id.clone();
    drop(b);
    let m = a.expect("player_disconnected").await;
    assert_eq!(m["playerId"], b_id.as_str());
    a.expect_error(json!({"type": "game_move", "position": 0}), "not_in_game").await;

    // A queued player who disconnects is forgotten: the next one waits instead of
    // being paired with a ghost.
    a.send(json!({"type": "find_game"})).await;
    a.expect("waiting_for_opponent").await;
    a.expect_error(json!({"type": "find_game"}), "already_waiting").await;
    a.close().await;
    let mut c = gw.client().await;
    c.send(json!({"type": "find_game"})).await;
    c.expect("waiting_for_opponent").await;
}

#[tokio::test]
async fn rematch_swaps_symbols_and_games_never_see_each_other() {
    let gw = Gw::default().await;
    let mut a = gw.client().await;
    let mut b = gw.client().await;
    start_game(&mut a, &mut b).await;
    let mut c = gw.client().await;
    let mut d = gw.client().await;
    let other = start_game(&mut c, &mut d).await;
    assert_ne!(other["gameId"], Value::Null);

    // b (X) wins quickly; the other game moves at the same time.
    play(&mut b, &mut a, &[0, 3, 1, 4]).await;
    d.send(json!({"type": "game_move", "position": 8})).await;
    b.send(json!({"type": "game_move", "position": 2})).await;
    assert_eq!(a.expect("game_end").await["winner"], "X");
    assert_eq!(b.expect("game_end").await["winner"], "X");
    assert_eq!(c.expect("game_move").await["board"], board("........X"));
    assert_eq!(d.expect("game_move").await["board"], board("........X"));

    a.send(json!({"type": "rematch"})).await;
    a.expect("rematch_waiting").await;
    assert_eq!(b.expect("rematch_requested").await["playerId"], a.id.as_str());
    b.send(json!({"type": "rematch"})).await;
    let start = a.expect("game_start").await;
    assert_eq!(b.expect("game_start").await, start);
    assert_eq!(start["players"][0]["id"], a.id.as_str(), "the former O is now X");
    assert_eq!(start["players"][0]["symbol"], "X");
    assert_eq!(start["currentPlayer"], a.id.as_str());
    // The other game's players saw none of this.
    c.sync().await;
    d.sync().await;
}

/// A Rust handler installed with `set_native` takes an event type over from the script
/// that registered it, refusals included; handlers are installed once.
#[tokio::test]
async fn a_native_handler_replaces_the_script_for_its_event_type() {
    let gw = Gw::default().await;
    let mut native: std::collections::HashMap<String, rtgate::plugins::NativeHandler> = Default::default();
    native.insert(
        "chat".into(),
        Box::new(|_host, conn, body| match body.get("message") {
            Some(Value::String(m)) if m != "no" => {
                let reply = json!({"type": "native_chat", "clientId": &*conn.id, "message": m});
                conn.send(rtgate::protocol::Frame::text(reply.to_string()));
                Ok(())
            }
            _ => Err(rtgate::error::ClientError::Rejected { code: "refused".into(), message: "Refused".into() }),
        }),
    );
    assert!(gw.gateway().plugins.set_native(native).is_ok());
    assert!(gw.gateway().plugins.set_native(Default::default()).is_err());
    let mut a = gw.client().await;
    a.send(json!({"type": "chat", "message": "hi"})).await;
    let reply = a.expect("native_chat").await;
    assert_eq!(reply, json!({"type": "native_chat", "clientId": a.id, "message": "hi"}));
    a.expect_error(json!({"type": "chat", "message": "no"}), "refused").await;
    // Other types still go to their scripts.
    a.send(json!({"type": "chat_message", "message": "lua"})).await;
    assert_eq!(a.expect("new_message").await["message"], "lua");
}
