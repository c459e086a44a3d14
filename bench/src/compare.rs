//! The comparison: rtgate against the seed-ws Node server, same tool, same machine, same
//! session, scenarios (a)–(e), and a table of ratios against the targets.
//!
//! Each scenario gets a freshly started server, so that memory figures start from a
//! clean process and one scenario's leftovers cannot skew the next; servers alternate
//! (rtgate, seed-ws, rtgate, …) so that slow drift of the machine hits both alike, and
//! with several rounds the medians are compared. Max-rate figures drift ~15% between
//! sessions on this machine, which is why only ratios within one run mean anything.

use std::path::Path;
use std::time::Duration;

use serde::Serialize;

use crate::churn::{self, ChurnResult};
use crate::cli::{ChurnArgs, CompareArgs, FanoutArgs, IdleArgs, LocalUrl, Scenario};
use crate::error::{Context, Result};
use crate::fanout::{self, FanoutResult};
use crate::idle::{self, IdleResult};
use crate::procs::{self, Server, ServerKind};
use crate::report::{Table, int, num};
use crate::stalls::{self, StallResult};
use crate::stats::median;

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Fanout(Box<FanoutResult>),
    Idle(IdleResult),
    Churn(Box<ChurnResult>),
    Failed(String),
}

#[derive(Debug, Clone, Serialize)]
pub struct RunRecord {
    pub round: u32,
    pub server: ServerKind,
    pub scenario: Scenario,
    /// Whole-machine CPU (% of one core) in the second before the server was started.
    pub machine_busy_before_percent: f64,
    pub outcome: Outcome,
}

#[derive(Debug, Clone, Serialize)]
pub struct Line {
    pub line: String,
    pub rtgate: Option<f64>,
    pub seed_ws: Option<f64>,
    /// >1 means rtgate is better.
    pub ratio: Option<f64>,
    pub target: String,
    pub met: Option<bool>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CompareResult {
    pub options: CompareArgs,
    pub node_version: String,
    /// The stall probe before the first scenario and after the last (`None`: skipped).
    pub stalls_before: Option<StallResult>,
    pub stalls_after: Option<StallResult>,
    pub runs: Vec<RunRecord>,
    pub summary: Vec<Line>,
}

/// Below this (% of one core, everything on the machine) a run may start.
const QUIET_PERCENT: f64 = 10.0;

fn fanout_args(s: Scenario, url: &LocalUrl, pid: u32, o: &CompareArgs) -> FanoutArgs {
    let (rooms, members, publishers, rate) = match s {
        Scenario::A => (1, 100, 1, 0),
        Scenario::B => (1, 100, 1, 200),
        _ => (100, 10, 100, 2_000),
    };
    FanoutArgs {
        url: url.clone(),
        rooms,
        members,
        publishers,
        rate,
        in_flight: 16,
        duration: o.duration,
        warmup: o.warmup,
        size: 100,
        server_pid: Some(pid),
        threads: o.threads,
        connect_concurrency: 64,
        drain: 5.0,
        read_buffer: 16 * 1024,
    }
}

pub async fn run(o: &CompareArgs, fd_limit: u64) -> Result<CompareResult> {
    if !o.rtgate_bin.is_file() {
        return Err(crate::error::BenchError::msg(format!(
            "{} not found: run `cargo build --release` first",
            o.rtgate_bin.display()
        )));
    }
    let Some(anchors) = &o.anchors_src else {
        return Err(crate::error::BenchError::msg(
            "compare runs rtgate beside the seed's Node server, and needs to know where that is: \
             pass --anchors DIR or set RTGATE_ANCHORS to the directory holding seed-ws/server.js \
             (on the project's machines, ../shared/anchors next to the checkout)"
                .to_string(),
        ));
    };
    let server_js = procs::prepare_anchors(anchors, &o.anchors_dir).await?;
    let node_version = tokio::process::Command::new(&o.node)
        .arg("--version")
        .output()
        .await
        .with_context(|| format!("running {} --version (is Node.js installed?)", o.node.display()))?;
    let node_version = String::from_utf8_lossy(&node_version.stdout).trim().to_string();

    let stalls_before = stall_probe(o, "before").await?;
    let mut runs = Vec::new();
    for round in 1..=o.rounds {
        for kind in [ServerKind::Rtgate, ServerKind::SeedWs] {
            for &scenario in &o.scenarios {
                if scenario == Scenario::E && kind == ServerKind::SeedWs {
                    continue;
                }
                let (quiet, busy) = procs::wait_for_quiet(Duration::from_secs_f64(o.quiet_wait), QUIET_PERCENT).await;
                if !quiet {
                    eprintln!("  warning: the machine is still {busy:.0}% busy; measuring anyway");
                }
                eprintln!("round {round}/{}: {} scenario ({scenario})…", o.rounds, kind.name());
                let outcome = match one(kind, scenario, o, &server_js, fd_limit).await {
                    Ok(outcome) => outcome,
                    Err(e) => {
                        eprintln!("  failed: {e}");
                        Outcome::Failed(e.to_string())
                    }
                };
                eprintln!("  {}", brief(&outcome));
                runs.push(RunRecord { round, server: kind, scenario, machine_busy_before_percent: busy, outcome });
            }
        }
    }
    let stalls_after = stall_probe(o, "after").await?;
    let summary = summarize(&runs, &o.scenarios);
    Ok(CompareResult { options: o.clone(), node_version, stalls_before, stalls_after, runs, summary })
}

/// The machine's floor, measured on a quiet machine with no server running.
async fn stall_probe(o: &CompareArgs, when: &str) -> Result<Option<StallResult>> {
    if o.stall_probe == 0.0 {
        return Ok(None);
    }
    let (quiet, busy) = procs::wait_for_quiet(Duration::from_secs_f64(o.quiet_wait), QUIET_PERCENT).await;
    if !quiet {
        eprintln!("  warning: the machine is still {busy:.0}% busy; probing anyway");
    }
    eprintln!("stall probe ({when}): every core busy for {} s…", o.stall_probe);
    let r = stalls::run(o.stall_probe, None).await?;
    eprintln!("  {}", r.brief());
    Ok(Some(r))
}

/// Starts a fresh server, runs one scenario against it, stops it.
async fn one(kind: ServerKind, s: Scenario, o: &CompareArgs, server_js: &Path, fd_limit: u64) -> Result<Outcome> {
    let server = match kind {
        ServerKind::Rtgate => Server::start_rtgate(&o.rtgate_bin, &o.rtgate_dir, &o.rtgate_env).await?,
        ServerKind::SeedWs => Server::start_seed(&o.node, server_js).await?,
    };
    let outcome = match s {
        Scenario::A | Scenario::B | Scenario::C => {
            fanout::run(&fanout_args(s, &server.url, server.pid, o)).await.map(|r| Outcome::Fanout(Box::new(r)))
        }
        Scenario::D => {
            let args = IdleArgs {
                url: server.url.clone(),
                connections: o.idle_connections,
                server_pid: Some(server.pid),
                connect_concurrency: 128,
            };
            idle::run(&args, fd_limit).await.map(Outcome::Idle)
        }
        Scenario::E => {
            let args = ChurnArgs {
                url: server.url.clone(),
                cycles: o.churn_cycles,
                concurrency: o.churn_concurrency,
                server_pid: Some(server.pid),
                max_seconds: 600.0,
                warmup_cycles: 20_000,
            };
            churn::run(&args).await.map(|r| Outcome::Churn(Box::new(r)))
        }
    };
    let outcome = outcome.map_err(|e| {
        crate::error::BenchError::msg(format!("{e}\n{} output:\n{}", server.kind.name(), server.recent_output()))
    });
    server.stop().await;
    outcome
}

fn brief(o: &Outcome) -> String {
    match o {
        Outcome::Fanout(r) => format!(
            "{} deliveries/s, p50 {:.3} ms, p99 {:.3} ms, missing {}, dup {}, errors {}, tool {} µs/delivery, server {} µs/delivery, other processes {}% of a core",
            int(r.deliveries_per_s.round() as u64),
            r.latency.p50_us / 1e3,
            r.latency.p99_us / 1e3,
            r.accounting.missing,
            r.accounting.duplicates,
            r.counts.error_total(),
            num(Some(r.tool_cpu_us_per_delivery), 3),
            num(r.server_cpu_us_per_delivery, 3),
            num(r.other_cpu_percent, 0),
        ),
        Outcome::Idle(r) => format!(
            "{} open ({} failed), {} KB per connection",
            int(r.opened),
            r.failed,
            num(r.server_kb_per_connection, 2)
        ),
        Outcome::Churn(r) => format!(
            "{} cycles ok, {} failed, {} cycles/s, {}",
            int(r.cycles_ok),
            r.cycles_failed,
            int(r.cycles_per_s.round() as u64),
            if r.pass { "PASS" } else { "FAIL" }
        ),
        Outcome::Failed(e) => format!("FAILED: {e}"),
    }
}

/// The median over rounds of one figure of one scenario on one server.
fn med(runs: &[RunRecord], kind: ServerKind, s: Scenario, f: impl Fn(&Outcome) -> Option<f64>) -> Option<f64> {
    let values: Vec<f64> =
        runs.iter().filter(|r| r.server == kind && r.scenario == s).filter_map(|r| f(&r.outcome)).collect();
    median(&values)
}

fn fan(f: impl Fn(&FanoutResult) -> f64) -> impl Fn(&Outcome) -> Option<f64> {
    move |o| match o {
        Outcome::Fanout(r) => Some(f(r)),
        _ => None,
    }
}

fn summarize(runs: &[RunRecord], scenarios: &[Scenario]) -> Vec<Line> {
    enum Better {
        Higher,
        Lower,
    }
    let mut lines = Vec::new();
    let mut add = |line: &str,
                   s: Scenario,
                   f: &dyn Fn(&Outcome) -> Option<f64>,
                   better: Better,
                   target: &str,
                   met: &dyn Fn(Option<f64>, Option<f64>) -> Option<bool>| {
        if !scenarios.contains(&s) {
            return;
        }
        let rt = med(runs, ServerKind::Rtgate, s, f);
        let seed = med(runs, ServerKind::SeedWs, s, f);
        let ratio = match (rt, seed, better) {
            (Some(r), Some(s), Better::Higher) if s > 0.0 => Some(r / s),
            (Some(r), Some(s), Better::Lower) if r > 0.0 => Some(s / r),
            _ => None,
        };
        lines.push(Line {
            line: line.to_string(),
            rtgate: rt,
            seed_ws: seed,
            ratio,
            target: target.to_string(),
            met: met(rt, ratio),
        });
    };
    let at_least_ratio = |k: f64| move |_: Option<f64>, ratio: Option<f64>| ratio.map(|r| r >= k);
    let at_most = |k: f64| move |rt: Option<f64>, _: Option<f64>| rt.map(|v| v <= k);
    let none = |_: Option<f64>, _: Option<f64>| None;
    let missing = |o: &Outcome| match o {
        Outcome::Fanout(r) => Some((r.accounting.missing + r.accounting.duplicates + r.accounting.unexpected) as f64),
        _ => None,
    };
    let errors = |o: &Outcome| match o {
        Outcome::Fanout(r) => Some(r.counts.error_total() as f64),
        _ => None,
    };
    let zero = |rt: Option<f64>, _: Option<f64>| rt.map(|v| v == 0.0);

    add(
        "(a) deliveries/s",
        Scenario::A,
        &fan(|r| r.deliveries_per_s),
        Better::Higher,
        "rtgate ≥ 5× seed-ws",
        &at_least_ratio(5.0),
    );
    add(
        "(a) server CPU µs/delivery",
        Scenario::A,
        &fan(|r| r.server_cpu_us_per_delivery.unwrap_or(f64::NAN)),
        Better::Lower,
        "rtgate ≤ 1 µs",
        &at_most(1.0),
    );
    add(
        "(a) tool CPU µs/delivery",
        Scenario::A,
        &fan(|r| r.tool_cpu_us_per_delivery),
        Better::Lower,
        "tool < 1 µs",
        &at_most(1.0),
    );
    add("(a) lost/dup/unexpected", Scenario::A, &missing, Better::Lower, "0", &zero);
    add("(b) p50 latency ms", Scenario::B, &fan(|r| r.latency.p50_us / 1e3), Better::Lower, "-", &none);
    add(
        "(b) p99 latency ms",
        Scenario::B,
        &fan(|r| r.latency.p99_us / 1e3),
        Better::Lower,
        "rtgate ≤ 0.5 ms",
        &at_most(0.5),
    );
    add(
        "(b) % of deliveries ≤ 0.5 ms",
        Scenario::B,
        &fan(|r| r.latency.within_500us_percent),
        Better::Higher,
        "-",
        &none,
    );
    add("(b) lost/dup/unexpected", Scenario::B, &missing, Better::Lower, "0", &zero);
    add("(c) p50 latency ms", Scenario::C, &fan(|r| r.latency.p50_us / 1e3), Better::Lower, "-", &none);
    add(
        "(c) p99 latency ms",
        Scenario::C,
        &fan(|r| r.latency.p99_us / 1e3),
        Better::Lower,
        "rtgate ≤ 0.3 ms",
        &at_most(0.3),
    );
    add(
        "(c) % of deliveries ≤ 0.3 ms",
        Scenario::C,
        &fan(|r| r.latency.within_300us_percent),
        Better::Higher,
        "-",
        &none,
    );
    add("(c) lost/dup/unexpected", Scenario::C, &missing, Better::Lower, "0", &zero);
    for s in [Scenario::A, Scenario::B, Scenario::C] {
        if scenarios.contains(&s) {
            add(&format!("({s}) error frames/transport errors"), s, &errors, Better::Lower, "0", &zero);
        }
    }
    let kb = |o: &Outcome| match o {
        Outcome::Idle(r) => r.server_kb_per_connection,
        _ => None,
    };
    add("(d) server KB per idle connection", Scenario::D, &kb, Better::Lower, "rtgate ≤ 4 KB", &at_most(4.0));
    let churn_pass = |o: &Outcome| match o {
        Outcome::Churn(r) => Some(if r.pass { 1.0 } else { 0.0 }),
        Outcome::Failed(_) => Some(0.0),
        _ => None,
    };
    add(
        "(e) churn (1 = pass)",
        Scenario::E,
        &churn_pass,
        Better::Higher,
        "RSS ±5%, no fd leak, /healthz back",
        &|rt: Option<f64>, _: Option<f64>| rt.map(|v| v == 1.0),
    );
    // Not a figure of either server: whether anything else was using the cores.
    let other = |kind: ServerKind| {
        runs.iter()
            .filter(|r| r.server == kind)
            .filter_map(|r| match &r.outcome {
                Outcome::Fanout(f) => f.other_cpu_percent,
                _ => None,
            })
            .reduce(f64::max)
    };
    let (rt, seed) = (other(ServerKind::Rtgate), other(ServerKind::SeedWs));
    if rt.is_some() || seed.is_some() {
        lines.push(Line {
            line: "max CPU % of other processes (a–c)".to_string(),
            rtgate: rt,
            seed_ws: seed,
            ratio: None,
            target: "< 10 (quiet machine)".to_string(),
            met: Some(rt.unwrap_or(0.0) < 10.0 && seed.unwrap_or(0.0) < 10.0),
        });
    }
    lines
}

pub fn table(r: &CompareResult) -> String {
    let mut t = Table::new(&["line (medians)", "rtgate", "seed-ws", "ratio (>1: rtgate better)", "target", "met"]);
    for l in &r.summary {
        let digits =
            if l.line.contains("deliveries/s") || l.line.contains("lost") || l.line.contains("errors") { 0 } else { 3 };
        let fmt = |v: Option<f64>| match v {
            Some(x) if digits == 0 && x.is_finite() => int(x.round() as u64),
            other => num(other, digits),
        };
        t.row(vec![
            l.line.clone(),
            fmt(l.rtgate),
            fmt(l.seed_ws),
            l.ratio.map_or("-".to_string(), |x| format!("{x:.2}×")),
            l.target.clone(),
            match l.met {
                Some(true) => "yes".to_string(),
                Some(false) => "NO".to_string(),
                None => "-".to_string(),
            },
        ]);
    }
    let mut out = t.render();
    for (when, probe) in [("before", &r.stalls_before), ("after", &r.stalls_after)] {
        if let Some(p) = probe {
            out.push_str(&format!("\nmachine floor ({when}, stall probe): {}", p.brief()));
        }
    }
    out
}
