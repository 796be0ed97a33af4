//! A per-thread stock of things a stream uses and gives back (copy buffers, pipes), so
//! that a short connection takes one made before instead of making and freeing its own.

use std::cell::RefCell;
use std::thread::LocalKey;

/// A thread's stock.
pub(super) type Stock<T> = LocalKey<RefCell<Vec<T>>>;

/// One from `stock`, if it has any (none during thread exit, when the stock may be gone).
pub(super) fn take<T: 'static>(stock: &'static Stock<T>) -> Option<T> {
    stock.try_with(|s| s.borrow_mut().pop()).ok().flatten()
}

/// Puts `item` into `stock` while it holds fewer than `most`; otherwise, or during thread
/// exit, `item` is dropped.
pub(super) fn keep<T: 'static>(stock: &'static Stock<T>, item: T, most: usize) {
    let _ = stock.try_with(|s| {
        let mut spare = s.borrow_mut();
        if spare.len() < most {
            spare.push(item);
        }
    });
}
