//! Counting: which deliveries each member saw, what the publishers sent, the latency
//! histogram, and how the per-connection tallies add up into a run's accounting.
//!
//! The accounting is exact rather than sampled because "every expected delivery accounted
//! for" is the point: expected = Σ over sent messages of the members of the room; a
//! member keeps, per publisher of its room, the next sequence number it expects, so a
//! delivery is new, a duplicate (or out of order, which the servers' per-connection FIFO
//! also forbids), or proof of a gap. Nothing here allocates per delivery.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Latencies above this are clamped (and would mean the run is broken anyway).
const LATENCY_MAX_NS: u64 = 60_000_000_000;

/// Latency histogram in nanoseconds, 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    // Constant, valid bounds: this cannot fail.
    Histogram::new_with_bounds(1, LATENCY_MAX_NS, 3).expect("valid histogram bounds")
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct LatencySummary {
    pub samples: u64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    pub mean_us: f64,
    /// Share of the samples at or under the (c) and (b) targets, in %: how far a missed
    /// p99 is from being met.
    pub within_300us_percent: f64,
    pub within_500us_percent: f64,
}

impl LatencySummary {
    pub fn of(h: &Histogram<u64>) -> LatencySummary {
        if h.is_empty() {
            return LatencySummary::default();
        }
        let us = |ns: u64| ns as f64 / 1_000.0;
        LatencySummary {
            samples: h.len(),
            p50_us: us(h.value_at_quantile(0.50)),
            p90_us: us(h.value_at_quantile(0.90)),
            p99_us: us(h.value_at_quantile(0.99)),
            p999_us: us(h.value_at_quantile(0.999)),
            max_us: us(h.max()),
            mean_us: h.mean() / 1_000.0,
            within_300us_percent: h.percentile_below(300_000u64),
            within_500us_percent: h.percentile_below(500_000u64),
        }
    }
}

/// What one member has seen from each publisher of its room.
pub struct Ledger {
    next_seq: Vec<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// Not seen before; `skipped` sequence numbers were passed over on the way (lost, or
    /// still to come out of order).
    New { skipped: u64 },
    /// At or below a sequence number already seen.
    Again,
}

impl Ledger {
    pub fn new(publishers_in_room: usize) -> Ledger {
        Ledger { next_seq: vec![0; publishers_in_room] }
    }

    #[inline]
    pub fn record(&mut self, slot: usize, seq: u64) -> Option<Seen> {
        let next = self.next_seq.get_mut(slot)?;
        if seq < *next {
            return Some(Seen::Again);
        }
        let skipped = seq - *next;
        *next = seq + 1;
        Some(Seen::New { skipped })
    }
}

/// Per-connection tallies, summed over a run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Counts {
    /// Distinct deliveries of this run's messages.
    pub received: u64,
    /// Deliveries of a message already seen (or arriving out of order).
    pub duplicates: u64,
    /// Deliveries a member should never get: a publisher of another room or an unknown one.
    pub unexpected: u64,
    /// Marker found but the text after it is not something this tool sends.
    pub malformed: u64,
    /// Sequence numbers jumped over: deliveries missing at the moment they were skipped.
    pub gaps: u64,
    /// Deliveries received inside the measurement window (for deliveries/s).
    pub in_window: u64,
    /// Stop signs received.
    pub stops: u64,
    /// Connections that ended (closed by the server, or errored) before their last stop.
    pub closed_early: u64,
    /// Connections still waiting for deliveries when the drain deadline passed.
    pub timed_out: u64,
    /// Messages without the marker, by `type`.
    pub notices: BTreeMap<String, u64>,
    /// `error` frames by `code`, and transport errors by kind.
    pub errors: BTreeMap<String, u64>,
    /// The first few frames that were not what they should be (a chat message without
    /// the marker, malformed, an error), truncated, to show what the server sent.
    pub samples: Vec<String>,
}

/// Samples kept per run; enough to see a pattern, small enough for a report.
const SAMPLES_KEPT: usize = 5;

impl Counts {
    pub fn merge(&mut self, o: &Counts) {
        self.received += o.received;
        self.duplicates += o.duplicates;
        self.unexpected += o.unexpected;
        self.malformed += o.malformed;
        self.gaps += o.gaps;
        self.in_window += o.in_window;
        self.stops += o.stops;
        self.closed_early += o.closed_early;
        self.timed_out += o.timed_out;
        for (k, v) in &o.notices {
            *self.notices.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &o.errors {
            *self.errors.entry(k.clone()).or_default() += v;
        }
        for sample in &o.samples {
            if self.samples.len() < SAMPLES_KEPT {
                self.samples.push(sample.clone());
            }
        }
    }

    /// Keeps `text` (its first 300 characters) as a sample if there is room.
    pub fn sample(&mut self, text: &str) {
        if self.samples.len() < SAMPLES_KEPT {
            self.samples.push(text.chars().take(300).collect());
        }
    }

    pub fn error(&mut self, what: impl Into<String>) {
        *self.errors.entry(what.into()).or_default() += 1;
    }

    pub fn error_total(&self) -> u64 {
        self.errors.values().sum()
    }
}

/// What the publishers did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Sent {
    pub messages: u64,
    pub in_window: u64,
    /// Own messages seen coming back.
    pub echoes: u64,
    pub max_in_flight: u64,
    /// Fixed rate: sends more than 1 ms behind their scheduled time, and the worst lag.
    pub late_sends: u64,
    pub max_lag_us: f64,
    pub stop_signs: u64,
}

impl Sent {
    pub fn merge(&mut self, o: &Sent) {
        self.messages += o.messages;
        self.in_window += o.in_window;
        self.echoes += o.echoes;
        self.max_in_flight = self.max_in_flight.max(o.max_in_flight);
        self.late_sends += o.late_sends;
        self.max_lag_us = self.max_lag_us.max(o.max_lag_us);
        self.stop_signs += o.stop_signs;
    }
}

/// Expected against received, for the whole run (warmup included: every message sent is
/// owed to every member of its room).
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Accounting {
    pub expected: u64,
    pub received: u64,
    pub missing: u64,
    pub duplicates: u64,
    pub unexpected: u64,
}

impl Accounting {
    pub fn new(sent: u64, members_per_room: u64, counts: &Counts) -> Accounting {
        let expected = sent * members_per_room;
        Accounting {
            expected,
            received: counts.received,
            missing: expected.saturating_sub(counts.received),
            duplicates: counts.duplicates,
            unexpected: counts.unexpected + counts.malformed,
        }
    }

    pub fn complete(&self) -> bool {
        self.missing == 0 && self.duplicates == 0 && self.unexpected == 0 && self.received == self.expected
    }
}

/// Median of the finite values (mean of the middle two for an even count).
pub fn median(values: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    Some(if v.len() % 2 == 1 { v[mid] } else { (v[mid - 1] + v[mid]) / 2.0 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ledger_tells_new_gaps_and_repeats() {
        let mut l = Ledger::new(2);
        assert_eq!(l.record(0, 0), Some(Seen::New { skipped: 0 }));
        assert_eq!(l.record(0, 1), Some(Seen::New { skipped: 0 }));
        assert_eq!(l.record(0, 1), Some(Seen::Again));
        assert_eq!(l.record(0, 4), Some(Seen::New { skipped: 2 }));
        assert_eq!(l.record(0, 3), Some(Seen::Again));
        assert_eq!(l.record(1, 0), Some(Seen::New { skipped: 0 }));
        assert_eq!(l.record(2, 0), None);
    }

    #[test]
    fn accounting_counts_every_member_of_the_room() {
        let counts = Counts { received: 995, duplicates: 2, unexpected: 1, malformed: 1, ..Counts::default() };
        let a = Accounting::new(10, 100, &counts);
        assert_eq!(a, Accounting { expected: 1000, received: 995, missing: 5, duplicates: 2, unexpected: 2 });
        assert!(!a.complete());
        let all = Counts { received: 1000, ..Counts::default() };
        assert!(Accounting::new(10, 100, &all).complete());
    }

    #[test]
    fn counts_merge_sums_and_maps() {
        let mut a = Counts::default();
        a.error("busy");
        a.received = 3;
        let mut b = Counts::default();
        b.error("busy");
        b.error("transport: reset");
        b.received = 4;
        a.merge(&b);
        assert_eq!(a.received, 7);
        assert_eq!(a.errors["busy"], 2);
        assert_eq!(a.error_total(), 3);
    }

    #[test]
    fn latency_summary_in_microseconds() {
        let mut h = new_histogram();
        for ns in 1..=1000u64 {
            h.record(ns * 1_000).unwrap();
        }
        let s = LatencySummary::of(&h);
        assert_eq!(s.samples, 1000);
        assert!((s.p50_us - 500.0).abs() < 1.0, "{s:?}");
        assert!((s.p99_us - 990.0).abs() < 1.0, "{s:?}");
        assert!((s.max_us - 1000.0).abs() < 1.0, "{s:?}");
        assert_eq!(LatencySummary::of(&new_histogram()), LatencySummary::default());
    }

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0]), Some(2.5));
        assert_eq!(median(&[f64::NAN]), None);
        assert_eq!(median(&[]), None);
    }
}
