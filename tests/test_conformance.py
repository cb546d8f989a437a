"""kask-sim speaks Kask's HTTP API exactly, directly and through Envoy + sessionguard.

Every row of the API: status, the headers Kask sets, and the body bytes.
"""

import json

import pytest

import harness

NOT_FOUND = ("https://www.mediawiki.org/wiki/Kask/errors/not_found", "Not found",
             "The value you requested was not found")
BAD_REQUEST = ("https://www.mediawiki.org/wiki/Kask/errors/bad_request", "Bad request",
               "The request was incorrect or malformed")


def problem(kind, instance: str) -> bytes:
    t, title, detail = kind
    # Go's json.MarshalIndent(p, "", "  ") + "\n", HTML-escaped.
    body = json.dumps({"type": t, "title": title, "detail": detail, "instance": instance},
                      indent=2, ensure_ascii=False)
    body = body.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return (body + "\n").encode()


def assert_problem(r, kind, instance, status):
    assert r.status == status, r
    assert r.headers["content-type"] == "application/json"
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.body == problem(kind, instance), r.body


VALUE = bytes(range(256)) * 3 + b"PHP.abc.s:5:\"hello\";"


@pytest.fixture(params=["direct", "envoy"])
def port(request, sidecar):
    k, e = sidecar()
    return k.port if request.param == "direct" else e.port


def test_post_get_delete_round_trip_is_byte_exact(port):
    key = "/sessions/v1/enwiki%3AMWSession%3Aabcdefghijklmnopqrstuvwxyz234567"
    r = harness.request(port, "POST", key, VALUE, {"content-type": "application/octet-stream"})
    assert r.status == 201 and r.body == b""
    assert "content-type" not in r.headers
    r = harness.request(port, "GET", key)
    assert r.status == 200
    assert r.headers["content-type"] == "application/octet-stream"
    assert r.body == VALUE
    # The same key, written with plain colons.
    r = harness.request(port, "GET", "/sessions/v1/enwiki:MWSession:abcdefghijklmnopqrstuvwxyz234567")
    assert r.status == 200 and r.body == VALUE
    r = harness.request(port, "DELETE", key)
    assert r.status == 204 and r.body == b""
    r = harness.request(port, "GET", key)
    assert_problem(r, NOT_FOUND, "/sessions/v1/enwiki:MWSession:abcdefghijklmnopqrstuvwxyz234567", 404)


def test_post_overwrites(port):
    harness.request(port, "POST", "/sessions/v1/k", b"one")
    assert harness.request(port, "POST", "/sessions/v1/k", b"two").status == 201
    assert harness.request(port, "GET", "/sessions/v1/k").body == b"two"


def test_delete_of_missing_key_is_204(port):
    assert harness.request(port, "DELETE", "/sessions/v1/never-written").status == 204


@pytest.mark.parametrize("path,instance", [
    ("/sessions/v1/missing", "/sessions/v1/missing"),
    ("/sessions/v1/a%3Cb%3E%26", "/sessions/v1/a<b>&"),
    ("/sessions/v1/", "/sessions/v1/"),
    ("/sessions/v1/cat/dog", "/sessions/v1/cat/dog"),
    ("/sessions/v1/cat%2Fdog", "/sessions/v1/cat/dog"),
])
def test_not_found_problems(port, path, instance):
    assert_problem(harness.request(port, "GET", path), NOT_FOUND, instance, 404)


@pytest.mark.parametrize("raw,escaped,instance", [
    ("/sessions/v1/a<b>", "/sessions/v1/a%3Cb%3E", "/sessions/v1/a<b>"),
    ("/sessions/v1/enwiki:MWSession:<script>`{|}", "/sessions/v1/enwiki%3AMWSession%3A%3Cscript%3E%60%7B%7C%7D",
     "/sessions/v1/enwiki:MWSession:<script>`{|}"),
])
def test_raw_characters_go_accepts_are_part_of_the_key(port, raw, escaped, instance):
    """Kask (Go's net/http) refuses a request target only for control bytes and bad
    escapes: a raw `<` or `>` is part of the key, the same key as its escaped spelling."""
    assert_problem(harness.request(port, "GET", raw), NOT_FOUND, instance, 404)
    assert harness.request(port, "POST", raw, b"raw").status == 201
    for spelling in (raw, escaped):
        r = harness.request(port, "GET", spelling)
        assert (r.status, r.body) == (200, b"raw"), (spelling, r)
    assert harness.request(port, "DELETE", escaped).status == 204
    assert_problem(harness.request(port, "GET", raw), NOT_FOUND, instance, 404)


@pytest.mark.parametrize("method,path,body,instance", [
    ("GET", "/sessions/v1/foo?bar", None, "/sessions/v1/foo"),
    ("GET", "/sessions/v1/foo?a=1", None, "/sessions/v1/foo"),
    ("POST", "/sessions/v1/foo", b"", "/sessions/v1/foo"),
    ("PUT", "/sessions/v1/foo", b"value", "/sessions/v1/foo"),
    ("PATCH", "/sessions/v1/foo", b"value", "/sessions/v1/foo"),
    ("HEAD", "/sessions/v1/foo", None, "/sessions/v1/foo"),
])
def test_bad_request_problems(port, method, path, body, instance):
    r = harness.request(port, method, path, body)
    if method == "HEAD":
        # A HEAD response has no body on the wire.
        assert r.status == 400 and r.body == b""
        return
    assert_problem(r, BAD_REQUEST, instance, 400)


def test_healthz(port):
    r = harness.request(port, "GET", "/healthz")
    assert r.status == 200
    assert r.headers["content-type"] == "application/json"
    assert set(json.loads(r.body)) == {"version", "build_date", "build_host", "go_version"}


def test_metrics(port):
    harness.request(port, "GET", "/sessions/v1/metrics-probe")
    r = harness.request(port, "GET", "/metrics")
    assert r.status == 200
    text = r.body.decode()
    assert harness.metric_value(text, "http_requests_total", {"code": "404", "method": "GET"}) >= 1
    for name in ("http_request_duration_seconds_bucket", "process_resident_memory_bytes",
                 "kask_build_info"):
        assert harness.metric_value(text, name) is not None, name
    assert 'le="0.0025"' in text and 'le="+Inf"' in text
    rss = harness.metric_value(text, "process_resident_memory_bytes")
    assert 1e6 < rss < 2e9


def test_unknown_route_is_gos_plain_404(port):
    r = harness.request(port, "GET", "/nope")
    assert r.status == 404
    assert r.body == b"404 page not found\n"
    assert r.headers["content-type"] == "text/plain; charset=utf-8"


def test_acknowledged_post_survives_restart(sidecar):
    k, e = sidecar()
    assert harness.request(e.port, "POST", "/sessions/v1/durable", b"kept").status == 201
    k.kill()
    k.start(port=k.port)
    harness.wait_for(lambda: harness.request(e.port, "GET", "/sessions/v1/durable").status == 200,
                     10, "store back behind envoy")
    assert harness.request(e.port, "GET", "/sessions/v1/durable").body == b"kept"
