//! Recent rates for the status page: the request counters and open connections sampled
//! every few seconds and kept for the last minutes, so a page opened now draws its
//! sparklines at once instead of after minutes of polling.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::{Metrics, RouteCount};

/// Time between two samples.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(5);

/// Samples kept: five minutes at [`SAMPLE_EVERY`].
pub const SAMPLES_KEPT: usize = 61;

/// A sample holds only what moved since the sample before: the routes whose counts
/// changed, by number (see [`Routes`]), with how much. A table of 100,000 routes of which
/// a few are busy costs a sample what the busy ones do, and no name is copied per sample
/// (each sample used to hold every route that had ever answered, by its three names:
/// some 20 MB per sample at 100,000 routes, 61 samples kept).
struct Sample {
    at: Instant,
    unix_ms: u64,
    /// The routes whose counts moved since the sample before, in the order the metrics
    /// listed them.
    moved: Vec<Moved>,
    connections: i64,
}

/// How much one route's counts moved between two samples.
#[derive(Debug, Clone, Copy)]
struct Moved {
    /// The route's number in [`Routes`].
    route: u32,
    requests: u32,
    errors: u32,
}

impl Moved {
    fn between(route: u32, before: (u64, u64), now: (u64, u64)) -> Moved {
        let difference =
            |before: u64, now: u64| u32::try_from(now.saturating_sub(before)).unwrap_or(u32::MAX);
        Moved {
            route,
            requests: difference(before.0, now.0),
            errors: difference(before.1, now.1),
        }
    }
}

/// A (listener, route, pool)'s names, as its series holds them.
type RouteNames = (Arc<str>, Arc<str>, Arc<str>);

/// A number for every (listener, route, pool) the metrics have listed, with its names and
/// its counts at the latest sample. A route is known by its series' names: the `Arc`s,
/// not their text, so finding it hashes three addresses, and holding the `Arc`s keeps
/// those addresses from being reused. The metrics keep a route's series for the daemon's
/// life, so there are as many numbers as series and none is given up.
#[derive(Default)]
struct Routes {
    numbers: HashMap<[usize; 3], u32>,
    slots: Vec<Slot>,
}

struct Slot {
    names: RouteNames,
    /// (requests, errors) at the latest sample.
    counts: (u64, u64),
}

impl Routes {
    /// The number of the route `count` is of, given now if it has none.
    fn number(&mut self, count: &RouteCount<'_>) -> u32 {
        let names = [count.listener, count.route, count.pool];
        let key = names.map(|name| Arc::as_ptr(name).cast::<u8>() as usize);
        if let Some(&number) = self.numbers.get(&key) {
            return number;
        }
        let number = u32::try_from(self.slots.len()).unwrap_or(u32::MAX);
        self.slots.push(Slot {
            names: names.map(Arc::clone).into(),
            counts: (0, 0),
        });
        self.numbers.insert(key, number);
        number
    }

    fn slot(&self, number: u32) -> &Slot {
        &self.slots[number as usize]
    }
}

/// The samples, and what they refer to.
#[derive(Default)]
struct Window {
    routes: Routes,
    samples: VecDeque<Sample>,
}

/// The samples of one daemon's counters.
pub struct History {
    metrics: Arc<Metrics>,
    window: Mutex<Window>,
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
            window: Mutex::new(Window {
                samples: VecDeque::with_capacity(SAMPLES_KEPT),
                ..Window::default()
            }),
        }
    }

    fn window(&self) -> std::sync::MutexGuard<'_, Window> {
        self.window
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records one sample now, forgetting the oldest beyond [`SAMPLES_KEPT`].
    pub fn sample(&self) {
        let mut guard = self.window();
        let window = &mut *guard;
        let routes = &mut window.routes;
        let mut moved = Vec::new();
        self.metrics.visit_route_counts(|count| {
            let number = routes.number(&count);
            let slot = &mut routes.slots[number as usize];
            let now = (count.requests, count.errors);
            if now != slot.counts {
                moved.push(Moved::between(number, slot.counts, now));
                slot.counts = now;
            }
        });
        if window.samples.len() == SAMPLES_KEPT {
            window.samples.pop_front();
        }
        window.samples.push_back(Sample {
            at: Instant::now(),
            unix_ms: unix_ms(SystemTime::now()),
            moved,
            connections: self.metrics.connections_open(),
        });
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
    /// (so traffic of the last seconds shows before the next sample is taken), for every
    /// route the metrics list.
    pub fn rates(&self) -> Rates {
        let mut guard = self.window();
        let window = &mut *guard;
        // The routes listed now, with their counts and what they moved by since the
        // latest sample.
        let mut listed: Vec<(u32, (u64, u64))> = Vec::new();
        let routes = &mut window.routes;
        self.metrics.visit_route_counts(|count| {
            let number = routes.number(&count);
            listed.push((number, (count.requests, count.errors)));
        });
        let now = Sample {
            at: Instant::now(),
            unix_ms: unix_ms(SystemTime::now()),
            moved: listed
                .iter()
                .map(|&(number, counts)| Moved::between(number, routes.slot(number).counts, counts))
                .filter(|moved| moved.requests > 0 || moved.errors > 0)
                .collect(),
            connections: self.metrics.connections_open(),
        };
        let mut points: Vec<&Sample> = window.samples.iter().collect();
        // A "now" very close to the last sample would give a noisy rate.
        if points
            .last()
            .is_none_or(|last| now.at.duration_since(last.at) >= Duration::from_millis(250))
        {
            points.push(&now);
        }
        let intervals = points.len().saturating_sub(1);

        // One row per route listed now, by names; `row_of` finds a route's row by number.
        listed.sort_by(|a, b| routes.slot(a.0).names.cmp(&routes.slot(b.0).names));
        let mut row_of = vec![u32::MAX; routes.slots.len()];
        let mut by_route: Vec<RouteRates> = Vec::with_capacity(listed.len());
        for (row, &(number, (requests, errors))) in listed.iter().enumerate() {
            row_of[number as usize] = u32::try_from(row).unwrap_or(u32::MAX);
            let (listener, route, pool) = &routes.slot(number).names;
            by_route.push(RouteRates {
                listener: listener.to_string(),
                route: route.to_string(),
                pool: pool.to_string(),
                requests_per_s: vec![0.0; intervals],
                error_ratio: vec![0.0; intervals],
                requests,
                errors,
            });
        }

        let mut rates = Rates {
            at_unix_ms: Vec::with_capacity(intervals),
            requests_per_s: Vec::with_capacity(intervals),
            connections: Vec::with_capacity(intervals),
            routes: Vec::new(),
        };
        for (interval, pair) in points.windows(2).enumerate() {
            let [before, after] = pair else { continue };
            let seconds = after.at.duration_since(before.at).as_secs_f64().max(0.001);
            rates.at_unix_ms.push(after.unix_ms);
            rates.connections.push(after.connections);
            let mut total = 0u64;
            for moved in &after.moved {
                total += u64::from(moved.requests);
                let Some(row) = row_of
                    .get(moved.route as usize)
                    .and_then(|&row| by_route.get_mut(row as usize))
                else {
                    continue;
                };
                row.requests_per_s[interval] = f64::from(moved.requests) / seconds;
                if moved.requests > 0 {
                    row.error_ratio[interval] = f64::from(moved.errors) / f64::from(moved.requests);
                }
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
            let mut window = history.window();
            let first = window.samples.front_mut().map(|s| &mut s.at);
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
        let kept = history.window().samples.len();
        assert_eq!(kept, SAMPLES_KEPT);
    }

    /// The routes the latest sample holds, by name, with what they moved by.
    fn moved_in_latest(history: &History) -> Vec<(String, u32, u32)> {
        let window = history.window();
        let latest = window.samples.back().map_or(&[][..], |s| &s.moved[..]);
        let mut moved: Vec<_> = latest
            .iter()
            .map(|m| {
                let route = window.routes.slot(m.route).names.1.to_string();
                (route, m.requests, m.errors)
            })
            .collect();
        moved.sort();
        moved
    }

    #[test]
    fn a_sample_holds_only_the_routes_that_moved_and_the_rates_still_show_every_route() {
        let metrics = Arc::new(Metrics::new(None));
        let history = History::new(metrics.clone());
        for route in ["a", "b", "c"] {
            answer(&metrics, route, 200);
        }
        history.sample();
        let all = |n: u32| vec![("a".into(), n, 0), ("b".into(), n, 0), ("c".into(), n, 0)];
        assert_eq!(moved_in_latest(&history), all(1), "counted from nothing");
        answer(&metrics, "b", 200);
        answer(&metrics, "b", 502);
        history.sample();
        assert_eq!(moved_in_latest(&history), vec![("b".into(), 2, 1)]);
        history.sample();
        assert_eq!(moved_in_latest(&history), vec![], "nothing moved");
        answer(&metrics, "c", 200);
        // Samples one second apart, the last one second ago.
        {
            let mut window = history.window();
            let kept = window.samples.len() as u32;
            for (i, sample) in window.samples.iter_mut().enumerate() {
                sample.at -= Duration::from_secs(u64::from(kept) - i as u64);
            }
        }
        let rates = history.rates();
        let names: Vec<&str> = rates.routes.iter().map(|r| r.route.as_str()).collect();
        assert_eq!(names, ["a", "b", "c"], "every route, by name");
        // Two intervals between the three samples and one from the last to now, each a
        // second and the moment the test took.
        assert_eq!(rates.requests_per_s.len(), 3);
        let about = |rate: f64, per_second: f64| rate <= per_second && rate > per_second * 0.9;
        let (a, b, c) = (&rates.routes[0], &rates.routes[1], &rates.routes[2]);
        assert_eq!((a.requests, b.requests, b.errors, c.requests), (1, 3, 1, 2));
        assert_eq!(a.requests_per_s, [0.0; 3]);
        assert!(about(b.requests_per_s[0], 2.0), "{b:?}");
        assert_eq!(b.requests_per_s[1..], [0.0; 2]);
        assert_eq!(b.error_ratio, [0.5, 0.0, 0.0]);
        assert_eq!(c.requests_per_s[..2], [0.0; 2]);
        assert!(about(c.requests_per_s[2], 1.0), "{c:?}");
        assert!(about(rates.requests_per_s[0], 2.0), "{rates:?}");
        assert_eq!(rates.requests_per_s[1], 0.0);
        assert!(about(rates.requests_per_s[2], 1.0), "{rates:?}");
    }
}
