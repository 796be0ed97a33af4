//! A thread's stock of things its connections are done with (read and response buffers,
//! header maps), kept for its next connections instead of being freed and allocated
//! again: blocks of more than 1 KiB take mimalloc's slower path.

use std::cell::RefCell;
use std::thread::LocalKey;

/// At most `most` things of one kind, kept by one thread (in a `thread_local!`).
pub struct Stock<T> {
    items: RefCell<Vec<T>>,
    most: usize,
}

impl<T> Stock<T> {
    /// An empty stock that keeps at most `most`.
    pub const fn new(most: usize) -> Stock<T> {
        Stock {
            items: RefCell::new(Vec::new()),
            most,
        }
    }
}

/// One thing this thread kept, if it has one (none while the thread is being torn down).
pub fn take<T>(stock: &'static LocalKey<Stock<T>>) -> Option<T> {
    stock
        .try_with(|stock| stock.items.borrow_mut().pop())
        .ok()
        .flatten()
}

/// Keeps `item` for this thread unless its stock is full (or the thread is being torn
/// down): then `item` is dropped.
pub fn give<T>(stock: &'static LocalKey<Stock<T>>, item: T) {
    let _ = stock.try_with(|stock| {
        let mut items = stock.items.borrow_mut();
        if items.len() < stock.most {
            items.push(item);
        }
    });
}

/// Lets go of all but `keep` of what this thread kept.
pub fn settle<T>(stock: &'static LocalKey<Stock<T>>, keep: usize) {
    let _ = stock.try_with(|stock| stock.items.borrow_mut().truncate(keep));
}

/// How many things this thread keeps.
pub fn len<T>(stock: &'static LocalKey<Stock<T>>) -> usize {
    stock
        .try_with(|stock| stock.items.borrow().len())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    thread_local! {
        static KEPT: Stock<Vec<u8>> = const { Stock::new(2) };
    }

    #[test]
    fn a_stock_gives_back_what_it_kept_last_first_and_keeps_no_more_than_its_most() {
        assert_eq!(take(&KEPT), None);
        for n in 1..=3u8 {
            give(&KEPT, vec![n]);
        }
        assert_eq!(len(&KEPT), 2, "the third was dropped");
        assert_eq!(take(&KEPT), Some(vec![2]));
        give(&KEPT, vec![4]);
        settle(&KEPT, 1);
        assert_eq!(len(&KEPT), 1);
        assert_eq!(take(&KEPT), Some(vec![1]));
        assert_eq!(take(&KEPT), None);
    }
}
