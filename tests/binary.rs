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

/// A child `rtgate` that was started and has logged its address. Killed if the test fails
/// before stopping it: an orphan would hold the test's stderr open.
struct Started {
    child: Option<std::process::Child>,
    addr: String,
    log: Vec<String>,
}

impl Started {
    /// Spawns `cmd` and reads its log until it says where it listens.
    fn spawn(mut cmd: Command) -> Started {
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().expect("spawn rtgate");
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
        Started { child: Some(child), addr, log }
    }

    /// Sends SIGTERM and waits for the exit status.
    fn stop(mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let kill = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap();
        assert!(kill.success());
        let (exit_tx, exit_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = exit_tx.send(child.wait());
        });
        exit_rx.recv_timeout(TIMEOUT).expect("rtgate exits after SIGTERM").unwrap()
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[tokio::test]
async fn starts_logs_its_address_and_plugins_serves_and_stops_on_sigterm() {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), "[server]\nbind = \"127.0.0.1:0\"\n").unwrap();
    let data = tempfile::tempdir().unwrap();
    let mut cmd = rtgate_in(data.path());
    cmd.arg("--config").arg(file.path()).env("RTGATE__HEARTBEAT__INTERVAL", "5s");
    let started = Started::spawn(cmd);
    let addr = started.addr.clone();
    assert!(!addr.ends_with(":0"), "the log names the chosen port: {addr}");
    let log = &started.log;
    assert!(log.iter().any(|l| l.contains("plugin loaded") && l.contains("chat")), "{log:#?}");
    // A brand-new database is opened, not recovered.
    assert!(log.iter().any(|l| l.contains("history open")), "{log:#?}");
    assert!(!log.iter().any(|l| l.contains("again") || l.contains("ERROR")), "{log:#?}");

    let mut a = Client::connect(&format!("ws://{addr}")).await;
    a.join("bin").await;
    a.send(json!({"type": "chat", "room": "bin", "message": "via the binary"})).await;
    assert_eq!(a.expect("chat_message").await["message"], "via the binary");

    let closed = tokio::spawn(async move { a.expect_close().await });
    let status = tokio::task::spawn_blocking(move || started.stop()).await.unwrap();
    let close = closed.await.unwrap().expect("close frame");
    assert_eq!(u16::from(close.code), 1001);
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

/// Every key whose embedded default is a list, as a dotted path: derived from
/// `config/default.toml`, so a list key added there is covered here without being named.
fn list_keys() -> Vec<(String, Vec<String>)> {
    fn walk(prefix: &str, table: config::Map<String, config::Value>, out: &mut Vec<(String, Vec<String>)>) {
        for (name, value) in table {
            let key = if prefix.is_empty() { name } else { format!("{prefix}.{name}") };
            match value.kind {
                config::ValueKind::Table(table) => walk(&key, table, out),
                config::ValueKind::Array(items) => {
                    let items = items.into_iter().map(|v| v.into_string().expect("a list of strings")).collect();
                    out.push((key, items));
                }
                _ => {}
            }
        }
    }
    let defaults = config::Config::builder()
        .add_source(config::File::from_str(rtgate::config::DEFAULT_TOML, config::FileFormat::Toml))
        .build()
        .unwrap();
    let mut keys = Vec::new();
    walk("", defaults.try_deserialize().unwrap(), &mut keys);
    keys
}

fn env_name(key: &str) -> String {
    format!("RTGATE__{}", key.to_uppercase().replace('.', "__"))
}

#[test]
fn every_list_key_takes_a_comma_separated_value_from_the_environment() {
    let keys = list_keys();
    assert!(keys.iter().any(|(k, _)| k == "auth.audience"), "{keys:?}");
    for (key, default) in keys {
        // The default itself is valid by construction; an empty one gets two entries.
        let value = if default.is_empty() { "first.example, second.example".to_string() } else { default.join(",") };
        let out = rtgate().arg("--check").env(env_name(&key), &value).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{}={value}: {stderr}", env_name(&key));
    }
}

const DIGITS: &str = "123456789012345678901234567890123";

fn token(claims: serde_json::Value) -> String {
    use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
    encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(DIGITS.as_bytes())).unwrap()
}

/// The reproduction: a secret of digits and a list of audiences, set only in the
/// environment, reach the gateway as they were written.
#[tokio::test]
async fn a_secret_of_digits_and_a_list_from_the_environment_arrive_as_written() {
    let data = tempfile::tempdir().unwrap();
    let mut cmd = rtgate_in(data.path());
    cmd.env("RTGATE__SERVER__BIND", "127.0.0.1:0")
        .env("RTGATE__AUTH__MODE", "jwt")
        .env("RTGATE__AUTH__SECRET", DIGITS)
        .env("RTGATE__AUTH__AUDIENCE", "rtgate-acc,rtgate-prod")
        .env("RTGATE__AUTH__ISSUER", "https://issuer.test");
    let started = Started::spawn(cmd);
    let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 600;
    let good = token(json!({"sub": "op", "aud": "rtgate-prod", "iss": "https://issuer.test", "exp": exp}));
    let url = format!("ws://{}/ws", started.addr);
    let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url.as_str()).unwrap();
    req.headers_mut().insert("Authorization", format!("Bearer {good}").parse().unwrap());
    let (mut ws, _) =
        tokio::time::timeout(TIMEOUT, tokio_tungstenite::connect_async(req)).await.unwrap().expect("101 for the token");
    let welcome = futures_util::StreamExt::next(&mut ws).await.unwrap().unwrap();
    let welcome: serde_json::Value = serde_json::from_str(welcome.to_text().unwrap()).unwrap();
    assert_eq!(welcome["userId"], "op");
    // The audience list is a list: one entry is required, another one is refused.
    let addr: std::net::SocketAddr = started.addr.parse().unwrap();
    let upgrade = |token: String| async move {
        let auth = format!("Bearer {token}");
        let headers = [
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Version", "13"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("Authorization", auth.as_str()),
        ];
        let (status, _, body) = http_get(addr, "/ws", &headers).await;
        (status, body)
    };
    let other = token(json!({"sub": "op", "aud": "rtgate-dev", "iss": "https://issuer.test", "exp": exp}));
    assert_eq!(upgrade(other).await.0, 401);
    drop(ws);
    let status = tokio::task::spawn_blocking(move || started.stop()).await.unwrap();
    assert!(status.success(), "{status:?}");
}

#[test]
fn help_explains_where_settings_come_from() {
    let out = rtgate().arg("--help").env("RTGATE_CONFIG", "secret-path.toml").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{help}");
    assert!(help.contains("[env: RTGATE_CONFIG]"), "{help}");
    assert!(!help.contains("secret-path.toml"), "{help}");
    assert!(help.contains("RTGATE__SECTION__KEY"), "{help}");
    assert!(help.contains("comma separated"), "{help}");
    let out = rtgate().arg("--help").output().unwrap();
    assert!(!String::from_utf8_lossy(&out.stdout).contains("RTGATE_CONFIG=]"));
    // The README's `rtgate --config` needs the binary on the PATH: it says how.
    let readme = std::fs::read_to_string(repo_path("README.md")).unwrap();
    assert!(readme.contains("cargo install --path ."), "README.md");
}
