//! Recent rates for the status page: the request counters and open connections sampled
//! every few seconds and kept for the last minutes, so a page opened now draws its
//! sparklines at once instead of after minutes of polling.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::Metrics;

/// Time between two samples.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(5);

/// Samples kept: five minutes at [`SAMPLE_EVERY`].
pub const SAMPLES_KEPT: usize = 61;

/// (listener, route, pool) of a route's counters.
type RouteKey = (String, String, String);

struct Sample {
    at: Instant,
    unix_ms: u64,
    /// Requests and 5xx answers so far, by route.
    routes: HashMap<RouteKey, (u64, u64)>,
    connections: i64,
}

/// The samples of one daemon's counters.
pub struct History {
    metrics: Arc<Metrics>,
    samples: Mutex<VecDeque<Sample>>,
}

impl std::fmt::Debug for History {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("History").finish_non_exhaustive()
    }
}

/// Rates of one route over the kept window, oldest first.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RouteRates {
    /// Listener name.
    pub listener: String,
    /// Route name (empty: requests no route matched).
    pub route: String,
    /// Pool name.
    pub pool: String,
    /// Requests per second in each interval.
    pub requests_per_s: Vec<f64>,
    /// Share of 5xx answers in each interval (0 when there were no requests).
    pub error_ratio: Vec<f64>,
    /// Requests answered since start.
    pub requests: u64,
    /// 5xx answers since start.
    pub errors: u64,
}

/// What [`History::rates`] reports.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Rates {
    /// End of each interval, Unix milliseconds (the last one is now).
    pub at_unix_ms: Vec<u64>,
    /// Requests per second over all routes in each interval.
    pub requests_per_s: Vec<f64>,
    /// Client connections open at the end of each interval.
    pub connections: Vec<i64>,
    /// By route.
    pub routes: Vec<RouteRates>,
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl History {
    /// An empty history of `metrics`; call [`History::run`] to fill it.
    pub fn new(metrics: Arc<Metrics>) -> History {
        History {
            metrics,
            samples: Mutex::new(VecDeque::with_capacity(SAMPLES_KEPT)),
        }
    }

    fn take(&self) -> Sample {
        let routes = self
            .metrics
            .route_totals()
            .into_iter()
            .map(|t| ((t.listener, t.route, t.pool), (t.requests, t.errors)))
            .collect();
        Sample {
            at: Instant::now(),
            unix_ms: unix_ms(SystemTime::now()),
            routes,
            connections: self.metrics.connections_open(),
        }
    }

    /// Records one sample now, forgetting the oldest beyond [`SAMPLES_KEPT`].
    pub fn sample(&self) {
        let sample = self.take();
        let mut samples = self
            .samples
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if samples.len() == SAMPLES_KEPT {
            samples.pop_front();
        }
        samples.push_back(sample);
    }

    /// Samples every [`SAMPLE_EVERY`] until `stop` completes.
    pub async fn run(self: Arc<Self>, stop: impl Future<Output = ()>) {
        let mut tick = tokio::time::interval(SAMPLE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = tick.tick() => self.sample(),
                () = &mut stop => return,
            }
        }
    }

    /// Rates between consecutive samples, plus one interval from the last sample to now
    /// (so traffic of the last seconds shows before the next sample is taken).
    pub fn rates(&self) -> Rates {
        let now = self.take();
        let samples = self
            .samples
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut points: Vec<&Sample> = samples.iter().collect();
        // A "now" very close to the last sample would give a noisy rate.
        if points
            .last()
            .is_none_or(|last| now.at.duration_since(last.at) >= Duration::from_millis(250))
        {
            points.push(&now);
        }
        let mut rates = Rates {
            at_unix_ms: Vec::new(),
            requests_per_s: Vec::new(),
            connections: Vec::new(),
            routes: Vec::new(),
        };
        let mut keys: Vec<&RouteKey> = now.routes.keys().collect();
        keys.sort();
        let mut by_route: Vec<RouteRates> = keys
            .iter()
            .map(|(listener, route, pool)| {
                let (requests, errors) =
                    now.routes[&(listener.clone(), route.clone(), pool.clone())];
                RouteRates {
                    listener: listener.clone(),
                    route: route.clone(),
                    pool: pool.clone(),
                    requests_per_s: Vec::new(),
                    error_ratio: Vec::new(),
                    requests,
                    errors,
                }
            })
            .collect();
        for pair in points.windows(2) {
            let [before, after] = pair else { continue };
            let seconds = after.at.duration_since(before.at).as_secs_f64().max(0.001);
            rates.at_unix_ms.push(after.unix_ms);
            rates.connections.push(after.connections);
            let mut total = 0u64;
            for (key, r) in keys.iter().zip(by_route.iter_mut()) {
                let (req_after, err_after) = after.routes.get(*key).copied().unwrap_or_default();
                let (req_before, err_before) = before.routes.get(*key).copied().unwrap_or_default();
                let requests = req_after.saturating_sub(req_before);
                let errors = err_after.saturating_sub(err_before);
                total += requests;
                r.requests_per_s.push(requests as f64 / seconds);
                r.error_ratio.push(if requests == 0 {
                    0.0
                } else {
                    errors as f64 / requests as f64
                });
            }
            rates.requests_per_s.push(total as f64 / seconds);
        }
        rates.routes = by_route;
        rates
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::{HttpOutcome, RouteNames};

    fn answer(m: &Metrics, route: &str, status: u16) {
        m.http_request(&HttpOutcome {
            listener: "web",
            names: RouteNames::Named { route, pool: "p" },
            status,
            error_source: None,
            grpc_status: None,
            bytes: 0,
            elapsed: Duration::from_millis(1),
            end: std::time::Instant::now(),
        });
    }

    #[test]
    fn rates_are_differences_between_samples_and_keep_a_bounded_window() {
        let metrics = Arc::new(Metrics::new(None));
        let history = History::new(metrics.clone());
        history.sample();
        for _ in 0..3 {
            answer(&metrics, "a", 200);
        }
        answer(&metrics, "a", 503);
        answer(&metrics, "b", 200);
        // Backdate the first sample so the live interval is long enough to count.
        {
            let mut samples = history.samples.lock().unwrap_or_else(|e| e.into_inner());
            let first = samples.front_mut().map(|s| &mut s.at);
            if let Some(at) = first {
                *at -= Duration::from_secs(2);
            }
        }
        let rates = history.rates();
        assert_eq!(rates.requests_per_s.len(), 1);
        let a = rates.routes.iter().find(|r| r.route == "a").cloned();
        let a = a.unwrap_or_else(|| panic!("route a missing: {rates:?}"));
        assert_eq!((a.requests, a.errors), (4, 1));
        assert_eq!(a.error_ratio, vec![0.25]);
        // Four requests over at least the two backdated seconds.
        assert!(
            a.requests_per_s[0] > 0.0 && a.requests_per_s[0] <= 2.0,
            "{a:?}"
        );
        for _ in 0..SAMPLES_KEPT + 10 {
            history.sample();
        }
        let kept = history.samples.lock().map(|s| s.len()).unwrap_or(0);
        assert_eq!(kept, SAMPLES_KEPT);
    }
}
