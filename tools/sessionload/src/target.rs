//! The target URL: parsing, and the loopback-only rule.

use hyper::Uri;
use std::net::{IpAddr, SocketAddr};

#[derive(Debug, Clone)]
pub struct Target {
    /// As given, normalised to `http://host:port`.
    pub url: String,
    /// Value for the Host header.
    pub host_header: String,
    pub addr: SocketAddr,
}

fn is_loopback_ip(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(), // 127.0.0.0/8
        IpAddr::V6(v6) => v6.is_loopback(), // ::1
    }
}

/// Split and check a target URL without resolving it.
/// Returns (host without brackets, port, host header).
pub fn parse(url: &str) -> Result<(String, u16, String), String> {
    let uri: Uri = url
        .parse()
        .map_err(|e| format!("--target: not a URL ({e}): {url:?}"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some(s) => return Err(format!("--target: only http:// is supported (got {s}://)")),
        None => return Err(format!("--target: must start with http:// (got {url:?})")),
    }
    let auth = uri
        .authority()
        .ok_or_else(|| format!("--target: missing host in {url:?}"))?;
    if auth.as_str().contains('@') {
        return Err("--target: user info is not supported".into());
    }
    if !(uri.path().is_empty() || uri.path() == "/") || uri.query().is_some() {
        return Err(format!(
            "--target: give only scheme, host and port (the path comes from the scenario's base_uri), got {url:?}"
        ));
    }
    let host = auth
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    if host.is_empty() {
        return Err(format!("--target: missing host in {url:?}"));
    }
    let port = auth.port_u16().unwrap_or(80);
    Ok((host, port, auth.as_str().to_string()))
}

/// Whether a host (literal IP or name) is on the loopback allow-list:
/// 127.0.0.0/8, ::1 or `localhost`.
pub fn host_is_loopback(host: &str) -> bool {
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    host.parse::<IpAddr>().is_ok_and(is_loopback_ip)
}

/// Parse, check and resolve the target. Non-loopback targets are refused
/// unless `allow_non_loopback`.
pub async fn resolve(url: &str, allow_non_loopback: bool) -> Result<Target, String> {
    let (host, port, host_header) = parse(url)?;
    if !allow_non_loopback && !host_is_loopback(&host) {
        return Err(format!(
            "--target: {host} is not a loopback address (127.0.0.0/8, ::1, localhost); \
             refusing to send load elsewhere without --allow-non-loopback"
        ));
    }
    let addr = if let Ok(ip) = host.parse::<IpAddr>() {
        SocketAddr::new(ip, port)
    } else {
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), port))
            .await
            .map_err(|e| format!("--target: cannot resolve {host}: {e}"))?
            .collect();
        let pick = if allow_non_loopback {
            addrs.first().copied()
        } else {
            // `localhost` must still land on loopback.
            addrs.iter().copied().find(|a| is_loopback_ip(a.ip()))
        };
        pick.ok_or_else(|| {
            format!("--target: {host} did not resolve to a usable (loopback) address")
        })?
    };
    let shown = match addr.ip() {
        IpAddr::V6(_) => format!("http://[{}]:{port}", host),
        IpAddr::V4(_) => format!("http://{host}:{port}"),
    };
    Ok(Target {
        url: shown,
        host_header,
        addr,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_rule() {
        for ok in ["127.0.0.1", "127.255.3.4", "::1", "localhost", "LOCALHOST"] {
            assert!(host_is_loopback(ok), "{ok}");
        }
        for bad in [
            "10.0.0.1",
            "192.168.1.1",
            "8.8.8.8",
            "::2",
            "example.org",
            "128.0.0.1",
            "0.0.0.0",
        ] {
            assert!(!host_is_loopback(bad), "{bad}");
        }
    }

    #[test]
    fn parse_targets() {
        assert_eq!(
            parse("http://127.0.0.1:8081").unwrap(),
            ("127.0.0.1".into(), 8081, "127.0.0.1:8081".into())
        );
        assert_eq!(parse("http://[::1]:9/").unwrap().0, "::1");
        assert_eq!(parse("http://localhost").unwrap().1, 80);
        assert!(parse("https://127.0.0.1:1").is_err());
        assert!(parse("127.0.0.1:1").is_err());
        assert!(parse("http://127.0.0.1:1/sessions/v1/").is_err());
        assert!(parse("http://127.0.0.1:1/?a=b").is_err());
        assert!(parse("not a url").is_err());
        assert!(parse("").is_err());
    }

    #[tokio::test]
    async fn resolve_refuses_non_loopback() {
        let e = resolve("http://10.1.2.3:80", false).await.unwrap_err();
        assert!(e.contains("not a loopback"), "{e}");
        let t = resolve("http://10.1.2.3:80", true).await.unwrap();
        assert_eq!(t.addr.to_string(), "10.1.2.3:80");
        let t = resolve("http://127.0.0.1:8081", false).await.unwrap();
        assert_eq!(t.addr.to_string(), "127.0.0.1:8081");
        let t = resolve("http://[::1]:8081", false).await.unwrap();
        assert_eq!(t.addr.to_string(), "[::1]:8081");
        assert_eq!(t.host_header, "[::1]:8081");
    }
}
