//! Listening sockets, one per `[[listeners]]`, obtained in this order: handed over by the
//! previous proxyd (upgrade), passed by systemd (socket activation or fd store, matched by
//! name), else bound here with SO_REUSEADDR + SO_REUSEPORT.

mod accept;
mod client;
mod gate;
mod idle;
mod inherit;

use std::collections::BTreeMap;
use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};
use thiserror::Error;

pub use accept::{Accepted, Incoming};
pub use client::ClientSocket;
pub use gate::{AcceptGate, GatedIncoming};
pub use idle::{Dormant, DormantLimit, IdleTimeout, ReadReady, Woken};
pub use inherit::{Inherited, Origin};

use crate::config::Config;

/// A listener could not be set up.
#[derive(Debug, Error)]
#[error("listener {name:?} on {address}: {source}")]
pub struct BindError {
    /// Listener name.
    pub name: String,
    /// Address it wanted.
    pub address: SocketAddr,
    /// OS error.
    pub source: std::io::Error,
}

/// Binds `address` for accepting, with address and port reuse so a next process can bind
/// the same port while this one still serves.
pub fn bind(address: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = Socket::new(
        Domain::for_address(address),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    if address.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&address.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// The listening sockets of every listener of `config`, by name, and the names of those
/// bound here (not inherited), which may be offered to systemd's fd store.
pub fn obtain(
    config: &Config,
    inherited: &mut Inherited,
) -> Result<(BTreeMap<String, std::net::TcpListener>, Vec<String>), BindError> {
    let mut sockets = BTreeMap::new();
    let mut bound_here = Vec::new();
    for l in &config.listeners {
        if let Some((socket, origin)) = inherited.take_tcp(&l.name) {
            let actual = socket.local_addr().ok();
            // A handed-over or stored socket on an address the new config no longer names
            // is replaced; socket-unit sockets are authoritative (the unit decides).
            let moved =
                origin != Origin::Systemd && l.address.port() != 0 && actual != Some(l.address);
            if !moved {
                sockets.insert(l.name.clone(), socket);
                continue;
            }
            tracing::info!(listener = %l.name, old = ?actual, new = %l.address, "listener address changed; binding the new one");
            if origin == Origin::Store {
                crate::systemd::remove_stored(&l.name);
            }
        }
        let socket = bind(l.address).map_err(|source| BindError {
            name: l.name.clone(),
            address: l.address,
            source,
        })?;
        sockets.insert(l.name.clone(), socket);
        bound_here.push(l.name.clone());
    }
    Ok((sockets, bound_here))
}

/// Binds every listener of `config`, by name.
pub fn bind_all(config: &Config) -> Result<BTreeMap<String, std::net::TcpListener>, BindError> {
    obtain(config, &mut Inherited::default()).map(|(sockets, _)| sockets)
}
