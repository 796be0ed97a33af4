//! Listening sockets: bound here with SO_REUSEADDR + SO_REUSEPORT, one per `[[listeners]]`.

mod idle;

use std::collections::BTreeMap;
use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};
use thiserror::Error;

pub use idle::IdleTimeout;

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
    let socket = Socket::new(Domain::for_address(address), Type::STREAM, Some(Protocol::TCP))?;
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

/// Binds every listener of `config`, by name.
pub fn bind_all(config: &Config) -> Result<BTreeMap<String, std::net::TcpListener>, BindError> {
    config
        .listeners
        .iter()
        .map(|l| {
            bind(l.address)
                .map(|s| (l.name.clone(), s))
                .map_err(|source| BindError { name: l.name.clone(), address: l.address, source })
        })
        .collect()
}
