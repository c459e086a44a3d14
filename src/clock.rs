//! Wall-clock time in the two shapes rtgate writes it: milliseconds since the Unix epoch
//! (message timestamps, history rows, retention) and UTC calendar dates (`now_iso` for
//! plugins; the benchmark tool's file names). The date arithmetic is one small function
//! here rather than a date crate, and this is its only copy.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

fn since_epoch() -> Duration {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default()
}

/// Whole seconds since the Unix epoch (0 if the clock is set before it), as token expiry
/// times are written.
pub fn now_secs() -> u64 {
    since_epoch().as_secs()
}

/// Milliseconds since the Unix epoch (0 if the clock is set before it).
pub fn now_ms() -> i64 {
    since_epoch().as_millis() as i64
}

/// `(year, month, day, seconds into the day)` of the moment `secs` seconds after the Unix
/// epoch, in UTC on the proleptic Gregorian calendar (Howard Hinnant's civil_from_days).
pub fn civil(secs: i64) -> (i64, i64, i64, i64) {
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(month <= 2), month, day, rem)
}

/// UTC time as `2026-11-27T10:58:15.123Z`, the format of JavaScript's `toISOString()`.
pub fn now_iso() -> String {
    let now = since_epoch();
    let (year, month, day, rem) = civil(now.as_secs() as i64);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        now.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso_format() {
        let s = now_iso();
        assert_eq!(s.len(), 24, "{s}");
        assert!(s.ends_with('Z') && &s[4..5] == "-" && &s[10..11] == "T", "{s}");
        assert!(s.as_str() > "2024-01-01");
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil(0), (1970, 1, 1, 0));
        assert_eq!(civil(951_782_400), (2000, 2, 29, 0));
        assert_eq!(civil(1_767_225_599), (2025, 12, 31, 86_399));
        assert_eq!(civil(-1), (1969, 12, 31, 86_399));
    }
}
