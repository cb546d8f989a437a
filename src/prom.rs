//! Prometheus text exposition format (version 0.0.4), read without allocating,
//! and the ORCA `endpoint-load-metrics` header.
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

use std::borrow::Cow;
use std::fmt;

// ---------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------
// Samples
// ---------------------------------------------------------------------------------

/// One sample line, borrowed from the body.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample<'a> {
    pub name: &'a str,
    pub labels: Labels<'a>,
    pub value: f64,
    /// Milliseconds since the epoch, when the line carries one.
    pub timestamp_ms: Option<i64>,
    /// 1-based line number in the body.
    pub line: usize,
}

/// The label set of a sample: the validated text between the braces, decoded lazily.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Labels<'a> {
    raw: &'a str,
}

impl<'a> Labels<'a> {
    /// The text between `{` and `}`, escapes not decoded.
    pub fn raw(&self) -> &'a str {
        self.raw
    }

    pub fn is_empty(&self) -> bool {
        self.iter().next().is_none()
    }

    pub fn iter(&self) -> LabelIter<'a> {
        LabelIter {
            rest: self.raw.as_bytes(),
            text: self.raw,
            pos: 0,
        }
    }

    /// The value of label `name`, if present.
    pub fn get(&self, name: &str) -> Option<LabelValue<'a>> {
        self.iter().find(|(n, _)| *n == name).map(|(_, v)| v)
    }

    /// True if every `(name, value)` pair is present with that exact (decoded) value.
    /// As in PromQL, an empty expected value also matches an absent label.
    pub fn matches<K: AsRef<str>, V: AsRef<str>>(&self, want: &[(K, V)]) -> bool {
        want.iter().all(|(k, v)| match self.get(k.as_ref()) {
            Some(actual) => actual.matches(v.as_ref()),
            None => v.as_ref().is_empty(),
        })
    }
}

/// A label value as written between the quotes (escapes not yet decoded).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LabelValue<'a> {
    raw: &'a str,
}

impl<'a> LabelValue<'a> {
    pub fn raw(&self) -> &'a str {
        self.raw
    }

    /// Compares the decoded value with `expected` without allocating.
    pub fn matches(&self, expected: &str) -> bool {
        let mut want = expected.bytes();
        let mut raw = self.raw.bytes();
        while let Some(b) = raw.next() {
            let decoded = if b == b'\\' {
                match raw.next() {
                    Some(b'n') => b'\n',
                    Some(other) => other,
                    None => return false,
                }
            } else {
                b
            };
            if want.next() != Some(decoded) {
                return false;
            }
        }
        want.next().is_none()
    }

    /// The decoded value; allocates only when the raw text holds escapes.
    pub fn decoded(&self) -> Cow<'a, str> {
        if !self.raw.contains('\\') {
            return Cow::Borrowed(self.raw);
        }
        let mut out = String::with_capacity(self.raw.len());
        let mut chars = self.raw.chars();
        while let Some(c) = chars.next() {
            if c == '\\' {
                match chars.next() {
                    Some('n') => out.push('\n'),
                    Some(other) => out.push(other),
                    None => {}
                }
            } else {
                out.push(c);
            }
        }
        Cow::Owned(out)
    }
}

/// Iterator over `(label name, value)` pairs of a validated label set.
#[derive(Debug, Clone)]
pub struct LabelIter<'a> {
    rest: &'a [u8],
    text: &'a str,
    pos: usize,
}

impl<'a> Iterator for LabelIter<'a> {
    type Item = (&'a str, LabelValue<'a>);

    fn next(&mut self) -> Option<Self::Item> {
        // The text was validated by `scan_labels`; this walk is still defensive so
        // that a hand-made `Labels` can never make it panic or loop.
        let b = self.rest;
        let mut i = skip_blank(b, self.pos);
        if b.get(i) == Some(&b',') {
            i = skip_blank(b, i + 1);
        }
        let name_start = i;
        let name_end = scan_label_name(b, i);
        if name_end == name_start {
            self.pos = b.len();
            return None;
        }
        i = skip_blank(b, name_end);
        if b.get(i) != Some(&b'=') {
            self.pos = b.len();
            return None;
        }
        i = skip_blank(b, i + 1);
        if b.get(i) != Some(&b'"') {
            self.pos = b.len();
            return None;
        }
        let value_start = i + 1;
        let Ok(after) = scan_quoted(b, value_start) else {
            self.pos = b.len();
            return None;
        };
        self.pos = skip_blank(b, after);
        let name = self.text.get(name_start..name_end)?;
        let raw = self.text.get(value_start..after - 1)?;
        Some((name, LabelValue { raw }))
    }
}

/// Streaming iterator over the samples of a body; see [`samples`].
#[derive(Debug, Clone)]
pub struct Samples<'a> {
    text: &'a [u8],
    pos: usize,
    line: usize,
    truncated_line: Option<usize>,
}

/// Walks the samples of an exposition-format body.
///
/// Comments and blank lines are skipped; a line that cannot be read yields
/// `Err(LineError)` and the walk goes on. An incomplete last line (no final newline)
/// is not read at all; [`Samples::truncated_line`] tells after the walk.
pub fn samples(text: &[u8]) -> Samples<'_> {
    Samples {
        text,
        pos: 0,
        line: 0,
        truncated_line: None,
    }
}

impl<'a> Samples<'a> {
    /// After the walk: the number of the incomplete last line that was ignored, if any.
    pub fn truncated_line(&self) -> Option<usize> {
        self.truncated_line
    }

    /// The next complete line (without its `\n` or `\r\n`) and its number.
    fn next_line(&mut self) -> Option<(usize, &'a [u8])> {
        let rest = self.text.get(self.pos..)?;
        if rest.is_empty() {
            return None;
        }
        self.line += 1;
        match rest.iter().position(|&b| b == b'\n') {
            Some(n) => {
                self.pos += n + 1;
                let line = &rest[..n];
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                Some((self.line, line))
            }
            None => {
                self.pos = self.text.len();
                self.truncated_line = Some(self.line);
                None
            }
        }
    }
}

impl<'a> Iterator for Samples<'a> {
    type Item = Result<Sample<'a>, LineError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let (line_no, line) = self.next_line()?;
            match parse_line(line, line_no) {
                Ok(Some(sample)) => return Some(Ok(sample)),
                Ok(None) => continue,
                Err(reason) => {
                    return Some(Err(LineError {
                        line: line_no,
                        reason,
                    }))
                }
            }
        }
    }
}

fn is_blank(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

fn skip_blank(b: &[u8], mut i: usize) -> usize {
    while b.get(i).is_some_and(|&c| is_blank(c)) {
        i += 1;
    }
    i
}

/// End of a metric name `[a-zA-Z_:][a-zA-Z0-9_:]*` starting at `i` (`i` if none).
fn scan_metric_name(b: &[u8], i: usize) -> usize {
    match b.get(i) {
        Some(c) if c.is_ascii_alphabetic() || *c == b'_' || *c == b':' => {}
        _ => return i,
    }
    let mut j = i + 1;
    while b
        .get(j)
        .is_some_and(|c| c.is_ascii_alphanumeric() || *c == b'_' || *c == b':')
    {
        j += 1;
    }
    j
}

/// End of a label name `[a-zA-Z_][a-zA-Z0-9_]*` starting at `i` (`i` if none).
fn scan_label_name(b: &[u8], i: usize) -> usize {
    match b.get(i) {
        Some(c) if c.is_ascii_alphabetic() || *c == b'_' => {}
        _ => return i,
    }
    let mut j = i + 1;
    while b
        .get(j)
        .is_some_and(|c| c.is_ascii_alphanumeric() || *c == b'_')
    {
        j += 1;
    }
    j
}

/// From just after an opening quote, returns the index just after the closing one.
fn scan_quoted(b: &[u8], mut i: usize) -> Result<usize, &'static str> {
    loop {
        match b.get(i) {
            None => return Err("unterminated label value"),
            Some(b'"') => return Ok(i + 1),
            Some(b'\\') => match b.get(i + 1) {
                Some(b'\\' | b'"' | b'n') => i += 2,
                _ => return Err("invalid escape in a label value (only \\\\, \\\" and \\n)"),
            },
            Some(_) => i += 1,
        }
    }
}

/// From just after `{`, validates a label set; returns (end of contents, index after `}`).
fn scan_labels(b: &[u8], mut i: usize) -> Result<(usize, usize), &'static str> {
    loop {
        i = skip_blank(b, i);
        match b.get(i) {
            None => return Err("unterminated label set"),
            Some(b'}') => return Ok((i, i + 1)),
            Some(_) => {}
        }
        let name_end = scan_label_name(b, i);
        if name_end == i {
            return Err("expected a label name");
        }
        i = skip_blank(b, name_end);
        if b.get(i) != Some(&b'=') {
            return Err("expected `=` after a label name");
        }
        i = skip_blank(b, i + 1);
        if b.get(i) != Some(&b'"') {
            return Err("expected a quoted label value");
        }
        i = skip_blank(b, scan_quoted(b, i + 1)?);
        match b.get(i) {
            Some(b',') => i += 1,
            Some(b'}') => return Ok((i, i + 1)),
            None => return Err("unterminated label set"),
            Some(_) => return Err("expected `,` or `}` after a label value"),
        }
    }
}

/// End of a blank-delimited token starting at `i`.
fn scan_token(b: &[u8], mut i: usize) -> usize {
    while b.get(i).is_some_and(|&c| !is_blank(c)) {
        i += 1;
    }
    i
}

/// A sample value: a Go float, `NaN`, `+Inf`, `-Inf` (Rust's parser accepts the same
/// spellings, case-insensitively).
fn parse_value(token: &str) -> Result<f64, &'static str> {
    token.parse::<f64>().map_err(|_| "invalid sample value")
}

/// Name and label set at the start of a line (or of a selector).
struct Head<'a> {
    name: &'a str,
    labels: Labels<'a>,
    /// Index just after the name or the closing brace.
    end: usize,
    braces: bool,
}

fn parse_head<'a>(text: &'a str, start: usize) -> Result<Head<'a>, &'static str> {
    let b = text.as_bytes();
    let name_end = scan_metric_name(b, start);
    if name_end == start {
        return Err("expected a metric name");
    }
    let name = text.get(start..name_end).ok_or("expected a metric name")?;
    let brace = skip_blank(b, name_end);
    if b.get(brace) == Some(&b'{') {
        let (contents_end, end) = scan_labels(b, brace + 1)?;
        let raw = text
            .get(brace + 1..contents_end)
            .ok_or("unterminated label set")?;
        Ok(Head {
            name,
            labels: Labels { raw },
            end,
            braces: true,
        })
    } else {
        Ok(Head {
            name,
            labels: Labels::default(),
            end: name_end,
            braces: false,
        })
    }
}

/// One line (without its line ending): `Ok(None)` for blank lines and comments.
fn parse_line(line: &[u8], line_no: usize) -> Result<Option<Sample<'_>>, &'static str> {
    let start = skip_blank(line, 0);
    match line.get(start) {
        None | Some(b'#') => return Ok(None),
        Some(_) => {}
    }
    let text = std::str::from_utf8(line).map_err(|_| "not valid UTF-8")?;
    let b = line;
    let head = parse_head(text, start)?;
    let mut i = head.end;
    let value_start = skip_blank(b, i);
    if value_start == i && !head.braces {
        // `name` directly followed by something that is neither a blank nor `{`.
        return Err(match b.get(i) {
            None => "missing value",
            Some(_) => "invalid character in the metric name",
        });
    }
    i = value_start;
    let value_end = scan_token(b, i);
    if value_end == i {
        return Err("missing value");
    }
    let value = parse_value(text.get(i..value_end).ok_or("invalid sample value")?)?;
    i = skip_blank(b, value_end);
    let mut timestamp_ms = None;
    if b.get(i).is_some_and(|&c| c != b'#') {
        let ts_end = scan_token(b, i);
        let token = text.get(i..ts_end).ok_or("invalid timestamp")?;
        timestamp_ms = Some(token.parse::<i64>().map_err(|_| "invalid timestamp")?);
        i = skip_blank(b, ts_end);
    }
    // Anything left must be an OpenMetrics exemplar (`# {…} value`), which we ignore.
    if b.get(i).is_some_and(|&c| c != b'#') {
        return Err("unexpected text after the timestamp");
    }
    Ok(Some(Sample {
        name: head.name,
        labels: head.labels,
        value,
        timestamp_ms,
        line: line_no,
    }))
}

// ---------------------------------------------------------------------------------
// Lookups
// ---------------------------------------------------------------------------------

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
            if labels[..i].iter().any(|(other, _)| other == k) {
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
        let mut out = [Slot::Missing];
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
enum Slot {
    Missing,
    Found { value: f64, line: usize },
    Malformed { line: usize, reason: &'static str },
    Ambiguous { first: usize, second: usize },
}

impl Slot {
    fn into_result(self, metric: &str, truncated: Option<usize>) -> Result<f64, PromError> {
        match self {
            Slot::Found { value, .. } => Ok(value),
            Slot::Missing => Err(match truncated {
                Some(line) => PromError::Truncated {
                    metric: metric.to_string(),
                    line,
                },
                None => PromError::NotFound {
                    metric: metric.to_string(),
                },
            }),
            Slot::Malformed { line, reason } => Err(PromError::Malformed {
                metric: metric.to_string(),
                line,
                reason,
            }),
            Slot::Ambiguous { first, second } => Err(PromError::Ambiguous {
                metric: metric.to_string(),
                first_line: first,
                second_line: second,
            }),
        }
    }

    fn found(&mut self, value: f64, line: usize) {
        *self = match *self {
            Slot::Missing | Slot::Malformed { .. } => Slot::Found { value, line },
            Slot::Found { line: first, .. } => Slot::Ambiguous {
                first,
                second: line,
            },
            ambiguous @ Slot::Ambiguous { .. } => ambiguous,
        };
    }

    fn malformed(&mut self, line: usize, reason: &'static str) {
        // Only remembered while nothing better is known, and only the first one.
        if *self == Slot::Missing {
            *self = Slot::Malformed { line, reason };
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
fn scan<Q: Query>(text: &[u8], queries: &[Q], out: &mut [Slot]) -> Option<usize> {
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
    let mut out = [Slot::Missing];
    let truncated = scan(text, std::slice::from_ref(&query), &mut out);
    if let Slot::Found { value, .. } = out[0] {
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
/// [`SELECTORS_PER_PASS`]); `out` is cleared and receives one result per selector.
/// Allocates only for error messages (and `out` itself, if it must grow).
pub fn find_many(text: &[u8], selectors: &[Selector], out: &mut Vec<Result<f64, PromError>>) {
    out.clear();
    for chunk in selectors.chunks(SELECTORS_PER_PASS) {
        let mut slots = [Slot::Missing; SELECTORS_PER_PASS];
        let truncated = scan(text, chunk, &mut slots);
        for (sel, slot) in chunk.iter().zip(slots) {
            out.push(slot.into_result(sel.as_str(), truncated));
        }
    }
}

// ---------------------------------------------------------------------------------
// ORCA
// ---------------------------------------------------------------------------------

/// `mem_utilization` from an ORCA `endpoint-load-metrics` response header, clamped
/// to [0, 1]; `None` when absent, unreadable, or in the `BIN` form (ignored).
///
/// Accepted forms (as Envoy's `orca_parser` reads them):
/// - `TEXT mem_utilization=0.8, cpu_utilization=0.3, named_metrics.foo=1` — entries
///   separated by commas, `=` or `:` between name and value; a bare list without the
///   `TEXT ` prefix (the older native form) is read the same way;
/// - `JSON {"mem_utilization": 0.8}` — also `memUtilization` (proto3 JSON name) and
///   numbers written as strings, as proto3 JSON allows.
///
/// `named_metrics.mem_utilization` is a different, application-defined metric and is
/// not used. Non-finite values are ignored.
pub fn orca_mem_utilization(header: &str) -> Option<f64> {
    let header = header.trim();
    let value = if let Some(json) = header.strip_prefix("JSON ") {
        orca_json(json)?
    } else if header.starts_with("BIN ") {
        return None;
    } else {
        let text = header.strip_prefix("TEXT ").unwrap_or(header);
        orca_text(text)?
    };
    if value.is_finite() {
        Some(value.clamp(0.0, 1.0))
    } else {
        None
    }
}

fn orca_text(text: &str) -> Option<f64> {
    text.split(',').find_map(|entry| {
        let (name, value) = entry.split_once(['=', ':'])?;
        if name.trim() == "mem_utilization" {
            value.trim().parse::<f64>().ok()
        } else {
            None
        }
    })
}

fn orca_json(json: &str) -> Option<f64> {
    #[derive(serde::Deserialize)]
    struct Report {
        #[serde(alias = "memUtilization", default)]
        mem_utilization: Option<Number>,
    }
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum Number {
        Num(f64),
        Text(String),
    }
    let report: Report = serde_json::from_str(json).ok()?;
    match report.mem_utilization? {
        Number::Num(v) => Some(v),
        Number::Text(s) => s.trim().parse::<f64>().ok(),
    }
}

// ---------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    /// What Kask (client_golang 1.x promhttp, default registry) serves, abridged.
    pub(crate) const GO_METRICS: &str = r#"# HELP go_gc_duration_seconds A summary of the pause duration of garbage collection cycles.
# TYPE go_gc_duration_seconds summary
go_gc_duration_seconds{quantile="0"} 2.4641e-05
go_gc_duration_seconds{quantile="0.25"} 4.3952e-05
go_gc_duration_seconds{quantile="0.5"} 6.1519e-05
go_gc_duration_seconds{quantile="0.75"} 0.000103125
go_gc_duration_seconds{quantile="1"} 0.004532811
go_gc_duration_seconds_sum 0.231946707
go_gc_duration_seconds_count 1783
# HELP go_goroutines Number of goroutines that currently exist.
# TYPE go_goroutines gauge
go_goroutines 5023
# HELP go_info Information about the Go environment.
# TYPE go_info gauge
go_info{version="go1.19.13"} 1
# HELP go_memstats_alloc_bytes Number of bytes allocated and still in use.
# TYPE go_memstats_alloc_bytes gauge
go_memstats_alloc_bytes 8.3426304e+07
# HELP go_memstats_alloc_bytes_total Total number of bytes allocated, even if freed.
# TYPE go_memstats_alloc_bytes_total counter
go_memstats_alloc_bytes_total 4.1289735216e+10
# HELP go_memstats_heap_idle_bytes Number of heap bytes waiting to be used.
# TYPE go_memstats_heap_idle_bytes gauge
go_memstats_heap_idle_bytes 1.2124160e+07
# HELP go_memstats_heap_inuse_bytes Number of heap bytes that are in use.
# TYPE go_memstats_heap_inuse_bytes gauge
go_memstats_heap_inuse_bytes 9.8828288e+07
# HELP go_memstats_heap_released_bytes Number of heap bytes released to OS.
# TYPE go_memstats_heap_released_bytes gauge
go_memstats_heap_released_bytes 3.080192e+06
# HELP go_memstats_last_gc_time_seconds Number of seconds since 1970 of last garbage collection.
# TYPE go_memstats_last_gc_time_seconds gauge
go_memstats_last_gc_time_seconds 1.6918432051234567e+09
# HELP go_memstats_next_gc_bytes Number of heap bytes when next garbage collection will take place.
# TYPE go_memstats_next_gc_bytes gauge
go_memstats_next_gc_bytes 1.5234816e+08
# HELP go_memstats_stack_inuse_bytes Number of bytes in use by the stack allocator.
# TYPE go_memstats_stack_inuse_bytes gauge
go_memstats_stack_inuse_bytes 6.5273856e+07
# HELP go_memstats_sys_bytes Number of bytes obtained from system.
# TYPE go_memstats_sys_bytes gauge
go_memstats_sys_bytes 1.9420364e+08
# HELP go_threads Number of OS threads created.
# TYPE go_threads gauge
go_threads 14
# HELP http_request_duration_seconds A histogram of latencies for requests.
# TYPE http_request_duration_seconds histogram
http_request_duration_seconds_bucket{code="200",method="GET",le="0.001"} 10234
http_request_duration_seconds_bucket{code="200",method="GET",le="0.0025"} 52311
http_request_duration_seconds_bucket{code="200",method="GET",le="0.1"} 99876
http_request_duration_seconds_bucket{code="200",method="GET",le="1"} 100321
http_request_duration_seconds_bucket{code="200",method="GET",le="+Inf"} 100400
http_request_duration_seconds_sum{code="200",method="GET"} 1234.5678
http_request_duration_seconds_count{code="200",method="GET"} 100400
http_request_duration_seconds_bucket{code="404",method="GET",le="+Inf"} 570123
http_request_duration_seconds_count{code="404",method="GET"} 570123
# HELP http_requests_total Count of HTTP requests processed, partitioned by status code and HTTP method.
# TYPE http_requests_total counter
http_requests_total{code="200",method="GET"} 100400
http_requests_total{code="201",method="POST"} 20011
http_requests_total{code="204",method="DELETE"} 311
http_requests_total{code="404",method="GET"} 570123
# HELP kask_build_info Build information
# TYPE kask_build_info gauge
kask_build_info{build_date="2020-06-11T10:00:00Z",build_host="build \"ci\"\\1",go_version="go1.19",version="v1.0.10, patched\nsecond line"} 1
# HELP process_cpu_seconds_total Total user and system CPU time spent in seconds.
# TYPE process_cpu_seconds_total counter
process_cpu_seconds_total 1234.56
# HELP process_max_fds Maximum number of open file descriptors.
# TYPE process_max_fds gauge
process_max_fds 1.048576e+06
# HELP process_open_fds Number of open file descriptors.
# TYPE process_open_fds gauge
process_open_fds 5031
# HELP process_resident_memory_bytes Resident memory size in bytes.
# TYPE process_resident_memory_bytes gauge
process_resident_memory_bytes 1.82452224e+08
# HELP process_start_time_seconds Start time of the process since unix epoch in seconds.
# TYPE process_start_time_seconds gauge
process_start_time_seconds 1.69184281234e+09
# HELP process_virtual_memory_bytes Virtual memory size in bytes.
# TYPE process_virtual_memory_bytes gauge
process_virtual_memory_bytes 1.2345e+07
# HELP process_virtual_memory_max_bytes Maximum amount of virtual memory available in bytes.
# TYPE process_virtual_memory_max_bytes gauge
process_virtual_memory_max_bytes 1.8446744073709552e+19
# HELP promhttp_metric_handler_requests_in_flight Current number of scrapes being served.
# TYPE promhttp_metric_handler_requests_in_flight gauge
promhttp_metric_handler_requests_in_flight 1
# HELP promhttp_metric_handler_requests_total Total number of scrapes by HTTP status code.
# TYPE promhttp_metric_handler_requests_total counter
promhttp_metric_handler_requests_total{code="200"} 3021
promhttp_metric_handler_requests_total{code="500"} 0
promhttp_metric_handler_requests_total{code="503"} 0
"#;

    /// What Python's prometheus_client (0.17, default registry) serves, abridged.
    pub(crate) const PYTHON_METRICS: &str = r#"# HELP python_gc_objects_collected_total Objects collected during gc
# TYPE python_gc_objects_collected_total counter
python_gc_objects_collected_total{generation="0"} 2389.0
python_gc_objects_collected_total{generation="1"} 327.0
python_gc_objects_collected_total{generation="2"} 0.0
# HELP python_info Python platform information
# TYPE python_info gauge
python_info{implementation="CPython",major="3",minor="11",patchlevel="4",version="3.11.4"} 1.0
# HELP process_virtual_memory_bytes Virtual memory size in bytes.
# TYPE process_virtual_memory_bytes gauge
process_virtual_memory_bytes 2.59424256e+08
# HELP process_resident_memory_bytes Resident memory size in bytes.
# TYPE process_resident_memory_bytes gauge
process_resident_memory_bytes 3.4029568e+07
# HELP process_start_time_seconds Start time of the process since unix epoch in seconds.
# TYPE process_start_time_seconds gauge
process_start_time_seconds 1.70012345678e+09
# HELP process_cpu_seconds_total Total user and system CPU time spent in seconds.
# TYPE process_cpu_seconds_total counter
process_cpu_seconds_total 0.52
# HELP sessions_requests_total Requests handled
# TYPE sessions_requests_total counter
sessions_requests_total{method="GET",path="/sessions/v1/{key}"} 12345.0
sessions_requests_total{method="POST",path="/sessions/v1/{key}"} 678.0
# HELP sessions_requests_created Requests handled
# TYPE sessions_requests_created gauge
sessions_requests_created{method="GET",path="/sessions/v1/{key}"} 1.7001234567890542e+09
sessions_requests_created{method="POST",path="/sessions/v1/{key}"} 1.7001234601234567e+09
# HELP sessions_in_flight Requests in flight
# TYPE sessions_in_flight gauge
sessions_in_flight 17.0
# HELP sessions_latency_seconds Latency
# TYPE sessions_latency_seconds histogram
sessions_latency_seconds_bucket{le="0.005"} 120.0
sessions_latency_seconds_bucket{le="+Inf"} 13023.0
sessions_latency_seconds_count 13023.0
sessions_latency_seconds_sum 42.42
# HELP sessions_latency_seconds_created Latency
# TYPE sessions_latency_seconds_created gauge
sessions_latency_seconds_created 1.7001234567891e+09
# HELP sessions_cache_ratio Odd values
# TYPE sessions_cache_ratio gauge
sessions_cache_ratio{kind="nan"} NaN
sessions_cache_ratio{kind="pos"} +Inf
sessions_cache_ratio{kind="neg"} -Inf
"#;

    #[test]
    fn go_fixture_values() {
        let t = GO_METRICS.as_bytes();
        assert_eq!(
            find_gauge(t, "process_resident_memory_bytes", &[]),
            Ok(1.82452224e8)
        );
        assert_eq!(
            find_gauge(t, "go_memstats_heap_inuse_bytes", &[]),
            Ok(9.8828288e7)
        );
        assert_eq!(
            find_gauge(t, "go_memstats_stack_inuse_bytes", &[]),
            Ok(6.5273856e7)
        );
        assert_eq!(
            find_gauge(t, "process_virtual_memory_bytes", &[]),
            Ok(1.2345e7)
        );
        assert_eq!(
            find_gauge(t, "process_virtual_memory_max_bytes", &[]),
            Ok(1.8446744073709552e19)
        );
        assert_eq!(find_gauge(t, "go_goroutines", &[]), Ok(5023.0));
        assert_eq!(
            find_gauge(t, "go_gc_duration_seconds", &[("quantile", "0.5")]),
            Ok(6.1519e-5)
        );
        assert_eq!(
            find_gauge(t, "go_gc_duration_seconds_count", &[]),
            Ok(1783.0)
        );
        assert_eq!(
            find_gauge(
                t,
                "http_request_duration_seconds_bucket",
                &[("code", "200"), ("le", "+Inf")]
            ),
            Ok(100400.0)
        );
        assert_eq!(
            find_gauge(t, "http_requests_total", &[("method", "POST")]),
            Ok(20011.0)
        );
    }

    #[test]
    fn exact_names_only() {
        let t = GO_METRICS.as_bytes();
        // A prefix of a real name, and a name that only appears in comments.
        assert_eq!(
            find_gauge(t, "go_memstats_heap", &[]),
            Err(PromError::NotFound {
                metric: "go_memstats_heap".into()
            })
        );
        assert!(matches!(
            find_gauge(t, "go_memstats_heap_inuse", &[]),
            Err(PromError::NotFound { .. })
        ));
    }

    #[test]
    fn label_escapes_are_decoded_when_matching() {
        let t = GO_METRICS.as_bytes();
        assert_eq!(
            find_gauge(
                t,
                "kask_build_info",
                &[
                    ("build_host", "build \"ci\"\\1"),
                    ("version", "v1.0.10, patched\nsecond line")
                ]
            ),
            Ok(1.0)
        );
        assert!(find_gauge(t, "kask_build_info", &[("version", "v1.0.10")]).is_err());
        let s = samples(t)
            .filter_map(Result::ok)
            .find(|s| s.name == "kask_build_info")
            .unwrap();
        let labels: Vec<(&str, String)> = s
            .labels
            .iter()
            .map(|(k, v)| (k, v.decoded().into_owned()))
            .collect();
        assert_eq!(
            labels,
            vec![
                ("build_date", "2020-06-11T10:00:00Z".to_string()),
                ("build_host", "build \"ci\"\\1".to_string()),
                ("go_version", "go1.19".to_string()),
                ("version", "v1.0.10, patched\nsecond line".to_string()),
            ]
        );
    }

    #[test]
    fn ambiguous_selection_is_an_error() {
        let t = GO_METRICS.as_bytes();
        let e = find_gauge(t, "http_requests_total", &[("method", "GET")]).unwrap_err();
        assert!(matches!(e, PromError::Ambiguous { .. }), "{e}");
        assert!(e.to_string().contains("add labels"), "{e}");
    }

    #[test]
    fn python_fixture_values() {
        let t = PYTHON_METRICS.as_bytes();
        assert_eq!(
            find_gauge(t, "process_resident_memory_bytes", &[]),
            Ok(3.4029568e7)
        );
        assert_eq!(
            find_gauge(t, "sessions_requests_created", &[("method", "POST")]),
            Ok(1.7001234601234567e9)
        );
        assert_eq!(
            find_gauge(
                t,
                "sessions_requests_total",
                &[("method", "GET"), ("path", "/sessions/v1/{key}")]
            ),
            Ok(12345.0)
        );
        assert_eq!(find_gauge(t, "sessions_in_flight", &[]), Ok(17.0));
        assert_eq!(
            find_gauge(t, "sessions_latency_seconds_bucket", &[("le", "+Inf")]),
            Ok(13023.0)
        );
        assert!(find_gauge(t, "sessions_cache_ratio", &[("kind", "nan")])
            .unwrap()
            .is_nan());
        assert_eq!(
            find_gauge(t, "sessions_cache_ratio", &[("kind", "pos")]),
            Ok(f64::INFINITY)
        );
        assert_eq!(
            find_gauge(t, "sessions_cache_ratio", &[("kind", "neg")]),
            Ok(f64::NEG_INFINITY)
        );
        // Go has no go_memstats here.
        assert!(matches!(
            find_gauge(t, "go_memstats_heap_inuse_bytes", &[]),
            Err(PromError::NotFound { .. })
        ));
    }

    #[test]
    fn every_fixture_line_parses() {
        for fixture in [GO_METRICS, PYTHON_METRICS] {
            let mut it = samples(fixture.as_bytes());
            let mut n = 0;
            for s in it.by_ref() {
                s.unwrap();
                n += 1;
            }
            assert!(n > 20);
            assert_eq!(it.truncated_line(), None);
        }
    }

    #[test]
    fn crlf_blank_lines_leading_blanks_and_tabs() {
        let body = b"\r\n# HELP a x\r\n\r\n  a 1\r\n\tb{x=\"1\"}\t2\r\nc { x = \"1\" , } 3 \r\n";
        assert_eq!(find_gauge(body, "a", &[]), Ok(1.0));
        assert_eq!(find_gauge(body, "b", &[("x", "1")]), Ok(2.0));
        assert_eq!(find_gauge(body, "c", &[("x", "1")]), Ok(3.0));
    }

    #[test]
    fn commas_braces_and_equals_inside_quotes() {
        let body = b"m{a=\"x,y}\",b=\"k=v\\\"}\"} 7\n";
        assert_eq!(
            find_gauge(body, "m", &[("a", "x,y}"), ("b", "k=v\"}")]),
            Ok(7.0)
        );
    }

    #[test]
    fn timestamps_and_exemplars() {
        let body =
            b"a 1 1700000000000\nb -2.5e-3 -5\nc 3 # {trace_id=\"x\"} 1\nd 4 12 # {t=\"y\"} 1 1\n";
        let all: Vec<Sample<'_>> = samples(body).map(Result::unwrap).collect();
        assert_eq!(all[0].timestamp_ms, Some(1_700_000_000_000));
        assert_eq!(all[1].value, -2.5e-3);
        assert_eq!(all[1].timestamp_ms, Some(-5));
        assert_eq!(all[2].value, 3.0);
        assert_eq!(all[2].timestamp_ms, None);
        assert_eq!(all[3].timestamp_ms, Some(12));
    }

    #[test]
    fn malformed_lines_are_reported_and_skipped() {
        let body = b"a 1\nbad{x=\"1} 2\nb notanumber\nc 1 2 3\nd{x=\"\\t\"} 1\ne\n9bad 1\nf{} 5\n";
        let items: Vec<_> = samples(body).collect();
        assert_eq!(items.len(), 8);
        assert!(items[0].is_ok());
        let errs: Vec<LineError> = items.iter().filter_map(|r| r.err()).collect();
        assert_eq!(
            errs.iter().map(|e| e.line).collect::<Vec<_>>(),
            vec![2, 3, 4, 5, 6, 7]
        );
        assert_eq!(find_gauge(body, "f", &[]), Ok(5.0));
        let e = find_gauge(body, "b", &[]).unwrap_err();
        assert_eq!(
            e,
            PromError::Malformed {
                metric: "b".into(),
                line: 3,
                reason: "invalid sample value"
            }
        );
        assert!(e.to_string().contains("line 3"), "{e}");
    }

    #[test]
    fn a_good_line_wins_over_a_malformed_one() {
        let body = b"a{x=\"1\"} oops\na{x=\"1\"} 4\n";
        assert_eq!(find_gauge(body, "a", &[]), Ok(4.0));
    }

    #[test]
    fn invalid_utf8_lines_are_skipped() {
        let mut body = b"a{x=\"".to_vec();
        body.extend_from_slice(&[0xff, 0xfe]);
        body.extend_from_slice(b"\"} 1\nb 2\n");
        let items: Vec<_> = samples(&body).collect();
        assert_eq!(items[0].unwrap_err().reason, "not valid UTF-8");
        assert_eq!(find_gauge(&body, "b", &[]), Ok(2.0));
        assert!(matches!(
            find_gauge(&body, "a", &[]),
            Err(PromError::Malformed { line: 1, .. })
        ));
        // Valid multi-byte UTF-8 in values is fine.
        assert_eq!(
            find_gauge("c{x=\"é✓\"} 3\n".as_bytes(), "c", &[("x", "é✓")]),
            Ok(3.0)
        );
    }

    #[test]
    fn incomplete_last_line_is_ignored() {
        let body = b"a 1\nprocess_resident_memory_bytes 123456789";
        assert_eq!(
            find_gauge(body, "process_resident_memory_bytes", &[]),
            Err(PromError::Truncated {
                metric: "process_resident_memory_bytes".into(),
                line: 2
            })
        );
        assert_eq!(find_gauge(body, "a", &[]), Ok(1.0));
        let mut it = samples(body);
        assert_eq!(it.by_ref().count(), 1);
        assert_eq!(it.truncated_line(), Some(2));
        // A `\r` without its `\n` is still incomplete.
        assert!(find_gauge(b"a 1\r", "a", &[]).is_err());
        let e = find_gauge(body, "process_resident_memory_bytes", &[]).unwrap_err();
        assert!(e.to_string().contains("truncated"), "{e}");
    }

    #[test]
    fn every_cut_of_the_go_body_is_safe_for_rss() {
        let body = GO_METRICS.as_bytes();
        let start = GO_METRICS
            .find("\nprocess_resident_memory_bytes 1")
            .unwrap();
        let end = start + 1 + GO_METRICS[start + 1..].find('\n').unwrap() + 1;
        for cut in 0..=body.len() {
            let got = find_gauge(&body[..cut], "process_resident_memory_bytes", &[]);
            if cut >= end {
                assert_eq!(got, Ok(1.82452224e8), "cut at {cut}");
            } else {
                assert!(got.is_err(), "cut at {cut}: {got:?}");
            }
        }
    }

    #[test]
    fn very_long_lines() {
        let mut body = String::from("big{v=\"");
        body.push_str(&"x".repeat(1 << 20));
        body.push_str("\"} 1\nsmall 2\n");
        assert_eq!(find_gauge(body.as_bytes(), "small", &[]), Ok(2.0));
        let v = "x".repeat(1 << 20);
        assert_eq!(find_gauge(body.as_bytes(), "big", &[("v", &v)]), Ok(1.0));
    }

    #[test]
    fn empty_label_value_matches_absent_label() {
        let body = b"a 1\n";
        assert_eq!(find_gauge(body, "a", &[("pod", "")]), Ok(1.0));
        assert!(find_gauge(body, "a", &[("pod", "x")]).is_err());
    }

    #[test]
    fn selectors() {
        let s = Selector::parse(" kask_build_info{version=\"v1.0.10, patched\\nsecond line\"} ")
            .unwrap();
        assert_eq!(s.name(), "kask_build_info");
        assert_eq!(
            s.labels(),
            &[(
                "version".to_string(),
                "v1.0.10, patched\nsecond line".to_string()
            )]
        );
        assert_eq!(s.find(GO_METRICS.as_bytes()), Ok(1.0));
        for bad in [
            "",
            "1abc",
            "a b",
            "a{",
            "a{x=1}",
            "a{x=\"1\",x=\"2\"}",
            "a 1",
        ] {
            let e = Selector::parse(bad).unwrap_err();
            assert!(matches!(e, PromError::BadSelector { .. }), "{bad}: {e}");
        }
        let e = Selector::parse("a{x=1}").unwrap_err();
        assert!(e.to_string().contains("quoted"), "{e}");
    }

    #[test]
    fn find_many_in_one_pass() {
        let sels: Vec<Selector> = [
            "process_resident_memory_bytes",
            "go_memstats_heap_inuse_bytes",
            "go_memstats_stack_inuse_bytes",
            "nope",
        ]
        .iter()
        .map(|s| Selector::parse(s).unwrap())
        .collect();
        let mut out = Vec::new();
        find_many(GO_METRICS.as_bytes(), &sels, &mut out);
        assert_eq!(out.len(), 4);
        assert_eq!(out[0], Ok(1.82452224e8));
        assert_eq!(out[1], Ok(9.8828288e7));
        assert_eq!(out[2], Ok(6.5273856e7));
        assert_eq!(
            out[3],
            Err(PromError::NotFound {
                metric: "nope".into()
            })
        );
        // More selectors than fit in one pass.
        let many: Vec<Selector> = (0..40)
            .map(|_| Selector::parse("go_threads").unwrap())
            .collect();
        find_many(GO_METRICS.as_bytes(), &many, &mut out);
        assert_eq!(out.len(), 40);
        assert!(out.iter().all(|r| *r == Ok(14.0)));
    }

    #[test]
    fn orca_header_forms() {
        assert_eq!(
            orca_mem_utilization("TEXT named_metrics.foo=0.5, mem_utilization=0.8"),
            Some(0.8)
        );
        assert_eq!(
            orca_mem_utilization("TEXT cpu_utilization:0.7,mem_utilization:0.9"),
            Some(0.9)
        );
        assert_eq!(orca_mem_utilization("mem_utilization:0.25"), Some(0.25));
        assert_eq!(
            orca_mem_utilization("TEXT named_metrics.mem_utilization=0.5"),
            None
        );
        assert_eq!(orca_mem_utilization("TEXT cpu_utilization=0.5"), None);
        assert_eq!(orca_mem_utilization("TEXT mem_utilization=1.7"), Some(1.0));
        assert_eq!(orca_mem_utilization("TEXT mem_utilization=-1"), Some(0.0));
        assert_eq!(orca_mem_utilization("TEXT mem_utilization=NaN"), None);
        assert_eq!(orca_mem_utilization("TEXT mem_utilization=x"), None);
        assert_eq!(
            orca_mem_utilization(r#"JSON {"mem_utilization": 0.8}"#),
            Some(0.8)
        );
        assert_eq!(
            orca_mem_utilization(
                r#"JSON {"cpuUtilization": 0.1, "memUtilization": "0.6", "namedMetrics": {"mem_utilization": 0.2}}"#
            ),
            Some(0.6)
        );
        assert_eq!(
            orca_mem_utilization(r#"JSON {"cpu_utilization": 0.8}"#),
            None
        );
        assert_eq!(orca_mem_utilization("JSON {not json"), None);
        assert_eq!(orca_mem_utilization("BIN CgQIARAB"), None);
        assert_eq!(orca_mem_utilization(""), None);
    }

    #[test]
    fn error_messages_name_the_metric() {
        let e = find_gauge(b"", "process_resident_memory_bytes", &[("pod", "a")]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "metric `process_resident_memory_bytes{pod=\"a\"}` not found in the metrics body"
        );
    }
}

#[cfg(all(test, not(target_arch = "wasm32")))]
mod proptests {
    use super::tests::{GO_METRICS, PYTHON_METRICS};
    use super::*;
    use proptest::prelude::*;

    /// Name, decoded labels, value, and the byte offset just after the line's newline.
    type Indexed = (String, Vec<(String, String)>, f64, usize);

    /// Every sample of a fixture.
    fn index(body: &str) -> Vec<Indexed> {
        let mut out = Vec::new();
        let mut offset = 0;
        for line in body.split_inclusive('\n') {
            offset += line.len();
            if let Ok(Some(s)) = parse_line(line.trim_end_matches('\n').as_bytes(), 0) {
                let labels = s
                    .labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.decoded().into_owned()))
                    .collect();
                out.push((s.name.to_string(), labels, s.value, offset));
            }
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            for s in samples(&bytes).flatten() {
                let _ = s.labels.iter().count();
            }
            let _ = find_gauge(&bytes, "a", &[("b", "c")]);
            if let Ok(text) = std::str::from_utf8(&bytes) {
                let _ = orca_mem_utilization(text);
                let _ = Selector::parse(text);
            }
        }

        #[test]
        fn exposition_like_noise_never_panics(
            parts in proptest::collection::vec(
                prop_oneof![
                    Just("a"), Just("{"), Just("}"), Just("\""), Just("\\"), Just("="),
                    Just(","), Just(" "), Just("\t"), Just("\n"), Just("\r"), Just("#"),
                    Just("1"), Just("e+"), Just("NaN"), Just("+Inf"), Just("x=\""), Just("é"),
                ],
                0..64,
            )
        ) {
            let body: String = parts.concat();
            for s in samples(body.as_bytes()).flatten() {
                for (_, v) in s.labels.iter() {
                    let _ = v.decoded();
                    let _ = v.matches("x");
                }
            }
            let _ = find_gauge(body.as_bytes(), "a", &[("x", "1")]);
            let _ = Selector::parse(&body);
        }

        #[test]
        fn truncation_never_yields_a_different_value(cut in 0usize..8192, which in 0usize..1000, python in any::<bool>()) {
            let body = if python { PYTHON_METRICS } else { GO_METRICS };
            let cut = cut % (body.len() + 1);
            let idx = index(body);
            let (name, labels, value, end) = &idx[which % idx.len()];
            let wanted: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            let got = find_gauge(&body.as_bytes()[..cut], name, &wanted);
            if *end <= cut {
                // The whole line survived: the value must be there.
                prop_assert!(got.as_ref().is_ok_and(|v| v.to_bits() == value.to_bits()), "{got:?}");
            } else {
                // Cut before or inside the line: never a value.
                prop_assert!(got.is_err(), "{got:?} for {name} cut at {cut}");
            }
        }

        #[test]
        fn numbers_round_trip(v in any::<f64>().prop_filter("finite", |v| v.is_finite())) {
            let body = format!("m {v:e}\n");
            prop_assert_eq!(find_gauge(body.as_bytes(), "m", &[]), Ok(v));
        }
    }
}
