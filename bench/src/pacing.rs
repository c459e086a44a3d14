//! Time: the tool's single time base, and the absolute send schedule of fixed-rate runs.
//!
//! Every timestamp the tool writes into a message or reads back out of one is nanoseconds
//! since one process-wide [`Instant`], so a send time taken on one thread and a receive
//! time taken on another subtract to a latency without any clock conversion. The schedule
//! computes the due time of every message from its index alone, never by adding a period
//! to the previous send: a late wake-up delays one message but cannot shift the rest, so
//! the offered rate is exactly the requested one however the scheduler behaves.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// The time base: CLOCK_MONOTONIC at start-up (what `Instant` reads too), kept as raw
/// nanoseconds so that a due time can be handed to a timerfd without conversion.
static EPOCH: OnceLock<(Instant, u64)> = OnceLock::new();

/// Fixes the time base; called first thing in `main` so that it precedes every timestamp.
pub fn init() {
    epoch();
}

fn epoch() -> (Instant, u64) {
    *EPOCH.get_or_init(|| (Instant::now(), monotonic_ns()))
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime only writes the struct; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Nanoseconds since the tool started (u64 lasts 584 years).
#[inline]
pub fn now_ns() -> u64 {
    monotonic_ns().saturating_sub(epoch().1)
}

/// The tokio instant for a time-base value, for `sleep_until` (millisecond precision:
/// deadlines and window edges, not send times).
pub fn instant_at(ns: u64) -> tokio::time::Instant {
    tokio::time::Instant::from_std(epoch().0 + Duration::from_nanos(ns))
}

/// A one-shot timer with nanosecond precision for fixed-rate sends.
///
/// tokio's timers round up to the next millisecond, which at 2 000 msg/s would bunch the
/// sends of several publishers into one burst (and make every send up to 1 ms late); a
/// timerfd armed at an absolute CLOCK_MONOTONIC time fires on time and is waited on
/// through the same reactor as the sockets.
pub struct Alarm {
    fd: AsyncFd<OwnedFd>,
}

impl Alarm {
    pub fn new() -> io::Result<Alarm> {
        // SAFETY: plain syscall; the returned descriptor is owned below.
        let raw = unsafe { libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_NONBLOCK | libc::TFD_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: the OwnedFd is moved into the AsyncFd and so stays open, and is the same
        // descriptor, for as long as the registration lives.
        let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
            .map_err(|e| io::Error::other(e.to_string()))?;
        Ok(Alarm { fd })
    }

    /// Arms the alarm for time-base instant `at_ns` (a time already past fires at once).
    pub fn set(&self, at_ns: u64) -> io::Result<()> {
        // Never zero (that would disarm): the monotonic clock at start-up is past zero.
        let abs = epoch().1 + at_ns;
        let spec = libc::itimerspec {
            it_interval: libc::timespec { tv_sec: 0, tv_nsec: 0 },
            it_value: libc::timespec { tv_sec: (abs / 1_000_000_000) as _, tv_nsec: (abs % 1_000_000_000) as _ },
        };
        // SAFETY: valid descriptor and struct; the old value is not requested.
        let rc =
            unsafe { libc::timerfd_settime(self.fd.as_raw_fd(), libc::TFD_TIMER_ABSTIME, &spec, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Completes when the alarm has fired.
    pub async fn wait(&self) -> io::Result<()> {
        loop {
            let mut guard = self.fd.readable().await?;
            let mut expirations = [0u8; 8];
            // SAFETY: reads at most 8 bytes into a local 8-byte buffer.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), expirations.as_mut_ptr().cast(), 8) };
            if n == 8 {
                return Ok(());
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::WouldBlock {
                return Err(err);
            }
            guard.clear_ready();
        }
    }
}

pub fn secs_to_ns(secs: f64) -> u64 {
    (secs * 1e9).round() as u64
}

/// When each publisher sends each message, at a fixed total rate.
///
/// Messages are numbered globally `n = publisher + k × publishers` (k-th message of a
/// publisher), and message `n` is due at `start + n / rate`: the publishers take turns, so
/// the total stream is evenly spaced instead of arriving in bursts of `publishers` at once.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    start_ns: u64,
    publishers: u64,
    rate: u64,
}

impl Schedule {
    /// `rate` is the total over all publishers, in messages per second (> 0).
    pub fn new(start_ns: u64, publishers: u32, rate: u64) -> Schedule {
        Schedule { start_ns, publishers: u64::from(publishers.max(1)), rate: rate.max(1) }
    }

    /// Due time of publisher `publisher`'s `k`-th message.
    pub fn due_ns(&self, publisher: u32, k: u64) -> u64 {
        let n = u128::from(publisher) + u128::from(k) * u128::from(self.publishers);
        // u128: n × 1e9 overflows u64 after ~18 s at 1 M msg/s; exact integer arithmetic
        // also keeps the k-th due time free of accumulated rounding.
        self.start_ns + (n * 1_000_000_000 / u128::from(self.rate)) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_is_absolute_and_does_not_drift() {
        // 3 msg/s from one publisher: 1e9/3 is not an integer, yet message 3 000 is due
        // exactly 1 000 s after the start.
        let s = Schedule::new(5, 1, 3);
        assert_eq!(s.due_ns(0, 0), 5);
        assert_eq!(s.due_ns(0, 1), 5 + 333_333_333);
        assert_eq!(s.due_ns(0, 3_000), 5 + 1_000_000_000_000);
    }

    #[test]
    fn publishers_are_spread_evenly() {
        // 100 publishers at 2 000 msg/s in total: 20 msg/s each, one message every 0.5 ms
        // overall, publisher i offset by i × 0.5 ms.
        let s = Schedule::new(0, 100, 2_000);
        assert_eq!(s.due_ns(0, 0), 0);
        assert_eq!(s.due_ns(1, 0), 500_000);
        assert_eq!(s.due_ns(99, 0), 49_500_000);
        assert_eq!(s.due_ns(0, 1), 50_000_000);
        let mut all: Vec<u64> = (0..100).flat_map(|p| (0..20).map(move |k| s.due_ns(p, k))).collect();
        all.sort_unstable();
        for (n, t) in all.iter().enumerate() {
            assert_eq!(*t, n as u64 * 500_000);
        }
    }

    #[test]
    fn per_publisher_rate_is_total_over_publishers() {
        let s = Schedule::new(0, 4, 200);
        let per_second = (0..).take_while(|&k| s.due_ns(2, k) < 1_000_000_000).count();
        assert_eq!(per_second, 50);
    }

    #[tokio::test]
    async fn alarms_fire_at_their_time_not_on_a_millisecond_tick() {
        init();
        let alarm = Alarm::new().unwrap();
        for _ in 0..5 {
            let at = now_ns() + 300_000;
            alarm.set(at).unwrap();
            alarm.wait().await.unwrap();
            let late = now_ns() - at;
            // Fired, and not rounded up to the next millisecond (generous for a busy CI box).
            assert!(now_ns() >= at);
            assert!(late < 5_000_000, "{late} ns late");
        }
        alarm.set(0).unwrap();
        alarm.wait().await.unwrap();
    }

    #[test]
    fn time_base_is_monotonic() {
        init();
        let a = now_ns();
        let b = now_ns();
        assert!(b >= a);
        assert_eq!(secs_to_ns(1.5), 1_500_000_000);
    }
}
