"""The negative cache through a real Envoy (2 workers) in front of kask-sim."""

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import harness

QUIET = {"concurrency": {"enabled": False}, "admission": {"enabled": False}}


def store_gets(kask, code):
    return harness.metric_value(kask.metrics(), "http_requests_total",
                                {"code": str(code), "method": "GET"}) or 0


def test_cached_404_is_byte_identical_to_the_stores_own(sidecar):
    kask, envoy = sidecar(plugin=QUIET)
    path = "/sessions/v1/enwiki%3AMWSession%3A%3Cscript%3E%26"
    direct = harness.request(kask.port, "GET", path)
    first = harness.request(envoy.port, "GET", path)
    cached = harness.request(envoy.port, "GET", path)
    assert direct.status == first.status == cached.status == 404
    assert "x-sessionguard-cache" not in first.headers
    assert cached.headers["x-sessionguard-cache"] == "hit"
    assert cached.body == direct.body == first.body
    for h in ("content-type", "x-content-type-options"):
        assert cached.headers[h] == direct.headers[h]
    assert store_gets(kask, 404) == 2  # the direct one and the first through Envoy


def test_repeated_missing_key_reaches_the_store_once_per_ttl(sidecar):
    ttl_ms = 1000
    kask, envoy = sidecar(plugin={**QUIET, "negative_cache": {"ttl_ms": ttl_ms}})
    start = time.monotonic()
    sent = 0
    while time.monotonic() - start < 3.5:
        assert harness.request(envoy.port, "GET", "/sessions/v1/hot-missing").status == 404
        sent += 1
    reached = store_gets(kask, 404)
    # One miss per TTL period (4 periods started in 3.5 s), whatever the request count.
    print(f"{sent} GETs of one missing key in 3.5 s, {reached} reached the store")
    assert sent > 200
    assert 3 <= reached <= 5, reached
    # Every GET was either answered from the cache or reached the store (one client: no
    # coalescing), and the hit counter counts exactly the former.
    harness.wait_for(lambda: envoy.stats()["sessionguard.negcache.hits"] >= sent - reached, 2,
                     "hit counter")
    assert envoy.stats()["sessionguard.negcache.hits"] == sent - reached


def test_write_through_envoy_clears_the_cached_404(sidecar):
    # One worker: its own DELETE ends its reuse of the key's read at once (src/recent.rs);
    # across workers see the next test.
    kask, envoy = sidecar(plugin={**QUIET, "negative_cache": {"ttl_ms": 60000}}, concurrency=1)
    path = "/sessions/v1/frwiki%3AMWSession%3Anew-login"
    for _ in range(3):
        assert harness.request(envoy.port, "GET", path).status == 404
    assert harness.request(envoy.port, "POST", path, b"PHP.sig.data").status == 201
    r = harness.request(envoy.port, "GET", path)
    assert (r.status, r.body) == (200, b"PHP.sig.data")
    assert harness.request(envoy.port, "DELETE", path).status == 204
    # A logout marks the key missing: the next lookup is answered at the proxy.
    r = harness.request(envoy.port, "GET", path)
    assert r.status == 404 and r.headers.get("x-sessionguard-cache") == "hit"


def test_a_logout_through_another_worker_is_cached_once_the_reuse_window_passed(sidecar):
    """Both workers read a known key (each reuses its read for `local_reuse_ms`); after a
    DELETE every GET gets a 404, from the store at first on a worker still reusing its
    read, and from the cache on every worker once the window has passed."""
    window = 0.3
    kask, envoy = sidecar(plugin={**QUIET, "negative_cache": {"ttl_ms": 60000},
                                  "key_table": {"local_reuse_ms": int(window * 1000)}},
                          concurrency=2)
    path = "/sessions/v1/dewiki%3AMWSession%3Alogout-elsewhere"
    assert harness.request(envoy.port, "POST", path, b"PHP.sig.data").status == 201
    # New connection per request: the kernel spreads them over both workers.
    assert all(harness.request(envoy.port, "GET", path).status == 200 for _ in range(20))
    assert harness.request(envoy.port, "DELETE", path).status == 204
    deleted = time.monotonic()
    seen = []
    while time.monotonic() - deleted < 3 * window:
        sent = time.monotonic() - deleted
        r = harness.request(envoy.port, "GET", path)
        assert r.status == 404, r
        seen.append((sent, r.headers.get("x-sessionguard-cache") == "hit"))
    # Half a window of margin for the VM clock (a few ms behind when not read).
    late = [hit for sent, hit in seen if sent > 1.5 * window]
    early_misses = sum(1 for sent, hit in seen if sent <= window and not hit)
    print(f"{len(seen)} GETs after the DELETE: {early_misses} forwarded within the window, "
          f"{sum(late)} of {len(late)} after 1.5 windows from the cache")
    assert late and all(late)


def test_concurrent_lookups_of_one_missing_key_are_coalesced(sidecar):
    kask, envoy = sidecar(plugin=QUIET, kask_flags=("--get-delay-ms", "300"))
    path = "/sessions/v1/coalesce-me"
    with ThreadPoolExecutor(max_workers=24) as pool:
        results = list(pool.map(lambda _: harness.request(envoy.port, "GET", path), range(24)))
    assert [r.status for r in results] == [404] * 24
    assert len({r.body for r in results}) == 1
    # Single-flight is per worker: at most one lookup per Envoy worker reaches the store.
    assert store_gets(kask, 404) <= 2, store_gets(kask, 404)


def test_waiters_sent_on_to_the_store_time_their_own_round_trip(sidecar):
    """A key the store has but the filter does not know yet: the first GET leads and
    the others wait behind it. The leader's 200 cannot answer them, so they go to the
    store themselves, and the adaptive limit must see their real round trip (about
    the store's delay), not the ~0 ms between their response and the time they were
    woken: a 0 ms median would drag the baseline RTT down and the limit with it."""
    delay_ms = 300
    plugin = {"admission": {"enabled": False},
              "concurrency": {"mode": "adaptive", "adaptive": {"interval_ms": 100}}}
    kask, envoy = sidecar(plugin=plugin, kask_flags=("--get-delay-ms", str(delay_ms)),
                          concurrency=1)
    path = "/sessions/v1/enwiki%3AMWSession%3Aknown-to-the-store-only"
    assert harness.request(kask.port, "POST", path, b"PHP.sig.data").status == 201
    n = 40
    with ThreadPoolExecutor(max_workers=n) as pool:
        results = list(pool.map(lambda _: harness.request(envoy.port, "GET", path), range(n)))
    assert [r.status for r in results] == [200] * n
    # One Envoy worker: one leader, the rest waited and were sent on (not coalesced).
    assert store_gets(kask, 200) == n
    harness.wait_for(lambda: envoy.stats().get("sessionguard.sample_rtt_us", 0) > 0, 5,
                     "the adaptive limit's first window")
    sample_ms = envoy.stats()["sessionguard.sample_rtt_us"] / 1000
    print(f"median RTT of the window: {sample_ms:.1f} ms (store delay {delay_ms} ms)")
    assert sample_ms >= 0.8 * delay_ms, sample_ms


def test_no_stale_404_under_concurrent_writers_and_readers(sidecar):
    """Writers POST hot keys while readers hammer them: after a 201 has been received,
    no GET sent later may see a 404 (the store has the value; a 404 is the cache)."""
    kask, envoy = sidecar(plugin={**QUIET, "negative_cache": {"ttl_ms": 30000}},
                          concurrency=2)
    keys = [f"/sessions/v1/race{i}" for i in range(40)]
    acked: dict[str, float] = {}
    lock = threading.Lock()
    stop = threading.Event()
    stale = []
    reads = [0]

    def reader(seed):
        rng = random.Random(seed)
        import http.client
        conn = http.client.HTTPConnection("127.0.0.1", envoy.port, timeout=10)
        while not stop.is_set():
            key = rng.choice(keys)
            sent = time.monotonic()
            conn.request("GET", key)
            r = conn.getresponse()
            r.read()
            with lock:
                reads[0] += 1
                if r.status == 404 and key in acked and acked[key] < sent:
                    stale.append((key, r.getheader("x-sessionguard-cache")))

    def writer(seed):
        rng = random.Random(seed)
        order = keys[:]
        rng.shuffle(order)
        for key in order:
            time.sleep(rng.uniform(0.01, 0.05))
            r = harness.request(envoy.port, "POST", key, b"v")
            assert r.status == 201
            with lock:
                acked.setdefault(key, time.monotonic())

    readers = [threading.Thread(target=reader, args=(i,)) for i in range(8)]
    for t in readers:
        t.start()
    time.sleep(0.5)  # let the cache fill with 404s first
    writers = [threading.Thread(target=writer, args=(100 + i,)) for i in range(2)]
    for t in writers:
        t.start()
    for t in writers:
        t.join()
    time.sleep(0.5)
    stop.set()
    for t in readers:
        t.join()
    stats = envoy.stats()
    print(f"{reads[0]} reads, {len(acked)} keys written, stale 404s: {len(stale)}, "
          f"cache hits {stats['sessionguard.negcache.hits']}")
    assert len(acked) == len(keys)
    assert stats["sessionguard.negcache.hits"] > 100  # the cache was really in play
    assert stale == []
