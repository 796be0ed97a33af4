//! A duration histogram made of atomics, so recording on the request path takes no lock
//! (prometheus-client's own `Histogram` guards its buckets with a mutex).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::{MetricType, TypedMetric};

/// Bucket bounds (seconds) for whole requests: 1 ms to 30 s.
pub const REQUEST_BOUNDS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Bucket bounds (seconds) for connects and SQLite commits: 0.5 ms to 5 s.
pub const FAST_BOUNDS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// The most bounds a histogram has (every bounds list above has at most this many).
const MAX_BOUNDS: usize = 14;

/// A histogram's counts without its bounds: the sum of the observations and one count per
/// bucket (one per bound plus the `+Inf` bucket, those past it unused; not cumulative,
/// summed when encoded), and no total count of its own (the sum of the buckets). No
/// pointer: a route's series keep these inline (see `metrics::RouteSeries`), so recording a
/// request writes the series' own memory and loads nothing first. The bounds are given to
/// each call; the same ones every time.
#[derive(Debug, Default)]
#[repr(C)]
pub struct Counts {
    /// Sum of observations in nanoseconds: integer adds need no compare-and-swap loop.
    sum_ns: AtomicU64,
    buckets: [AtomicU64; MAX_BOUNDS + 1],
}

impl Counts {
    /// Where the buckets start within the counts (after the sum), in bytes.
    #[cfg(test)]
    pub const FIRST_BUCKET: usize = std::mem::offset_of!(Counts, buckets);

    /// Records one observation against `bounds`.
    pub fn observe(&self, bounds: &[f64], elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        let index = bounds
            .iter()
            .position(|b| seconds <= *b)
            .unwrap_or(bounds.len());
        if let Some(bucket) = self.buckets.get(index) {
            bucket.fetch_add(1, Ordering::Relaxed);
        }
        let ns = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    /// Whether anything was observed.
    pub fn any(&self) -> bool {
        self.buckets.iter().any(|b| b.load(Ordering::Relaxed) > 0)
    }

    /// Sum of observations so far.
    pub fn sum(&self) -> Duration {
        Duration::from_nanos(self.sum_ns.load(Ordering::Relaxed))
    }

    /// Writes the counts as a histogram with `bounds`.
    pub fn encode(
        &self,
        bounds: &[f64],
        mut encoder: MetricEncoder,
    ) -> Result<(), std::fmt::Error> {
        let buckets: Vec<(f64, u64)> = bounds
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            // The buckets past the `+Inf` one (unused) end with the bounds.
            .zip(self.buckets.iter().map(|b| b.load(Ordering::Relaxed)))
            .collect();
        // The count is the sum of the buckets read here, so a scrape never shows `_count`
        // below the `+Inf` bucket.
        let count = buckets.iter().map(|(_, n)| n).sum();
        encoder.encode_histogram::<NoLabelSet>(self.sum().as_secs_f64(), count, &buckets, None)
    }
}

/// A cumulative histogram of durations with fixed bounds; clones share the same counts.
#[derive(Clone, Debug)]
pub struct DurationHistogram {
    inner: Arc<Inner>,
}

/// What an observation writes, in one allocation with the bounds.
#[derive(Debug)]
struct Inner {
    counts: Counts,
    /// Also told every observation (the OTLP instrument of the same metric), once set.
    mirror: OnceLock<Mirror>,
    bounds: &'static [f64],
}

/// Where a histogram's observations are copied to.
struct Mirror(Box<dyn Fn(Duration) + Send + Sync>);

impl std::fmt::Debug for Mirror {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Mirror")
    }
}

impl DurationHistogram {
    /// An empty histogram with `bounds` (seconds, ascending; at most the first
    /// [`MAX_BOUNDS`] are kept).
    pub fn new(bounds: &'static [f64]) -> DurationHistogram {
        DurationHistogram {
            inner: Arc::new(Inner {
                bounds: bounds.get(..MAX_BOUNDS).unwrap_or(bounds),
                counts: Counts::default(),
                mirror: OnceLock::new(),
            }),
        }
    }

    /// A histogram for short operations (connects, commits).
    pub fn fast() -> DurationHistogram {
        DurationHistogram::new(FAST_BOUNDS)
    }

    /// Records one observation.
    pub fn observe(&self, elapsed: Duration) {
        self.inner.counts.observe(self.inner.bounds, elapsed);
        if let Some(mirror) = self.inner.mirror.get() {
            (mirror.0)(elapsed);
        }
    }

    /// Copies every later observation to `record` as well (for all clones; set once, later
    /// calls are ignored).
    pub fn mirror_to(&self, record: impl Fn(Duration) + Send + Sync + 'static) {
        let _ = self.inner.mirror.set(Mirror(Box::new(record)));
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.inner.counts.count()
    }

    /// Sum of observations so far.
    pub fn sum(&self) -> Duration {
        self.inner.counts.sum()
    }
}

impl TypedMetric for DurationHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for DurationHistogram {
    fn encode(&self, encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        self.inner.counts.encode(self.inner.bounds, encoder)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_the_first_bucket_that_holds_them() {
        let h = DurationHistogram::new(&[0.01, 0.1]);
        h.observe(Duration::from_millis(5));
        h.observe(Duration::from_millis(10));
        h.observe(Duration::from_millis(50));
        h.observe(Duration::from_secs(3));
        let counts: Vec<u64> = h
            .inner
            .counts
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        assert_eq!(counts[..3], [2, 1, 1]);
        assert!(counts[3..].iter().all(|n| *n == 0));
        assert_eq!(h.count(), 4);
        assert_eq!(h.sum(), Duration::from_millis(3065));
    }

    #[test]
    fn every_bounds_list_fits() {
        for bounds in [REQUEST_BOUNDS, FAST_BOUNDS] {
            assert!(bounds.len() <= MAX_BOUNDS);
            assert_eq!(DurationHistogram::new(bounds).inner.bounds, bounds);
        }
    }

    #[test]
    fn a_mirror_sees_every_later_observation_of_every_clone() {
        let h = DurationHistogram::fast();
        h.observe(Duration::from_millis(1));
        let seen = Arc::new(AtomicU64::new(0));
        let counter = seen.clone();
        h.mirror_to(move |d| {
            counter.fetch_add(u64::try_from(d.as_millis()).unwrap(), Ordering::Relaxed);
        });
        h.clone().observe(Duration::from_millis(7));
        h.observe(Duration::from_millis(5));
        assert_eq!(seen.load(Ordering::Relaxed), 12);
        assert_eq!(h.count(), 3);
    }
}
