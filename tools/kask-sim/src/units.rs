//! Parsing of command-line quantities.

/// Parses a byte size as Kubernetes writes memory limits: a plain integer, a binary suffix
/// (`Ki`, `Mi`, `Gi`, `Ti`, optionally followed by `B`) or a decimal one (`k`/`K`, `M`, `G`, `T`).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(split);
    if num.is_empty() {
        return Err(format!(
            "'{s}' is not a byte size (examples: 36864, 64Mi, 300Mi, 1Gi)"
        ));
    }
    let n: u64 = num.parse().map_err(|_| format!("'{s}' is too large"))?;
    let mult: u64 = match suffix {
        "" | "B" => 1,
        "Ki" | "KiB" => 1 << 10,
        "Mi" | "MiB" => 1 << 20,
        "Gi" | "GiB" => 1 << 30,
        "Ti" | "TiB" => 1 << 40,
        "k" | "K" | "kB" | "KB" => 1_000,
        "M" | "MB" => 1_000_000,
        "G" | "GB" => 1_000_000_000,
        "T" | "TB" => 1_000_000_000_000,
        other => {
            return Err(format!(
                "unknown size suffix '{other}' in '{s}' (use Ki, Mi, Gi, Ti, k, M, G or T)"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("'{s}' is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("36864"), Ok(36_864));
        assert_eq!(parse_bytes("300Mi"), Ok(300 << 20));
        assert_eq!(parse_bytes("400Mi"), Ok(400 << 20));
        assert_eq!(parse_bytes("64Mi"), Ok(64 << 20));
        assert_eq!(parse_bytes("36Ki"), Ok(36 << 10));
        assert_eq!(parse_bytes("1Gi"), Ok(1 << 30));
        assert_eq!(parse_bytes("2GiB"), Ok(2 << 30));
        assert_eq!(parse_bytes("300M"), Ok(300_000_000));
        assert_eq!(parse_bytes("5k"), Ok(5_000));
        assert!(parse_bytes("").is_err());
        assert!(parse_bytes("Mi").is_err());
        assert!(parse_bytes("-1").is_err());
        assert!(parse_bytes("10Xi").is_err());
        assert!(parse_bytes("1.5Gi").is_err());
        assert!(parse_bytes("99999999999999999999").is_err());
        assert!(parse_bytes("99999999999Ti").is_err());
    }
}
