//! [`FlatMap`]: the maps from host names and paths that a request walks.
//!
//! A persistent hash trie of 100,000 entries costs a request about a dozen dependent
//! loads (three or four levels of node, each an `Arc` and its child array, then the entry
//! and its key), and on a table larger than the cache most of them miss. A `FlatMap` is a
//! power-of-two number of flat hash tables (shards), each behind an `Arc`: a lookup is the
//! shard, its bucket and the value: keys of up to [`INLINE_KEY`] bytes (every path prefix
//! in the tables measured) are kept in the bucket itself, so comparing one loads nothing
//! more. A clone shares every shard; an edit copies the
//! list of shards and the one shard it changes (at most [`SHARD_ENTRIES`] entries), so an
//! API change on a 100,000-route table still copies a few hundred pointers, not the table.

use std::borrow::Borrow;
use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::Arc;

/// Entries per shard above which the shards double: bounds what one edit copies.
const SHARD_ENTRIES: usize = 256;

/// A string-keyed map, cheap to clone and to edit one key at a time (see the module doc).
#[derive(Clone)]
pub(super) struct FlatMap<V> {
    hasher: KeyHasher,
    /// Empty, or a power of two of them; a key's shard is chosen by bits of its hash that
    /// the shard's own table does not use for its buckets and tags.
    shards: Arc<[Arc<Shard<V>>]>,
    len: usize,
}

type Shard<V> = HashMap<Key, V, KeyHasher>;

/// Keys up to this many bytes are kept inline (see [`Key`]).
const INLINE_KEY: usize = 22;

/// A key as a shard keeps it: a short key in the bucket itself (a lookup compares it
/// where it already is), a longer one on the heap. Maps look keys up by their bytes.
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

impl Borrow<[u8]> for Key {
    fn borrow(&self) -> &[u8] {
        self.as_bytes()
    }
}

/// Hashed and compared as its bytes, as `Borrow` requires.
impl Hash for Key {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_bytes().hash(state);
    }
}

impl PartialEq for Key {
    fn eq(&self, other: &Key) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for Key {}

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
        self.shards
            .get(shard_index(&self.hasher, key.as_bytes(), self.shards.len()))?
            .get(key.as_bytes())
    }

    pub(super) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Every value, in no particular order.
    pub(super) fn values(&self) -> impl Iterator<Item = &V> {
        self.shards.iter().flat_map(|shard| shard.values())
    }

    /// Sets `key` to `value`.
    pub(super) fn insert(&mut self, key: &str, value: V) {
        if self.shards.is_empty() {
            self.shards = Arc::new([Arc::new(HashMap::with_hasher(self.hasher))]);
        }
        let Some(shard) = self.shard_mut(key) else {
            return;
        };
        match shard.get_mut(key.as_bytes()) {
            Some(v) => *v = value,
            None => {
                shard.insert(Key::new(key), value);
                self.len += 1;
                if self.len > self.shards.len() * SHARD_ENTRIES {
                    self.grow();
                }
            }
        }
    }

    /// Removes `key` if it is there.
    pub(super) fn remove(&mut self, key: &str) {
        if self.get(key).is_none() {
            return;
        }
        if let Some(shard) = self.shard_mut(key) {
            if shard.remove(key.as_bytes()).is_some() {
                self.len -= 1;
            }
        }
        if self.len == 0 {
            self.shards = Arc::new([]);
        }
    }

    /// The shard of `key`, made this map's own (copied if another map shares it).
    fn shard_mut(&mut self, key: &str) -> Option<&mut Shard<V>> {
        let i = shard_index(&self.hasher, key.as_bytes(), self.shards.len());
        Arc::make_mut(&mut self.shards)
            .get_mut(i)
            .map(Arc::make_mut)
    }

    /// Doubles the shards and spreads the entries over them.
    fn grow(&mut self) {
        let count = self.shards.len() * 2;
        let mut shards: Vec<Shard<V>> = (0..count)
            .map(|_| HashMap::with_capacity_and_hasher(SHARD_ENTRIES, self.hasher))
            .collect();
        for (key, value) in self.shards.iter().flat_map(|s| s.iter()) {
            if let Some(shard) = shards.get_mut(shard_index(&self.hasher, key.as_bytes(), count)) {
                shard.insert(key.clone(), value.clone());
            }
        }
        self.shards = shards.into_iter().map(Arc::new).collect();
    }
}

fn shard_index(hasher: &KeyHasher, key: &[u8], shards: usize) -> usize {
    if shards <= 1 {
        return 0;
    }
    // Bits 32 and up: the shard's table takes its buckets from the low bits and its tags
    // from the top seven, so keys of one shard still differ in both.
    (hasher.hash_one(key) >> 32) as usize & (shards - 1)
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

    #[test]
    fn agrees_with_a_hash_map_through_growth_edits_and_shared_copies() {
        let mut map: FlatMap<usize> = FlatMap::default();
        let mut model: HashMap<String, usize> = HashMap::new();
        let mut copies: Vec<(FlatMap<usize>, HashMap<String, usize>)> = Vec::new();
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        for step in 0..40_000usize {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            let r = x.wrapping_mul(0x2545_f491_4f6c_dd1d);
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
    }
}
