//! Ports for tests, from the standard library alone (the proxyctl tests include this file
//! too).

/// A port nothing listens on now, for a server that must be told its port before it starts.
///
/// Taken from 20000-32767, below Linux's ephemeral range (32768-60999): a port released by
/// `bind(0)` could be handed out again as the source port of any outgoing connection (the
/// load tests open thousands), while ports in this range are only ever taken on purpose.
///
/// Within one test process no port is handed out twice: the walk starts at a point chosen
/// once per process and steps by 7919, which is coprime to the range's 12,768 ports, so
/// it visits every port once before repeating.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static START: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = *START.get_or_init(|| {
        std::process::id().wrapping_mul(2_654_435_761).wrapping_add(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos()),
        ) % 12_768
    });
    for _ in 0..1000 {
        let step = NEXT.fetch_add(1, Ordering::Relaxed) % 12_768;
        let port = 20_000 + ((start + step * 7919) % 12_768) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in 20000-32767");
}
