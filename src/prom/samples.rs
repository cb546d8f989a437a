//! Walking a body sample by sample: a streaming iterator over borrowed slices.

use std::borrow::Cow;

use super::LineError;

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
    pub(super) fn next_line(&mut self) -> Option<(usize, &'a [u8])> {
        let rest = self.text.get(self.pos..)?;
        if rest.is_empty() {
            return None;
        }
        self.line += 1;
        match rest
            .split(|&b| b == b'\n')
            .next()
            .filter(|l| l.len() < rest.len())
        {
            Some(line) => {
                self.pos += line.len() + 1;
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

pub(super) fn is_blank(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

pub(super) fn skip_blank(b: &[u8], mut i: usize) -> usize {
    while b.get(i).is_some_and(|&c| is_blank(c)) {
        i += 1;
    }
    i
}

/// End of a metric name `[a-zA-Z_:][a-zA-Z0-9_:]*` starting at `i` (`i` if none).
pub(super) fn scan_metric_name(b: &[u8], i: usize) -> usize {
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
pub(super) fn scan_label_name(b: &[u8], i: usize) -> usize {
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
pub(super) fn scan_quoted(b: &[u8], mut i: usize) -> Result<usize, &'static str> {
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
pub(super) fn scan_labels(b: &[u8], mut i: usize) -> Result<(usize, usize), &'static str> {
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
pub(super) fn scan_token(b: &[u8], mut i: usize) -> usize {
    while b.get(i).is_some_and(|&c| !is_blank(c)) {
        i += 1;
    }
    i
}

/// A sample value: a Go float, `NaN`, `+Inf`, `-Inf` (Rust's parser accepts the same
/// spellings, case-insensitively).
pub(super) fn parse_value(token: &str) -> Result<f64, &'static str> {
    token.parse::<f64>().map_err(|_| "invalid sample value")
}

/// Name and label set at the start of a line (or of a selector).
pub(super) struct Head<'a> {
    pub(super) name: &'a str,
    pub(super) labels: Labels<'a>,
    /// Index just after the name or the closing brace.
    pub(super) end: usize,
    pub(super) braces: bool,
}

pub(super) fn parse_head<'a>(text: &'a str, start: usize) -> Result<Head<'a>, &'static str> {
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
pub(super) fn parse_line(line: &[u8], line_no: usize) -> Result<Option<Sample<'_>>, &'static str> {
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
