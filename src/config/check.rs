//! The leaf of the configuration: the error every section reports and the range
//! helpers their `validate` methods use. It imports nothing from the crate, so every
//! mechanism can own its config type without depending on the assembled [`Config`](super::Config).

use std::fmt;

/// A configuration problem, located by the dotted path of the offending field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub field: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Field names and messages can quote the operator's input; control characters
        // are escaped so that the error stays one log line.
        let field = one_line(&self.field);
        let message = one_line(&self.message);
        if field.is_empty() {
            write!(f, "invalid plugin configuration: {message}")
        } else {
            write!(
                f,
                "invalid plugin configuration: field `{field}`: {message}"
            )
        }
    }
}

fn one_line(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return text.into();
    }
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect::<String>()
        .into()
}

/// `field` must lie in `[min, max]`.
pub fn check_range<N: PartialOrd + fmt::Display + Copy>(
    field: &str,
    value: N,
    min: N,
    max: N,
) -> Result<(), ConfigError> {
    if value < min || value > max {
        return Err(ConfigError::new(
            field,
            format!("must be between {min} and {max}, got {value}"),
        ));
    }
    Ok(())
}

/// `field` must be a finite number in `[min, max]`.
pub fn check_unit(field: &str, value: f64, min: f64, max: f64) -> Result<(), ConfigError> {
    if !value.is_finite() {
        return Err(ConfigError::new(
            field,
            format!("must be a finite number, got {value}"),
        ));
    }
    check_range(field, value, min, max)
}

/// Joins a section path and a field name.
pub fn field(section: &str, name: &str) -> String {
    format!("{section}.{name}")
}
