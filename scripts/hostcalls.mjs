// Counts the hostcalls a proxy-wasm filter makes per request, path by path.
//
// Envoy does not log hostcalls, so this is a tiny proxy-wasm host in Node (no
// dependencies): it loads the built .wasm, implements the ABI imports the way Envoy
// does for what sessionguard uses (header maps, shared data with CAS, local replies,
// time, metrics, http calls, effective context), drives whole request lifecycles
// (create context -> request headers [-> body] -> response headers -> body -> log ->
// done -> delete) and counts every import called, per callback. It also counts the
// host's calls back into the module to allocate returned data
// (`proxy_on_memory_allocate`), which cost a V8 boundary crossing each in Envoy too.
//
// Usage: node scripts/hostcalls.mjs [--json] [sessionguard.wasm] [noop_filter.wasm]
// Exit status is non-zero if a path did not end the way it should (e.g. the cache hit
// did not answer 404 locally), so the counts are known to describe the right path.

import { readFileSync } from "node:fs";
import { randomFillSync } from "node:crypto";

const OK = 0, NOT_FOUND = 1, CAS_MISMATCH = 8, UNIMPLEMENTED = 12;
const MAP = { 0: "request_headers", 1: "request_trailers", 2: "response_headers", 3: "response_trailers", 6: "call_response_headers" };
const utf8 = new TextDecoder();
const enc = new TextEncoder();

class Host {
  constructor(path, pluginConfig) {
    this.path = path;
    this.pluginConfig = enc.encode(pluginConfig);
    this.shared = new Map(); // key -> { value: Uint8Array, cas }
    this.nextCas = 1;
    this.maps = {};          // per context id: { type -> [[k, v], ...] }
    this.current = 0;        // context id the module is running for
    this.effective = 0;
    this.counts = null;      // null = not counting
    this.phase = "";
    this.localReplies = [];
    this.calls = [];         // pending http calls: { token, context }
    this.nextToken = 1;
    this.clockNs = 1_750_000_000_000_000_000n;
    this.logs = [];
    this.metrics = 0;
    this.answerPolls = true;
  }

  count(name) {
    if (!this.counts) return;
    const key = `${this.phase}:${name}`;
    this.counts[key] = (this.counts[key] || 0) + 1;
  }

  mem() { return new DataView(this.exports.memory.buffer); }
  bytes(ptr, len) { return new Uint8Array(this.exports.memory.buffer, ptr, len).slice(); }
  str(ptr, len) { return utf8.decode(this.bytes(ptr, len)); }

  /** Copies `data` into module memory the way Envoy does: through the module's allocator. */
  give(data, retPtr, retSize) {
    this.count("(alloc callback)");
    const ptr = this.exports.proxy_on_memory_allocate(data.length);
    new Uint8Array(this.exports.memory.buffer, ptr, data.length).set(data);
    const m = this.mem();
    m.setUint32(retPtr, ptr, true);
    m.setUint32(retSize, data.length, true);
  }

  mapOf(type) {
    const ctx = this.maps[this.effective] || {};
    return ctx[type];
  }

  imports() {
    const h = this;
    const env = {
      proxy_log(level, ptr, len) {
        h.count("proxy_log");
        const msg = h.str(ptr, len);
        h.logs.push([level, msg]);
        if (level >= 4) process.stderr.write(`wasm log (level ${level}): ${msg}\n`);
        return OK;
      },
      proxy_get_current_time_nanoseconds(ptr) {
        h.count("proxy_get_current_time_nanoseconds");
        h.mem().setBigUint64(ptr, h.clockNs, true);
        return OK;
      },
      proxy_set_tick_period_milliseconds() { h.count("proxy_set_tick_period_milliseconds"); return OK; },
      proxy_get_buffer_bytes(type, start, max, retPtr, retSize) {
        h.count("proxy_get_buffer_bytes");
        let data;
        if (type === 7) data = h.pluginConfig;
        else if (type === 4) data = h.callBody || new Uint8Array();
        else return NOT_FOUND;
        h.give(data.subarray(start, start + max), retPtr, retSize);
        return OK;
      },
      proxy_get_header_map_value(type, kPtr, kLen, retPtr, retSize) {
        h.count("proxy_get_header_map_value");
        const key = h.str(kPtr, kLen);
        const map = h.mapOf(type);
        const hit = map && map.find(([k]) => k === key);
        if (!hit) return NOT_FOUND;
        h.give(enc.encode(hit[1]), retPtr, retSize);
        return OK;
      },
      proxy_get_header_map_pairs(type, retPtr, retSize) {
        h.count("proxy_get_header_map_pairs");
        const map = h.mapOf(type) || [];
        const parts = map.map(([k, v]) => [enc.encode(k), enc.encode(v)]);
        let size = 4 + parts.length * 8;
        for (const [k, v] of parts) size += k.length + v.length + 2;
        const out = new Uint8Array(size);
        const dv = new DataView(out.buffer);
        dv.setUint32(0, parts.length, true);
        let at = 4;
        for (const [k, v] of parts) { dv.setUint32(at, k.length, true); dv.setUint32(at + 4, v.length, true); at += 8; }
        for (const [k, v] of parts) { out.set(k, at); at += k.length + 1; out.set(v, at); at += v.length + 1; }
        h.give(out, retPtr, retSize);
        return OK;
      },
      proxy_get_shared_data(kPtr, kLen, retPtr, retSize, retCas) {
        h.count("proxy_get_shared_data");
        const e = h.shared.get(h.str(kPtr, kLen));
        if (!e) return NOT_FOUND;
        h.give(e.value, retPtr, retSize);
        h.mem().setUint32(retCas, e.cas, true);
        return OK;
      },
      proxy_set_shared_data(kPtr, kLen, vPtr, vLen, cas) {
        h.count("proxy_set_shared_data");
        const key = h.str(kPtr, kLen);
        const e = h.shared.get(key);
        // Envoy: a CAS of 0 writes unconditionally; an absent key accepts any CAS.
        if (e && cas !== 0 && e.cas !== cas) return CAS_MISMATCH;
        h.shared.set(key, { value: h.bytes(vPtr, vLen), cas: h.nextCas++ });
        return OK;
      },
      proxy_send_local_response(status, dPtr, dLen, bPtr, bLen, hPtr, hLen) {
        h.count("proxy_send_local_response");
        const headers = [];
        const raw = h.bytes(hPtr, hLen);
        const dv = new DataView(raw.buffer);
        const n = raw.length >= 4 ? dv.getUint32(0, true) : 0;
        let at = 4 + n * 8;
        for (let i = 0; i < n; i++) {
          const kl = dv.getUint32(4 + i * 8, true), vl = dv.getUint32(8 + i * 8, true);
          const k = utf8.decode(raw.subarray(at, at + kl)); at += kl + 1;
          const v = utf8.decode(raw.subarray(at, at + vl)); at += vl + 1;
          headers.push([k, v]);
        }
        h.localReplies.push({ context: h.effective, status, details: h.str(dPtr, dLen), headers, body: h.str(bPtr, bLen) });
        return OK;
      },
      proxy_define_metric(type, nPtr, nLen, retId) { h.count("proxy_define_metric"); h.mem().setUint32(retId, ++h.metrics, true); return OK; },
      proxy_increment_metric() { h.count("proxy_increment_metric"); return OK; },
      proxy_record_metric() { h.count("proxy_record_metric"); return OK; },
      proxy_set_effective_context(id) { h.count("proxy_set_effective_context"); h.effective = id; return OK; },
      proxy_continue_stream() { h.count("proxy_continue_stream"); return OK; },
      proxy_http_call(uPtr, uLen, hPtr, hLen, bPtr, bLen, tPtr, tLen, timeout, retToken) {
        h.count("proxy_http_call");
        const token = h.nextToken++;
        h.calls.push({ token, context: h.current, cluster: h.str(uPtr, uLen) });
        h.mem().setUint32(retToken, token, true);
        return OK;
      },
      proxy_get_property() { h.count("proxy_get_property"); return NOT_FOUND; },
      proxy_done() { h.count("proxy_done"); return OK; },
    };
    const wasi = {
      random_get(ptr, len) { randomFillSync(new Uint8Array(h.exports.memory.buffer, ptr, len)); return 0; },
      environ_get() { return 0; },
      environ_sizes_get(countPtr, sizePtr) { const m = h.mem(); m.setUint32(countPtr, 0, true); m.setUint32(sizePtr, 0, true); return 0; },
      fd_write(fd, iovs, iovsLen, nwritten) {
        const m = h.mem(); let total = 0;
        for (let i = 0; i < iovsLen; i++) {
          const p = m.getUint32(iovs + i * 8, true), l = m.getUint32(iovs + i * 8 + 4, true);
          process.stderr.write(h.str(p, l)); total += l;
        }
        m.setUint32(nwritten, total, true); return 0;
      },
      proc_exit(code) { throw new Error(`proc_exit(${code})`); },
    };
    // Every other import the SDK declares: present, counted, unimplemented.
    const module = new WebAssembly.Module(readFileSync(this.path));
    this.module = module;
    for (const imp of WebAssembly.Module.imports(module)) {
      const table = imp.module === "env" ? env : wasi;
      if (imp.kind === "function" && !(imp.name in table)) {
        table[imp.name] = () => { h.count(imp.name); return UNIMPLEMENTED; };
      }
    }
    return { env, wasi_snapshot_preview1: wasi };
  }

  start() {
    const importObject = this.imports();
    const instance = new WebAssembly.Instance(this.module, importObject);
    this.exports = instance.exports;
    if (this.exports._initialize) this.exports._initialize();
    this.root = 1;
    this.call("root", "proxy_on_context_create", this.root, 0);
    if (!this.call("root", "proxy_on_vm_start", this.root, 0)) throw new Error("vm start refused");
    if (!this.call("root", "proxy_on_configure", this.root, this.pluginConfig.length)) {
      throw new Error(`configuration refused: ${JSON.stringify(this.logs)}`);
    }
    this.nextContext = 100;
  }

  call(phase, fn, ...args) {
    const prev = [this.phase, this.current, this.effective];
    this.phase = phase;
    this.current = this.effective = args[0];
    try {
      return this.exports[fn](...args);
    } finally {
      [this.phase, this.current, this.effective] = prev;
    }
  }

  tick(ms = 100) {
    this.clockNs += BigInt(ms) * 1_000_000n;
    this.call("tick", "proxy_on_tick", this.root);
    // Answer metrics polls as a Kask pod would (unless told not to).
    if (!this.answerPolls) return;
    for (const c of this.calls.splice(0)) {
      this.maps[this.root] = { 6: [[":status", "200"], ["content-type", "text/plain; version=0.0.4"]] };
      this.callBody = enc.encode("process_resident_memory_bytes 4.5e+07\ngo_memstats_heap_inuse_bytes 2.0e+07\ngo_memstats_stack_inuse_bytes 1.0e+06\n");
      this.call("tick", "proxy_on_http_call_response", this.root, c.token, 2, this.callBody.length, 0);
    }
  }

  /** One request lifecycle as Envoy drives it. Returns what the client got. */
  request({ method, path, body = "", upstream }) {
    const id = this.nextContext++;
    const req = [[":method", method], [":path", path], [":authority", "sessionstore"], [":scheme", "http"],
      ["user-agent", "MediaWiki/1.41"], ["x-request-id", "0b7e3c1e-1111-4a4a-9b9b-123456789abc"]];
    if (body) req.push(["content-type", "application/octet-stream"], ["content-length", String(body.length)]);
    this.maps[id] = { 0: req };
    this.clockNs += 50_000n;
    this.localReplies = [];
    this.call("create", "proxy_on_context_create", id, this.root);
    const action = this.call("request_headers", "proxy_on_request_headers", id, req.length, body ? 0 : 1);
    let local = this.localReplies.find((r) => r.context === id);
    if (!local && action === 0 && body) this.call("request_body", "proxy_on_request_body", id, body.length, 1);
    let status;
    if (local) {
      // Envoy runs the local reply through the encoder filters, this one included.
      this.maps[id][2] = [[":status", String(local.status)], ...local.headers];
      status = local.status;
    } else if (action === 0) {
      this.clockNs += 300_000n;
      const [code, headers, respBody] = upstream;
      this.maps[id][2] = [[":status", String(code)], ...headers, ["content-length", String(respBody.length)]];
      status = code;
    } else {
      throw new Error(`request paused without a local reply (${method} ${path})`);
    }
    const respBody = local ? local.body : upstream[2];
    this.call("response_headers", "proxy_on_response_headers", id, this.maps[id][2].length, respBody.length ? 0 : 1);
    if (respBody.length) this.call("response_body", "proxy_on_response_body", id, respBody.length, 1);
    this.call("log", "proxy_on_log", id);
    this.call("done", "proxy_on_done", id);
    this.call("delete", "proxy_on_delete", id);
    const headers = Object.fromEntries(this.maps[id][2]);
    delete this.maps[id];
    return { status, local: !!local, headers };
  }
}

const KNOWN = "/sessions/v1/enwiki%3AMWSession%3Aq2vk4bs7nd3m6ftn3uxla6r8cj5ph2wy";
const MISSING = "/sessions/v1/missing%3AMWSession%3Azz0000000000000000000000000000zz";
const VALUE = "PHP.c2lnbmF0dXJlLXNpZ25hdHVyZS1zaWduYXR1cmUtc2lnbmE=.a:2:{s:4:\"user\";i:42;}";
const PROBLEM = '{\n  "type": "https://www.mediawiki.org/wiki/Kask/errors/not_found",\n  "title": "Not found",\n  "detail": "The value you requested was not found",\n  "instance": "/sessions/v1/x"\n}\n';
const UP = {
  get200: [200, [["content-type", "application/octet-stream"]], VALUE],
  get404: [404, [["content-type", "application/json"], ["x-content-type-options", "nosniff"]], PROBLEM],
  post201: [201, [], ""],
  delete204: [204, [], ""],
};

/** The benchmark's plugin configurations (scripts/bench.py uses the same). */
export const PASS_CONFIG = {
  concurrency: { mode: "adaptive", limit: 1024, min_limit: 512, max_limit: 4096 },
  negative_cache: { ttl_ms: 3600000 },
  memory: { enabled: true, memory_limit_bytes: 419430400 },
};
export const SHED_CONFIG = {
  ...PASS_CONFIG,
  concurrency: { mode: "fixed", limit: 1, min_limit: 1, sheddable_share: 0 },
};

const PATHS = [
  // name, config, what to send, how many requests before the one counted, check
  ["pass: GET of a known key (200)", PASS_CONFIG, { method: "GET", path: KNOWN, upstream: UP.get200 }, 3, (r) => r.status === 200 && !r.local],
  // The same key with no reuse of this worker's recent reads (src/negcache/recent.rs): what a read of a key
  // this worker has not read in the last key_table.local_reuse_ms costs.
  ["pass, key not read by this worker within local_reuse_ms", { ...PASS_CONFIG, key_table: { local_reuse_ms: 0 } }, { method: "GET", path: KNOWN, upstream: UP.get200 }, 3, (r) => r.status === 200 && !r.local],
  ["negative-cache hit: GET of a key cached missing (local 404)", PASS_CONFIG, { method: "GET", path: MISSING, upstream: UP.get404 }, 3, (r) => r.status === 404 && r.local],
  ["shed: GET of an unknown key over the limit (local 503)", SHED_CONFIG, { method: "GET", path: "/sessions/v1/enwiki%3AMWSession%3Aunknown", upstream: UP.get200 }, 3, (r) => r.status === 503 && r.local],
  ["write: POST (201)", PASS_CONFIG, { method: "POST", path: KNOWN, body: VALUE, upstream: UP.post201 }, 3, (r) => r.status === 201 && !r.local],
  ["delete: DELETE (204)", PASS_CONFIG, { method: "DELETE", path: KNOWN, upstream: UP.delete204 }, 3, (r) => r.status === 204 && !r.local],
  ["miss: first GET of an unknown key (404 from the store, cached)", PASS_CONFIG, { method: "GET", path: null, upstream: UP.get404 }, 3, (r) => r.status === 404 && !r.local],
  ["other: GET /healthz (not a key)", PASS_CONFIG, { method: "GET", path: "/healthz", upstream: UP.get200 }, 3, (r) => r.status === 200 && !r.local],
];

/** Whether the module survives answering its memory poll (proxy_on_http_call_response). */
function probeMemoryPoll(wasm) {
  const h = new Host(wasm, JSON.stringify(PASS_CONFIG));
  h.start();
  try {
    for (let i = 0; i < 30; i++) h.tick();
    const polls = h.nextToken - 1;
    return polls > 0 ? { ok: true, polls } : { ok: false, error: "no metrics poll was made" };
  } catch (e) {
    const log = h.logs.filter(([lvl]) => lvl >= 4).map(([, m]) => m).join(" | ");
    return { ok: false, error: `${e.message}${log ? ` (wasm log: ${log})` : ""}` };
  }
}

let ANSWER_POLLS = true;

/** Requests per tick while counting: a loaded VM's share (~3,000 requests/s). */
const LOAD_PER_TICK = 320;
/** Requests counted after the tick; their mean is reported. */
const MEASURED = 100;

function countPath(wasm, config, req, warm, check) {
  const h = new Host(wasm, JSON.stringify(config));
  h.answerPolls = ANSWER_POLLS;
  h.start();
  for (let i = 0; i < 12; i++) h.tick(); // elections, first limit, first memory sample
  let n = 0;
  const next = () => ({ ...req, path: req.path ?? `/sessions/v1/fresh-${n++}` });
  for (let i = 0; i < warm; i++) h.request(next());
  // A tick of load, so that the VM paces its clock reads and limiter writes as it
  // does under traffic; then the mean over the next requests is the steady state.
  // The first request after a tick (it may write what the tick settled) is shown too.
  for (let i = 0; i < LOAD_PER_TICK; i++) h.request(next());
  h.tick();
  const first = countRequests(h, next, check, 1);
  const steady = countRequests(h, next, check, MEASURED - 1);
  return { ...steady, ok: first.ok && steady.ok, first_total: first.total, first_allocs: first.allocs };
}

/** Mean hostcalls per request over `n` requests (by callback and import). */
function countRequests(h, next, check, n) {
  h.counts = {};
  let ok = true, result;
  for (let i = 0; i < n; i++) {
    result = h.request(next());
    ok &&= check(result);
  }
  const counts = h.counts;
  h.counts = null;
  const byPhase = {};
  let total = 0, allocs = 0;
  const mean = (c) => Math.round((c / n) * 100) / 100;
  for (const [key, c] of Object.entries(counts)) {
    const [phase, name] = key.split(":");
    if (name === "(alloc callback)") allocs += c; else total += c;
    (byPhase[phase] ||= {})[name] = mean(c);
  }
  return { ok, status: result.status, local: result.local, total: mean(total), allocs: mean(allocs), byPhase };
}

function main() {
  const args = process.argv.slice(2);
  const json = args.includes("--json");
  const files = args.filter((a) => !a.startsWith("--"));
  const wasm = files[0] || "target/wasm32-wasip1/release/sessionguard.wasm";
  const noop = files[1] || "target/wasm32-wasip1/release/noop_filter.wasm";
  const out = { wasm, paths: [] };
  out.memory_poll = probeMemoryPoll(wasm);
  ANSWER_POLLS = out.memory_poll.ok;
  let failed = false;
  for (const [name, config, req, warm, check] of PATHS) {
    const r = countPath(wasm, config, req, warm, check);
    failed ||= !r.ok;
    out.paths.push({ name, ...r });
  }
  const n = countPath(noop, {}, { method: "GET", path: KNOWN, upstream: UP.get200 }, 1, (r) => r.status === 200);
  out.paths.push({ name: "no-op filter (ABI floor): GET", ...n });
  // Per-tick cost on the elected worker (not per request).
  const h = new Host(wasm, JSON.stringify(PASS_CONFIG));
  h.answerPolls = ANSWER_POLLS;
  h.start();
  for (let i = 0; i < 12; i++) h.tick();
  h.counts = {};
  for (let i = 0; i < 10; i++) h.tick();
  const tickCalls = Object.entries(h.counts).filter(([k]) => !k.endsWith("(alloc callback)")).reduce((a, [, c]) => a + c, 0);
  const byName = {};
  for (const [k, c] of Object.entries(h.counts)) byName[k.split(":")[1]] = c / 10;
  out.tick = { ticks: 10, hostcalls: tickCalls, per_tick: tickCalls / 10, by_name: byName };
  if (json) {
    console.log(JSON.stringify(out, null, 1));
  } else {
    for (const p of out.paths) {
      console.log(`${p.ok ? "ok  " : "FAIL"} ${p.name}: ${p.total} hostcalls, ${p.allocs} allocation callbacks (status ${p.status}${p.local ? ", local" : ""}; first request after a tick: ${p.first_total}, ${p.first_allocs})`);
      for (const [phase, calls] of Object.entries(p.byPhase)) {
        console.log(`       ${phase.padEnd(17)} ${Object.entries(calls).map(([k, v]) => `${k}×${v}`).join(", ")}`);
      }
    }
    console.log(`tick (elected VM, all mechanisms): ${out.tick.per_tick} hostcalls per tick: ${Object.entries(out.tick.by_name).map(([k, v]) => `${k}×${v}`).join(", ")}`);
    console.log(`memory poll answer: ${out.memory_poll.ok ? "ok" : `VM CRASH: ${out.memory_poll.error}`}`);
  }
  process.exit(failed ? 1 : 0);
}

main();
