//! The HTTP proxy: the servers (HTTP/1 with its own codec, HTTP/2 with hyper), the
//! request path, hygiene, bodies, and the access log.

pub mod access_log;
pub mod body;
mod detect;
pub mod framing;
mod h1;
pub mod hygiene;
pub mod per_ip;
mod proxy;
mod server;
mod streams;

pub use server::{serve, serve_on};
