//! The figures of `hw-tests/report`: each benchmark appends what it measured to one file (a JSON
//! object per line), and the `report` binary prints them as one table, so every figure of the
//! README's Performance section comes from the same run on the same machine.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

/// One measured figure: what, how much, and in which unit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Figure {
    pub metric: String,
    pub value: f64,
    pub unit: String,
}

/// Where a benchmark records its figures; `None` records nothing (a benchmark run on its own
/// prints its lines and that is all).
pub struct Recorder(Option<PathBuf>);

impl Recorder {
    pub fn new(file: Option<PathBuf>) -> Recorder {
        Recorder(file)
    }

    pub fn record(&self, metric: &str, value: f64, unit: &str) -> Result<()> {
        let Some(path) = &self.0 else {
            return Ok(());
        };
        let line = serde_json::to_string(&Figure {
            metric: metric.into(),
            value,
            unit: unit.into(),
        })?;
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| path.display().to_string())?;
        writeln!(file, "{line}")?;
        Ok(())
    }
}

/// Reads a file of figures.
pub fn read(path: &Path) -> Result<Vec<Figure>> {
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).with_context(|| format!("not a figure: {l}")))
        .collect()
}

/// The figures as a Markdown table, values rounded to what the measurement can tell.
pub fn table(figures: &[Figure]) -> String {
    let mut out = String::from("| measure | value |\n|---|---|\n");
    for f in figures {
        // Below what one decimal shows, a difference is nothing (and never "-0.0").
        let v = if f.value.abs() < 0.05 { 0.0 } else { f.value };
        let value = if v.abs() >= 100.0 || v.fract() == 0.0 {
            format!("{v:.0}")
        } else {
            format!("{v:.1}")
        };
        let shown = format!("{value} {}", f.unit);
        out.push_str(&format!("| {} | {} |\n", f.metric, shown.trim_end()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_round_trip_through_the_file_into_one_table() {
        let path = std::env::temp_dir().join(format!("report-{}.jsonl", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let recorder = Recorder::new(Some(path.clone()));
        recorder
            .record("insert → card.read, median", 41.26, "ms")
            .unwrap();
        recorder.record("APDUs per read", 10.0, "").unwrap();
        recorder
            .record("GET /v1/cards", 23456.7, "requests/s")
            .unwrap();
        recorder.record("OAuth overhead", -0.004, "ms").unwrap();
        let figures = read(&path).unwrap();
        assert_eq!(figures.len(), 4);
        assert_eq!(
            table(&figures),
            "| measure | value |\n|---|---|\n| insert → card.read, median | 41.3 ms |\n\
             | APDUs per read | 10 |\n| GET /v1/cards | 23457 requests/s |\n\
             | OAuth overhead | 0 ms |\n"
        );
        let _ = std::fs::remove_file(&path);
    }
}
