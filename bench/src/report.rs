//! Output: the JSON file each run leaves in `bench-results/`, and the plain-text tables
//! printed for a person.
//!
//! The JSON is the record (every counter, the options, the machine), so that a figure in
//! docs can be traced to the file it came from; the table is a summary of it. The file
//! name carries the scenario and a UTC timestamp (`rtgate::clock` does the date arithmetic,
//! to avoid a date dependency for one line).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::{Context, Result};
use crate::procs;

/// Writes `{tool, version, scenario, finished_at, machine, result}` to
/// `<out_dir>/<scenario>-<UTC timestamp>.json` and returns the path.
pub fn write_json<T: Serialize>(out_dir: &Path, scenario: &str, result: &T) -> Result<PathBuf> {
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let stamp = utc_stamp(rtgate::clock::now_secs());
    let doc = serde_json::json!({
        "tool": "rtgate-bench",
        "version": env!("CARGO_PKG_VERSION"),
        "scenario": scenario,
        "finished_at": stamp,
        "machine": procs::machine(),
        "result": serde_json::to_value(result).context("serializing results")?,
    });
    let text = serde_json::to_string_pretty(&doc).context("serializing results")?;
    // Two runs in the same second get -2, -3, …; bounded so a full directory cannot spin.
    for n in 1..1000 {
        let name = if n == 1 { format!("{scenario}-{stamp}.json") } else { format!("{scenario}-{stamp}-{n}.json") };
        let path = out_dir.join(name);
        match std::fs::OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(mut f) => {
                use std::io::Write as _;
                f.write_all(text.as_bytes()).with_context(|| format!("writing {}", path.display()))?;
                return Ok(path);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).with_context(|| format!("creating {}", path.display())),
        }
    }
    Err(crate::error::BenchError::msg(format!("too many result files named {scenario}-{stamp}*")))
}

/// `YYYYMMDDTHHMMSSZ` for seconds since the Unix epoch (proleptic Gregorian, UTC).
pub fn utc_stamp(secs: u64) -> String {
    let (y, m, d, rem) = rtgate::clock::civil(secs as i64);
    format!("{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// A left-aligned first column and right-aligned figures.
pub struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Table {
        Table { rows: vec![header.iter().map(|s| s.to_string()).collect()] }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let cols = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let width: Vec<usize> = (0..cols)
            .map(|c| self.rows.iter().filter_map(|r| r.get(c)).map(|s| s.chars().count()).max().unwrap_or(0))
            .collect();
        let mut out = String::new();
        for (i, row) in self.rows.iter().enumerate() {
            for (c, cell) in row.iter().enumerate() {
                let w = width[c];
                let _ = if c == 0 { write!(out, "{cell:<w$}") } else { write!(out, "  {cell:>w$}") };
            }
            out.push('\n');
            if i == 0 {
                let total = width.iter().sum::<usize>() + 2 * cols.saturating_sub(1);
                out.push_str(&"-".repeat(total));
                out.push('\n');
            }
        }
        out
    }
}

/// 1234567 → "1,234,567".
pub fn int(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// A float with `digits` decimals, or "n/a" for a missing/undefined value.
pub fn num(x: Option<f64>, digits: usize) -> String {
    match x {
        Some(v) if v.is_finite() => format!("{v:.digits$}"),
        _ => "n/a".to_string(),
    }
}

/// Path for a result, printed after a run.
pub fn saved(path: &Path) -> String {
    format!("results written to {}", path.display())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps() {
        assert_eq!(utc_stamp(0), "19700101T000000Z");
        assert_eq!(utc_stamp(951_782_400), "20000229T000000Z");
        assert_eq!(utc_stamp(1_767_225_599), "20251231T235959Z");
    }

    #[test]
    fn numbers() {
        assert_eq!(int(0), "0");
        assert_eq!(int(999), "999");
        assert_eq!(int(1_000), "1,000");
        assert_eq!(int(1_234_567), "1,234,567");
        assert_eq!(num(Some(1.234), 2), "1.23");
        assert_eq!(num(Some(f64::NAN), 2), "n/a");
        assert_eq!(num(None, 2), "n/a");
    }

    #[test]
    fn table_aligns() {
        let mut t = Table::new(&["what", "value"]);
        t.row(vec!["deliveries/s".into(), "12".into()]);
        let text = t.render();
        assert_eq!(text, "what          value\n-------------------\ndeliveries/s     12\n");
    }

    #[test]
    fn json_files_do_not_overwrite() {
        let dir = std::env::temp_dir().join(format!("rtgate-bench-test-{}", std::process::id()));
        let a = write_json(&dir, "unit", &serde_json::json!({"x": 1})).unwrap();
        let b = write_json(&dir, "unit", &serde_json::json!({"x": 2})).unwrap();
        assert_ne!(a, b);
        let doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&a).unwrap()).unwrap();
        assert_eq!(doc["result"]["x"], 1);
        assert_eq!(doc["scenario"], "unit");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
