//! Little-endian fixed layouts for shared-data values, read without panics.
//!
//! Shared data can hold anything: a value written by another version of the filter,
//! a truncated write, or garbage. Every reader here returns `None` instead of
//! panicking, and the callers treat an undecodable value as a known state
//! ("empty") that they overwrite.

/// A cursor over bytes that never panics: every read is checked.
pub(crate) struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, pos: 0 }
    }

    pub(crate) fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let end = self.pos.checked_add(N)?;
        let chunk: [u8; N] = self.bytes.get(self.pos..end)?.try_into().ok()?;
        self.pos = end;
        Some(chunk)
    }

    pub(crate) fn u32(&mut self) -> Option<u32> {
        self.take::<4>().map(u32::from_le_bytes)
    }

    pub(crate) fn u64(&mut self) -> Option<u64> {
        self.take::<8>().map(u64::from_le_bytes)
    }

    pub(crate) fn f64(&mut self) -> Option<f64> {
        self.take::<8>().map(f64::from_le_bytes)
    }

    /// True when every byte was consumed (a longer value is not ours).
    pub(crate) fn is_done(&self) -> bool {
        self.pos == self.bytes.len()
    }
}

/// Reads a `u16` at `offset`, or `None` if out of bounds.
pub(crate) fn u16_at(bytes: &[u8], offset: usize) -> Option<u16> {
    let end = offset.checked_add(2)?;
    let chunk: [u8; 2] = bytes.get(offset..end)?.try_into().ok()?;
    Some(u16::from_le_bytes(chunk))
}

/// Reads a `u32` at `offset`, or `None` if out of bounds.
pub(crate) fn u32_at(bytes: &[u8], offset: usize) -> Option<u32> {
    let end = offset.checked_add(4)?;
    let chunk: [u8; 4] = bytes.get(offset..end)?.try_into().ok()?;
    Some(u32::from_le_bytes(chunk))
}

/// Reads a `u64` at `offset`, or `None` if out of bounds.
pub(crate) fn u64_at(bytes: &[u8], offset: usize) -> Option<u64> {
    let end = offset.checked_add(8)?;
    let chunk: [u8; 8] = bytes.get(offset..end)?.try_into().ok()?;
    Some(u64::from_le_bytes(chunk))
}

/// Reads an `f64` at `offset`, or `None` if out of bounds.
pub(crate) fn f64_at(bytes: &[u8], offset: usize) -> Option<f64> {
    u64_at(bytes, offset).map(f64::from_bits)
}

/// FNV-1a, 32 bits: the checksum of shared-data values that carry one (not keyed, not
/// for hashing keys; see `fingerprint`).
pub fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5u32, |h, &b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// Writes `value` at `offset`; false (and nothing written) if out of bounds.
pub(crate) fn put_u32_at(bytes: &mut [u8], offset: usize, value: u32) -> bool {
    match offset
        .checked_add(4)
        .and_then(|end| bytes.get_mut(offset..end))
    {
        Some(dst) => {
            dst.copy_from_slice(&value.to_le_bytes());
            true
        }
        None => false,
    }
}

/// Writes `value` at `offset`; false (and nothing written) if out of bounds.
pub(crate) fn put_u64_at(bytes: &mut [u8], offset: usize, value: u64) -> bool {
    match offset
        .checked_add(8)
        .and_then(|end| bytes.get_mut(offset..end))
    {
        Some(dst) => {
            dst.copy_from_slice(&value.to_le_bytes());
            true
        }
        None => false,
    }
}

/// A finite, non-negative `f64` as a `u32`, rounded down and saturated: the only
/// float-to-int conversion the shared-state code uses (NaN gives 0).
pub(crate) fn f64_to_u32(x: f64) -> u32 {
    if x.is_nan() || x <= 0.0 {
        0
    } else if x >= f64::from(u32::MAX) {
        u32::MAX
    } else {
        // In range by the checks above, so the cast cannot saturate.
        x.floor() as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn reader_refuses_short_input() {
        let mut r = Reader::new(&[1, 0, 0]);
        assert_eq!(r.u32(), None);
        let mut r = Reader::new(&[1, 0, 0, 0, 9]);
        assert_eq!(r.u32(), Some(1));
        assert!(!r.is_done());
        assert_eq!(r.u64(), None);
    }

    #[test]
    fn offsets_are_checked() {
        let mut b = [0u8; 8];
        assert!(put_u32_at(&mut b, 4, 7));
        assert!(!put_u32_at(&mut b, 5, 7));
        assert!(!put_u64_at(&mut b, usize::MAX, 7));
        assert_eq!(u32_at(&b, 4), Some(7));
        assert_eq!(u32_at(&b, usize::MAX - 1), None);
        assert_eq!(u64_at(&b, 1), None);
    }

    #[test]
    fn float_to_int_saturates() {
        assert_eq!(f64_to_u32(f64::NAN), 0);
        assert_eq!(f64_to_u32(-3.0), 0);
        assert_eq!(f64_to_u32(f64::INFINITY), u32::MAX);
        assert_eq!(f64_to_u32(1e300), u32::MAX);
        assert_eq!(f64_to_u32(12.9), 12);
    }
}
