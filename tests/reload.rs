//! Hot reload: connected clients see plugin files added, changed and removed, without
//! reconnecting; a broken edit keeps the previous version; plugin state is handed over.

mod common;

use common::*;
use serde_json::json;

fn echo(version: u32) -> String {
    format!(
        r#"rtgate.on("echo", function(client, event)
             rtgate.send(client.id, {{ type = "echoed", version = {version} }})
           end)"#
    )
}

struct Reloading {
    gw: Gw,
    dir: tempfile::TempDir,
    reloads: tokio::sync::watch::Receiver<u64>,
}

impl Reloading {
    async fn start(extra: &[(&str, &str)]) -> Reloading {
        let dir = plugin_dir(extra);
        let mut s = settings();
        s.plugins.dir = dir.path().to_path_buf();
        s.plugins.reload_debounce = std::time::Duration::from_millis(50);
        let gw = Gw::start(s).await;
        let reloads = gw.running.as_ref().unwrap().gateway.plugins.reloads();
        Reloading { gw, dir, reloads }
    }

    /// Writes (or with `None`, deletes) a plugin file and waits for the reload it causes.
    async fn change(&mut self, name: &str, source: Option<&str>) {
        self.reloads.borrow_and_update();
        let path = self.dir.path().join(name);
        match source {
            Some(source) => {
                // Write then rename, as editors do, so the watcher never sees half a file.
                let tmp = self.dir.path().join(format!(".{name}.tmp"));
                std::fs::write(&tmp, source).unwrap();
                std::fs::rename(&tmp, &path).unwrap();
            }
            None => std::fs::remove_file(&path).unwrap(),
        }
        tokio::time::timeout(TIMEOUT, self.reloads.changed()).await.expect("reload within timeout").unwrap();
    }
}

#[tokio::test]
async fn a_changed_handler_is_seen_by_a_connected_client() {
    let mut r = Reloading::start(&[("echo.lua", &echo(1))]).await;
    let mut c = r.gw.client().await;
    c.send(json!({"type": "echo"})).await;
    assert_eq!(c.expect("echoed").await["version"], 1);
    r.change("echo.lua", Some(&echo(2))).await;
    c.send(json!({"type": "echo"})).await;
    assert_eq!(c.expect("echoed").await["version"], 2);
    // Same connection throughout.
    c.join("still-connected").await;
}

#[tokio::test]
async fn added_and_deleted_files_add_and_remove_event_types() {
    let mut r = Reloading::start(&[]).await;
    let mut c = r.gw.client().await;
    c.expect_error(json!({"type": "echo"}), "unknown_type").await;
    r.change("echo.lua", Some(&echo(7))).await;
    c.send(json!({"type": "echo"})).await;
    assert_eq!(c.expect("echoed").await["version"], 7);
    r.change("echo.lua", None).await;
    c.expect_error(json!({"type": "echo"}), "unknown_type").await;
    // The rest was never disturbed.
    c.join("r").await;
    c.send(json!({"type": "chat", "room": "r", "message": "ok"})).await;
    c.expect("chat_message").await;
}

#[tokio::test]
async fn a_broken_edit_keeps_the_previous_version_running() {
    let mut r = Reloading::start(&[("echo.lua", &echo(1))]).await;
    let mut c = r.gw.client().await;
    r.change("echo.lua", Some("rtgate.on(\"echo\", function( oops")).await;
    c.send(json!({"type": "echo"})).await;
    assert_eq!(c.expect("echoed").await["version"], 1);
    // Claiming another plugin's type is refused the same way.
    r.change("echo.lua", Some(r#"rtgate.on("chat", function() end) rtgate.on("echo", function() end)"#)).await;
    c.send(json!({"type": "echo"})).await;
    assert_eq!(c.expect("echoed").await["version"], 1);
    // A good edit after the bad ones applies.
    r.change("echo.lua", Some(&echo(3))).await;
    c.send(json!({"type": "echo"})).await;
    assert_eq!(c.expect("echoed").await["version"], 3);
}

#[tokio::test]
async fn a_running_game_survives_a_reload_of_its_plugin() {
    let mut r = Reloading::start(&[]).await;
    let mut a = r.gw.client().await;
    let mut b = r.gw.client().await;
    a.send(json!({"type": "find_game"})).await;
    a.expect("waiting_for_opponent").await;
    b.send(json!({"type": "find_game"})).await;
    let start = a.expect("game_start").await;
    b.expect("game_start").await;
    b.send(json!({"type": "game_move", "position": 4})).await;
    a.expect("game_move").await;
    b.expect("game_move").await;

    let source = std::fs::read_to_string(repo_path("plugins/tictactoe.lua")).unwrap();
    r.change("tictactoe.lua", Some(&format!("{source}\n-- edited\n"))).await;

    a.send(json!({"type": "game_move", "position": 0})).await;
    let m = a.expect("game_move").await;
    assert_eq!(b.expect("game_move").await, m);
    assert_eq!(m["gameId"], start["gameId"]);
    assert_eq!(m["board"], json!(["O", null, null, null, "X", null, null, null, null]));
    assert_eq!(m["nextPlayer"], b.id.as_str());
}

#[tokio::test]
async fn reloading_the_typing_plugin_clears_indicators_instead_of_leaving_them_hanging() {
    let mut r = Reloading::start(&[]).await;
    let mut a = r.gw.client().await;
    let mut b = r.gw.client().await;
    a.join("t").await;
    b.join("t").await;
    a.expect("user_joined").await;
    a.send(json!({"type": "typing_start", "room": "t"})).await;
    b.expect("user_typing").await;
    let source = std::fs::read_to_string(repo_path("plugins/typing.lua")).unwrap();
    r.change("typing.lua", Some(&format!("{source}\n-- edited\n"))).await;
    let m = b.expect("user_stop_typing").await;
    assert_eq!(m["userId"], a.welcome["userId"]);
}
