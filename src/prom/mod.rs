//! Prometheus text exposition format (version 0.0.4), read without allocating.
//!
//! The memory-pressure poller reads the store's own `/metrics` once per second and
//! needs two or three numbers out of it. This module is the parser for that body:
//!
//! - [`samples`] walks every sample of a body (a streaming iterator, borrowed slices,
//!   no allocation), yielding a per-line error for lines it cannot read and going on;
//! - [`find_gauge`], [`Selector::find`] and [`find_many`] look values up by metric
//!   name and labels in a single pass.
//!
//! Robustness rules, because a wrong number here sheds real traffic:
//! - Only complete lines count. A body that does not end with `\n` was cut (a size
//!   cap, a reset connection): its last line is ignored, never half-read, so
//!   `process_resident_memory_bytes 123456789` cut to `…bytes 1234` cannot yield 1234.
//! - Lines that are not valid UTF-8, or that do not parse, are skipped one by one;
//!   they only matter if they are the line asked for (then the error says which line).
//! - `# HELP`, `# TYPE` and any other comment, blank lines, `\r\n` endings, leading
//!   blanks, label values with `\\`, `\"`, `\n` escapes and with `,` `}` `=` inside
//!   the quotes, trailing commas in label sets, optional integer timestamps,
//!   exponents, `NaN`, `+Inf`, `-Inf` are all read as the format says. An
//!   OpenMetrics exemplar (`# {…} …` after the value) is ignored.
//! - A lookup that matches more than one sample is an error ([`PromError::Ambiguous`]),
//!   never "the first one", so a selector missing a label cannot silently pick a series.
//! - Nothing here panics, whatever the bytes.

use std::fmt;

mod samples;
mod select;

pub use samples::{samples, LabelIter, LabelValue, Labels, Sample, Samples};
pub use select::{find_gauge, find_many, Selector};

/// Why a value could not be read. `Display` is one log line naming the metric.
#[derive(Debug, Clone, PartialEq)]
pub enum PromError {
    /// No complete sample of the metric in a complete body.
    NotFound { metric: String },
    /// The body was cut mid-line (it does not end with a newline) and the metric is
    /// not among the complete lines: it may have been in the part that was cut.
    Truncated { metric: String, line: usize },
    /// The only line(s) naming the metric could not be parsed; `line` is 1-based.
    Malformed {
        metric: String,
        line: usize,
        reason: &'static str,
    },
    /// More than one sample matches: the selector needs more labels.
    Ambiguous {
        metric: String,
        first_line: usize,
        second_line: usize,
    },
    /// The sample was read but its value cannot be used (NaN, infinite, negative).
    InvalidValue { metric: String, value: f64 },
    /// A selector (`name` or `name{label="value",…}`) that does not parse.
    BadSelector {
        selector: String,
        reason: &'static str,
    },
}

impl fmt::Display for PromError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PromError::NotFound { metric } => {
                write!(f, "metric `{metric}` not found in the metrics body")
            }
            PromError::Truncated { metric, line } => write!(
                f,
                "metric `{metric}` not found: the metrics body is truncated (line {line} is incomplete)"
            ),
            PromError::Malformed {
                metric,
                line,
                reason,
            } => write!(
                f,
                "metric `{metric}` unreadable: malformed sample on line {line}: {reason}"
            ),
            PromError::Ambiguous {
                metric,
                first_line,
                second_line,
            } => write!(
                f,
                "metric `{metric}` is ambiguous: samples on lines {first_line} and {second_line} both match (add labels to the selector)"
            ),
            PromError::InvalidValue { metric, value } => {
                write!(f, "metric `{metric}` has an unusable value: {value}")
            }
            PromError::BadSelector { selector, reason } => {
                write!(f, "invalid metric selector {selector:?}: {reason}")
            }
        }
    }
}

impl std::error::Error for PromError {}

/// A line of the body that could not be read as a sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LineError {
    /// 1-based line number.
    pub line: usize,
    pub reason: &'static str,
}

impl fmt::Display for LineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.reason)
    }
}

#[cfg(test)]
pub(crate) mod tests;

#[cfg(all(test, not(target_arch = "wasm32")))]
mod proptests;
