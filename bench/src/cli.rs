//! The command line: every subcommand, its options and their bounds, and the check that a
//! target is on 127.0.0.1.
//!
//! Bounds live here, at the edge, so that every scenario can trust its numbers: a run is
//! always finite in connections, messages and seconds, and a typo such as `--duration 5000`
//! is refused with a message instead of tying up the machine for an hour and a half. The
//! loopback-only rule is enforced on the parsed URL, not on a string prefix, so
//! `ws://127.0.0.1.example.com` cannot slip through.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Serialize;
use tokio_tungstenite::tungstenite::http::Uri;

/// Load and benchmark tool for rtgate (and any server speaking the seed's chat protocol).
/// Targets 127.0.0.1 only.
#[derive(Parser, Debug)]
#[command(name = "rtgate-bench", version)]
pub struct Cli {
    /// Directory the JSON results are written to (created if missing).
    #[arg(long, global = true, default_value = "bench-results")]
    pub out_dir: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// N members in each of K rooms, P publishers; deliveries/s, accounting, latency.
    Fanout(FanoutArgs),
    /// Hold N idle connections open and measure the server's memory per connection.
    Idle(IdleArgs),
    /// Connect → welcome → join → joined → leave → close, many times; checks for leaks.
    Churn(ChurnArgs),
    /// Start rtgate and the seed-ws Node server and run scenarios (a)–(e) on both.
    Compare(CompareArgs),
    /// In-process: fan-out through the chat plugin versus the same fan-out with the plugin
    /// call skipped, its work done by a Rust handler instead (the cost of the Lua hop).
    LuaHop(LuaHopArgs),
    /// In-process: messages persisted per second, publishing as fast as the writer keeps up.
    History(HistoryArgs),
    /// The machine's latency floor: how long a busy core is kept from running (needs an
    /// otherwise idle machine).
    Stalls(StallArgs),
}

#[derive(Args, Debug, Clone, Serialize)]
pub struct StallArgs {
    /// Seconds to probe.
    #[arg(long, default_value_t = 5.0, value_parser = parse_measure_secs)]
    pub seconds: f64,
    /// Cores to keep busy, from core 0 (default: all).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub cpus: Option<u32>,
}

#[derive(Args, Debug, Clone, Serialize)]
pub struct LuaHopArgs {
    /// Room members, the publisher included.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(2..=1_000))]
    pub members: u32,
    /// Messages the publisher may have sent but not yet seen come back.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub in_flight: u32,
    /// Measured seconds per half (after a 1 s warmup).
    #[arg(long, default_value_t = 5.0, value_parser = parse_measure_secs)]
    pub duration: f64,
    /// Rounds of both halves, alternating which goes first; medians are reported.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
    pub rounds: u32,
}

#[derive(Args, Debug, Clone, Serialize)]
pub struct HistoryArgs {
    /// Rooms published to, round-robin.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub rooms: u32,
    /// Measured seconds (after a 1 s warmup).
    #[arg(long, default_value_t = 5.0, value_parser = parse_measure_secs)]
    pub duration: f64,
    /// `batched` (the default) or `per_message`.
    #[arg(long, default_value = "batched", value_parser = ["batched", "per_message"])]
    pub durability: String,
}

#[derive(Args, Debug, Clone, Serialize)]
pub struct FanoutArgs {
    /// Server URL, e.g. ws://127.0.0.1:3000/ws (127.0.0.1 only).
    #[arg(long, value_parser = parse_local_url)]
    pub url: LocalUrl,
    /// Number of rooms (K).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub rooms: u32,
    /// Members per room (N), publishers included.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub members: u32,
    /// Publishers (P), spread round-robin over the rooms; rooms ≤ P ≤ rooms × members.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub publishers: u32,
    /// Total publish rate in messages/s over all publishers; 0 = as fast as --in-flight allows.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=10_000_000))]
    pub rate: u64,
    /// At max rate: messages a publisher may have sent but not yet seen come back.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub in_flight: u32,
    /// Measured seconds (after the warmup).
    #[arg(long, default_value_t = 5.0, value_parser = parse_measure_secs)]
    pub duration: f64,
    /// Seconds of publishing before measuring starts (drains join notices, warms caches).
    #[arg(long, default_value_t = 1.0, value_parser = parse_warmup_secs)]
    pub warmup: f64,
    /// Bytes of `message` text per chat message.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=60_000))]
    pub size: u32,
    /// Server process id: its CPU time is read from /proc before and after the window.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Load-generator threads, each a single-threaded runtime owning a share of the
    /// connections (1 leaves the other core to the server).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub threads: u32,
    /// Connections being opened at once while setting up.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub connect_concurrency: u32,
    /// Seconds to wait after publishing stops for the last deliveries.
    #[arg(long, default_value_t = 5.0, value_parser = parse_warmup_secs)]
    pub drain: f64,
    /// Read buffer per connection in bytes (tungstenite zero-fills it before every read, so
    /// bigger is not free).
    #[arg(long, default_value_t = 16 * 1024, value_parser = clap::value_parser!(u32).range(1024..=1 << 20))]
    pub read_buffer: u32,
}

#[derive(Args, Debug, Clone, Serialize)]
pub struct IdleArgs {
    /// Server URL, e.g. ws://127.0.0.1:3000/ws (127.0.0.1 only).
    #[arg(long, value_parser = parse_local_url)]
    pub url: LocalUrl,
    /// Connections to open and hold.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=200_000))]
    pub connections: u32,
    /// Server process id, for VmRSS and open file descriptors from /proc.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Connections being opened at once.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub connect_concurrency: u32,
}

#[derive(Args, Debug, Clone, Serialize)]
pub struct ChurnArgs {
    /// Server URL, e.g. ws://127.0.0.1:3000/ws (127.0.0.1 only).
    #[arg(long, value_parser = parse_local_url)]
    pub url: LocalUrl,
    /// Connect/join/leave/close cycles in total.
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub cycles: u64,
    /// Cycles running at once.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub concurrency: u32,
    /// Server process id, for VmRSS and open file descriptors from /proc.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Upper bound on the whole run; cycles not started by then are skipped and reported.
    #[arg(long, default_value_t = 600.0, value_parser = parse_measure_secs)]
    pub max_seconds: f64,
    /// Cycles run before the "before" figures are taken, so that one-time growth of a
    /// fresh server (allocator caches, buffer pools) is not mistaken for a leak. A fresh
    /// rtgate's glibc arenas (one per thread that allocates: runtime workers, plugin
    /// threads, SQLite's) were measured reaching their working set only after ~10,000
    /// connections; after that, consecutive 100,000-cycle runs moved RSS by -2.6 to +0.6%.
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    pub warmup_cycles: u64,
}

#[derive(Args, Debug, Clone, Serialize)]
pub struct CompareArgs {
    /// Scenarios to run: a (max-rate fan-out), b (200 msg/s to 100), c (100 rooms × 10),
    /// d (idle connections), e (churn, rtgate only).
    #[arg(long, value_delimiter = ',', default_value = "a,b,c,d")]
    pub scenarios: Vec<Scenario>,
    /// Rounds; servers alternate within each round and medians are reported.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=9))]
    pub rounds: u32,
    /// Measured seconds per fan-out run.
    #[arg(long, default_value_t = 5.0, value_parser = parse_measure_secs)]
    pub duration: f64,
    /// Warmup seconds per fan-out run.
    #[arg(long, default_value_t = 1.0, value_parser = parse_warmup_secs)]
    pub warmup: f64,
    /// Load-generator threads for the fan-out scenarios.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub threads: u32,
    /// Connections held open in scenario (d).
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=200_000))]
    pub idle_connections: u32,
    /// Cycles in scenario (e).
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub churn_cycles: u64,
    /// Concurrency in scenario (e).
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub churn_concurrency: u32,
    /// Seconds of the stall probe (see `stalls`) run before and after the scenarios; 0
    /// skips it.
    #[arg(long, default_value_t = 3.0, value_parser = parse_warmup_secs)]
    pub stall_probe: f64,
    /// The rtgate binary (build it first with `cargo build --release`).
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/release/rtgate"))]
    pub rtgate_bin: PathBuf,
    /// The rtgate checkout: rtgate loads `<dir>/plugins`. It runs in a fresh scratch
    /// directory, so that files it writes relative to its working directory (the history
    /// database) start empty for every run and never land in the checkout.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/.."))]
    pub rtgate_dir: PathBuf,
    /// Extra environment for rtgate, e.g. `RTGATE__HISTORY__ENABLED=false` (repeatable).
    #[arg(long = "rtgate-env", value_name = "KEY=VALUE", value_parser = parse_env_pair)]
    pub rtgate_env: Vec<(String, String)>,
    /// The directory of the seed's Node servers to compare with (it holds
    /// `seed-ws/server.js` and `package.json`); it is only read.
    #[arg(long = "anchors", env = "RTGATE_ANCHORS", value_name = "DIR")]
    pub anchors_src: Option<PathBuf>,
    /// Writable copy of the anchors where `npm install` is run once.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/anchors"))]
    pub anchors_dir: PathBuf,
    /// Before each run, wait up to this many seconds for the machine to be quiet (under 10%
    /// of a core busy), so that other work on the cores does not disturb the figures.
    #[arg(long, default_value_t = 120.0, value_parser = parse_warmup_secs)]
    pub quiet_wait: f64,
    /// Node.js executable for seed-ws.
    #[arg(long, default_value = "node")]
    pub node: PathBuf,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    A,
    B,
    C,
    D,
    E,
}

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Scenario::A => "a",
            Scenario::B => "b",
            Scenario::C => "c",
            Scenario::D => "d",
            Scenario::E => "e",
        };
        f.write_str(s)
    }
}

/// A `ws://` URL whose host is 127.0.0.1; the only kind of target this tool accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalUrl {
    text: String,
    port: u16,
}

impl LocalUrl {
    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, self.port))
    }
}

impl fmt::Display for LocalUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Serialize for LocalUrl {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

/// Accepts `ws://127.0.0.1[:port][/path]` and nothing else.
pub fn parse_local_url(text: &str) -> Result<LocalUrl, String> {
    let uri: Uri = text.parse().map_err(|e| format!("`{text}` is not a URL: {e}"))?;
    if uri.scheme_str() != Some("ws") {
        return Err(format!("`{text}`: only ws:// URLs are supported"));
    }
    if uri.host() != Some("127.0.0.1") {
        return Err(format!("`{text}`: this tool only targets 127.0.0.1"));
    }
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err(format!("`{text}`: credentials in the URL are not supported"));
    }
    let port = uri.port_u16().unwrap_or(80);
    if port == 0 {
        return Err(format!("`{text}`: port 0 is not a server"));
    }
    Ok(LocalUrl { text: text.to_string(), port })
}

fn parse_env_pair(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("`{text}` is not KEY=VALUE")),
    }
}

fn parse_secs(text: &str, min: f64, max: f64) -> Result<f64, String> {
    let secs: f64 = text.parse().map_err(|_| format!("`{text}` is not a number of seconds"))?;
    if !(min..=max).contains(&secs) {
        return Err(format!("{secs} s is outside {min}..={max} s"));
    }
    Ok(secs)
}

fn parse_measure_secs(text: &str) -> Result<f64, String> {
    parse_secs(text, 0.1, 3600.0)
}

fn parse_warmup_secs(text: &str) -> Result<f64, String> {
    parse_secs(text, 0.0, 600.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_ws_urls_are_accepted() {
        let ok = parse_local_url("ws://127.0.0.1:3000/ws").unwrap();
        assert_eq!(ok.port(), 3000);
        assert_eq!(ok.as_str(), "ws://127.0.0.1:3000/ws");
        assert_eq!(parse_local_url("ws://127.0.0.1").unwrap().port(), 80);
        for bad in [
            "ws://localhost:3000/ws",
            "ws://10.0.0.1:3000/ws",
            "ws://127.0.0.1.example.com:3000/",
            "wss://127.0.0.1:3000/ws",
            "http://127.0.0.1:3000/",
            "ws://user@127.0.0.1:3000/",
            "ws://127.0.0.1:0/",
            "127.0.0.1:3000",
        ] {
            assert!(parse_local_url(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn env_pairs() {
        assert_eq!(parse_env_pair("A=b=c"), Ok(("A".to_string(), "b=c".to_string())));
        assert!(parse_env_pair("=x").is_err());
        assert!(parse_env_pair("A").is_err());
    }

    #[test]
    fn durations_are_bounded() {
        assert!(parse_measure_secs("5").is_ok());
        assert!(parse_measure_secs("0").is_err());
        assert!(parse_measure_secs("5000").is_err());
        assert!(parse_warmup_secs("0").is_ok());
        assert!(parse_warmup_secs("nan").is_err());
    }
}
