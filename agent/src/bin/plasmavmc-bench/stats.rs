//! Small summaries of repeated measurements.

use std::fmt;
use std::time::Duration;

#[derive(Debug, Clone, Copy)]
pub struct Summary {
    pub samples: usize,
    pub min: Duration,
    pub median: Duration,
    pub p95: Duration,
    pub p99: Duration,
    pub max: Duration,
}

impl Summary {
    pub fn of(mut samples: Vec<Duration>) -> Self {
        assert!(!samples.is_empty(), "no samples to summarise");
        samples.sort();
        let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
        Self {
            samples: samples.len(),
            min: samples[0],
            median: at(0.5),
            p95: at(0.95),
            p99: at(0.99),
            max: samples[samples.len() - 1],
        }
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "median {} (min {}, p95 {}, p99 {}, max {}; {} runs)",
            ms(self.median),
            ms(self.min),
            ms(self.p95),
            ms(self.p99),
            ms(self.max),
            self.samples
        )
    }
}

/// Milliseconds with enough digits for sub-millisecond figures.
pub fn ms(duration: Duration) -> String {
    format!("{:.3} ms", duration.as_secs_f64() * 1000.0)
}
