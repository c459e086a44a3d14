//! The churn scenario: many short-lived clients (connect → welcome → join_room →
//! room_joined → leave_room → close), a bounded number at a time, then checks that the
//! server gave everything back.
//!
//! Leaks show up only after many cycles, so the checks compare the server before and
//! after: resident memory back within 5% of its start (after it settles), no more open
//! file descriptors than before, and, for rtgate, `/healthz` counting as many connections
//! as at the start. Each worker uses its own room, so every cycle also creates and drops
//! a room, which is the other structure that could leak.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::cli::{ChurnArgs, LocalUrl};
use crate::client;
use crate::error::{Context, Result};
use crate::pacing::{now_ns, secs_to_ns};
use crate::procs::{self, Rss};
use crate::report::{Table, int, num};
use crate::stats::{LatencySummary, new_histogram};
use crate::wire::Marker;

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: String,
    pub pass: bool,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChurnResult {
    pub options: ChurnArgs,
    /// Cycles run before the baseline was taken (not counted below).
    pub warmup_cycles: u64,
    pub cycles_ok: u64,
    pub cycles_failed: u64,
    /// Cycles not started because `--max-seconds` ran out.
    pub cycles_skipped: u64,
    pub failures: BTreeMap<String, u64>,
    pub elapsed_s: f64,
    pub cycles_per_s: f64,
    /// Time for one whole cycle, connect to closed.
    pub cycle_latency: LatencySummary,
    pub server_rss_before: Option<Rss>,
    pub server_rss_after: Option<Rss>,
    pub server_fds_before: Option<u64>,
    pub server_fds_after: Option<u64>,
    pub healthz_connections_before: Option<u64>,
    pub healthz_connections_after: Option<u64>,
    pub checks: Vec<Check>,
    pub pass: bool,
}

const STEP_LIMIT: Duration = Duration::from_secs(5);

pub async fn run(args: &ChurnArgs) -> Result<ChurnResult> {
    let pid = args.server_pid;
    let port = args.url.port();
    let marker = Marker::random();
    let deadline = now_ns() + secs_to_ns(args.max_seconds);

    // Warm-up: the first connections of a fresh process grow per-thread allocator caches
    // and buffer pools once; that is not a leak, and measuring from before it would call
    // it one. The baseline is taken after it.
    let warmup =
        run_cycles(&args.url, &marker, args.warmup_cycles.min(args.cycles), args.concurrency, deadline).await?;
    if warmup.failures.values().sum::<u64>() > 0 {
        return Err(crate::error::BenchError::msg(format!("warm-up cycles failed: {:?}", warmup.failures)));
    }
    let server_rss_before = match pid {
        Some(pid) => Some(procs::settled_rss(pid).await?),
        None => None,
    };
    let server_fds_before = pid.and_then(|p| procs::fd_count(p).ok());
    // seed-ws has no /healthz; its absence is reported, not an error.
    let healthz_connections_before = procs::healthz_connections(port).await.ok();

    let started = now_ns();
    let Cycles { ok: cycles_ok, latency, failures } =
        run_cycles(&args.url, &marker, args.cycles, args.concurrency, deadline).await?;
    let elapsed_s = (now_ns() - started) as f64 / 1e9;
    let cycles_failed: u64 = failures.values().sum();
    let cycles_skipped = args.cycles.saturating_sub(cycles_ok + cycles_failed);

    // The server finishes closing sessions asynchronously; give /healthz a bounded
    // moment to come back to its start value before reading memory.
    let mut healthz_connections_after = procs::healthz_connections(port).await.ok();
    if let Some(start) = healthz_connections_before {
        for _ in 0..50 {
            if healthz_connections_after == Some(start) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            healthz_connections_after = procs::healthz_connections(port).await.ok();
        }
    }
    let server_rss_after = match pid {
        Some(pid) => Some(procs::settled_rss(pid).await?),
        None => None,
    };
    let server_fds_after = pid.and_then(|p| procs::fd_count(p).ok());

    let mut checks = vec![Check {
        name: "every cycle completed".to_string(),
        pass: cycles_ok == args.cycles,
        detail: format!("{cycles_ok} of {} ({cycles_failed} failed, {cycles_skipped} not started)", args.cycles),
    }];
    if let (Some(b), Some(a)) = (server_rss_before, server_rss_after) {
        let change = (a.kb as f64 - b.kb as f64) / b.kb.max(1) as f64 * 100.0;
        checks.push(Check {
            name: "server RSS back within 5% of its start".to_string(),
            pass: a.kb as f64 <= b.kb as f64 * 1.05,
            detail: format!("{} KB → {} KB ({change:+.1}%)", b.kb, a.kb),
        });
    }
    if let (Some(b), Some(a)) = (server_fds_before, server_fds_after) {
        checks.push(Check {
            name: "no file descriptor leak".to_string(),
            pass: a <= b,
            detail: format!("{b} → {a} open fds"),
        });
    }
    if let Some(b) = healthz_connections_before {
        checks.push(Check {
            name: "/healthz connections back to start".to_string(),
            pass: healthz_connections_after == Some(b),
            detail: format!("{b} → {}", healthz_connections_after.map_or("n/a".to_string(), |a| a.to_string())),
        });
    }
    let pass = checks.iter().all(|c| c.pass);
    Ok(ChurnResult {
        options: args.clone(),
        warmup_cycles: warmup.ok,
        cycles_ok,
        cycles_failed,
        cycles_skipped,
        failures,
        elapsed_s,
        cycles_per_s: cycles_ok as f64 / elapsed_s,
        cycle_latency: LatencySummary::of(&latency),
        server_rss_before,
        server_rss_after,
        server_fds_before,
        server_fds_after,
        healthz_connections_before,
        healthz_connections_after,
        checks,
        pass,
    })
}

struct Cycles {
    ok: u64,
    latency: Histogram<u64>,
    failures: BTreeMap<String, u64>,
}

/// Runs `cycles` cycles, `concurrency` at a time, each worker in its own room.
async fn run_cycles(url: &LocalUrl, marker: &Marker, cycles: u64, concurrency: u32, deadline: u64) -> Result<Cycles> {
    let next = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..concurrency)
        .map(|w| {
            let room = format!("churn-{}-{w}", marker.unique_part());
            tokio::spawn(worker(url.clone(), room, cycles, next.clone(), deadline))
        })
        .collect();
    let mut out = Cycles { ok: 0, latency: new_histogram(), failures: BTreeMap::new() };
    for w in workers {
        let (ok, hist, failed) = w.await.context("a churn worker failed")?;
        out.ok += ok;
        out.latency.add(&hist).context("merging histograms")?;
        for (k, v) in failed {
            *out.failures.entry(k).or_default() += v;
        }
    }
    Ok(out)
}

/// Takes cycle numbers from the shared counter until there are none left or time is up.
async fn worker(
    url: LocalUrl,
    room: String,
    cycles: u64,
    next: Arc<AtomicU64>,
    stop_at: u64,
) -> (u64, Histogram<u64>, BTreeMap<String, u64>) {
    let mut hist = new_histogram();
    let mut failures = BTreeMap::new();
    let mut ok = 0;
    while next.fetch_add(1, Ordering::Relaxed) < cycles && now_ns() < stop_at {
        let t0 = now_ns();
        match cycle(&url, &room).await {
            Ok(()) => {
                ok += 1;
                hist.saturating_record((now_ns() - t0).max(1));
            }
            Err(step) => *failures.entry(step).or_default() += 1,
        }
    }
    (ok, hist, failures)
}

/// One client lifetime; the error names the step that failed.
async fn cycle(url: &LocalUrl, room: &str) -> std::result::Result<(), String> {
    let mut ws = client::open(url, client::IDLE_READ_BUFFER, STEP_LIMIT).await.map_err(|e| format!("open: {e}"))?;
    client::join(&mut ws, room, STEP_LIMIT).await.map_err(|e| format!("join: {e}"))?;
    client::leave(&mut ws, room).await.map_err(|e| format!("leave: {e}"))?;
    client::close(&mut ws, STEP_LIMIT).await.map_err(|e| format!("close: {e}"))
}

pub fn table(r: &ChurnResult) -> String {
    let mut t = Table::new(&["churn", "value"]);
    let mut row = |k: &str, v: String| t.row(vec![k.to_string(), v]);
    row("target", r.options.url.to_string());
    row(
        "cycles ok / failed / skipped",
        format!("{} / {} / {}", int(r.cycles_ok), int(r.cycles_failed), int(r.cycles_skipped)),
    );
    for (why, n) in &r.failures {
        row("  failure", format!("{n} × {why}"));
    }
    row("concurrency / warm-up cycles", format!("{} / {}", r.options.concurrency, int(r.warmup_cycles)));
    row("elapsed", format!("{:.1} s ({} cycles/s)", r.elapsed_s, int(r.cycles_per_s.round() as u64)));
    let l = &r.cycle_latency;
    row(
        "cycle time p50 / p99 / max",
        format!(
            "{} / {} / {} ms",
            num(Some(l.p50_us / 1e3), 2),
            num(Some(l.p99_us / 1e3), 2),
            num(Some(l.max_us / 1e3), 2)
        ),
    );
    for c in &r.checks {
        row(&c.name, format!("{} ({})", if c.pass { "PASS" } else { "FAIL" }, c.detail));
    }
    row("result", if r.pass { "PASS" } else { "FAIL" }.to_string());
    t.render()
}
