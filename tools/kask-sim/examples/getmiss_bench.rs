//! Bounded closed-loop throughput check against a local kask-sim, GET misses by default or
//! POSTs (durable writes, group-committed) with `post`:
//! `cargo run --release -p kask-sim --example getmiss_bench -- PORT [CONNECTIONS] [SECONDS] [get|post]`.
//! Talks only to 127.0.0.1 and stops after at most 30 seconds.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

fn read_response(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<u16> {
    buf.clear();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = std::str::from_utf8(&buf[..end]).ok()?;
            let status = head.split(' ').nth(1)?.parse().ok()?;
            let len: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            while buf.len() < end + 4 + len {
                let n = s.read(&mut chunk).ok()?;
                if n == 0 {
                    return None;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            return Some(status);
        }
        let n = s.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let Some(port) = args.get(1).and_then(|p| p.parse::<u16>().ok()) else {
        eprintln!("usage: getmiss_bench PORT [CONNECTIONS] [SECONDS] [get|post]");
        std::process::exit(2);
    };
    let conns: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(32);
    let secs: u64 = args
        .get(3)
        .and_then(|s| s.parse().ok())
        .unwrap_or(5)
        .min(30);
    let post = args.get(4).is_some_and(|m| m == "post");
    let (expect, what) = if post {
        (201, "POSTs")
    } else {
        (404, "GET misses")
    };
    let deadline = Instant::now() + Duration::from_secs(secs);
    let start = Instant::now();
    let threads: Vec<_> = (0..conns)
        .map(|c| {
            std::thread::spawn(move || {
                let mut lat = Vec::new();
                let mut errors = 0u64;
                let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
                    return (lat, 1);
                };
                let _ = s.set_nodelay(true);
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let mut buf = Vec::with_capacity(1024);
                let mut i = 0u64;
                while Instant::now() < deadline {
                    let req = if post {
                        format!(
                            "POST /sessions/v1/enwiki%3AMWSession%3Aw{c}x{i} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/octet-stream\r\nContent-Length: 64\r\n\r\n{:064}",
                            i
                        )
                    } else {
                        format!(
                            "GET /sessions/v1/enwiki%3AMWSession%3Amiss{c}x{i} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
                        )
                    };
                    let t = Instant::now();
                    if s.write_all(req.as_bytes()).is_err() {
                        errors += 1;
                        break;
                    }
                    match read_response(&mut s, &mut buf) {
                        Some(code) if code == expect => lat.push(t.elapsed()),
                        Some(_) => errors += 1,
                        None => {
                            errors += 1;
                            break;
                        }
                    }
                    i += 1;
                }
                (lat, errors)
            })
        })
        .collect();
    let mut lat = Vec::new();
    let mut errors = 0;
    for t in threads {
        if let Ok((l, e)) = t.join() {
            lat.extend(l);
            errors += e;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    lat.sort();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .map(|d| d.as_secs_f64() * 1000.0)
            .unwrap_or(0.0)
    };
    println!(
        "{} {what} in {:.1}s over {conns} connections: {:.0} req/s; p50 {:.2} ms, p99 {:.2} ms; {errors} errors",
        lat.len(),
        elapsed,
        lat.len() as f64 / elapsed,
        pct(0.5),
        pct(0.99)
    );
}
