//! [`FlatMap`]: the maps from host names and paths that a request walks.
//!
//! A persistent hash trie of 100,000 entries costs a request about a dozen dependent
//! loads (three or four levels of node, each an `Arc` and its child array, then the entry
//! and its key), and on a table larger than the cache most of them miss. A `FlatMap` is a
//! power-of-two number of flat hash tables (shards), each one block of slots behind an
//! `Arc`: a lookup loads the slot its key's hash names (and, rarely, the next few), which
//! holds the hash, the key and the value. Keys of up to [`INLINE_KEY`] bytes (every path
//! prefix in the tables measured) are kept in the slot itself, so comparing one loads
//! nothing more. A clone shares every shard; an edit copies the list of shards and the one
//! shard it changes (about [`SHARD_ENTRIES`] entries), so an API change on a 100,000-route
//! table still copies a few hundred pointers and one shard, not the table.
//!
//! Why not the standard `HashMap` for a shard: it keeps a separate array of one-byte tags
//! in front of its buckets and a header behind the shard's pointer, so a lookup in a table
//! larger than the caches waited on three blocks of memory (the header, the tags, the
//! bucket), often on three pages, before the route entry; here it waits on one.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;

/// Entries per shard above which the shards double: bounds what one edit copies.
const SHARD_ENTRIES: usize = 256;

/// The fewest slots a shard has.
const MIN_SLOTS: usize = 4;

/// A string-keyed map, cheap to clone and to edit one key at a time (see the module doc).
#[derive(Clone)]
pub(super) struct FlatMap<V> {
    hasher: KeyHasher,
    /// Empty, or a power of two of them; a key's shard is chosen by bits of its hash that
    /// the shard does not use for its slots.
    shards: Arc<[Shard<V>]>,
    len: usize,
}

/// One shard: a power of two of slots, a key kept in the first free slot from the one its
/// hash names (linear probing), and no free slot between that one and the key's: a
/// lookup stops at its key or at a free slot. At most three quarters of the slots are
/// taken (half, when a shard is built), so a lookup usually reads one or two slots. The
/// slice's length sits beside its address in the list of shards: nothing is loaded
/// before the slots.
type Shard<V> = Arc<[Slot<V>]>;

/// A shard's slot: free, or a key with its hash (compared first) and value.
#[derive(Clone)]
struct Slot<V> {
    hash: u64,
    entry: Option<(Key, V)>,
}

impl<V> Slot<V> {
    fn free() -> Slot<V> {
        Slot {
            hash: 0,
            entry: None,
        }
    }
}

/// Where a probe for a key in a shard ended.
enum Probe {
    /// The key is in this slot.
    Found(usize),
    /// The key is not there; this free slot is where it would go.
    Free(usize),
    /// Neither: the shard has no free slot (never, at three quarters full at most).
    Full,
}

/// Probes `slots` for the key `key` with hash `hash`.
fn probe<V>(slots: &[Slot<V>], hash: u64, key: &[u8]) -> Probe {
    let mask = slots.len().wrapping_sub(1);
    let mut i = home(hash, mask);
    for _ in 0..slots.len() {
        let Some(slot) = slots.get(i) else {
            break;
        };
        match &slot.entry {
            None => return Probe::Free(i),
            Some((k, _)) if slot.hash == hash && k.as_bytes() == key => return Probe::Found(i),
            Some(_) => i = (i + 1) & mask,
        }
    }
    Probe::Full
}

/// The slot a hash names in a shard of `mask + 1` slots: its low bits.
fn home(hash: u64, mask: usize) -> usize {
    hash as usize & mask
}

/// A shard of `slots` slots (a power of two) holding `entries`, each with its hash.
fn build_shard<V>(entries: impl Iterator<Item = (u64, Key, V)>, slots: usize) -> Shard<V> {
    let mut table: Vec<Slot<V>> = (0..slots).map(|_| Slot::free()).collect();
    let mask = slots - 1;
    for (hash, key, value) in entries {
        // Keys are distinct: the first free slot from the key's own is its place.
        let mut i = home(hash, mask);
        while table.get(i).is_some_and(|slot| slot.entry.is_some()) {
            i = (i + 1) & mask;
        }
        if let Some(slot) = table.get_mut(i) {
            *slot = Slot {
                hash,
                entry: Some((key, value)),
            };
        }
    }
    table.into()
}

/// Slots for a shard that is to hold `entries`: at most half of them taken.
fn slots_for(entries: usize) -> usize {
    (entries * 2).next_power_of_two().max(MIN_SLOTS)
}

/// Keys up to this many bytes are kept inline (see [`Key`]).
const INLINE_KEY: usize = 22;

/// A key as a shard keeps it: a short key in the slot itself (a lookup compares it
/// where it already is), a longer one on the heap. Compared as bytes.
#[derive(Clone)]
enum Key {
    Inline { len: u8, bytes: [u8; INLINE_KEY] },
    Heap(Arc<[u8]>),
}

impl Key {
    fn new(key: &str) -> Key {
        let key = key.as_bytes();
        match u8::try_from(key.len()) {
            Ok(len) if key.len() <= INLINE_KEY => {
                let mut bytes = [0u8; INLINE_KEY];
                bytes[..key.len()].copy_from_slice(key);
                Key::Inline { len, bytes }
            }
            _ => Key::Heap(key.into()),
        }
    }

    fn as_bytes(&self) -> &[u8] {
        match self {
            Key::Inline { len, bytes } => &bytes[..usize::from(*len)],
            Key::Heap(bytes) => bytes,
        }
    }
}

impl<V> Default for FlatMap<V> {
    fn default() -> Self {
        FlatMap {
            hasher: KeyHasher::new(),
            shards: Arc::new([]),
            len: 0,
        }
    }
}

impl<V> std::fmt::Debug for FlatMap<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlatMap")
            .field("len", &self.len)
            .field("shards", &self.shards.len())
            .finish()
    }
}

impl<V: Clone> FlatMap<V> {
    pub(super) fn get(&self, key: &str) -> Option<&V> {
        if self.len == 0 {
            return None;
        }
        self.get_hashed(key, self.hash(key))
    }

    /// The hash this map files `key` under (for [`get_hashed`](Self::get_hashed), and for a
    /// filter kept beside the map).
    pub(super) fn hash(&self, key: &str) -> u64 {
        self.hasher.hash_one(key.as_bytes())
    }

    /// The value of `key`, whose [`hash`](Self::hash) is `hash`.
    pub(super) fn get_hashed(&self, key: &str, hash: u64) -> Option<&V> {
        let slots = self.shards.get(shard_index(hash, self.shards.len()))?;
        match probe(slots, hash, key.as_bytes()) {
            Probe::Found(i) => slots.get(i)?.entry.as_ref().map(|(_, value)| value),
            Probe::Free(_) | Probe::Full => None,
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// How many keys the map holds.
    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// The hash of every key, in no particular order.
    pub(super) fn hashes(&self) -> impl Iterator<Item = u64> + '_ {
        self.shards.iter().flat_map(|shard| {
            shard
                .iter()
                .filter(|slot| slot.entry.is_some())
                .map(|slot| slot.hash)
        })
    }

    /// Every value, in no particular order.
    pub(super) fn values(&self) -> impl Iterator<Item = &V> {
        self.shards.iter().flat_map(|shard| {
            shard
                .iter()
                .filter_map(|slot| slot.entry.as_ref().map(|(_, value)| value))
        })
    }

    /// Sets `key` to `value`.
    pub(super) fn insert(&mut self, key: &str, value: V) {
        if self.shards.is_empty() {
            self.shards = Arc::new([build_shard(std::iter::empty(), MIN_SLOTS)]);
        }
        let hash = self.hasher.hash_one(key.as_bytes());
        let Some(shard) = self.shard_mut(hash) else {
            return;
        };
        let free = match probe(shard, hash, key.as_bytes()) {
            Probe::Found(i) => {
                if let Some((_, old)) = Arc::make_mut(shard)
                    .get_mut(i)
                    .and_then(|s| s.entry.as_mut())
                {
                    *old = value;
                }
                return;
            }
            Probe::Free(i) => Some(i),
            Probe::Full => None,
        };
        let taken_after = taken(shard) + 1;
        match free.filter(|_| taken_after * 4 <= shard.len() * 3) {
            Some(i) => {
                if let Some(slot) = Arc::make_mut(shard).get_mut(i) {
                    *slot = Slot {
                        hash,
                        entry: Some((Key::new(key), value)),
                    };
                }
            }
            // Too full for one more: built again, larger, with it.
            None => {
                let entries =
                    entries_of(shard).chain(std::iter::once((hash, Key::new(key), value)));
                *shard = build_shard(entries, slots_for(taken_after));
            }
        }
        self.len += 1;
        if self.len > self.shards.len() * SHARD_ENTRIES {
            self.grow();
        }
    }

    /// Removes `key` if it is there.
    pub(super) fn remove(&mut self, key: &str) {
        if self.len == 0 {
            return;
        }
        let hash = self.hasher.hash_one(key.as_bytes());
        let found = self
            .shards
            .get(shard_index(hash, self.shards.len()))
            .map(|slots| probe(slots, hash, key.as_bytes()));
        let Some(Probe::Found(at)) = found else {
            return;
        };
        if let Some(shard) = self.shard_mut(hash) {
            remove_slot(Arc::make_mut(shard), at);
            self.len -= 1;
        }
        if self.len == 0 {
            self.shards = Arc::new([]);
        }
    }

    /// The shard of a key with hash `hash`, in this map's own list of shards (copied if
    /// another map shares it; the shard itself is copied when it is changed).
    fn shard_mut(&mut self, hash: u64) -> Option<&mut Shard<V>> {
        let i = shard_index(hash, self.shards.len());
        Arc::make_mut(&mut self.shards).get_mut(i)
    }

    /// Doubles the shards and spreads the entries over them.
    fn grow(&mut self) {
        let count = self.shards.len() * 2;
        let mut spread: Vec<Vec<(u64, Key, V)>> = (0..count).map(|_| Vec::new()).collect();
        for shard in self.shards.iter() {
            for (hash, key, value) in entries_of(shard) {
                if let Some(list) = spread.get_mut(shard_index(hash, count)) {
                    list.push((hash, key, value));
                }
            }
        }
        self.shards = spread
            .into_iter()
            .map(|list| {
                let slots = slots_for(list.len());
                build_shard(list.into_iter(), slots)
            })
            .collect();
    }
}

/// How many slots of `shard` hold a key.
fn taken<V>(shard: &[Slot<V>]) -> usize {
    shard.iter().filter(|slot| slot.entry.is_some()).count()
}

/// The entries of `shard`, copied, with their hashes.
fn entries_of<V: Clone>(shard: &[Slot<V>]) -> impl Iterator<Item = (u64, Key, V)> + '_ {
    shard.iter().filter_map(|slot| {
        slot.entry
            .as_ref()
            .map(|(key, value)| (slot.hash, key.clone(), value.clone()))
    })
}

/// Empties slot `at` and moves back the keys after it that probing would no longer find
/// past the free slot (a key may sit anywhere from its own slot on, but with no free slot
/// before it).
fn remove_slot<V>(slots: &mut [Slot<V>], at: usize) {
    let mask = slots.len().wrapping_sub(1);
    let mut hole = at;
    if let Some(slot) = slots.get_mut(hole) {
        slot.entry = None;
    }
    let mut next = (hole + 1) & mask;
    while let Some(slot) = slots.get(next).filter(|s| s.entry.is_some()) {
        // The key at `next` may move to the hole when the hole lies between its own slot
        // and `next` (cyclically): probing from its slot then reaches the hole first.
        let own = home(slot.hash, mask);
        if next.wrapping_sub(own) & mask >= next.wrapping_sub(hole) & mask {
            slots.swap(hole, next);
            hole = next;
        }
        next = (next + 1) & mask;
        if next == at {
            break;
        }
    }
}

/// The shard of a key with hash `hash` among `shards` (a power of two, or none).
fn shard_index(hash: u64, shards: usize) -> usize {
    if shards <= 1 {
        return 0;
    }
    // Bits 32 and up: the shard's slots are named by the low bits, so keys of one shard
    // still differ there.
    (hash >> 32) as usize & (shards - 1)
}

/// A seeded multiply-and-fold hash for short keys: a few instructions per 8 bytes, against
/// SipHash's rounds. For maps whose keys are the operator's (routes, and the names of their
/// metric series): a request can only look up, never add colliding keys; the seed is
/// random per map all the same.
#[derive(Clone, Copy)]
pub struct KeyHasher {
    seed: u64,
}

impl KeyHasher {
    /// A hasher with a random seed.
    pub fn new() -> KeyHasher {
        KeyHasher {
            seed: RandomState::new().hash_one(0x5eed_u64),
        }
    }
}

impl std::fmt::Debug for KeyHasher {
    // The seed stays out of debug output.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyHasher")
    }
}

impl Default for KeyHasher {
    fn default() -> Self {
        KeyHasher::new()
    }
}

impl BuildHasher for KeyHasher {
    type Hasher = KeyHash;

    fn build_hasher(&self) -> KeyHash {
        KeyHash(self.seed)
    }
}

/// The state of one [`KeyHasher`] hash.
pub struct KeyHash(u64);

const K1: u64 = 0x9e37_79b9_7f4a_7c15;
const K2: u64 = 0xc2b2_ae3d_27d4_eb4f;

/// The 128-bit product of `a` and `b`, its halves xored: every input bit reaches the result.
fn fold(a: u64, b: u64) -> u64 {
    let product = u128::from(a) * u128::from(b);
    (product as u64) ^ ((product >> 64) as u64)
}

impl Hasher for KeyHash {
    fn write(&mut self, bytes: &[u8]) {
        let mut h = self.0;
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            h = fold(h ^ u64::from_le_bytes(word), K1);
        }
        let rest = chunks.remainder();
        let mut word = [0u8; 8];
        word[..rest.len()].copy_from_slice(rest);
        self.0 = fold(h ^ u64::from_le_bytes(word), K1).wrapping_add(bytes.len() as u64);
    }

    fn write_u8(&mut self, byte: u8) {
        self.0 = fold(self.0 ^ u64::from(byte), K1);
    }

    fn finish(&self) -> u64 {
        fold(self.0, K2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Keys kept inline and keys too long for that, mixed.
    fn key_of(k: usize) -> String {
        if k.is_multiple_of(3) {
            format!("/a/key/longer/than/inline/k{k}/")
        } else {
            format!("/k{k}/")
        }
    }

    #[test]
    fn keys_of_every_length_round_trip() {
        for len in 0..=INLINE_KEY + 2 {
            let text = "x".repeat(len);
            let key = Key::new(&text);
            assert_eq!(key.as_bytes(), text.as_bytes());
            assert_eq!(
                matches!(key, Key::Inline { .. }),
                len <= INLINE_KEY,
                "{len}"
            );
        }
    }

    /// The next number of a xorshift* sequence whose state is `x` (not 0).
    fn next_random(x: &mut u64) -> u64 {
        *x ^= *x >> 12;
        *x ^= *x << 25;
        *x ^= *x >> 27;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Every key of `map` sits where a probe from its own slot reaches it (no free slot
    /// between), and no shard is more than three quarters full.
    fn assert_shards_sound(map: &FlatMap<usize>) {
        for shard in map.shards.iter() {
            assert!(
                taken(shard) * 4 <= shard.len() * 3,
                "{} of {}",
                taken(shard),
                shard.len()
            );
            let mask = shard.len() - 1;
            for (i, slot) in shard.iter().enumerate() {
                if slot.entry.is_some() {
                    let mut j = home(slot.hash, mask);
                    while j != i {
                        assert!(shard[j].entry.is_some(), "a free slot before a key");
                        j = (j + 1) & mask;
                    }
                }
            }
        }
    }

    #[test]
    fn every_edit_of_a_small_table_leaves_each_key_found_where_probing_reaches_it() {
        // 40 keys in one shard of a few slots: probes run past the shard's end and wrap,
        // and removals move keys back over the freed slot.
        let mut map: FlatMap<usize> = FlatMap::default();
        let mut model: HashMap<String, usize> = HashMap::new();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for step in 0..20_000usize {
            let r = next_random(&mut x);
            let key = format!("/k{}/", (r >> 33) % 40);
            if r.is_multiple_of(3) {
                map.remove(&key);
                model.remove(&key);
            } else {
                map.insert(&key, step);
                model.insert(key, step);
            }
            assert_eq!(map.len, model.len());
            for (k, v) in &model {
                assert_eq!(map.get(k), Some(v), "{k} after step {step}");
            }
            assert_shards_sound(&map);
        }
        for k in 40..80 {
            assert_eq!(map.get(&format!("/k{k}/")), None);
        }
    }

    #[test]
    fn agrees_with_a_hash_map_through_growth_edits_and_shared_copies() {
        let mut map: FlatMap<usize> = FlatMap::default();
        let mut model: HashMap<String, usize> = HashMap::new();
        let mut copies: Vec<(FlatMap<usize>, HashMap<String, usize>)> = Vec::new();
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        for step in 0..40_000usize {
            let r = next_random(&mut x);
            // Keys from a range that first grows (the map doubles its shards) and then
            // shrinks (removals empty it), so every path is taken.
            let range = if step < 30_000 { 2_000 } else { 200 };
            let key = key_of((r >> 33) as usize % range);
            if step >= 30_000 || r.is_multiple_of(5) {
                map.remove(&key);
                model.remove(&key);
            } else {
                map.insert(&key, step);
                model.insert(key, step);
            }
            if step.is_multiple_of(4_000) {
                copies.push((map.clone(), model.clone()));
            }
        }
        let keys: Vec<String> = model.keys().cloned().collect();
        for key in keys {
            map.remove(&key);
            model.remove(&key);
        }
        copies.push((map, model));
        for (map, model) in &copies {
            assert_eq!(map.is_empty(), model.is_empty());
            assert_eq!(map.len, model.len());
            for k in 0..2_100 {
                let key = key_of(k);
                assert_eq!(map.get(&key), model.get(&key), "{key}");
            }
        }
        // The big copy spread its entries over several shards.
        assert!(copies.iter().any(|(m, _)| m.shards.len() > 1));
        for (map, _) in &copies {
            assert_shards_sound(map);
        }
    }
}
