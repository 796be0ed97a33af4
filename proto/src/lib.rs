//! The gRPC management API of proxyd (package `proxy.v1`), and the client side of etcd's v3
//! API that etcd discovery uses.
//!
//! The `.proto` files live in `proto/proxy/v1/` and `etcd-api/` (etcd's own files, trimmed:
//! see `etcd-api/README.md`). The Rust code under `src/gen/` is generated from them and
//! checked in, so building needs no `protoc`; `tests/bootstrap.rs` regenerates it and fails
//! when the checked-in copy is stale.

/// Messages, clients and servers of package `proxy.v1`.
pub mod v1 {
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    include!("gen/proxy.v1.rs");

    /// Encoded `FileDescriptorSet` of every file in the package, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!("gen/proxy.v1.fds.bin");
}

/// The echo service (package `proxy.testing`) that proxyd's gRPC forwarding tests serve
/// behind the proxy: one method of each kind (unary, server, client and bidirectional
/// streaming). Not part of the management API.
pub mod testing {
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    include!("gen/proxy.testing.rs");
}

/// Clients of etcd's v3 API: the `KV`, `Watch` and `Lease` services.
pub mod etcd {
    /// Package `etcdserverpb`: the services and their requests and responses.
    pub mod etcdserverpb {
        #![allow(missing_docs, clippy::all, clippy::pedantic)]
        include!("gen/etcdserverpb.rs");
    }

    /// Package `mvccpb`: stored key-values and watch events.
    pub mod mvccpb {
        #![allow(missing_docs, clippy::all, clippy::pedantic)]
        include!("gen/mvccpb.rs");
    }
}
