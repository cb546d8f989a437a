//! Looking values up by metric name and labels, in a single pass over the body.

use std::fmt;

use super::samples::{parse_head, parse_line, scan_metric_name, skip_blank};
use super::{samples, Labels, PromError};

/// A metric name with optional label matchers, as an operator writes it in the
/// configuration: `process_resident_memory_bytes` or
/// `container_memory_working_set_bytes{container="kask"}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selector {
    name: String,
    /// Decoded label values.
    labels: Vec<(String, String)>,
    text: String,
}

impl Selector {
    /// Parses `name` or `name{label="value",…}` (same syntax and escapes as a sample
    /// line, without the value).
    pub fn parse(text: &str) -> Result<Selector, PromError> {
        let bad = |reason| PromError::BadSelector {
            selector: text.to_string(),
            reason,
        };
        let trimmed = text.trim();
        let head = parse_head(trimmed, 0).map_err(bad)?;
        if head.end != trimmed.len() {
            return Err(bad("unexpected text after the metric name or labels"));
        }
        let labels: Vec<(String, String)> = head
            .labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.decoded().into_owned()))
            .collect();
        for (i, (k, _)) in labels.iter().enumerate() {
            if labels.iter().take(i).any(|(other, _)| other == k) {
                return Err(bad("a label appears twice"));
            }
        }
        Ok(Selector {
            name: head.name.to_string(),
            labels,
            text: trimmed.to_string(),
        })
    }

    /// A selector for a bare metric name (not validated: it simply never matches if
    /// it is not a metric name).
    pub fn name_only(name: &str) -> Selector {
        Selector {
            name: name.to_string(),
            labels: Vec::new(),
            text: name.to_string(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn labels(&self) -> &[(String, String)] {
        &self.labels
    }

    /// The selector as written (trimmed), used in error messages.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The value of the one sample this selector matches.
    pub fn find(&self, text: &[u8]) -> Result<f64, PromError> {
        let mut out = [Match::Missing];
        let truncated = scan(text, std::slice::from_ref(self), &mut out);
        out[0].into_result(self.as_str(), truncated)
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// What the single pass found for one query (no allocation).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Match {
    Missing,
    Found { value: f64, line: usize },
    Malformed { line: usize, reason: &'static str },
    Ambiguous { first: usize, second: usize },
}

impl Match {
    fn into_result(self, metric: &str, truncated: Option<usize>) -> Result<f64, PromError> {
        match self {
            Match::Found { value, .. } => Ok(value),
            Match::Missing => Err(match truncated {
                Some(line) => PromError::Truncated {
                    metric: metric.to_string(),
                    line,
                },
                None => PromError::NotFound {
                    metric: metric.to_string(),
                },
            }),
            Match::Malformed { line, reason } => Err(PromError::Malformed {
                metric: metric.to_string(),
                line,
                reason,
            }),
            Match::Ambiguous { first, second } => Err(PromError::Ambiguous {
                metric: metric.to_string(),
                first_line: first,
                second_line: second,
            }),
        }
    }

    fn found(&mut self, value: f64, line: usize) {
        *self = match *self {
            Match::Missing | Match::Malformed { .. } => Match::Found { value, line },
            Match::Found { line: first, .. } => Match::Ambiguous {
                first,
                second: line,
            },
            ambiguous @ Match::Ambiguous { .. } => ambiguous,
        };
    }

    fn malformed(&mut self, line: usize, reason: &'static str) {
        // Only remembered while nothing better is known, and only the first one.
        if *self == Match::Missing {
            *self = Match::Malformed { line, reason };
        }
    }
}

trait Query {
    fn metric(&self) -> &str;
    fn matches(&self, labels: &Labels<'_>) -> bool;
}

impl Query for Selector {
    fn metric(&self) -> &str {
        &self.name
    }
    fn matches(&self, labels: &Labels<'_>) -> bool {
        labels.matches(&self.labels)
    }
}

struct Borrowed<'q> {
    name: &'q str,
    labels: &'q [(&'q str, &'q str)],
}

impl Query for Borrowed<'_> {
    fn metric(&self) -> &str {
        self.name
    }
    fn matches(&self, labels: &Labels<'_>) -> bool {
        labels.matches(self.labels)
    }
}

/// One pass over the body for up to `out.len()` queries. Lines are filtered on
/// the metric name before anything else is parsed. Returns the truncated line.
fn scan<Q: Query>(text: &[u8], queries: &[Q], out: &mut [Match]) -> Option<usize> {
    let mut lines = samples(text);
    while let Some((line_no, line)) = lines.next_line() {
        let start = skip_blank(line, 0);
        let name_end = scan_metric_name(line, start);
        if name_end == start {
            continue; // comment, blank, or not a sample of anything we want
        }
        let Some(name) = line.get(start..name_end) else {
            continue;
        };
        if !queries.iter().any(|q| q.metric().as_bytes() == name) {
            continue;
        }
        let parsed = parse_line(line, line_no);
        for (q, slot) in queries.iter().zip(out.iter_mut()) {
            if q.metric().as_bytes() != name {
                continue;
            }
            match &parsed {
                Ok(Some(sample)) if q.matches(&sample.labels) => slot.found(sample.value, line_no),
                Ok(_) => {}
                Err(reason) => slot.malformed(line_no, reason),
            }
        }
    }
    lines.truncated_line()
}

/// The value of the one sample named `name` whose labels include `labels`.
///
/// ```
/// use sessionguard::prom::find_gauge;
/// let body = b"# TYPE x gauge\nx{pod=\"a\"} 1.5e+07\nx{pod=\"b\"} 2\n";
/// assert_eq!(find_gauge(body, "x", &[("pod", "a")]), Ok(1.5e7));
/// assert!(find_gauge(body, "x", &[]).is_err()); // two series match
/// ```
pub fn find_gauge(text: &[u8], name: &str, labels: &[(&str, &str)]) -> Result<f64, PromError> {
    let query = Borrowed { name, labels };
    let mut out = [Match::Missing];
    let truncated = scan(text, std::slice::from_ref(&query), &mut out);
    if let Match::Found { value, .. } = out[0] {
        return Ok(value);
    }
    // Name the metric with its labels in the message.
    let mut metric = name.to_string();
    if !labels.is_empty() {
        metric.push('{');
        for (i, (k, v)) in labels.iter().enumerate() {
            if i > 0 {
                metric.push(',');
            }
            metric.push_str(&format!("{k}={v:?}"));
        }
        metric.push('}');
    }
    out[0].into_result(&metric, truncated)
}

/// Selectors looked up per pass of [`find_many`] (more are done in further passes).
pub const SELECTORS_PER_PASS: usize = 16;

/// Looks up every selector in as few passes as possible (one for up to
/// `SELECTORS_PER_PASS`); `out` is cleared and receives one result per selector.
/// Allocates only for error messages (and `out` itself, if it must grow).
pub fn find_many(text: &[u8], selectors: &[Selector], out: &mut Vec<Result<f64, PromError>>) {
    out.clear();
    for chunk in selectors.chunks(SELECTORS_PER_PASS) {
        let mut slots = [Match::Missing; SELECTORS_PER_PASS];
        let truncated = scan(text, chunk, &mut slots);
        for (sel, slot) in chunk.iter().zip(slots) {
            out.push(slot.into_result(sel.as_str(), truncated));
        }
    }
}
