//! Scenario files: parsing (TOML, or JSON by extension) and validation.
//!
//! Parsing denies unknown fields and names the offending field path; the
//! validator collects every problem as `field.path: message`.

use serde::Deserialize;
use std::path::Path;
use std::time::Duration;

pub const MAX_RATE: f64 = 1_000_000.0;
pub const MAX_TOTAL_DURATION_S: f64 = 7.0 * 86_400.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Arrival {
    /// Exponential inter-arrival times (a Poisson process; the rate may vary).
    Poisson,
    /// Evenly spaced requests.
    Uniform,
}

impl Arrival {
    pub fn name(self) -> &'static str {
        match self {
            Arrival::Poisson => "poisson",
            Arrival::Uniform => "uniform",
        }
    }
}

// ---- raw file shapes ----------------------------------------------------

fn default_base_uri() -> String {
    "/sessions/v1/".to_string()
}
fn default_seed() -> u64 {
    1
}
fn default_connections() -> u64 {
    256
}
fn default_timeout_ms() -> u64 {
    3000
}
fn default_connect_timeout_ms() -> u64 {
    1200
}
fn default_arrival() -> Arrival {
    Arrival::Poisson
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScenarioFile {
    name: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default = "default_base_uri")]
    base_uri: String,
    #[serde(default = "default_seed")]
    seed: u64,
    #[serde(default = "default_connections")]
    connections: u64,
    #[serde(default = "default_timeout_ms")]
    timeout_ms: u64,
    #[serde(default = "default_connect_timeout_ms")]
    connect_timeout_ms: u64,
    #[serde(default = "default_arrival")]
    arrival: Arrival,
    #[serde(default)]
    mix: Option<MixFile>,
    #[serde(default)]
    keys: KeysFile,
    phases: Vec<PhaseFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MixFile {
    #[serde(default)]
    reader_miss: f64,
    #[serde(default)]
    user_get: f64,
    #[serde(default)]
    write: f64,
    #[serde(default)]
    delete: f64,
}

fn d_reader_space() -> u64 {
    1_000_000
}
fn d_zipf_s() -> f64 {
    1.0
}
fn d_session_pool() -> u64 {
    10_000
}
fn d_prefill_rate() -> f64 {
    1000.0
}
fn d_wiki_ids() -> Vec<String> {
    ["enwiki", "dewiki", "commonswiki", "wikidatawiki", "frwiki"]
        .iter()
        .map(|s| s.to_string())
        .collect()
}
fn d_value_min() -> u64 {
    200
}
fn d_value_max() -> u64 {
    600
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysFile {
    #[serde(default = "d_reader_space")]
    reader_space: u64,
    #[serde(default = "d_zipf_s")]
    zipf_s: f64,
    #[serde(default = "d_session_pool")]
    session_pool: u64,
    #[serde(default)]
    prefill: u64,
    #[serde(default = "d_prefill_rate")]
    prefill_rate: f64,
    #[serde(default = "d_wiki_ids")]
    wiki_ids: Vec<String>,
    #[serde(default = "d_value_min")]
    value_min_bytes: u64,
    #[serde(default = "d_value_max")]
    value_max_bytes: u64,
}

impl Default for KeysFile {
    fn default() -> Self {
        KeysFile {
            reader_space: d_reader_space(),
            zipf_s: d_zipf_s(),
            session_pool: d_session_pool(),
            prefill: 0,
            prefill_rate: d_prefill_rate(),
            wiki_ids: d_wiki_ids(),
            value_min_bytes: d_value_min(),
            value_max_bytes: d_value_max(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PhaseFile {
    #[serde(default)]
    name: Option<String>,
    duration_s: f64,
    #[serde(default)]
    rate: Option<f64>,
    #[serde(default)]
    rate_from: Option<f64>,
    #[serde(default)]
    rate_to: Option<f64>,
}

// ---- validated scenario -------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Mix {
    pub reader_miss: f64,
    pub user_get: f64,
    pub write: f64,
    pub delete: f64,
}

impl Default for Mix {
    /// The incident mix: ~85% reader misses, then logged-in traffic.
    fn default() -> Self {
        Mix {
            reader_miss: 0.85,
            user_get: 0.10,
            write: 0.04,
            delete: 0.01,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Keys {
    pub reader_space: u64,
    pub zipf_s: f64,
    pub session_pool: u64,
    pub prefill: u64,
    pub prefill_rate: f64,
    pub wiki_ids: Vec<String>,
    pub value_min_bytes: usize,
    pub value_max_bytes: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Phase {
    pub name: String,
    pub duration_s: f64,
    /// Rate at the start of the phase (req/s).
    pub rate_from: f64,
    /// Rate at the end of the phase (req/s); equal to `rate_from` when constant.
    pub rate_to: f64,
}

impl Phase {
    /// Expected number of requests in the phase.
    pub fn expected_requests(&self) -> f64 {
        (self.rate_from + self.rate_to) / 2.0 * self.duration_s
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Scenario {
    pub name: String,
    pub description: Option<String>,
    pub base_uri: String,
    pub seed: u64,
    pub connections: usize,
    pub timeout: Duration,
    pub connect_timeout: Duration,
    pub arrival: Arrival,
    pub mix: Mix,
    pub keys: Keys,
    pub phases: Vec<Phase>,
}

impl Scenario {
    pub fn total_duration_s(&self) -> f64 {
        self.phases.iter().map(|p| p.duration_s).sum()
    }

    pub fn expected_requests(&self) -> f64 {
        self.phases.iter().map(Phase::expected_requests).sum()
    }

    /// Multiply every rate by `rate` and every phase duration by `duration`.
    pub fn scaled(&self, rate: f64, duration: f64) -> Result<Scenario, String> {
        let mut errs = Vec::new();
        if !(rate.is_finite() && rate > 0.0) {
            errs.push(format!("--rate-scale: must be a number > 0 (got {rate})"));
        }
        if !(duration.is_finite() && duration > 0.0) {
            errs.push(format!(
                "--duration-scale: must be a number > 0 (got {duration})"
            ));
        }
        if !errs.is_empty() {
            return Err(errs.join("\n"));
        }
        let mut s = self.clone();
        for (i, p) in s.phases.iter_mut().enumerate() {
            p.rate_from *= rate;
            p.rate_to *= rate;
            p.duration_s *= duration;
            if p.rate_from.max(p.rate_to) > MAX_RATE {
                errs.push(format!(
                    "phases[{i}]: scaled rate {} exceeds {MAX_RATE} req/s",
                    p.rate_from.max(p.rate_to)
                ));
            }
        }
        if s.total_duration_s() > MAX_TOTAL_DURATION_S {
            errs.push(format!(
                "phases: scaled total duration {} s exceeds {MAX_TOTAL_DURATION_S} s",
                s.total_duration_s()
            ));
        }
        if errs.is_empty() {
            Ok(s)
        } else {
            Err(errs.join("\n"))
        }
    }
}

/// Load and validate a scenario file. JSON if the extension is `.json`,
/// TOML otherwise.
pub fn load(path: &Path) -> Result<Scenario, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
    let is_json = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("json"));
    let parsed = if is_json {
        parse_json(&text)
    } else {
        parse_toml(&text)
    };
    parsed.map_err(|e| format!("{}: {e}", path.display()))
}

fn path_prefix(path: &serde_path_to_error::Path) -> String {
    let p = path.to_string();
    if p == "." || p.is_empty() {
        String::new()
    } else {
        format!("{p}: ")
    }
}

pub fn parse_toml(text: &str) -> Result<Scenario, String> {
    let de = toml::Deserializer::parse(text).map_err(|e| e.to_string().trim().to_string())?;
    let raw: ScenarioFile = serde_path_to_error::deserialize(de)
        .map_err(|e| format!("{}{}", path_prefix(e.path()), e.inner().to_string().trim()))?;
    validate(raw)
}

pub fn parse_json(text: &str) -> Result<Scenario, String> {
    let mut de = serde_json::Deserializer::from_str(text);
    let raw: ScenarioFile = serde_path_to_error::deserialize(&mut de)
        .map_err(|e| format!("{}{}", path_prefix(e.path()), e.inner()))?;
    de.end().map_err(|e| e.to_string())?;
    validate(raw)
}

fn check_fraction(errs: &mut Vec<String>, field: &str, v: f64) {
    if !v.is_finite() || !(0.0..=1.0).contains(&v) {
        errs.push(format!("{field}: must be between 0 and 1 (got {v})"));
    }
}

fn check_rate(errs: &mut Vec<String>, field: &str, v: f64, allow_zero: bool) {
    if !v.is_finite() {
        errs.push(format!("{field}: must be a finite number"));
    } else if allow_zero && v < 0.0 {
        errs.push(format!("{field}: must be >= 0 (got {v})"));
    } else if !allow_zero && v <= 0.0 {
        errs.push(format!("{field}: must be > 0 (got {v})"));
    } else if v > MAX_RATE {
        errs.push(format!("{field}: must be <= {MAX_RATE} req/s (got {v})"));
    }
}

fn valid_wiki_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

fn valid_base_uri(s: &str) -> bool {
    s.starts_with('/')
        && s.ends_with('/')
        && s.len() <= 256
        && s.bytes()
            .all(|b| b.is_ascii_graphic() && !matches!(b, b'?' | b'#' | b'%' | b'"' | b'\\'))
}

fn validate(raw: ScenarioFile) -> Result<Scenario, String> {
    let mut errs: Vec<String> = Vec::new();

    if raw.name.trim().is_empty() {
        errs.push("name: must not be empty".into());
    }
    if !valid_base_uri(&raw.base_uri) {
        errs.push(format!(
            "base_uri: must start and end with '/' and contain only visible ASCII without '?', '#', '%' (got {:?})",
            raw.base_uri
        ));
    }
    if raw.connections == 0 || raw.connections > 60_000 {
        errs.push(format!(
            "connections: must be between 1 and 60000 (got {})",
            raw.connections
        ));
    }
    if raw.timeout_ms == 0 || raw.timeout_ms > 600_000 {
        errs.push(format!(
            "timeout_ms: must be between 1 and 600000 (got {})",
            raw.timeout_ms
        ));
    }
    if raw.connect_timeout_ms == 0 || raw.connect_timeout_ms > 600_000 {
        errs.push(format!(
            "connect_timeout_ms: must be between 1 and 600000 (got {})",
            raw.connect_timeout_ms
        ));
    }

    let mix = match raw.mix {
        None => Mix::default(),
        Some(m) => {
            check_fraction(&mut errs, "mix.reader_miss", m.reader_miss);
            check_fraction(&mut errs, "mix.user_get", m.user_get);
            check_fraction(&mut errs, "mix.write", m.write);
            check_fraction(&mut errs, "mix.delete", m.delete);
            let sum = m.reader_miss + m.user_get + m.write + m.delete;
            if sum.is_finite() && (sum - 1.0).abs() > 1e-6 {
                errs.push(format!(
                    "mix: fractions must sum to 1 (reader_miss + user_get + write + delete = {sum})"
                ));
            }
            Mix {
                reader_miss: m.reader_miss,
                user_get: m.user_get,
                write: m.write,
                delete: m.delete,
            }
        }
    };

    let k = raw.keys;
    if mix.reader_miss > 0.0 && (k.reader_space == 0 || k.reader_space > 1_000_000_000_000) {
        errs.push(format!(
            "keys.reader_space: must be between 1 and 10^12 (got {})",
            k.reader_space
        ));
    }
    if !k.zipf_s.is_finite() || !(0.0..=10.0).contains(&k.zipf_s) {
        errs.push(format!(
            "keys.zipf_s: must be between 0 and 10 (got {})",
            k.zipf_s
        ));
    }
    let needs_sessions = mix.user_get > 0.0 || mix.write > 0.0 || mix.delete > 0.0;
    if (needs_sessions || k.prefill > 0) && (k.session_pool == 0 || k.session_pool > 10_000_000) {
        errs.push(format!(
            "keys.session_pool: must be between 1 and 10000000 (got {})",
            k.session_pool
        ));
    }
    if k.prefill > k.session_pool {
        errs.push(format!(
            "keys.prefill: must be <= keys.session_pool ({} > {})",
            k.prefill, k.session_pool
        ));
    }
    if k.prefill > 0 {
        check_rate(&mut errs, "keys.prefill_rate", k.prefill_rate, false);
    }
    if (mix.user_get > 0.0 || mix.delete > 0.0) && mix.write == 0.0 && k.prefill == 0 {
        errs.push(
            "mix.write: user_get/delete need sessions: set mix.write > 0 or keys.prefill > 0"
                .into(),
        );
    }
    if k.wiki_ids.is_empty() {
        errs.push("keys.wiki_ids: must not be empty".into());
    }
    for (i, w) in k.wiki_ids.iter().enumerate() {
        if !valid_wiki_id(w) {
            errs.push(format!(
                "keys.wiki_ids[{i}]: must be 1-64 chars of [a-z0-9_-] (got {w:?})"
            ));
        }
    }
    if k.value_min_bytes > k.value_max_bytes {
        errs.push(format!(
            "keys.value_min_bytes: must be <= keys.value_max_bytes ({} > {})",
            k.value_min_bytes, k.value_max_bytes
        ));
    }
    if k.value_max_bytes > 1_000_000 {
        errs.push(format!(
            "keys.value_max_bytes: must be <= 1000000 (got {})",
            k.value_max_bytes
        ));
    }

    if raw.phases.is_empty() {
        errs.push("phases: at least one phase is required".into());
    }
    if raw.phases.len() > 10_000 {
        errs.push("phases: at most 10000 phases".into());
    }
    let mut phases = Vec::with_capacity(raw.phases.len());
    for (i, p) in raw.phases.iter().enumerate() {
        let f = |s: &str| format!("phases[{i}].{s}");
        if !p.duration_s.is_finite() || p.duration_s <= 0.0 {
            errs.push(format!(
                "{}: must be > 0 (got {})",
                f("duration_s"),
                p.duration_s
            ));
        }
        let (from, to) = match (p.rate, p.rate_from, p.rate_to) {
            (Some(r), None, None) => {
                check_rate(&mut errs, &f("rate"), r, false);
                (r, r)
            }
            (None, Some(a), Some(b)) => {
                check_rate(&mut errs, &f("rate_from"), a, true);
                check_rate(&mut errs, &f("rate_to"), b, true);
                if a == 0.0 && b == 0.0 {
                    errs.push(format!(
                        "{}: rate_from and rate_to cannot both be 0",
                        f("rate_to")
                    ));
                }
                (a, b)
            }
            (Some(_), _, _) => {
                errs.push(format!(
                    "phases[{i}]: set either rate or rate_from and rate_to, not both"
                ));
                (0.0, 0.0)
            }
            (None, Some(_), None) => {
                errs.push(format!("{}: required with rate_from", f("rate_to")));
                (0.0, 0.0)
            }
            (None, None, Some(_)) => {
                errs.push(format!("{}: required with rate_to", f("rate_from")));
                (0.0, 0.0)
            }
            (None, None, None) => {
                errs.push(format!(
                    "phases[{i}]: a rate is required (rate, or rate_from and rate_to)"
                ));
                (0.0, 0.0)
            }
        };
        let name = match &p.name {
            Some(n) if n.trim().is_empty() => {
                errs.push(format!("{}: must not be empty", f("name")));
                n.clone()
            }
            Some(n) => n.clone(),
            None => format!("phase{i}"),
        };
        phases.push(Phase {
            name,
            duration_s: p.duration_s,
            rate_from: from,
            rate_to: to,
        });
    }
    let total: f64 = phases.iter().map(|p| p.duration_s).sum();
    if total.is_finite() && total > MAX_TOTAL_DURATION_S {
        errs.push(format!(
            "phases: total duration must be <= {MAX_TOTAL_DURATION_S} s (got {total})"
        ));
    }

    if !errs.is_empty() {
        return Err(errs.join("\n"));
    }
    Ok(Scenario {
        name: raw.name,
        description: raw.description,
        base_uri: raw.base_uri,
        seed: raw.seed,
        connections: raw.connections as usize,
        timeout: Duration::from_millis(raw.timeout_ms),
        connect_timeout: Duration::from_millis(raw.connect_timeout_ms),
        arrival: raw.arrival,
        mix,
        keys: Keys {
            reader_space: k.reader_space.max(1),
            zipf_s: k.zipf_s,
            session_pool: k.session_pool,
            prefill: k.prefill,
            prefill_rate: k.prefill_rate,
            wiki_ids: k.wiki_ids,
            value_min_bytes: k.value_min_bytes as usize,
            value_max_bytes: k.value_max_bytes as usize,
        },
        phases,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "t"
seed = 3
connections = 10
timeout_ms = 500
[mix]
reader_miss = 0.85
user_get = 0.10
write = 0.04
delete = 0.01
[keys]
reader_space = 1000
zipf_s = 1.1
session_pool = 50
prefill = 10
[[phases]]
name = "steady"
duration_s = 2
rate = 100
[[phases]]
name = "ramp"
duration_s = 3
rate_from = 100
rate_to = 300
"#;

    fn err_of(text: &str) -> String {
        parse_toml(text).expect_err("should fail")
    }

    #[test]
    fn good_scenario_parses() {
        let s = parse_toml(GOOD).unwrap();
        assert_eq!(s.name, "t");
        assert_eq!(s.base_uri, "/sessions/v1/");
        assert_eq!(s.connections, 10);
        assert_eq!(s.timeout, Duration::from_millis(500));
        assert_eq!(s.arrival, Arrival::Poisson);
        assert_eq!(s.phases.len(), 2);
        assert_eq!(s.phases[1].rate_from, 100.0);
        assert_eq!(s.phases[1].rate_to, 300.0);
        assert!((s.total_duration_s() - 5.0).abs() < 1e-9);
        assert!((s.expected_requests() - (200.0 + 600.0)).abs() < 1e-9);
    }

    #[test]
    fn defaults_apply() {
        let s = parse_toml("name='x'\n[[phases]]\nduration_s=1\nrate=5\n").unwrap();
        assert_eq!(s.timeout, Duration::from_millis(3000));
        assert_eq!(s.mix, Mix::default());
        assert_eq!(s.keys.reader_space, 1_000_000);
        assert_eq!(s.phases[0].name, "phase0");
    }

    #[test]
    fn zero_rate_names_the_field() {
        let t = GOOD.replace("rate = 100\n[[phases]]", "rate = 0\n[[phases]]");
        let e = err_of(&t);
        assert!(e.contains("phases[0].rate: must be > 0"), "{e}");
        let t = GOOD.replace("rate_to = 300", "rate_to = -1");
        let e = err_of(&t);
        assert!(e.contains("phases[1].rate_to: must be >= 0"), "{e}");
    }

    #[test]
    fn unknown_field_is_rejected_with_path() {
        let t = GOOD.replace("rate = 100", "rate = 100\nrat = 5");
        let e = err_of(&t);
        assert!(
            e.contains("phases[0]") && e.contains("unknown field `rat`"),
            "{e}"
        );
        let t = GOOD.replace("seed = 3", "seed = 3\nbogus = true");
        let e = err_of(&t);
        assert!(e.contains("unknown field `bogus`"), "{e}");
        let t = GOOD.replace("zipf_s = 1.1", "zipf_s = 1.1\nzipf = 2");
        let e = err_of(&t);
        assert!(
            e.contains("keys") && e.contains("unknown field `zipf`"),
            "{e}"
        );
    }

    #[test]
    fn wrong_type_names_the_field() {
        let t = GOOD.replace("duration_s = 3", "duration_s = \"3\"");
        let e = err_of(&t);
        assert!(e.contains("phases[1].duration_s"), "{e}");
        let t = GOOD.replace("connections = 10", "connections = -4");
        let e = err_of(&t);
        assert!(e.contains("connections"), "{e}");
    }

    #[test]
    fn mix_must_sum_to_one() {
        let t = GOOD.replace("delete = 0.01", "delete = 0.2");
        let e = err_of(&t);
        assert!(e.contains("mix: fractions must sum to 1"), "{e}");
        let t = GOOD.replace("write = 0.04", "write = -0.04\nreader_miss2 = 1");
        assert!(err_of(&t).contains("unknown field `reader_miss2`"));
        let t = GOOD.replace("write = 0.04", "write = 1.5");
        assert!(err_of(&t).contains("mix.write: must be between 0 and 1"));
    }

    #[test]
    fn rate_forms_are_exclusive_and_complete() {
        let t = GOOD.replace("rate = 100\n", "rate = 100\nrate_to = 5\n");
        assert!(err_of(&t).contains("phases[0]: set either rate or rate_from and rate_to"));
        let t = GOOD.replace("rate_to = 300", "");
        assert!(err_of(&t).contains("phases[1].rate_to: required with rate_from"));
        let t = GOOD.replace("rate = 100\n", "");
        assert!(err_of(&t).contains("phases[0]: a rate is required"));
        let t = GOOD.replace(
            "rate_from = 100\nrate_to = 300",
            "rate_from = 0\nrate_to = 0",
        );
        assert!(err_of(&t).contains("cannot both be 0"));
    }

    #[test]
    fn many_errors_reported_together() {
        let t = GOOD
            .replace("duration_s = 2", "duration_s = 0")
            .replace("connections = 10", "connections = 0")
            .replace("zipf_s = 1.1", "zipf_s = -1")
            .replace("prefill = 10", "prefill = 100");
        let e = err_of(&t);
        for want in [
            "phases[0].duration_s: must be > 0",
            "connections: must be between 1 and 60000",
            "keys.zipf_s: must be between 0 and 10",
            "keys.prefill: must be <= keys.session_pool",
        ] {
            assert!(e.contains(want), "missing {want:?} in {e}");
        }
    }

    #[test]
    fn other_field_checks() {
        assert!(err_of(&GOOD.replace("name = \"t\"", "name = \"\""))
            .contains("name: must not be empty"));
        assert!(
            err_of(&GOOD.replace("seed = 3", "seed = 3\nbase_uri = \"sessions\""))
                .contains("base_uri:")
        );
        assert!(err_of(&GOOD.replace("timeout_ms = 500", "timeout_ms = 0")).contains("timeout_ms:"));
        assert!(
            err_of(&GOOD.replace("zipf_s = 1.1", "zipf_s = 1.1\nwiki_ids = [\"EN wiki\"]"))
                .contains("keys.wiki_ids[0]:")
        );
        assert!(
            err_of(&GOOD.replace("zipf_s = 1.1", "zipf_s = 1.1\nvalue_min_bytes = 900"))
                .contains("keys.value_min_bytes:")
        );
        assert!(err_of("name='x'\nphases=[]\n").contains("phases: at least one phase"));
        assert!(err_of("name='x'\n").contains("phases"));
        let e = err_of(
            "name='x'\n[mix]\nreader_miss=0.9\nuser_get=0.1\n[[phases]]\nduration_s=1\nrate=5\n",
        );
        assert!(e.contains("mix.write:"), "{e}");
    }

    #[test]
    fn syntax_error_is_an_error_not_a_panic() {
        let e = err_of("name = \n");
        assert!(!e.is_empty());
        assert!(parse_json("{").is_err());
        assert!(parse_json("[]").is_err());
    }

    #[test]
    fn json_is_accepted_and_validated() {
        let j = r#"{"name":"j","arrival":"uniform","phases":[{"duration_s":1,"rate":10}]}"#;
        let s = parse_json(j).unwrap();
        assert_eq!(s.arrival, Arrival::Uniform);
        let j = r#"{"name":"j","phases":[{"duration_s":1,"rate":10},{"duration_s":1,"rate":-1}]}"#;
        let e = parse_json(j).unwrap_err();
        assert!(e.contains("phases[1].rate: must be > 0"), "{e}");
        let j = r#"{"name":"j","phases":[{"duration_s":1,"rate":10,"x":1}]}"#;
        let e = parse_json(j).unwrap_err();
        assert!(
            e.contains("phases[0]") && e.contains("unknown field `x`"),
            "{e}"
        );
    }

    #[test]
    fn scaling() {
        let s = parse_toml(GOOD).unwrap();
        let t = s.scaled(2.0, 0.5).unwrap();
        assert_eq!(t.phases[1].rate_to, 600.0);
        assert_eq!(t.phases[1].duration_s, 1.5);
        assert!(s.scaled(0.0, 1.0).unwrap_err().contains("--rate-scale"));
        assert!(s
            .scaled(1.0, f64::NAN)
            .unwrap_err()
            .contains("--duration-scale"));
        assert!(s.scaled(1e9, 1.0).unwrap_err().contains("exceeds"));
    }
}
