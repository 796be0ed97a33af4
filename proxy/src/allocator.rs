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
use std::cell::Cell;
use std::ffi::{c_int, c_void};
use std::sync::atomic::{AtomicPtr, Ordering};

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
        if TABLES.get() {
            // SAFETY: as below; the table heap is mimalloc's too.
            if let Some(block) = unsafe { table_block(layout, false) } {
                return block;
            }
        }
        // SAFETY: see `new_block`.
        unsafe { new_block(layout, mi_malloc, mi_malloc_aligned) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if TABLES.get() {
            // SAFETY: as below; the table heap is mimalloc's too.
            if let Some(block) = unsafe { table_block(layout, true) } {
                return block;
            }
        }
        // SAFETY: see `new_block`.
        unsafe { new_block(layout, mi_zalloc, mi_zalloc_aligned) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` came from this allocator (the caller's promise), so from mimalloc.
        unsafe { mi_free(ptr.cast::<c_void>()) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if TABLES.get() {
            // A table's growing vector stays in the table region (`mi_realloc` would move
            // it to the thread's own heap).
            // SAFETY: `layout`'s alignment with the new size makes a valid layout (the
            // caller's promise for `realloc`); the old block holds `layout.size()` bytes.
            unsafe {
                let grown = Layout::from_size_align_unchecked(new_size, layout.align());
                if let Some(block) = table_block(grown, false) {
                    std::ptr::copy_nonoverlapping(ptr, block, layout.size().min(new_size));
                    mi_free(ptr.cast::<c_void>());
                    return block;
                }
            }
        }
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

/// mimalloc's heap (`mi_heap_t`), opaque.
#[repr(C)]
struct MiHeap {
    _opaque: [u8; 0],
}

extern "C" {
    // mimalloc's own; `libmimalloc-sys` declares them only with its `extended` and `arena`
    // features, which would bring in one more crate for these few functions.
    fn mi_collect(force: bool);
    fn mi_manage_os_memory_ex(
        start: *mut c_void,
        size: usize,
        is_committed: bool,
        is_pinned: bool,
        is_zero: bool,
        numa_node: c_int,
        exclusive: bool,
        arena_id: *mut *mut c_void,
    ) -> bool;
    fn mi_heap_new_in_arena(arena_id: *mut c_void) -> *mut MiHeap;
    fn mi_heap_malloc(heap: *mut MiHeap, size: usize) -> *mut c_void;
    fn mi_heap_zalloc(heap: *mut MiHeap, size: usize) -> *mut c_void;
    fn mi_heap_malloc_aligned(heap: *mut MiHeap, size: usize, align: usize) -> *mut c_void;
    fn mi_heap_zalloc_aligned(heap: *mut MiHeap, size: usize, align: usize) -> *mut c_void;
}

thread_local! {
    /// Set while this thread makes routing data (see [`for_tables`]).
    static TABLES: Cell<bool> = const { Cell::new(false) };
}

/// The mimalloc heap of the table region, once [`reserve_table_region`] made it.
static TABLE_HEAP: AtomicPtr<MiHeap> = AtomicPtr::new(std::ptr::null_mut());

/// Where the table region starts and ends (for tests and diagnostics).
static TABLE_REGION: AtomicPtr<u8> = AtomicPtr::new(std::ptr::null_mut());
static TABLE_REGION_END: AtomicPtr<u8> = AtomicPtr::new(std::ptr::null_mut());

/// The size of a transparent huge page on x86_64 and of the region's alignment.
const HUGE_PAGE: usize = 2 << 20;

/// A block for `layout` from the table region's heap, or `None` (no region, or it is
/// full): the caller then takes one from the thread's own heap.
///
/// # Safety
///
/// `layout` has a size other than 0.
unsafe fn table_block(layout: Layout, zeroed: bool) -> Option<*mut u8> {
    let heap = TABLE_HEAP.load(Ordering::Acquire);
    if heap.is_null() {
        return None;
    }
    let (size, align) = (layout.size(), layout.align());
    // SAFETY: mimalloc's heap entry points with a heap it made (never deleted) and a size
    // and alignment from a valid `Layout`; a v3 heap may be used from any thread.
    let block = unsafe {
        match (plain(size, align), zeroed) {
            (true, false) => mi_heap_malloc(heap, size),
            (true, true) => mi_heap_zalloc(heap, size),
            (false, false) => mi_heap_malloc_aligned(heap, size, align),
            (false, true) => mi_heap_zalloc_aligned(heap, size, align),
        }
    };
    (!block.is_null()).then_some(block.cast())
}

/// Reserves `bytes` of address space for routing data, asks the kernel for transparent
/// huge pages there (`madvise(MADV_HUGEPAGE)`; it grants them where its setting is
/// `madvise` or `always`) and gives it to mimalloc as an arena of its own: from then on
/// what [`for_tables`] allocates comes from there. Nothing is resident until used
/// (`MAP_NORESERVE`). A request spread over 100,000 routes touches its route's hash
/// bucket, entry and metric series, each on another page of a large table; with 4 KiB
/// pages each of those also misses the TLB (README, Performance). Called once, before any
/// table is made; an error leaves routing data on the ordinary heap.
pub fn reserve_table_region(bytes: usize) -> std::io::Result<()> {
    let len = bytes
        .checked_add(HUGE_PAGE)
        .ok_or_else(|| std::io::Error::other("table region too large"))?;
    // SAFETY: an anonymous private mapping at an address of the kernel's choosing, which
    // nothing else refers to; it is never unmapped (mimalloc owns it from here).
    let mapped = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if mapped == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    // Huge pages only cover aligned 2 MiB; the slack before the first is left unused.
    let start = (mapped as usize).next_multiple_of(HUGE_PAGE) as *mut c_void;
    // SAFETY: `start..start + bytes` lies within the mapping just made.
    let advised = unsafe { libc::madvise(start, bytes, libc::MADV_HUGEPAGE) };
    if advised != 0 {
        // A kernel without transparent huge pages: ordinary pages, still one region.
        tracing::debug!(error = %std::io::Error::last_os_error(), "no huge pages for the routing tables");
    }
    let mut arena: *mut c_void = std::ptr::null_mut();
    // SAFETY: the memory is mapped, readable and writable, zeroed (fresh anonymous pages)
    // and used by nothing else; mimalloc keeps it for the life of the process.
    let heap = unsafe {
        if !mi_manage_os_memory_ex(start, bytes, true, false, true, -1, true, &mut arena) {
            return Err(std::io::Error::other("mimalloc refused the table region"));
        }
        mi_heap_new_in_arena(arena)
    };
    if heap.is_null() {
        return Err(std::io::Error::other(
            "mimalloc made no heap in the table region",
        ));
    }
    TABLE_REGION.store(start.cast(), Ordering::Relaxed);
    TABLE_REGION_END.store(start.cast::<u8>().wrapping_add(bytes), Ordering::Relaxed);
    TABLE_HEAP.store(heap, Ordering::Release);
    Ok(())
}

/// Runs `make` with what it allocates (and grows) taken from the table region, when
/// there is one (see [`reserve_table_region`]): for routing tables and the routes'
/// metric series, which requests read and write spread over every route.
pub fn for_tables<R>(make: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            TABLES.set(self.0);
        }
    }
    let _restore = Restore(TABLES.replace(true));
    make()
}

/// Whether `block` lies in the table region.
pub fn in_table_region(block: *const u8) -> bool {
    let start = TABLE_REGION.load(Ordering::Relaxed);
    let end = TABLE_REGION_END.load(Ordering::Relaxed);
    !start.is_null() && (start.cast_const()..end.cast_const()).contains(&block)
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

/// The library's own tests allocate as proxyd does, so that what they make for tables can
/// be found in the table region.
#[cfg(test)]
#[global_allocator]
static TEST_ALLOCATOR: Allocator = Allocator;

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
    fn blocks_made_for_tables_come_from_the_table_region_with_their_layout() {
        reserve_table_region(256 << 20).expect("reserve the table region");
        let outside = Layout::new::<[u64; 8]>();
        // SAFETY: a non-zero size; freed with its layout.
        unsafe {
            let p = Allocator.alloc(outside);
            assert!(!in_table_region(p), "an ordinary block in the table region");
            Allocator.dealloc(p, outside);
        }
        for_tables(|| {
            for layout in layouts() {
                // SAFETY: as in the tests below.
                unsafe {
                    let p = Allocator.alloc(layout);
                    assert!(in_table_region(p), "{layout:?}");
                    assert_eq!(p as usize % layout.align(), 0, "{layout:?}");
                    for i in 0..layout.size() {
                        *p.add(i) = i as u8;
                    }
                    // Grown or shrunk, it stays in the region with its bytes.
                    let q = Allocator.realloc(p, layout, layout.size() * 3);
                    assert!(in_table_region(q), "{layout:?} grown");
                    assert_eq!(q as usize % layout.align(), 0, "{layout:?} grown");
                    for i in 0..layout.size() {
                        assert_eq!(*q.add(i), i as u8, "{layout:?} grown, byte {i}");
                    }
                    let grown = Layout::from_size_align(layout.size() * 3, layout.align())
                        .expect("a layout");
                    Allocator.dealloc(q, grown);
                    let z = Allocator.alloc_zeroed(layout);
                    assert!(in_table_region(z), "{layout:?} zeroed");
                    let bytes = std::slice::from_raw_parts(z, layout.size());
                    assert!(bytes.iter().all(|&b| b == 0), "{layout:?} zeroed");
                    Allocator.dealloc(z, layout);
                }
            }
            // Scopes nest; the inner one's end leaves the outer one on.
            for_tables(|| ());
            // SAFETY: as above.
            unsafe {
                let p = Allocator.alloc(outside);
                assert!(in_table_region(p), "after a nested scope");
                Allocator.dealloc(p, outside);
            }
        });
        // SAFETY: as above.
        unsafe {
            let p = Allocator.alloc(outside);
            assert!(!in_table_region(p), "after the scope");
            Allocator.dealloc(p, outside);
        }
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
