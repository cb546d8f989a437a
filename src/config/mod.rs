//! Plugin configuration: JSON in, a typed and validated [`Config`] out.
//!
//! Every field has a safe default, so an empty configuration is valid. Anything
//! wrong is reported as one [`ConfigError`] that names the field by its dotted
//! path (`concurrency.max_limit`), because Envoy shows the operator only one
//! log line when it refuses the configuration.

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{Map, Value};

pub mod check;

use check::check_range;
pub use check::ConfigError;

use crate::admission::AdmissionConfig;
use crate::classify::Priorities;
use crate::keytable::KeyTableConfig;
use crate::limiter::ConcurrencyConfig;
use crate::negcache::NegativeCacheConfig;
use crate::pressure::MemoryConfig;
use crate::reply::RetryAfterConfig;

/// The whole plugin configuration (see the README's configuration reference).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Path prefix of the store's key API; the key is the single segment after it.
    pub base_uri: String,
    /// Which request classes may be shed before others.
    pub priorities: Priorities,
    pub concurrency: ConcurrencyConfig,
    pub admission: AdmissionConfig,
    pub memory: MemoryConfig,
    pub negative_cache: NegativeCacheConfig,
    /// The fixed-size table of recently seen keys, shared by the negative cache
    /// (keys known missing) and the priority classifier (keys known to exist).
    pub key_table: KeyTableConfig,
    pub retry_after: RetryAfterConfig,
    /// Bound on compare-and-swap attempts for one shared-data update.
    pub cas_attempts: u32,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            base_uri: "/sessions/v1/".to_string(),
            priorities: Priorities::default(),
            concurrency: ConcurrencyConfig::default(),
            admission: AdmissionConfig::default(),
            memory: MemoryConfig::default(),
            negative_cache: NegativeCacheConfig::default(),
            key_table: KeyTableConfig::default(),
            retry_after: RetryAfterConfig::default(),
            cas_attempts: 16,
        }
    }
}

impl Config {
    /// Parses and validates the plugin configuration. Empty input means "all defaults".
    pub fn parse(bytes: &[u8]) -> Result<Config, ConfigError> {
        let text = std::str::from_utf8(bytes)
            .map_err(|e| ConfigError::new("", format!("not UTF-8 text: {e}")))?;
        if text.trim().is_empty() {
            return Ok(Config::default());
        }
        let value: Value = serde_json::from_str(text)
            .map_err(|e| ConfigError::new("", format!("not valid JSON: {e}")))?;
        if !value.is_object() {
            return Err(ConfigError::new(
                "",
                "expected a JSON object at the top level",
            ));
        }
        let config: Config = deserialize_located(value)?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if !self.base_uri.starts_with('/') || !self.base_uri.ends_with('/') {
            return Err(ConfigError::new(
                "base_uri",
                format!(
                    "must start and end with `/` (like `/sessions/v1/`), got {:?}",
                    self.base_uri
                ),
            ));
        }
        if self.base_uri.contains(['?', '#', '%']) {
            return Err(ConfigError::new(
                "base_uri",
                format!(
                    "must be a plain path without `?`, `#` or `%`, got {:?}",
                    self.base_uri
                ),
            ));
        }
        check_range("cas_attempts", self.cas_attempts, 1, 1000)?;
        self.concurrency.validate("concurrency")?;
        self.admission.validate("admission")?;
        self.memory.validate("memory")?;
        self.negative_cache.validate("negative_cache")?;
        self.key_table.validate("key_table")?;
        self.retry_after.validate("retry_after")?;
        Ok(())
    }
}

/// Deserializes `value` into `T`; on failure, finds the innermost field responsible.
///
/// serde_json's messages for nested structs do not say which field was wrong. Every
/// section defaults all its fields, so a document holding a single field is valid
/// exactly when that field is: probing one field at a time locates the culprit
/// generically, whatever `T` is.
fn deserialize_located<T: DeserializeOwned>(value: Value) -> Result<T, ConfigError> {
    match serde_json::from_value::<T>(value.clone()) {
        Ok(t) => Ok(t),
        Err(whole) => Err(locate::<T>(&value, &mut Vec::new())
            .unwrap_or_else(|| ConfigError::new("", whole.to_string()))),
    }
}

fn locate<T: DeserializeOwned>(value: &Value, path: &mut Vec<String>) -> Option<ConfigError> {
    let Value::Object(fields) = value else {
        return None;
    };
    for (name, field_value) in fields {
        path.push(name.clone());
        let probe = nest(path, field_value.clone());
        if let Err(err) = serde_json::from_value::<T>(probe) {
            // Prefer the deepest location; fall back to this field.
            return locate::<T>(field_value, path)
                .or_else(|| Some(ConfigError::new(path.join("."), strip_position(&err))));
        }
        path.pop();
    }
    None
}

/// Builds `{"a": {"b": leaf}}` for the path `a.b`.
fn nest(path: &[String], leaf: Value) -> Value {
    path.iter().rev().fold(leaf, |inner, name| {
        let mut m = Map::new();
        m.insert(name.clone(), inner);
        Value::Object(m)
    })
}

/// serde_json appends "at line L column C" relative to the probe document, which
/// would mislead the operator; the field path replaces it.
fn strip_position(err: &serde_json::Error) -> String {
    let text = err.to_string();
    match text.rfind(" at line ") {
        Some(i) => text[..i].to_string(),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn err(json: &str) -> ConfigError {
        Config::parse(json.as_bytes()).unwrap_err()
    }

    #[test]
    fn empty_and_whitespace_mean_defaults() {
        assert_eq!(Config::parse(b"").unwrap(), Config::default());
        assert_eq!(Config::parse(b"  \n").unwrap(), Config::default());
        assert_eq!(Config::parse(b"{}").unwrap(), Config::default());
    }

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn not_json_is_reported_as_such() {
        let e = err("{not json");
        assert_eq!(e.field, "");
        assert!(e.message.starts_with("not valid JSON"), "{e}");
        let e = err("[1,2]");
        assert!(e.message.contains("JSON object"), "{e}");
        let e = Config::parse(&[0xff, 0xfe]).unwrap_err();
        assert!(e.message.contains("UTF-8"), "{e}");
    }

    #[test]
    fn unknown_top_level_field_is_named() {
        let e = err(r#"{"base_uri": "/x/", "bogus": 1}"#);
        assert_eq!(e.field, "bogus");
        assert!(e.message.contains("unknown field `bogus`"), "{e}");
    }

    #[test]
    fn unknown_nested_field_is_named_with_its_path() {
        let e = err(r#"{"concurrency": {"limitt": 5}}"#);
        assert_eq!(e.field, "concurrency.limitt");
        assert!(e.message.contains("unknown field"), "{e}");
    }

    #[test]
    fn wrong_type_is_named_with_its_path() {
        let e = err(r#"{"concurrency": {"enforce": true, "max_limit": "lots"}}"#);
        assert_eq!(e.field, "concurrency.max_limit");
        assert!(e.message.contains("invalid type"), "{e}");
        assert!(!e.message.contains("line"), "{e}");
    }

    #[test]
    fn out_of_range_is_named() {
        let e = err(r#"{"cas_attempts": 0}"#);
        assert_eq!(e.field, "cas_attempts");
        assert!(e.message.contains("between 1 and 1000"), "{e}");
    }

    #[test]
    fn local_reuse_is_bounded_and_can_be_off() {
        let e = err(r#"{"key_table": {"local_reuse_ms": 5000}}"#);
        assert_eq!(e.field, "key_table.local_reuse_ms");
        assert!(e.message.contains("between 0 and 1000"), "{e}");
        let c = Config::parse(br#"{"key_table": {"local_reuse_ms": 0}}"#).unwrap();
        assert_eq!(c.key_table.local_reuse_ms, 0);
    }

    #[test]
    fn base_uri_must_be_a_slash_delimited_path() {
        assert_eq!(err(r#"{"base_uri": "sessions/v1"}"#).field, "base_uri");
        assert_eq!(err(r#"{"base_uri": "/a?b/"}"#).field, "base_uri");
        let c = Config::parse(br#"{"base_uri": "/echoseen/v1/"}"#).unwrap();
        assert_eq!(c.base_uri, "/echoseen/v1/");
    }

    #[test]
    fn display_names_the_field() {
        let e = ConfigError::new("a.b", "must be positive");
        assert_eq!(
            e.to_string(),
            "invalid plugin configuration: field `a.b`: must be positive"
        );
    }

    // The memory section through the whole configuration (its own checks: pressure tests).
    #[test]
    fn memory_section_parses_and_refuses_retired_settings() {
        let c = Config::parse(
            br#"{"memory": {"enabled": true, "memory_limit_bytes": 419430400,
                "demand_gauges": [], "gauge": "container_memory_working_set_bytes{container=\"kask\"}",
                "bytes_per_request": 40000}}"#,
        )
        .unwrap();
        assert!(c.memory.demand_gauges.is_empty());
        assert_eq!(c.memory.bytes_per_request, Some(40000));
        // What a new user writes: the limit, nothing else.
        let c = Config::parse(br#"{"memory": {"enabled": true, "memory_limit_bytes": 419430400}}"#)
            .unwrap();
        assert_eq!(c.memory.bytes_per_request, None);
        // Settings the ceiling retired are refused, by name.
        for retired in [
            "critical_max_shed",
            "min_limit_factor",
            "fall_smoothing",
            "drop_on_failure",
        ] {
            let json = format!(r#"{{"memory": {{"{retired}": 0}}}}"#);
            let e = Config::parse(json.as_bytes()).unwrap_err();
            assert!(e.to_string().contains(retired), "{e}");
        }
    }

    #[test]
    fn memory_errors_name_the_field() {
        let err = |json: &str| Config::parse(json.as_bytes()).unwrap_err();
        let cases = [
            (r#"{"memory": {"bogus": 1}}"#, "memory.bogus"),
            (
                r#"{"memory": {"enabled": true}}"#,
                "memory.memory_limit_bytes",
            ),
            (
                r#"{"memory": {"memory_limit_bytes": 400}}"#,
                "memory.memory_limit_bytes",
            ),
            (r#"{"memory": {"gauge": "rss bytes"}}"#, "memory.gauge"),
            (
                r#"{"memory": {"demand_gauges": ["a", "b{x=1}"]}}"#,
                "memory.demand_gauges[1]",
            ),
            (
                r#"{"memory": {"demand_gauges": ["a", "a"]}}"#,
                "memory.demand_gauges[1]",
            ),
            (
                r#"{"memory": {"demand_gauges": ["a","b","c","d","e","f","g","h","i"]}}"#,
                "memory.demand_gauges",
            ),
            (
                r#"{"memory": {"endpoints": [{}, {"path": "metrics"}]}}"#,
                "memory.endpoints[1].path",
            ),
            (
                r#"{"memory": {"endpoints": [{"cluster": ""}]}}"#,
                "memory.endpoints[0].cluster",
            ),
            (r#"{"memory": {"hard": 0.5}}"#, "memory.hard"),
            (r#"{"memory": {"critical": 1.2}}"#, "memory.critical"),
            (
                r#"{"memory": {"bytes_per_request": 100}}"#,
                "memory.bytes_per_request",
            ),
        ];
        for (json, field) in cases {
            let e = err(json);
            assert_eq!(e.field, field, "{json}: {e}");
        }
        let e = err(r#"{"memory": {"gauge": "a{x=1}"}}"#);
        assert!(e.message.contains("quoted"), "{e}");
    }
}
