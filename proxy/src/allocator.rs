//! proxyd's global allocator: mimalloc (compiled from its C sources by `libmimalloc-sys`),
//! asked the way C's `malloc` is wherever the layout allows.
//!
//! mimalloc's aligned entry points (`mi_malloc_aligned`, which the `mimalloc` crate calls
//! for every allocation) serve a block over 1 KiB whose size class is not a power of two
//! through a path that over-allocates by the alignment and aligns within the block, even
//! for an alignment of 8 that every block has anyway: about 450 instructions where the
//! plain path takes about 330 (callgrind, a new connection's boxed busy spell; blocks up
//! to 1 KiB take about 40), for every buffer, header map and future of that size.
//! `mi_malloc` returns blocks aligned as C's `malloc` does (to 16 bytes, or to the largest
//! power of two that divides a smaller size), so a layout within that goes there; a
//! larger alignment still goes to the aligned entry points.
//!
//! The only `unsafe` code of the workspace: implementing [`GlobalAlloc`] is `unsafe` by
//! definition, and so is calling C.

#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys::{
    mi_free, mi_malloc, mi_malloc_aligned, mi_realloc, mi_realloc_aligned, mi_zalloc,
    mi_zalloc_aligned,
};

/// The alignment of every `mi_malloc` block of at least this many bytes
/// (`MI_MAX_ALIGN_SIZE`, as `max_align_t` on 64-bit targets).
const PLAIN_ALIGN: usize = 16;

/// mimalloc, through its plain entry points where they give the alignment asked for.
#[derive(Debug, Clone, Copy, Default)]
pub struct Allocator;

/// Whether a plain `mi_malloc` of `size` bytes is aligned to `align`: up to 16 bytes of
/// alignment, and not more than the size (a block of 8 bytes is aligned to 8, not 16). A
/// type's size is a multiple of its alignment, so only a layout made for a size alone
/// (`Layout::from_size_align`) can ask for more alignment than its size.
fn plain(size: usize, align: usize) -> bool {
    align <= PLAIN_ALIGN && align <= size
}

/// A block for `layout` from `plain_entry` (mimalloc's `mi_malloc` or `mi_zalloc`) where
/// [`plain`] allows, from `aligned_entry` (their aligned twin) otherwise.
///
/// # Safety
///
/// `layout` has a size other than 0 (as `GlobalAlloc::alloc` requires of its caller); the
/// entry points are mimalloc's, which take any size and power-of-two alignment.
unsafe fn new_block(
    layout: Layout,
    plain_entry: unsafe extern "C" fn(usize) -> *mut c_void,
    aligned_entry: unsafe extern "C" fn(usize, usize) -> *mut c_void,
) -> *mut u8 {
    // SAFETY: plain C calls with a size and an alignment from a valid `Layout`.
    unsafe {
        if plain(layout.size(), layout.align()) {
            plain_entry(layout.size()).cast()
        } else {
            aligned_entry(layout.size(), layout.align()).cast()
        }
    }
}

// SAFETY: every method hands the layout's size (and, off the plain path, its alignment)
// to mimalloc, which returns a block of at least that size with that alignment or null,
// as `GlobalAlloc` requires; blocks from either path are freed and resized by `mi_free`
// and `mi_realloc*`, which take any block mimalloc gave.
unsafe impl GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: see `new_block`.
        unsafe { new_block(layout, mi_malloc, mi_malloc_aligned) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: see `new_block`.
        unsafe { new_block(layout, mi_zalloc, mi_zalloc_aligned) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` came from this allocator (the caller's promise), so from mimalloc.
        unsafe { mi_free(ptr.cast::<c_void>()) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` came from this allocator with `layout` (the caller's promise);
        // the new block keeps the old alignment, by the same rule as `alloc`.
        unsafe {
            if plain(new_size, layout.align()) {
                mi_realloc(ptr.cast::<c_void>(), new_size).cast()
            } else {
                mi_realloc_aligned(ptr.cast::<c_void>(), new_size, layout.align()).cast()
            }
        }
    }
}

extern "C" {
    // mimalloc's own; `libmimalloc-sys` declares it only with its `extended` feature, which
    // would bring in one more crate for this one function.
    fn mi_collect(force: bool);
}

/// Hands back what this thread's mimalloc heap keeps after its blocks were freed: pages
/// left with no block in use (blocks freed by other threads counted) go back to the
/// arena, and the arena's free pages whose purge delay has passed are returned to the
/// system. mimalloc does this by itself only as the thread goes on allocating: a page it
/// emptied is kept a while for reuse and freed after later allocations, so a worker that
/// goes quiet (its connections gone idle) would keep them for as long as it stays quiet.
/// Not forced: pages freed within the purge delay stay, as they would.
pub fn collect_free_pages() {
    // SAFETY: a C call without arguments to check; mimalloc allows it on any thread at any
    // time (a thread whose heap was never used returns at once).
    unsafe { mi_collect(false) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sizes around mimalloc's size classes and its 1 KiB small-block limit, and one over
    /// its largest class (512 KiB).
    const SIZES: &[usize] = &[
        1, 2, 3, 7, 8, 9, 15, 16, 17, 24, 40, 48, 100, 1000, 1024, 1025, 1100, 3560, 4096, 8192,
        8200, 65_536, 600_000,
    ];
    const ALIGNS: &[usize] = &[1, 2, 4, 8, 16, 32, 64, 128, 4096];

    fn layouts() -> impl Iterator<Item = Layout> {
        SIZES.iter().flat_map(|&size| {
            ALIGNS.iter().filter_map(move |&align| {
                // A Rust type's size is a multiple of its alignment; other layouts are
                // valid too and are asked for by `Layout::from_size_align` users.
                Layout::from_size_align(size, align).ok()
            })
        })
    }

    #[test]
    fn every_block_has_its_layouts_alignment_and_size() {
        for layout in layouts() {
            // Many blocks alive at once, so that they sit side by side in their page:
            // one block of a class may well be aligned by chance, its neighbours not.
            let blocks: Vec<*mut u8> = (0..64)
                .map(|_| {
                    // SAFETY: a non-zero size.
                    let p = unsafe { Allocator.alloc(layout) };
                    assert!(!p.is_null(), "{layout:?}");
                    assert_eq!(p as usize % layout.align(), 0, "{layout:?}");
                    p
                })
                .collect();
            for p in blocks {
                // SAFETY: written within its size, then freed with its layout.
                unsafe {
                    p.write_bytes(0xA5, layout.size());
                    assert_eq!(*p.add(layout.size() - 1), 0xA5);
                    Allocator.dealloc(p, layout);
                }
            }
        }
    }

    #[test]
    fn zeroed_blocks_are_zero_even_where_a_freed_block_was_written() {
        for layout in layouts() {
            // SAFETY: as above.
            unsafe {
                // A block of this class written and freed first, so that the zeroed one
                // may well be the same memory.
                let dirty = Allocator.alloc(layout);
                dirty.write_bytes(0xFF, layout.size());
                Allocator.dealloc(dirty, layout);
                let p = Allocator.alloc_zeroed(layout);
                assert!(!p.is_null(), "{layout:?}");
                assert_eq!(p as usize % layout.align(), 0, "{layout:?}");
                let bytes = std::slice::from_raw_parts(p, layout.size());
                assert!(bytes.iter().all(|&b| b == 0), "{layout:?}");
                Allocator.dealloc(p, layout);
            }
        }
    }

    #[test]
    fn a_resized_block_keeps_its_bytes_and_its_alignment() {
        for layout in layouts() {
            for &new_size in SIZES {
                // SAFETY: as above; the resized block is freed with its new layout.
                unsafe {
                    let p = Allocator.alloc(layout);
                    for i in 0..layout.size() {
                        *p.add(i) = i as u8;
                    }
                    let q = Allocator.realloc(p, layout, new_size);
                    assert!(!q.is_null(), "{layout:?} -> {new_size}");
                    assert_eq!(q as usize % layout.align(), 0, "{layout:?} -> {new_size}");
                    for i in 0..layout.size().min(new_size) {
                        assert_eq!(*q.add(i), i as u8, "{layout:?} -> {new_size}, byte {i}");
                    }
                    q.add(new_size - 1).write(1);
                    Allocator.dealloc(
                        q,
                        Layout::from_size_align(new_size, layout.align())
                            .expect("a size of the table and a valid alignment"),
                    );
                }
            }
        }
    }

    #[test]
    fn the_plain_path_is_taken_only_where_malloc_gives_the_alignment() {
        assert!(plain(3560, 8));
        assert!(plain(16, 16));
        assert!(plain(8, 8));
        assert!(!plain(8, 16), "an 8-byte block is aligned to 8 only");
        assert!(!plain(128, 32));
        assert!(!plain(4096, 4096));
    }
}
