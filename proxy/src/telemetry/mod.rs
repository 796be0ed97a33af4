//! Operator-facing output: logging set-up, the access log format, the metrics registry,
//! OTLP export and the admin listener (`/metrics`, `/healthz`, `/readyz`).
//!
//! One [`Telemetry`] is created per daemon in `Daemon::start_with` and handed to the
//! listeners; other parts of the daemon record through [`Telemetry::metrics`].

pub mod access;
pub mod admin;
pub mod api;
pub mod histogram;
pub mod history;
pub mod metrics;
pub mod otlp;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::Layer as _;

pub use access::{AccessLogFormat, HeaderPolicy};
pub use histogram::DurationHistogram;
pub use metrics::{
    AcmeResult, CertificateExpiry, ClientTimeout, ClusterReading, GaugeGuard, HeldOutcome,
    HttpOutcome, ListenerSeries, Metrics, OpenConnection, Reader, Refusal, RouteCount, RouteNames,
    RouteTotal, SourceCondition,
};
pub use otlp::{OtlpError, RequestTracing, SpanOutcome};

use crate::routing::Published;

/// What the metrics read from the state side: the routing snapshots (upstream health,
/// read at scrape time) and the state writer's latency histogram.
#[derive(Debug, Clone)]
pub struct StateFeed {
    /// The published routing tables.
    pub routing: Published,
    /// Time the state writer takes per batch (the composition root feeds it).
    pub write_latency: DurationHistogram,
}

/// The `[telemetry]` section.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TelemetryConfig {
    /// Access log format (`json`, `logfmt`, `off`).
    pub access_log: AccessLogFormat,
    /// Whether the access log shows the query string (off by default: queries carry tokens).
    pub include_query: bool,
    /// Request headers shown in the access log, and those whose values are hidden.
    pub headers: HeaderPolicy,
    /// `[telemetry.otlp]`: export traces and metrics when set.
    pub otlp: Option<OtlpConfig>,
}

/// The `[telemetry.otlp]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtlpConfig {
    /// Collector gRPC endpoint, e.g. `http://127.0.0.1:4317`.
    pub endpoint: String,
    /// How often buffered spans and metrics are sent.
    pub interval: Duration,
    /// Time allowed for one export call.
    pub timeout: Duration,
    /// `service.name` of the exported resource.
    pub service_name: String,
}

/// Installs the global tracing subscriber (diagnostics on stderr filtered by `RUST_LOG`,
/// else `default_filter`) and the access log sink (lines on stdout in the configured
/// format, whatever the filter; see [`access`]).
pub fn init_logging(default_filter: &str, config: &TelemetryConfig) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(default_filter))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let diagnostics = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_filter(filter);
    let _ = tracing_subscriber::registry().with(diagnostics).try_init();
    if let Err(e) = access::install(config.access_log) {
        tracing::error!(error = %e, "cannot start the access log writer; access lines are not written");
    }
}

/// The telemetry of one daemon: metrics, access log settings, request tracing, readiness.
pub struct Telemetry {
    metrics: Arc<Metrics>,
    access_log: bool,
    include_query: bool,
    headers: HeaderPolicy,
    tracing: Option<Arc<RequestTracing>>,
    otlp: Mutex<Option<Arc<otlp::Otlp>>>,
    ready: AtomicBool,
    /// What `/readyz` adds to "ready" (fleet mode: stale while etcd is unreachable).
    readiness_note: std::sync::OnceLock<ReadinessNote>,
}

/// A function `/readyz` calls for a note on its "ready" answer (`None`: nothing to add).
pub type ReadinessNote = Box<dyn Fn() -> Option<String> + Send + Sync>;

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry")
            .field("include_query", &self.include_query)
            .field("tracing", &self.tracing.is_some())
            .field("ready", &self.is_ready())
            .finish_non_exhaustive()
    }
}

impl Telemetry {
    /// Creates the metrics (reading health and write latency from `state`) and, when
    /// configured, starts the OTLP exporters. Must run inside the Tokio runtime.
    pub fn start(
        config: &TelemetryConfig,
        state: Option<&StateFeed>,
    ) -> Result<Telemetry, OtlpError> {
        let metrics = Arc::new(Metrics::new(state));
        let (tracing, otlp) = match &config.otlp {
            None => (None, None),
            Some(otlp_config) => {
                let (otlp, instruments) =
                    otlp::Otlp::start(otlp_config, Arc::downgrade(&metrics), state.cloned())?;
                metrics.export_to(instruments);
                tracing::info!(endpoint = %otlp_config.endpoint, "exporting traces and metrics over OTLP");
                (Some(otlp.tracing()), Some(Arc::new(otlp)))
            }
        };
        Ok(Telemetry {
            metrics,
            access_log: config.access_log != AccessLogFormat::Off,
            include_query: config.include_query,
            headers: config.headers.clone(),
            tracing,
            otlp: Mutex::new(otlp),
            ready: AtomicBool::new(false),
            readiness_note: std::sync::OnceLock::new(),
        })
    }

    /// Telemetry with defaults and no state (unit tests, tools).
    pub fn detached() -> Telemetry {
        Telemetry {
            metrics: Arc::new(Metrics::new(None)),
            access_log: true,
            include_query: false,
            headers: HeaderPolicy::default(),
            tracing: None,
            otlp: Mutex::new(None),
            ready: AtomicBool::new(false),
            readiness_note: std::sync::OnceLock::new(),
        }
    }

    /// The metrics to record into.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Whether access lines are written at all (`access_log` is not `off`).
    pub fn access_log_enabled(&self) -> bool {
        self.access_log
    }

    /// Whether access lines show the query string.
    pub fn include_query(&self) -> bool {
        self.include_query
    }

    /// Which request headers access lines show.
    pub fn headers(&self) -> &HeaderPolicy {
        &self.headers
    }

    /// Request tracing, when OTLP is configured.
    pub fn tracing(&self) -> Option<&Arc<RequestTracing>> {
        self.tracing.as_ref()
    }

    /// Marks the daemon ready: listeners bound, state loaded (for `/readyz`).
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::SeqCst);
        self.metrics.set_ready(true);
    }

    /// Sets what `/readyz` adds to its "ready" answer (set once).
    pub fn note_readiness_with(&self, note: ReadinessNote) {
        let _ = self.readiness_note.set(note);
    }

    /// The note `/readyz` adds to "ready", if any.
    pub fn readiness_note(&self) -> Option<String> {
        self.readiness_note.get().and_then(|note| note())
    }

    /// Whether [`set_ready`](Self::set_ready) was called.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    /// Writes buffered access lines, sends buffered spans and metrics and stops the
    /// exporters.
    pub async fn flush(&self) {
        // Blocking: the output may be a pipe that is slow to take the last lines.
        let _ = tokio::task::spawn_blocking(access::flush).await;
        let otlp = self
            .otlp
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(otlp) = otlp {
            // The exporters block while their threads drive the gRPC client on this runtime.
            let _ = tokio::task::spawn_blocking(move || otlp.shutdown()).await;
        }
    }
}
