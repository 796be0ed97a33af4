//! `[pools.discovery]`, `on_change` and `[registration]` in the config file: accepted
//! forms and errors that name the file, line and field.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use proxy::discovery::SourceSpec;
use proxy::state::OnChange;
use proxy::Config;

const POOL: &str = "[[pools]]\nname = \"redis\"\n";

fn err(text: &str) -> String {
    match Config::parse(text, "t.toml") {
        Ok(_) => panic!("accepted: {text}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn each_source_kind_parses() {
    let text = format!(
        "{POOL}on_change = \"reset\"\n[pools.discovery]\netcd = {{ endpoints = [\"http://127.0.0.1:2379\"], prefix = \"/srv/redis/debug/\" }}\n\
         [[pools]]\nname = \"d\"\n[pools.discovery]\ndns = {{ name = \"redis.service.internal\", port = 6379, interval = \"30s\" }}\n\
         [[pools]]\nname = \"e\"\n[pools.discovery]\nexec = {{ command = [\"/usr/local/bin/list-redis\"], interval = \"10s\" }}\n\
         [[pools]]\nname = \"f\"\n[pools.discovery]\nfile = {{ path = \"/etc/proxy/redis.json\" }}\n\
         [registration]\nhold = \"5s\"\nport_range = \"21000-21010\"\nqueue_limit = 7\nmax_wait = \"3s\"\naddress = \"127.0.0.1\"\n"
    );
    let c = Config::parse(&text, "t.toml").expect("valid");
    assert_eq!(c.discovery.len(), 4);
    assert_eq!(c.discovery[0].on_change, OnChange::Reset);
    assert_eq!(
        c.discovery[0].source,
        SourceSpec::Etcd {
            endpoints: vec!["http://127.0.0.1:2379".into()],
            prefix: "/srv/redis/debug".into()
        }
    );
    assert!(
        matches!(&c.discovery[1].source, SourceSpec::Dns { port: Some(6379), interval, .. } if *interval == Duration::from_secs(30))
    );
    assert!(
        matches!(&c.discovery[2].source, SourceSpec::Exec { timeout, .. } if *timeout == Duration::from_secs(5))
    );
    assert!(matches!(&c.discovery[3].source, SourceSpec::File { .. }));
    assert_eq!(c.registration.hold, Duration::from_secs(5));
    assert_eq!(c.registration.port_range, 21000..=21010);
    assert_eq!(c.registration.queue_limit, 7);
}

#[test]
fn discovery_errors_name_the_line_and_field() {
    let e = err(&format!(
        "{POOL}[pools.discovery]\netcd = {{ endpoints = [], prefix = \"/x\" }}\n"
    ));
    assert!(
        e.starts_with("t.toml:4: pools[0].discovery.etcd.endpoints: "),
        "{e}"
    );
    let e = err(&format!(
        "{POOL}[pools.discovery]\ndns = {{ name = \"x\", interval = \"soon\" }}\n"
    ));
    assert!(
        e.starts_with("t.toml:4: pools[0].discovery.dns.interval: invalid duration"),
        "{e}"
    );
    let e = err(&format!(
        "{POOL}[pools.discovery]\nexec = {{ command = [] }}\n"
    ));
    assert!(
        e.starts_with("t.toml:4: pools[0].discovery.exec.command: "),
        "{e}"
    );
    let e = err(&format!(
        "{POOL}[pools.discovery]\nfile = {{ path = \"/a\" }}\nexec = {{ command = [\"/bin/true\"] }}\n"
    ));
    assert!(
        e.starts_with("t.toml:5: pools[0].discovery: give exactly one"),
        "{e}"
    );
    let e = err(&format!("{POOL}on_change = \"sometimes\"\n"));
    assert!(
        e.starts_with("t.toml:3: pools[0].on_change: unknown on_change"),
        "{e}"
    );
    let e = err(&format!(
        "{POOL}[pools.discovery]\nconsul = {{ name = \"x\" }}\n"
    ));
    assert!(e.contains("consul"), "{e}");
}

#[test]
fn registration_errors_name_the_line_and_field() {
    let e = err("[registration]\nhold = \"30s\"\nport_range = \"2000-1000\"\n");
    assert!(
        e.starts_with("t.toml:3: registration.port_range: invalid range"),
        "{e}"
    );
    let e = err("[registration]\nmax_wait = \"0s\"\n");
    assert!(
        e.starts_with("t.toml:2: registration.max_wait: must be positive"),
        "{e}"
    );
    let e = err("[registration]\naddress = \"nowhere\"\n");
    assert!(e.starts_with("t.toml:2: registration.address: "), "{e}");
}
