//! The unix socket of the management API: created fresh at start with mode 0660; a stale
//! file left by a crashed daemon is replaced, a live daemon is never displaced.

use std::io::ErrorKind;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use super::MgmtError;

/// A bound management socket and the identity of the file it created.
#[derive(Debug)]
pub struct UnixSocket {
    /// The listening socket.
    pub listener: UnixListener,
    /// Its path.
    pub path: PathBuf,
    /// Device and inode of the socket file, so only our own file is removed at exit.
    file_id: (u64, u64),
}

fn socket_error(path: &Path, source: std::io::Error) -> MgmtError {
    MgmtError::Socket {
        path: path.display().to_string(),
        source,
    }
}

/// Binds `path`, replacing a stale socket file and refusing a live one.
pub fn bind(path: &Path) -> Result<UnixSocket, MgmtError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(MgmtError::NotASocket {
                path: path.display().to_string(),
            })
        }
        Ok(_) => match UnixStream::connect(path) {
            Ok(_) => {
                return Err(MgmtError::InUse {
                    path: path.display().to_string(),
                })
            }
            // Nobody accepts on it: a leftover of a daemon that did not exit cleanly.
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                tracing::info!(path = %path.display(), "replacing stale management socket");
                std::fs::remove_file(path).map_err(|e| socket_error(path, e))?;
            }
            Err(e) => return Err(socket_error(path, e)),
        },
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(socket_error(path, e)),
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| socket_error(dir, e))?;
    }
    let listener = UnixListener::bind(path).map_err(|e| socket_error(path, e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .map_err(|e| socket_error(path, e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| socket_error(path, e))?;
    let meta = std::fs::metadata(path).map_err(|e| socket_error(path, e))?;
    Ok(UnixSocket {
        listener,
        path: path.to_path_buf(),
        file_id: (meta.dev(), meta.ino()),
    })
}

/// Adopts a listening socket handed over by the previous process; its file stays as is.
pub fn adopt(listener: UnixListener, path: &Path) -> Result<UnixSocket, MgmtError> {
    listener
        .set_nonblocking(true)
        .map_err(|e| socket_error(path, e))?;
    let meta = std::fs::metadata(path).map_err(|e| socket_error(path, e))?;
    Ok(UnixSocket {
        listener,
        path: path.to_path_buf(),
        file_id: (meta.dev(), meta.ino()),
    })
}

/// Removes the socket file if it is still the one `bind` created (a successor may have
/// replaced it during an upgrade).
pub fn remove(path: &Path, file_id: (u64, u64)) {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if (meta.dev(), meta.ino()) == file_id {
            if let Err(e) = std::fs::remove_file(path) {
                tracing::warn!(path = %path.display(), error = %e, "could not remove management socket");
            }
        }
    }
}

impl UnixSocket {
    /// Device and inode of the socket file.
    pub fn file_id(&self) -> (u64, u64) {
        self.file_id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_socket_is_replaced_live_one_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("run/mgmt.sock");
        let first = bind(&path).expect("fresh bind");
        let mode = std::fs::metadata(&path)
            .expect("socket file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o660);
        assert!(matches!(bind(&path), Err(MgmtError::InUse { .. })));
        drop(first); // The file stays behind, like after a crash.
        let second = bind(&path).expect("stale file replaced");
        remove(&second.path, second.file_id());
        assert!(!path.exists());

        std::fs::write(&path, b"not a socket").expect("write file");
        assert!(matches!(bind(&path), Err(MgmtError::NotASocket { .. })));
    }
}
