//! The idle scenario: open N connections that only receive their welcome, hold them, and
//! measure how much resident memory the server gained per connection.
//!
//! The memory figure is (settled VmRSS with all N open − settled VmRSS before) / N, read
//! from /proc, so it includes everything a connection costs the server: socket buffers'
//! user-space side, task and session state, allocator overhead. Held connections keep
//! being read so that the servers' heartbeat pings are answered and nobody is dropped for
//! silence while the memory settles.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::{StreamExt, stream};
use serde::Serialize;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

use crate::cli::IdleArgs;
use crate::client;
use crate::error::{Result, bail};
use crate::pacing::now_ns;
use crate::procs::{self, Rss};
use crate::report::{Table, int, num};

#[derive(Debug, Clone, Serialize)]
pub struct IdleResult {
    pub options: IdleArgs,
    /// This process's file-descriptor limit after raising it: the most it can hold.
    pub tool_fd_limit: u64,
    pub opened: u64,
    pub failed: u64,
    pub failures: BTreeMap<String, u64>,
    pub open_s: f64,
    /// Held connections the server closed before the tool let them go.
    pub dropped_while_held: u64,
    pub server_rss_before: Option<Rss>,
    pub server_rss_after: Option<Rss>,
    pub server_kb_per_connection: Option<f64>,
    pub server_fds_before: Option<u64>,
    pub server_fds_after: Option<u64>,
}

/// Descriptors this process needs besides the connections (stdio, epoll, pipes, …).
const FD_MARGIN: u64 = 64;

pub async fn run(args: &IdleArgs, tool_fd_limit: u64) -> Result<IdleResult> {
    let n = u64::from(args.connections);
    if n + FD_MARGIN > tool_fd_limit {
        bail!(
            "--connections {n} needs {} file descriptors but this process may hold {tool_fd_limit} \
             (at most {} connections); raise the hard limit (ulimit -Hn) first",
            n + FD_MARGIN,
            tool_fd_limit.saturating_sub(FD_MARGIN)
        );
    }
    let pid = args.server_pid;
    let server_rss_before = match pid {
        Some(pid) => Some(procs::settled_rss(pid).await?),
        None => None,
    };
    let server_fds_before = pid.and_then(|p| procs::fd_count(p).ok());

    let (stop_tx, stop_rx) = watch::channel(false);
    let dropped = Arc::new(AtomicU64::new(0));
    let mut holders = Vec::with_capacity(args.connections as usize);
    let mut failures: BTreeMap<String, u64> = BTreeMap::new();
    let started = now_ns();
    let open_limit = Duration::from_secs(60) + Duration::from_millis(5) * args.connections;
    let url = &args.url;
    let mut opening = stream::iter(0..args.connections)
        .map(|_| client::open(url, client::IDLE_READ_BUFFER, Duration::from_secs(10)))
        .buffer_unordered(args.connect_concurrency as usize);
    let opened_all = tokio::time::timeout(open_limit, async {
        while let Some(result) = opening.next().await {
            match result {
                Ok(ws) => holders.push(tokio::spawn(hold(ws, stop_rx.clone(), dropped.clone()))),
                Err(e) => *failures.entry(e.to_string()).or_default() += 1,
            }
        }
    })
    .await;
    drop(opening);
    if opened_all.is_err() {
        *failures.entry(format!("not all opened within {open_limit:?}")).or_default() += 1;
    }
    let open_s = (now_ns() - started) as f64 / 1e9;
    let opened = holders.len() as u64;

    let server_rss_after = match pid {
        Some(pid) => Some(procs::settled_rss(pid).await?),
        None => None,
    };
    let server_fds_after = pid.and_then(|p| procs::fd_count(p).ok());
    let server_kb_per_connection = match (server_rss_before, server_rss_after) {
        (Some(b), Some(a)) if opened > 0 => Some((a.kb as f64 - b.kb as f64) / opened as f64),
        _ => None,
    };

    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(30), futures_util::future::join_all(holders)).await;
    Ok(IdleResult {
        options: args.clone(),
        tool_fd_limit,
        opened,
        failed: failures.values().sum(),
        failures,
        open_s,
        dropped_while_held: dropped.load(Ordering::Relaxed),
        server_rss_before,
        server_rss_after,
        server_kb_per_connection,
        server_fds_before,
        server_fds_after,
    })
}

/// Keeps one connection open (answering pings) until told to close it.
async fn hold(mut ws: client::Ws, mut stop: watch::Receiver<bool>, dropped: Arc<AtomicU64>) {
    // Ends on the stop signal (or its sender going away) or when the server closes.
    loop {
        tokio::select! {
            changed = stop.changed() => {
                if changed.is_err() || *stop.borrow() {
                    let _ = client::close(&mut ws, Duration::from_secs(5)).await;
                    return;
                }
            }
            msg = ws.next() => match msg {
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => {
                    dropped.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Some(Ok(_)) => {}
            },
        }
    }
}

pub fn table(r: &IdleResult) -> String {
    let mut t = Table::new(&["idle", "value"]);
    let mut row = |k: &str, v: String| t.row(vec![k.to_string(), v]);
    row("target", r.options.url.to_string());
    row(
        "tool fd limit",
        format!(
            "{} (holds up to {} connections)",
            int(r.tool_fd_limit),
            int(r.tool_fd_limit.saturating_sub(FD_MARGIN))
        ),
    );
    row("opened / failed", format!("{} / {}", int(r.opened), int(r.failed)));
    for (why, n) in &r.failures {
        row("  failure", format!("{n} × {why}"));
    }
    row("time to open all", format!("{:.2} s", r.open_s));
    row("dropped by server while held", int(r.dropped_while_held));
    let rss = |x: &Option<Rss>| match x {
        Some(r) => format!("{} KB{}", int(r.kb), if r.settled { "" } else { " (not settled)" }),
        None => "n/a (no --server-pid)".to_string(),
    };
    row("server RSS before", rss(&r.server_rss_before));
    row("server RSS with all open", rss(&r.server_rss_after));
    row("server KB per connection", num(r.server_kb_per_connection, 2));
    let fds = |x: Option<u64>| x.map_or("n/a".to_string(), int);
    row("server fds before / after", format!("{} / {}", fds(r.server_fds_before), fds(r.server_fds_after)));
    t.render()
}
