//! Dormant connections. An HTTP/1 keep-alive connection that stays idle for a while after
//! it parked (see `http::server`) leaves its task and sleeps as a bare socket in its
//! worker's dormitory: an epoll set of the worker's own, apart from the runtime's, with
//! the socket's deadline and what serving it again takes. A sleeper has no task, no
//! future, no timer, no buffer and no registration with the runtime: a few hundred bytes,
//! where a task waiting on a registered socket holds kilobytes (nginx keeps about half a
//! kilobyte per idle connection).
//!
//! A sleeper becomes a task again, on the same worker, when its socket turns readable
//! (its next request, its close or an error), when its deadline passes (its next request's
//! or its idle limit: the task then closes it and counts why, as it would have), or when
//! its listener stops accepting on that worker (a drain: the task then gives it the
//! drain's grace). Whatever the connection holds (its place under the listener's limits,
//! its count as open, the drain's wait for it) stays held while it sleeps.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Registry, Token};
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;
use tokio::time::Instant;

mod beds;

use beds::{Deadlines, Table};

/// What a sleeper keeps besides its socket: the connection's state, which makes it a
/// served connection again.
pub trait Wake: Send + 'static {
    /// Serves the connection again, given its socket (out of the dormitory's event loop,
    /// and not yet in the runtime's: the bytes that woke it are read without waiting).
    /// Called on the worker the sleeper slept on.
    fn wake(self, socket: std::net::TcpStream);

    /// When it is woken even if no byte came. Asked when it goes to sleep and when a
    /// deadline of its group passes, rather than kept beside it: a sleeper is all that a
    /// dormant connection keeps, once per connection.
    fn due(&self) -> Instant;

    /// Which listener it was accepted on, as [`Dormitory::wake_all`] names it.
    fn group(&self) -> usize;

    /// Lets go of what the worker keeps for busy times (spare buffers): called on the
    /// worker before each allocator nudge, that is while and after its connections go
    /// dormant.
    fn settle() {}
}

/// A connection put to sleep.
pub struct Sleeper<S> {
    /// The socket, out of the runtime's event loop.
    pub socket: std::net::TcpStream,
    /// The connection's state, kept in the dormitory's own table (see [`beds`]) rather
    /// than in a block of its own.
    pub state: S,
}

/// A worker's dormitory, as its connections reach it: sends to the one task that holds
/// the sleepers.
pub struct Dormitory<S> {
    to: mpsc::UnboundedSender<Message<S>>,
}

enum Message<S> {
    Sleep(Sleeper<S>),
    WakeAll(usize),
}

/// How many readiness events one look at the epoll set takes; more wait for the next look.
const EVENTS_PER_LOOK: usize = 256;

impl<S: Wake> Dormitory<S> {
    /// Starts a dormitory on the current runtime: a single-threaded worker's, whose
    /// connections alone sleep in it; `sleeping` counts them.
    pub fn start(sleeping: &'static AtomicUsize) -> Dormitory<S> {
        let (to, from) = mpsc::unbounded_channel();
        tokio::spawn(run(from, sleeping));
        Dormitory { to }
    }

    /// Puts `sleeper` to sleep. Must be called on the dormitory's worker: the sleeper is
    /// woken there, and nothing else orders it after a [`wake_all`](Self::wake_all) of its
    /// group sent from that worker.
    pub fn sleep(&self, sleeper: Sleeper<S>) {
        if let Err(refused) = self.to.send(Message::Sleep(sleeper)) {
            // The dormitory's task is gone (its runtime is shutting down): served on, here.
            if let Message::Sleep(sleeper) = refused.0 {
                wake_now(sleeper);
            }
        }
    }

    /// Wakes every sleeper of `group` (its listener stopped accepting on this worker).
    pub fn wake_all(&self, group: usize) {
        let _ = self.to.send(Message::WakeAll(group));
    }
}

/// Serves a sleeper again.
fn wake_now<S: Wake>(sleeper: Sleeper<S>) {
    let Sleeper { socket, state } = sleeper;
    state.wake(socket);
}

/// The sleepers of one worker and their deadlines.
struct Beds<S> {
    sleepers: Table<Sleeper<S>>,
    dues: Deadlines,
    /// The number of sleepers, as the worker's metrics read it.
    count: &'static AtomicUsize,
}

impl<S: Wake> Beds<S> {
    fn put(&mut self, registry: &Registry, sleeper: Sleeper<S>) {
        let (fd, due) = (sleeper.socket.as_raw_fd(), sleeper.state.due());
        let key = self.sleepers.insert(sleeper);
        // Bytes that came since the connection's last look make the socket ready at once:
        // epoll reports what is ready when a socket is added.
        if let Err(e) = registry.register(&mut SourceFd(&fd), Token(key), Interest::READABLE) {
            tracing::debug!(error = %e, "connection could not go dormant; served on");
            if let Some(sleeper) = self.sleepers.remove(key) {
                wake_now(sleeper);
            }
            return;
        }
        self.dues.add(key, due);
        self.count.store(self.sleepers.len(), Ordering::Relaxed);
    }

    fn wake(&mut self, registry: &Registry, key: usize) {
        if let Some(sleeper) = self.sleepers.remove(key) {
            self.count.store(self.sleepers.len(), Ordering::Relaxed);
            let _ = registry.deregister(&mut SourceFd(&sleeper.socket.as_raw_fd()));
            wake_now(sleeper);
        }
    }

    /// Wakes the sleepers whose deadline passed by `now`.
    fn wake_due(&mut self, registry: &Registry, now: Instant) {
        while let Some(keys) = self.dues.pop_due(now) {
            for key in keys {
                let Some(due) = self.sleepers.get(key).map(|sleeper| sleeper.state.due()) else {
                    continue;
                };
                if due <= now {
                    self.wake(registry, key);
                } else {
                    self.dues.add(key, due);
                }
            }
        }
    }

    fn wake_group(&mut self, registry: &Registry, group: usize) {
        for key in self.sleepers.keys_where(|s| s.state.group() == group) {
            self.wake(registry, key);
        }
    }
}

/// How often a worker nudges the allocator, while connections go dormant, to return the
/// memory their tasks freed (see [`crate::allocator::collect_free_pages`]): mimalloc
/// keeps a page it emptied for reuse until later allocations, and gives freed pages back
/// once its purge delay (1 s) has passed but looks only when it frees a page, which an
/// idle worker no longer does. Every half second, so that a page is back at most half a
/// second after its delay.
const SETTLE: Duration = Duration::from_millis(500);

/// How many nudges follow the last sleeper that came: past the purge delay of the pages
/// its task freed, with room to spare.
const NUDGES: u8 = 6;

/// A deadline far enough away to stand for none.
fn never() -> Instant {
    Instant::now() + Duration::from_secs(86_400 * 365)
}

/// The epoll set, watched by the worker's runtime for sleepers ready.
///
/// tokio deprecated its safe constructor in favour of an `unsafe` one, since a wrapped
/// object could hand out another file descriptor than it registered, or close it first.
/// `Poll` owns its epoll descriptor from creation to drop and always returns that one, so
/// the condition the `unsafe` constructor asks its caller to keep holds here; this crate
/// keeps `unsafe` to its allocator, hence the deprecated call.
#[allow(deprecated)]
fn watched(epoll: Poll) -> std::io::Result<AsyncFd<Poll>> {
    AsyncFd::with_interest(epoll, tokio::io::Interest::READABLE)
}

/// The dormitory's task: takes sleepers in, wakes them on readiness, deadline or drain.
async fn run<S: Wake>(mut from: mpsc::UnboundedReceiver<Message<S>>, count: &'static AtomicUsize) {
    let mut epoll = match Poll::new().and_then(watched) {
        Ok(epoll) => epoll,
        Err(e) => {
            tracing::warn!(error = %e, "no dormitory on this worker: idle connections wait in their tasks");
            while let Some(message) = from.recv().await {
                if let Message::Sleep(sleeper) = message {
                    wake_now(sleeper);
                }
            }
            return;
        }
    };
    let mut beds = Beds {
        sleepers: Table::default(),
        dues: Deadlines::default(),
        count,
    };
    let mut events = Events::with_capacity(EVENTS_PER_LOOK);
    let mut ready: Vec<usize> = Vec::new();
    let timer = tokio::time::sleep_until(never());
    tokio::pin!(timer);
    // Nudges left (see `SETTLE`): one every `SETTLE` while sleepers keep coming, and
    // `NUDGES` after the last, for the pages freed between nudges.
    let mut nudges = 0u8;
    let settle = tokio::time::sleep_until(never());
    tokio::pin!(settle);
    loop {
        tokio::select! {
            message = from.recv() => match message {
                Some(Message::Sleep(sleeper)) => {
                    beds.put(epoll.get_ref().registry(), sleeper);
                    if nudges == 0 {
                        settle.as_mut().reset(Instant::now() + SETTLE);
                    }
                    nudges = NUDGES;
                }
                Some(Message::WakeAll(group)) => beds.wake_group(epoll.get_ref().registry(), group),
                // Every sender is gone, so is the runtime: the sleepers close.
                None => return,
            },
            looked = epoll.readable_mut() => {
                let Ok(mut guard) = looked else {
                    tracing::warn!("the dormitory's epoll set failed; its connections are served on");
                    for key in beds.sleepers.keys_where(|_| true) {
                        beds.wake(epoll.get_ref().registry(), key);
                    }
                    return;
                };
                let polled = guard.get_inner_mut().poll(&mut events, Some(Duration::ZERO));
                ready.clear();
                ready.extend(events.iter().map(|event| event.token().0));
                // A full look may have left events behind: the set stays ready for the
                // next. Readiness that came after this look is not cleared (tokio clears
                // only what the guard saw).
                if polled.is_ok() && ready.len() < EVENTS_PER_LOOK {
                    guard.clear_ready();
                }
                drop(guard);
                if let Err(e) = polled {
                    tracing::debug!(error = %e, "looking at the dormitory's epoll set");
                }
                for &key in &ready {
                    beds.wake(epoll.get_ref().registry(), key);
                }
            }
            () = &mut timer => beds.wake_due(epoll.get_ref().registry(), Instant::now()),
            () = &mut settle, if nudges > 0 => {
                S::settle();
                crate::allocator::collect_free_pages();
                nudges -= 1;
                settle.as_mut().reset(if nudges > 0 { Instant::now() + SETTLE } else { never() });
            }
        }
        let next = beds.dues.next().unwrap_or_else(never);
        if timer.deadline() != next {
            timer.as_mut().reset(next);
        }
    }
}
