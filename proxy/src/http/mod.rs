//! The HTTP proxy: hyper server (HTTP/1.1 and h2c), the request path, hygiene, bodies, and
//! the access log.

pub mod access_log;
pub mod body;
mod detect;
pub mod framing;
pub mod hygiene;
mod parked;
pub mod per_ip;
mod proxy;
mod server;
mod streams;

pub use server::{serve, serve_on};
