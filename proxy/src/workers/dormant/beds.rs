//! Where a dormitory keeps its sleepers and their deadlines.
//!
//! Both are built so that a wave of connections going dormant leaves no memory behind
//! once they are served again. A growing `Vec` (as in a slab or a binary heap of one entry
//! per sleeper) is copied into a block twice its size each time it fills, and the
//! allocator kept the blocks it left (about a third of a kilobyte per connection at 9,000
//! dormant connections). Here sleepers sit in chunks of [`CHUNK`] places that are
//! allocated once and never move; deadlines are kept per group of [`GROUP`] places, in a
//! heap with one entry per group rather than one per sleeper.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use tokio::time::Instant;

/// Places per chunk of the table.
pub const CHUNK: usize = 1024;

/// Places per deadline group: the places a passed deadline has its group look at.
pub const GROUP: usize = 64;

/// Values by key, in chunks of [`CHUNK`] places that never move once allocated: a key is
/// its chunk's index times [`CHUNK`] plus its place in the chunk. A chunk left empty is
/// freed (the first one is kept).
pub struct Table<T> {
    chunks: Vec<Chunk<T>>,
    len: usize,
}

struct Chunk<T> {
    /// Allocated with room for [`CHUNK`] places, filled from the front.
    places: Vec<Place<T>>,
    /// The first vacant place below `places.len()`, if any: each vacant place names the
    /// next.
    vacant: Option<u32>,
    /// Taken places.
    taken: usize,
}

enum Place<T> {
    Vacant(Option<u32>),
    Taken(T),
}

impl<T> Default for Table<T> {
    fn default() -> Self {
        Table {
            chunks: Vec::new(),
            len: 0,
        }
    }
}

impl<T> Chunk<T> {
    fn new() -> Chunk<T> {
        Chunk {
            places: Vec::with_capacity(CHUNK),
            vacant: None,
            taken: 0,
        }
    }

    /// Whether it has a vacant place, or is freed.
    fn has_room(&self) -> bool {
        self.vacant.is_some() || self.places.len() < CHUNK
    }

    fn freed() -> Chunk<T> {
        Chunk {
            places: Vec::new(),
            vacant: None,
            taken: 0,
        }
    }
}

impl<T> Table<T> {
    /// How many values it holds.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Stores `value`: its key.
    pub fn insert(&mut self, value: T) -> usize {
        // The first chunk with room: a freed one (whose index is used again, so keys stay
        // small) is allocated anew.
        let index = match self.chunks.iter().position(Chunk::has_room) {
            Some(index) => index,
            None => {
                self.chunks.push(Chunk::new());
                self.chunks.len() - 1
            }
        };
        let chunk = &mut self.chunks[index];
        if chunk.places.capacity() == 0 {
            *chunk = Chunk::new();
        }
        let place = match chunk.vacant {
            Some(place) => {
                let place = place as usize;
                chunk.vacant = match chunk.places[place] {
                    Place::Vacant(next) => next,
                    Place::Taken(_) => unreachable!("a taken place on the vacant list"),
                };
                chunk.places[place] = Place::Taken(value);
                place
            }
            None => {
                chunk.places.push(Place::Taken(value));
                chunk.places.len() - 1
            }
        };
        chunk.taken += 1;
        self.len += 1;
        index * CHUNK + place
    }

    /// The value stored under `key`, if any.
    pub fn get(&self, key: usize) -> Option<&T> {
        match self.chunks.get(key / CHUNK)?.places.get(key % CHUNK)? {
            Place::Taken(value) => Some(value),
            Place::Vacant(_) => None,
        }
    }

    /// Takes the value stored under `key`, if any.
    pub fn remove(&mut self, key: usize) -> Option<T> {
        let (index, place) = (key / CHUNK, key % CHUNK);
        let chunk = self.chunks.get_mut(index)?;
        let slot = chunk.places.get_mut(place)?;
        if matches!(slot, Place::Vacant(_)) {
            return None;
        }
        let Place::Taken(value) = std::mem::replace(slot, Place::Vacant(chunk.vacant)) else {
            unreachable!("checked above");
        };
        // `place` < CHUNK, which fits in a u32.
        chunk.vacant = Some(place as u32);
        chunk.taken -= 1;
        self.len -= 1;
        if chunk.taken == 0 && index > 0 {
            // Its places go back to the allocator: a chunk is large (CHUNK places), so
            // this is a block of its own.
            self.chunks[index] = Chunk::freed();
            while self.chunks.last().is_some_and(|c| c.places.capacity() == 0) {
                self.chunks.pop();
            }
        }
        Some(value)
    }

    /// The keys of the values for which `pick` holds.
    pub fn keys_where(&self, mut pick: impl FnMut(&T) -> bool) -> Vec<usize> {
        let mut keys = Vec::new();
        for (index, chunk) in self.chunks.iter().enumerate() {
            for (place, slot) in chunk.places.iter().enumerate() {
                if let Place::Taken(value) = slot {
                    if pick(value) {
                        keys.push(index * CHUNK + place);
                    }
                }
            }
        }
        keys
    }
}

/// The earliest deadline of each group of [`GROUP`] keys, at most that early (a deadline
/// whose value left stays until its group is looked at), and a heap of the groups by it.
#[derive(Default)]
pub struct Deadlines {
    /// By group.
    earliest: Vec<Option<Instant>>,
    /// Groups by deadline; an entry is stale when it no longer equals its group's.
    heap: BinaryHeap<Reverse<(Instant, usize)>>,
}

impl Deadlines {
    /// Notes that the value under `key` is due at `due`.
    pub fn add(&mut self, key: usize, due: Instant) {
        let group = key / GROUP;
        if self.earliest.len() <= group {
            self.earliest.resize(group + 1, None);
        }
        if self.earliest[group].is_some_and(|earliest| earliest <= due) {
            return;
        }
        self.earliest[group] = Some(due);
        self.heap.push(Reverse((due, group)));
        // Stale entries are dropped when they come up; rebuilt when they outnumber the
        // groups.
        if self.heap.len() > 2 * self.earliest.len() + 64 {
            self.heap = self
                .earliest
                .iter()
                .enumerate()
                .filter_map(|(group, due)| due.map(|due| Reverse((due, group))))
                .collect();
        }
    }

    /// The earliest deadline of all.
    pub fn next(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse((due, _))| *due)
    }

    /// A group whose earliest deadline passed by `now`: its keys are looked at, and its
    /// earliest deadline must then be [`set`](Self::set) again.
    pub fn pop_due(&mut self, now: Instant) -> Option<std::ops::Range<usize>> {
        while let Some(&Reverse((due, group))) = self.heap.peek() {
            if due > now {
                return None;
            }
            self.heap.pop();
            if self.earliest[group] == Some(due) {
                self.earliest[group] = None;
                return Some(group * GROUP..(group + 1) * GROUP);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn keys_are_stable_and_places_are_used_again() {
        let mut table = Table::default();
        let keys: Vec<usize> = (0..3 * CHUNK + 5).map(|i| table.insert(i)).collect();
        assert_eq!(keys, (0..3 * CHUNK + 5).collect::<Vec<_>>());
        assert_eq!(table.len(), 3 * CHUNK + 5);
        assert_eq!(table.remove(7), Some(7));
        assert_eq!(table.remove(7), None);
        assert_eq!(table.get(7), None);
        assert_eq!(table.get(CHUNK + 1), Some(&(CHUNK + 1)));
        // The vacant place is taken before the chunk's end or a new chunk.
        assert_eq!(table.insert(100_000), 7);
        assert_eq!(table.get(7), Some(&100_000));
        assert_eq!(table.len(), 3 * CHUNK + 5);
        assert_eq!(
            table.keys_where(|v| *v == 100_000 || *v == 2 * CHUNK),
            vec![7, 2 * CHUNK]
        );
    }

    #[test]
    fn an_empty_chunk_is_freed_and_its_keys_come_back() {
        let mut table = Table::default();
        for i in 0..2 * CHUNK {
            table.insert(i);
        }
        for key in CHUNK..2 * CHUNK {
            assert_eq!(table.remove(key), Some(key));
        }
        assert_eq!(table.chunks.len(), 1, "the empty last chunk is freed");
        assert_eq!(table.get(CHUNK), None);
        assert_eq!(table.remove(CHUNK), None);
        assert_eq!(table.insert(5), CHUNK);
        // A freed chunk in the middle is allocated again before a new one.
        for i in 0..CHUNK {
            table.insert(i);
        }
        for key in CHUNK..2 * CHUNK {
            table.remove(key);
        }
        assert_eq!(table.chunks[1].places.capacity(), 0);
        assert_eq!(table.get(CHUNK), None);
        for key in CHUNK..2 * CHUNK {
            assert_eq!(table.insert(0), key);
        }
        assert_eq!(table.chunks[1].places.capacity(), CHUNK);
        assert_eq!(table.len(), 2 * CHUNK + 1);
    }

    #[test]
    fn deadlines_come_up_by_group_in_order() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let mut deadlines = Deadlines::default();
        deadlines.add(3, at(30));
        deadlines.add(5, at(10));
        deadlines.add(GROUP * 4, at(20));
        deadlines.add(6, at(50));
        assert_eq!(deadlines.next(), Some(at(10)));
        assert_eq!(deadlines.pop_due(at(9)), None);
        assert_eq!(deadlines.pop_due(at(25)), Some(0..GROUP));
        // The caller set the group's next deadline again (the key due at 30).
        deadlines.add(3, at(30));
        assert_eq!(deadlines.pop_due(at(25)), Some(GROUP * 4..GROUP * 5));
        assert_eq!(deadlines.pop_due(at(25)), None);
        assert_eq!(deadlines.next(), Some(at(30)));
        assert_eq!(deadlines.pop_due(at(40)), Some(0..GROUP));
        assert_eq!(deadlines.pop_due(at(1000)), None);
    }

    #[test]
    fn an_earlier_deadline_supersedes_and_stale_entries_are_bounded() {
        let start = Instant::now();
        let mut deadlines = Deadlines::default();
        deadlines.add(0, start + Duration::from_secs(100));
        for i in (0..1000u64).rev() {
            deadlines.add(1, start + Duration::from_millis(i));
        }
        assert!(deadlines.heap.len() <= 2 * deadlines.earliest.len() + 64);
        assert_eq!(deadlines.next(), Some(start));
        assert_eq!(deadlines.pop_due(start), Some(0..GROUP));
        assert_eq!(deadlines.pop_due(start + Duration::from_secs(1000)), None);
    }
}
