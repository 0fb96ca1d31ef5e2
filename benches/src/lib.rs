//! What the bench binaries share: reading their input files and summarizing latencies.

use std::path::Path;

use anyhow::Context;

/// The non-empty lines of a text file (one sentence or document per line).
pub fn read_lines(path: &Path) -> anyhow::Result<Vec<String>> {
    Ok(std::fs::read_to_string(path)
        .with_context(|| format!("reading {}", path.display()))?
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect())
}

/// The nearest-rank `p` quantile of ascending `sorted` values; NaN when there are none.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}
