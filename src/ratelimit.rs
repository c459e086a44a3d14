//! Rate limits: per-user event buckets, and per-IP connection caps.
//!
//! Events are counted per user (the token's subject, so several tabs share one budget;
//! per connection for guests) in token buckets (governor's GCRA, lock-free per key), one
//! bucket per class of event: chat-like events share a "default" bucket at the seed's 100
//! per minute, typing gets a more generous one. A refused event costs the sender an error
//! and nothing else; a client that keeps hammering is disconnected. Per IP, both the
//! number of open connections and the rate of new ones are capped before any upgrade.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use dashmap::DashMap;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota};

use crate::config::{Bucket, LimitSettings, RateLimitSettings};

/// Whose event budget a connection spends.
pub enum Budget {
    /// A user's, shared by all their connections (keyed by the token's subject).
    User(Arc<str>),
    /// A guest connection's own, created at its first event and gone with it: keying
    /// guests in the shared tables would leave an entry per connection ever made.
    Guest(OnceLock<Box<[DefaultDirectRateLimiter]>>),
}

impl Budget {
    pub fn guest() -> Budget {
        Budget::Guest(OnceLock::new())
    }
}

pub struct EventLimits {
    enabled: bool,
    quotas: Vec<Quota>,
    /// Per bucket, users' state, in the order of `quotas`.
    users: Vec<DefaultKeyedRateLimiter<Arc<str>>>,
    /// Event type → bucket index.
    events: HashMap<String, usize>,
    default: usize,
    pub disconnect_after: u32,
    clock: DefaultClock,
}

fn quota(b: &Bucket) -> Quota {
    // Validated at start-up to be at least 1.
    let one = NonZeroU32::MIN;
    Quota::per_minute(NonZeroU32::new(b.per_minute).unwrap_or(one)).allow_burst(NonZeroU32::new(b.burst).unwrap_or(one))
}

impl EventLimits {
    pub fn new(settings: &RateLimitSettings) -> EventLimits {
        let names: Vec<&String> = settings.buckets.keys().collect();
        let quotas: Vec<Quota> = settings.buckets.values().map(quota).collect();
        let index = |name: &str| names.iter().position(|n| n.as_str() == name);
        EventLimits {
            enabled: settings.enabled,
            users: quotas.iter().map(|q| DefaultKeyedRateLimiter::keyed(*q)).collect(),
            events: settings.events.iter().filter_map(|(kind, bucket)| Some((kind.clone(), index(bucket)?))).collect(),
            // Validated at start-up to exist.
            default: index("default").unwrap_or(0),
            quotas,
            disconnect_after: settings.disconnect_after,
            clock: DefaultClock::default(),
        }
    }

    /// Counts one event of type `kind` against `budget`; `Err(wait)` if it is over the limit.
    pub fn check(&self, budget: &Budget, kind: &str) -> Result<(), Duration> {
        if !self.enabled || self.quotas.is_empty() {
            return Ok(());
        }
        let bucket = self.events.get(kind).copied().unwrap_or(self.default);
        let outcome = match budget {
            Budget::User(key) => self.users[bucket].check_key(key),
            Budget::Guest(own) => own
                .get_or_init(|| self.quotas.iter().map(|q| DefaultDirectRateLimiter::direct(*q)).collect())[bucket]
                .check(),
        };
        outcome.map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }

    /// Forgets users whose buckets are full again (they behave exactly like new ones), so
    /// the tables do not grow with every user ever seen.
    pub fn sweep(&self) {
        for bucket in &self.users {
            bucket.retain_recent();
            bucket.shrink_to_fit();
        }
    }
}

/// Per-IP caps on open connections and on new connections per second.
pub struct IpLimits {
    open: DashMap<IpAddr, usize>,
    max_open: usize,
    new: DefaultKeyedRateLimiter<IpAddr>,
}

/// Counts one open connection of an IP until dropped.
pub struct IpSlot {
    limits: Arc<IpLimits>,
    ip: IpAddr,
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        self.limits.open.remove_if_mut(&self.ip, |_, n| {
            *n -= 1;
            *n == 0
        });
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpRefusal {
    TooManyOpen,
    TooFast,
}

impl IpLimits {
    pub fn new(settings: &LimitSettings) -> IpLimits {
        let per_second = NonZeroU32::new(settings.new_connections_per_ip_per_second).unwrap_or(NonZeroU32::MIN);
        let burst = per_second.saturating_mul(NonZeroU32::new(2).unwrap_or(NonZeroU32::MIN));
        IpLimits {
            open: DashMap::new(),
            max_open: settings.max_connections_per_ip,
            new: DefaultKeyedRateLimiter::keyed(Quota::per_second(per_second).allow_burst(burst)),
        }
    }

    /// Admits one more connection from `ip`, or says why not.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<IpSlot, IpRefusal> {
        if self.new.check_key(&ip).is_err() {
            return Err(IpRefusal::TooFast);
        }
        let mut open = self.open.entry(ip).or_insert(0);
        if *open >= self.max_open {
            return Err(IpRefusal::TooManyOpen);
        }
        *open += 1;
        drop(open);
        Ok(IpSlot { limits: self.clone(), ip })
    }

    pub fn sweep(&self) {
        self.new.retain_recent();
        self.new.shrink_to_fit();
    }
}
