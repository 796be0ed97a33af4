//! Appending the short pieces a message head is made of (field names, values, a method, a
//! target) to an output buffer.
//!
//! `Vec::extend_from_slice` with a length known only at run time is a call to the C
//! library's `memmove`: for the 3 to 30 bytes of a usual name or value the call costs
//! more than the copy. A head has two such pieces per field, and the request path
//! writes two heads per request (about 30 calls, `perf probe` on `memmove`, release
//! binary). Up to 32 bytes are copied here with fixed-size moves the compiler does
//! inline: the first and the last 4, 8 or 16 bytes, which overlap in the middle, written
//! straight into the buffer over a block of zeros appended for room, which is then cut
//! to the piece's length.
//!
//! The pieces are written where they end up, never assembled first in a scratch block
//! and copied from there: a load of a block that two smaller stores (one at a varying
//! offset) have just written cannot take its bytes from the pending stores and waits for
//! them to reach the cache. That wait was where most of this function's time went
//! (`perf annotate` on the load after such a block, about half of the samples).

/// Appends `bytes` to `out`.
#[inline]
pub(crate) fn put(out: &mut Vec<u8>, bytes: &[u8]) {
    match bytes.len() {
        0 => {}
        1..=3 => put_tiny(out, bytes),
        4..=8 => put_overlapped::<4, 8>(out, bytes),
        9..=16 => put_overlapped::<8, 16>(out, bytes),
        17..=32 => put_overlapped::<16, 32>(out, bytes),
        _ => out.extend_from_slice(bytes),
    }
}

/// Appends one field line, `name: value` and its line end, to `out`.
#[inline]
pub(crate) fn put_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    // One check for room instead of one per piece (the blocks of zeros of `put` included).
    out.reserve(name.len() + value.len() + 4 + 32);
    put(out, name);
    out.extend_from_slice(b": ");
    put(out, value);
    out.extend_from_slice(b"\r\n");
}

/// Appends 1 to 3 bytes: the first, middle and last byte (which coincide for shorter
/// pieces), each stored into its place.
#[inline(always)]
fn put_tiny(out: &mut Vec<u8>, bytes: &[u8]) {
    let n = bytes.len();
    debug_assert!((1..=3).contains(&n));
    let start = out.len();
    out.extend_from_slice(&[0u8; 4]);
    let dst = &mut out[start..start + 4];
    dst[0] = bytes[0];
    dst[n / 2] = bytes[n / 2];
    dst[n - 1] = bytes[n - 1];
    out.truncate(start + n);
}

/// Appends `bytes` (`HALF` to `WHOLE` long, `WHOLE` = 2 x `HALF`): its first `HALF`
/// bytes and its last `HALF`, overlapping where it is shorter than `WHOLE`, each stored
/// into its place.
#[inline(always)]
fn put_overlapped<const HALF: usize, const WHOLE: usize>(out: &mut Vec<u8>, bytes: &[u8]) {
    let n = bytes.len();
    debug_assert!((HALF..=WHOLE).contains(&n) && WHOLE == 2 * HALF);
    let start = out.len();
    out.extend_from_slice(&[0u8; WHOLE]);
    let dst = &mut out[start..start + WHOLE];
    dst[..HALF].copy_from_slice(&bytes[..HALF]);
    dst[n - HALF..n].copy_from_slice(&bytes[n - HALF..]);
    out.truncate(start + n);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_length_appends_exactly_the_piece() {
        let source: Vec<u8> = (0..80u8).map(|i| b'!' + i).collect();
        for prefix in [0usize, 1, 7, 30] {
            for n in 0..=source.len() {
                let piece = &source[..n];
                let mut out = vec![b'#'; prefix];
                put(&mut out, piece);
                let mut expected = vec![b'#'; prefix];
                expected.extend_from_slice(piece);
                assert_eq!(out, expected, "length {n} after {prefix} bytes");
                // A second piece lands right after the first.
                put(&mut out, &source[n / 3..n]);
                expected.extend_from_slice(&source[n / 3..n]);
                assert_eq!(out, expected, "two pieces, length {n} after {prefix} bytes");
            }
        }
    }

    #[test]
    fn a_field_line_is_name_colon_value_crlf() {
        let mut out = b"HTTP/1.1 200 OK\r\n".to_vec();
        put_field(&mut out, b"content-type", b"text/plain");
        put_field(&mut out, b"x", b"");
        put_field(
            &mut out,
            b"x-a-name-longer-than-thirty-two-bytes",
            b"Thu, 03 Dec 2026 04:06:13 GMT",
        );
        assert_eq!(
            out,
            b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nx: \r\nx-a-name-longer-than-thirty-two-bytes: Thu, 03 Dec 2026 04:06:13 GMT\r\n"
        );
    }
}
