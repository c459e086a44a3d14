//! The bundled web page (`web/`) and `rtgate.js` in real use: headless Chromium driven by
//! the Playwright scripts in `tests/browser/`, against the real gateway on 127.0.0.1.
//!
//! Each test starts a gateway, runs one script (`node tests/browser/NAME.mjs PAGE_URL`) and
//! requires it to exit 0; the script checks what people see in the page. A script that needs
//! the gateway restarted asks on its stdout (`@@step NAME`) and waits for `ok` on its stdin.
//!
//! They need Debian's Chromium at `/usr/bin/chromium` and the scripts' npm packages, which
//! `scripts/test` installs; without them plain `cargo test` skips these tests with one line
//! saying why (under `CI`, it fails instead). They run one at a time: two Chromiums on a
//! 2-core machine only make each slower.
//!
//! `RTGATE_SCREENSHOTS=1` makes the chat and game scripts write `docs/screenshot-*.png`.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::Duration;

use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use rtgate::Settings;
use rtgate::config::AuthMode;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::time::Instant;

/// A whole script, Chromium's start included. Each wait inside a script is bounded too (20 s).
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(180);
const CHROMIUM: &str = "/usr/bin/chromium";

static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
static TOOLS: OnceLock<bool> = OnceLock::new();

fn browser_dir() -> PathBuf {
    repo_path("tests/browser")
}

/// Whether Chromium and the scripts' npm packages are here. `scripts/test` installs them;
/// plain `cargo test` without them skips these tests with one line saying why, except under
/// `CI`, where a suite that cannot run is a failure.
fn tools_present() -> bool {
    *TOOLS.get_or_init(|| {
        let modules = browser_dir().join("node_modules");
        let missing = if !Path::new(CHROMIUM).exists() {
            Some(format!("Chromium is not installed at {CHROMIUM}"))
        } else if !(modules.join("playwright-core").exists() && modules.join("ws").exists()) {
            Some("the npm packages of tests/browser are not installed".to_string())
        } else {
            None
        };
        match missing {
            None => true,
            Some(why) if std::env::var_os("CI").is_some() => {
                panic!("browser tests: {why}; scripts/test installs what they need")
            }
            Some(why) => {
                eprintln!("skipped: browser tests: {why} (scripts/test installs it)");
                false
            }
        }
    })
}

/// A free loopback port, known before the gateway starts: the page's origin
/// (`http://127.0.0.1:PORT`) must be in `server.allowed_origins`, and a restart must come
/// back on the same address for the pages to find it.
fn free_addr() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local address")
}

/// One test's gateway, with its history database in a temp dir that outlives restarts.
struct TestGateway {
    gw: Gw,
    settings: Settings,
    _data: tempfile::TempDir,
    _turn: tokio::sync::MutexGuard<'static, ()>,
}

impl TestGateway {
    /// `None` when the tools are missing and the test is skipped (see [`tools_present`]).
    async fn start(configure: impl FnOnce(&mut Settings)) -> Option<TestGateway> {
        if !tools_present() {
            return None;
        }
        let turn = ONE_AT_A_TIME.lock().await;
        let data = tempfile::tempdir().expect("tempdir");
        let addr = free_addr();
        let mut settings = common::settings();
        settings.server.bind = addr;
        settings.server.allowed_origins = vec![format!("http://{addr}")];
        settings.history.path = data.path().join("history.db");
        configure(&mut settings);
        let gw = start_gateway(settings.clone()).await;
        Some(TestGateway { gw, settings, _data: data, _turn: turn })
    }

    fn page_url(&self) -> String {
        format!("http://{}", self.gw.addr)
    }

    /// Stops the gateway and starts it again, on the same address and database.
    async fn restart(&mut self, settings: Settings) {
        self.gw.shutdown().await;
        self.gw = start_gateway(settings).await;
    }

    fn script(&self, name: &str, extra_args: &[String]) -> Script {
        let mut args = vec![self.page_url()];
        args.extend_from_slice(extra_args);
        Script::spawn(name, &args)
    }
}

/// Starts a gateway on exactly `settings.server.bind`, retrying briefly: the port was free
/// a moment ago (or was ours, before a restart), so a failure can only be transient.
async fn start_gateway(settings: Settings) -> Gw {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        match rtgate::start(settings.clone()).await {
            Ok(running) => return Gw { addr: running.addr, running: Some(running), data: None },
            Err(e) if Instant::now() < deadline => {
                eprintln!("gateway start failed, retrying: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("the gateway did not start on {}: {e}", settings.server.bind),
        }
    }
}

/// A running scenario script, its output collected for the failure message.
struct Script {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: Lines<BufReader<ChildStdout>>,
    stderr: tokio::task::JoinHandle<String>,
    output: String,
    deadline: Instant,
}

impl Script {
    fn spawn(name: &str, args: &[String]) -> Script {
        let mut child = Command::new("node")
            .arg(browser_dir().join(name))
            .args(args)
            .current_dir(browser_dir())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group, so that a timeout can end Chromium with it.
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run node (Node.js 20+ is needed): {e}"));
        let stdout = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let mut err = child.stderr.take().expect("stderr");
        let stderr = tokio::spawn(async move {
            let mut text = String::new();
            let _ = err.read_to_string(&mut text).await;
            text
        });
        Script {
            name: name.to_string(),
            stdin: child.stdin.take(),
            child,
            stdout,
            stderr,
            output: String::new(),
            deadline: Instant::now() + SCRIPT_TIMEOUT,
        }
    }

    /// The next step the script asks for; `None` once its output has ended.
    async fn next_step(&mut self) -> Option<String> {
        loop {
            let line = match tokio::time::timeout_at(self.deadline, self.stdout.next_line()).await {
                Ok(Ok(Some(line))) => line,
                Ok(Ok(None) | Err(_)) => return None,
                Err(_) => self.fail(&format!("timed out after {SCRIPT_TIMEOUT:?}")).await,
            };
            self.output.push_str(&line);
            self.output.push('\n');
            if let Some(step) = line.strip_prefix("@@step ") {
                return Some(step.trim().to_string());
            }
        }
    }

    /// Tells the script its step is done.
    async fn ack(&mut self) {
        let stdin = self.stdin.as_mut().expect("stdin");
        stdin.write_all(b"ok\n").await.expect("write to the script");
        stdin.flush().await.expect("flush to the script");
    }

    /// Waits for the script to end; it must exit 0 having asked for no further step.
    async fn finish(mut self) {
        if let Some(step) = self.next_step().await {
            self.fail(&format!("asked for an unexpected step {step:?}")).await;
        }
        self.stdin.take();
        let status = match tokio::time::timeout_at(self.deadline, self.child.wait()).await {
            Ok(status) => status.expect("wait for node"),
            Err(_) => self.fail(&format!("did not exit within {SCRIPT_TIMEOUT:?}")).await,
        };
        let stderr = (&mut self.stderr).await.unwrap_or_default();
        assert!(
            status.success(),
            "{} exited with {status}\n--- stdout\n{}--- stderr\n{stderr}",
            self.name,
            self.output
        );
        // Shown by `cargo test -- --nocapture`: what the scenario checked, with timings.
        println!("{}{stderr}", self.output);
    }

    /// Ends the script and its browser, and fails the test with everything it printed.
    async fn fail(&mut self, why: &str) -> ! {
        if let Some(pid) = self.child.id() {
            // SIGTERM first: Playwright then closes Chromium itself.
            let group = -(pid as i32);
            // SAFETY: kill(2) takes plain integers; the group is the one this script leads.
            unsafe { libc::kill(group, libc::SIGTERM) };
            if tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await.is_err() {
                // SAFETY: as above.
                unsafe { libc::kill(group, libc::SIGKILL) };
            }
        }
        let _ = self.child.wait().await;
        let stderr = tokio::time::timeout(Duration::from_secs(5), &mut self.stderr).await;
        let stderr = stderr.ok().and_then(Result::ok).unwrap_or_default();
        panic!("{} {why}\n--- stdout\n{}--- stderr\n{stderr}", self.name, self.output);
    }
}

async fn run_script(gateway: &TestGateway, name: &str, extra_args: &[String]) {
    gateway.script(name, extra_args).finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn people_chat_with_typing_indicators_presence_and_file_notices() {
    let Some(mut gateway) = TestGateway::start(|_| {}).await else { return };
    run_script(&gateway, "chat.mjs", &[]).await;
    gateway.gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_joiner_reads_history_and_loads_older_pages() {
    let Some(mut gateway) = TestGateway::start(|s| s.history.page_limit = 5).await else { return };
    run_script(&gateway, "history.mjs", &[]).await;
    gateway.gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_reconnect_after_a_gateway_restart_and_see_every_message_once() {
    let Some(mut gateway) = TestGateway::start(|_| {}).await else { return };
    let mut script = gateway.script("reconnect.mjs", &[]);
    while let Some(step) = script.next_step().await {
        match step.as_str() {
            "stop" => {
                // Back on the same port and database, but refusing the pages' origin: they
                // stay out while a client without an Origin (allowed) posts to their room.
                let mut refusing = gateway.settings.clone();
                refusing.server.allowed_origins = vec!["http://refused.invalid".to_string()];
                gateway.restart(refusing).await;
                let mut bot = Client::connect(&format!("ws://{}/ws?name=Ops%20bot", gateway.gw.addr)).await;
                bot.join("ops").await;
                for i in 1..=3 {
                    let text = format!("while you were away {i}");
                    bot.send(json!({"type": "chat_message", "room": "ops", "message": text})).await;
                }
                let mut seqs = Vec::new();
                while seqs.len() < 3 {
                    let msg = bot.recv().await;
                    if msg["type"] == "new_message" {
                        seqs.push(msg["seq"].as_u64().expect("seq"));
                    }
                }
                assert_eq!(seqs, [3, 4, 5], "numbering continues across the restart");
                bot.close().await;
            }
            "restart" => {
                let settings = gateway.settings.clone();
                gateway.restart(settings).await;
            }
            other => script.fail(&format!("asked for an unknown step {other:?}")).await,
        }
        script.ack().await;
    }
    script.finish().await;
    gateway.gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_people_play_tic_tac_toe_to_a_win() {
    let Some(mut gateway) = TestGateway::start(|_| {}).await else { return };
    run_script(&gateway, "game.mjs", &[]).await;
    gateway.gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_room_scrolls_inside_a_page_that_fits_the_window() {
    let Some(mut gateway) = TestGateway::start(|_| {}).await else { return };
    run_script(&gateway, "layout.mjs", &[]).await;
    gateway.gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn script_injection_runs_nothing_in_other_pages() {
    let Some(mut gateway) = TestGateway::start(|_| {}).await else { return };
    run_script(&gateway, "xss.mjs", &[]).await;
    gateway.gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtgate_js_in_node_catches_up_dedupes_queues_and_honours_close_codes() {
    let Some(mut gateway) = TestGateway::start(|_| {}).await else { return };
    run_script(&gateway, "client-node.mjs", &[]).await;
    gateway.gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_page_example_in_client_md_works_from_its_own_origin() {
    let example = free_addr();
    let Some(mut gateway) = TestGateway::start(|s| s.server.allowed_origins.push(format!("http://{example}"))).await
    else {
        return;
    };
    run_script(&gateway, "example-html.mjs", &[format!("http://{example}")]).await;
    gateway.gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_jwt_mode_people_sign_in_with_a_pasted_token() {
    const SECRET: &str = "browser-test-secret-long-enough-0123456789";
    let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs() + 3600;
    let token = |sub: &str, name: &str| {
        let claims = json!({"sub": sub, "name": name, "exp": exp});
        encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(SECRET.as_bytes())).expect("token")
    };
    let Some(mut gateway) = TestGateway::start(|s| {
        s.auth.mode = AuthMode::Jwt;
        s.auth.algorithm = "HS256".into();
        s.auth.secret = SECRET.into();
    })
    .await
    else {
        return;
    };
    let args = [token("grace", "Grace Hopper"), token("linus", "Linus Torvalds"), "not-a-token".to_string()];
    run_script(&gateway, "jwt.mjs", &args).await;
    gateway.gw.shutdown().await;
}
