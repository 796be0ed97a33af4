//! Which names may get a certificate on demand: the allowlist (config + API), every host
//! named by a route, then the optional `ask` URL (answers cached).

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use http_body_util::Empty;
use hyper_util::rt::TokioIo;

use crate::state::StateHandle;

/// How long an `ask` answer is kept.
const ASK_ALLOWED_FOR: Duration = Duration::from_secs(3600);
const ASK_DENIED_FOR: Duration = Duration::from_secs(60);
/// Time allowed for the `ask` endpoint to answer.
const ASK_TIMEOUT: Duration = Duration::from_secs(5);

/// The policy's answer for one name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// A certificate may be ordered.
    Allowed,
    /// Not on the list and not allowed by `ask`.
    Denied,
    /// Not on the list, and `ask` could not be reached: new names fail closed.
    AskFailed,
}

/// The on-demand policy.
pub struct Policy {
    enabled: bool,
    config_allow: Vec<String>,
    api_allow: ArcSwap<BTreeSet<String>>,
    ask: Option<String>,
    ask_cache: Mutex<AskCache>,
    state: StateHandle,
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policy")
            .field("enabled", &self.enabled)
            .field("ask", &self.ask)
            .finish()
    }
}

/// Whether `pattern` (`example.com` or `*.example.com`) covers `name`. A wildcard covers
/// names with one label or more in front of the suffix, never the bare suffix.
pub fn covers(pattern: &str, name: &str) -> bool {
    match pattern.strip_prefix('*') {
        Some(suffix) => name.len() > suffix.len() && name.ends_with(suffix),
        None => pattern == name,
    }
}

impl Policy {
    /// A policy over the config's list, the stored API list and the routes of `state`.
    pub fn new(
        enabled: bool,
        config_allow: Vec<String>,
        api_allow: Vec<String>,
        ask: Option<String>,
        state: StateHandle,
    ) -> Policy {
        Policy {
            enabled,
            config_allow,
            api_allow: ArcSwap::from_pointee(api_allow.into_iter().collect()),
            ask,
            ask_cache: Mutex::new(AskCache::new(ASK_CACHE_ENTRIES)),
            state,
        }
    }

    /// Whether on-demand issuance is on at all.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The entries from the config file.
    pub fn config_entries(&self) -> &[String] {
        &self.config_allow
    }

    /// The entries added through the API.
    pub fn api_entries(&self) -> Vec<String> {
        self.api_allow.load().iter().cloned().collect()
    }

    /// Replaces the API entries (after the store changed).
    pub fn set_api_entries(&self, entries: BTreeSet<String>) {
        self.api_allow.store(std::sync::Arc::new(entries));
    }

    /// Whether the static lists or a route name `name` (lower-case), without asking.
    pub fn listed(&self, name: &str) -> bool {
        if self.config_allow.iter().any(|p| covers(p, name))
            || self.api_allow.load().iter().any(|p| covers(p, name))
        {
            return true;
        }
        // The route hosts that cover `name`: itself and `*.` + each of its parent domains,
        // each looked up in the state's host index rather than scanning every route.
        let snap = self.state.snapshot();
        let patterns = std::iter::once(name.to_string()).chain(
            name.match_indices('.')
                .map(|(i, _)| format!("*{}", &name[i..])),
        );
        let routed = patterns
            .filter(|p| covers(p, name))
            .any(|p| snap.state.routes_with_host(&p).next().is_some());
        routed
    }

    /// The full decision for a name without a certificate.
    pub async fn decide(&self, name: &str) -> Decision {
        if !self.enabled {
            return Decision::Denied;
        }
        if self.listed(name) {
            return Decision::Allowed;
        }
        let Some(ask) = &self.ask else {
            return Decision::Denied;
        };
        {
            let mut cache = self.ask_cache.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(allowed) = cache.get(name, Instant::now()) {
                return if allowed {
                    Decision::Allowed
                } else {
                    Decision::Denied
                };
            }
        }
        match ask_url(ask, name).await {
            Ok(allowed) => {
                let keep = if allowed {
                    ASK_ALLOWED_FOR
                } else {
                    ASK_DENIED_FOR
                };
                let mut cache = self.ask_cache.lock().unwrap_or_else(|p| p.into_inner());
                cache.insert(name, allowed, Instant::now() + keep);
                if allowed {
                    Decision::Allowed
                } else {
                    Decision::Denied
                }
            }
            Err(reason) => {
                tracing::warn!(domain = %name, %reason, "on-demand ask endpoint failed; refusing the new name");
                Decision::AskFailed
            }
        }
    }
}

/// Most `ask` answers remembered: a flood of random names evicts the least recently used
/// ones instead of growing the cache.
const ASK_CACHE_ENTRIES: usize = 10_000;

/// `ask` answers by name, each until its expiry, at most `capacity` of them (least
/// recently used out first).
#[derive(Debug)]
struct AskCache {
    entries: HashMap<String, (bool, Instant, u64)>,
    /// Names by last use.
    by_use: std::collections::BTreeMap<u64, String>,
    clock: u64,
    capacity: usize,
}

impl AskCache {
    fn new(capacity: usize) -> Self {
        AskCache {
            entries: HashMap::new(),
            by_use: std::collections::BTreeMap::new(),
            clock: 0,
            capacity: capacity.max(1),
        }
    }

    /// The answer for `name` if it is still valid at `now` (and marks it used).
    fn get(&mut self, name: &str, now: Instant) -> Option<bool> {
        let (allowed, until, used) = self.entries.get_mut(name)?;
        if *until <= now {
            let stale = *used;
            self.entries.remove(name);
            self.by_use.remove(&stale);
            return None;
        }
        let allowed = *allowed;
        self.by_use.remove(used);
        self.clock += 1;
        *used = self.clock;
        self.by_use.insert(self.clock, name.to_string());
        Some(allowed)
    }

    fn insert(&mut self, name: &str, allowed: bool, until: Instant) {
        if let Some((_, _, used)) = self.entries.remove(name) {
            self.by_use.remove(&used);
        }
        while self.entries.len() >= self.capacity {
            let Some((_, oldest)) = self.by_use.pop_first() else {
                break;
            };
            self.entries.remove(&oldest);
        }
        self.clock += 1;
        self.entries
            .insert(name.to_string(), (allowed, until, self.clock));
        self.by_use.insert(self.clock, name.to_string());
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }
}

/// `GET {ask}?domain=NAME` (or `&domain=` when the URL has a query): 200 allows, any other
/// status denies, no answer is an error.
async fn ask_url(ask: &str, name: &str) -> Result<bool, String> {
    let separator = if ask.contains('?') { '&' } else { '?' };
    let uri: http::Uri = format!("{ask}{separator}domain={name}")
        .parse()
        .map_err(|e| format!("ask URL: {e}"))?;
    let authority = uri.authority().ok_or("ask URL has no host")?.clone();
    let port = authority.port_u16().unwrap_or(80);
    let exchange = async {
        let stream = tokio::net::TcpStream::connect((authority.host(), port))
            .await
            .map_err(|e| e.to_string())?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let request = http::Request::get(uri.path_and_query().map_or("/", |p| p.as_str()))
            .header(http::header::HOST, authority.as_str())
            .header(http::header::USER_AGENT, "proxyd on-demand-tls")
            .body(Empty::<bytes::Bytes>::new())
            .map_err(|e| e.to_string())?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status();
        if status.is_server_error() {
            return Err(format!("answered {status}"));
        }
        Ok(status == http::StatusCode::OK)
    };
    tokio::time::timeout(ASK_TIMEOUT, exchange)
        .await
        .map_err(|_| "no answer in time".to_string())?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ask_cache_is_bounded_and_evicts_the_least_recently_used() {
        let now = Instant::now();
        let later = now + std::time::Duration::from_secs(3600);
        let mut cache = AskCache::new(100);
        cache.insert("keep.example", true, later);
        for i in 0..10_000 {
            cache.insert(&format!("flood{i}.example"), false, later);
            // A name in use stays however many others arrive.
            assert_eq!(cache.get("keep.example", now), Some(true));
            assert!(cache.len() <= 100);
        }
        assert_eq!(cache.len(), 100);
        assert_eq!(cache.get("flood0.example", now), None, "evicted");
        assert_eq!(cache.get("flood9999.example", now), Some(false));
        assert_eq!(cache.get("keep.example", later), None, "expired");
    }

    #[test]
    fn wildcards_need_a_label_in_front() {
        assert!(covers("*.example.com", "a.example.com"));
        assert!(covers("*.example.com", "a.b.example.com"));
        assert!(!covers("*.example.com", "example.com"));
        assert!(!covers("*.example.com", "badexample.com"));
        assert!(covers("example.com", "example.com"));
        assert!(!covers("example.com", "a.example.com"));
    }
}
