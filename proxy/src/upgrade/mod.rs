//! Zero-downtime upgrades: the running proxyd starts the next binary and hands it every
//! listening socket over a unix socket (SCM_RIGHTS), then drains and exits.
//!
//! The conversation, parent P and child C, over `<runtime dir>/proxyd-handoff-<pid>.sock`
//! (its path is in C's environment as `PROXY_HANDOFF`):
//!
//! 1. C connects and sends `HELLO <pid> frames`; P checks the peer really is its child.
//! 2. P quiesces its hand-over participants ([`HandOver`], in the order the composition root
//!    registered them: the management API stops accepting, the SQLite writer closes, never
//!    two writers), then sends its offer as length-prefixed frames (names, kinds, state
//!    revision, and the data [`HandoffExtras`] pass along: the certificates of registered
//!    TLS routes; the format is described in `wire.rs`) followed by the descriptors: those
//!    fixed at start and those [`HandoffExtras`] list at this moment (ports opened for
//!    registrations).
//! 3. C opens the store, starts serving on the sockets (both accept for a moment: never
//!    zero acceptors), and sends `READY`.
//! 4. P tells systemd `MAINPID=<child>`, stops accepting, drains, and exits 0.
//!
//! If C exits, crashes, or is not ready within `server.upgrade_timeout`, P kills it, resumes
//! its participants in reverse order (the writer reopens, the management API accepts again)
//! and keeps serving; the upgrade call fails with the reason.

mod wire;

use std::ffi::OsString;
use std::future::Future;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::time::Instant;

use crate::listener::{Inherited, Origin};
use crate::shutdown::Shutdown;

#[doc(hidden)]
pub use wire::fuzz_read as fuzz_handoff_read;
pub use wire::SocketKind;

/// Environment variable naming the handoff socket of the parent.
pub const HANDOFF_ENV: &str = "PROXY_HANDOFF";

/// Name under which the admin listener's socket is handed over.
pub const ADMIN_SOCKET: &str = "@admin";
/// Name under which the management API's unix socket is handed over.
pub const MGMT_SOCKET: &str = "@mgmt";
/// Name under which the management API's TCP socket is handed over.
pub const MGMT_TCP_SOCKET: &str = "@mgmt-tcp";

/// Why an upgrade failed (the old process keeps serving).
#[derive(Debug, Error)]
pub enum UpgradeError {
    /// Another upgrade is running.
    #[error("an upgrade is already in progress")]
    Busy,
    /// This process has already handed over.
    #[error("this process has already handed over to its successor")]
    HandedOver,
    /// The new binary could not be started.
    #[error("cannot start {binary}: {source}")]
    Spawn {
        /// Binary path.
        binary: String,
        /// OS error.
        source: std::io::Error,
    },
    /// The new process exited before it was ready.
    #[error("the new process exited before it was ready ({0})")]
    ChildExited(String),
    /// The new process was not ready in time.
    #[error("the new process was not ready within {0:?}")]
    Timeout(Duration),
    /// The handoff conversation failed.
    #[error("handoff: {0}")]
    Protocol(String),
    /// A participant could not stop for the hand-over.
    #[error("{part} could not stop for the hand-over: {reason}")]
    Quiesce {
        /// [`HandOver::name`] of the participant.
        part: String,
        /// What went wrong.
        reason: String,
    },
    /// A participant could not start again after a failed upgrade.
    #[error("resuming {part} after the failed upgrade: {reason}")]
    Resume {
        /// [`HandOver::name`] of the participant.
        part: String,
        /// What went wrong.
        reason: String,
    },
    /// The config file (which names `server.executable`) cannot be used.
    #[error("{0}")]
    Config(String),
}

/// A socket this process offers to its successor: a duplicate of a listening socket.
pub struct HandoffSocket {
    /// Listener name (or one of the `@...` names).
    pub name: String,
    /// TCP or unix.
    pub kind: SocketKind,
    /// The descriptor.
    pub fd: OwnedFd,
}

/// The data a [`HandoffExtras`] passes along, as `(key, text)` pairs, when asked.
pub type HandoffData<'a> = Pin<Box<dyn Future<Output = Vec<(String, String)>> + Send + 'a>>;

/// Sockets that come and go while the daemon runs (ports opened for registrations): listed
/// when an upgrade hands over, after the fixed sockets.
pub trait HandoffExtras: Send + Sync {
    /// The sockets to offer the successor now (duplicates; names must not clash with the
    /// fixed ones).
    fn handoff_sockets(&self) -> Pin<Box<dyn Future<Output = Vec<HandoffSocket>> + Send + '_>>;

    /// State the successor needs with those sockets, as `(key, text)` (keys must be unique
    /// across extras); the successor reads it with [`Inherited::take_data`]. Sent over the
    /// handoff socket only, never written anywhere.
    fn handoff_data(&self) -> HandoffData<'_> {
        Box::pin(async { Vec::new() })
    }
}

/// Why a hand-over participant could not stop or start again.
pub type HandOverError = Box<dyn std::error::Error + Send + Sync>;

/// One step of a [`HandOver`] participant.
pub type HandOverStep<'a> = Pin<Box<dyn Future<Output = Result<(), HandOverError>> + Send + 'a>>;

/// A part of the daemon whose work must not overlap with the successor's (the state writer,
/// the management API's accept loops): stopped once the successor said hello, before the
/// sockets are offered, and started again if the hand-over fails.
pub trait HandOver: Send + Sync {
    /// What it is, for the log and errors ("the state store").
    fn name(&self) -> &str;

    /// Stops; the offer is sent once this returns (bounded by `server.upgrade_timeout`).
    fn quiesce(&self) -> HandOverStep<'_>;

    /// Starts again after a failed hand-over; also called when `quiesce` failed or did not
    /// finish, so it must accept a half-stopped part.
    fn resume(&self) -> HandOverStep<'_>;
}

/// The state revision sent with the offer, read once every participant has stopped.
pub type Revision = Box<dyn Fn() -> u64 + Send + Sync>;

/// Starts successors and hands them the sockets. One per daemon.
pub struct Upgrader {
    executable: PathBuf,
    args: Vec<OsString>,
    runtime_dir: PathBuf,
    timeout: Duration,
    revision: Revision,
    shutdown: Shutdown,
    sockets: Vec<HandoffSocket>,
    extras: Vec<Arc<dyn HandoffExtras>>,
    /// Quiesced in this order, resumed in the reverse order.
    participants: Vec<Arc<dyn HandOver>>,
    busy: AtomicBool,
    metrics: Option<Arc<crate::telemetry::Metrics>>,
    config_file: Option<PathBuf>,
}

/// The executable to start by default: `server.executable`, else the path this process was
/// started from (without the " (deleted)" Linux adds once a package replaced the file).
pub fn default_executable(configured: Option<&Path>) -> PathBuf {
    if let Some(p) = configured {
        return p.to_path_buf();
    }
    match std::env::current_exe() {
        Ok(p) => {
            let text = p.to_string_lossy();
            match text.strip_suffix(" (deleted)") {
                Some(original) => PathBuf::from(original),
                None => p,
            }
        }
        Err(_) => PathBuf::from("proxyd"),
    }
}

impl std::fmt::Debug for Upgrader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upgrader")
            .field("executable", &self.executable)
            .field(
                "sockets",
                &self
                    .sockets
                    .iter()
                    .map(|s| s.name.as_str())
                    .collect::<Vec<_>>(),
            )
            .field(
                "participants",
                &self
                    .participants
                    .iter()
                    .map(|p| p.name().to_owned())
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Upgrader {
    /// An upgrader offering `sockets` and the state `revision`; the successor runs
    /// `executable` with this process's arguments and talks to us through a socket in
    /// `runtime_dir`.
    pub fn new(
        executable: PathBuf,
        runtime_dir: PathBuf,
        timeout: Duration,
        revision: Revision,
        shutdown: Shutdown,
        sockets: Vec<HandoffSocket>,
    ) -> Upgrader {
        Upgrader {
            executable,
            args: std::env::args_os().skip(1).collect(),
            runtime_dir,
            timeout,
            revision,
            shutdown,
            sockets,
            extras: Vec::new(),
            participants: Vec::new(),
            busy: AtomicBool::new(false),
            metrics: None,
            config_file: None,
        }
    }

    /// Reads `server.executable` from `path` at each upgrade (the successor reads the same
    /// file), so an operator switches binaries by editing the config, never through the API.
    pub fn with_config_file(mut self, path: Option<PathBuf>) -> Self {
        self.config_file = path;
        self
    }

    /// Records upgrade counts and durations in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<crate::telemetry::Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Also offers the sockets `extras` lists at the moment of each handoff.
    pub fn with_extras(mut self, extras: Arc<dyn HandoffExtras>) -> Upgrader {
        self.extras.push(extras);
        self
    }

    /// Adds a participant: quiesced after those added before it, resumed before them.
    pub fn with_participant(mut self, participant: Arc<dyn HandOver>) -> Upgrader {
        self.participants.push(participant);
        self
    }

    /// Starts `binary` (default: `server.executable` as the config file says now), hands
    /// over, and returns the new pid once it serves and this process has stopped accepting.
    ///
    /// The upgrade runs as a task of its own: a caller that goes away (a cancelled
    /// `proxyctl upgrade --wait`, a client killed by a reload timeout) changes nothing
    /// about its outcome.
    pub async fn upgrade(self: &Arc<Self>, binary: Option<PathBuf>) -> Result<u32, UpgradeError> {
        if self.shutdown.is_handed_over() {
            return Err(UpgradeError::HandedOver);
        }
        if self.busy.swap(true, Ordering::SeqCst) {
            return Err(UpgradeError::Busy);
        }
        let busy = Busy(self.clone());
        let upgrader = self.clone();
        let task = tokio::spawn(async move {
            let result = upgrader.attempt(binary).await;
            drop(busy);
            result
        });
        task.await.unwrap_or_else(|e| {
            Err(UpgradeError::Protocol(format!(
                "the upgrade task failed: {e}"
            )))
        })
    }

    /// The executable an upgrade starts: `server.executable` from the config file as it is
    /// now, else the one known at start.
    async fn executable(&self) -> Result<PathBuf, UpgradeError> {
        let Some(path) = self.config_file.clone() else {
            return Ok(self.executable.clone());
        };
        let config = tokio::task::spawn_blocking(move || crate::Config::load(&path))
            .await
            .map_err(|e| UpgradeError::Config(e.to_string()))?
            .map_err(|e| UpgradeError::Config(format!("the config file cannot be used: {e}")))?;
        Ok(default_executable(config.server.executable.as_deref()))
    }

    async fn attempt(&self, binary: Option<PathBuf>) -> Result<u32, UpgradeError> {
        let started = std::time::Instant::now();
        let result = match binary {
            Some(binary) => Ok(binary),
            None => self.executable().await,
        };
        let result = match result {
            Ok(binary) => self.run(binary).await,
            Err(e) => Err(e),
        };
        if let Some(metrics) = &self.metrics {
            metrics.upgrade_finished(result.is_ok(), started.elapsed());
        }
        match &result {
            Ok(pid) => tracing::info!(
                new_pid = pid,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "handed over to the new process"
            ),
            Err(e) => tracing::error!(error = %e, "upgrade failed; this process keeps serving"),
        }
        result
    }

    async fn run(&self, binary: PathBuf) -> Result<u32, UpgradeError> {
        let path = self
            .runtime_dir
            .join(format!("proxyd-handoff-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = tokio::net::UnixListener::bind(&path).map_err(|e| {
            UpgradeError::Protocol(format!("cannot create {}: {e}", path.display()))
        })?;
        tracing::info!(binary = %binary.display(), "starting the new process");
        let spawned = tokio::process::Command::new(&binary)
            .args(&self.args)
            .env(HANDOFF_ENV, &path)
            .stdin(std::process::Stdio::null())
            .spawn();
        let child = match spawned {
            Ok(c) => c,
            Err(source) => {
                let _ = std::fs::remove_file(&path);
                return Err(UpgradeError::Spawn {
                    binary: binary.display().to_string(),
                    source,
                });
            }
        };
        let pid = child.id().unwrap_or(0);
        let deadline = Instant::now() + self.timeout;
        let mut rollback = Rollback {
            upgrader: self,
            child: Some(child),
            quiesced: 0,
        };
        let result = match rollback.child.as_mut() {
            Some(child) => {
                self.converse(&listener, child, pid, deadline, &mut rollback.quiesced)
                    .await
            }
            None => Err(UpgradeError::Protocol("the new process is gone".into())),
        };
        drop(listener);
        let _ = std::fs::remove_file(&path);
        match result {
            Ok(()) => {
                let child = rollback.disarm();
                // systemd follows the new process; this one now only drains.
                crate::systemd::notify(&[sd_notify::NotifyState::MainPid(pid)]);
                self.shutdown.hand_over();
                // The child outlives us; reap it only if we are still around when it exits.
                if let Some(mut child) = child {
                    tokio::spawn(async move {
                        let _ = child.wait().await;
                    });
                }
                Ok(pid)
            }
            Err(e) => {
                let quiesced = rollback.quiesced;
                if let Some(mut child) = rollback.disarm() {
                    let _ = child.start_kill();
                    let _ = child.wait().await;
                }
                self.resume(quiesced).await?;
                Err(e)
            }
        }
    }

    async fn converse(
        &self,
        listener: &tokio::net::UnixListener,
        child: &mut tokio::process::Child,
        pid: u32,
        deadline: Instant,
        quiesced: &mut usize,
    ) -> Result<(), UpgradeError> {
        let timeout = self.timeout;
        let stream = tokio::select! {
            accepted = listener.accept() => accepted.map_err(|e| UpgradeError::Protocol(e.to_string()))?.0,
            status = child.wait() => return Err(exited(status)),
            _ = tokio::time::sleep_until(deadline) => return Err(UpgradeError::Timeout(timeout)),
        };
        let peer = stream
            .peer_cred()
            .map_err(|e| UpgradeError::Protocol(e.to_string()))?;
        if peer.pid() != Some(pid as i32) {
            return Err(UpgradeError::Protocol(format!(
                "unexpected peer {:?} on the handoff socket",
                peer.pid()
            )));
        }
        let conn = wire::Conn::new(
            stream
                .into_std()
                .map_err(|e| UpgradeError::Protocol(e.to_string()))?,
        )
        .map_err(|e| UpgradeError::Protocol(e.to_string()))?;

        let (mut conn, form) = blocking(deadline, child, conn, |c, d| c.expect_hello(d)).await?;
        // From here on management connections wait for the new process, and our writer
        // closes before the child can open the store: never two writers. Bounded by the
        // deadline like every other step (the writer may have a backlog).
        tokio::time::timeout_at(deadline, self.quiesce(quiesced))
            .await
            .map_err(|_| UpgradeError::Timeout(timeout))??;
        let (offer, data, revision) = tokio::time::timeout_at(deadline, self.offer())
            .await
            .map_err(|_| UpgradeError::Timeout(timeout))??;
        (conn, ()) = blocking(deadline, child, conn, move |c, _| {
            c.send_sockets(form, revision, &offer, data)
        })
        .await?;
        blocking(deadline, child, conn, |c, d| c.expect_ready(d)).await?;
        Ok(())
    }

    /// Stops the participants in order, counting each in `quiesced` as it starts stopping,
    /// so one that fails or runs out of time is resumed too.
    async fn quiesce(&self, quiesced: &mut usize) -> Result<(), UpgradeError> {
        for participant in &self.participants {
            *quiesced += 1;
            participant
                .quiesce()
                .await
                .map_err(|e| UpgradeError::Quiesce {
                    part: participant.name().to_owned(),
                    reason: e.to_string(),
                })?;
        }
        Ok(())
    }

    /// Starts the first `quiesced` participants again, in reverse order; every one is
    /// resumed even if one before it fails, and the first failure is returned.
    async fn resume(&self, quiesced: usize) -> Result<(), UpgradeError> {
        let mut failed = None;
        for participant in self.participants[..quiesced].iter().rev() {
            if let Err(e) = participant.resume().await {
                tracing::error!(part = participant.name(), error = %e, "cannot resume after the failed upgrade");
                failed.get_or_insert(UpgradeError::Resume {
                    part: participant.name().to_owned(),
                    reason: e.to_string(),
                });
            }
        }
        failed.map_or(Ok(()), Err)
    }

    /// Lists what to hand over: the sockets, the extras' data and the state revision.
    async fn offer(&self) -> Result<Offer, UpgradeError> {
        let revision = (self.revision)();
        let mut offer: Vec<(String, SocketKind, OwnedFd)> = self
            .sockets
            .iter()
            .map(|s| {
                s.fd.try_clone()
                    .map(|fd| (s.name.clone(), s.kind, fd))
                    .map_err(|e| UpgradeError::Protocol(format!("duplicating {}: {e}", s.name)))
            })
            .collect::<Result<_, _>>()?;
        // Listed now, not at start: these sockets open and close while the daemon runs.
        let mut data = std::collections::BTreeMap::new();
        for extras in &self.extras {
            for s in extras.handoff_sockets().await {
                offer.push((s.name, s.kind, s.fd));
            }
            data.extend(extras.handoff_data().await);
        }
        Ok((offer, data, revision))
    }
}

/// The sockets, the extras' data and the state revision offered to the successor.
type Offer = (
    Vec<(String, SocketKind, OwnedFd)>,
    std::collections::BTreeMap<String, String>,
    u64,
);

/// Clears the busy flag when an upgrade attempt ends, however it ends.
struct Busy(Arc<Upgrader>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy.store(false, Ordering::SeqCst);
    }
}

/// Undoes a half-done handoff if the attempt is dropped before it decided (the runtime
/// stops under it): the new process is killed and the participants that were quiesced
/// resume (the writer reopens, management connections are accepted again).
struct Rollback<'a> {
    upgrader: &'a Upgrader,
    child: Option<tokio::process::Child>,
    /// How many participants, from the first, were asked to quiesce.
    quiesced: usize,
}

impl Rollback<'_> {
    /// The attempt decided: hands back the child and undoes nothing.
    fn disarm(&mut self) -> Option<tokio::process::Child> {
        self.quiesced = 0;
        self.child.take()
    }
}

impl Drop for Rollback<'_> {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = child.start_kill();
        let participants = self.upgrader.participants[..self.quiesced].to_vec();
        if participants.is_empty() {
            return;
        }
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                for participant in participants.iter().rev() {
                    if let Err(e) = participant.resume().await {
                        tracing::error!(part = participant.name(), error = %e, "cannot resume after an abandoned upgrade");
                    }
                }
            });
        }
    }
}

fn exited(status: std::io::Result<std::process::ExitStatus>) -> UpgradeError {
    UpgradeError::ChildExited(match status {
        Ok(s) => s.to_string(),
        Err(e) => e.to_string(),
    })
}

/// Runs one blocking step of the conversation while watching the child and the deadline.
async fn blocking<F, T>(
    deadline: Instant,
    child: &mut tokio::process::Child,
    conn: wire::Conn,
    step: F,
) -> Result<(wire::Conn, T), UpgradeError>
where
    F: FnOnce(&mut wire::Conn, std::time::Instant) -> std::io::Result<T> + Send + 'static,
    T: Send + 'static,
{
    let std_deadline =
        std::time::Instant::now() + deadline.saturating_duration_since(Instant::now());
    let mut task = tokio::task::spawn_blocking(move || {
        let mut conn = conn;
        step(&mut conn, std_deadline).map(|out| (conn, out))
    });
    tokio::select! {
        joined = &mut task => match joined {
            Ok(Ok(done)) => Ok(done),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::TimedOut || e.kind() == std::io::ErrorKind::WouldBlock => {
                Err(UpgradeError::Timeout(deadline.saturating_duration_since(Instant::now())))
            }
            Ok(Err(e)) => match child.try_wait() {
                Ok(Some(status)) => Err(UpgradeError::ChildExited(status.to_string())),
                _ => Err(UpgradeError::Protocol(e.to_string())),
            },
            Err(e) => Err(UpgradeError::Protocol(e.to_string())),
        },
        status = child.wait() => Err(exited(status)),
    }
}

/// The child's end of the handoff: received sockets, and the promise to say `READY`.
pub struct Handoff {
    conn: wire::Conn,
    /// State revision the parent had when it closed its writer.
    pub revision: u64,
}

/// If this process was started by an upgrade, connects to the parent and receives its
/// sockets. Returns `None` for a normal start. Clears [`HANDOFF_ENV`], so call it before
/// any other thread runs (see [`crate::inherit`]).
pub fn receive() -> Result<Option<(Handoff, Inherited)>, UpgradeError> {
    let Some(path) = std::env::var_os(HANDOFF_ENV) else {
        return Ok(None);
    };
    std::env::remove_var(HANDOFF_ENV);
    let protocol = |e: std::io::Error| UpgradeError::Protocol(e.to_string());
    let stream = std::os::unix::net::UnixStream::connect(&path).map_err(protocol)?;
    let mut conn = wire::Conn::new(stream).map_err(protocol)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    conn.send_hello().map_err(protocol)?;
    let (revision, sockets, data) = conn.receive_sockets(deadline).map_err(protocol)?;
    let mut inherited = Inherited::default();
    inherited.set_data(data);
    for (name, kind, fd) in sockets {
        match kind {
            SocketKind::Tcp => {
                inherited.insert_tcp(name, std::net::TcpListener::from(fd), Origin::Handoff)
            }
            SocketKind::Unix => {
                inherited.insert_unix(name, std::os::unix::net::UnixListener::from(fd))
            }
        }
    }
    tracing::info!(
        revision,
        "received the listening sockets from the previous process"
    );
    Ok(Some((Handoff { conn, revision }, inherited)))
}

impl Handoff {
    /// Tells the parent this process serves; it then stops accepting and exits.
    pub fn ready(mut self) -> Result<(), UpgradeError> {
        self.conn
            .send_ready()
            .map_err(|e| UpgradeError::Protocol(e.to_string()))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// Writes what it is asked to do into a shared journal; `fail` makes that step fail.
    struct Journal {
        name: &'static str,
        journal: Arc<Mutex<Vec<String>>>,
        fail: Option<&'static str>,
    }

    impl Journal {
        fn step(&self, what: &'static str) -> HandOverStep<'_> {
            self.journal
                .lock()
                .unwrap()
                .push(format!("{what} {}", self.name));
            let result = if self.fail == Some(what) {
                Err(format!("{} cannot {what}", self.name).into())
            } else {
                Ok(())
            };
            Box::pin(std::future::ready(result))
        }
    }

    impl HandOver for Journal {
        fn name(&self) -> &str {
            self.name
        }
        fn quiesce(&self) -> HandOverStep<'_> {
            self.step("quiesce")
        }
        fn resume(&self) -> HandOverStep<'_> {
            self.step("resume")
        }
    }

    fn upgrader(
        parts: &[(&'static str, Option<&'static str>)],
    ) -> (Upgrader, Arc<Mutex<Vec<String>>>) {
        let journal = Arc::new(Mutex::new(Vec::new()));
        let mut upgrader = Upgrader::new(
            PathBuf::from("proxyd"),
            std::env::temp_dir(),
            Duration::from_secs(1),
            Box::new(|| 7),
            Shutdown::new(),
            Vec::new(),
        );
        for &(name, fail) in parts {
            upgrader = upgrader.with_participant(Arc::new(Journal {
                name,
                journal: journal.clone(),
                fail,
            }));
        }
        (upgrader, journal)
    }

    #[tokio::test]
    async fn participants_quiesce_in_order_and_resume_in_reverse() {
        let (upgrader, journal) = upgrader(&[("gate", None), ("writer", None), ("third", None)]);
        let mut quiesced = 0;
        upgrader.quiesce(&mut quiesced).await.unwrap();
        assert_eq!(quiesced, 3);
        upgrader.resume(quiesced).await.unwrap();
        assert_eq!(
            *journal.lock().unwrap(),
            [
                "quiesce gate",
                "quiesce writer",
                "quiesce third",
                "resume third",
                "resume writer",
                "resume gate"
            ]
        );
    }

    #[tokio::test]
    async fn a_failed_quiesce_stops_there_and_the_failed_one_resumes_too() {
        let (upgrader, journal) =
            upgrader(&[("gate", None), ("writer", Some("quiesce")), ("third", None)]);
        let mut quiesced = 0;
        let err = upgrader.quiesce(&mut quiesced).await.unwrap_err();
        assert!(
            matches!(&err, UpgradeError::Quiesce { part, .. } if part == "writer"),
            "{err}"
        );
        assert_eq!(quiesced, 2);
        upgrader.resume(quiesced).await.unwrap();
        assert_eq!(
            *journal.lock().unwrap(),
            [
                "quiesce gate",
                "quiesce writer",
                "resume writer",
                "resume gate"
            ]
        );
    }

    #[tokio::test]
    async fn every_participant_resumes_even_after_one_fails_and_the_first_failure_is_reported() {
        let (upgrader, journal) = upgrader(&[("gate", None), ("writer", Some("resume"))]);
        let mut quiesced = 0;
        upgrader.quiesce(&mut quiesced).await.unwrap();
        let err = upgrader.resume(quiesced).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "resuming writer after the failed upgrade: writer cannot resume"
        );
        assert_eq!(
            *journal.lock().unwrap(),
            [
                "quiesce gate",
                "quiesce writer",
                "resume writer",
                "resume gate"
            ]
        );
    }
}
