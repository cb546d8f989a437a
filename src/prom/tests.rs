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
    let s =
        Selector::parse(" kask_build_info{version=\"v1.0.10, patched\\nsecond line\"} ").unwrap();
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
fn error_messages_name_the_metric() {
    let e = find_gauge(b"", "process_resident_memory_bytes", &[("pod", "a")]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "metric `process_resident_memory_bytes{pod=\"a\"}` not found in the metrics body"
    );
}
