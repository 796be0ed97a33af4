//! Listening sockets that arrive open: handed over by the previous proxyd during an
//! upgrade, or passed by systemd (socket activation and its fd store), matched by name.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::os::unix::net::UnixListener;

use crate::systemd::STORE_PREFIX;

/// Where an inherited socket came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The previous proxyd process (upgrade handoff).
    Handoff,
    /// systemd: a `.socket` unit (its address is the unit's to decide).
    Systemd,
    /// systemd's fd store: a socket this daemon bound and stored earlier.
    Store,
}

/// Open listening sockets by name, waiting to be claimed by the listeners that use them.
#[derive(Debug, Default)]
pub struct Inherited {
    tcp: BTreeMap<String, (TcpListener, Origin)>,
    unix: BTreeMap<String, UnixListener>,
    /// What the previous process passed along with its sockets, by key (see
    /// [`crate::upgrade::HandoffExtras::handoff_data`]).
    data: BTreeMap<String, String>,
}

/// `LISTEN_FDNAMES` entry systemd uses for sockets without a `FileDescriptorName`.
const UNNAMED: &str = "unknown";

impl Inherited {
    /// Takes the sockets systemd passed (`LISTEN_PID`/`LISTEN_FDS`/`LISTEN_FDNAMES`) and
    /// clears those variables so no child process sees them. A single unnamed socket is
    /// given to `only_listener`, the sole configured listener, if there is one.
    pub fn from_systemd(only_listener: Option<&str>) -> Inherited {
        let names: Vec<String> = std::env::var("LISTEN_FDNAMES")
            .map(|v| v.split(':').map(str::to_string).collect())
            .unwrap_or_default();
        let mut fds = listenfd::ListenFd::from_env();
        std::env::remove_var("LISTEN_FDNAMES");
        let mut inherited = Inherited::default();
        for idx in 0..fds.len() {
            let name = names
                .get(idx)
                .cloned()
                .unwrap_or_else(|| UNNAMED.to_string());
            let (name, origin) = match (name.as_str(), only_listener, fds.len()) {
                ("" | UNNAMED, Some(only), 1) => (only.to_string(), Origin::Systemd),
                _ => match name.strip_prefix(STORE_PREFIX) {
                    Some(stored) => (stored.to_string(), Origin::Store),
                    None => (name, Origin::Systemd),
                },
            };
            match fds.take_tcp_listener(idx) {
                Ok(Some(listener)) => match inherited.tcp.entry(name) {
                    std::collections::btree_map::Entry::Occupied(e) => {
                        tracing::warn!(name = %e.key(), "systemd passed two sockets with this name; closing the second");
                    }
                    std::collections::btree_map::Entry::Vacant(e) => {
                        tracing::info!(name = %e.key(), "using a socket passed by systemd");
                        e.insert((listener, origin));
                    }
                },
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(%name, error = %e, "ignoring a file descriptor from systemd that is not a TCP listening socket")
                }
            }
        }
        inherited
    }

    /// Adds a TCP listening socket.
    pub fn insert_tcp(&mut self, name: String, listener: TcpListener, origin: Origin) {
        self.tcp.insert(name, (listener, origin));
    }

    /// Adds a unix listening socket.
    pub fn insert_unix(&mut self, name: String, listener: UnixListener) {
        self.unix.insert(name, listener);
    }

    /// Claims the TCP socket called `name`.
    pub fn take_tcp(&mut self, name: &str) -> Option<(TcpListener, Origin)> {
        self.tcp.remove(name)
    }

    /// Keeps what the previous process passed along with its sockets.
    pub fn set_data(&mut self, data: BTreeMap<String, String>) {
        self.data = data;
    }

    /// Takes the data the previous process passed under `key`.
    pub fn take_data(&mut self, key: &str) -> Option<String> {
        self.data.remove(key)
    }

    /// Claims every TCP socket whose name starts with `prefix`, with its name.
    pub fn take_tcp_prefixed(&mut self, prefix: &str) -> Vec<(String, TcpListener)> {
        let names: Vec<String> = self
            .tcp
            .keys()
            .filter(|n| n.starts_with(prefix))
            .cloned()
            .collect();
        names
            .into_iter()
            .filter_map(|n| self.tcp.remove(&n).map(|(l, _)| (n, l)))
            .collect()
    }

    /// Claims the unix socket called `name`.
    pub fn take_unix(&mut self, name: &str) -> Option<UnixListener> {
        self.unix.remove(name)
    }

    /// Moves every socket of `other` in (names already present keep the existing one).
    pub fn merge(&mut self, other: Inherited) {
        for (name, entry) in other.tcp {
            self.tcp.entry(name).or_insert(entry);
        }
        for (name, listener) in other.unix {
            self.unix.entry(name).or_insert(listener);
        }
    }

    /// Closes the sockets nobody claimed, saying so.
    pub fn close_leftovers(self) {
        for (name, (_, origin)) in self.tcp {
            tracing::info!(%name, ?origin, "closing an inherited socket no listener uses");
            if origin == Origin::Store {
                crate::systemd::remove_stored(&name);
            }
        }
        for name in self.unix.keys() {
            tracing::info!(%name, "closing an inherited unix socket nothing uses");
        }
    }

    /// Whether nothing is left.
    pub fn is_empty(&self) -> bool {
        self.tcp.is_empty() && self.unix.is_empty()
    }
}
