//! The `rtgate` binary as an operator runs it: configuration errors, the start-up log, and
//! a clean exit on SIGTERM.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use common::*;
use serde_json::json;

/// The binary, run from the repository (for `plugins/`), with its history in `data`.
fn rtgate_in(data: &std::path::Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rtgate"));
    cmd.current_dir(env!("CARGO_MANIFEST_DIR")).env_remove("RUST_LOG");
    for (k, _) in std::env::vars() {
        if k.starts_with("RTGATE") {
            cmd.env_remove(k);
        }
    }
    cmd.env("RTGATE__HISTORY__PATH", data.join("history.db"));
    cmd
}

fn rtgate() -> Command {
    // Runs that never reach the database: it is never created.
    rtgate_in(std::path::Path::new("/nonexistent-rtgate-test"))
}

#[test]
fn an_invalid_value_stops_start_up_naming_the_key() {
    let cases = [
        ("RTGATE__HEARTBEAT__INTERVAL", "soon", "heartbeat.interval"),
        ("RTGATE__HEARTBEAT__TIMEOUT", "1s", "heartbeat.timeout"),
        ("RTGATE__LIMITS__MAX_FRAME_BYTES", "12", "limits.max_frame_bytes"),
        ("RTGATE__LIMITS__MAX_FRAME_BYTES", "lots", "limits.max_frame_bytes"),
        ("RTGATE__SERVER__BIND", "nowhere", "server.bind"),
        ("RTGATE__SERVER__ALLOWED_ORIGINS", "ftp://x", "server.allowed_origins"),
        ("RTGATE__SERVER__BINDD", "x", "bindd"),
    ];
    for (key, value, named) in cases {
        let out = rtgate().env(key, value).output().expect("run rtgate");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{key}={value}: {stderr}");
        assert!(stderr.contains(named), "{key}={value} should name {named}: {stderr}");
    }
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), "[plugins]\nqueue = 0\n").unwrap();
    let out = rtgate().arg("--config").arg(file.path()).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("plugins.queue"));
}

#[tokio::test]
async fn starts_logs_its_address_and_plugins_serves_and_stops_on_sigterm() {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), "[server]\nbind = \"127.0.0.1:0\"\n").unwrap();
    let data = tempfile::tempdir().unwrap();
    let mut child = rtgate_in(data.path())
        .arg("--config")
        .arg(file.path())
        .env("RTGATE__HEARTBEAT__INTERVAL", "5s")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn rtgate");
    let stdout = child.stdout.take().unwrap();
    let (lines_tx, lines_rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let mut log = Vec::new();
    let addr = loop {
        let line = lines_rx.recv_timeout(TIMEOUT).expect("start-up log");
        log.push(line.clone());
        if let Some(rest) = line.split("listening on ws://").nth(1) {
            break rest.split('/').next().unwrap().to_string();
        }
    };
    assert!(!addr.ends_with(":0"), "the log names the chosen port: {addr}");
    assert!(log.iter().any(|l| l.contains("plugin loaded") && l.contains("chat")), "{log:#?}");

    let mut a = Client::connect(&format!("ws://{addr}")).await;
    a.join("bin").await;
    a.send(json!({"type": "chat", "room": "bin", "message": "via the binary"})).await;
    assert_eq!(a.expect("chat_message").await["message"], "via the binary");

    let kill = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap();
    assert!(kill.success());
    let close = a.expect_close().await.expect("close frame");
    assert_eq!(u16::from(close.code), 1001);
    let (exit_tx, exit_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = exit_tx.send(child.wait());
    });
    let status = exit_rx.recv_timeout(TIMEOUT).expect("rtgate exits after SIGTERM").unwrap();
    assert!(status.success(), "{status:?}");
}

#[test]
fn check_reports_broken_plugins_with_file_and_line() {
    let out = rtgate().arg("--check").output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let dir = plugin_dir(&[("bad.lua", "rtgate.on(\"bad\", function()\n  return )\nend)\n")]);
    let out = rtgate().arg("--check").env("RTGATE__PLUGINS__DIR", dir.path()).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("bad.lua:2"), "{stderr}");
}
