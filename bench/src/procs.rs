//! Processes: starting and stopping the servers under test, and everything read from
//! /proc or the kernel about them and about the tool itself (CPU time, resident memory,
//! open descriptors, file limits, `/healthz`).
//!
//! Server processes are owned by a [`Server`] value that kills them when dropped, and the
//! kernel is asked to kill them if the tool itself dies (PR_SET_PDEATHSIG), so neither an
//! error, a Ctrl-C nor a crash leaves a gateway holding a port. Their output is drained
//! continuously, because Node writes to a pipe synchronously: a full pipe would stall the
//! very server being measured. The last lines are kept to explain a failed start.

use std::collections::VecDeque;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout};

use crate::cli::{LocalUrl, parse_local_url};
use crate::error::{BenchError, Context, Result, bail};

/// Raises this process's soft RLIMIT_NOFILE to its hard limit and returns the new soft
/// limit. Servers started later inherit it.
pub fn raise_nofile_limit() -> io::Result<u64> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit only read/write the struct passed by pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Err(io::Error::last_os_error());
        }
        if lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(io::Error::last_os_error());
            }
        }
    }
    Ok(lim.rlim_cur)
}

/// This process's current soft RLIMIT_NOFILE (after [`raise_nofile_limit`]).
pub fn nofile_limit() -> u64 {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit only writes the struct passed by pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 1024;
    }
    lim.rlim_cur
}

/// This process's user + system CPU time (all threads) in nanoseconds, and how many
/// times its threads were preempted (involuntary context switches): a tool that is
/// preempted a lot is competing with the server for the cores.
pub fn self_usage() -> (u64, u64) {
    // SAFETY: an all-zero rusage is valid, and getrusage only writes into it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; RUSAGE_SELF cannot fail with a valid pointer.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return (0, 0);
    }
    let tv = |t: libc::timeval| t.tv_sec as u64 * 1_000_000_000 + t.tv_usec as u64 * 1_000;
    (tv(ru.ru_utime) + tv(ru.ru_stime), ru.ru_nivcsw as u64)
}

/// A process's user + system CPU time (all threads) from /proc/PID/stat, in nanoseconds.
/// The kernel counts in clock ticks (10 ms), so use it over seconds, not milliseconds.
pub fn cpu_ns(pid: u32) -> Result<u64> {
    let stat =
        std::fs::read_to_string(format!("/proc/{pid}/stat")).with_context(|| format!("reading /proc/{pid}/stat"))?;
    parse_stat_cpu_ticks(&stat)
        .map(|ticks| ticks * 1_000_000_000 / clock_ticks_per_sec())
        .with_context(|| format!("/proc/{pid}/stat: unexpected format"))
}

fn clock_ticks_per_sec() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as u64 } else { 100 }
}

/// utime + stime (fields 14 and 15) in ticks. The command name (field 2) may contain
/// spaces and parentheses, so fields are counted from the last `)`.
fn parse_stat_cpu_ticks(stat: &str) -> Option<u64> {
    let after = &stat[stat.rfind(')')? + 1..];
    let mut fields = after.split_ascii_whitespace();
    // After ")": field 3 (state) is index 0, so utime (14) is index 11.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// CPU time spent busy by the whole machine (all cores, everything but idle and iowait),
/// from /proc/stat, in nanoseconds. Minus the tool and the server, it shows whether
/// something else was competing for the cores during a measurement.
pub fn machine_busy_ns() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    parse_machine_busy_ticks(&stat).map(|t| t * 1_000_000_000 / clock_ticks_per_sec())
}

fn parse_machine_busy_ticks(stat: &str) -> Option<u64> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line.split_ascii_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let busy = [0usize, 1, 2, 5, 6, 7].iter().filter_map(|&i| v.get(i)).sum();
    (v.len() >= 8).then_some(busy)
}

/// Waits (at most `limit`) until the whole machine has been below `max_percent` of one
/// core busy for a second, so that a measurement does not start while, say, a compiler
/// is running on the same two cores. Returns the last reading and whether it was quiet.
pub async fn wait_for_quiet(limit: Duration, max_percent: f64) -> (bool, f64) {
    let deadline = Instant::now() + limit;
    // One reading per second, bounded by `limit` (and at least one reading).
    loop {
        let Some(a) = machine_busy_ns() else { return (false, f64::NAN) };
        tokio::time::sleep(Duration::from_secs(1)).await;
        let Some(b) = machine_busy_ns() else { return (false, f64::NAN) };
        let busy = b.saturating_sub(a) as f64 / 1e7;
        if busy < max_percent {
            return (true, busy);
        }
        if Instant::now() >= deadline {
            return (false, busy);
        }
    }
}

/// VmRSS of a process in KiB.
pub fn rss_kb(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    parse_vm_rss_kb(&status).with_context(|| format!("/proc/{pid}/status has no VmRSS line"))
}

fn parse_vm_rss_kb(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line["VmRSS:".len()..].split_ascii_whitespace().next()?.parse().ok()
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Rss {
    pub kb: u64,
    /// Whether two reads 1 s apart agreed within 1% before the time limit.
    pub settled: bool,
    pub reads: u32,
}

/// Reads VmRSS until two reads 1 s apart agree within 1%, for at most ~10 s: memory
/// freed by a burst of work is returned to the kernel with some delay (allocator trim,
/// deferred frees), and a single read taken too early would be noise.
pub async fn settled_rss(pid: u32) -> Result<Rss> {
    let mut last = rss_kb(pid)?;
    for reads in 2..=11 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = rss_kb(pid)?;
        if now.abs_diff(last) * 100 <= last.max(1) {
            return Ok(Rss { kb: now, settled: true, reads });
        }
        last = now;
    }
    Ok(Rss { kb: last, settled: false, reads: 11 })
}

/// Number of open file descriptors of a process.
pub fn fd_count(pid: u32) -> Result<u64> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/fd")).with_context(|| format!("listing /proc/{pid}/fd"))?;
    Ok(dir.count() as u64)
}

/// `connections` from rtgate's `GET /healthz`, over a plain HTTP/1.1 request to 127.0.0.1.
pub async fn healthz_connections(port: u16) -> Result<u64> {
    let body = timeout(Duration::from_secs(3), async {
        let mut tcp = TcpStream::connect(("127.0.0.1", port)).await.context("connecting")?;
        let req = format!("GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
        tcp.write_all(req.as_bytes()).await.context("sending request")?;
        let mut buf = Vec::new();
        (&mut tcp).take(1 << 20).read_to_end(&mut buf).await.context("reading response")?;
        Ok::<_, BenchError>(buf)
    })
    .await
    .map_err(|_| BenchError::msg("timed out"))
    .and_then(|r| r)
    .with_context(|| format!("GET http://127.0.0.1:{port}/healthz"))?;
    parse_healthz_connections(&String::from_utf8_lossy(&body))
        .with_context(|| format!("GET http://127.0.0.1:{port}/healthz: no `connections` in the reply"))
}

fn parse_healthz_connections(response: &str) -> Option<u64> {
    let status = response.lines().next()?;
    if !status.contains(" 200") {
        return None;
    }
    let body = &response[response.find("\r\n\r\n")? + 4..];
    let json = &body[body.find('{')?..=body.rfind('}')?];
    serde_json::from_str::<serde_json::Value>(json).ok()?.get("connections")?.as_u64()
}

/// A port that was free a moment ago (bind to 0, read, close). Used only for seed-ws,
/// which cannot report a port it chose itself.
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0 to find a free port")?;
    Ok(l.local_addr().context("reading the bound port")?.port())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ServerKind {
    Rtgate,
    SeedWs,
}

impl ServerKind {
    pub fn name(self) -> &'static str {
        match self {
            ServerKind::Rtgate => "rtgate",
            ServerKind::SeedWs => "seed-ws",
        }
    }
}

/// A running server under test; killed when dropped.
pub struct Server {
    pub kind: ServerKind,
    pub pid: u32,
    pub url: LocalUrl,
    child: Child,
    log: Arc<Mutex<VecDeque<String>>>,
    scratch: Option<PathBuf>,
}

const LOG_LINES_KEPT: usize = 30;
const START_LIMIT: Duration = Duration::from_secs(20);

impl Server {
    /// Starts rtgate on a port it picks itself (bind 127.0.0.1:0) and reads the port back
    /// from its start-up line, which avoids the race of choosing a port for it. It runs in
    /// a fresh scratch directory (removed by [`Server::stop`]) with the plugins of
    /// `checkout`, so that whatever it writes relative to its working directory (the
    /// history database) starts empty every time and stays out of the checkout.
    pub async fn start_rtgate(bin: &Path, checkout: &Path, env: &[(String, String)]) -> Result<Server> {
        if !bin.is_file() {
            bail!("{} does not exist: run `cargo build --release` first", bin.display());
        }
        let scratch =
            std::env::temp_dir().join(format!("rtgate-bench-{}-{}", std::process::id(), rand::random::<u32>()));
        std::fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
        let mut cmd = Command::new(bin);
        cmd.current_dir(&scratch)
            .env("RTGATE__SERVER__BIND", "127.0.0.1:0")
            .env("RTGATE__PLUGINS__DIR", checkout.join("plugins"))
            // A load test is not a person typing, and every client comes from 127.0.0.1:
            // the limits stay on the hot path (the limiter is still consulted for every
            // event) but with budgets no benchmark reaches.
            .env("RTGATE__RATE_LIMITS__BUCKETS__DEFAULT__PER_MINUTE", "1000000000")
            .env("RTGATE__RATE_LIMITS__BUCKETS__DEFAULT__BURST", "1000000000")
            .env("RTGATE__LIMITS__MAX_CONNECTIONS_PER_IP", "1000000")
            .env("RTGATE__LIMITS__NEW_CONNECTIONS_PER_IP_PER_SECOND", "1000000")
            .env_remove("RTGATE_CONFIG")
            .envs(env.iter().map(|(k, v)| (k, v)));
        let mut server = Server::spawn(ServerKind::Rtgate, cmd, parse_listen_line).await;
        match &mut server {
            Ok(server) => server.scratch = Some(scratch),
            Err(_) => {
                let _ = std::fs::remove_dir_all(&scratch);
            }
        }
        server
    }

    /// Starts the seed-ws Node server on a free port.
    pub async fn start_seed(node: &Path, server_js: &Path) -> Result<Server> {
        if !server_js.is_file() {
            bail!("{} does not exist", server_js.display());
        }
        let port = free_port()?;
        let mut cmd = Command::new(node);
        cmd.arg(server_js).env("PORT", port.to_string());
        if let Some(dir) = server_js.parent() {
            cmd.current_dir(dir);
        }
        Server::spawn(ServerKind::SeedWs, cmd, move |line| {
            line.contains("WebSocket server running on port").then_some(port)
        })
        .await
    }

    async fn spawn(kind: ServerKind, mut cmd: Command, ready: impl Fn(&str) -> Option<u16>) -> Result<Server> {
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
        // SAFETY: the closure runs in the forked child before exec and only calls prctl,
        // which is async-signal-safe. The signal fires when the forking thread exits;
        // servers are started from the main thread, which lives as long as the tool.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let name = kind.name();
        let mut child = cmd.spawn().with_context(|| format!("starting {name}"))?;
        let pid = child.id().with_context(|| format!("{name} exited at once"))?;
        let log = Arc::new(Mutex::new(VecDeque::with_capacity(LOG_LINES_KEPT)));
        let (lines_tx, mut lines_rx) = mpsc::unbounded_channel();
        if let Some(out) = child.stdout.take() {
            drain(out, log.clone(), lines_tx.clone());
        }
        if let Some(err) = child.stderr.take() {
            drain(err, log.clone(), lines_tx);
        }
        let deadline = Instant::now() + START_LIMIT;
        let port = loop {
            tokio::select! {
                line = lines_rx.recv() => match line {
                    Some(line) => if let Some(port) = ready(&line) { break port },
                    None => bail!("{name} exited during start-up; last output:\n{}", tail(&log)),
                },
                _ = tokio::time::sleep_until(deadline) => {
                    bail!("{name} did not report ready within {START_LIMIT:?}; last output:\n{}", tail(&log))
                }
            }
        };
        let url_text = match kind {
            ServerKind::Rtgate => format!("ws://127.0.0.1:{port}/ws"),
            ServerKind::SeedWs => format!("ws://127.0.0.1:{port}"),
        };
        let url = parse_local_url(&url_text).map_err(BenchError::msg)?;
        Ok(Server { kind, pid, url, child, log, scratch: None })
    }

    /// Kills the server, reaps it (bounded) and removes its scratch directory.
    pub async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = timeout(Duration::from_secs(5), self.child.wait()).await;
        if let Some(dir) = self.scratch.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }

    /// The last lines the server printed, for error messages.
    pub fn recent_output(&self) -> String {
        tail(&self.log)
    }
}

impl Drop for Server {
    /// On an error or Ctrl-C path: the child is killed by `kill_on_drop`; the scratch
    /// directory goes too.
    fn drop(&mut self) {
        if let Some(dir) = self.scratch.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn drain<R: AsyncRead + Unpin + Send + 'static>(
    pipe: R,
    log: Arc<Mutex<VecDeque<String>>>,
    lines: mpsc::UnboundedSender<String>,
) {
    tokio::spawn(async move {
        let mut reader = BufReader::new(pipe).lines();
        // Ends when the server closes its output (exits); one line at a time.
        while let Ok(Some(line)) = reader.next_line().await {
            if let Ok(mut log) = log.lock() {
                if log.len() == LOG_LINES_KEPT {
                    log.pop_front();
                }
                log.push_back(line.clone());
            }
            // Nobody listens after start-up; that is fine.
            let _ = lines.send(line);
        }
    });
}

fn tail(log: &Mutex<VecDeque<String>>) -> String {
    log.lock().map(|l| l.iter().cloned().collect::<Vec<_>>().join("\n")).unwrap_or_default()
}

/// The port in rtgate's `… listening on ws://127.0.0.1:PORT/ws …` start-up line.
fn parse_listen_line(line: &str) -> Option<u16> {
    const KEY: &str = "listening on ws://127.0.0.1:";
    let rest = &line[line.find(KEY)? + KEY.len()..];
    let end = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
    rest[..end].parse().ok().filter(|&p| p != 0)
}

/// Makes a writable copy of the anchor servers and installs their npm dependencies, once.
pub async fn prepare_anchors(src: &Path, dest: &Path) -> Result<PathBuf> {
    let server_js = dest.join("seed-ws/server.js");
    if dest.join("node_modules/ws").is_dir() && server_js.is_file() {
        return Ok(server_js);
    }
    eprintln!("preparing {} (copy of {} + npm install)…", dest.display(), src.display());
    copy_dir(src, dest).with_context(|| format!("copying {} to {}", src.display(), dest.display()))?;
    let mut npm = Command::new("npm");
    npm.args(["install", "--no-audit", "--no-fund"]).current_dir(dest).stdin(Stdio::null()).kill_on_drop(true);
    let out = timeout(Duration::from_secs(600), npm.output())
        .await
        .map_err(|_| BenchError::msg("npm install took more than 10 minutes"))?
        .context("running npm install")?;
    if !out.status.success() {
        bail!("npm install in {} failed: {}", dest.display(), String::from_utf8_lossy(&out.stderr));
    }
    if !server_js.is_file() {
        bail!("{} missing after copying the anchors", server_js.display());
    }
    Ok(server_js)
}

fn copy_dir(src: &Path, dest: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dest)?;
    std::fs::set_permissions(dest, std::fs::Permissions::from_mode(0o755))?;
    for entry in std::fs::read_dir(src)? {
        let entry = entry?;
        let to = dest.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &to)?;
        } else {
            // The source is read-only; the copy must not be, or a second copy fails.
            std::fs::copy(entry.path(), &to)?;
            std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o644))?;
        }
    }
    Ok(())
}

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    pub memory_gib: f64,
    pub kernel: String,
}

pub fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_else(|| "unknown".to_string());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kb: f64 = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_ascii_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    Machine {
        cpus: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        cpu_model,
        memory_gib: (mem_kb / 1024.0 / 1024.0 * 10.0).round() / 10.0,
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_cpu_fields_survive_odd_command_names() {
        let stat = "1234 (my (odd) name) S 1 1234 1234 0 -1 4194560 500 0 0 0 250 75 0 0 20 0 9 0 100 1000 200";
        assert_eq!(parse_stat_cpu_ticks(stat), Some(325));
        assert_eq!(parse_stat_cpu_ticks("garbage"), None);
        let own = std::fs::read_to_string("/proc/self/stat").unwrap();
        assert!(parse_stat_cpu_ticks(&own).is_some());
    }

    #[test]
    fn machine_busy_time() {
        let stat = "cpu  100 5 50 1000 7 3 2 1 0 0\ncpu0 1 1 1 1 1 1 1 1 0 0\n";
        assert_eq!(parse_machine_busy_ticks(stat), Some(161));
        assert!(machine_busy_ns().is_some());
    }

    #[test]
    fn vm_rss_and_fds_of_this_process() {
        assert_eq!(parse_vm_rss_kb("Name:\tx\nVmRSS:\t   12345 kB\n"), Some(12345));
        assert!(rss_kb(std::process::id()).unwrap() > 0);
        assert!(fd_count(std::process::id()).unwrap() >= 3);
        assert!(cpu_ns(std::process::id()).is_ok());
    }

    #[test]
    fn rtgate_listen_line() {
        let line = "2025-01-01T00:00:00Z  INFO rtgate::gateway: rtgate listening on ws://127.0.0.1:40123/ws (and ws://127.0.0.1:40123/) addr=127.0.0.1:40123";
        assert_eq!(parse_listen_line(line), Some(40123));
        assert_eq!(parse_listen_line("listening on ws://127.0.0.1:0/ws"), None);
        assert_eq!(parse_listen_line("starting"), None);
    }

    #[test]
    fn healthz_reply() {
        let ok = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n{\"status\":\"ok\",\"connections\":3,\"rooms\":1}";
        assert_eq!(parse_healthz_connections(ok), Some(3));
        assert_eq!(parse_healthz_connections("HTTP/1.1 404 Not Found\r\n\r\n{\"connections\":3}"), None);
    }

    #[test]
    fn own_cpu_time_advances() {
        let (a, _) = self_usage();
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        assert!(self_usage().0 >= a);
    }
}
