//! The ABI's serialized header map: read headers out of it, as
//! `proxy_get_header_map_pairs` returns it (one hostcall and one allocation in the VM
//! for the whole map, where reading `:method` and `:path` one by one costs two of
//! each), and write one (the headers of a local reply).
//!
//! Layout (little-endian): the number of pairs `n` (u32); `n` times the key length
//! and the value length (u32 each); then each key and each value in pair order, each
//! followed by a NUL byte that the lengths do not count.

use crate::wire::u32_at;

/// The value of each of `names` (exact, lowercase names; the first occurrence wins),
/// `None` when absent. A buffer that does not follow the layout yields no values at
/// all, never a panic or a value read from the wrong place.
pub fn find<'a, const N: usize>(buf: &'a [u8], names: [&str; N]) -> [Option<&'a [u8]>; N] {
    const NOTHING: Option<&[u8]> = None;
    let mut found = [NOTHING; N];
    if buf.is_empty() {
        return found;
    }
    // No allocation: one pass that keeps the first value of each name and checks the
    // whole layout, answering only if all of it holds.
    let layout_ok = (|| {
        let n = usize::try_from(u32_at(buf, 0)?).ok()?;
        let mut data = n.checked_mul(8)?.checked_add(4)?;
        if data > buf.len() {
            return None;
        }
        for i in 0..n {
            let key_len = usize::try_from(u32_at(buf, 4 + 8 * i)?).ok()?;
            let value_len = usize::try_from(u32_at(buf, 8 + 8 * i)?).ok()?;
            let key = field(buf, &mut data, key_len)?;
            let value = field(buf, &mut data, value_len)?;
            for (slot, name) in found.iter_mut().zip(names) {
                if slot.is_none() && key == name.as_bytes() {
                    *slot = Some(value);
                }
            }
        }
        (data == buf.len()).then_some(())
    })();
    if layout_ok.is_none() {
        found = [NOTHING; N];
    }
    found
}

/// Serializes `headers` in the layout above.
pub fn serialize(headers: &[(&str, &[u8])]) -> Vec<u8> {
    let size = 4 + headers
        .iter()
        .map(|(n, v)| n.len() + v.len() + 10)
        .sum::<usize>();
    let mut out = Vec::with_capacity(size);
    // Header maps hold at most a few hundred short headers (Envoy's limits).
    out.extend_from_slice(&(headers.len() as u32).to_le_bytes());
    for (name, value) in headers {
        out.extend_from_slice(&(name.len() as u32).to_le_bytes());
        out.extend_from_slice(&(value.len() as u32).to_le_bytes());
    }
    for (name, value) in headers {
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        out.extend_from_slice(value);
        out.push(0);
    }
    out
}

/// The `len` bytes at `*at`, which must be followed by a NUL; advances past it.
fn field<'a>(buf: &'a [u8], at: &mut usize, len: usize) -> Option<&'a [u8]> {
    let end = at.checked_add(len)?;
    let bytes = buf.get(*at..end)?;
    if *buf.get(end)? != 0 {
        return None;
    }
    *at = end + 1;
    Some(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    const REQUEST: &[(&str, &[u8])] = &[
        (":authority", b"sessionstore"),
        (":path", b"/sessions/v1/enwiki%3AMWSession%3Aabc"),
        (":method", b"GET"),
        (":scheme", b"http"),
        ("x-request-id", b"0f1e"),
        (":path", b"/second"),
    ];

    #[test]
    fn finds_the_first_value_of_each_name() {
        let buf = serialize(REQUEST);
        let [method, path, absent] = find(&buf, [":method", ":path", "content-type"]);
        assert_eq!(method, Some(&b"GET"[..]));
        assert_eq!(path, Some(&b"/sessions/v1/enwiki%3AMWSession%3Aabc"[..]));
        assert_eq!(absent, None);
    }

    #[test]
    fn empty_values_and_maps() {
        let buf = serialize(&[(":method", b""), ("x", b"1")]);
        assert_eq!(
            find(&buf, [":method", "x"]),
            [Some(&b""[..]), Some(&b"1"[..])]
        );
        assert_eq!(find(&[], [":path"]), [None]);
        assert_eq!(find(&serialize(&[]), [":path"]), [None]);
    }

    #[test]
    fn every_truncation_and_corruption_yields_nothing() {
        let buf = serialize(REQUEST);
        for len in 1..buf.len() {
            assert_eq!(
                find(&buf[..len], [":method", ":path"]),
                [None, None],
                "cut at {len}"
            );
        }
        let mut longer = buf.clone();
        longer.push(0);
        assert_eq!(find(&longer, [":method"]), [None]);
        for at in 0..buf.len() {
            let mut bad = buf.clone();
            bad[at] ^= 0x5a;
            // Either still a well-formed map (a changed byte inside a name or value)
            // or nothing; never a panic.
            let _ = find(&bad, [":method", ":path"]);
        }
        let mut huge = buf.clone();
        huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(find(&huge, [":method"]), [None]);
        let mut missing_nul = buf;
        let first_key_end = 4 + 8 * REQUEST.len() + ":authority".len();
        missing_nul[first_key_end] = b'x';
        assert_eq!(find(&missing_nul, [":method"]), [None]);
    }
}
