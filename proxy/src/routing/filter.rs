//! [`KeyFilter`]: which hashes a large map may hold, small enough to stay in the cache.
//!
//! A path that falls through to a catch-all route (in a v1 -> v2 migration, every path
//! not moved yet) is looked up once per distinct prefix length before it gets there, and
//! each of those lookups misses. In a table of 100,000 prefixes each miss reads a slot
//! that is in no cache (`bench/route-lookup.sh`: 236 ns for such a path against 62 with
//! 10 routes). A filter with one bit per hash value, 32 bits for each key when it is made
//! and never fewer than 16, answers most of those misses from memory a few hundred
//! kilobytes large: a clear bit means no key of the map has that hash, so the map is not
//! read. A set bit may be a key's or another's (about one in 32 for a hash that is in no
//! key, one in 16 at worst): the map is read, as before. A key is never reported absent
//! while the map holds it.
//!
//! Edits: an added key sets its bit; a removed key leaves it set (it may be another key's
//! too), and once as many keys were removed as half of those there are, or the map
//! outgrew the filter, the filter is made again from the map's hashes. The bits are in
//! blocks of 4 KiB behind one list, so an edit copies the list and one block, not the
//! filter, and a table shared with requests in flight keeps its own.

use std::sync::Arc;

/// Keys a map has before it is given a filter: a smaller map stays in the cache.
pub(super) const FILTER_FROM: usize = 1024;

/// Bits of filter per key, at least.
const BITS_PER_KEY: usize = 16;

/// Bits per block: 4 KiB.
const BLOCK_BITS: usize = 1 << 15;

type Block = [u64; BLOCK_BITS / 64];

/// Where bit `bit` of the filter is: its block, the word within the block, and the
/// word's mask for it.
fn place(bit: usize) -> (usize, usize, u64) {
    let within = bit % BLOCK_BITS;
    (bit / BLOCK_BITS, within / 64, 1 << (within % 64))
}

/// The filter of a map's hashes; empty (every lookup goes to the map) until it is
/// [`rebuild`](Self::rebuild)t for at least [`FILTER_FROM`] keys.
#[derive(Clone, Default)]
pub(super) struct KeyFilter {
    blocks: Arc<[Arc<Block>]>,
    /// log2 of the number of bits (all blocks').
    bits_log2: u32,
    /// Keys the bits were set for, removed ones included.
    set: usize,
    /// Keys removed since the bits were made.
    removed: usize,
}

impl KeyFilter {
    /// Whether a key with hash `hash` may be in the map: `false` only if none is.
    pub(super) fn may_hold(&self, hash: u64) -> bool {
        if self.blocks.is_empty() {
            return true;
        }
        let (block, word, mask) = place(self.bit(hash));
        self.blocks
            .get(block)
            .and_then(|block| block.get(word))
            .is_none_or(|word| word & mask != 0)
    }

    /// The bit of `hash`: its top bits (the map names shards and slots with the low ones).
    fn bit(&self, hash: u64) -> usize {
        (hash >> (64 - self.bits_log2)) as usize
    }

    /// A key with hash `hash` was added to the map, which now holds `len` keys, whose
    /// hashes `all` gives (read only if the filter is made again).
    pub(super) fn added<I: Iterator<Item = u64>>(
        &mut self,
        hash: u64,
        len: usize,
        all: impl FnOnce() -> I,
    ) {
        if self.needs_rebuild(len) {
            self.rebuild(len, all());
            return;
        }
        if self.blocks.is_empty() {
            return;
        }
        self.set += 1;
        let (block, word, mask) = place(self.bit(hash));
        // In place when nothing else holds the list (a table being built); otherwise the
        // list is copied, and below only the block with the bit.
        if let Some(block) = Arc::make_mut(&mut self.blocks).get_mut(block) {
            if let Some(word) = Arc::make_mut(block).get_mut(word) {
                *word |= mask;
            }
        }
    }

    /// A key was removed from the map, which now holds `len` keys, whose hashes `all`
    /// gives (read only if the filter is made again).
    pub(super) fn removed<I: Iterator<Item = u64>>(&mut self, len: usize, all: impl FnOnce() -> I) {
        if self.blocks.is_empty() {
            return;
        }
        self.removed += 1;
        if len < FILTER_FROM {
            *self = KeyFilter::default();
        } else if self.removed * 2 > len {
            self.rebuild(len, all());
        }
    }

    /// Whether a map of `len` keys needs the filter made (again): it reached the size to
    /// have one, or outgrew the one it has.
    fn needs_rebuild(&self, len: usize) -> bool {
        if len < FILTER_FROM {
            return false;
        }
        self.blocks.is_empty() || (self.set + 1) * BITS_PER_KEY > (1usize << self.bits_log2)
    }

    /// Makes the filter for a map of `len` keys with hashes `hashes`, with room for twice
    /// as many.
    fn rebuild(&mut self, len: usize, hashes: impl Iterator<Item = u64>) {
        let bits = (len * 2 * BITS_PER_KEY).next_power_of_two().max(BLOCK_BITS);
        let mut filter = KeyFilter {
            blocks: Arc::new([]),
            bits_log2: bits.trailing_zeros(),
            set: 0,
            removed: 0,
        };
        let mut blocks: Vec<Block> = vec![[0; BLOCK_BITS / 64]; bits / BLOCK_BITS];
        for hash in hashes {
            let (block, word, mask) = place(filter.bit(hash));
            if let Some(word) = blocks.get_mut(block).and_then(|block| block.get_mut(word)) {
                *word |= mask;
            }
            filter.set += 1;
        }
        filter.blocks = blocks.into_iter().map(Arc::new).collect();
        *self = filter;
    }
}

impl std::fmt::Debug for KeyFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyFilter")
            .field(
                "bits",
                &(!self.blocks.is_empty()).then(|| 1usize << self.bits_log2),
            )
            .field("set", &self.set)
            .field("removed", &self.removed)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    /// xorshift64: a fixed sequence of hashes.
    fn next(x: &mut u64) -> u64 {
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        *x
    }

    #[test]
    fn a_held_hash_is_never_reported_absent_and_most_absent_ones_are() {
        let mut filter = KeyFilter::default();
        let mut held: Vec<u64> = Vec::new();
        let mut x = 0x1234_5678_9abc_def1_u64;
        let mut rebuilt_bigger = 0;
        for step in 0..40_000 {
            // Grow to about 6,000 keys, then shrink below FILTER_FROM, then grow again.
            let grow = !(15_000..30_000).contains(&step);
            let bits_before = filter.bits_log2;
            if grow || held.is_empty() {
                let hash = next(&mut x);
                held.push(hash);
                let all = held.clone();
                filter.added(hash, held.len(), || all.into_iter());
            } else {
                let at = (next(&mut x) as usize) % held.len();
                held.swap_remove(at);
                let all = held.clone();
                filter.removed(held.len(), || all.into_iter());
            }
            if filter.bits_log2 > bits_before && bits_before > 0 {
                rebuilt_bigger += 1;
            }
            if step % 97 == 0 || held.len() == FILTER_FROM {
                assert_eq!(
                    filter.blocks.is_empty(),
                    held.len() < FILTER_FROM,
                    "step {step}"
                );
                for hash in &held {
                    assert!(
                        filter.may_hold(*hash),
                        "step {step}: a held hash reported absent"
                    );
                }
            }
        }
        assert!(
            rebuilt_bigger >= 2,
            "the filter grew {rebuilt_bigger} times"
        );
        // Absent hashes: most are answered by the filter alone.
        let set: HashSet<u64> = held.iter().copied().collect();
        let mut passed = 0;
        let mut tried = 0;
        while tried < 100_000 {
            let hash = next(&mut x);
            if set.contains(&hash) {
                continue;
            }
            tried += 1;
            passed += usize::from(filter.may_hold(hash));
        }
        assert!(
            passed * 10 < tried,
            "{passed} of {tried} absent hashes passed the filter"
        );
    }
}
