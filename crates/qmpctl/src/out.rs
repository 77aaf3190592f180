//! Output: tables for people, JSON for programs, sizes both ways.
//!
//! Everything goes through `std::io::stdout()` with errors returned, never
//! `println!`, so that a closed pipe ends the program quietly.

use std::io::Write;

use serde_json::Value;

use crate::exit::usage;

/// `writeln!` to stdout, returning the I/O error.
#[macro_export]
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*)
    }};
}

/// True when colour may be written to `stream`: it is a terminal and the
/// user did not set `NO_COLOR` (<https://no-color.org>: any non-empty value).
pub fn colour(stream: &impl std::io::IsTerminal) -> bool {
    stream.is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// Prints a JSON value: one line with `--json`, indented otherwise.
pub fn json(value: &Value, compact: bool) -> std::io::Result<()> {
    let text = if compact {
        value.to_string()
    } else {
        serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
    };
    outln!("{text}")
}

/// A table with a header row, printed with aligned columns.
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column names.
    pub fn new(header: &[&str]) -> Self {
        Table {
            header: header.iter().map(|s| s.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row.
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// Prints the table (or `empty` when it has no rows).
    pub fn print(&self, empty: &str) -> std::io::Result<()> {
        if self.rows.is_empty() {
            return outln!("{empty}");
        }
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate() {
                if i < widths.len() {
                    widths[i] = widths[i].max(cell.chars().count());
                }
            }
        }
        let mut stdout = std::io::stdout().lock();
        for row in std::iter::once(&self.header).chain(&self.rows) {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                if i + 1 == row.len() {
                    line.push_str(cell);
                } else {
                    line.push_str(&format!("{cell:<w$}  ", w = widths[i]));
                }
            }
            writeln!(stdout, "{}", line.trim_end())?;
        }
        Ok(())
    }
}

/// A size in bytes for people: `128 MiB`, `1.5 GiB`, `512 B`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if v.fract() < 0.05 {
        format!("{:.0} {}", v, UNITS[unit])
    } else {
        format!("{:.1} {}", v, UNITS[unit])
    }
}

/// Parses a size: bytes, or a number with K, M, G or T (powers of 1024).
pub fn parse_size(text: &str) -> anyhow::Result<u64> {
    let t = text.trim();
    let (num, mult) = match t.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        None => (t, 1u64),
        Some((i, _)) => {
            let unit = t[i..].to_ascii_uppercase();
            let mult = match unit.trim_end_matches("IB").trim_end_matches('B') {
                "" => 1,
                "K" => 1 << 10,
                "M" => 1 << 20,
                "G" => 1 << 30,
                "T" => 1 << 40,
                _ => return Err(usage(format!("invalid size {text:?}: use bytes or K, M, G, T"))),
            };
            (t[..i].trim(), mult)
        }
    };
    let value: f64 = num
        .parse()
        .map_err(|_| usage(format!("invalid size {text:?}: use bytes or K, M, G, T")))?;
    if value < 0.0 {
        return Err(usage(format!("invalid size {text:?}: must not be negative")));
    }
    Ok((value * mult as f64) as u64)
}

/// A JSON member as text for a table cell (`-` when absent).
pub fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_round_trip_for_people() {
        assert_eq!(bytes(128 << 20), "128 MiB");
        assert_eq!(bytes(1536 << 20), "1.5 GiB");
        assert_eq!(bytes(100), "100 B");
        assert_eq!(parse_size("96M").unwrap(), 96 << 20);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("12 parsecs").is_err());
    }
}
