//! The machine's own latency floor: how often, and for how long, a thread that never
//! sleeps is kept from running.
//!
//! One thread per core, each pinned to its core, reads the clock in a tight loop and
//! records every gap between two reads. With nothing else running, a gap is time the core
//! was taken away: an interrupt, or, on a VM, the hypervisor descheduling the vCPU. No
//! server can deliver a message faster than the cores it runs on, so a latency target
//! below the length of these stalls is only measurable if they touch fewer deliveries than
//! the percentile leaves out (1% for p99). `compare` runs the probe before and after its
//! scenarios so that every set of figures carries the floor it was measured on. Bounded
//! by `seconds`; it needs the machine to itself (it busies every core it probes).

use std::time::Duration;

use serde::Serialize;

use crate::error::{BenchError, Result};
use crate::pacing::now_ns;
use crate::report::{Table, int, num};

/// Gaps shorter than this are the loop itself (a clock read, a timer tick).
const NOTICE_NS: u64 = 100_000;

#[derive(Debug, Clone, Default, Serialize)]
pub struct CoreStalls {
    pub cpu: usize,
    /// Gaps over 100 µs, 300 µs and 1 ms.
    pub over_100us: u64,
    pub over_300us: u64,
    pub over_1ms: u64,
    pub max_ms: f64,
    /// Sum of the gaps over 100 µs, in % of the probe's duration.
    pub lost_percent: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct StallResult {
    pub seconds: f64,
    pub cores: Vec<CoreStalls>,
}

impl StallResult {
    /// Stalls over 1 ms per second, summed over the cores.
    pub fn over_1ms_per_s(&self) -> f64 {
        self.cores.iter().map(|c| c.over_1ms).sum::<u64>() as f64 / self.seconds
    }

    /// The mean over the cores of the time lost to stalls, in %.
    pub fn lost_percent(&self) -> f64 {
        self.cores.iter().map(|c| c.lost_percent).sum::<f64>() / self.cores.len().max(1) as f64
    }

    pub fn max_ms(&self) -> f64 {
        self.cores.iter().map(|c| c.max_ms).fold(0.0, f64::max)
    }

    /// One line for all cores.
    pub fn brief(&self) -> String {
        format!(
            "stalls > 1 ms: {:.1}/s over all cores, longest {:.3} ms, time lost to stalls > 100 µs: {:.2}% per core",
            self.over_1ms_per_s(),
            self.max_ms(),
            self.lost_percent()
        )
    }
}

/// Spins on `cpus` cores (all of them when `None`) for `seconds`.
pub async fn run(seconds: f64, cpus: Option<usize>) -> Result<StallResult> {
    let online = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cpus = cpus.unwrap_or(online).clamp(1, online);
    let limit = Duration::from_secs_f64(seconds);
    tokio::task::spawn_blocking(move || {
        let threads: Vec<_> = (0..cpus).map(|cpu| std::thread::spawn(move || probe(cpu, limit))).collect();
        let cores = threads
            .into_iter()
            .map(|t| t.join().map_err(|_| BenchError::msg("a stall probe thread panicked"))?)
            .collect::<Result<Vec<_>>>()?;
        Ok(StallResult { seconds: limit.as_secs_f64(), cores })
    })
    .await
    .map_err(|e| BenchError::msg(format!("stall probe: {e}")))?
}

fn probe(cpu: usize, limit: Duration) -> Result<CoreStalls> {
    pin_to(cpu)?;
    let limit_ns = limit.as_nanos() as u64;
    let start = now_ns();
    let (mut prev, mut lost_ns) = (start, 0u64);
    let mut out = CoreStalls { cpu, ..CoreStalls::default() };
    let mut max_ns = 0;
    while prev - start < limit_ns {
        let t = now_ns();
        let gap = t - prev;
        prev = t;
        if gap > NOTICE_NS {
            out.over_100us += 1;
            out.over_300us += u64::from(gap > 300_000);
            out.over_1ms += u64::from(gap > 1_000_000);
            lost_ns += gap;
            max_ns = max_ns.max(gap);
        }
    }
    out.max_ms = max_ns as f64 / 1e6;
    out.lost_percent = lost_ns as f64 * 100.0 / (prev - start) as f64;
    Ok(out)
}

fn pin_to(cpu: usize) -> Result<()> {
    // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET and sched_setaffinity only
    // read and write that local struct (0 = the calling thread).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(BenchError::msg(format!("pinning to CPU {cpu}: {}", std::io::Error::last_os_error())));
        }
    }
    Ok(())
}

pub fn table(r: &StallResult) -> String {
    let mut t = Table::new(&["core", "stalls > 100 µs", "> 300 µs", "> 1 ms", "longest ms", "time lost %"]);
    for c in &r.cores {
        t.row(vec![
            c.cpu.to_string(),
            int(c.over_100us),
            int(c.over_300us),
            int(c.over_1ms),
            num(Some(c.max_ms), 3),
            num(Some(c.lost_percent), 3),
        ]);
    }
    format!("{}\n{} s with every probed core busy", t.render(), r.seconds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aggregates_over_cores() {
        let core = |cpu, over_1ms, max_ms, lost_percent| CoreStalls {
            cpu,
            over_1ms,
            max_ms,
            lost_percent,
            ..Default::default()
        };
        let r = StallResult { seconds: 2.0, cores: vec![core(0, 3, 4.5, 0.5), core(1, 1, 1.5, 0.1)] };
        assert_eq!(r.over_1ms_per_s(), 2.0);
        assert!((r.lost_percent() - 0.3).abs() < 1e-9);
        assert_eq!(r.max_ms(), 4.5);
    }

    #[test]
    fn a_short_probe_accounts_for_its_duration() {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let r = rt.block_on(run(0.05, Some(1))).unwrap();
        assert_eq!(r.cores.len(), 1);
        assert_eq!(r.cores[0].cpu, 0);
        let c = &r.cores[0];
        assert!(c.over_100us >= c.over_300us && c.over_300us >= c.over_1ms);
        assert!((0.0..=100.0).contains(&c.lost_percent));
    }
}
