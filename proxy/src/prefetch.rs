//! Asking the processor to start loading memory that a request will write later, while the
//! request waits on something else.
//!
//! With 100,000 routes, a request's route and the route's metric series are rarely in any
//! cache: recording a finished request loads the route's series and, behind a pointer in
//! them, the histogram of its status class, each load waiting on the one before and on
//! memory. The request knows its route long before it finishes, and its status class
//! before its body is sent, so both can be asked for early; by the time the metrics are
//! recorded they are in the cache.
//!
//! A prefetch is a hint: it reads nothing the program sees, cannot fault on any address,
//! and changes no result. The intrinsic is `unsafe` only because intrinsics that need a
//! target feature are; every x86_64 processor has the one it needs (SSE). On other
//! architectures this does nothing (the stable intrinsics are x86's).

#![allow(unsafe_code)]

/// The size of a cache line on the processors proxyd runs on.
const LINE: usize = 64;

/// Starts loading every cache line that `value` occupies.
#[inline]
pub fn value<T: ?Sized>(value: &T) {
    let start = std::ptr::from_ref(value).cast::<u8>();
    for offset in line_offsets(start as usize, std::mem::size_of_val(value)) {
        line(start.wrapping_add(offset));
    }
}

/// Where the lines holding `len` bytes from address `start` begin, as offsets from `start`
/// (the first one before it, wrapped, unless `start` begins a line).
fn line_offsets(start: usize, len: usize) -> impl Iterator<Item = usize> {
    let before = start % LINE;
    (0..(before + len).div_ceil(LINE)).map(move |i| (i * LINE).wrapping_sub(before))
}

#[inline(always)]
fn line(at: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch accesses no memory the program observes and never faults, whatever
    // the address; SSE, the feature the intrinsic asks for, is part of x86_64.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(at.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = at;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The addresses of the lines asked for.
    fn lines(start: usize, len: usize) -> Vec<usize> {
        line_offsets(start, len)
            .map(|offset| start.wrapping_add(offset))
            .collect()
    }

    #[test]
    fn every_line_a_value_touches_is_asked_for_once() {
        assert_eq!(lines(128, 64), vec![128]);
        assert_eq!(lines(130, 62), vec![128]);
        assert_eq!(lines(130, 63), vec![128, 192]);
        assert_eq!(lines(100, 200), vec![64, 128, 192, 256]);
        assert_eq!(lines(64, 0), Vec::<usize>::new());
        // Calling it on real values of several sizes is harmless.
        value(&[0u8; 300]);
        value("a string");
        value(&0u64);
    }
}
