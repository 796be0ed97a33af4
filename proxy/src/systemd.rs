//! systemd's notify socket: readiness, stopping, the main pid after a hand-over, and the fd
//! store that keeps listening sockets open across a plain restart. Every call does nothing
//! when the daemon does not run under systemd (no `NOTIFY_SOCKET`).

/// Prefix of the `FDNAME` under which proxyd stores its own sockets in systemd's fd store,
/// so they can be told apart from socket-unit sockets when they come back (an `FDNAME`
/// cannot hold a colon, and `@` never appears in a listener name).
pub const STORE_PREFIX: &str = "store@";

/// Sends a state to systemd's notify socket, if there is one.
pub fn notify(state: &[sd_notify::NotifyState<'_>]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = sd_notify::notify(state) {
        tracing::warn!(error = %e, "systemd notification failed");
    }
}

/// Drops the socket stored for listener `name` from systemd's fd store (it moved or is gone).
pub fn remove_stored(name: &str) {
    let stored_name = format!("{STORE_PREFIX}{name}");
    notify(&[
        sd_notify::NotifyState::FdStoreRemove,
        sd_notify::NotifyState::FdName(&stored_name),
    ]);
}

/// Offers listening sockets bound by this process to systemd's fd store (when the service
/// has `FileDescriptorStoreMax`), so even a plain restart keeps them open.
pub fn store(sockets: &[(&str, std::os::fd::BorrowedFd<'_>)]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    for (name, fd) in sockets {
        let stored_name = format!("{STORE_PREFIX}{name}");
        let state = [
            sd_notify::NotifyState::FdStore,
            sd_notify::NotifyState::FdName(&stored_name),
        ];
        if let Err(e) = sd_notify::notify_with_fds(&state, std::slice::from_ref(fd)) {
            tracing::debug!(%name, error = %e, "systemd fd store not available");
        }
    }
}
